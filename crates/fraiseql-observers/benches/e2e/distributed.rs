//! The `distributed` scenario: a reader (`run --role reader`) and 1, 2 and 4 worker processes
//! (`run --role worker`, `max_in_flight = 32` each) of the shipped daemon, over the machine's
//! nats-server (127.0.0.1:4222), delivering the backlog to a receiver that takes 20 ms per
//! request (or each delay of `--receiver-delay-ms MS[,MS...]`: at 200 ms the in-flight bound,
//! 32 / 0.2 s = 160/s per worker, limits before the CPU does). Also: the reader's publish rate into JetStream (no worker running), and the CPU per
//! event of the extra hop (reader + one worker, against the single-process daemon, both to the
//! fast receiver).
//!
//! Each run uses a stream and a consumer of its own (random names), deleted at the end. A run
//! that loses a delivery panics.

use super::{cpu_seconds, engine, Options, ReceiverProcess, Summary, ThroughputDb};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NATS_URL: &str = "nats://127.0.0.1:4222";
const PARTITIONS: u32 = 16;
const MAX_IN_FLIGHT: usize = 32;
const WORKERS: [usize; 3] = [1, 2, 4];

/// One daemon process of the scenario.
struct Daemon {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Daemon {
    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn cpu(&self) -> f64 {
        cpu_seconds(&self.pid())
    }

    fn assert_running(&mut self) {
        assert!(
            self.child.try_wait().ok().flatten().is_none(),
            "a daemon stopped; see {}",
            self.log.display()
        );
    }

    fn stop(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.pid()]).status();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local address")
        .port()
}

/// Start `binary run --role ROLE` for consumer `consumer` on work stream `stream`, delivering
/// every event to `url`.
fn start(
    options: &Options,
    db_url: &str,
    role: &str,
    consumer: &str,
    stream: &str,
    url: &str,
    name: &str,
) -> Daemon {
    let dir = super::target_dir().join("bench-results/distributed");
    std::fs::create_dir_all(&dir).expect("results dir");
    let port = free_port();
    let observer = engine::webhook_observer("everything", "*", engine::ALL_KINDS, "", url);
    let config = format!(
        "[database]\nurl = \"{db_url}\"\n\n[distributed]\nnats_url = \"{NATS_URL}\"\n\
         stream = \"{stream}\"\nsubject_prefix = \"{prefix}\"\npartitions = {PARTITIONS}\n\n\
         [observers.runtime]\nconsumer_id = \"{consumer}\"\nstart_position = \"beginning\"\n\
         metrics_address = \"127.0.0.1:{port}\"\nmax_in_flight = {MAX_IN_FLIGHT}\n\n{observer}",
        prefix = stream.to_lowercase().replace('_', "-"),
    );
    let path = dir.join(format!("{consumer}-{name}.toml"));
    std::fs::write(&path, config).expect("write the config");
    let log = dir.join(format!("{consumer}-{name}.log"));
    let out = std::fs::File::create(&log).expect("log file");
    let child = Command::new(&options.binary)
        .args(["run", "--role", role])
        .args(if role == "worker" {
            vec!["--worker-id", name]
        } else {
            vec![]
        })
        .arg("--config")
        .arg(&path)
        .env("BENCH_SECRET", engine::SECRET)
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", options.binary.display()));
    Daemon { child, port, log }
}

/// The partitions a worker owns, from its `/healthz`.
async fn owned(port: u16) -> Option<usize> {
    let body: Value = reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    Some(body["partitions"].as_array()?.len())
}

/// Wait until the workers own every partition, evenly (each `PARTITIONS / k`).
async fn wait_spread(workers: &mut [Daemon]) {
    let started = Instant::now();
    let even = PARTITIONS as usize / workers.len();
    loop {
        let mut counts = Vec::new();
        for w in workers.iter_mut() {
            w.assert_running();
            counts.push(owned(w.port).await.unwrap_or(0));
        }
        if counts.iter().sum::<usize>() == PARTITIONS as usize && counts.iter().all(|c| *c >= even)
        {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "partitions not spread: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn jetstream() -> async_nats::jetstream::Context {
    let client = async_nats::connect(NATS_URL)
        .await
        .expect("nats-server on 127.0.0.1:4222");
    async_nats::jetstream::new(client)
}

async fn stored(js: &async_nats::jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Wait until the receiver holds `n` distinct deliveries; returns (seconds from the first
/// arrival to the last, duplicates).
async fn delivered(receiver: &ReceiverProcess, n: i64, daemons: &mut [&mut Daemon]) -> (f64, u64) {
    let started = Instant::now();
    loop {
        let stats = receiver.stats().await;
        if stats.unique as i64 >= n {
            return (
                (stats.last_ns - stats.first_ns) as f64 / 1e9,
                stats.duplicates,
            );
        }
        for d in daemons.iter_mut() {
            d.assert_running();
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "not delivered in 15 min: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn scenario(options: &Options, db: &ThroughputDb, receiver: &ReceiverProcess) -> Value {
    assert!(
        options.binary.is_file(),
        "no daemon at {}: build it with `cargo build --release -p fraiseql-observers-cli`",
        options.binary.display()
    );
    let n = db.events;
    let js = jetstream().await;
    let tag = rand::random::<u32>();
    let fast = receiver.url("/drain");

    // Throughput with 1, 2 and 4 workers, for each receiver delay (default 20 ms per request).
    let mut by_delay = Vec::new();
    for &delay in &options.receiver_delays_ms {
        let slow = receiver.url(&format!("/slow/{delay}/distributed"));
        let (throughput, cpu) = throughput(options, db, receiver, &js, tag, delay, &slow).await;
        let medians: Vec<f64> = throughput.iter().map(|t| Summary::of(t).median).collect();
        by_delay.push(json!({
            "receiver_delay_ms": delay,
            "bound_events_per_s_per_worker": MAX_IN_FLIGHT as f64 * 1000.0 / delay.max(1) as f64,
            "throughput": WORKERS.iter().zip(&throughput).zip(&cpu).map(|((k, t), c)| json!({
                "workers": k,
                "events_per_s": Summary::of(t),
                "workers_cpu_us_per_event": Summary::of(c),
            })).collect::<Vec<_>>(),
            "speedup_2": medians[1] / medians[0],
            "speedup_4": medians[2] / medians[0],
        }));
    }

    // The reader's publish rate (no worker), then one worker draining the stream to the fast
    // receiver: the CPU of both, against the single-process daemon's.
    let (mut publish, mut reader_us, mut worker_us, mut single_us) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 1..=options.runs {
        let stream = format!("FO_BENCH_{tag}_pub_{run}");
        let consumer = format!("bench_dist_{tag}_pub_{run}");
        let mut reader = start(
            options, &db.url, "reader", &consumer, &stream, &fast, "reader",
        );
        let (mut first, started) = (None, Instant::now());
        loop {
            let count = stored(&js, &stream).await;
            if count > 0 && first.is_none() {
                first = Some(Instant::now());
            }
            if count as i64 >= n {
                break;
            }
            reader.assert_running();
            assert!(
                started.elapsed() < Duration::from_secs(600),
                "publish did not finish"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let seconds = first.expect("published").elapsed().as_secs_f64();
        let rate = n as f64 / seconds;
        let cpu_reader = reader.cpu();
        receiver.reset().await;
        let mut worker = start(options, &db.url, "worker", &consumer, &stream, &fast, "w0");
        let (drain_s, _) = delivered(receiver, n, &mut [&mut worker]).await;
        let cpu_worker = worker.cpu();
        reader.stop();
        worker.stop();
        let _ = js.delete_stream(&stream).await;

        receiver.reset().await;
        let observer = engine::webhook_observer("everything", "*", engine::ALL_KINDS, "", &fast);
        let (single_s, cpu, _) = db
            .drain_binary(
                options,
                &[],
                &format!("bench_single_{tag}_{run}"),
                &observer,
                true,
                receiver,
            )
            .await;
        let us = |s: f64| s * 1e6 / n as f64;
        eprintln!(
            "distributed: run {run}: reader published {rate:.0} events/s; CPU per event: reader {:.1} us, \
             worker {:.1} us (drain {drain_s:.2} s), single-process daemon {:.1} us (drain {single_s:.2} s)",
            us(cpu_reader),
            us(cpu_worker),
            us(cpu.engine)
        );
        publish.push(rate);
        reader_us.push(us(cpu_reader));
        worker_us.push(us(cpu_worker));
        single_us.push(us(cpu.engine));
    }
    let hop: Vec<f64> = reader_us
        .iter()
        .zip(&worker_us)
        .zip(&single_us)
        .map(|((r, w), s)| r + w - s)
        .collect();
    json!({
        "events": n,
        "partitions": PARTITIONS,
        "max_in_flight_per_worker": MAX_IN_FLIGHT,
        "by_receiver_delay": by_delay,
        "reader_publish_events_per_s": Summary::of(&publish),
        "cpu_us_per_event": {
            "reader": Summary::of(&reader_us),
            "worker": Summary::of(&worker_us),
            "single_process": Summary::of(&single_us),
            "extra_hop": Summary::of(&hop),
        },
    })
}

/// Deliveries per second of 1, 2 and 4 workers (index as `WORKERS`), `options.runs` runs each
/// (order alternating between runs), to a receiver taking `delay` ms per request at `slow`; and
/// the CPU per event of all the workers of each run together.
async fn throughput(
    options: &Options,
    db: &ThroughputDb,
    receiver: &ReceiverProcess,
    js: &async_nats::jetstream::Context,
    tag: u32,
    delay: u64,
    slow: &str,
) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let n = db.events;
    let mut throughput: Vec<Vec<f64>> = vec![Vec::new(); WORKERS.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); WORKERS.len()];
    for run in 1..=options.runs {
        let order: Vec<usize> = if run % 2 == 1 {
            vec![0, 1, 2]
        } else {
            vec![2, 1, 0]
        };
        for i in order {
            let k = WORKERS[i];
            receiver.reset().await;
            let stream = format!("FO_BENCH_{tag}_{delay}_{k}_{run}");
            let consumer = format!("bench_dist_{tag}_{delay}_{k}_{run}");
            let mut workers: Vec<Daemon> = (0..k)
                .map(|w| {
                    start(
                        options,
                        &db.url,
                        "worker",
                        &consumer,
                        &stream,
                        slow,
                        &format!("w{w}"),
                    )
                })
                .collect();
            wait_spread(&mut workers).await;
            let mut reader = start(
                options, &db.url, "reader", &consumer, &stream, slow, "reader",
            );
            let (seconds, duplicates) = {
                let mut all: Vec<&mut Daemon> = workers.iter_mut().collect();
                all.push(&mut reader);
                delivered(receiver, n, &mut all).await
            };
            let eps = n as f64 / seconds;
            // The workers' CPU per event, all of them together (flat across 1, 2, 4: adding
            // workers adds no coordination work per event).
            let workers_us = workers.iter().map(Daemon::cpu).sum::<f64>() * 1e6 / n as f64;
            eprintln!(
                "distributed: {delay} ms receiver, {k} worker(s), run {run}: {n} deliveries in {seconds:.2} s, \
                 {eps:.0}/s, {duplicates} duplicates, workers' CPU {workers_us:.1} us per event, load {}",
                super::report::load_average()
            );
            throughput[i].push(eps);
            cpu[i].push(workers_us);
            reader.stop();
            for w in workers {
                w.stop();
            }
            let _ = js.delete_stream(&stream).await;
        }
    }
    (throughput, cpu)
}
