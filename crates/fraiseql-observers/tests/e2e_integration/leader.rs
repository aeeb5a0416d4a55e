//! Leader election against a real PostgreSQL: one holder of a consumer's advisory lock, standbys
//! that take over within a few seconds when the holder goes away (dropped, or its backend
//! terminated), and a holder that learns it lost the lock.

use fraiseql_observers::leader::{lock_key, Leadership};
use fraiseql_observers::testing::{eventually, TestDb};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// Backends of this database holding `consumer`'s advisory lock, as the server sees them:
/// (pid, application_name).
async fn holders(client: &Client, consumer: &str) -> Vec<(i32, String)> {
    client
        .query(
            "SELECT l.pid, a.application_name
               FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
              WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND ((l.classid::bigint << 32) | l.objid::bigint) = $1",
            &[&lock_key(consumer)],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn spawn_standby(
    url: &str,
    consumer: &str,
) -> (
    Arc<AtomicU32>,
    tokio::task::JoinHandle<fraiseql_observers::Result<Leadership>>,
) {
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let (url, consumer) = (url.to_string(), consumer.to_string());
    let task = tokio::spawn(async move {
        Leadership::acquire(&url, &consumer, move || {
            counted.fetch_add(1, Ordering::SeqCst);
        })
        .await
    });
    (calls, task)
}

#[tokio::test]
async fn a_standby_waits_while_the_leader_holds_the_lock_and_takes_over_when_it_is_dropped() {
    let db = TestDb::empty().await;
    let client = db.client().await;
    let leader = tokio::time::timeout(
        Duration::from_secs(5),
        Leadership::acquire(&db.url, "orders", || {
            panic!("the first instance is no standby")
        }),
    )
    .await
    .expect("an uncontested lock is taken at once")
    .unwrap();
    let first = holders(&client, "orders").await;
    assert_eq!(first.len(), 1, "exactly one holder: {first:?}");
    assert_eq!(first[0].1, "fraiseql-observers-leader:orders");

    let (standby_calls, standby) = spawn_standby(&db.url, "orders");
    eventually(
        Duration::from_secs(5),
        "the standby to report itself",
        || {
            let n = standby_calls.load(Ordering::SeqCst);
            async move { (n > 0).then_some(()) }
        },
    )
    .await;
    // Several retry rounds later it still waits, reported once, and the leader still holds.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!standby.is_finished(), "the standby took a held lock");
    assert_eq!(standby_calls.load(Ordering::SeqCst), 1);
    assert_eq!(holders(&client, "orders").await, first);
    assert!(!leader.is_lost());

    let dropped = Instant::now();
    drop(leader);
    let new_leader = tokio::time::timeout(Duration::from_secs(5), standby)
        .await
        .expect("the standby takes over within a few seconds")
        .unwrap()
        .unwrap();
    assert!(dropped.elapsed() < Duration::from_secs(3));
    let now = holders(&client, "orders").await;
    assert_eq!(now.len(), 1, "exactly one holder: {now:?}");
    assert_ne!(now[0].0, first[0].0, "the lock moved to another session");
    assert!(!new_leader.is_lost());
}

#[tokio::test]
async fn a_leader_whose_backend_is_terminated_learns_it_lost_and_the_standby_takes_over() {
    let db = TestDb::empty().await;
    let client = db.client().await;
    let leader = Leadership::acquire(&db.url, "orders", || {}).await.unwrap();
    let (standby_calls, standby) = spawn_standby(&db.url, "orders");
    eventually(Duration::from_secs(5), "the standby to wait", || {
        let n = standby_calls.load(Ordering::SeqCst);
        async move { (n > 0).then_some(()) }
    })
    .await;

    let old = holders(&client, "orders").await;
    assert_eq!(old.len(), 1);
    let terminated: bool = client
        .query_one("SELECT pg_terminate_backend($1)", &[&old[0].0])
        .await
        .unwrap()
        .get(0);
    assert!(terminated);

    tokio::time::timeout(Duration::from_secs(5), leader.lost())
        .await
        .expect("the old leader notices within a few seconds");
    assert!(leader.is_lost());
    let new_leader = tokio::time::timeout(Duration::from_secs(5), standby)
        .await
        .expect("the standby takes over within a few seconds")
        .unwrap()
        .unwrap();
    let now = holders(&client, "orders").await;
    assert_eq!(now.len(), 1);
    assert_ne!(now[0].0, old[0].0);
    assert!(!new_leader.is_lost());
}

#[tokio::test]
async fn different_consumers_are_led_independently() {
    let db = TestDb::empty().await;
    let client = db.client().await;
    let a = Leadership::acquire(&db.url, "orders", || panic!("no standby"))
        .await
        .unwrap();
    let b = tokio::time::timeout(
        Duration::from_secs(5),
        Leadership::acquire(&db.url, "users", || panic!("no standby")),
    )
    .await
    .expect("another consumer's lock is free")
    .unwrap();
    assert_eq!(holders(&client, "orders").await.len(), 1);
    assert_eq!(holders(&client, "users").await.len(), 1);
    assert_eq!(a.consumer(), "orders");
    assert_eq!(b.consumer(), "users");
}
