//! The observer engine end to end: real PostgreSQL (capture trigger -> change log -> listener),
//! the executor with its lanes, retry queue and dead letters, and real local HTTP receivers.

use fraiseql_observers::config::{self, RuntimeConfig};
use fraiseql_observers::delivery::dead_letter;
use fraiseql_observers::pipeline::{self, EngineStatus, Pipeline};
use fraiseql_observers::testing::{eventually, TestDb};
use fraiseql_observers::testing::{Request, TestServer};
use fraiseql_observers::Operator;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::Client;
use uuid::Uuid;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const TENANT_A: &str = "aaaaaaaa-0000-0000-0000-000000000001";
const TENANT_B: &str = "bbbbbbbb-0000-0000-0000-000000000002";

fn env(name: &str) -> Option<String> {
    (name == "HOOK_SECRET").then(|| SECRET.to_string())
}

/// The runtime section every test starts from: fast polls, fast checkpoints, from the beginning.
const RUNTIME: &str = r#"
[observers.runtime]
consumer_id = "engine-test"
start_position = "beginning"
poll_interval_ms = 20
checkpoint_interval_ms = 50
retry_poll_interval_ms = 50
shutdown_timeout_ms = 5000
concurrency = 8
"#;

struct Engine {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<fraiseql_observers::Result<()>>,
    status: Arc<EngineStatus>,
}

impl Engine {
    async fn start(db: &TestDb, observers_toml: &str) -> Engine {
        let config = config::load(&format!("{RUNTIME}\n{observers_toml}"), &env)
            .unwrap_or_else(|e| panic!("{e}"));
        Engine::start_with(db, config.observers, config.runtime).await
    }

    async fn start_with(
        db: &TestDb,
        observers: Vec<fraiseql_observers::Observer>,
        runtime: RuntimeConfig,
    ) -> Engine {
        let listener = fraiseql_observers::ListenerConfig {
            min_poll_interval: Duration::from_millis(2),
            retry_initial_delay: Duration::from_millis(20),
            retry_max_delay: Duration::from_millis(200),
            ..pipeline::listener_config(&db.url, &runtime)
        };
        let pipeline = Pipeline::start_with(listener, observers, runtime)
            .await
            .unwrap();
        let status = pipeline.status();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(pipeline.run(async {
            let _ = stopped.await;
        }));
        Engine {
            stop: Some(stop),
            handle,
            status,
        }
    }

    /// Graceful stop; returns what `run` returned.
    async fn stop(mut self) -> fraiseql_observers::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(15), &mut self.handle)
            .await
            .expect("the engine stops within its shutdown timeout")
            .unwrap()
    }
}

async fn schema(db: &TestDb) -> Client {
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE tb_user (
                 pk_user INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 id UUID DEFAULT gen_random_uuid() UNIQUE NOT NULL,
                 email TEXT NOT NULL, name TEXT, password_hash TEXT,
                 fk_customer_org UUID NOT NULL);
             SELECT core.observer_enable_capture('tb_user', 'User', 'fk_customer_org', ARRAY['password_hash']);
             CREATE TABLE tb_order (
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

async fn insert_user(client: &Client, email: &str, tenant: &str) -> Uuid {
    client
        .query_one(
            "INSERT INTO tb_user (email, password_hash, fk_customer_org) VALUES ($1, 'secret-hash', $2::text::uuid) RETURNING id",
            &[&email, &tenant],
        )
        .await
        .unwrap()
        .get(0)
}

async fn insert_order(client: &Client, status: &str, total: f64) -> Uuid {
    client
        .query_one(
            "INSERT INTO tb_order (status, total, fk_customer_org) VALUES ($1, $2::float8::numeric, $3::text::uuid) RETURNING id",
            &[&status, &total, &TENANT_A],
        )
        .await
        .unwrap()
        .get(0)
}

async fn set_order(client: &Client, id: Uuid, status: &str) {
    client
        .execute(
            "UPDATE tb_order SET status = $1 WHERE id = $2",
            &[&status, &id],
        )
        .await
        .unwrap();
}

async fn wait_for(receiver: &TestServer, n: usize, what: &str) -> Vec<Request> {
    eventually(Duration::from_secs(20), what, || {
        let accepted = receiver.accepted();
        async move { (accepted.len() >= n).then_some(accepted) }
    })
    .await
}

/// Nothing more arrives for a little while.
async fn settle(receiver: &TestServer, expected: usize) {
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        receiver.accepted().len(),
        expected,
        "unexpected extra deliveries"
    );
}

fn webhook(
    receiver: &TestServer,
    name: &str,
    entity: &str,
    event_type: &str,
    path: &str,
) -> String {
    format!(
        r#"
[observers.{name}]
entity = "{entity}"
event_type = {event_type}

[[observers.{name}.actions]]
type = "webhook"
url = "{url}"
signing_secret_env = "HOOK_SECRET"
allow_private_networks = true
"#,
        url = receiver.url(path)
    )
}

#[tokio::test]
async fn test_e2e_insert_workflow() {
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let receiver = TestServer::start().await;
    let engine = Engine::start(
        &db,
        &webhook(&receiver, "user_created", "User", "\"INSERT\"", "/users"),
    )
    .await;

    let user = insert_user(&client, "ada@example.com", TENANT_A).await;
    let hooks = wait_for(&receiver, 1, "the webhook").await;
    let hook = &hooks[0];

    // The change-log row the trigger wrote is the event.
    let row = client
        .query_one(
            "SELECT pk_entity_change_log, id FROM core.tb_entity_change_log WHERE object_id = $1",
            &[&user],
        )
        .await
        .unwrap();
    let change_id: Uuid = row.get(0);
    assert_eq!(hook.json()["type"], "user.created");
    assert_eq!(hook.json()["data"]["id"], change_id.to_string());
    assert_eq!(hook.json()["data"]["sequence"], row.get::<_, i64>(1));
    assert_eq!(hook.json()["data"]["entity_id"], user.to_string());
    assert_eq!(hook.json()["data"]["tenant"], TENANT_A);
    assert_eq!(hook.json()["data"]["after"]["email"], "ada@example.com");
    assert!(
        hook.json()["data"]["after"].get("password_hash").is_none(),
        "excluded column leaked"
    );
    assert_eq!(
        hook.id(),
        fraiseql_observers::delivery::delivery_id(change_id, "user_created", 0)
    );

    // The signature verifies with an independent Standard Webhooks implementation.
    let verifier = standardwebhooks::Webhook::new(SECRET).unwrap();
    verifier
        .verify(&hook.body, &hook.headers)
        .expect("the signature verifies");
    engine.stop().await.unwrap();
}

#[tokio::test]
async fn test_e2e_multiple_observers() {
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let receiver = TestServer::start().await;
    let observers = [
        webhook(&receiver, "users", "User", "\"INSERT\"", "/users"),
        webhook(
            &receiver,
            "orders",
            "Order",
            "[\"INSERT\", \"UPDATE\"]",
            "/orders",
        ),
        webhook(&receiver, "deletes", "*", "\"DELETE\"", "/deletes"),
        webhook(
            &receiver,
            "all_orders",
            "Order",
            "[\"INSERT\", \"UPDATE\", \"DELETE\"]",
            "/all-orders",
        ),
    ]
    .join("\n");
    let engine = Engine::start(&db, &observers).await;

    let u = insert_user(&client, "a@example.com", TENANT_A).await;
    let o = insert_order(&client, "new", 10.0).await;
    set_order(&client, o, "paid").await;
    client
        .execute("DELETE FROM tb_order WHERE id = $1", &[&o])
        .await
        .unwrap();
    client
        .execute("DELETE FROM tb_user WHERE id = $1", &[&u])
        .await
        .unwrap();

    wait_for(&receiver, 8, "every observer's deliveries").await;
    settle(&receiver, 8).await;
    let types = |path: &str| -> Vec<String> {
        receiver
            .accepted_on(path)
            .iter()
            .map(|h| h.json()["type"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(types("/users"), ["user.created"]);
    assert_eq!(types("/orders"), ["order.created", "order.updated"]);
    let mut deletes = types("/deletes");
    deletes.sort();
    assert_eq!(deletes, ["order.deleted", "user.deleted"]);
    assert_eq!(
        types("/all-orders"),
        ["order.created", "order.updated", "order.deleted"]
    );
    engine.stop().await.unwrap();
}

#[tokio::test]
async fn test_e2e_condition_filtering() {
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let receiver = TestServer::start().await;
    let observers = format!(
        "{}condition = \"status == 'shipped' && total > 100\"\n{}condition = \"field_changed_to('status', 'paid')\"\n",
        webhook(&receiver, "big_shipped", "Order", "[\"INSERT\", \"UPDATE\"]", "/big")
            .replace("\n\n[[", "\n__C1__\n[["),
        webhook(&receiver, "paid", "Order", "\"UPDATE\"", "/paid").replace("\n\n[[", "\n__C2__\n[["),
    );
    // Put each condition inside its observer table (before its actions).
    let (c1, c2) = (
        "condition = \"status == 'shipped' && total > 100\"",
        "condition = \"field_changed_to('status', 'paid')\"",
    );
    let observers = observers
        .lines()
        .filter(|l| !l.starts_with("condition"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("__C1__", c1)
        .replace("__C2__", c2);
    let engine = Engine::start(&db, &observers).await;

    let small = insert_order(&client, "shipped", 50.0).await; // too small
    let big = insert_order(&client, "shipped", 100.01).await; // fires /big
    let pending = insert_order(&client, "pending", 500.0).await; // not shipped
    set_order(&client, pending, "paid").await; // fires /paid
    set_order(&client, pending, "paid").await; // no-op update: no change row at all
    set_order(&client, small, "paid").await; // fires /paid
    set_order(&client, big, "delivered").await; // neither

    wait_for(&receiver, 3, "the matching deliveries").await;
    settle(&receiver, 3).await;
    let big_hooks = receiver.accepted_on("/big");
    assert_eq!(big_hooks.len(), 1);
    assert_eq!(big_hooks[0].entity(), big.to_string());
    let paid: HashSet<String> = receiver
        .accepted_on("/paid")
        .iter()
        .map(Request::entity)
        .collect();
    assert_eq!(
        paid,
        HashSet::from([pending.to_string(), small.to_string()])
    );
    engine.stop().await.unwrap();
}

#[tokio::test]
async fn test_e2e_webhook_execution() {
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let receiver = TestServer::start().await;
    let observers = format!(
        r#"
[observers.custom]
entity = "User"
event_type = "INSERT"

[[observers.custom.actions]]
type = "webhook"
method = "PUT"
url = "{}"
headers = {{ "x-team" = "growth" }}
body_template = '{{"email": {{{{ after.email }}}}, "kind": {{{{ event.kind }}}}, "tenant": {{{{ event.tenant }}}}}}'
allow_private_networks = true
"#,
        receiver.url("/custom")
    );
    let engine = Engine::start(&db, &observers).await;
    insert_user(&client, "quote\"and\\slash@example.com", TENANT_B).await;
    let hooks = wait_for(&receiver, 1, "the custom webhook").await;
    assert_eq!(hooks[0].header("x-team"), "growth");
    assert_eq!(hooks[0].header("content-type"), "application/json");
    assert_eq!(
        hooks[0].json(),
        serde_json::json!({"email": "quote\"and\\slash@example.com", "kind": "INSERT", "tenant": TENANT_B})
    );
    assert!(
        hooks[0].header("webhook-signature").is_empty(),
        "no secret, no signature"
    );
    engine.stop().await.unwrap();
}

#[tokio::test]
async fn test_e2e_slack_execution() {
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let receiver = TestServer::start().await;
    let observers = format!(
        r##"
[observers.slack_orders]
entity = "Order"
event_type = "INSERT"

[[observers.slack_orders.actions]]
type = "slack"
webhook_url = "{}"
channel = "#orders"
message_template = "New order {{{{ data.status }}}} for {{{{ data.total }}}}"
allow_private_networks = true
"##,
        receiver.url("/slack")
    );
    let engine = Engine::start(&db, &observers).await;
    insert_order(&client, "new", 42.5).await;
    let hooks = wait_for(&receiver, 1, "the Slack message").await;
    assert_eq!(hooks[0].json()["channel"], "#orders");
    assert_eq!(hooks[0].json()["text"], "New order new for 42.5");
    engine.stop().await.unwrap();
}

fn with_retry(observer: String, name: &str, retry: &str) -> String {
    observer.replace(
        &format!("\n[[observers.{name}.actions]]"),
        &format!("retry = {retry}\n\n[[observers.{name}.actions]]"),
    )
}

#[tokio::test]
async fn test_e2e_failure_and_recovery() {
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let receiver = TestServer::start().await;
    receiver.respond(|_| (503, Duration::ZERO)); // down
    let observer = with_retry(
        webhook(&receiver, "users", "User", "\"INSERT\"", "/users"),
        "users",
        "{ max_attempts = 20, initial_delay_ms = 300, max_delay_ms = 300, backoff_strategy = \"fixed\", jitter = false }",
    );
    let engine = Engine::start(&db, &observer).await;
    insert_user(&client, "down@example.com", TENANT_A).await;

    // Failed attempts land in the durable retry queue, and the checkpoint still moves past it.
    eventually(Duration::from_secs(10), "a queued retry", || {
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
    })
    .await;
    eventually(
        Duration::from_secs(10),
        "at least two failed attempts",
        || {
            let n = receiver.answered().len();
            async move { (n >= 2).then_some(()) }
        },
    )
    .await;

    receiver.respond(|_| (200, Duration::ZERO)); // recovered
    let delivered = wait_for(&receiver, 1, "the delivery after recovery").await;
    let all = receiver.answered();
    assert!(
        all.iter().all(|h| h.id() == delivered[0].id()),
        "every attempt carries the same id"
    );
    settle(&receiver, 1).await;
    let left: i64 = client
        .query_one("SELECT count(*) FROM core.observer_retry_queue", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the queue is empty once delivered");
    engine.stop().await.unwrap();
}

#[tokio::test]
async fn test_e2e_multitenant_isolation() {
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let receiver = TestServer::start().await;
    let observer = webhook(&receiver, "tenant_a", "User", "\"INSERT\"", "/a").replace(
        "event_type = \"INSERT\"",
        &format!("event_type = \"INSERT\"\ntenant = \"{TENANT_A}\""),
    );
    let engine = Engine::start(&db, &observer).await;
    let a = insert_user(&client, "a@a.example", TENANT_A).await;
    insert_user(&client, "b@b.example", TENANT_B).await;
    // A payload that claims tenant A cannot cross over: the tenant is the row's column.
    client
        .execute(
            "SELECT core.log_mutation_event($1::text::uuid, NULL, 'User', gen_random_uuid(), 'INSERT', 'new',
                 NULL, jsonb_build_object('fk_customer_org', $2::text, 'email', 'forged@b.example'), 'tb_user')",
            &[&TENANT_B, &TENANT_A],
        )
        .await
        .unwrap();
    let hooks = wait_for(&receiver, 1, "tenant A's event").await;
    settle(&receiver, 1).await;
    assert_eq!(hooks[0].entity(), a.to_string());
    assert_eq!(hooks[0].json()["data"]["tenant"], TENANT_A);
    engine.stop().await.unwrap();
}

#[tokio::test]
async fn test_checkpoint_saved() {
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let receiver = TestServer::start().await;
    let observer = webhook(&receiver, "users", "User", "\"INSERT\"", "/users");
    let engine = Engine::start(&db, &observer).await;
    let before: String = client
        .query_one("SELECT snapshot::text FROM core.observer_checkpoints WHERE consumer_id = 'engine-test'", &[])
        .await
        .unwrap()
        .get(0);
    for i in 0..5 {
        insert_user(&client, &format!("u{i}@example.com"), TENANT_A).await;
    }
    wait_for(&receiver, 5, "five deliveries").await;
    // The checkpoint is written within a few intervals, without a shutdown.
    eventually(Duration::from_secs(5), "the checkpoint to move", || {
        let (client, before) = (&client, before.clone());
        async move {
            let now: String = client
                .query_one("SELECT snapshot::text FROM core.observer_checkpoints WHERE consumer_id = 'engine-test'", &[])
                .await
                .unwrap()
                .get(0);
            (now != before).then_some(())
        }
    })
    .await;
    engine.stop().await.unwrap();

    // A restart re-sends nothing old, and picks up what was written while it was down.
    let late = insert_user(&client, "late@example.com", TENANT_A).await;
    let engine = Engine::start(&db, &observer).await;
    let hooks = wait_for(&receiver, 6, "the change written while stopped").await;
    settle(&receiver, 6).await;
    assert_eq!(hooks[5].entity(), late.to_string());
    engine.stop().await.unwrap();
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_work_and_saves_the_checkpoint() {
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let receiver = TestServer::start().await;
    receiver.respond(|_| (200, Duration::from_millis(300))); // slow
    let engine = Engine::start(
        &db,
        &webhook(&receiver, "users", "User", "\"INSERT\"", "/users"),
    )
    .await;
    for i in 0..4 {
        insert_user(&client, &format!("s{i}@example.com"), TENANT_A).await;
    }
    eventually(Duration::from_secs(10), "deliveries in flight", || {
        let in_flight = engine.status.in_flight.load(Ordering::Relaxed);
        let started = receiver.answered().len();
        async move { (in_flight > 0 || started > 0).then_some(()) }
    })
    .await;
    engine.stop().await.expect("a graceful stop returns Ok");
    let delivered = receiver.accepted().len();
    assert!(delivered >= 1);
    // Restart: only what was not delivered before the stop comes, each once overall.
    receiver.respond(|_| (200, Duration::ZERO));
    let engine = Engine::start(
        &db,
        &webhook(&receiver, "users", "User", "\"INSERT\"", "/users"),
    )
    .await;
    wait_for(&receiver, 4, "every user").await;
    settle(&receiver, 4).await;
    let ids: HashSet<String> = receiver.accepted().iter().map(Request::id).collect();
    assert_eq!(ids.len(), 4, "nothing delivered twice");
    engine.stop().await.unwrap();
}

/// The receiver fails entity E's deliveries; E's later events wait behind the failure while other
/// entities flow; after recovery E's events arrive in order.
#[tokio::test]
async fn a_failing_entity_parks_its_successors_and_others_flow() {
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let receiver = TestServer::start().await;
    let stuck = insert_order(&client, "new", 1.0).await; // E, its first event
    let stuck_id = stuck.to_string();
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    {
        let (failing, stuck_id) = (failing.clone(), stuck_id.clone());
        receiver.respond(move |h| {
            if failing.load(Ordering::Relaxed) && h.entity() == stuck_id {
                (500, Duration::ZERO)
            } else {
                (200, Duration::ZERO)
            }
        });
    }
    let observer = with_retry(
        webhook(&receiver, "orders", "Order", "[\"INSERT\", \"UPDATE\"]", "/orders"),
        "orders",
        "{ max_attempts = 50, initial_delay_ms = 300, max_delay_ms = 300, backoff_strategy = \"fixed\", jitter = false }",
    );
    let engine = Engine::start(&db, &observer).await;
    for status in ["paid", "packed", "shipped"] {
        set_order(&client, stuck, status).await; // E's later events
    }
    let others: Vec<Uuid> =
        futures::future::join_all((0..3).map(|_| insert_order(&client, "new", 2.0))).await;
    let mut flowing = Vec::new();
    for o in &others {
        set_order(&client, *o, "paid").await;
        flowing.push(o.to_string());
    }
    // Everyone else flows while E is stuck.
    wait_for(&receiver, 6, "the other entities").await;
    assert!(receiver.accepted().iter().all(|h| h.entity() != stuck_id));
    let parked: i64 = client
        .query_one(
            "SELECT count(*) FROM core.observer_retry_queue WHERE attempts = 0",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(parked, 3, "E's three later events wait, durably");

    failing.store(false, Ordering::Relaxed);
    let all = wait_for(&receiver, 10, "E's events after recovery").await;
    settle(&receiver, 10).await;
    let e_statuses: Vec<String> = all
        .iter()
        .filter(|h| h.entity() == stuck_id)
        .map(|h| {
            h.json()["data"]["after"]["status"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        e_statuses,
        ["new", "paid", "packed", "shipped"],
        "E's events in order, once each"
    );
    engine.stop().await.unwrap();
}

#[tokio::test]
async fn exhausted_and_permanent_failures_are_dead_lettered_and_can_be_retried_once() {
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let receiver = TestServer::start().await;
    let answer = Arc::new(std::sync::atomic::AtomicU16::new(400));
    {
        let answer = answer.clone();
        receiver.respond(move |_| (answer.load(Ordering::Relaxed), Duration::ZERO));
    }
    let observer = with_retry(
        webhook(&receiver, "orders", "Order", "[\"INSERT\", \"UPDATE\"]", "/orders"),
        "orders",
        "{ max_attempts = 2, initial_delay_ms = 10, max_delay_ms = 10, backoff_strategy = \"fixed\", jitter = false }",
    );
    let engine = Engine::start(&db, &observer).await;
    let order = insert_order(&client, "new", 1.0).await; // 400: permanent, one attempt
    let items = eventually(Duration::from_secs(10), "a dead letter", || {
        let client = &client;
        async move {
            let items = dead_letter::list(client, None, Some("pending"), 10)
                .await
                .unwrap();
            (!items.is_empty()).then_some(items)
        }
    })
    .await;
    assert_eq!(items[0].reason, "permanent");
    assert_eq!(items[0].attempts, 1);
    assert_eq!(
        items[0].event.entity_id, order,
        "the event is copied into the dead letter"
    );
    assert_eq!(receiver.answered().len(), 1);

    // 500 twice: exhausted after max_attempts, and the entity's next event is not held back.
    answer.store(500, Ordering::Relaxed);
    set_order(&client, order, "paid").await;
    let exhausted = eventually(Duration::from_secs(10), "an exhausted dead letter", || {
        let client = &client;
        async move {
            let items = dead_letter::list(client, None, Some("pending"), 10)
                .await
                .unwrap();
            items.into_iter().find(|i| i.reason == "exhausted")
        }
    })
    .await;
    assert_eq!(exhausted.attempts, 2);
    assert_eq!(receiver.answered().len(), 3);
    engine.stop().await.unwrap();

    // An operator retry delivers once, even when two run at the same time.
    let config = config::load(&format!("{RUNTIME}\n{observer}"), &env).unwrap();
    let operator = Operator::new(&db.url, &config.runtime.consumer_id, config.observers)
        .await
        .unwrap();
    answer.store(200, Ordering::Relaxed);
    let id = items[0].id;
    let (first, second) = tokio::join!(
        operator.retry_dead_letter(id),
        operator.retry_dead_letter(id)
    );
    let outcomes = [first.unwrap(), second.unwrap()];
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| matches!(o, Some(Ok(()))))
            .count(),
        1
    );
    assert_eq!(
        outcomes.iter().filter(|o| o.is_none()).count(),
        1,
        "the other finds it claimed"
    );
    assert_eq!(receiver.accepted().len(), 1);
    let item = dead_letter::get(&client, id).await.unwrap().unwrap();
    assert_eq!(item.status, "delivered");
    assert!(
        operator.retry_dead_letter(id).await.unwrap().is_none(),
        "cannot fire twice"
    );
    assert_eq!(receiver.accepted().len(), 1);
}

#[tokio::test]
async fn a_condition_that_cannot_be_evaluated_is_recorded_not_skipped() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = TestServer::start().await;
    let observer = webhook(&receiver, "status", "Order", "\"UPDATE\"", "/status").replace(
        "event_type = \"UPDATE\"",
        "event_type = \"UPDATE\"\ncondition = \"field_changed('status')\"",
    );
    let engine = Engine::start(&db, &observer).await;
    // An UPDATE logged without a before-image: "did status change" cannot be answered.
    client
        .execute(
            "SELECT core.log_mutation_event($1::text::uuid, NULL, 'Order', gen_random_uuid(), 'UPDATE', 'updated',
                 NULL, '{\"status\": \"paid\"}'::jsonb, 'tb_order')",
            &[&TENANT_A],
        )
        .await
        .unwrap();
    let items = eventually(
        Duration::from_secs(10),
        "the recorded condition error",
        || {
            let client = &client;
            async move {
                let items = dead_letter::list(client, None, None, 10).await.unwrap();
                (!items.is_empty()).then_some(items)
            }
        },
    )
    .await;
    assert!(
        items[0].last_error.contains("before"),
        "{}",
        items[0].last_error
    );
    assert!(receiver.answered().is_empty());
    engine.stop().await.unwrap();
}

#[tokio::test]
async fn test_backlog_alerting() {
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let receiver = TestServer::start().await;
    let gate = Arc::new(std::sync::atomic::AtomicBool::new(true));
    {
        let gate = gate.clone();
        receiver.respond(move |_| {
            let held = gate.load(Ordering::Relaxed);
            (
                200,
                if held {
                    Duration::from_millis(200)
                } else {
                    Duration::ZERO
                },
            )
        });
    }
    for i in 0..60 {
        insert_user(&client, &format!("b{i}@example.com"), TENANT_A).await;
    }
    let observer = webhook(&receiver, "users", "User", "\"INSERT\"", "/users");
    let config = config::load(
        &format!("{RUNTIME}\nbacklog_alert_threshold = 20\nconcurrency = 1\n{observer}")
            .replace("concurrency = 8\n", ""),
        &env,
    )
    .unwrap();
    let engine = Engine::start_with(&db, config.observers, config.runtime).await;
    eventually(Duration::from_secs(10), "the backlog alert", || {
        let (alert, backlog) = (
            engine.status.backlog_alert.load(Ordering::Relaxed),
            engine.status.backlog.load(Ordering::Relaxed),
        );
        async move { (alert && backlog > 20).then_some(()) }
    })
    .await;
    assert!(
        engine.status.lag_ms.load(Ordering::Relaxed) > 0,
        "lag is measured while behind"
    );
    gate.store(false, Ordering::Relaxed);
    wait_for(&receiver, 60, "the backlog to drain").await;
    eventually(Duration::from_secs(10), "the alert to clear", || {
        let (alert, backlog) = (
            engine.status.backlog_alert.load(Ordering::Relaxed),
            engine.status.backlog.load(Ordering::Relaxed),
        );
        async move { (!alert && backlog == 0).then_some(()) }
    })
    .await;
    engine.stop().await.unwrap();
}

/// Issue 5's correctness guard (the real measurement is the benchmark): 1,000 changes, each
/// delivered exactly once, in per-entity order, within a generous bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_e2e_throughput_1000_events() {
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let receiver = TestServer::start().await;
    let engine = Engine::start(
        &db,
        &webhook(
            &receiver,
            "orders",
            "Order",
            "[\"INSERT\", \"UPDATE\"]",
            "/orders",
        ),
    )
    .await;
    let orders: Vec<Uuid> = client
        .query(
            &format!(
                "INSERT INTO tb_order (status, total, fk_customer_org)
                 SELECT 'new', g, '{TENANT_A}' FROM generate_series(1, 200) g RETURNING id"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for round in 1..=4 {
        client
            .execute(
                "UPDATE tb_order SET total = total + $1::int4::numeric",
                &[&round],
            )
            .await
            .unwrap();
    }
    let started = std::time::Instant::now();
    let hooks = wait_for(&receiver, 1000, "1,000 deliveries").await;
    assert!(started.elapsed() < Duration::from_secs(20));
    settle(&receiver, 1000).await;
    let ids: HashSet<String> = hooks.iter().map(Request::id).collect();
    assert_eq!(ids.len(), 1000, "each exactly once");
    let mut per_entity: HashMap<String, Vec<i64>> = HashMap::new();
    for h in &hooks {
        per_entity.entry(h.entity()).or_default().push(h.sequence());
    }
    assert_eq!(per_entity.len(), orders.len());
    for (entity, seqs) in per_entity {
        assert_eq!(seqs.len(), 5);
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "entity {entity} out of order: {seqs:?}"
        );
    }
    engine.stop().await.unwrap();
}

/// Issue 5's latency guard: a short steady run, every event delivered, median commit-to-arrival
/// under 100 ms (measured against the row's commit-side timestamp).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_e2e_latency_under_100ms() {
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let receiver = TestServer::start().await;
    let engine = Engine::start(
        &db,
        &webhook(&receiver, "orders", "Order", "\"INSERT\"", "/orders"),
    )
    .await;
    let mut committed = Vec::new();
    for i in 0..100 {
        insert_order(&client, "new", i as f64).await;
        committed.push(std::time::Instant::now());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let hooks = wait_for(&receiver, 100, "every event").await;
    let mut latencies: Vec<Duration> = hooks
        .iter()
        .map(|h| {
            let n = h.json()["data"]["after"]["total"].as_f64().unwrap() as usize;
            h.at.saturating_duration_since(committed[n])
        })
        .collect();
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    assert!(median < Duration::from_millis(100), "median {median:?}");
    engine.stop().await.unwrap();
}

/// Issue 5's memory guard: after a bounded run every in-flight structure is empty again.
#[tokio::test]
async fn test_e2e_memory_stability() {
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let receiver = TestServer::start().await;
    let engine = Engine::start(
        &db,
        &webhook(&receiver, "orders", "Order", "\"INSERT\"", "/orders"),
    )
    .await;
    for _ in 0..5 {
        client
            .batch_execute(&format!(
                "INSERT INTO tb_order (status, total, fk_customer_org)
                 SELECT 'new', g, '{TENANT_A}' FROM generate_series(1, 100) g"
            ))
            .await
            .unwrap();
    }
    wait_for(&receiver, 500, "every event").await;
    eventually(Duration::from_secs(5), "nothing in flight", || {
        let n = engine.status.in_flight.load(Ordering::Relaxed);
        let backlog = engine.status.backlog.load(Ordering::Relaxed);
        async move { (n == 0 && backlog == 0).then_some(()) }
    })
    .await;
    let queued: i64 = client
        .query_one("SELECT count(*) FROM core.observer_retry_queue", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(queued, 0);
    engine.stop().await.unwrap();
}

/// Issue 4, coalescing: ten quick changes of one entity become one search update with the final
/// state; another entity's changes are not merged into it.
#[tokio::test]
async fn coalescing_delivers_the_latest_state_once_per_window() {
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let receiver = TestServer::start().await;
    receiver.respond(|_| (202, Duration::ZERO));
    let observers = format!(
        r#"
[observers.index]
entity = "Order"
event_type = ["INSERT", "UPDATE"]
coalesce_ms = 400

[[observers.index.actions]]
type = "search"
engine = "meilisearch"
base_url = "{}"
index = "orders"
fields = ["status", "total"]
allow_private_networks = true
"#,
        receiver.base
    );
    let engine = Engine::start(&db, &observers).await;
    let order = insert_order(&client, "new", 1.0).await;
    let other = insert_order(&client, "new", 2.0).await;
    // Ten changes (ten change-log rows) committed together, so they fall in one window however
    // slowly a loaded machine runs the statements.
    client.batch_execute("BEGIN").await.unwrap();
    for i in 0..10 {
        client
            .execute(
                "UPDATE tb_order SET status = $1, total = $2::int4::numeric WHERE id = $3",
                &[&format!("step-{i}"), &(i + 10), &order],
            )
            .await
            .unwrap();
    }
    client.batch_execute("COMMIT").await.unwrap();
    let (order_id, other_id) = (order.to_string(), other.to_string());
    eventually(Duration::from_secs(10), "the coalesced updates", || {
        let hooks = receiver.answered();
        let (order_id, other_id) = (order_id.clone(), other_id.clone());
        async move {
            let docs: Vec<serde_json::Value> = hooks
                .iter()
                .flat_map(|h| h.json().as_array().cloned().unwrap_or_default())
                .collect();
            let final_state = docs
                .iter()
                .any(|d| d["id"] == order_id.as_str() && d["status"] == "step-9");
            let other = docs.iter().any(|d| d["id"] == other_id.as_str());
            (final_state && other).then_some(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let documents: Vec<serde_json::Value> = receiver
        .answered()
        .iter()
        .flat_map(|h| h.json().as_array().cloned().unwrap_or_default())
        .collect();
    let of = |id: Uuid| -> Vec<serde_json::Value> {
        documents
            .iter()
            .filter(|d| d["id"] == id.to_string())
            .cloned()
            .collect()
    };
    let order_docs = of(order);
    assert!(
        order_docs.len() <= 2,
        "11 changes, at most 2 windows: {order_docs:?}"
    );
    assert_eq!(
        order_docs.last().unwrap(),
        &serde_json::json!({"id": order.to_string(), "status": "step-9", "total": 19.0}),
        "the final state is delivered"
    );
    assert_eq!(of(other).len(), 1);
    engine.stop().await.unwrap();
}

#[test]
fn coalescing_is_refused_for_actions_that_must_see_every_change() {
    let errors = config::load(
        r#"
[observers.hook]
entity = "Order"
event_type = "UPDATE"
coalesce_ms = 100

[[observers.hook.actions]]
type = "webhook"
url = "https://example.com/h"
"#,
        &env,
    )
    .unwrap_err()
    .0;
    assert_eq!(errors[0].path, "observers.hook.coalesce_ms");
    assert!(
        errors[0].message.contains("webhook"),
        "{}",
        errors[0].message
    );
}

/// Issue 4: coalesced search updates of several entities share one request.
#[tokio::test]
async fn coalesced_search_updates_of_several_entities_share_a_request() {
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let receiver = TestServer::start().await;
    receiver.respond(|_| (202, Duration::ZERO));
    let observer = format!(
        r#"
[observers.index]
entity = "Order"
event_type = ["INSERT", "UPDATE"]
coalesce_ms = 500

[[observers.index.actions]]
type = "search"
engine = "meilisearch"
base_url = "{}"
index = "orders"
fields = ["status"]
allow_private_networks = true
"#,
        receiver.base
    );
    let config = config::load(
        &format!("{RUNTIME}\n{observer}").replace("concurrency = 8\n", "concurrency = 1\n"),
        &env,
    )
    .unwrap();
    let engine = Engine::start_with(&db, config.observers, config.runtime).await;
    let mut orders = Vec::new();
    for _ in 0..6 {
        let o = insert_order(&client, "new", 1.0).await;
        set_order(&client, o, "final").await;
        orders.push(o.to_string());
    }
    let documents = eventually(Duration::from_secs(10), "every final state", || {
        let hooks = receiver.answered();
        let orders = orders.clone();
        async move {
            let docs: Vec<serde_json::Value> = hooks
                .iter()
                .flat_map(|h| h.json().as_array().cloned().unwrap_or_default())
                .filter(|d| d["status"] == "final")
                .collect();
            orders
                .iter()
                .all(|o| docs.iter().any(|d| d["id"] == o.as_str()))
                .then_some(docs)
        }
    })
    .await;
    assert!(documents.len() >= 6);
    let requests = receiver.answered().len();
    assert!(
        requests < 6,
        "{requests} requests for 6 entities: not batched"
    );
    engine.stop().await.unwrap();
}
