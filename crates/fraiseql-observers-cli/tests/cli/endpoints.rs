//! `/metrics` and `/healthz` of a running daemon: the counters after real deliveries, the health
//! JSON, and no way to change anything over HTTP.

use crate::harness::{
    config, free_port, healthz, http_get, insert_change, ConfigFile, Daemon, Setup,
};
use fraiseql_observers::testing::TestServer;
use fraiseql_observers::testing::{eventually, TestDb};
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// The value of the sample `name` (with its labels, as rendered) in a Prometheus text page.
fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l[name.len()..].trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_metrics_collection() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = TestServer::start().await;
    // The first request fails transiently (and is retried); the rest succeed.
    let failed_once = Arc::new(AtomicBool::new(false));
    receiver.respond(move |_| {
        let first = !failed_once.swap(true, Ordering::SeqCst);
        (if first { 503 } else { 200 }, Duration::ZERO)
    });
    let port = free_port();
    let hook = receiver.url("/hook");
    let file = ConfigFile::new(&config(&Setup {
        metrics_port: Some(port),
        ..Setup::new("metrics", &hook)
    }));
    let mut daemon = Daemon::start(&db.url, &file.path);
    eventually(
        Duration::from_secs(10),
        "/healthz to answer as leader",
        || async {
            let (status, body) = healthz(port).await?;
            (status == 200 && body["role"] == "leader" && body["listener_healthy"] == true)
                .then_some(())
        },
    )
    .await;

    for n in 0..5 {
        insert_change(&client, Uuid::new_v4(), "c", json!({"n": n})).await;
    }
    eventually(Duration::from_secs(10), "five deliveries", || {
        let n = receiver.accepted().len();
        async move { (n == 5).then_some(()) }
    })
    .await;
    assert_eq!(
        receiver.answered().len(),
        6,
        "one refused attempt, five accepted"
    );

    let page = eventually(Duration::from_secs(10), "the counters", || async {
        let (status, page) = http_get(port, "/metrics").await?;
        assert_eq!(status, 200);
        let ok = sample(
            &page,
            r#"fraiseql_observers_actions_total{observer="all",action="webhook",outcome="ok"}"#,
        );
        (ok == Some(5.0)).then_some(page)
    })
    .await;
    for (name, value) in [
        ("fraiseql_observers_events_read_total", 5.0),
        ("fraiseql_observers_rows_read_total", 5.0),
        (
            r#"fraiseql_observers_events_matched_total{observer="all"}"#,
            5.0,
        ),
        (
            r#"fraiseql_observers_actions_total{observer="all",action="webhook",outcome="retried"}"#,
            1.0,
        ),
        ("fraiseql_observers_leader", 1.0),
        (
            r#"fraiseql_observers_delivery_latency_seconds_count{observer="all"}"#,
            5.0,
        ),
    ] {
        assert_eq!(sample(&page, name), Some(value), "{name} in:\n{page}");
    }
    assert!(page.contains("fraiseql_observers_delivery_latency_seconds_bucket{"));

    let (status, body) = eventually(Duration::from_secs(10), "the health figures", || async {
        let (status, body) = healthz(port).await?;
        (body["events_read"] == 5 && body["backlog"] == 0).then_some((status, body))
    })
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "ok");
    assert_eq!(body["role"], "leader");
    assert_eq!(body["consumer"], "metrics");
    assert_eq!(body["listener_healthy"], true);
    assert_eq!(body["events_matched"], 5);
    assert_eq!(body["in_flight"], 0);
    assert!(body["lag_ms"].is_i64());

    // Read-only: no method but GET, no other path.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for path in ["/metrics", "/healthz"] {
        let post = http
            .post(format!("http://127.0.0.1:{port}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(post.status().as_u16(), 405, "POST {path}");
    }
    assert_eq!(http_get(port, "/dlq").await.unwrap().0, 404);

    daemon.signal("INT");
    assert_eq!(daemon.exit(Duration::from_secs(15)).await.code(), Some(0));
}
