//! Runtime control without a restart: pausing and resuming an observer, reloading the
//! configuration under a steady writer, and queued retries that re-check whether their observer
//! still accepts the event (issue 10 item 3, issue 9 5d).

use crate::items::{count, first_deliveries, schema, write};
use fraiseql_observers::control;
use fraiseql_observers::delivery::{dead_letter, retry_queue};
use fraiseql_observers::testing::{eventually, Answer, TestDb, TestServer};
use fraiseql_observers::{config, Config, ConfigErrors, Operator, Pipeline};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const TENANT: &str = "11111111-1111-1111-1111-111111111111";
const OTHER_TENANT: &str = "22222222-2222-2222-2222-222222222222";

fn env(name: &str) -> Option<String> {
    (name == "HOOK_SECRET").then(|| SECRET.to_string())
}

fn runtime(consumer: &str) -> String {
    format!(
        r#"
[observers.runtime]
consumer_id = "{consumer}"
start_position = "beginning"
poll_interval_ms = 20
checkpoint_interval_ms = 50
retry_poll_interval_ms = 50
concurrency = 4
shutdown_timeout_ms = 5000
"#
    )
}

fn webhook(name: &str, server: &TestServer, extra: &str) -> String {
    format!(
        r#"
[observers.{name}]
entity = "Item"
event_type = ["INSERT", "UPDATE"]
retry = {{ max_attempts = 5, initial_delay_ms = 500, max_delay_ms = 500 }}
{extra}

[[observers.{name}.actions]]
type = "webhook"
url = "{url}"
signing_secret_env = "HOOK_SECRET"
allow_private_networks = true
"#,
        url = server.url(&format!("/{name}"))
    )
}

type Engine = (
    oneshot::Sender<()>,
    JoinHandle<fraiseql_observers::Result<()>>,
);

async fn run(db: &TestDb, toml: &str) -> Engine {
    let config = config::load(toml, &env).unwrap_or_else(|e| panic!("{e}"));
    let pipeline = Pipeline::start(&db.url, config).await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let engine = tokio::spawn(pipeline.run(async {
        let _ = stopped.await;
    }));
    (stop, engine)
}

async fn stop((stop, engine): Engine) {
    let _ = stop.send(());
    engine.await.unwrap().unwrap();
}

/// Every item's first deliveries are exactly versions 1..=`versions`, in order.
fn assert_every_version_in_order(server: &TestServer, items: i32, versions: i32, what: &str) {
    let delivered = first_deliveries(&server.accepted());
    assert_eq!(delivered.len(), items as usize, "{what}: every item");
    for (item, got) in &delivered {
        assert_eq!(
            got,
            &(1..=i64::from(versions)).collect::<Vec<_>>(),
            "{what}: every version of {item}, once, in order"
        );
    }
}

/// Write versions `from..=to` of items 1..=`items` (one version of every item, then the next).
async fn write_versions(client: &tokio_postgres::Client, items: i32, from: i32, to: i32) {
    for version in from..=to {
        for item in 1..=items {
            write(client, item, version).await;
        }
    }
}

async fn wait_all(server: &TestServer, n: usize, what: &str) {
    eventually(Duration::from_secs(60), what, || {
        let got = count(&first_deliveries(&server.accepted()));
        async move { (got >= n).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_observer_holds_its_events_in_order_across_a_restart_and_sends_them_on_resume() {
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let (held, free) = (TestServer::start().await, TestServer::start().await);
    let toml = format!(
        "{}{}{}",
        runtime("control"),
        webhook("held", &held, ""),
        webhook("free", &free, "")
    );
    let items = 8;
    let mut engine = run(&db, &toml).await;

    // Phase 1: both deliver.
    write_versions(&client, items, 1, 3).await;
    wait_all(&held, (items * 3) as usize, "phase 1 at the held observer").await;

    // Pause under a steady writer: the free observer keeps receiving everything.
    let paused_at = std::time::Instant::now();
    assert!(control::pause(&client, "control", "held").await.unwrap());
    assert!(!control::pause(&client, "control", "held").await.unwrap());
    let writer = {
        let client = db.client().await;
        tokio::spawn(async move { write_versions(&client, items, 4, 10).await })
    };
    eventually(Duration::from_secs(30), "events held by the pause", || {
        let client = &client;
        async move {
            let paused = control::paused_with_holds(client, "control").await.unwrap();
            (paused.len() == 1 && paused[0].held_events > 0).then_some(())
        }
    })
    .await;
    eprintln!(
        "measured: first event held {:?} after the pause",
        paused_at.elapsed()
    );
    writer.await.unwrap();
    wait_all(&free, (items * 10) as usize, "phase 2 at the free observer").await;
    let sent_while_paused = held.requests().len();

    // A restart keeps the pause (it is in the database); the checkpoint moved on meanwhile: the
    // free observer gets nothing twice.
    stop(engine).await;
    engine = run(&db, &toml).await;
    write_versions(&client, items, 11, 12).await;
    wait_all(&free, (items * 12) as usize, "phase 3 at the free observer").await;
    assert_eq!(
        held.requests().len(),
        sent_while_paused,
        "nothing is sent through a paused observer"
    );
    assert_eq!(
        free.requests().len(),
        (items * 12) as usize,
        "the checkpoint advanced while the other observer was paused: nothing sent twice"
    );
    let paused = control::paused_with_holds(&client, "control")
        .await
        .unwrap();
    assert_eq!(paused[0].observer, "held");
    assert!(
        paused[0].held_events >= i64::from(items * 2),
        "{paused:?} holds at least phase 3"
    );

    // Resume: everything held arrives, every version of every item, in order.
    assert!(control::resume(&client, "control", "held").await.unwrap());
    wait_all(&held, (items * 12) as usize, "the held events after resume").await;
    assert_every_version_in_order(&held, items, 12, "held");
    assert_every_version_in_order(&free, items, 12, "free");
    assert!(control::paused_with_holds(&client, "control")
        .await
        .unwrap()
        .is_empty());
    eventually(Duration::from_secs(10), "an empty retry queue", || {
        let client = &client;
        async move { (retry_queue::len(client, "control").await.unwrap() == 0).then_some(()) }
    })
    .await;
    stop(engine).await;
}

/// A reloadable configuration: the text the next reload compiles, and the generation to bump.
struct Reloads {
    text: Arc<Mutex<String>>,
    generation: watch::Sender<u64>,
}

impl Reloads {
    fn set(&self, text: String) {
        *self.text.lock().unwrap() = text;
        self.generation.send_modify(|g| *g += 1);
    }
}

async fn run_reloading(db: &TestDb, toml: &str) -> (Reloads, Engine) {
    let text = Arc::new(Mutex::new(toml.to_string()));
    let (generation, mut reloads) = watch::channel(0u64);
    let config = config::load(toml, &env).unwrap();
    let pipeline = Pipeline::start(&db.url, config).await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let compile = {
        let text = text.clone();
        move || -> Result<Config, ConfigErrors> { config::load(&text.lock().unwrap(), &env) }
    };
    let engine = tokio::spawn(async move {
        let shutdown = futures::FutureExt::shared(async {
            let _ = stopped.await;
        });
        pipeline
            .run_reloading(shutdown, &mut reloads, compile)
            .await
    });
    (Reloads { text, generation }, (stop, engine))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_a_steady_writer_applies_new_observers_loses_nothing_and_a_bad_one_is_refused(
) {
    let db = TestDb::new().await;
    let _client = schema(&db).await;
    let (one, two, three) = (
        TestServer::start().await,
        TestServer::start().await,
        TestServer::start().await,
    );
    let base = format!("{}{}", runtime("reload"), webhook("one", &one, ""));
    let (reloads, engine) = run_reloading(&db, &base).await;
    let items = 6;
    // The steady writer: one version of every item every 20 ms, until told to stop.
    let (written_tx, written) = watch::channel(0);
    let (stop_writer, mut writer_stopped) = watch::channel(false);
    let writer = {
        let client = db.client().await;
        tokio::spawn(async move {
            let mut version = 0;
            while !*writer_stopped.borrow_and_update() {
                version += 1;
                write_versions(&client, items, version, version).await;
                written_tx.send_replace(version);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            version
        })
    };
    let reached = |v: i32| {
        let mut written = written.clone();
        async move {
            written.wait_for(|w| *w >= v).await.unwrap();
        }
    };
    let now = || *written.borrow();

    // Add an observer while the writer runs.
    reached(5).await;
    reloads.set(format!("{base}{}", webhook("two", &two, "")));
    eventually(Duration::from_secs(30), "the added observer", || {
        let n = two.accepted().len();
        async move { (n > 0).then_some(()) }
    })
    .await;

    // A bad file is refused; the running configuration keeps delivering.
    reloads.set(format!(
        "{base}{}[observers.broken]\nentity = \"Item\"\nevent_typo = \"INSERT\"\n",
        webhook("three", &three, "")
    ));
    let after_bad = two.accepted().len();
    eventually(
        Duration::from_secs(30),
        "deliveries after the refused reload",
        || {
            let n = two.accepted().len();
            async move { (n > after_bad + 3 * items as usize).then_some(()) }
        },
    )
    .await;
    assert!(three.requests().is_empty(), "the refused file never ran");

    // Change the observers (remove `one`, keep `two`, add `three`) while the writer runs.
    reached(now() + 2).await;
    reloads.set(format!(
        "{}{}{}",
        runtime("reload"),
        webhook("two", &two, ""),
        webhook("three", &three, "")
    ));
    eventually(Duration::from_secs(30), "the third observer", || {
        let n = three.accepted().len();
        async move { (n > 0).then_some(()) }
    })
    .await;
    reached(now() + 3).await;
    stop_writer.send_replace(true);
    let last = i64::from(writer.await.unwrap());

    // Nothing lost: `two` and `three` end with the last version of every item.
    eventually(
        Duration::from_secs(60),
        "the last version at two and three",
        || {
            let (two, three) = (
                first_deliveries(&two.accepted()),
                first_deliveries(&three.accepted()),
            );
            let done = |d: &HashMap<String, Vec<i64>>| {
                d.len() == items as usize && d.values().all(|v| v.last() == Some(&last))
            };
            async move { (done(&two) && done(&three)).then_some(()) }
        },
    )
    .await;
    // Nothing skipped, order kept: each observer got every version from the first it saw (the
    // first version for `one`, which ran from the start) to its last, once each, in order.
    for (name, server) in [("one", &one), ("two", &two), ("three", &three)] {
        for (item, got) in first_deliveries(&server.accepted()) {
            let first = got[0];
            assert_eq!(
                got,
                (first..=first + got.len() as i64 - 1).collect::<Vec<_>>(),
                "{name}: {item} has every version from its first, once, in order"
            );
        }
    }
    for (item, got) in first_deliveries(&one.accepted()) {
        assert_eq!(got[0], 1, "one: {item} from the start");
    }
    stop(engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_retry_whose_observer_no_longer_accepts_the_event_is_dead_lettered_not_sent() {
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let server =
        TestServer::with(|_: &fraiseql_observers::testing::Request| Answer::status(503)).await;
    let observers = |disabled: &str, scoped: &str, removed: bool| {
        format!(
            "{}{}{}{}",
            runtime("verdict"),
            webhook("disabled", &server, disabled),
            webhook("scoped", &server, scoped),
            if removed {
                String::new()
            } else {
                webhook("removed", &server, "")
            }
        )
    };
    let before = observers("", &format!("tenant = \"{TENANT}\""), false);
    let engine = run(&db, &before).await;
    write(&client, 1, 1).await;
    eventually(Duration::from_secs(30), "three queued failures", || {
        let client = &client;
        async move { (retry_queue::len(client, "verdict").await.unwrap() == 3).then_some(()) }
    })
    .await;
    stop(engine).await;

    // The configuration changes: one observer disabled, one scoped to another tenant, one gone.
    let after = observers(
        "enabled = false",
        &format!("tenant = \"{OTHER_TENANT}\""),
        true,
    );
    let sent = server.requests().len();
    let engine = run(&db, &after).await;
    let dead = eventually(Duration::from_secs(30), "three dead letters", || {
        let client = &client;
        async move {
            let items = dead_letter::list(client, Some("verdict"), None, 10)
                .await
                .unwrap();
            (items.len() == 3).then_some(items)
        }
    })
    .await;
    let by_observer: HashMap<&str, &dead_letter::DlqItem> =
        dead.iter().map(|d| (d.observer.as_str(), d)).collect();
    for (observer, why) in [
        ("disabled", "disabled (enabled = false)"),
        ("scoped", "scoped to another tenant"),
        ("removed", "no longer configured"),
    ] {
        let item = by_observer[observer];
        assert_eq!(item.reason, "not_accepted", "{observer}");
        assert!(
            item.last_error.contains(why),
            "{observer}: {}",
            item.last_error
        );
        assert_eq!(item.attempts, 1, "{observer}: the one failed attempt");
    }
    assert_eq!(retry_queue::len(&client, "verdict").await.unwrap(), 0);
    assert_eq!(
        server.requests().len(),
        sent,
        "nothing sent for an observer that no longer accepts the event"
    );

    // An operator's retry of such a dead letter is not sent either, and says why.
    let config = config::load(&after, &env).unwrap();
    let operator = Operator::new(&db.url, "verdict", config.observers)
        .await
        .unwrap();
    let result = operator
        .retry_dead_letter(by_observer["scoped"].id)
        .await
        .unwrap()
        .expect("claimed");
    let error = result.expect_err("not sent");
    assert!(error.message().contains("not sent"), "{}", error.message());
    let item = dead_letter::get(&client, by_observer["scoped"].id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (item.status.as_str(), item.reason.as_str()),
        ("pending", "not_accepted")
    );
    assert_eq!(server.requests().len(), sent);
    stop(engine).await;
}
