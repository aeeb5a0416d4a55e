//! SIGKILL the daemon at seeded random moments while rows are written, restart it each time:
//! nothing committed is lost, duplicates carry the same id, first deliveries per entity ascend,
//! and a clean restart re-sends nothing old.

use crate::harness::{
    check_at_least_once, config, insert_change, wait_all_delivered, ConfigFile, Daemon, Setup,
    Writer,
};
use fraiseql_observers::testing::TestServer;
use fraiseql_observers::testing::{eventually, TestDb};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::time::Duration;
use uuid::Uuid;

const SEED: u64 = 0x5EED_0007;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_random_moments_the_daemon_loses_nothing_and_keeps_ids_and_order() {
    let seed = std::env::var("FO_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEED);
    eprintln!("crash test seed {seed} (set FO_CRASH_SEED to replay another)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let db = TestDb::new().await;
    let receiver = TestServer::start().await;
    let hook = receiver.url("/hook");
    let file = ConfigFile::new(&config(&Setup::new("crash", &hook)));

    let writer = Writer::start(&db.url, 20, seed, Duration::from_millis(4)).await;
    let kills = rng.random_range(3..=4);
    for round in 0..kills {
        let before = receiver.accepted().len();
        let mut daemon = Daemon::start(&db.url, &file.path);
        daemon
            .wait_for_log("change-log listener started", Duration::from_secs(10))
            .await;
        let lifetime = Duration::from_millis(rng.random_range(300..1500));
        tokio::time::sleep(lifetime).await;
        assert!(
            daemon.try_exit().is_none(),
            "round {round}: the daemon exited by itself:\n{}",
            daemon.log()
        );
        daemon.sigkill().await;
        let after = receiver.accepted().len();
        eprintln!(
            "round {round}: killed after {lifetime:?}, {} deliveries",
            after - before
        );
        assert!(
            after > before,
            "round {round}: the daemon delivered nothing"
        );
    }
    let committed = writer.finish().await;
    assert!(
        committed.len() > 200,
        "only {} rows written",
        committed.len()
    );

    // A final run drains what is left, then stops cleanly.
    let mut daemon = Daemon::start(&db.url, &file.path);
    wait_all_delivered(&receiver, &committed, Duration::from_secs(30)).await;
    // Every change may have reached the receiver before the last kill: wait until this run's
    // checkpoint covers the last write, so the clean restart below has nothing old to send.
    let client = db.client().await;
    eventually(
        Duration::from_secs(30),
        "the checkpoint past the last write",
        || {
            let client = &client;
            async move {
                client
                .query_one(
                    "SELECT coalesce(bool_and(pg_visible_in_snapshot(l.txid, c.snapshot)), false)
                       FROM core.tb_entity_change_log l, core.observer_checkpoints c
                      WHERE c.consumer_id = 'crash'",
                    &[],
                )
                .await
                .ok()?
                .get::<_, bool>(0)
                .then_some(())
            }
        },
    )
    .await;
    daemon.signal("TERM");
    let status = daemon.exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.log());

    let accepted = receiver.accepted();
    let report = check_at_least_once(&committed, &accepted);
    eprintln!(
        "{} changes, {} deliveries, {} delivered more than once",
        committed.len(),
        accepted.len(),
        report.duplicated.len()
    );

    // A clean restart re-sends nothing old: only the change written now arrives.
    let seen = receiver.answered().len();
    let mut daemon = Daemon::start(&db.url, &file.path);
    let fresh = insert_change(&client, Uuid::new_v4(), "c", json!({"n": "fresh"})).await;
    eventually(Duration::from_secs(10), "the new change delivered", || {
        let done = receiver.accepted().iter().any(|h| h.sequence() == fresh);
        async move { done.then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after: Vec<i64> = receiver.answered()[seen..]
        .iter()
        .map(|h| h.sequence())
        .collect();
    assert_eq!(after, vec![fresh], "a clean restart re-sent old changes");
    daemon.signal("TERM");
    assert_eq!(
        daemon.exit(Duration::from_secs(15)).await.code(),
        Some(0),
        "log:\n{}",
        daemon.log()
    );
}
