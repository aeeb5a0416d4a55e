//! SIGTERM while a slow receiver holds deliveries: the daemon stops reading, finishes what is in
//! flight, saves the checkpoint and exits 0; a restart re-sends nothing that was delivered.

use crate::harness::{config, insert_change, ConfigFile, Daemon, Setup};
use fraiseql_observers::testing::TestServer;
use fraiseql_observers::testing::{eventually, TestDb};
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_listener_graceful_shutdown() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = TestServer::start().await;
    let started = Arc::new(AtomicUsize::new(0));
    let counter = started.clone();
    receiver.respond(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
        (200, Duration::from_millis(1500))
    });
    let hook = receiver.url("/hook");
    let file = ConfigFile::new(&config(&Setup {
        concurrency: 16,
        ..Setup::new("graceful", &hook)
    }));

    let mut daemon = Daemon::start(&db.url, &file.path);
    daemon
        .wait_for_log("change-log listener started", Duration::from_secs(10))
        .await;
    let mut first = Vec::new();
    for n in 0..5 {
        first.push(insert_change(&client, Uuid::new_v4(), "c", json!({"n": n})).await);
    }
    eventually(Duration::from_secs(10), "five deliveries in flight", || {
        let n = started.load(Ordering::SeqCst);
        async move { (n == 5).then_some(()) }
    })
    .await;
    assert!(
        receiver.accepted().len() < 5,
        "the deliveries finished too soon for the test"
    );

    daemon.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut later = Vec::new();
    for n in 0..3 {
        later.push(insert_change(&client, Uuid::new_v4(), "c", json!({"late": n})).await);
    }
    let status = daemon.exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.log());
    assert!(daemon.log().contains("stopped; checkpoint saved"));

    // In-flight work finished before the exit; nothing written after the signal was read.
    let delivered: Vec<i64> = receiver.accepted().iter().map(|h| h.sequence()).collect();
    let mut sorted = delivered.clone();
    sorted.sort();
    assert_eq!(sorted, first, "the in-flight deliveries did not all finish");
    assert_eq!(
        started.load(Ordering::SeqCst),
        5,
        "it kept reading after SIGTERM"
    );
    let saved: Option<i64> = client
        .query_one(
            "SELECT epoch FROM core.observer_checkpoints WHERE consumer_id = 'graceful'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(saved, Some(1));

    // A restart delivers what came after, and nothing that was delivered.
    receiver.respond(|_| (200, Duration::ZERO));
    let mut daemon = Daemon::start(&db.url, &file.path);
    eventually(
        Duration::from_secs(10),
        "the later changes delivered",
        || {
            let got: Vec<i64> = receiver.accepted().iter().map(|h| h.sequence()).collect();
            let done = later.iter().all(|s| got.contains(s));
            async move { done.then_some(()) }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut all: Vec<i64> = receiver.answered().iter().map(|h| h.sequence()).collect();
    all.sort();
    let mut expected = [first.clone(), later.clone()].concat();
    expected.sort();
    assert_eq!(all, expected, "something was delivered twice or not at all");
    daemon.signal("TERM");
    assert_eq!(daemon.exit(Duration::from_secs(15)).await.code(), Some(0));
}
