//! Flow control per endpoint (issue 10), measured on the shipped daemon: a receiver that accepts connections and never
//! answers, beside a healthy one under a steady writer (the healthy observer's latency); and a
//! rate limit held over 20 s.

use crate::engine::{self, Engine};
use crate::receiver::ReceiverProcess;
use crate::{
    data, fresh_captured_db, start_daemon, steady_run, unix_nanos, writer, writer_connections,
};
use serde_json::{json, Value};
use std::path::Path;
use tokio::net::TcpListener;

/// A receiver that accepts every connection and never answers (its sockets are held open).
async fn black_hole() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    format!("http://{address}/hook")
}

/// The healthy observer's commit-to-arrival latency at `rate` changes/s while another
/// observer's endpoint hangs (default 10 s timeout, default breaker); with `hung` false, the
/// other observer's endpoint is a second healthy receiver (the same work, nothing hangs: the
/// control run). `binary` `None`: the engine in the bench process instead of the daemon.
pub async fn hung_endpoint(
    binary: Option<&Path>,
    receiver: &ReceiverProcess,
    rate: u64,
    secs: u64,
    hung: bool,
) -> Value {
    const DB: &str = "fo_bench_e2e_hung";
    let (url, client) = fresh_captured_db(DB).await;
    // The control's other receiver is a process of its own, so the healthy receiver's
    // arrivals are the healthy observer's only.
    let second = (!hung).then(ReceiverProcess::start);
    let other = match &second {
        None => black_hole().await,
        Some(r) => r.url("/other"),
    };
    let observers = format!(
        "{}{}",
        engine::webhook_observer(
            "healthy",
            "Order",
            r#""INSERT""#,
            "",
            &receiver.url("/healthy")
        ),
        engine::webhook_observer("stuck", "Order", r#""INSERT""#, "", &other),
    );
    let runtime = "start_position = \"now\"";
    let result = match binary {
        Some(binary) => {
            let daemon = start_daemon(binary, &url, &client, "hung", runtime, &observers).await;
            let result = steady_run(&url, receiver, rate, secs).await;
            daemon.stop().await;
            result
        }
        None => {
            let engine = Engine::start(&url, "hung", runtime, &observers).await;
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let result = steady_run(&url, receiver, rate, secs).await;
            engine.stop().await;
            result
        }
    };
    eprintln!("healthy observer at {rate}/s, other endpoint hung: {hung}: {result:?}");
    assert_eq!(result.missing, 0, "every healthy delivery arrives");
    data::drop_database(DB).await;
    serde_json::to_value(&result).expect("json")
}

/// Deliveries per second at the receiver with `rate_limit = { per_second = limit }` while the
/// writer offers twice as much, over `secs` seconds after the first arrival plus 2 s.
pub async fn rate_limit(binary: &Path, receiver: &ReceiverProcess, limit: u64, secs: u64) -> Value {
    const DB: &str = "fo_bench_e2e_rate";
    let (url, client) = fresh_captured_db(DB).await;
    let observer = engine::webhook_observer(
        "limited",
        "Order",
        r#""INSERT""#,
        "",
        &receiver.url("/limited"),
    )
    .replace(
        "allow_private_networks = true\n",
        &format!(
            "allow_private_networks = true\nrate_limit = {{ per_second = {limit}, burst = 1 }}\n"
        ),
    );
    let daemon = start_daemon(
        binary,
        &url,
        &client,
        "rate",
        "start_position = \"now\"\nretry_poll_interval_ms = 50",
        &observer,
    )
    .await;
    receiver.reset().await;
    let spec = writer::WriterSpec {
        url: url.clone(),
        rate: limit * 2,
        secs: secs + 6,
        connections: writer_connections(limit * 2),
        out: std::env::temp_dir()
            .join(format!("fo-bench-rate-{}.txt", unix_nanos()))
            .display()
            .to_string(),
    };
    tokio::task::spawn_blocking(move || writer::run(&spec))
        .await
        .expect("writer");
    let arrivals = receiver.arrivals().await;
    daemon.stop().await;
    data::drop_database(DB).await;
    let mut times: Vec<i64> = arrivals.iter().map(|(_, t)| *t).collect();
    times.sort_unstable();
    let start = times.first().copied().expect("deliveries arrived") + 2_000_000_000;
    let end = start + secs as i64 * 1_000_000_000;
    let mut per_second = vec![0u64; secs as usize];
    for t in times.iter().filter(|t| **t >= start && **t < end) {
        per_second[((t - start) / 1_000_000_000) as usize] += 1;
    }
    let total: u64 = per_second.iter().sum();
    let average = total as f64 / secs as f64;
    eprintln!("rate limit {limit}/s: {average:.1}/s over {secs} s, per second {per_second:?}");
    json!({
        "limit_per_s": limit,
        "offered_per_s": limit * 2,
        "window_s": secs,
        "delivered_in_window": total,
        "average_per_s": average,
        "deviation": (average - limit as f64) / limit as f64,
        "per_second_min": per_second.iter().min(),
        "per_second_max": per_second.iter().max(),
    })
}
