//! The paced writer: a separate process (the bench binary re-run with `--role writer`) that
//! inserts one order per transaction at a steady rate and records, right after each COMMIT
//! returns, the order's id and the time (unix nanoseconds).
//!
//! Row `i` is due at `start + i / rate`; several connections take rows in turn, so a slow commit
//! delays only its own row. A row written late is still measured from its own commit. A writer
//! that falls behind stops at 1.5 x its seconds + 2 s, having written fewer rows.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

use super::{data, unix_nanos};

/// What the writer is asked to do.
#[derive(Debug, Clone)]
pub struct WriterSpec {
    pub url: String,
    pub rate: u64,
    pub secs: u64,
    pub connections: usize,
    pub out: String,
}

/// What the writer did.
#[derive(Debug, Clone, Default)]
pub struct WriterReport {
    pub written: u64,
    /// Rows per second actually committed.
    pub achieved_rate: f64,
    /// (entity id, commit unix ns) per row.
    pub commits: Vec<(String, i64)>,
}

/// Run the writer process and wait for it.
pub fn run(spec: &WriterSpec) -> WriterReport {
    let status = Command::new(std::env::current_exe().expect("current exe"))
        .args([
            "--role",
            "writer",
            "--url",
            &spec.url,
            "--rate",
            &spec.rate.to_string(),
            "--secs",
            &spec.secs.to_string(),
            "--connections",
            &spec.connections.to_string(),
            "--out",
            &spec.out,
        ])
        .stdout(Stdio::inherit())
        .status()
        .expect("run the writer process");
    assert!(status.success(), "writer failed: {status}");
    let text = std::fs::read_to_string(&spec.out).expect("writer output");
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    let mut report = WriterReport::default();
    for part in header.split_whitespace() {
        if let Some(v) = part.strip_prefix("written=") {
            report.written = v.parse().unwrap_or(0);
        } else if let Some(v) = part.strip_prefix("rate=") {
            report.achieved_rate = v.parse().unwrap_or(0.0);
        }
    }
    report.commits = lines
        .filter_map(|l| {
            let (id, at) = l.split_once(' ')?;
            Some((id.to_string(), at.parse().ok()?))
        })
        .collect();
    report
}

/// The writer process's main.
pub fn main(args: &[String]) {
    let get = |name: &str| -> String {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .unwrap_or_else(|| panic!("writer needs {name}"))
            .clone()
    };
    let spec = WriterSpec {
        url: get("--url"),
        rate: get("--rate").parse().expect("--rate"),
        secs: get("--secs").parse().expect("--secs"),
        connections: get("--connections").parse().expect("--connections"),
        out: get("--out"),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("writer runtime");
    runtime.block_on(write(spec));
}

async fn write(spec: WriterSpec) {
    let total = spec.rate * spec.secs;
    let next = Arc::new(AtomicU64::new(0));
    let commits: Arc<Mutex<Vec<(Uuid, i64)>>> =
        Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let mut clients = Vec::new();
    for _ in 0..spec.connections {
        let client = data::connect(&spec.url).await;
        let insert = client
            .prepare(&data::single_order_insert())
            .await
            .expect("prepare the insert");
        clients.push((client, insert));
    }
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let started = Instant::now();
    // A loaded server may not sustain the rate: stop starting rows at 1.5 x `secs` + 2 s, so a
    // run's length stays bounded (its achieved rate says how far behind it fell).
    let deadline = start + Duration::from_secs_f64(spec.secs as f64 * 1.5 + 2.0);
    let mut tasks = tokio::task::JoinSet::new();
    for (client, insert) in clients {
        let (next, commits) = (next.clone(), commits.clone());
        let rate = spec.rate as f64;
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total || tokio::time::Instant::now() >= deadline {
                    return;
                }
                tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
                let id = Uuid::new_v4();
                let seed = 1_000_000 + i as i32;
                client
                    .execute(&insert, &[&seed, &id])
                    .await
                    .expect("insert an order");
                let at = unix_nanos();
                commits.lock().expect("commits").push((id, at));
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed().as_secs_f64() - 0.05;
    let commits = commits.lock().expect("commits");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&spec.out).expect("writer out"));
    writeln!(
        out,
        "written={} rate={:.1}",
        commits.len(),
        commits.len() as f64 / elapsed.max(1e-9)
    )
    .expect("write");
    for (id, at) in commits.iter() {
        writeln!(out, "{id} {at}").expect("write");
    }
    out.flush().expect("flush");
}

// ---------------------------------------------------------------------------------------------
// The writer-cost scenario

/// What the writers are measured with: the variants of `tb_order`'s write path.
const PLAIN: &str = "plain";
const CAPTURE: &str = "capture";
const CAPTURE_NOTIFY: &str = "capture + NOTIFY hint";
const PEER: &str = "graphile-worker add_job trigger";

/// What captured writes cost the writers: pgbench single-row INSERTs into `tb_order` (one per
/// transaction, prepared statements, the server's settings as they are: `synchronous_commit` is
/// reported beside the figures), with 1 and 16 clients, for each variant of the write path. The
/// variants run in turn within each round (plain, capture, ..., then the next round), so a change
/// in the machine's load reaches every variant alike; each variant's figure is also reported as
/// its ratio to the plain run of the same round.
pub async fn cost(quick: bool, peer: bool) -> serde_json::Value {
    use serde_json::json;
    const DB: &str = "fo_bench_e2e_writer";
    let (rounds, secs) = if quick { (1, 3) } else { (3, 10) };
    let url = data::recreate(DB).await;
    let mut client = data::connect(&url).await;
    fraiseql_observers::migrate::run(&mut client)
        .await
        .expect("migrations");
    data::create_tables(&client).await;
    let script = super::target_dir().join("bench-results/writer-cost.sql");
    std::fs::create_dir_all(super::target_dir().join("bench-results")).expect("results dir");
    std::fs::write(
        &script,
        format!(
            "\\set g random(1, 1000000000)\nINSERT INTO tb_order ({}) SELECT {} FROM (SELECT :g::int AS g) s;\n",
            data::ORDER_COLUMNS,
            data::order_values("s.g", "gen_random_uuid()").replace('\n', " ")
        ),
    )
    .expect("pgbench script");
    let settings = server_settings(&client).await;

    let peer_ready = peer
        && tokio::task::spawn_blocking(super::peer::install)
            .await
            .expect("npm")
            .is_ok();
    let mut variants = vec![PLAIN, CAPTURE, CAPTURE_NOTIFY];
    if peer_ready {
        variants.push(PEER);
    }
    let mut rows = Vec::new();
    for clients in [1usize, 16] {
        let mut tps: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
        for round in 0..rounds {
            for (i, variant) in variants.iter().enumerate() {
                set_variant(&url, &client, variant).await;
                client
                    .batch_execute("TRUNCATE tb_order, core.tb_entity_change_log; CHECKPOINT")
                    .await
                    .expect("truncate");
                if *variant == PEER {
                    client
                        .batch_execute("DELETE FROM graphile_worker._private_jobs")
                        .await
                        .expect("clear jobs");
                }
                let script = script.clone();
                let value =
                    tokio::task::spawn_blocking(move || pgbench(DB, &script, clients, secs))
                        .await
                        .expect("pgbench");
                eprintln!(
                    "writer cost, {clients} writer(s), round {round}, {variant}: {value:.0} inserts/s"
                );
                tps[i].push(value);
            }
        }
        let plain = tps[0].clone();
        for (i, variant) in variants.iter().enumerate() {
            let summary = super::Summary::of(&tps[i]);
            let ratios: Vec<f64> = tps[i].iter().zip(&plain).map(|(v, p)| v / p).collect();
            let vs_plain = super::Summary::of(&ratios);
            eprintln!(
                "writer cost, {clients} writer(s), {variant}: {} inserts/s, {:.0}% of plain ({:.0}-{:.0}%)",
                summary.show(),
                vs_plain.median * 100.0,
                vs_plain.min * 100.0,
                vs_plain.max * 100.0
            );
            rows.push(json!({
                "clients": clients,
                "variant": variant,
                "tps": summary,
                "vs_plain": vs_plain.median,
                "vs_plain_rounds": vs_plain,
            }));
        }
    }
    data::drop_database(DB).await;
    json!({
        "secs": secs,
        "runs": rounds,
        "method": "pgbench -M prepared, one single-row INSERT per transaction; variants in turn within each round; TRUNCATE + CHECKPOINT before each run",
        "settings": settings,
        "rows": rows,
    })
}

/// The settings that decide what a single-row transaction costs.
async fn server_settings(client: &tokio_postgres::Client) -> serde_json::Value {
    let mut settings = serde_json::Map::new();
    for name in [
        "synchronous_commit",
        "fsync",
        "wal_level",
        "full_page_writes",
        "jit",
        "shared_buffers",
        "server_version",
    ] {
        let value: String = client
            .query_one(&format!("SHOW {name}"), &[])
            .await
            .expect("show a setting")
            .get(0);
        settings.insert(name.into(), value.into());
    }
    serde_json::Value::Object(settings)
}

/// Put `tb_order` and `tb_user` in the state of one variant, from whichever state they are in.
async fn set_variant(url: &str, client: &tokio_postgres::Client, variant: &str) {
    use fraiseql_observers::capture;
    for table in ["tb_order", "tb_user"] {
        if capture::list(client)
            .await
            .expect("captured tables")
            .iter()
            .any(|c| c.table == format!("public.{table}"))
        {
            capture::disable(client, table).await.expect("capture off");
        }
    }
    capture::set_notify(client, false)
        .await
        .expect("notify off");
    client
        .batch_execute(
            "DROP TRIGGER IF EXISTS bench_peer ON tb_order; DROP TRIGGER IF EXISTS bench_peer ON tb_user",
        )
        .await
        .expect("drop the peer's triggers");
    match variant {
        CAPTURE => data::enable_capture(client).await,
        CAPTURE_NOTIFY => {
            data::enable_capture(client).await;
            capture::set_notify(client, true).await.expect("notify on");
        }
        PEER => {
            let installed = client
                .query_opt(
                    "SELECT 1 FROM pg_proc WHERE proname = 'bench_peer_enqueue'",
                    &[],
                )
                .await
                .expect("peer lookup")
                .is_some();
            if installed {
                client
                    .batch_execute(
                        "CREATE TRIGGER bench_peer AFTER INSERT OR UPDATE OR DELETE ON tb_order
                             FOR EACH ROW EXECUTE FUNCTION bench_peer_enqueue('Order');
                         CREATE TRIGGER bench_peer AFTER INSERT OR UPDATE OR DELETE ON tb_user
                             FOR EACH ROW EXECUTE FUNCTION bench_peer_enqueue('User');",
                    )
                    .await
                    .expect("peer triggers");
            } else {
                super::peer::prepare(url, client).await;
            }
        }
        _ => {}
    }
}

/// pgbench: single-row INSERTs into `tb_order` for `secs` with `clients` connections, prepared
/// statements; its transactions per second.
fn pgbench(db: &str, script: &std::path::Path, clients: usize, secs: u64) -> f64 {
    let admin = data::admin_url();
    let config: tokio_postgres::Config = admin.parse().expect("admin url");
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres").to_string();
    let output = Command::new("pgbench")
        .args([
            "-n",
            "-M",
            "prepared",
            "-h",
            &host,
            "-p",
            &port.to_string(),
            "-U",
            &user,
            "-f",
            &script.display().to_string(),
            "-c",
            &clients.to_string(),
            "-j",
            &clients.min(2).to_string(),
            "-T",
            &secs.to_string(),
            db,
        ])
        .output()
        .expect("run pgbench");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "pgbench failed: {}{}",
        text,
        String::from_utf8_lossy(&output.stderr)
    );
    text.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l["tps = ".len()..].split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no tps in pgbench output: {text}"))
}
