//! Distributed delivery in one process: a reader (the pipeline with `Role::Reader`) publishing to
//! a JetStream work stream on the real nats-server (127.0.0.1:4222), and workers as tasks owning
//! its partitions. Each test uses its own stream and subjects (random names) and deletes them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use fraiseql_observers::config::{self, Config};
use fraiseql_observers::distributed::{self, Role};
use fraiseql_observers::pipeline::worker::{self, WorkerStatus};
use fraiseql_observers::pipeline::{self, Pipeline};
use fraiseql_observers::testing::{eventually, Request, TestDb, TestServer};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use crate::sample::env_of;

const NATS_URL: &str = "nats://127.0.0.1:4222";

struct Names {
    stream: String,
    prefix: String,
}

fn names() -> Names {
    let n = rand::random::<u32>();
    Names {
        stream: format!("FO_WORK_{n}"),
        prefix: format!("fo-work-{n}"),
    }
}

fn config_text(names: &Names, receiver: &TestServer, partitions: u32) -> String {
    config_text_on(
        &format!("nats_url = \"{NATS_URL}\""),
        names,
        receiver,
        partitions,
    )
}

/// The test configuration, with `connection` (the `[distributed]` connection keys) for the
/// work stream's server.
fn config_text_on(
    connection: &str,
    names: &Names,
    receiver: &TestServer,
    partitions: u32,
) -> String {
    format!(
        r#"
[distributed]
{connection}
stream = "{stream}"
subject_prefix = "{prefix}"
partitions = {partitions}

[observers.runtime]
consumer_id = "dist"
start_position = "beginning"
poll_interval_ms = 20
checkpoint_interval_ms = 50
retry_poll_interval_ms = 50
shutdown_timeout_ms = 5000

[observers.orders]
entity = "Order"
event_type = ["INSERT", "UPDATE"]

[[observers.orders.actions]]
type = "webhook"
url = "{url}"
allow_private_networks = true
"#,
        stream = names.stream,
        prefix = names.prefix,
        url = receiver.url("/orders"),
    )
}

fn compile(text: &str) -> Config {
    compile_with(text, &[])
}

fn compile_with(text: &str, env: &[(&str, &str)]) -> Config {
    config::load(text, &env_of(env)).unwrap_or_else(|e| panic!("{e}"))
}

async fn schema(db: &TestDb) -> Client {
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE tb_order (
                 pk_order INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 id UUID DEFAULT gen_random_uuid() UNIQUE NOT NULL,
                 status INTEGER NOT NULL, fk_customer_org UUID NOT NULL);
             SELECT core.observer_enable_capture('tb_order', 'Order', 'fk_customer_org');",
        )
        .await
        .unwrap();
    client
}

/// `orders` orders, each inserted then updated `updates` times: `orders * (1 + updates)` changes.
async fn write(client: &Client, orders: usize, updates: usize) {
    let mut ids = Vec::new();
    for _ in 0..orders {
        let id: uuid::Uuid = client
            .query_one(
                "INSERT INTO tb_order (status, fk_customer_org) VALUES (0, gen_random_uuid()) RETURNING id",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        ids.push(id);
    }
    for u in 1..=updates {
        for id in &ids {
            client
                .execute(
                    "UPDATE tb_order SET status = $1 WHERE id = $2",
                    &[&(u as i32), id],
                )
                .await
                .unwrap();
        }
    }
}

struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<fraiseql_observers::Result<()>>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

async fn start_reader(db: &TestDb, text: &str) -> Running {
    start_reader_with(db, text, &[]).await
}

async fn start_reader_with(db: &TestDb, text: &str, env: &[(&str, &str)]) -> Running {
    let config = compile_with(text, env).with_role(Role::Reader).unwrap();
    let listener = fraiseql_observers::ListenerConfig {
        min_poll_interval: Duration::from_millis(2),
        ..pipeline::listener_config(&db.url, &config.runtime)
    };
    let pipeline = Pipeline::start_publishing(
        listener,
        config.observers,
        config.runtime,
        config.distributed,
    )
    .await
    .unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(pipeline.run(async {
        let _ = stopped.await;
    }));
    Running { stop, task }
}

fn start_worker(db: &TestDb, text: &str, name: &str) -> (Running, Arc<WorkerStatus>) {
    start_worker_with(db, text, name, &[])
}

fn start_worker_with(
    db: &TestDb,
    text: &str,
    name: &str,
    env: &[(&str, &str)],
) -> (Running, Arc<WorkerStatus>) {
    let text = text.to_string();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let compile: worker::Compile = Arc::new(move || {
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        config::load(&text, &env_of(&pairs)).and_then(|c| c.with_role(Role::Worker))
    });
    let status = Arc::new(WorkerStatus::default());
    let (stop, stopped) = oneshot::channel::<()>();
    let (url, name, s) = (db.url.clone(), name.to_string(), status.clone());
    let task = tokio::spawn(async move {
        let (_reload, reloads) = tokio::sync::watch::channel(0);
        worker::run(
            &url,
            compile,
            &name,
            s,
            async {
                let _ = stopped.await;
            },
            reloads,
        )
        .await
    });
    (Running { stop, task }, status)
}

async fn delete_stream(names: &Names) {
    let client = async_nats::connect(NATS_URL).await.unwrap();
    let _ = jetstream::new(client).delete_stream(&names.stream).await;
}

/// Every change delivered, at least once; per entity the first deliveries in commit order; a
/// repeat only with the id of the first. Returns the distinct deliveries.
fn check_deliveries(requests: &[Request], expected: usize) -> usize {
    let mut first: HashMap<String, (String, i64)> = HashMap::new();
    let mut by_entity: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for r in requests.iter().filter(|r| r.accepted()) {
        let (id, entity, sequence) = (r.id(), r.entity(), r.sequence());
        match first.get(&id) {
            Some((e, s)) => assert_eq!((e, s), (&entity, &sequence), "a repeat with another id"),
            None => {
                first.insert(id, (entity.clone(), sequence));
                by_entity.entry(entity).or_default().push(sequence);
            }
        }
    }
    for (entity, sequences) in &by_entity {
        assert!(
            sequences.windows(2).all(|w| w[0] < w[1]),
            "entity {entity}: first deliveries out of commit order: {sequences:?}"
        );
    }
    assert_eq!(first.len(), expected, "distinct deliveries");
    first.len()
}

async fn distinct_accepted(receiver: &TestServer) -> usize {
    let mut ids: Vec<String> = receiver.accepted().iter().map(Request::id).collect();
    ids.sort();
    ids.dedup();
    ids.len()
}

#[tokio::test]
async fn a_reader_and_three_workers_deliver_every_change_in_order_per_entity() {
    let names = names();
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let receiver = TestServer::start().await;
    let text = config_text(&names, &receiver, 8);
    let reader = start_reader(&db, &text).await;
    let workers: Vec<_> = (0..3)
        .map(|i| start_worker(&db, &text, &format!("w{i}")))
        .collect();
    write(&client, 30, 4).await;
    let expected = 30 * 5;
    eventually(Duration::from_secs(60), "every change delivered", || {
        let receiver = &receiver;
        async move { (distinct_accepted(receiver).await >= expected).then_some(()) }
    })
    .await;
    check_deliveries(&receiver.accepted(), expected);

    // The partitions are spread: each worker owns some (at most ceil(8 / 3) once the extras a
    // worker took while fewer were live are given back), together all, none twice.
    eventually(Duration::from_secs(20), "the partitions spread", || {
        let workers = &workers;
        async move {
            let owned: Vec<Vec<u32>> = workers
                .iter()
                .map(|(_, s)| s.partitions.lock().unwrap().clone())
                .collect();
            let mut all: Vec<u32> = owned.iter().flatten().copied().collect();
            all.sort();
            (all == (0..8).collect::<Vec<_>>()
                && owned.iter().all(|o| !o.is_empty() && o.len() <= 3))
            .then_some(())
        }
    })
    .await;

    // The workers are in the registry, with their partitions.
    let rows = distributed::live_workers(&client, "dist").await.unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    // Each partition's deliveries are bookkept under its own consumer, fenced by its epoch.
    let partitions: i64 = client
        .query_one(
            "SELECT count(*) FROM core.observer_checkpoints WHERE partition_of = 'dist'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(partitions, 8);

    for (w, _) in workers {
        w.stop().await;
    }
    reader.stop().await;
    // Everything was acknowledged: the work stream is empty.
    let js = jetstream::new(async_nats::connect(NATS_URL).await.unwrap());
    let messages = js
        .get_stream(&names.stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    assert_eq!(messages, 0);
    delete_stream(&names).await;
}

#[tokio::test]
async fn partitions_rebalance_when_workers_join_and_leave_and_a_dead_workers_partitions_are_taken_over(
) {
    let names = names();
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let receiver = TestServer::start().await;
    let text = config_text(&names, &receiver, 8);
    let reader = start_reader(&db, &text).await;
    let owned = |s: &Arc<WorkerStatus>| s.partitions.lock().unwrap().len();

    let (first, first_status) = start_worker(&db, &text, "first");
    eventually(Duration::from_secs(20), "one worker owns all", || {
        let n = owned(&first_status);
        async move { (n == 8).then_some(()) }
    })
    .await;
    write(&client, 10, 1).await;

    // A second worker joins: the first gives half back (drained), the second takes it.
    let (second, second_status) = start_worker(&db, &text, "second");
    eventually(Duration::from_secs(20), "4 and 4", || {
        let (a, b) = (owned(&first_status), owned(&second_status));
        async move { (a == 4 && b == 4).then_some(()) }
    })
    .await;
    write(&client, 10, 1).await;

    // The second one dies without a word (its task and lock connection dropped): the first
    // takes everything back.
    second.task.abort();
    let _ = second.task.await;
    eventually(
        Duration::from_secs(20),
        "the dead worker's partitions taken over",
        || {
            let n = owned(&first_status);
            async move { (n == 8).then_some(()) }
        },
    )
    .await;
    write(&client, 10, 1).await;
    let expected = 3 * 10 * 2;
    eventually(Duration::from_secs(60), "every change delivered", || {
        let receiver = &receiver;
        async move { (distinct_accepted(receiver).await >= expected).then_some(()) }
    })
    .await;
    check_deliveries(&receiver.accepted(), expected);
    assert!(first_status.taken.load(Ordering::Relaxed) >= 12);
    first.stop().await;
    reader.stop().await;
    delete_stream(&names).await;
}

#[tokio::test]
async fn a_role_needs_the_distributed_section() {
    let config = compile(
        r#"
[observers.runtime]
consumer_id = "x"
"#,
    );
    let errors = config.with_role(Role::Worker).unwrap_err();
    assert_eq!(errors.0[0].path, "distributed");
    assert!(errors.to_string().contains("--role worker"), "{errors}");
}

#[tokio::test]
async fn a_work_stream_serves_one_consumer() {
    let names = names();
    let receiver = TestServer::start().await;
    let config = compile(&config_text(&names, &receiver, 4));
    let dist = config.distributed.expect("[distributed]");
    distributed::WorkStream::connect(&dist, "dist")
        .await
        .expect("the stream is created for consumer dist");
    // Another consumer with the same `[distributed]` section is refused: its partitions'
    // durable consumers would share names with ours.
    let refused = distributed::WorkStream::connect(&dist, "other")
        .await
        .expect_err("another consumer's stream");
    assert!(
        refused
            .to_string()
            .contains("is not the work stream of consumer 'other'"),
        "{refused}"
    );
    // Ours again: accepted.
    distributed::WorkStream::connect(&dist, "dist")
        .await
        .unwrap();
    delete_stream(&names).await;
}

/// Write 5 orders with one update each, and wait until the receiver has the 10 changes.
async fn ten_changes_delivered(client: &Client, receiver: &TestServer) {
    write(client, 5, 1).await;
    eventually(
        Duration::from_secs(60),
        "every change delivered",
        || async { (distinct_accepted(receiver).await >= 10).then_some(()) },
    )
    .await;
    check_deliveries(&receiver.accepted(), 10);
}

#[tokio::test]
async fn a_token_protected_work_stream_delivers_and_a_wrong_token_is_refused_at_start() {
    let nats =
        super::nats::OwnNats::start(super::nats::own_store_dir(), &["--auth", "w0rk-t0ken"]).await;
    let names = names();
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let receiver = TestServer::start().await;
    let connection = format!(
        "nats_url = \"nats://127.0.0.1:{}\"\ntoken_env = \"WORK_TOKEN\"",
        nats.port
    );
    let text = config_text_on(&connection, &names, &receiver, 4);
    let right = [("WORK_TOKEN", "w0rk-t0ken")];
    let reader = start_reader_with(&db, &text, &right).await;
    let (worker, _) = start_worker_with(&db, &text, "w0", &right);
    ten_changes_delivered(&client, &receiver).await;
    worker.stop().await;
    reader.stop().await;

    // A wrong token: the worker stops at start with a clear error, without the token.
    let wrong = [("WORK_TOKEN", "not-the-t0ken")];
    let (worker, _) = start_worker_with(&db, &text, "w1", &wrong);
    let error = worker.task.await.unwrap().expect_err("a refused token");
    let message = error.to_string();
    assert!(
        message.contains(&format!(
            "NATS server 127.0.0.1:{} refused the connection",
            nats.port
        )) && message.contains("token_env"),
        "{message}"
    );
    assert!(
        !message.contains("t0ken"),
        "no secret in messages: {message}"
    );
    // The reader too, when it starts its pipeline.
    let config = compile_with(&text, &wrong).with_role(Role::Reader).unwrap();
    let error = Pipeline::start(&db.url, config)
        .await
        .err()
        .expect("a refused token");
    assert!(
        error.to_string().contains("refused the connection"),
        "{error}"
    );
    assert!(!error.is_transient(), "{error:?}");
}

/// A CA and a server certificate for 127.0.0.1 signed by it, made with the openssl CLI, in
/// `dir`: `ca.pem`, `server.pem`, `server.key`.
fn make_certificates(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl on the PATH");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=fo-test-ca",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "1",
        "-extfile",
        "server.ext",
    ]);
}

#[tokio::test]
async fn a_tls_work_stream_with_its_ca_file_delivers() {
    let dir = super::nats::own_store_dir();
    std::fs::create_dir_all(&dir).unwrap();
    make_certificates(&dir);
    let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
    let nats = super::nats::OwnNats::start(
        dir.clone(),
        &[
            "--tls",
            "--tlscert",
            cert.to_str().unwrap(),
            "--tlskey",
            key.to_str().unwrap(),
        ],
    )
    .await;
    let names = names();
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let receiver = TestServer::start().await;
    let connection = format!(
        "nats_url = \"tls://127.0.0.1:{}\"\nca_file = \"{}\"",
        nats.port,
        dir.join("ca.pem").display()
    );
    let text = config_text_on(&connection, &names, &receiver, 4);
    let reader = start_reader(&db, &text).await;
    let (worker, _) = start_worker(&db, &text, "w0");
    ten_changes_delivered(&client, &receiver).await;
    worker.stop().await;
    reader.stop().await;
}

#[tokio::test]
async fn the_partition_count_changes_only_while_the_work_stream_is_empty() {
    let names = names();
    let receiver = TestServer::start().await;
    let dist = |partitions| {
        compile(&config_text(&names, &receiver, partitions))
            .distributed
            .expect("[distributed]")
    };
    let description = |js: jetstream::Context| {
        let stream = names.stream.clone();
        async move {
            js.get_stream(&stream)
                .await
                .unwrap()
                .info()
                .await
                .unwrap()
                .config
                .description
                .clone()
                .unwrap_or_default()
        }
    };
    let js = jetstream::new(async_nats::connect(NATS_URL).await.unwrap());
    let four = distributed::WorkStream::connect(&dist(4), "dist")
        .await
        .unwrap();
    assert!(description(js.clone()).await.ends_with("(4 partitions)"));
    // The same count: fine. Another count on an empty stream: recorded.
    distributed::WorkStream::connect(&dist(4), "dist")
        .await
        .unwrap();
    distributed::WorkStream::connect(&dist(8), "dist")
        .await
        .unwrap();
    assert!(description(js.clone()).await.ends_with("(8 partitions)"));
    let eight = distributed::WorkStream::connect(&dist(8), "dist")
        .await
        .unwrap();

    // A message waits (in partition 5): another count is refused, saying what to do.
    eight.publish(5, "m1", b"{}".to_vec()).await.unwrap();
    let refused = distributed::WorkStream::connect(&dist(4), "dist")
        .await
        .expect_err("a new count with a message waiting");
    let message = refused.to_string();
    assert!(
        message.contains("holds 1 messages split into 8 partitions")
            && message.contains("Drain the stream first")
            && message.contains("keep `partitions = 8`"),
        "{message}"
    );
    assert!(!refused.is_transient());
    assert!(description(js.clone()).await.ends_with("(8 partitions)"));

    // A worker drains it (takes the message and acknowledges it): the new count is accepted,
    // and the consumers of partitions beyond it are gone.
    let consumer = eight.take_partition(5).await.unwrap();
    let mut batch = consumer.fetch().max_messages(1).messages().await.unwrap();
    use futures::StreamExt as _;
    let message = batch.next().await.unwrap().unwrap();
    message.double_ack().await.unwrap();
    distributed::WorkStream::connect(&dist(4), "dist")
        .await
        .unwrap();
    assert!(description(js.clone()).await.ends_with("(4 partitions)"));
    let stream = js.get_stream(&names.stream).await.unwrap();
    assert!(stream.consumer_info("partition-5").await.is_err());
    drop(four);
    delete_stream(&names).await;
}

/// `text` with a second observer, `audit`, of two webhook actions (`/audit/0`, `/audit/1`).
fn with_audit(text: &str, receiver: &TestServer) -> String {
    format!(
        r#"{text}
[observers.audit]
entity = "Order"
event_type = ["INSERT", "UPDATE"]

[[observers.audit.actions]]
type = "webhook"
url = "{a0}"
allow_private_networks = true

[[observers.audit.actions]]
type = "webhook"
url = "{a1}"
allow_private_networks = true
"#,
        a0 = receiver.url("/audit/0"),
        a1 = receiver.url("/audit/1"),
    )
}

async fn stream_messages(names: &Names) -> u64 {
    let js = jetstream::new(async_nats::connect(NATS_URL).await.unwrap());
    js.get_stream(&names.stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

#[tokio::test]
async fn a_message_for_an_observer_the_workers_do_not_know_is_dead_lettered_and_retried_once_known()
{
    use fraiseql_observers::delivery::{dead_letter, delivery_id};
    use fraiseql_observers::operator::Operator;

    let names = names();
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let receiver = TestServer::start().await;
    // The reader has `orders` and `audit`; the worker only `orders`.
    let worker_text = config_text(&names, &receiver, 4);
    let reader_text = with_audit(&worker_text, &receiver);
    let reader = start_reader(&db, &reader_text).await;
    let (worker, _) = start_worker(&db, &worker_text, "w0");
    write(&client, 10, 1).await;
    let changes = 10 * 2;

    // `orders` is delivered; each `audit` delivery (two actions) is dead-lettered under its
    // partition's consumer, `not_accepted`, with the delivery id the action would have had.
    eventually(Duration::from_secs(60), "orders delivered", || {
        let receiver = &receiver;
        async move { (distinct_accepted(receiver).await >= changes).then_some(()) }
    })
    .await;
    let items = eventually(Duration::from_secs(60), "audit dead-lettered", || {
        let client = &client;
        async move {
            let items = dead_letter::list(client, None, None, 1000).await.unwrap();
            (items.len() >= changes * 2).then_some(items)
        }
    })
    .await;
    assert_eq!(items.len(), changes * 2);
    let mut ids = Vec::new();
    for item in &items {
        assert_eq!(item.observer, "audit");
        assert!(
            distributed::is_consumer_or_partition(&item.consumer_id, "dist")
                && item.consumer_id != "dist",
            "{}",
            item.consumer_id
        );
        assert_eq!(item.reason, "not_accepted");
        assert_eq!(item.status, "pending");
        assert_eq!(item.attempts, 0);
        assert_eq!(item.action_type, "webhook");
        assert!(item.action_index < 2);
        assert_eq!(
            item.delivery_id,
            delivery_id(item.event.id, "audit", item.action_index)
        );
        assert!(
            item.last_error
                .contains("observer 'audit' is not in this worker's configuration"),
            "{}",
            item.last_error
        );
        ids.push(item.delivery_id.clone());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), changes * 2, "one item per action and event");
    // Nothing reached the receiver for `audit`, and nothing is left in the work stream.
    assert!(receiver
        .accepted()
        .iter()
        .all(|r| !r.path().starts_with("/audit")));
    eventually(Duration::from_secs(30), "the work stream empty", || {
        let names = &names;
        async move { (stream_messages(names).await == 0).then_some(()) }
    })
    .await;
    check_deliveries(&receiver.accepted(), changes);

    // The workers learn `audit`: an operator retry of every item delivers it, with the same
    // delivery ids.
    worker.stop().await;
    let (worker, _) = start_worker(&db, &reader_text, "w0");
    let operator = Operator::new(&db.url, "dist", compile(&reader_text).observers)
        .await
        .unwrap();
    let pending = dead_letter::pending_ids(&client, "dist").await.unwrap();
    assert_eq!(pending.len(), changes * 2);
    for id in pending {
        let outcome = operator.retry_dead_letter(id).await.unwrap();
        assert!(matches!(outcome, Some(Ok(()))), "{id}: {outcome:?}");
    }
    let mut retried: Vec<String> = receiver
        .accepted()
        .iter()
        .filter(|r| r.path().starts_with("/audit"))
        .map(Request::id)
        .collect();
    retried.sort();
    assert_eq!(retried, ids);
    let delivered = dead_letter::list(&client, None, None, 1000).await.unwrap();
    assert!(delivered.iter().all(|i| i.status == "delivered"));

    worker.stop().await;
    reader.stop().await;
    delete_stream(&names).await;
}

#[tokio::test]
async fn a_message_from_an_older_reader_for_an_unknown_observer_gives_one_dead_letter() {
    use fraiseql_observers::delivery::{dead_letter, delivery_id};

    let names = names();
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let receiver = TestServer::start().await;
    let text = config_text(&names, &receiver, 2);
    let (worker, status) = start_worker(&db, &text, "w0");
    eventually(
        Duration::from_secs(20),
        "the worker owns both partitions",
        || {
            let status = &status;
            async move { (status.partitions.lock().unwrap().len() == 2).then_some(()) }
        },
    )
    .await;
    // A body without `actions`, as a reader older than that field publishes it.
    let event = fraiseql_observers::testing::order_event(
        fraiseql_observers::EventKind::Created,
        None,
        Some(serde_json::json!({"id": 7})),
    );
    let body = serde_json::json!({"observer": "gone", "event": event}).to_string();
    let stream = distributed::WorkStream::connect(
        &compile(&text).distributed.expect("[distributed]"),
        "dist",
    )
    .await
    .unwrap();
    stream.publish(1, "old-1", body.into_bytes()).await.unwrap();

    let items = eventually(Duration::from_secs(30), "one dead letter", || {
        let client = &client;
        async move {
            let items = dead_letter::list(client, None, None, 10).await.unwrap();
            (!items.is_empty()).then_some(items)
        }
    })
    .await;
    assert_eq!(items.len(), 1);
    let item = &items[0];
    assert_eq!(item.consumer_id, "dist/1");
    assert_eq!(
        (item.action_index, item.action_type.as_str()),
        (0, "unknown")
    );
    assert_eq!(item.delivery_id, delivery_id(event.id, "gone", 0));
    assert_eq!(item.reason, "not_accepted");
    assert!(
        item.last_error
            .contains("does not name the observer's actions"),
        "{}",
        item.last_error
    );
    eventually(Duration::from_secs(30), "the work stream empty", || {
        let names = &names;
        async move { (stream_messages(names).await == 0).then_some(()) }
    })
    .await;
    worker.stop().await;
    delete_stream(&names).await;
}
