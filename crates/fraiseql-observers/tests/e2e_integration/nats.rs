//! The nats action against the real nats-server with JetStream on 127.0.0.1:4222: what arrives is
//! read back from the stream itself. Each test uses its own stream and subjects (random names)
//! and deletes the stream it made.

use std::time::Duration;

use async_nats::jetstream::{self, stream::Config as StreamConfig};
use fraiseql_observers::actions::{Action, FailureKind};
use fraiseql_observers::config;
use fraiseql_observers::delivery::delivery_id;
use fraiseql_observers::pipeline::{self, Pipeline};
use fraiseql_observers::testing::{eventually, TestDb};
use fraiseql_observers::EventKind;
use serde_json::{json, Value};
use tokio_postgres::Client;

use crate::sample::{compile, env_of, order_event, run};

const NATS_URL: &str = "nats://127.0.0.1:4222";

/// A fresh stream name and subject prefix for one test.
fn names() -> (String, String) {
    let n = rand::random::<u32>();
    (format!("FO_TEST_{n}"), format!("fo-test-{n}"))
}

async fn js() -> jetstream::Context {
    let client = async_nats::connect(NATS_URL)
        .await
        .expect("nats-server on 127.0.0.1:4222");
    jetstream::new(client)
}

async fn create_stream(js: &jetstream::Context, name: &str, prefix: &str) {
    js.create_stream(StreamConfig {
        name: name.to_string(),
        subjects: vec![format!("{prefix}.>")],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn message_count(js: &jetstream::Context, name: &str) -> u64 {
    js.get_stream(name)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

fn header(message: &jetstream::message::StreamMessage, name: &str) -> String {
    message
        .headers
        .get(name)
        .unwrap_or_else(|| panic!("header {name}"))
        .as_str()
        .to_string()
}

fn nats_action(fields: &str) -> Action {
    compile(
        &format!("type = \"nats\"\nurl = \"{NATS_URL}\"\n{fields}"),
        &env_of(&[]),
        None,
        None,
    )
    .unwrap_or_else(|e| panic!("{e:?}"))
}

const RUNTIME: &str = r#"
[observers.runtime]
consumer_id = "nats-test"
start_position = "beginning"
poll_interval_ms = 20
checkpoint_interval_ms = 50
retry_poll_interval_ms = 50
shutdown_timeout_ms = 5000
"#;

async fn schema(db: &TestDb) -> Client {
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE tb_order (
                 pk_order INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 id UUID DEFAULT gen_random_uuid() UNIQUE NOT NULL,
                 status TEXT NOT NULL, total NUMERIC(12,2) NOT NULL,
                 fk_customer_org UUID NOT NULL);
             SELECT core.observer_enable_capture('tb_order', 'Order', 'fk_customer_org');",
        )
        .await
        .unwrap();
    client
}

/// Start the pipeline for `observers` (TOML after the runtime section); returns its stop
/// switch and its task.
async fn start(
    db: &TestDb,
    observers: &str,
) -> fraiseql_observers::Result<(
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<fraiseql_observers::Result<()>>,
)> {
    start_as(db, "nats-test", observers).await
}

/// [`start`] under another consumer id (a consumer with no checkpoint replays the whole log).
async fn start_as(
    db: &TestDb,
    consumer: &str,
    observers: &str,
) -> fraiseql_observers::Result<(
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<fraiseql_observers::Result<()>>,
)> {
    let runtime = RUNTIME.replace("\"nats-test\"", &format!("\"{consumer}\""));
    let config = config::load(&format!("{runtime}\n{observers}"), &env_of(&[]))
        .unwrap_or_else(|e| panic!("{e}"));
    let listener = fraiseql_observers::ListenerConfig {
        min_poll_interval: Duration::from_millis(2),
        ..pipeline::listener_config(&db.url, &config.runtime)
    };
    let pipeline = Pipeline::start_with(listener, config.observers, config.runtime).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(pipeline.run(async {
        let _ = stopped.await;
    }));
    Ok((stop, handle))
}

#[tokio::test]
async fn changes_arrive_in_the_stream_with_subjects_headers_and_bodies_in_order() {
    let (stream, prefix) = names();
    let db = TestDb::new().await;
    let client = schema(&db).await;
    // The pipeline creates the stream (`stream = { ... }`).
    let observers = format!(
        r#"
[observers.orders]
entity = "Order"
event_type = ["INSERT", "UPDATE"]

[[observers.orders.actions]]
type = "nats"
url = "{NATS_URL}"
subject = "{prefix}.{{{{ event.entity_type }}}}.{{{{ event.kind }}}}"
stream = {{ name = "{stream}", subjects = ["{prefix}.>"], storage = "memory", duplicate_window = "2m" }}
"#
    );
    let (stop, engine) = start(&db, &observers).await.unwrap();
    let id: uuid::Uuid = client
        .query_one(
            "INSERT INTO tb_order (status, total, fk_customer_org) VALUES ('new', 10, gen_random_uuid()) RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    for status in ["paid", "shipped"] {
        client
            .execute(
                "UPDATE tb_order SET status = $1 WHERE id = $2",
                &[&status, &id],
            )
            .await
            .unwrap();
    }
    let js = js().await;
    eventually(
        Duration::from_secs(20),
        "three messages in the stream",
        || {
            let js = js.clone();
            let stream = stream.clone();
            async move { (message_count(&js, &stream).await == 3).then_some(()) }
        },
    )
    .await;
    let _ = stop.send(());
    engine.await.unwrap().unwrap();

    let handle = js.get_stream(&stream).await.unwrap();
    let mut statuses = Vec::new();
    for sequence in 1..=3 {
        let message = handle.get_raw_message(sequence).await.unwrap();
        let body: Value = serde_json::from_slice(&message.payload).unwrap();
        let kind = if sequence == 1 { "INSERT" } else { "UPDATE" };
        assert_eq!(message.subject.as_str(), format!("{prefix}.Order.{kind}"));
        assert_eq!(body["data"]["entity_id"], id.to_string());
        assert_eq!(
            body["type"],
            if sequence == 1 {
                "order.created"
            } else {
                "order.updated"
            }
        );
        let event_id: uuid::Uuid = body["data"]["id"].as_str().unwrap().parse().unwrap();
        let expected = delivery_id(event_id, "orders", 0);
        assert_eq!(header(&message, "Nats-Msg-Id"), expected);
        assert_eq!(header(&message, "webhook-id"), expected);
        assert_eq!(
            header(&message, "event-type"),
            body["type"].as_str().unwrap()
        );
        assert_eq!(header(&message, "content-type"), "application/json");
        statuses.push(
            body["data"]["after"]["status"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    // One entity's changes are published in commit order.
    assert_eq!(statuses, ["new", "paid", "shipped"]);

    // A replay (what a crash before the checkpoint causes; here a consumer with no checkpoint
    // reading the whole log again) publishes the same delivery ids: the stream drops them. One
    // new change of the same entity comes after the replayed ones (one entity's deliveries run
    // in order), so once it is in, the replay is done.
    let (stop, engine) = start_as(&db, "nats-test-replay", &observers).await.unwrap();
    client
        .execute(
            "UPDATE tb_order SET status = 'returned' WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "the new change in the stream",
        || {
            let js = js.clone();
            let stream = stream.clone();
            async move { (message_count(&js, &stream).await >= 4).then_some(()) }
        },
    )
    .await;
    let _ = stop.send(());
    engine.await.unwrap().unwrap();
    assert_eq!(
        message_count(&js, &stream).await,
        4,
        "the replay was dropped"
    );
    let last = handle.get_raw_message(4).await.unwrap();
    let body: Value = serde_json::from_slice(&last.payload).unwrap();
    assert_eq!(body["data"]["after"]["status"], "returned");
    js.delete_stream(&stream).await.unwrap();
}

#[tokio::test]
async fn a_republish_of_the_same_delivery_is_dropped_by_the_streams_dedup_window() {
    let (stream, prefix) = names();
    let js = js().await;
    create_stream(&js, &stream, &prefix).await;
    let action = nats_action(&format!(
        r#"subject = "{prefix}.orders.{{{{ data.id }}}}"
           body_template = '{{"id": {{{{ data.id }}}}, "status": {{{{ after.status }}}}}}'"#
    ));
    action.prepare().await.unwrap();
    let event = order_event(
        EventKind::Updated,
        Some(json!({"id": 7, "status": "new"})),
        Some(json!({"id": 7, "status": "paid"})),
    );
    run(&action, &event, 1).await.unwrap();
    // The same delivery again (a retry after a lost PubAck, a replay after a crash): acknowledged,
    // and not stored twice.
    run(&action, &event, 2).await.unwrap();
    assert_eq!(message_count(&js, &stream).await, 1);
    // Another event is another delivery.
    let mut other = order_event(
        EventKind::Updated,
        None,
        Some(json!({"id": 7, "status": "x"})),
    );
    other.id = uuid::Uuid::new_v4();
    run(&action, &other, 1).await.unwrap();
    assert_eq!(message_count(&js, &stream).await, 2);
    let first = js
        .get_stream(&stream)
        .await
        .unwrap()
        .get_raw_message(1)
        .await
        .unwrap();
    assert_eq!(first.subject.as_str(), format!("{prefix}.orders.7"));
    let body: Value = serde_json::from_slice(&first.payload).unwrap();
    assert_eq!(body, json!({"id": 7, "status": "paid"}));
    js.delete_stream(&stream).await.unwrap();
}

#[tokio::test]
async fn a_missing_stream_stops_the_start_with_an_error_naming_subject_and_stream() {
    let (stream, prefix) = names();
    let db = TestDb::new().await;
    schema(&db).await;
    let observers = |stream_key: &str| {
        format!(
            r#"
[observers.orders]
entity = "Order"
event_type = "INSERT"

[[observers.orders.actions]]
type = "nats"
url = "{NATS_URL}"
subject = "{prefix}.{{{{ event.entity_type }}}}"
{stream_key}
"#
        )
    };
    let error = start(&db, &observers("")).await.expect_err("no stream");
    let message = error.to_string();
    assert!(
        message.contains("observers.orders.actions[0]")
            && message.contains(&format!(
                "no JetStream stream captures subject '{prefix}.*'"
            )),
        "{message}"
    );
    let error = start(
        &db,
        &observers(&format!("stream = {{ name = \"{stream}\" }}")),
    )
    .await
    .expect_err("no such stream");
    assert!(
        error
            .to_string()
            .contains(&format!("stream '{stream}' does not exist")),
        "{error}"
    );
    // A stream that exists but captures other subjects is refused too.
    let js = js().await;
    create_stream(&js, &stream, &format!("{prefix}-other")).await;
    let error = start(
        &db,
        &observers(&format!("stream = {{ name = \"{stream}\" }}")),
    )
    .await
    .expect_err("the stream does not capture the subject");
    assert!(
        error.to_string().contains("does not capture subject"),
        "{error}"
    );
    js.delete_stream(&stream).await.unwrap();
}

#[tokio::test]
async fn a_publish_no_stream_takes_is_retried_through_the_retry_queue() {
    let (stream, prefix) = names();
    let js = js().await;

    // One attempt: no stream for the subject is a transient failure.
    let action = nats_action(&format!(r#"subject = "{prefix}.direct""#));
    let event = order_event(EventKind::Created, None, Some(json!({"id": 1})));
    let error = run(&action, &event, 1).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::Transient, "{error}");
    assert!(
        error.message().contains(&format!("{prefix}.direct")),
        "{error}"
    );

    // Through the engine: the stream disappears after the start; the delivery waits in the
    // retry queue and arrives once the stream is back.
    create_stream(&js, &stream, &prefix).await;
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let (stop, engine) = start(
        &db,
        &format!(
            r#"
[observers.orders]
entity = "Order"
event_type = "INSERT"
retry = {{ max_attempts = 50, initial_delay_ms = 300, max_delay_ms = 300, jitter = false }}

[[observers.orders.actions]]
type = "nats"
url = "{NATS_URL}"
subject = "{prefix}.{{{{ event.entity_type }}}}"
timeout_ms = 2000
"#
        ),
    )
    .await
    .unwrap();
    js.delete_stream(&stream).await.unwrap();
    client
        .execute(
            "INSERT INTO tb_order (status, total, fk_customer_org) VALUES ('new', 10, gen_random_uuid())",
            &[],
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "a failed attempt in the retry queue",
        || {
            let client = &client;
            async move {
                let n: i64 = client
                    .query_one(
                        "SELECT count(*) FROM core.observer_retry_queue WHERE attempts >= 1",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                (n == 1).then_some(())
            }
        },
    )
    .await;
    create_stream(&js, &stream, &prefix).await;
    eventually(
        Duration::from_secs(20),
        "the retried message in the stream",
        || {
            let js = js.clone();
            let stream = stream.clone();
            async move { (message_count(&js, &stream).await == 1).then_some(()) }
        },
    )
    .await;
    eventually(Duration::from_secs(10), "an empty retry queue", || {
        let client = &client;
        async move {
            let n: i64 = client
                .query_one("SELECT count(*) FROM core.observer_retry_queue", &[])
                .await
                .unwrap()
                .get(0);
            (n == 0).then_some(())
        }
    })
    .await;
    let _ = stop.send(());
    engine.await.unwrap().unwrap();
    js.delete_stream(&stream).await.unwrap();
}

#[tokio::test]
async fn a_nack_and_a_missing_puback_are_retryable() {
    let (stream, prefix) = names();
    let js = js().await;
    // A stream that takes one message and refuses the next (discard new).
    js.create_stream(StreamConfig {
        name: stream.clone(),
        subjects: vec![format!("{prefix}.full")],
        max_messages: 1,
        discard: jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .unwrap();
    let action = nats_action(&format!(r#"subject = "{prefix}.full""#));
    action.prepare().await.unwrap();
    let first = order_event(EventKind::Created, None, Some(json!({"id": 1})));
    run(&action, &first, 1).await.unwrap();
    let mut second = first.clone();
    second.id = uuid::Uuid::new_v4();
    let error = run(&action, &second, 1).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::Transient, "{error}");
    assert!(error.message().contains("maximum messages"), "{error}");
    assert_eq!(message_count(&js, &stream).await, 1);

    // Something answers on the subject but never acknowledges (a plain subscriber, not a
    // stream): the PubAck never comes, and the attempt fails retryably after `timeout_ms`.
    let client = async_nats::connect(NATS_URL).await.unwrap();
    let _silent = client.subscribe(format!("{prefix}.silent")).await.unwrap();
    client.flush().await.unwrap();
    let action = nats_action(&format!(
        r#"subject = "{prefix}.silent"
           timeout_ms = 300"#
    ));
    let error = run(&action, &first, 1).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::Transient, "{error}");
    assert!(error.message().contains("timed out"), "{error}");
    js.delete_stream(&stream).await.unwrap();
}

/// A nats-server of the test's own (JetStream in its own store directory) on a free port, with
/// `args` (authentication, TLS); killed and its directory removed on drop.
pub(crate) struct OwnNats {
    child: tokio::process::Child,
    dir: std::path::PathBuf,
    pub(crate) port: u16,
}

impl OwnNats {
    pub(crate) async fn start(dir: std::path::PathBuf, args: &[&str]) -> OwnNats {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::create_dir_all(&dir).unwrap();
        let child = tokio::process::Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.join("store"))
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("nats-server on the PATH");
        eventually(
            Duration::from_secs(10),
            "the test's nats-server",
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
        OwnNats { child, dir, port }
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fresh store directory for an [`OwnNats`].
pub(crate) fn own_store_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("fo-test-nats-{}", rand::random::<u64>()))
}

#[tokio::test]
async fn a_token_from_the_environment_authenticates_and_a_wrong_one_is_permanent() {
    let server = OwnNats::start(own_store_dir(), &["--auth", "s3cret-token"]).await;
    let url = format!("nats://127.0.0.1:{}", server.port);
    let (stream, prefix) = names();
    let fields = format!(
        r#"type = "nats"
           url = "{}"
           subject = "{prefix}.orders"
           token_env = "NATS_TOKEN"
           stream = {{ name = "{stream}", subjects = ["{prefix}.>"] }}"#,
        url
    );
    let right = env_of(&[("NATS_TOKEN", "s3cret-token")]);
    let action = compile(&fields, &right, None, None).unwrap();
    action.prepare().await.unwrap();
    let event = order_event(EventKind::Created, None, Some(json!({"id": 1})));
    run(&action, &event, 1).await.unwrap();
    let client = async_nats::ConnectOptions::with_token("s3cret-token".into())
        .connect(url.as_str())
        .await
        .unwrap();
    let js = jetstream::new(client);
    assert_eq!(message_count(&js, &stream).await, 1);

    let wrong = env_of(&[("NATS_TOKEN", "not-the-token")]);
    let action = compile(&fields, &wrong, None, None).unwrap();
    let error = action.prepare().await.unwrap_err();
    assert_eq!(error.kind, FailureKind::Permanent, "{error}");
    assert!(
        !error.message().contains("not-the-token"),
        "no secret in messages: {error}"
    );
}
