//! The engine through failures of its own database: it keeps its place, waits, and recovers;
//! the change log is the buffer.

use crate::receiver::Receiver;
use crate::support::{connect, eventually, TestDb};
use fraiseql_observers::pipeline::{self, Pipeline};
use fraiseql_observers::{config, ListenerConfig};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_postgres::Client;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn env(name: &str) -> Option<String> {
    (name == "HOOK_SECRET").then(|| SECRET.to_string())
}

fn observers(receiver: &Receiver) -> String {
    format!(
        r#"
[observers.runtime]
consumer_id = "degrade"
start_position = "beginning"
poll_interval_ms = 20
checkpoint_interval_ms = 50
retry_poll_interval_ms = 50
concurrency = 4

[observers.item_changed]
entity = "Item"
event_type = ["INSERT", "UPDATE"]

[[observers.item_changed.actions]]
type = "webhook"
url = "{}"
signing_secret_env = "HOOK_SECRET"
allow_private_networks = true
"#,
        receiver.url("/items")
    )
}

async fn start(
    db: &TestDb,
    receiver: &Receiver,
) -> (Pipeline, std::sync::Arc<pipeline::EngineStatus>) {
    let config = config::load(&observers(receiver), &env).unwrap_or_else(|e| panic!("{e}"));
    let listener = ListenerConfig {
        min_poll_interval: Duration::from_millis(2),
        retry_initial_delay: Duration::from_millis(20),
        retry_max_delay: Duration::from_millis(200),
        ..pipeline::listener_config(&db.url, &config.runtime)
    };
    let pipeline = Pipeline::start_with(listener, config.observers, config.runtime)
        .await
        .unwrap();
    let status = pipeline.status();
    (pipeline, status)
}

/// Insert or update item `n` (of a few entities) through the capture trigger.
async fn write(client: &Client, item: i32, version: i32) {
    client
        .execute(
            "INSERT INTO tb_item (pk_item, version, fk_customer_org)
             VALUES ($1, $2, '11111111-1111-1111-1111-111111111111')
             ON CONFLICT (pk_item) DO UPDATE SET version = EXCLUDED.version",
            &[&item, &version],
        )
        .await
        .unwrap();
}

/// The versions each item was delivered with, first deliveries only, in arrival order.
fn first_deliveries(receiver: &Receiver) -> HashMap<String, Vec<i64>> {
    let mut seen = std::collections::HashSet::new();
    let mut by_item: HashMap<String, Vec<i64>> = HashMap::new();
    for hook in receiver.accepted_on("/items") {
        if seen.insert(hook.id()) {
            by_item
                .entry(hook.entity())
                .or_default()
                .push(hook.body["data"]["after"]["version"].as_i64().unwrap());
        }
    }
    by_item
}

#[tokio::test]
async fn test_graceful_degradation() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE tb_item (
                 pk_item INTEGER PRIMARY KEY,
                 id UUID DEFAULT gen_random_uuid() UNIQUE NOT NULL,
                 version INTEGER NOT NULL,
                 fk_customer_org UUID NOT NULL);
             SELECT core.observer_enable_capture('tb_item', 'Item', 'fk_customer_org');",
        )
        .await
        .unwrap();
    let receiver = Receiver::start().await;
    let (pipeline, status) = start(&db, &receiver).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let engine = tokio::spawn(pipeline.run(async {
        let _ = stopped.await;
    }));

    let items = 5;
    for version in 1..=4 {
        for item in 1..=items {
            write(&client, item, version).await;
        }
    }
    eventually(
        Duration::from_secs(20),
        "the first changes to arrive",
        || {
            let n = first_deliveries(&receiver)
                .values()
                .map(Vec::len)
                .sum::<usize>();
            async move { (n == 20).then_some(()) }
        },
    )
    .await;

    // The database turns the engine away: new connections refused, its own ones cut. The
    // writer's connection stays, so changes keep being committed meanwhile.
    let admin = connect(&crate::support::admin_url()).await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS false",
            db.name
        ))
        .await
        .unwrap();
    admin
        .batch_execute(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = '{}' AND application_name LIKE 'fraiseql-observers%'",
            db.name
        ))
        .await
        .unwrap();
    for version in 5..=8 {
        for item in 1..=items {
            write(&client, item, version).await;
        }
    }
    eventually(
        Duration::from_secs(20),
        "the engine to report its listener unhealthy",
        || {
            let unhealthy = !status.listener_healthy.load(Ordering::Relaxed);
            async move { unhealthy.then_some(()) }
        },
    )
    .await;
    assert!(
        !engine.is_finished(),
        "the engine keeps running while the database is away"
    );
    let during = first_deliveries(&receiver)
        .values()
        .map(Vec::len)
        .sum::<usize>();
    assert_eq!(during, 20, "nothing can be read while the database is away");

    // Back: every change committed during the outage is delivered, in order per item.
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS true",
            db.name
        ))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the outage's changes to arrive",
        || {
            let n = first_deliveries(&receiver)
                .values()
                .map(Vec::len)
                .sum::<usize>();
            async move { (n == 40).then_some(()) }
        },
    )
    .await;
    let delivered = first_deliveries(&receiver);
    assert_eq!(delivered.len(), items as usize);
    for versions in delivered.values() {
        assert_eq!(
            versions,
            &(1..=8).collect::<Vec<i64>>(),
            "in commit order per item"
        );
    }
    eventually(
        Duration::from_secs(20),
        "the listener to be healthy again",
        || {
            let healthy = status.listener_healthy.load(Ordering::Relaxed);
            async move { healthy.then_some(()) }
        },
    )
    .await;

    // A graceful stop saves the place: a restarted engine sends nothing again.
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(15), engine)
        .await
        .expect("the engine stops")
        .unwrap()
        .expect("the engine ran without error");
    let before = receiver.hooks().len();
    let (pipeline, _) = start(&db, &receiver).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let engine = tokio::spawn(pipeline.run(async {
        let _ = stopped.await;
    }));
    write(&client, 1, 9).await;
    eventually(Duration::from_secs(20), "the next change to arrive", || {
        let got = receiver
            .accepted_on("/items")
            .last()
            .map(|h| h.body["data"]["after"]["version"].as_i64());
        async move { (got == Some(Some(9))).then_some(()) }
    })
    .await;
    assert_eq!(
        receiver.hooks().len(),
        before + 1,
        "only the new change was sent"
    );
    let _ = stop.send(());
    engine.await.unwrap().unwrap();
}
