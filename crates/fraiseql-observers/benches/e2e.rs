//! End-to-end benchmarks: PostgreSQL writes -> capture trigger -> change log -> the shipped
//! daemon -> signed webhooks -> a local receiver; and graphile-worker doing the same job in the
//! same run.
//!
//! The one command (builds the daemon the scenarios start, then runs the whole suite and rewrites
//! BENCHMARKS.md's generated `## End to end` section):
//!
//! ```sh
//! cargo build --release -p fraiseql-observers-cli && cargo bench -p fraiseql-observers --bench e2e
//! cargo bench -p fraiseql-observers --bench e2e -- --quick            # a smoke run (~10 min)
//! cargo bench -p fraiseql-observers --bench e2e -- --scenario drain   # one scenario
//! ```
//!
//! Every scenario that runs the engine starts the shipped daemon, `fraiseql-observers run
//! --config FILE` (`--binary PATH`, default `<target>/release/fraiseql-observers`), in a process
//! of its own with `/metrics` on; its CPU comes from `/proc/<pid>/stat`, its memory from
//! `VmHWM`/`VmRSS`. Scenarios: `drain` (the daemon with `/metrics` on and off, and the engine
//! in this process, in rotating order: the in-process column), `match-only`, `fan-out`,
//! `record-cost` (the delivery log on and off), `latency` (commit to receiver at 1,000 and
//! 5,000/s, polling and with the NOTIFY hint), `soak` (the daemon's RSS every 10 s at 2,000/s for
//! 10 min, `--soak-secs N`), `flow` (a healthy observer's latency at 500/s beside a hung
//! endpoint, and a 50/s rate limit over 20 s), `writer-cost` (pgbench), `peer` (graphile-worker
//! drain and latency), `instructions` (the daemon's drain of `--instruction-events N` and 2N
//! changes under valgrind's callgrind: instructions per event; skipped, and said so, without
//! valgrind). On request only: `backlog` (a 5 M-change backlog, `--backlog-events N`, in this
//! process), `distributed` (a reader and 1, 2, 4 worker processes over JetStream; needs
//! nats-server on 4222). `--scenario` may be repeated or comma-separated (`drain-binary` is
//! `drain`). Options: `--runs N` (throughput runs, default 3, 1 with `--quick`), `--events N`
//! (backlog size, default 100,000, 10,000 with `--quick`), `--latency-secs N` (60, 10 with
//! `--quick`), `--soak-secs N` (600, 60 with `--quick`), `--flow-in-process` (the flow
//! scenario's hung-endpoint runs also with the engine in this process), `--no-peer`, `--report-only` (rewrite
//! BENCHMARKS.md's section from the last full run's `e2e.json`). Needs PostgreSQL at
//! `postgres://postgres@127.0.0.1:5432` (or `FRAISEQL_BENCH_ADMIN_URL`), allowed to create
//! databases, `pgbench`; the peer needs Node and npm (graphile-worker is installed at run time).
//!
//! Invariants: every database is created fresh for the run (`fo_bench_e2e_*`) and dropped at the
//! end; the daemon, the receiver and the paced writer (this binary re-run with `--role receiver`
//! / `--role writer`) run in processes of their own, so the three never share a scheduler. A run
//! that loses or duplicates a delivery panics: a figure is only written for a correct run.
//! Results go to `<target>/bench-results/e2e.json`; a run of every default scenario without
//! `--quick` (whatever `--runs`, `--soak-secs`, `--latency-secs`: the section says which) also
//! rewrites the generated part of BENCHMARKS.md's `## End to end` section.

#[path = "e2e/binary.rs"]
mod binary;
#[path = "e2e/data.rs"]
mod data;
#[path = "e2e/distributed.rs"]
mod distributed;
#[path = "e2e/engine.rs"]
mod engine;
#[path = "e2e/flow.rs"]
mod flow;
#[path = "e2e/peer.rs"]
mod peer;
#[path = "e2e/receiver.rs"]
mod receiver;
#[path = "e2e/report.rs"]
mod report;
#[path = "e2e/writer.rs"]
mod writer;

use engine::Engine;
use receiver::ReceiverProcess;
use report::{Latency, Summary};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// The allocator the daemon uses (`crates/fraiseql-observers-cli/src/allocator.rs`), so the
/// in-process engine is measured as it runs in production.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SCENARIOS: &[&str] = &[
    "drain",
    "record-cost",
    "match-only",
    "fan-out",
    "latency",
    "soak",
    "writer-cost",
    "peer",
    "flow",
    "backlog",
    "instructions",
    "distributed",
];

/// Scenarios a full run leaves out (run them by name).
const ON_REQUEST: &[&str] = &["backlog", "distributed"];

/// Unix time in nanoseconds (comparable across the bench's processes).
pub fn unix_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as i64
}

/// One line from a child's stdout.
pub fn read_line(out: &mut impl std::io::Read) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while out.read(&mut byte).is_ok_and(|n| n == 1) && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

/// The cargo target directory this binary was built in (`<target>/release/deps/e2e-*`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.ancestors()
        .nth(3)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"))
}

struct Options {
    quick: bool,
    scenarios: Vec<String>,
    runs: usize,
    events: i64,
    peer: bool,
    backlog_events: i64,
    binary: PathBuf,
    instruction_events: i64,
    latency_secs: u64,
    soak_secs: u64,
    flow_in_process: bool,
    /// The slow receiver's delays of the `distributed` scenario (`--receiver-delay-ms 20,200`).
    receiver_delays_ms: Vec<u64>,
    command: String,
}

impl Options {
    fn parse(args: &[String]) -> Options {
        let quick = args.iter().any(|a| a == "--quick");
        let value = |name: &str| {
            args.iter()
                .position(|a| a == name)
                .and_then(|i| args.get(i + 1))
                .cloned()
        };
        let mut scenarios: Vec<String> = args
            .iter()
            .enumerate()
            .filter(|(_, a)| *a == "--scenario")
            .filter_map(|(i, _)| args.get(i + 1))
            .flat_map(|s| s.split(',').map(str::to_string))
            .map(|s| {
                if s == "drain-binary" {
                    "drain".into()
                } else {
                    s
                }
            })
            .collect();
        for s in &scenarios {
            assert!(
                SCENARIOS.contains(&s.as_str()),
                "unknown scenario '{s}'; one of {SCENARIOS:?}"
            );
        }
        if scenarios.is_empty() {
            scenarios = SCENARIOS
                .iter()
                .filter(|s| !ON_REQUEST.contains(s))
                .map(|s| s.to_string())
                .collect();
        }
        let mut command = "cargo bench -p fraiseql-observers --bench e2e".to_string();
        let passed: Vec<&String> = args.iter().filter(|a| *a != "--bench").collect();
        if !passed.is_empty() {
            command.push_str(" --");
            for a in passed {
                command.push(' ');
                command.push_str(a);
            }
        }
        Options {
            quick,
            runs: value("--runs")
                .map(|v| v.parse().expect("--runs N"))
                .unwrap_or(if quick { 1 } else { 3 }),
            events: value("--events")
                .map(|v| v.parse().expect("--events N"))
                .unwrap_or(if quick { 10_000 } else { 100_000 }),
            peer: !args.iter().any(|a| a == "--no-peer"),
            backlog_events: value("--backlog-events")
                .map(|v| v.parse().expect("--backlog-events N"))
                .unwrap_or(5_000_000),
            binary: value("--binary")
                .map(PathBuf::from)
                .unwrap_or_else(|| target_dir().join("release/fraiseql-observers")),
            instruction_events: value("--instruction-events")
                .map(|v| v.parse().expect("--instruction-events N"))
                .unwrap_or(if quick { 1_000 } else { 2_000 }),
            latency_secs: value("--latency-secs")
                .map(|v| v.parse().expect("--latency-secs N"))
                .unwrap_or(if quick { 10 } else { 60 }),
            flow_in_process: args.iter().any(|a| a == "--flow-in-process"),
            soak_secs: value("--soak-secs")
                .map(|v| v.parse().expect("--soak-secs N"))
                .unwrap_or(if quick { 60 } else { 600 }),
            receiver_delays_ms: value("--receiver-delay-ms")
                .map(|v| {
                    v.split(',')
                        .map(|d| d.trim().parse().expect("--receiver-delay-ms MS[,MS...]"))
                        .collect()
                })
                .unwrap_or_else(|| vec![20]),
            scenarios,
            command,
        }
    }

    /// The daemon the scenarios start (checked to exist).
    fn daemon(&self) -> &std::path::Path {
        assert!(
            self.binary.is_file(),
            "no daemon at {}: build it with `cargo build --release -p fraiseql-observers-cli` \
             (same CARGO_TARGET_DIR) or pass --binary PATH",
            self.binary.display()
        );
        &self.binary
    }

    fn wants(&self, scenario: &str) -> bool {
        self.scenarios.iter().any(|s| s == scenario)
    }

    fn full(&self) -> bool {
        !self.quick
            && self.peer
            && SCENARIOS
                .iter()
                .filter(|s| !ON_REQUEST.contains(s))
                .all(|s| self.wants(s))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .position(|a| a == "--role")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
    {
        Some("receiver") => return receiver::serve(),
        Some("writer") => return writer::main(&args),
        Some(other) => panic!("unknown role {other}"),
        None => {}
    }
    if args.iter().any(|a| a == "--report-only") {
        // Rewrite BENCHMARKS.md's tables from the last full run's results.
        let path = target_dir().join("bench-results/e2e.json");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let results: Value = serde_json::from_str(&text).expect("results JSON");
        let doc = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../BENCHMARKS.md");
        report::write_section(&doc, &report::markdown(&results)).expect("write BENCHMARKS.md");
        eprintln!("BENCHMARKS.md rewritten from {}", path.display());
        return;
    }
    if args.iter().any(|a| a == "--list" || a == "--test") {
        // `cargo test --benches` runs bench binaries with --test: nothing to check here.
        return;
    }
    let options = Options::parse(&args);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(options));
}

async fn run(options: Options) {
    let admin = data::connect(&data::admin_url()).await;
    let version: String = admin
        .query_one("SHOW server_version", &[])
        .await
        .expect("server version")
        .get(0);
    let receiver = ReceiverProcess::start();
    eprintln!(
        "e2e bench: scenarios {:?}, {} run(s), backlog {} events, receiver pid {} at {}",
        options.scenarios,
        options.runs,
        options.events,
        receiver.pid(),
        receiver.base
    );
    let load_start = report::load_average();
    let mut scenarios = serde_json::Map::new();
    // The load average as each scenario starts (the machine is shared: noise to read against).
    let mut loads = serde_json::Map::new();
    let mut mark = |name: &str| {
        let load = report::load_average();
        eprintln!("== {name} (load average {load})");
        loads.insert(name.to_string(), json!(load));
    };

    let throughput = ["drain", "record-cost", "match-only", "fan-out"]
        .iter()
        .any(|s| options.wants(s));
    if throughput {
        let db = ThroughputDb::create(THROUGHPUT_DB, options.events).await;
        if options.wants("drain") {
            mark("drain");
            scenarios.insert("drain".into(), drain(&options, &db, &receiver).await);
        }
        if options.wants("match-only") {
            mark("match_only");
            scenarios.insert(
                "match_only".into(),
                match_only(&options, &db, &receiver).await,
            );
        }
        if options.wants("fan-out") {
            mark("fan_out");
            scenarios.insert("fan_out".into(), fan_out(&options, &db, &receiver).await);
        }
        if options.wants("record-cost") {
            mark("record_cost");
            scenarios.insert(
                "record_cost".into(),
                record_cost(&options, &db, &receiver).await,
            );
        }
        data::drop_database(db.name).await;
    }
    if options.wants("latency") {
        mark("latency");
        scenarios.insert("latency".into(), latency(&options, &receiver).await);
    }
    if options.wants("peer") && options.peer {
        mark("peer");
        let peer = peer_scenarios(&options, &receiver).await;
        scenarios.insert("peer".into(), peer);
    }
    if options.wants("soak") {
        mark("soak");
        scenarios.insert("soak".into(), soak(&options, &receiver).await);
    }
    if options.wants("flow") {
        mark("flow");
        let secs = if options.quick { 10 } else { 30 };
        let binary = options.daemon();
        // `--flow-in-process`: the hung-endpoint runs with the engine in this process too.
        let in_process = if options.flow_in_process {
            json!({
                "control": flow::hung_endpoint(None, &receiver, 500, secs, false).await,
                "hung_endpoint": flow::hung_endpoint(None, &receiver, 500, secs, true).await,
            })
        } else {
            Value::Null
        };
        scenarios.insert(
            "flow".into(),
            json!({
                "control": flow::hung_endpoint(Some(binary), &receiver, 500, secs, false).await,
                "hung_endpoint": flow::hung_endpoint(Some(binary), &receiver, 500, secs, true).await,
                "rate_limit": flow::rate_limit(binary, &receiver, 50, 20).await,
                "in_process": in_process,
            }),
        );
    }
    if options.wants("backlog") {
        mark("backlog");
        scenarios.insert("backlog".into(), backlog(&options, &receiver).await);
    }
    if options.wants("distributed") {
        mark("distributed");
        let db = ThroughputDb::create("fo_bench_e2e_distributed", options.events).await;
        scenarios.insert(
            "distributed".into(),
            distributed::scenario(&options, &db, &receiver).await,
        );
        data::drop_database(db.name).await;
    }
    if options.wants("writer-cost") {
        mark("writer_cost");
        scenarios.insert(
            "writer_cost".into(),
            writer::cost(options.quick, options.peer).await,
        );
    }
    if options.wants("instructions") {
        mark("instructions");
        scenarios.insert(
            "instructions".into(),
            instructions(&options, &receiver).await,
        );
    }
    add_peer_ratios(&mut scenarios);
    let ratios = headline_ratios(&scenarios);

    let (commit, dirty) = git_commit();
    let results = json!({
        "date": chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        "commit": commit,
        "dirty": dirty,
        "command": options.command,
        "quick": options.quick,
        "settings": {
            "runs": options.runs,
            "events": options.events,
            "latency_secs": options.latency_secs,
            "soak_secs": options.soak_secs,
            "instruction_events": options.instruction_events,
            "binary": options.binary.display().to_string(),
            "runtime_tuning": std::env::var("FRAISEQL_BENCH_RUNTIME").unwrap_or_default(),
        },
        "machine": report::machine(&version),
        "load_start": load_start,
        "load_end": report::load_average(),
        "load_by_scenario": loads,
        "ratios": ratios,
        "scenarios": scenarios,
    });
    let dir = target_dir().join("bench-results");
    std::fs::create_dir_all(&dir).expect("results dir");
    let name = if options.full() {
        "e2e.json"
    } else if options.quick {
        "e2e-quick.json"
    } else {
        "e2e-partial.json"
    };
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_string_pretty(&results).expect("json"))
        .expect("write results");
    let markdown = report::markdown(&results);
    println!("\n{markdown}");
    eprintln!("results written to {}", path.display());
    if options.full() {
        let doc = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../BENCHMARKS.md");
        report::write_section(&doc, &markdown).expect("write BENCHMARKS.md");
        eprintln!("BENCHMARKS.md updated");
    }
}

/// The short commit of the code measured, and whether the work tree had uncommitted changes.
fn git_commit() -> (String, bool) {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]);
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    (commit, dirty)
}
const THROUGHPUT_DB: &str = "fo_bench_e2e_throughput";

/// A database with the backlog every throughput run reads (each run is a new consumer starting
/// from the beginning of the log: the same committed changes, waiting).
struct ThroughputDb {
    name: &'static str,
    url: String,
    client: Client,
    events: i64,
    last_txid: String,
}

impl ThroughputDb {
    async fn create(name: &'static str, events: i64) -> ThroughputDb {
        let url = data::recreate(name).await;
        let mut client = data::connect(&url).await;
        fraiseql_observers::migrate::run(&mut client)
            .await
            .expect("migrations");
        data::create_tables(&client).await;
        data::enable_capture(&client).await;
        let started = Instant::now();
        data::fill(&client, data::BacklogShape::of(events), 100).await;
        let events: i64 = client
            .query_one("SELECT count(*) FROM core.tb_entity_change_log", &[])
            .await
            .expect("count")
            .get(0);
        client
            .batch_execute("VACUUM ANALYZE core.tb_entity_change_log")
            .await
            .expect("vacuum");
        eprintln!(
            "backlog: {events} committed changes in {:.1} s, orders of ~{} bytes as JSON",
            started.elapsed().as_secs_f64(),
            data::order_json_bytes(&client).await
        );
        let last_txid = engine::last_txid(&client).await;
        ThroughputDb {
            name,
            url,
            client,
            events,
            last_txid,
        }
    }

    /// Run a consumer over the whole backlog; returns the seconds until its checkpoint passed
    /// the last change, and the CPU time spent meanwhile.
    async fn drain(
        &self,
        consumer: &str,
        observers: &str,
        receiver: &ReceiverProcess,
    ) -> (f64, Cpu) {
        let before = Cpu::sample(&self.client, "self", receiver.pid()).await;
        let started = Instant::now();
        let engine = Engine::start(&self.url, consumer, "", observers).await;
        loop {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if engine::drained(&self.client, consumer, &self.last_txid).await {
                break;
            }
            assert!(!engine.failed(), "the engine stopped during {consumer}");
            assert!(
                started.elapsed() < Duration::from_secs(900),
                "{consumer} did not finish in 15 minutes"
            );
        }
        let seconds = started.elapsed().as_secs_f64();
        let cpu = Cpu::sample(&self.client, "self", receiver.pid())
            .await
            .minus(&before);
        let read = engine
            .status
            .events_read
            .load(std::sync::atomic::Ordering::Relaxed);
        engine.stop().await;
        assert_eq!(
            read as i64, self.events,
            "{consumer}: the engine read every change"
        );
        (seconds, cpu)
    }
}

impl ThroughputDb {
    /// [`ThroughputDb::drain`] by the shipped daemon (`binary`, under `wrapper` if not empty) in
    /// a process of its own, `/metrics` on or off. Returns the seconds until its checkpoint
    /// passed the last change, the CPU time spent meanwhile (the engine's is the daemon's), and
    /// the daemon's peak resident memory in KiB.
    async fn drain_binary(
        &self,
        options: &Options,
        wrapper: &[String],
        consumer: &str,
        observers: &str,
        metrics: bool,
        receiver: &ReceiverProcess,
    ) -> (f64, Cpu, u64) {
        let binary = options.daemon();
        let started = Instant::now();
        let mut engine = binary::BinaryEngine::start(
            binary, wrapper, &self.url, consumer, "", observers, metrics,
        );
        let pid = engine.pid().to_string();
        // The daemon's CPU counts from its start: sampled right after the spawn, PostgreSQL's
        // and the receiver's too (the daemon has no backend yet).
        let before = Cpu::sample(&self.client, &pid, receiver.pid()).await;
        let before = Cpu {
            engine: 0.0,
            ..before
        };
        loop {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if engine::drained(&self.client, consumer, &self.last_txid).await {
                break;
            }
            assert!(
                !engine.failed(),
                "the daemon stopped during {consumer}; see {}",
                engine.log.display()
            );
            assert!(
                started.elapsed() < Duration::from_secs(1800),
                "{consumer} did not finish in 30 minutes"
            );
        }
        let seconds = started.elapsed().as_secs_f64();
        let cpu = Cpu::sample(&self.client, &pid, receiver.pid())
            .await
            .minus(&before);
        let peak = engine.peak_rss_kib();
        if metrics {
            let page = engine.scrape().await.unwrap_or_default();
            assert!(
                page.contains("fraiseql_observers_"),
                "/metrics serves the engine's metrics"
            );
        }
        engine.stop().await;
        (seconds, cpu, peak)
    }
}

/// CPU seconds used so far by the engine (this process), the receiver process, and the
/// PostgreSQL backends connected to the bench database (the engine's connections and the
/// harness's own, which only polls the checkpoint).
#[derive(Debug, Clone, Default)]
struct Cpu {
    engine: f64,
    receiver: f64,
    postgres: std::collections::HashMap<i32, f64>,
}

impl Cpu {
    /// `engine`: the engine's pid, or `"self"` for the in-process engine.
    async fn sample(client: &Client, engine: &str, receiver_pid: u32) -> Cpu {
        let pids: Vec<i32> = client
            .query(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()",
                &[],
            )
            .await
            .expect("backends")
            .iter()
            .map(|r| r.get(0))
            .collect();
        Cpu {
            engine: cpu_seconds(engine),
            receiver: cpu_seconds(&receiver_pid.to_string()),
            postgres: pids
                .into_iter()
                .map(|p| (p, cpu_seconds(&p.to_string())))
                .collect(),
        }
    }

    /// What was used since `earlier` (backends that were not there then count from zero).
    fn minus(&self, earlier: &Cpu) -> Cpu {
        Cpu {
            engine: self.engine - earlier.engine,
            receiver: self.receiver - earlier.receiver,
            postgres: self
                .postgres
                .iter()
                .map(|(p, s)| (*p, s - earlier.postgres.get(p).copied().unwrap_or(0.0)))
                .collect(),
        }
    }

    fn postgres(&self) -> f64 {
        self.postgres.values().sum()
    }

    /// Microseconds of CPU per event, by process, and the engine's over the others' (ratios
    /// of work measured in the same run: they move much less with the machine than the times).
    fn per_event(&self, events: i64) -> Value {
        let us = |s: f64| (s * 1e6 / events as f64 * 10.0).round() / 10.0;
        let ratio =
            |other: f64| (other > 0.0).then(|| (self.engine / other * 100.0).round() / 100.0);
        json!({
            "engine_us": us(self.engine),
            "postgres_us": us(self.postgres()),
            "receiver_us": us(self.receiver),
            "engine_over_postgres": ratio(self.postgres()),
            "engine_over_receiver": ratio(self.receiver),
        })
    }
}

/// utime + stime of `/proc/<pid>/stat`, in seconds (clock ticks of 10 ms).
fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) start at state (field 3).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// The median run's CPU per event (by engine CPU).
fn median_cpu(cpus: &[(f64, Value)]) -> Value {
    let mut sorted: Vec<&(f64, Value)> = cpus.iter().collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    sorted
        .get(sorted.len() / 2)
        .map_or(Value::Null, |(_, v)| v.clone())
}

async fn check_deliveries(receiver: &ReceiverProcess, expected: i64, what: &str) {
    let stats = receiver.stats().await;
    assert_eq!(
        stats.unique as i64, expected,
        "{what}: every expected delivery arrives ({stats:?})"
    );
    assert_eq!(stats.duplicates, 0, "{what}: no delivery arrives twice");
}

/// The daemon for a steady-rate scenario: consumer `consumer` (plus `runtime_extra`, e.g.
/// `start_position = "now"`), `/metrics` on; returns once it has claimed the consumer, so every
/// later commit is one it delivers.
pub async fn start_daemon(
    binary: &std::path::Path,
    url: &str,
    client: &Client,
    consumer: &str,
    runtime_extra: &str,
    observers: &str,
) -> binary::BinaryEngine {
    let mut daemon =
        binary::BinaryEngine::start(binary, &[], url, consumer, runtime_extra, observers, true);
    daemon
        .wait_claimed(client, consumer, Duration::from_millis(500))
        .await;
    daemon
}

/// The runs of one way of draining the throughput backlog: events/s, CPU per event by process
/// with the engine's ratios to PostgreSQL's and the receiver's (each a median (min-max) over the
/// runs), and the daemon's peak resident memory.
#[derive(Default)]
struct Runs {
    eps: Vec<f64>,
    cpus: Vec<(f64, Value)>,
    peaks_mib: Vec<f64>,
}

impl Runs {
    /// Record one run; returns its CPU per event (for the log line).
    fn push(&mut self, events: i64, seconds: f64, cpu: &Cpu, peak_kib: Option<u64>) -> Value {
        let per_event = cpu.per_event(events);
        self.eps.push(events as f64 / seconds);
        self.cpus.push((cpu.engine, per_event.clone()));
        if let Some(kib) = peak_kib {
            self.peaks_mib.push(kib as f64 / 1024.0);
        }
        per_event
    }

    fn json(&self) -> Value {
        let of = |key: &str| {
            Summary::of(
                &self
                    .cpus
                    .iter()
                    .filter_map(|(_, v)| v[key].as_f64())
                    .collect::<Vec<_>>(),
            )
        };
        let mut v = json!({
            "events_per_s": Summary::of(&self.eps),
            "cpu_per_event": median_cpu(&self.cpus),
            "engine_us": of("engine_us"),
            "postgres_us": of("postgres_us"),
            "receiver_us": of("receiver_us"),
            "engine_over_postgres": of("engine_over_postgres"),
            "engine_over_receiver": of("engine_over_receiver"),
        });
        if !self.peaks_mib.is_empty() {
            v["peak_rss_mib"] = json!(Summary::of(&self.peaks_mib));
        }
        v
    }
}

/// The drain to one signed webhook: the shipped daemon with `/metrics` on (the figure), the same
/// daemon with `/metrics` off, and the engine in this process (the in-process column), in
/// rotating order within each run, each a fresh consumer over the same backlog.
async fn drain(options: &Options, db: &ThroughputDb, receiver: &ReceiverProcess) -> Value {
    let observer = engine::webhook_observer(
        "everything",
        "*",
        engine::ALL_KINDS,
        "",
        &receiver.url("/drain"),
    );
    const WAYS: [&str; 3] = ["daemon", "daemon_metrics_off", "in_process"];
    let mut ways: [Runs; 3] = Default::default();
    for run in 1..=options.runs {
        for k in 0..WAYS.len() {
            let w = (k + run - 1) % WAYS.len();
            receiver.reset().await;
            let consumer = format!("drain_{}_{run}", WAYS[w]);
            let (seconds, cpu, peak) = match w {
                0 | 1 => {
                    let (s, c, p) = db
                        .drain_binary(options, &[], &consumer, &observer, w == 0, receiver)
                        .await;
                    (s, c, Some(p))
                }
                _ => {
                    let (s, c) = db.drain(&consumer, &observer, receiver).await;
                    (s, c, None)
                }
            };
            check_deliveries(receiver, db.events, "drain").await;
            let per_event = ways[w].push(db.events, seconds, &cpu, peak);
            eprintln!(
                "drain ({}) run {run}: {seconds:.2} s, {:.0} events/s, CPU per event {per_event}{}",
                WAYS[w],
                db.events as f64 / seconds,
                peak.map_or(String::new(), |p| format!(
                    ", peak RSS {:.1} MiB",
                    p as f64 / 1024.0
                ))
            );
        }
    }
    let mut v = json!({
        "events": db.events,
        "binary": options.binary.display().to_string(),
    });
    for (name, runs) in WAYS.iter().zip(&ways) {
        v[*name] = runs.json();
    }
    v
}

/// Instructions per event of the drain path, counted by valgrind (callgrind) around the shipped
/// daemon: a drain of N and of 2N events (fresh backlogs of the same mix, `/metrics` on), in
/// alternating order, `--runs` pairs; per event = (I(2N) - I(N)) / N, which removes the start-up
/// and the shutdown. Instructions do not move with the machine's load or speed.
async fn instructions(options: &Options, receiver: &ReceiverProcess) -> Value {
    const DB: &str = "fo_bench_e2e_instructions";
    let n = options.instruction_events;
    let observer = engine::webhook_observer(
        "everything",
        "*",
        engine::ALL_KINDS,
        "",
        &receiver.url("/drain"),
    );
    let valgrind = std::process::Command::new("valgrind")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !valgrind {
        eprintln!("instructions skipped: valgrind is not installed");
        return json!({ "skipped": "valgrind is not installed (`apt-get install valgrind`)" });
    }
    let dir = target_dir().join("bench-results/binary");
    std::fs::create_dir_all(&dir).expect("results dir");
    let mut per_event = Vec::new();
    let mut startup = Vec::new();
    let mut counted = Vec::new();
    // Pairs of runs: at most two (each pair is two drains under callgrind, ~50x slower).
    for run in 1..=options.runs.min(2) {
        let sizes = if run % 2 == 1 { [n, 2 * n] } else { [2 * n, n] };
        let mut collected = std::collections::HashMap::new();
        for size in sizes {
            let db = ThroughputDb::create(DB, size).await;
            receiver.reset().await;
            let consumer = format!("instructions_{size}_{run}");
            let log = dir.join(format!("{consumer}.callgrind.log"));
            let wrapper = vec![
                "valgrind".to_string(),
                "--tool=callgrind".to_string(),
                format!(
                    "--callgrind-out-file={}",
                    dir.join(format!("{consumer}.callgrind.out")).display()
                ),
                format!("--log-file={}", log.display()),
            ];
            let (seconds, _, _) = db
                .drain_binary(options, &wrapper, &consumer, &observer, true, receiver)
                .await;
            check_deliveries(receiver, db.events, "instructions").await;
            let instructions = binary::callgrind_collected(&log);
            eprintln!(
                "instructions run {run}: {} events drained under callgrind in {seconds:.1} s, \
                 {instructions} instructions",
                db.events
            );
            collected.insert(size, (db.events, instructions));
            counted.push(json!({"events": db.events, "instructions": instructions}));
            drop(db);
            data::drop_database(DB).await;
        }
        let (events_n, i_n) = collected[&n];
        let (events_2n, i_2n) = collected[&(2 * n)];
        let per = (i_2n as f64 - i_n as f64) / (events_2n - events_n) as f64;
        per_event.push(per);
        startup.push(i_n as f64 - per * events_n as f64);
    }
    json!({
        "binary": options.binary.display().to_string(),
        "events": [n, 2 * n],
        "runs": counted,
        "instructions_per_event": Summary::of(&per_event),
        "instructions_outside_events": Summary::of(&startup),
    })
}

/// A large backlog (issue 9): memory stays bounded and the rate steady while the engine drains
/// it to the webhook. Peak RSS is the process's `VmHWM`, reset when the drain starts.
async fn backlog(options: &Options, receiver: &ReceiverProcess) -> Value {
    const BACKLOG_DB: &str = "fo_bench_e2e_backlog";
    let url = data::recreate(BACKLOG_DB).await;
    let mut client = data::connect(&url).await;
    fraiseql_observers::migrate::run(&mut client)
        .await
        .expect("migrations");
    data::create_tables(&client).await;
    data::enable_capture(&client).await;
    let filling = Instant::now();
    data::fill(
        &client,
        data::BacklogShape::of(options.backlog_events),
        2000,
    )
    .await;
    let events: i64 = client
        .query_one("SELECT count(*) FROM core.tb_entity_change_log", &[])
        .await
        .expect("count")
        .get(0);
    client
        .batch_execute("VACUUM ANALYZE core.tb_entity_change_log")
        .await
        .expect("vacuum");
    eprintln!(
        "backlog: {events} changes written in {:.0} s",
        filling.elapsed().as_secs_f64()
    );
    let last_txid = engine::last_txid(&client).await;
    let observer = engine::webhook_observer(
        "everything",
        "*",
        engine::ALL_KINDS,
        "",
        &receiver.url("/backlog"),
    );
    receiver.reset().await;
    let rss_before = engine::rss_kib();
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
    let started = Instant::now();
    let engine = Engine::start(&url, "backlog", "", &observer).await;
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let mut max_rss = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let read = engine
            .status
            .events_read
            .load(std::sync::atomic::Ordering::Relaxed);
        samples.push((started.elapsed().as_secs_f64(), read));
        max_rss = max_rss.max(engine::rss_kib());
        if engine::drained(&client, "backlog", &last_txid).await {
            break;
        }
        assert!(!engine.failed(), "the engine stopped during the backlog");
        assert!(
            started.elapsed() < Duration::from_secs(3600),
            "the backlog was not drained in an hour"
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    let peak_kib = engine::peak_rss_kib();
    engine.stop().await;
    check_deliveries(receiver, events, "backlog").await;
    // The rate of each tenth of the backlog, from the per-second samples of events read.
    let mut tenths = Vec::new();
    let (mut t0, mut r0) = (0.0, 0u64);
    for k in 1..=10u64 {
        let goal = events as u64 * k / 10;
        if let Some(&(t, r)) = samples.iter().find(|(_, r)| *r >= goal) {
            if t > t0 {
                tenths.push((r - r0) as f64 / (t - t0));
            }
            (t0, r0) = (t, r);
        }
    }
    eprintln!(
        "backlog: {events} events in {seconds:.0} s ({:.0}/s), peak RSS {:.1} MiB (before {:.1}), tenths {:?}",
        events as f64 / seconds,
        peak_kib as f64 / 1024.0,
        rss_before as f64 / 1024.0,
        tenths.iter().map(|r| r.round()).collect::<Vec<_>>()
    );
    data::drop_database(BACKLOG_DB).await;
    json!({
        "events": events,
        "seconds": seconds,
        "events_per_s": events as f64 / seconds,
        "peak_rss_mib": peak_kib as f64 / 1024.0,
        "max_sampled_rss_mib": max_rss as f64 / 1024.0,
        "rss_before_mib": rss_before as f64 / 1024.0,
        "tenths_events_per_s": Summary::of(&tenths),
    })
}

/// The delivery log's cost: the daemon's drain with `record = "none"` and with `record = "all"`,
/// in alternating order, each run a fresh consumer over the same backlog.
async fn record_cost(options: &Options, db: &ThroughputDb, receiver: &ReceiverProcess) -> Value {
    let observer = |record: &str| {
        engine::webhook_observer(
            "everything",
            "*",
            engine::ALL_KINDS,
            "",
            &receiver.url("/drain"),
        )
        .replacen(
            "\n\n[[observers.",
            &format!("\nrecord = \"{record}\"\n\n[[observers."),
            1,
        )
    };
    let (mut none, mut all) = (Runs::default(), Runs::default());
    for run in 1..=options.runs {
        let order = if run % 2 == 1 {
            ["none", "all"]
        } else {
            ["all", "none"]
        };
        for record in order {
            receiver.reset().await;
            let consumer = format!("record_{record}_{run}");
            let (seconds, cpu, peak) = db
                .drain_binary(options, &[], &consumer, &observer(record), true, receiver)
                .await;
            check_deliveries(receiver, db.events, "record-cost").await;
            let runs = if record == "none" {
                &mut none
            } else {
                &mut all
            };
            let per_event = runs.push(db.events, seconds, &cpu, Some(peak));
            eprintln!(
                "record = {record} run {run}: {seconds:.2} s, {:.0} events/s, CPU per event {per_event}",
                db.events as f64 / seconds
            );
        }
    }
    let ratios: Vec<f64> = all.eps.iter().zip(&none.eps).map(|(a, n)| a / n).collect();
    json!({
        "events": db.events,
        "none": none.json(),
        "all": all.json(),
        "all_over_none": Summary::of(&ratios),
    })
}

/// One observer whose condition is false for every event: read, decode, match, checkpoint, no
/// send (the daemon, `/metrics` on).
async fn match_only(options: &Options, db: &ThroughputDb, receiver: &ReceiverProcess) -> Value {
    let observer = engine::webhook_observer(
        "refunds",
        "*",
        engine::ALL_KINDS,
        "status == 'refunded'",
        &receiver.url("/never"),
    );
    let mut runs = Runs::default();
    for run in 1..=options.runs {
        receiver.reset().await;
        let (seconds, cpu, peak) = db
            .drain_binary(
                options,
                &[],
                &format!("match_{run}"),
                &observer,
                true,
                receiver,
            )
            .await;
        check_deliveries(receiver, 0, "match-only").await;
        let per_event = runs.push(db.events, seconds, &cpu, Some(peak));
        eprintln!(
            "match-only run {run}: {seconds:.2} s, {:.0} events/s, CPU per event {per_event}",
            db.events as f64 / seconds
        );
    }
    json!({ "events": db.events, "daemon": runs.json() })
}

/// Ten observers, about three deliveries per event (the daemon, `/metrics` on).
async fn fan_out(options: &Options, db: &ThroughputDb, receiver: &ReceiverProcess) -> Value {
    let observers: String = engine::FAN_OUT
        .iter()
        .map(|(name, entity, kinds, condition, _)| {
            engine::webhook_observer(
                name,
                entity,
                kinds,
                condition,
                &receiver.url(&format!("/fan/{name}")),
            )
        })
        .collect();
    let expected = engine::fan_out_expected(&db.client).await;
    let (mut runs, mut deliveries) = (Runs::default(), Vec::new());
    for run in 1..=options.runs {
        receiver.reset().await;
        let (seconds, cpu, peak) = db
            .drain_binary(
                options,
                &[],
                &format!("fanout_{run}"),
                &observers,
                true,
                receiver,
            )
            .await;
        check_deliveries(receiver, expected, "fan-out").await;
        let per_event = runs.push(db.events, seconds, &cpu, Some(peak));
        eprintln!(
            "fan-out run {run}: {seconds:.2} s, {:.0} events/s, {:.0} deliveries/s, CPU per event {per_event}",
            db.events as f64 / seconds,
            expected as f64 / seconds
        );
        deliveries.push(expected as f64 / seconds);
    }
    json!({
        "events": db.events,
        "deliveries": expected,
        "deliveries_per_event": expected as f64 / db.events as f64,
        "deliveries_per_s": Summary::of(&deliveries),
        "daemon": runs.json(),
    })
}

/// Writer connections for a rate: enough that commits (each a WAL flush) keep up.
fn writer_connections(rate: u64) -> usize {
    ((rate / 250) as usize).clamp(2, 24)
}

/// One steady run: the writer process inserts into `url` at `rate` for `secs`; whatever is
/// listening (our engine, or graphile-worker) delivers to the receiver.
async fn steady_run(url: &str, receiver: &ReceiverProcess, rate: u64, secs: u64) -> Latency {
    receiver.reset().await;
    let spec = writer::WriterSpec {
        url: url.to_string(),
        rate,
        secs,
        connections: writer_connections(rate),
        out: target_dir()
            .join(format!("bench-results/writer-{rate}.txt"))
            .display()
            .to_string(),
    };
    std::fs::create_dir_all(target_dir().join("bench-results")).expect("results dir");
    let report = tokio::task::spawn_blocking(move || writer::run(&spec))
        .await
        .expect("writer");
    let deadline = Instant::now() + Duration::from_secs(60);
    while (receiver.stats().await.unique) < report.written && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = receiver.stats().await;
    let arrivals = receiver.arrivals().await;
    write_latency_series(
        &target_dir().join(format!("bench-results/latency-{rate}.txt")),
        &report.commits,
        &arrivals,
    );
    Latency::of(
        rate,
        secs,
        report.achieved_rate,
        &report.commits,
        &arrivals,
        stats.duplicates,
    )
}

/// `seconds_since_first_commit latency_ms` per change, in commit order (for plots and for
/// finding stalls).
fn write_latency_series(
    path: &std::path::Path,
    commits: &[(String, i64)],
    arrivals: &[(String, i64)],
) {
    let arrived: std::collections::HashMap<&str, i64> =
        arrivals.iter().map(|(e, t)| (e.as_str(), *t)).collect();
    let mut rows: Vec<(i64, f64)> = commits
        .iter()
        .filter_map(|(e, c)| arrived.get(e.as_str()).map(|a| (*c, (a - c) as f64 / 1e6)))
        .collect();
    rows.sort_by_key(|r| r.0);
    let first = rows.first().map_or(0, |r| r.0);
    let text: String = rows
        .iter()
        .map(|(c, ms)| format!("{:.4} {ms:.3}\n", (c - first) as f64 / 1e9))
        .collect();
    let _ = std::fs::write(path, text);
}

async fn fresh_captured_db(name: &str) -> (String, Client) {
    let url = data::recreate(name).await;
    let mut client = data::connect(&url).await;
    fraiseql_observers::migrate::run(&mut client)
        .await
        .expect("migrations");
    data::create_tables(&client).await;
    data::enable_capture(&client).await;
    (url, client)
}

async fn latency(options: &Options, receiver: &ReceiverProcess) -> Value {
    const DB: &str = "fo_bench_e2e_latency";
    let (url, client) = fresh_captured_db(DB).await;
    let mut rows = Vec::new();
    // The default (polling), then with the optional NOTIFY hint (which costs writers: see the
    // writer-cost scenario).
    for (mode, notify) in [("polling", false), ("NOTIFY hint", true)] {
        fraiseql_observers::capture::set_notify(&client, notify)
            .await
            .expect("notify hint");
        for rate in [1000, 5000] {
            let observer = engine::webhook_observer(
                "orders",
                "Order",
                r#""INSERT""#,
                "",
                &receiver.url("/latency"),
            );
            let consumer = format!("latency_{rate}_{notify}");
            let runtime = format!("start_position = \"now\"\nnotify = {notify}");
            let daemon = start_daemon(
                options.daemon(),
                &url,
                &client,
                &consumer,
                &runtime,
                &observer,
            )
            .await;
            let cpu_before = daemon.cpu_seconds();
            let result = steady_run(&url, receiver, rate, options.latency_secs).await;
            let engine_us =
                (daemon.cpu_seconds() - cpu_before) * 1e6 / result.written.max(1) as f64;
            daemon.stop().await;
            eprintln!("latency at {rate}/s (ours, {mode}): {result:?}");
            assert_eq!(result.missing, 0, "every change delivered");
            assert_eq!(result.duplicates, 0, "no change delivered twice");
            let mut row = serde_json::to_value(&result).expect("json");
            row["mode"] = json!(mode);
            row["engine_us_per_event"] = json!((engine_us * 10.0).round() / 10.0);
            rows.push(row);
        }
    }
    data::drop_database(DB).await;
    Value::Array(rows)
}

async fn peer_scenarios(options: &Options, receiver: &ReceiverProcess) -> Value {
    const DB: &str = "fo_bench_e2e_peer";
    let version = match tokio::task::spawn_blocking(peer::install)
        .await
        .expect("npm")
    {
        Ok(v) => v,
        Err(reason) => {
            eprintln!("peer skipped: {reason}");
            return json!({ "skipped": reason });
        }
    };
    // graphile-worker's best settings found on this machine (see BENCHMARKS.md): 32 jobs at
    // once, jobs fetched in batches of 200 (its `localQueue`).
    let concurrency = std::env::var("BENCH_PEER_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let local_queue = std::env::var("BENCH_LOCAL_QUEUE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200usize);
    let url = data::recreate(DB).await;
    let client = data::connect(&url).await;
    data::create_tables(&client).await;
    peer::prepare(&url, &client).await;

    let shape = data::BacklogShape::of(options.events);
    let mut runs = Vec::new();
    for run in 1..=options.runs {
        client
            .batch_execute("TRUNCATE tb_order, tb_user RESTART IDENTITY")
            .await
            .expect("truncate");
        assert_eq!(peer::jobs_left(&client).await, 0, "no job left over");
        data::fill(&client, shape, 100).await;
        let total = peer::jobs_left(&client).await;
        assert_eq!(total, shape.total(), "one job per change");
        client
            .batch_execute("VACUUM ANALYZE")
            .await
            .expect("vacuum");
        receiver.reset().await;
        let started = Instant::now();
        let worker =
            peer::PeerProcess::start(&url, &receiver.url("/peer"), concurrency, local_queue);
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if receiver.stats().await.unique as i64 >= total && peer::jobs_left(&client).await == 0
            {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(1800),
                "graphile-worker did not finish in 30 minutes"
            );
        }
        let seconds = started.elapsed().as_secs_f64();
        drop(worker);
        check_deliveries(receiver, total, "peer drain").await;
        let eps = total as f64 / seconds;
        eprintln!("peer drain run {run}: {seconds:.2} s, {eps:.0} events/s");
        runs.push(eps);
    }
    client
        .batch_execute("TRUNCATE tb_order, tb_user RESTART IDENTITY")
        .await
        .expect("truncate");

    let mut latency = Vec::new();
    if options.wants("latency") {
        for rate in [1000, 5000] {
            let worker =
                peer::PeerProcess::start(&url, &receiver.url("/peer"), concurrency, local_queue);
            tokio::time::sleep(Duration::from_millis(500)).await;
            let result = steady_run(&url, receiver, rate, options.latency_secs).await;
            drop(worker);
            eprintln!("latency at {rate}/s (graphile-worker): {result:?}");
            latency.push(serde_json::to_value(&result).expect("json"));
        }
    }
    data::drop_database(DB).await;
    json!({
        "version": version,
        "concurrency": concurrency,
        "local_queue": local_queue,
        "drain": { "events": shape.total(), "events_per_s": Summary::of(&runs) },
        "latency": latency,
    })
}

/// The daemon's resident memory over a steady run at 2,000 changes/s (`VmRSS` every 10 s, and
/// `VmHWM` at the end), and its CPU per event at that rate.
async fn soak(options: &Options, receiver: &ReceiverProcess) -> Value {
    const DB: &str = "fo_bench_e2e_soak";
    let (rate, secs) = (2000u64, options.soak_secs);
    let (url, client) = fresh_captured_db(DB).await;
    let observer =
        engine::webhook_observer("orders", "Order", r#""INSERT""#, "", &receiver.url("/soak"));
    let daemon = start_daemon(
        options.daemon(),
        &url,
        &client,
        "soak",
        "start_position = \"now\"",
        &observer,
    )
    .await;
    let pid = daemon.pid();
    let rss_start = daemon.rss_kib();
    let cpu_before = daemon.cpu_seconds();
    let sampler = {
        tokio::spawn(async move {
            let started = Instant::now();
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            tick.tick().await;
            loop {
                tick.tick().await;
                let t = started.elapsed().as_secs_f64();
                samples.push((t, binary::status_kib(pid, "VmRSS:")));
                if t >= secs as f64 {
                    return samples;
                }
            }
        })
    };
    let result = steady_run(&url, receiver, rate, secs).await;
    let samples = sampler.await.expect("sampler");
    let engine_us = (daemon.cpu_seconds() - cpu_before) * 1e6 / result.written.max(1) as f64;
    let peak = daemon.peak_rss_kib();
    daemon.stop().await;
    data::drop_database(DB).await;
    assert_eq!(result.missing, 0, "soak: every change delivered");
    assert_eq!(result.duplicates, 0, "soak: no change delivered twice");
    let mib = |kib: u64| kib as f64 / 1024.0;
    let at_1min = samples
        .iter()
        .find(|(t, _)| *t >= 59.0)
        .or(samples.first())
        .map_or(0, |s| s.1);
    let end = samples.last().map_or(0, |s| s.1);
    let max = samples.iter().map(|s| s.1).max().unwrap_or(0);
    eprintln!(
        "soak: daemon rss start {:.1} MiB, 1 min {:.1}, end {:.1}, max sampled {:.1}, peak {:.1}; {engine_us:.1} us CPU per event",
        mib(rss_start),
        mib(at_1min),
        mib(end),
        mib(max),
        mib(peak)
    );
    json!({
        "rate": rate,
        "secs": secs,
        "written": result.written,
        "delivered": result.delivered,
        "missing": result.missing,
        "duplicates": result.duplicates,
        "latency": result,
        "engine_us_per_event": (engine_us * 10.0).round() / 10.0,
        "rss_start_mib": mib(rss_start),
        "rss_1min_mib": mib(at_1min),
        "rss_end_mib": mib(end),
        "rss_max_mib": mib(max),
        "peak_rss_mib": mib(peak),
        "growth_pct": (end as f64 - at_1min as f64) / (at_1min.max(1) as f64) * 100.0,
        "samples": samples.iter().map(|(t, kib)| json!({"t": t.round(), "rss_mib": mib(*kib)})).collect::<Vec<_>>(),
    })
}

/// Run by run quotients of two figures measured in the same bench run (`a.runs[i] / b.runs[i]`):
/// their median (min-max).
fn pairwise(a: &Value, b: &Value) -> Option<Summary> {
    let runs = |v: &Value| -> Vec<f64> {
        v["runs"]
            .as_array()
            .map(|r| r.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default()
    };
    let quotients: Vec<f64> = runs(a).iter().zip(runs(b)).map(|(x, y)| x / y).collect();
    (!quotients.is_empty()).then(|| Summary::of(&quotients))
}

/// The ratios issue 12 asks for, from this run: the drain's engine CPU per event over
/// PostgreSQL's and over the receiver's (the daemon, `/metrics` on), its events/s over
/// graphile-worker's, and match-only events/s over the drain's.
fn headline_ratios(scenarios: &serde_json::Map<String, Value>) -> Value {
    let mut ratios = serde_json::Map::new();
    let daemon = scenarios.get("drain").map(|d| &d["daemon"]);
    if let Some(d) = daemon {
        ratios.insert(
            "engine_over_postgres".into(),
            d["engine_over_postgres"].clone(),
        );
        ratios.insert(
            "engine_over_receiver".into(),
            d["engine_over_receiver"].clone(),
        );
    }
    let peer = scenarios
        .get("peer")
        .filter(|p| p.get("skipped").is_none())
        .map(|p| &p["drain"]["events_per_s"]);
    if let (Some(d), Some(p)) = (daemon, peer) {
        if let Some(r) = pairwise(&d["events_per_s"], p) {
            ratios.insert("drain_over_graphile".into(), json!(r));
        }
    }
    if let (Some(d), Some(m)) = (daemon, scenarios.get("match_only")) {
        if let Some(r) = pairwise(&m["daemon"]["events_per_s"], &d["events_per_s"]) {
            ratios.insert("match_only_over_drain".into(), json!(r));
        }
    }
    Value::Object(ratios)
}

/// Ours divided by graphile-worker's, from the same run.
fn add_peer_ratios(scenarios: &mut serde_json::Map<String, Value>) {
    let ours_drain = scenarios.get("drain").map(|d| {
        d["daemon"]["events_per_s"]["median"]
            .as_f64()
            .unwrap_or(f64::NAN)
    });
    let ours_latency = scenarios.get("latency").cloned();
    let writer_rows = scenarios
        .get("writer_cost")
        .and_then(|w| w["rows"].as_array().cloned())
        .unwrap_or_default();
    let Some(peer) = scenarios.get_mut("peer") else {
        return;
    };
    if peer.get("skipped").is_some() {
        return;
    }
    let mut ratios = serde_json::Map::new();
    if let Some(ours) = ours_drain {
        let theirs = peer["drain"]["events_per_s"]["median"]
            .as_f64()
            .unwrap_or(f64::NAN);
        ratios.insert("drain events/s".into(), json!(ours / theirs));
    }
    if let (Some(Value::Array(ours)), Some(Value::Array(theirs))) =
        (ours_latency, peer.get("latency").cloned())
    {
        for o in &ours {
            if let Some(t) = theirs.iter().find(|t| t["rate"] == o["rate"]) {
                for q in ["p50_ms", "p99_ms"] {
                    let r = o[q].as_f64().unwrap_or(f64::NAN) / t[q].as_f64().unwrap_or(f64::NAN);
                    ratios.insert(
                        format!(
                            "latency {} at {}/s, ours {}",
                            &q[..3],
                            o["rate"],
                            o["mode"].as_str().unwrap_or("")
                        ),
                        json!(r),
                    );
                }
            }
        }
    }
    for clients in [1, 16] {
        let tps = |variant: &str| {
            writer_rows
                .iter()
                .find(|r| r["clients"] == clients && r["variant"] == variant)
                .and_then(|r| r["tps"]["median"].as_f64())
        };
        if let (Some(ours), Some(theirs)) = (tps("capture"), tps("graphile-worker add_job trigger"))
        {
            ratios.insert(
                format!("writer inserts/s with {clients} writer(s), capture vs add_job trigger"),
                json!(ours / theirs),
            );
        }
    }
    peer["ratios"] = Value::Object(ratios);
}
