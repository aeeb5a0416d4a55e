//! End-to-end benchmarks: PostgreSQL writes -> capture trigger -> change log -> our engine ->
//! signed webhooks -> a local receiver; and graphile-worker doing the same job in the same run.
//!
//! ```sh
//! cargo bench -p fraiseql-observers --bench e2e                       # everything (~30 min)
//! cargo bench -p fraiseql-observers --bench e2e -- --quick            # a smoke run (~5 min)
//! cargo bench -p fraiseql-observers --bench e2e -- --scenario drain   # one scenario
//! ```
//!
//! Scenarios: `drain`, `drain-binary` (the drain by the shipped daemon, `fraiseql-observers run
//! --config FILE`, in a process of its own, `/metrics` on and off alternating; `--binary PATH`,
//! default `<target>/release/fraiseql-observers`), `instructions` (the daemon's drain of
//! `--instruction-events N` and 2N changes under valgrind's callgrind: instructions per event;
//! not part of a full run; `benches/instructions.sh` runs it), `record-cost` (drain with the
//! delivery log on and off, alternating),
//! `backlog` (a 5 M-change backlog, `--backlog-events N`, drained to the webhook: peak RSS and
//! the rate of each tenth; not part of a full run), `flow` (a healthy observer's latency at
//! 500/s beside a hung endpoint, and a 50/s rate limit over 20 s), `distributed` (a reader and
//! 1, 2, 4 worker processes over JetStream to a receiver taking 20 ms per request, or each of
//! `--receiver-delay-ms MS[,MS...]`, the reader's publish rate, the CPU of the extra hop; needs
//! nats-server on 4222; not part of a full run),
//! `match-only`, `fan-out`, `latency`, `soak`, `writer-cost`, `peer`
//! (`--scenario` may be repeated or comma-separated). Options: `--runs N` (throughput runs,
//! default 3, 1 with `--quick`), `--events N` (backlog size, default 100,000, 10,000 with
//! `--quick`), `--no-peer`, `--report-only` (rewrite BENCHMARKS.md's tables from the last full
//! run's `e2e.json`). Needs PostgreSQL at `postgres://postgres@127.0.0.1:5432` (or
//! `FRAISEQL_BENCH_ADMIN_URL`), allowed to create databases; the peer needs Node and npm.
//!
//! Invariants: every database is created fresh for the run (`fo_bench_e2e_*`) and dropped at the
//! end; the engine runs in this process (except in `drain-binary` and `instructions`, which
//! start the daemon), the receiver and the paced writer in processes of their
//! own (this binary re-run with `--role receiver` / `--role writer`), so the engine's resident
//! memory is this process's and the three never share a scheduler. A run that loses or
//! duplicates a delivery panics: a figure is only written for a correct run. Results go to
//! `<target>/bench-results/e2e.json`; a full run (every scenario, not `--quick`) also rewrites
//! the generated tables of BENCHMARKS.md's `## End to end` section.

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
    "drain-binary",
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
const ON_REQUEST: &[&str] = &["backlog", "instructions", "distributed"];

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
                .unwrap_or(2_000),
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

    fn wants(&self, scenario: &str) -> bool {
        self.scenarios.iter().any(|s| s == scenario)
    }

    fn latency_secs(&self) -> u64 {
        if self.quick {
            10
        } else {
            60
        }
    }

    fn full(&self) -> bool {
        !self.quick && self.scenarios.len() == SCENARIOS.len() - ON_REQUEST.len() && self.peer
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

    let throughput = [
        "drain",
        "drain-binary",
        "record-cost",
        "match-only",
        "fan-out",
    ]
    .iter()
    .any(|s| options.wants(s));
    if throughput {
        let db = ThroughputDb::create(THROUGHPUT_DB, options.events).await;
        if options.wants("drain") {
            scenarios.insert("drain".into(), drain(&options, &db, &receiver).await);
        }
        if options.wants("drain-binary") {
            scenarios.insert(
                "drain_binary".into(),
                drain_binary(&options, &db, &receiver).await,
            );
        }
        if options.wants("record-cost") {
            scenarios.insert(
                "record_cost".into(),
                record_cost(&options, &db, &receiver).await,
            );
        }
        if options.wants("match-only") {
            scenarios.insert(
                "match_only".into(),
                match_only(&options, &db, &receiver).await,
            );
        }
        if options.wants("fan-out") {
            scenarios.insert("fan_out".into(), fan_out(&options, &db, &receiver).await);
        }
        data::drop_database(db.name).await;
    }
    if options.wants("latency") {
        scenarios.insert("latency".into(), latency(&options, &receiver).await);
    }
    if options.wants("peer") && options.peer {
        let peer = peer_scenarios(&options, &receiver).await;
        scenarios.insert("peer".into(), peer);
    }
    if options.wants("soak") {
        scenarios.insert("soak".into(), soak(&options, &receiver).await);
    }
    if options.wants("flow") {
        let secs = if options.quick { 10 } else { 30 };
        scenarios.insert(
            "flow".into(),
            json!({
                "control": flow::hung_endpoint(&receiver, 500, secs, false).await,
                "hung_endpoint": flow::hung_endpoint(&receiver, 500, secs, true).await,
                "rate_limit": flow::rate_limit(&receiver, 50, 20).await,
            }),
        );
    }
    if options.wants("backlog") {
        scenarios.insert("backlog".into(), backlog(&options, &receiver).await);
    }
    if options.wants("distributed") {
        let db = ThroughputDb::create("fo_bench_e2e_distributed", options.events).await;
        scenarios.insert(
            "distributed".into(),
            distributed::scenario(&options, &db, &receiver).await,
        );
        data::drop_database(db.name).await;
    }
    if options.wants("writer-cost") {
        scenarios.insert(
            "writer_cost".into(),
            writer::cost(options.quick, options.peer).await,
        );
    }
    if options.wants("instructions") {
        scenarios.insert(
            "instructions".into(),
            instructions(&options, &receiver).await,
        );
    }
    add_ratios(&mut scenarios);

    let results = json!({
        "date": chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        "commit": git_commit(),
        "command": options.command,
        "quick": options.quick,
        "machine": report::machine(&version),
        "load_start": load_start,
        "load_end": report::load_average(),
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

fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
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
            if engine::checkpoint_covers(&self.client, consumer, &self.last_txid).await {
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
        assert!(
            options.binary.is_file(),
            "no daemon at {}: build it with `cargo build --release -p fraiseql-observers-cli` \
             (same CARGO_TARGET_DIR) or pass --binary PATH",
            options.binary.display()
        );
        let started = Instant::now();
        let mut engine = binary::BinaryEngine::start(
            &options.binary,
            wrapper,
            &self.url,
            consumer,
            observers,
            metrics,
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
            if engine::checkpoint_covers(&self.client, consumer, &self.last_txid).await {
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

async fn drain(options: &Options, db: &ThroughputDb, receiver: &ReceiverProcess) -> Value {
    let observer = engine::webhook_observer(
        "everything",
        "*",
        engine::ALL_KINDS,
        "",
        &receiver.url("/drain"),
    );
    let (mut runs, mut cpus) = (Vec::new(), Vec::new());
    for run in 1..=options.runs {
        receiver.reset().await;
        let (seconds, cpu) = db.drain(&format!("drain_{run}"), &observer, receiver).await;
        check_deliveries(receiver, db.events, "drain").await;
        let eps = db.events as f64 / seconds;
        let per_event = cpu.per_event(db.events);
        eprintln!("drain run {run}: {seconds:.2} s, {eps:.0} events/s, CPU per event {per_event}");
        runs.push(eps);
        cpus.push((cpu.engine, per_event));
    }
    json!({ "events": db.events, "events_per_s": Summary::of(&runs), "cpu_per_event": median_cpu(&cpus) })
}

/// The drain by the shipped daemon in a process of its own (`--binary PATH`, default the
/// release `fraiseql-observers` of this target directory), with `/metrics` on and off in
/// alternating order: events/s, CPU per event by process with the engine's ratios to
/// PostgreSQL's and the receiver's, and the daemon's peak resident memory.
async fn drain_binary(options: &Options, db: &ThroughputDb, receiver: &ReceiverProcess) -> Value {
    let observer = engine::webhook_observer(
        "everything",
        "*",
        engine::ALL_KINDS,
        "",
        &receiver.url("/drain"),
    );
    /// One `/metrics` setting's runs: events/s, (engine CPU, CPU per event), peak RSS MiB.
    #[derive(Default)]
    struct Mode {
        metrics: bool,
        eps: Vec<f64>,
        cpus: Vec<(f64, Value)>,
        peaks: Vec<f64>,
    }
    let mut modes = [
        Mode {
            metrics: true,
            ..Mode::default()
        },
        Mode::default(),
    ];
    for run in 1..=options.runs {
        let order = if run % 2 == 1 { [0, 1] } else { [1, 0] };
        for m in order {
            let metrics = modes[m].metrics;
            let name = if metrics { "on" } else { "off" };
            receiver.reset().await;
            let consumer = format!("binary_metrics_{name}_{run}");
            let (seconds, cpu, peak) = db
                .drain_binary(options, &[], &consumer, &observer, metrics, receiver)
                .await;
            check_deliveries(receiver, db.events, "drain-binary").await;
            let eps = db.events as f64 / seconds;
            let per_event = cpu.per_event(db.events);
            eprintln!(
                "drain (binary, /metrics {name}) run {run}: {seconds:.2} s, {eps:.0} events/s, \
                 CPU per event {per_event}, peak RSS {:.1} MiB",
                peak as f64 / 1024.0
            );
            let mode = &mut modes[m];
            mode.eps.push(eps);
            mode.cpus.push((cpu.engine, per_event));
            mode.peaks.push(peak as f64 / 1024.0);
        }
    }
    let summary = |mode: &Mode| {
        let ratio = |key: &str| {
            Summary::of(
                &mode
                    .cpus
                    .iter()
                    .filter_map(|(_, v)| v[key].as_f64())
                    .collect::<Vec<_>>(),
            )
        };
        json!({
            "events_per_s": Summary::of(&mode.eps),
            "cpu_per_event": median_cpu(&mode.cpus),
            "engine_over_postgres": ratio("engine_over_postgres"),
            "engine_over_receiver": ratio("engine_over_receiver"),
            "peak_rss_mib": Summary::of(&mode.peaks),
        })
    };
    json!({
        "binary": options.binary.display().to_string(),
        "events": db.events,
        "metrics_on": summary(&modes[0]),
        "metrics_off": summary(&modes[1]),
    })
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
    let dir = target_dir().join("bench-results/binary");
    std::fs::create_dir_all(&dir).expect("results dir");
    let mut per_event = Vec::new();
    let mut startup = Vec::new();
    let mut counted = Vec::new();
    for run in 1..=options.runs {
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
        if engine::checkpoint_covers(&client, "backlog", &last_txid).await {
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

/// The delivery log's cost: the drain with `record = "none"` and with `record = "all"`, in
/// alternating order, each run a fresh consumer over the same backlog.
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
    let (mut none, mut all) = (Vec::new(), Vec::new());
    let (mut none_cpu, mut all_cpu) = (Vec::new(), Vec::new());
    for run in 1..=options.runs {
        let order = if run % 2 == 1 {
            ["none", "all"]
        } else {
            ["all", "none"]
        };
        for record in order {
            receiver.reset().await;
            let consumer = format!("record_{record}_{run}");
            let (seconds, cpu) = db.drain(&consumer, &observer(record), receiver).await;
            check_deliveries(receiver, db.events, "record-cost").await;
            let eps = db.events as f64 / seconds;
            let per_event = cpu.per_event(db.events);
            eprintln!("record = {record} run {run}: {seconds:.2} s, {eps:.0} events/s, CPU per event {per_event}");
            if record == "none" {
                none.push(eps);
                none_cpu.push((cpu.engine, per_event));
            } else {
                all.push(eps);
                all_cpu.push((cpu.engine, per_event));
            }
        }
    }
    let ratios: Vec<f64> = all.iter().zip(&none).map(|(a, n)| a / n).collect();
    json!({
        "events": db.events,
        "none_events_per_s": Summary::of(&none),
        "all_events_per_s": Summary::of(&all),
        "all_over_none": Summary::of(&ratios),
        "none_cpu_per_event": median_cpu(&none_cpu),
        "all_cpu_per_event": median_cpu(&all_cpu),
    })
}

async fn match_only(options: &Options, db: &ThroughputDb, receiver: &ReceiverProcess) -> Value {
    let observer = engine::webhook_observer(
        "refunds",
        "*",
        engine::ALL_KINDS,
        "status == 'refunded'",
        &receiver.url("/never"),
    );
    let (mut runs, mut cpus) = (Vec::new(), Vec::new());
    for run in 1..=options.runs {
        receiver.reset().await;
        let (seconds, cpu) = db.drain(&format!("match_{run}"), &observer, receiver).await;
        check_deliveries(receiver, 0, "match-only").await;
        let eps = db.events as f64 / seconds;
        let per_event = cpu.per_event(db.events);
        eprintln!(
            "match-only run {run}: {seconds:.2} s, {eps:.0} events/s, CPU per event {per_event}"
        );
        runs.push(eps);
        cpus.push((cpu.engine, per_event));
    }
    json!({ "events": db.events, "events_per_s": Summary::of(&runs), "cpu_per_event": median_cpu(&cpus) })
}

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
    let (mut events, mut deliveries, mut cpus) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=options.runs {
        receiver.reset().await;
        let (seconds, cpu) = db
            .drain(&format!("fanout_{run}"), &observers, receiver)
            .await;
        check_deliveries(receiver, expected, "fan-out").await;
        let per_event = cpu.per_event(db.events);
        eprintln!(
            "fan-out run {run}: {seconds:.2} s, {:.0} events/s, {:.0} deliveries/s, CPU per event {per_event}",
            db.events as f64 / seconds,
            expected as f64 / seconds
        );
        events.push(db.events as f64 / seconds);
        deliveries.push(expected as f64 / seconds);
        cpus.push((cpu.engine, per_event));
    }
    json!({
        "events": db.events,
        "deliveries": expected,
        "deliveries_per_event": expected as f64 / db.events as f64,
        "events_per_s": Summary::of(&events),
        "deliveries_per_s": Summary::of(&deliveries),
        "cpu_per_event": median_cpu(&cpus),
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
            let engine = Engine::start(&url, &consumer, &runtime, &observer).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let result = steady_run(&url, receiver, rate, options.latency_secs()).await;
            engine.stop().await;
            eprintln!("latency at {rate}/s (ours, {mode}): {result:?}");
            assert_eq!(result.missing, 0, "every change delivered");
            assert_eq!(result.duplicates, 0, "no change delivered twice");
            let mut row = serde_json::to_value(&result).expect("json");
            row["mode"] = json!(mode);
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
            let result = steady_run(&url, receiver, rate, options.latency_secs()).await;
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

async fn soak(options: &Options, receiver: &ReceiverProcess) -> Value {
    const DB: &str = "fo_bench_e2e_soak";
    let (rate, secs) = (2000u64, if options.quick { 60 } else { 600 });
    let (url, _client) = fresh_captured_db(DB).await;
    let observer =
        engine::webhook_observer("orders", "Order", r#""INSERT""#, "", &receiver.url("/soak"));
    let engine = Engine::start(&url, "soak", "start_position = \"now\"", &observer).await;
    let rss_start = engine::rss_kib();
    let sampler = {
        tokio::spawn(async move {
            let started = Instant::now();
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            tick.tick().await;
            loop {
                tick.tick().await;
                let t = started.elapsed().as_secs_f64();
                samples.push((t, engine::rss_kib()));
                if t >= secs as f64 {
                    return samples;
                }
            }
        })
    };
    let result = steady_run(&url, receiver, rate, secs).await;
    let samples = sampler.await.expect("sampler");
    let in_flight = engine
        .status
        .in_flight
        .load(std::sync::atomic::Ordering::Relaxed);
    engine.stop().await;
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
        "soak: rss start {:.1} MiB, 1 min {:.1}, end {:.1}, max {:.1}",
        mib(rss_start),
        mib(at_1min),
        mib(end),
        mib(max)
    );
    json!({
        "rate": rate,
        "secs": secs,
        "written": result.written,
        "delivered": result.delivered,
        "missing": result.missing,
        "duplicates": result.duplicates,
        "latency": result,
        "in_flight_at_end": in_flight,
        "rss_start_mib": mib(rss_start),
        "rss_1min_mib": mib(at_1min),
        "rss_end_mib": mib(end),
        "rss_max_mib": mib(max),
        "growth_pct": (end as f64 - at_1min as f64) / (at_1min.max(1) as f64) * 100.0,
        "samples": samples.iter().map(|(t, kib)| json!({"t": t.round(), "rss_mib": mib(*kib)})).collect::<Vec<_>>(),
    })
}

/// Ours divided by graphile-worker's, from the same run.
fn add_ratios(scenarios: &mut serde_json::Map<String, Value>) {
    let ours_drain = scenarios
        .get("drain")
        .map(|d| d["events_per_s"]["median"].as_f64().unwrap_or(f64::NAN));
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
