//! Backfill (issue 10, item 1) against a real database and the whole pipeline: existing rows
//! become SNAPSHOT events, only for the observers that ask (and that the backfill names), in
//! order with the live changes of the same rows.

use fraiseql_observers::backfill::{self, Backfill, BackfillSpec, Outcome};
use fraiseql_observers::pipeline::{self, Pipeline};
use fraiseql_observers::testing::{eventually, Request, TestDb, TestServer};
use fraiseql_observers::{config, ListenerConfig};
use rand::Rng;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::Client;

const TENANT: &str = "11111111-1111-1111-1111-111111111111";

fn env(_: &str) -> Option<String> {
    None
}

/// `item_sync` wants snapshots and live changes; `updates_only` does not ask for snapshots;
/// `other_snapshots` asks for snapshots but is not named by the backfill.
fn observers(receiver: &TestServer) -> String {
    format!(
        r#"
[observers.runtime]
consumer_id = "backfill"
poll_interval_ms = 20
checkpoint_interval_ms = 50
concurrency = 8

[observers.item_sync]
entity = "Item"
event_type = ["INSERT", "UPDATE", "DELETE", "SNAPSHOT"]

[[observers.item_sync.actions]]
type = "webhook"
url = "{}"
allow_private_networks = true

[observers.updates_only]
entity = "Item"
event_type = "UPDATE"

[[observers.updates_only.actions]]
type = "webhook"
url = "{}"
allow_private_networks = true

[observers.other_snapshots]
entity = "*"
event_type = "SNAPSHOT"

[[observers.other_snapshots.actions]]
type = "webhook"
url = "{}"
allow_private_networks = true
"#,
        receiver.url("/items"),
        receiver.url("/updates"),
        receiver.url("/other"),
    )
}

async fn start(db: &TestDb, receiver: &TestServer) -> Pipeline {
    let config = config::load(&observers(receiver), &env).unwrap_or_else(|e| panic!("{e}"));
    let listener = ListenerConfig {
        min_poll_interval: Duration::from_millis(2),
        ..pipeline::listener_config(&db.url, &config.runtime)
    };
    Pipeline::start_with(listener, config.observers, config.runtime)
        .await
        .unwrap()
}

/// `rows` items that exist before capture is enabled (so only a backfill can deliver them).
async fn existing_items(db: &TestDb, rows: i32) -> Client {
    let client = db.client().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE tb_item (
                 pk_item INTEGER PRIMARY KEY,
                 id UUID DEFAULT gen_random_uuid() UNIQUE NOT NULL,
                 version INTEGER NOT NULL,
                 secret TEXT NOT NULL DEFAULT 's3cret',
                 fk_customer_org UUID NOT NULL);
             INSERT INTO tb_item (pk_item, version, fk_customer_org)
                  SELECT g, 0, '{TENANT}' FROM generate_series(1, {rows}) g;
             ANALYZE tb_item;
             SELECT core.observer_enable_capture('tb_item', 'Item', 'fk_customer_org', '{{secret}}');"
        ))
        .await
        .unwrap();
    client
}

/// Per entity, the (sequence, kind, version) of each first delivery, in arrival order.
fn by_entity(requests: &[Request]) -> HashMap<String, Vec<(i64, String, i64)>> {
    let mut seen = HashSet::new();
    let mut out: HashMap<String, Vec<(i64, String, i64)>> = HashMap::new();
    for r in requests {
        if seen.insert(r.id()) {
            let body = r.json();
            let entity = body["data"]["entity_id"].as_str().unwrap().to_string();
            out.entry(entity).or_default().push((
                body["data"]["sequence"].as_i64().unwrap(),
                body["data"]["kind"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                body["data"]["after"]["version"].as_i64().unwrap_or(-1),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backfill_of_100k_rows_under_a_writer_ends_with_the_tables_state_in_order() {
    const ROWS: i32 = 100_000;
    let db = TestDb::new().await;
    let client = existing_items(&db, ROWS).await;
    let receiver = TestServer::start().await;
    let pipeline = start(&db, &receiver).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let engine = tokio::spawn(pipeline.run(async {
        let _ = stopped.await;
    }));

    // A writer, on a thread of its own, updates random rows for as long as the backfill runs:
    // every other update lands just ahead of the backfill's position (the rows its current or
    // next page reads), where a snapshot and a live change of the same row race.
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let writing = writing.clone();
        let url = db.url.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let client = fraiseql_observers::testing::connect(&url).await;
                let mut updates = 0u32;
                while writing.load(Ordering::Relaxed) || updates < 200 {
                    let item: i32 = if updates.is_multiple_of(2) {
                        rand::rng().random_range(1..=ROWS)
                    } else {
                        let done: i64 = client
                            .query_opt("SELECT rows_done FROM core.observer_backfill", &[])
                            .await
                            .unwrap()
                            .map_or(0, |r| r.get(0));
                        let near =
                            i32::try_from(done).unwrap() + rand::rng().random_range(1..=4000);
                        near.min(ROWS)
                    };
                    client
                        .execute(
                            "UPDATE tb_item SET version = version + 1 WHERE pk_item = $1",
                            &[&item],
                        )
                        .await
                        .unwrap();
                    updates += 1;
                }
                updates
            })
        })
    };

    let mut backfill_client = db.client().await;
    let mut spec = BackfillSpec::new("tb_item");
    spec.observers = vec!["item_sync".into()];
    spec.batch_size = 2000;
    let started = std::time::Instant::now();
    let job = Backfill::start(&backfill_client, &spec).await.unwrap();
    let mut pages = 0;
    let outcome = job.run(&mut backfill_client, |_| pages += 1).await.unwrap();
    writing.store(false, Ordering::Relaxed);
    let updates = writer.join().unwrap();
    let backfilled = started.elapsed();
    assert_eq!(
        outcome,
        Outcome::Done {
            rows: i64::from(ROWS)
        }
    );
    assert!(pages >= 50, "{pages} pages");

    // Every change-log row (snapshots and updates) reaches item_sync.
    let expected: i64 = client
        .query_one("SELECT count(*) FROM core.tb_entity_change_log", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(expected, i64::from(ROWS) + i64::from(updates));
    let delivered = eventually(
        Duration::from_secs(600),
        "every change to reach item_sync",
        || {
            let receiver = &receiver;
            async move {
                // Copying 100k recorded requests is not free: look once a second.
                tokio::time::sleep(Duration::from_secs(1)).await;
                let requests = receiver.accepted_on("/items");
                let ids: HashSet<String> = requests.iter().map(Request::id).collect();
                (ids.len() as i64 == expected).then(|| by_entity(&requests))
            }
        },
    )
    .await;

    eprintln!(
        "backfill of {ROWS} rows: {backfilled:?} ({updates} concurrent updates); all delivered after {:?}",
        started.elapsed()
    );

    // The receiver ends with exactly the table's state, and each entity's deliveries came in
    // change-log order, starting with its snapshot.
    let table: HashMap<String, i64> = client
        .query("SELECT id::text, version FROM tb_item", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), i64::from(r.get::<_, i32>(1))))
        .collect();
    assert_eq!(delivered.len(), table.len());
    for (entity, version) in &table {
        let events = &delivered[entity];
        assert_eq!(events.last().unwrap().2, *version, "{entity}: {events:?}");
        assert!(
            events.windows(2).all(|w| w[0].0 < w[1].0),
            "{entity}: out of order {events:?}"
        );
        let snapshots = events.iter().filter(|e| e.1 == "SNAPSHOT").count();
        assert_eq!(snapshots, 1, "{entity}: {events:?}");
        // Never stale-after-fresh: versions never go back.
        assert!(
            events.windows(2).all(|w| w[0].2 <= w[1].2),
            "{entity}: {events:?}"
        );
    }

    // The snapshot body: the op, the excluded column gone; no one else got snapshots.
    let snapshot = receiver
        .accepted_on("/items")
        .into_iter()
        .find(|r| r.json()["data"]["kind"] == "SNAPSHOT")
        .unwrap()
        .json();
    assert_eq!(snapshot["type"], "item.snapshot");
    assert_eq!(snapshot["data"]["op"], "r");
    assert_eq!(snapshot["data"]["source"]["snapshot"], "incremental");
    assert!(snapshot["data"]["after"].get("secret").is_none());
    assert!(snapshot["data"]["before"].is_null());
    assert!(receiver.accepted_on("/other").is_empty());
    assert!(receiver
        .accepted_on("/updates")
        .iter()
        .all(|r| r.json()["data"]["kind"] == "UPDATE"));

    let _ = stop.send(());
    engine.await.unwrap().unwrap();
    let status = backfill::list(&client).await.unwrap();
    assert_eq!(status[0].state, "done");
    assert!(!status[0].active);
}

/// Without `--observer`, every observer asking for SNAPSHOT receives them; a second backfill of
/// a table with an unfinished one resumes it, and a cancelled one stops.
#[tokio::test]
async fn snapshots_go_to_every_observer_asking_and_backfills_resume_and_cancel() {
    let db = TestDb::new().await;
    let client = existing_items(&db, 50).await;
    let receiver = TestServer::start().await;
    let pipeline = start(&db, &receiver).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let engine = tokio::spawn(pipeline.run(async {
        let _ = stopped.await;
    }));

    // A predicate: only the even items.
    let mut spec = BackfillSpec::new("tb_item");
    spec.predicate = Some("pk_item % 2 = 0".into());
    spec.batch_size = 7;
    let mut c = db.client().await;
    let job = Backfill::start(&c, &spec).await.unwrap();
    assert!(!job.resumed);
    // Another process cannot take it while this one holds it.
    let other = db.client().await;
    let err = Backfill::start(&other, &spec).await.unwrap_err();
    assert!(err.to_string().contains("another process"), "{err}");
    // Different options while it is unfinished: refused.
    let mut different = spec.clone();
    different.predicate = None;
    let err = Backfill::start(&other, &different).await.unwrap_err();
    assert!(err.to_string().contains("unfinished"), "{err}");
    assert_eq!(
        job.run(&mut c, |_| {}).await.unwrap(),
        Outcome::Done { rows: 25 }
    );
    drop(c);
    eventually(Duration::from_secs(30), "25 snapshots at both", || {
        let items = receiver.accepted_on("/items").len();
        let other = receiver.accepted_on("/other").len();
        async move { (items == 25 && other == 25).then_some(()) }
    })
    .await;
    assert!(receiver.accepted_on("/updates").is_empty());

    // Cancel: a new backfill is cancelled before its first page.
    let c = db.client().await;
    let mut c2 = db.client().await;
    let job = Backfill::start(&c2, &BackfillSpec::new("tb_item"))
        .await
        .unwrap();
    assert_eq!(backfill::cancel(&c, "tb_item").await.unwrap(), Some(job.id));
    assert_eq!(
        job.run(&mut c2, |_| {}).await.unwrap(),
        Outcome::Cancelled { rows: 0 }
    );
    assert_eq!(backfill::cancel(&c, "tb_item").await.unwrap(), None);
    let states: Vec<String> = backfill::list(&client)
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.state)
        .collect();
    assert_eq!(states, ["cancelled", "done"]);

    // A table that is not captured is refused, naming what to do.
    client
        .batch_execute("CREATE TABLE tb_plain (id UUID PRIMARY KEY)")
        .await
        .unwrap();
    let err = Backfill::start(&c, &BackfillSpec::new("tb_plain"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("capture enable"), "{err}");

    let _ = stop.send(());
    engine.await.unwrap().unwrap();
}

/// A cache action treats a snapshot as an upsert: the key gets the row's state (real Redis).
#[tokio::test]
async fn a_cache_refresh_stores_a_snapshot_like_an_upsert() {
    use crate::sample::{compile, env_of, order_event, run};
    let prefix = format!("fo-test-snapshot-{}:", rand::random::<u32>());
    let table: toml::Table = toml::from_str(&format!(
        "url = \"redis://127.0.0.1:6379\"\nkey_prefix = '{prefix}'"
    ))
    .unwrap();
    let settings = fraiseql_observers::actions::RedisSettings::parse(
        &table,
        "observers.runtime.redis",
        &env_of(&[]),
    )
    .unwrap();
    let action = compile(
        "type = \"cache\"\noperation = \"refresh\"\nkeys = [\"order:{{ data.id }}\"]",
        &env_of(&[]),
        None,
        Some(&settings),
    )
    .unwrap();
    let state = serde_json::json!({"id": 7, "status": "paid"});
    let snapshot = order_event(
        fraiseql_observers::EventKind::Snapshot,
        None,
        Some(state.clone()),
    );
    run(&action, &snapshot, 1).await.unwrap();
    let mut conn = redis::Client::open("redis://127.0.0.1:6379")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!("{prefix}order:7");
    let value: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    redis::cmd("DEL")
        .arg(&key)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&value).unwrap(),
        state
    );
}
