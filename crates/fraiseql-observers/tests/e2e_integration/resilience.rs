//! The engine through failures of its own database: it keeps its place, waits, and recovers;
//! the change log is the buffer.

use crate::items::{first_deliveries, schema, write};
use fraiseql_observers::delivery::stored::{self, json_depth};
use fraiseql_observers::delivery::{
    dead_letter, delivery_id, entity_key, retry_queue, DeliveryItem,
};
use fraiseql_observers::leader;
use fraiseql_observers::listener::checkpoint;
use fraiseql_observers::listener::ChangeLogListener;
use fraiseql_observers::pipeline::{self, Pipeline};
use fraiseql_observers::testing::{connect, eventually, order_event, TestDb};
use fraiseql_observers::testing::{Answer, Cluster, Request, TestServer};
use fraiseql_observers::{config, Error, EventKind, ListenerConfig, Operator, StartPosition};
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn env(name: &str) -> Option<String> {
    (name == "HOOK_SECRET").then(|| SECRET.to_string())
}

fn observers(receiver: &TestServer) -> String {
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
    receiver: &TestServer,
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

/// First deliveries per item at the receiver's `/items`.
fn delivered(receiver: &TestServer) -> std::collections::HashMap<String, Vec<i64>> {
    first_deliveries(&receiver.accepted_on("/items"))
}

#[tokio::test]
async fn test_graceful_degradation() {
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let receiver = TestServer::start().await;
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
            let n = delivered(&receiver).values().map(Vec::len).sum::<usize>();
            async move { (n == 20).then_some(()) }
        },
    )
    .await;

    // The database turns the engine away: new connections refused, its own ones cut. The
    // writer's connection stays, so changes keep being committed meanwhile.
    let admin = connect(&fraiseql_observers::testing::admin_url()).await;
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
    let during = delivered(&receiver).values().map(Vec::len).sum::<usize>();
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
            let n = delivered(&receiver).values().map(Vec::len).sum::<usize>();
            async move { (n == 40).then_some(()) }
        },
    )
    .await;
    let delivered = delivered(&receiver);
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
    let before = receiver.answered().len();
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
            .map(|h| h.json()["data"]["after"]["version"].as_i64());
        async move { (got == Some(Some(9))).then_some(()) }
    })
    .await;
    assert_eq!(
        receiver.answered().len(),
        before + 1,
        "only the new change was sent"
    );
    let _ = stop.send(());
    engine.await.unwrap().unwrap();
}

/// A running engine from a whole configuration (runtime section included); stopped by sending
/// on the returned channel.
async fn run_engine(
    db: &TestDb,
    toml: &str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<fraiseql_observers::Result<()>>,
) {
    let config = config::load(toml, &env).unwrap_or_else(|e| panic!("{e}"));
    let listener = ListenerConfig {
        min_poll_interval: Duration::from_millis(2),
        retry_initial_delay: Duration::from_millis(20),
        retry_max_delay: Duration::from_millis(200),
        ..pipeline::listener_config(&db.url, &config.runtime)
    };
    let pipeline = Pipeline::start_with(listener, config.observers, config.runtime)
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let engine = tokio::spawn(pipeline.run(async {
        let _ = stopped.await;
    }));
    (stop, engine)
}

/// A JSON value nesting `levels` objects.
fn nested(levels: usize) -> serde_json::Value {
    (0..levels).fold(
        serde_json::json!("bottom"),
        |inner, _| serde_json::json!({ "k": inner }),
    )
}

/// The deepest row the parser decodes goes through the retry queue and the dead letter queue
/// and is delivered from both: the stored event (one level deeper than the row, as `changes`
/// holds `{field, old, new}`) reads back.
#[tokio::test]
async fn the_deepest_decodable_row_round_trips_through_the_retry_queue_and_the_dlq() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE tb_doc (pk_doc INTEGER PRIMARY KEY,
                 id UUID DEFAULT gen_random_uuid() UNIQUE NOT NULL,
                 doc JSONB NOT NULL, fk_customer_org UUID NOT NULL);
             SELECT core.observer_enable_capture('tb_doc', 'Doc', 'fk_customer_org');",
        )
        .await
        .unwrap();
    // /retry fails once, then accepts; /dlq fails until told otherwise.
    let dlq_failing = Arc::new(AtomicBool::new(true));
    let retry_calls = Arc::new(AtomicUsize::new(0));
    let receiver = {
        let (dlq_failing, retry_calls) = (dlq_failing.clone(), retry_calls.clone());
        TestServer::with(move |r: &Request| match r.path() {
            "/retry" if retry_calls.fetch_add(1, Ordering::SeqCst) == 0 => Answer::status(503),
            "/dlq" if dlq_failing.load(Ordering::SeqCst) => Answer::status(503),
            _ => Answer::status(200),
        })
        .await
    };
    let toml = format!(
        r#"
[observers.runtime]
consumer_id = "deep"
start_position = "beginning"
poll_interval_ms = 20
checkpoint_interval_ms = 50
retry_poll_interval_ms = 50

[observers.deep_retry]
entity = "Doc"
event_type = "INSERT"
retry = {{ max_attempts = 3, initial_delay_ms = 300, max_delay_ms = 300, backoff_strategy = "fixed", jitter = false }}
[[observers.deep_retry.actions]]
type = "webhook"
url = "{}"
allow_private_networks = true

[observers.deep_dlq]
entity = "Doc"
event_type = "INSERT"
retry = {{ max_attempts = 2, initial_delay_ms = 300, max_delay_ms = 300, backoff_strategy = "fixed", jitter = false }}
[[observers.deep_dlq.actions]]
type = "webhook"
url = "{}"
allow_private_networks = true
"#,
        receiver.url("/retry"),
        receiver.url("/dlq")
    );
    let doc = nested(125);
    client
        .execute(
            "INSERT INTO tb_doc VALUES (1, DEFAULT, $1, '11111111-1111-1111-1111-111111111111')",
            &[&doc],
        )
        .await
        .unwrap();
    // The premise: the row nests as deep as the parser decodes.
    let row_depth = json_depth(
        &client
            .query_one(
                "SELECT object_data::text FROM core.tb_entity_change_log",
                &[],
            )
            .await
            .unwrap()
            .get::<_, String>(0),
    );
    assert_eq!(row_depth, stored::DECODE_DEPTH);

    let (stop, engine) = run_engine(&db, &toml).await;
    eventually(
        Duration::from_secs(20),
        "the retried delivery to arrive",
        || {
            let n = receiver.accepted_on("/retry").len();
            async move { (n == 1).then_some(()) }
        },
    )
    .await;
    let dead = eventually(Duration::from_secs(20), "an exhausted dead letter", || {
        let client = &client;
        async move {
            dead_letter::list(client, Some("deep"), Some("pending"), 10)
                .await
                .unwrap()
                .pop()
        }
    })
    .await;
    assert!(!engine.is_finished(), "the engine runs on");
    assert_eq!(dead.reason, "exhausted");
    assert_eq!(dead.event.after.as_ref().unwrap()["doc"], doc);
    let shown = dead_letter::get(&client, dead.id).await.unwrap().unwrap();
    assert_eq!(shown.event.changes_owned(), dead.event.changes_owned());

    // An operator retry reads it back and delivers it.
    dlq_failing.store(false, Ordering::SeqCst);
    let config = config::load(&toml, &env).unwrap();
    let operator = Operator::new(&db.url, "deep", config.observers)
        .await
        .unwrap();
    let outcome = operator.retry_dead_letter(dead.id).await.unwrap();
    assert!(matches!(outcome, Some(Ok(()))), "{outcome:?}");
    let accepted = receiver.accepted_on("/dlq");
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].id(), dead.delivery_id);

    let _ = stop.send(());
    engine.await.unwrap().expect("the engine ran without error");
}

/// A queued retry whose action left the configuration (the observer now has fewer actions) is
/// dead-lettered, and the entity parked behind it runs freely again: its next change is
/// delivered at once, not parked behind nothing until a restart.
#[tokio::test]
async fn a_retry_whose_action_left_the_configuration_unparks_its_entity() {
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let receiver = TestServer::start().await;
    let consumer = "unpark";
    let (_, epoch) = checkpoint::claim(&client, consumer, StartPosition::Now)
        .await
        .unwrap();
    let entity = Uuid::new_v4();
    let mut event = order_event(EventKind::Created, None, Some(json!({"version": 0})));
    event.entity_type = "Item".into();
    event.entity_id = entity;
    event.sequence = 0;
    // Action 1 of `item_changed`, which now has only action 0.
    let (key, id) = (entity_key(&event), delivery_id(event.id, "item_changed", 1));
    let orphan = DeliveryItem {
        observer: "item_changed",
        action_index: 1,
        action_type: "webhook",
        entity_key: &key,
        ordered: true,
        event: &event,
        delivery_id: &id,
    };
    retry_queue::enqueue(
        &client,
        consumer,
        epoch,
        &orphan,
        1,
        5,
        Duration::ZERO,
        Some("HTTP 503"),
    )
    .await
    .unwrap();

    // Retries are looked for at start, then not for an hour: a change parked behind the orphan
    // would wait that long.
    let toml = format!(
        r#"
[observers.runtime]
consumer_id = "{consumer}"
poll_interval_ms = 20
checkpoint_interval_ms = 50
retry_poll_interval_ms = 3600000

[observers.item_changed]
entity = "Item"
event_type = ["INSERT", "UPDATE"]
[[observers.item_changed.actions]]
type = "webhook"
url = "{}"
allow_private_networks = true
"#,
        receiver.url("/items")
    );
    let (stop, engine) = run_engine(&db, &toml).await;
    let dead = eventually(Duration::from_secs(20), "the orphan dead-lettered", || {
        let client = &client;
        async move {
            dead_letter::list(client, Some(consumer), Some("pending"), 10)
                .await
                .unwrap()
                .pop()
        }
    })
    .await;
    assert_eq!(dead.delivery_id, id);
    assert!(
        dead.last_error.contains("has no action 1"),
        "{}",
        dead.last_error
    );
    assert_eq!(retry_queue::len(&client, consumer).await.unwrap(), 0);

    client
        .execute(
            "INSERT INTO tb_item (pk_item, id, version, fk_customer_org)
             VALUES (1, $1, 1, '11111111-1111-1111-1111-111111111111')",
            &[&entity],
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "the entity's next change delivered, not parked",
        || {
            let n = receiver.accepted_on("/items").len();
            async move { (n == 1).then_some(()) }
        },
    )
    .await;
    assert_eq!(retry_queue::len(&client, consumer).await.unwrap(), 0);
    let _ = stop.send(());
    engine.await.unwrap().expect("the engine ran without error");
}

/// The reader loses its connection and, reconnecting, reaches another server (here the URL's
/// second host, another cluster, because the first one refuses): it reads nothing there and
/// ends the lead with `ServerChanged`, which is contended again with the start-up checks.
#[tokio::test]
async fn a_reader_that_reconnects_to_another_server_ends_the_lead() {
    let db = TestDb::new().await;
    let other = Cluster::start();
    connect(&other.url("postgres"))
        .await
        .batch_execute(&format!("CREATE DATABASE {}", db.name))
        .await
        .unwrap();
    let mut client = connect(&other.url(&db.name)).await;
    fraiseql_observers::migrate::run(&mut client).await.unwrap();

    let here = db.config();
    let port = here.get_ports().first().copied().unwrap_or(5432);
    let url = format!(
        "postgres://postgres@127.0.0.1:{port},127.0.0.1:{}/{}",
        other.port, db.name
    );
    let mut listener = ChangeLogListener::start(ListenerConfig {
        database_url: url,
        consumer_id: "moved".into(),
        start: StartPosition::Beginning,
        poll_interval: Duration::from_millis(20),
        min_poll_interval: Duration::from_millis(2),
        retry_initial_delay: Duration::from_millis(10),
        retry_max_delay: Duration::from_millis(100),
        ..ListenerConfig::default()
    })
    .await
    .unwrap();

    // The first server turns the reader away: its reconnect reaches the other one.
    let admin = connect(&fraiseql_observers::testing::admin_url()).await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {name} ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = '{name}' AND application_name LIKE 'fraiseql-observers-listener%'",
            name = db.name
        ))
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(30), listener.next_batch())
        .await
        .expect("the reader notices it reached another server");
    match ended {
        Err(Error::ServerChanged { consumer, .. }) => assert_eq!(consumer, "moved"),
        Err(e) => panic!("expected ServerChanged, got {e}"),
        Ok(_) => panic!("expected ServerChanged, got a batch or a stop"),
    }
}

/// What refuses a transaction-pooling proxy (PgBouncer `pool_mode = transaction`): the leader
/// lock must be held by the session the lock connection's statements run on, checked right
/// after it is granted and at every heartbeat. Behind such a proxy, one client's consecutive
/// transactions run on different server sessions; here two sessions stand in for them.
#[tokio::test]
async fn the_leader_lock_must_be_held_by_the_session_its_connection_runs_on() {
    let db = TestDb::new().await;
    let (session, next_session) = (db.client().await, db.client().await);
    assert!(leader::try_lock(&session, "pooled").await.unwrap());
    assert!(leader::holds_lock(&session, "pooled").await.unwrap());
    assert!(
        !leader::holds_lock(&next_session, "pooled").await.unwrap(),
        "a statement that runs on another session does not find the lock"
    );
    assert!(!leader::holds_lock(&session, "other").await.unwrap());
    leader::unlock(&session, "pooled").await.unwrap();
    assert!(!leader::holds_lock(&session, "pooled").await.unwrap());

    // A lead taken on a session of its own passes the check.
    let lead = leader::Leadership::acquire(&db.url, "pooled", || {})
        .await
        .unwrap();
    assert!(!lead.is_lost());
}
