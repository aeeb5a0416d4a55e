//! The paced writer: a separate process (the bench binary re-run with `--role writer`) that
//! inserts one order per transaction at a steady rate and records, right after each COMMIT
//! returns, the order's id and the time (unix nanoseconds).
//!
//! Row `i` is due at `start + i / rate`; several connections take rows in turn, so a slow commit
//! delays only its own row. A row written late is still measured from its own commit.

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
    let mut tasks = tokio::task::JoinSet::new();
    for (client, insert) in clients {
        let (next, commits) = (next.clone(), commits.clone());
        let rate = spec.rate as f64;
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
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
