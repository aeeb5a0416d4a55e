//! The gap-safe reader against a real PostgreSQL: ordering, resumption, failures, and the four
//! tests of correctness.md section 2.

use fraiseql_observers::listener::change_log::Batch;
use fraiseql_observers::testing::{connect, eventually, TestDb};
use fraiseql_observers::{
    ChangeLogListener, EntityEvent, EventKind, ListenerConfig, StartPosition,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;
use tokio_postgres::Client;
use uuid::Uuid;

pub const TENANT: &str = "11111111-1111-1111-1111-111111111111";

/// A listener that polls and reconnects fast, reading the log from the beginning.
pub fn config(db: &TestDb, consumer: &str) -> ListenerConfig {
    ListenerConfig {
        database_url: db.url.clone(),
        consumer_id: consumer.to_string(),
        start: StartPosition::Beginning,
        poll_interval: Duration::from_millis(20),
        min_poll_interval: Duration::from_millis(2),
        retry_initial_delay: Duration::from_millis(10),
        retry_max_delay: Duration::from_millis(100),
        ..ListenerConfig::default()
    }
}

/// Insert one change-log row as a FraiseQL mutation function would. Returns its sequence (`id`).
async fn insert_change(client: &Client, entity: Uuid, op: &str, after: Value) -> i64 {
    let (modification, status) = match op {
        "c" => ("INSERT", "new"),
        "u" => ("UPDATE", "updated"),
        "d" => ("DELETE", "deleted"),
        _ => ("NOOP", "noop:unchanged"),
    };
    let envelope = json!({"before": null, "after": after, "op": op,
        "source": {"schema": "public", "table": "tb_item"}});
    client
        .query_one(
            "INSERT INTO core.tb_entity_change_log
                 (fk_customer_org, object_type, object_id, modification_type, change_status, object_data)
             VALUES ($1::text::uuid, 'Item', $2, $3, $4, $5) RETURNING id",
            &[&TENANT, &entity, &modification, &status, &envelope],
        )
        .await
        .expect("insert change")
        .get(0)
}

/// Wait for the next non-empty batch (empty chunks of quarantined rows are marked done and skipped).
async fn next_events(listener: &mut ChangeLogListener, within: Duration) -> Option<Batch> {
    tokio::time::timeout(within, async {
        loop {
            let batch = listener
                .next_batch()
                .await
                .expect("next_batch")
                .expect("not stopped");
            if !batch.events.is_empty() {
                return batch;
            }
            listener.mark_done(batch.end);
        }
    })
    .await
    .ok()
}

/// Read until `n` events arrived, marking each batch done.
async fn read_n(listener: &mut ChangeLogListener, n: usize) -> Vec<EntityEvent> {
    let mut events = Vec::new();
    while events.len() < n {
        let batch = next_events(listener, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("only {} of {n} events arrived", events.len()));
        listener.mark_done(batch.end);
        events.extend(batch.events);
    }
    assert_eq!(events.len(), n, "more events than written");
    events
}

async fn nothing_more(listener: &mut ChangeLogListener) {
    if let Some(batch) = next_events(listener, Duration::from_millis(300)).await {
        panic!(
            "unexpected events: {:?}",
            batch.events.iter().map(|e| e.sequence).collect::<Vec<_>>()
        );
    }
}

#[tokio::test]
async fn test_listener_starts() {
    // On a database without our schema: a clear error that says what to run.
    let bare = TestDb::empty().await;
    let err = match ChangeLogListener::start(config(&bare, "starts")).await {
        Ok(_) => panic!("a listener started on a database without the change log"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("migrate"), "{err}");

    // On a migrated one: the consumer is claimed (a checkpoint row at epoch 1), healthy, idle.
    let db = TestDb::new().await;
    let client = db.client().await;
    let mut listener = ChangeLogListener::start(config(&db, "starts"))
        .await
        .unwrap();
    assert_eq!(listener.consumer_id(), "starts");
    assert_eq!(listener.epoch(), 1);
    let stored: i64 = client
        .query_one(
            "SELECT epoch FROM core.observer_checkpoints WHERE consumer_id = 'starts'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, listener.epoch());
    assert!(listener.stats().is_healthy());
    nothing_more(&mut listener).await;

    // A second start of the same consumer takes over with the next epoch.
    let second = ChangeLogListener::start(config(&db, "starts"))
        .await
        .unwrap();
    assert_eq!(second.epoch(), 2);
}

#[tokio::test]
async fn test_listener_polls_change_log() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let mut listener = ChangeLogListener::start(config(&db, "polls"))
        .await
        .unwrap();
    let stats = listener.stats();
    // Idle: it keeps polling (one snapshot query each) and hands out nothing.
    nothing_more(&mut listener).await;
    let idle_polls = stats.polls();
    assert!(idle_polls >= 2, "{idle_polls} polls while idle");

    // A change committed while it polls is picked up by the next poll, without a restart, and
    // so is one committed after it went idle again.
    for round in 0..2 {
        let sequence = insert_change(&client, Uuid::new_v4(), "c", json!({"round": round})).await;
        let events = read_n(&mut listener, 1).await;
        assert_eq!(events[0].sequence, sequence);
        nothing_more(&mut listener).await;
    }
    assert!(stats.polls() > idle_polls);
    assert!(stats.batch_queries() >= 2);
    assert_eq!(stats.rows_read(), 2);
}

#[tokio::test]
async fn test_sequence_tracking() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(insert_change(&client, Uuid::new_v4(), "c", json!({"n": i})).await);
    }
    let mut listener = ChangeLogListener::start(config(&db, "seq")).await.unwrap();
    let events = read_n(&mut listener, 5).await;
    assert_eq!(events.iter().map(|e| e.sequence).collect::<Vec<_>>(), ids);
    // The event id is the row's own UUID, never a random one.
    for e in &events {
        let stored: Uuid = client
            .query_one(
                "SELECT pk_entity_change_log FROM core.tb_entity_change_log WHERE id = $1",
                &[&e.sequence],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(e.id, stored);
    }
    listener.save_checkpoint().await.unwrap();
    // The stored checkpoint now covers every row: a new listener on it reads nothing.
    drop(listener);
    let mut again = ChangeLogListener::start(config(&db, "seq")).await.unwrap();
    nothing_more(&mut again).await;
    let next = insert_change(&client, Uuid::new_v4(), "c", json!({})).await;
    assert_eq!(read_n(&mut again, 1).await[0].sequence, next);
}

#[tokio::test]
async fn test_batch_processing() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(&format!(
            "INSERT INTO core.tb_entity_change_log
                 (fk_customer_org, object_type, object_id, modification_type, change_status, object_data)
             SELECT '{TENANT}', 'Item', gen_random_uuid(), 'INSERT', 'new',
                    jsonb_build_object('op', 'c', 'before', null, 'after', jsonb_build_object('n', g))
               FROM generate_series(1, 2500) g"
        ))
        .await
        .unwrap();
    let mut cfg = config(&db, "batch");
    cfg.batch_size = 1000;
    let mut listener = ChangeLogListener::start(cfg.clone()).await.unwrap();
    let first = next_events(&mut listener, Duration::from_secs(10))
        .await
        .unwrap();
    let second = next_events(&mut listener, Duration::from_secs(10))
        .await
        .unwrap();
    let third = next_events(&mut listener, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        [first.events.len(), second.events.len(), third.events.len()],
        [1000, 1000, 500]
    );
    assert_eq!(
        first.end.batch, third.end.batch,
        "one snapshot diff, handed out in chunks"
    );
    let all: Vec<i64> = [&first, &second, &third]
        .iter()
        .flat_map(|b| b.events.iter().map(|e| e.sequence))
        .collect();
    assert!(
        all.windows(2).all(|w| w[0] < w[1]),
        "ascending within the batch"
    );
    let ns: Vec<i64> = [&first, &second, &third]
        .iter()
        .flat_map(|b| {
            b.events
                .iter()
                .map(|e| e.after.as_ref().unwrap()["n"].as_i64().unwrap())
        })
        .collect();
    assert_eq!(ns, (1..=2500).collect::<Vec<_>>());

    // Done up to the end of the first chunk: the in-batch progress is stored.
    listener.mark_done(first.end);
    listener.save_checkpoint().await.unwrap();
    let row = client
        .query_one(
            "SELECT batch_snapshot IS NOT NULL, batch_done_sequence FROM core.observer_checkpoints WHERE consumer_id = 'batch'",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert_eq!(row.get::<_, Option<i64>>(1), Some(first.end.sequence));

    // A crash here resumes inside the batch: exactly the 1,500 rows not done, in order.
    drop(listener);
    let mut resumed = ChangeLogListener::start(cfg).await.unwrap();
    let rest = read_n(&mut resumed, 1500).await;
    assert_eq!(rest.first().unwrap().sequence, second.events[0].sequence);
    assert_eq!(rest.last().unwrap().sequence, third.end.sequence);
    resumed.save_checkpoint().await.unwrap();
    let row = client
        .query_one(
            "SELECT batch_snapshot IS NULL FROM core.observer_checkpoints WHERE consumer_id = 'batch'",
            &[],
        )
        .await
        .unwrap();
    assert!(
        row.get::<_, bool>(0),
        "a finished batch leaves no in-batch progress"
    );
}

/// A batch handed out in chunks while the next chunk is prefetched: a chunk with a gap in its
/// sequences (list query), consecutive chunks (range query), a bad row in a prefetched chunk, and
/// the connection lost between two chunks. Every good row arrives once, in order; the bad row is
/// quarantined once.
#[tokio::test]
async fn a_batch_read_in_chunks_survives_gaps_bad_rows_and_a_lost_connection() {
    let db = TestDb::new().await;
    let admin = connect(&fraiseql_observers::testing::admin_url()).await;
    let client = db.client().await;
    let insert = |from: i32, to: i32| {
        format!(
            "INSERT INTO core.tb_entity_change_log
                 (fk_customer_org, object_type, object_id, modification_type, change_status, object_data)
             SELECT '{TENANT}', 'Item', gen_random_uuid(), 'INSERT', 'new',
                    jsonb_build_object('op', CASE WHEN g = 1500 THEN 't' ELSE 'c' END,
                                       'after', jsonb_build_object('n', g))
               FROM generate_series({from}, {to}) g"
        )
    };
    client.batch_execute(&insert(1, 500)).await.unwrap();
    // Ten sequence numbers drawn and rolled back: a gap inside the first chunk.
    client
        .batch_execute(&format!("BEGIN; {}; ROLLBACK", insert(-10, -1)))
        .await
        .unwrap();
    client.batch_execute(&insert(501, 2500)).await.unwrap();

    let mut cfg = config(&db, "chunks");
    cfg.batch_size = 1000;
    let mut listener = ChangeLogListener::start(cfg).await.unwrap();
    let stats = listener.stats();
    let first = next_events(&mut listener, Duration::from_secs(10))
        .await
        .unwrap();
    listener.mark_done(first.end);
    assert_eq!(first.events.len(), 1000);
    let first_seq: Vec<i64> = first.events.iter().map(|e| e.sequence).collect();
    assert!(
        first_seq.windows(2).any(|w| w[1] - w[0] > 1),
        "the first chunk has the gap"
    );

    // Lose the connection while the second chunk is being (or has been) prefetched.
    admin
        .batch_execute(&format!(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
              WHERE datname = '{}' AND application_name = 'fraiseql-observers-listener:chunks'",
            db.name
        ))
        .await
        .unwrap();
    let rest = read_n(&mut listener, 1499).await;
    nothing_more(&mut listener).await;

    let ns: Vec<i64> = first
        .events
        .iter()
        .chain(&rest)
        .map(|e| e.after.as_ref().unwrap()["n"].as_i64().unwrap())
        .collect();
    let expected: Vec<i64> = (1..=2500).filter(|n| *n != 1500).collect();
    assert_eq!(ns, expected, "every good row once, in order");
    assert!(stats.reconnects() >= 1, "the lost connection was noticed");
    let quarantined: Vec<String> = client
        .query(
            "SELECT reason FROM core.observer_quarantine WHERE consumer_id = 'chunks'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert!(quarantined[0].contains("'t'"), "{quarantined:?}");
}

/// The poll counters the idle benchmark reads: an idle listener keeps polling; a new row is found
/// by a batch query.
#[tokio::test]
async fn poll_counters_count_idle_polls_and_batch_queries() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let mut listener = ChangeLogListener::start(config(&db, "counters"))
        .await
        .unwrap();
    let stats = listener.stats();
    nothing_more(&mut listener).await; // 300 ms idle, polling every 2-20 ms
    let polls = stats.polls();
    assert!(polls >= 5, "an idle listener polls: {polls}");
    let batch_queries = stats.batch_queries();
    assert!(batch_queries <= polls);
    let seq = insert_change(&client, Uuid::new_v4(), "c", json!({})).await;
    assert_eq!(read_n(&mut listener, 1).await[0].sequence, seq);
    assert!(
        stats.batch_queries() > batch_queries,
        "the row came from a batch query"
    );
    assert!(stats.polls() > polls);
}

/// An idle poll is one statement (one round trip), also while other transactions move the
/// snapshot: the snapshot and the batch's first page come from the same statement.
#[tokio::test]
async fn an_idle_poll_is_one_round_trip_even_when_the_snapshot_moves() {
    let db = TestDb::new().await;
    let mut listener = ChangeLogListener::start(config(&db, "one_trip"))
        .await
        .unwrap();
    let stats = listener.stats();
    nothing_more(&mut listener).await;
    let (polls, statements, batch_queries) =
        (stats.polls(), stats.statements(), stats.batch_queries());
    // Transactions that take an id, and so move the snapshot, without writing to the change log.
    let mover = db.client().await;
    let moving = tokio::spawn(async move {
        loop {
            mover
                .execute("SELECT pg_current_xact_id()", &[])
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    nothing_more(&mut listener).await;
    moving.abort();
    assert!(
        stats.batch_queries() > batch_queries,
        "the snapshot moved during the idle polls"
    );
    assert_eq!(
        stats.statements() - statements,
        stats.polls() - polls,
        "one statement per idle poll"
    );
}

#[tokio::test]
async fn test_resume_from_checkpoint() {
    let db = TestDb::new().await;
    let client = db.client().await;
    for i in 0..3 {
        insert_change(&client, Uuid::new_v4(), "c", json!({"n": i})).await;
    }
    let mut listener = ChangeLogListener::start(config(&db, "resume"))
        .await
        .unwrap();
    let seen = read_n(&mut listener, 3).await;
    listener.save_checkpoint().await.unwrap();
    // Handed out but never marked done: must come again after a restart.
    let pending = insert_change(&client, Uuid::new_v4(), "c", json!({"n": 3})).await;
    let batch = next_events(&mut listener, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(batch.events[0].sequence, pending);
    drop(listener);

    let later = insert_change(&client, Uuid::new_v4(), "c", json!({"n": 4})).await;
    let mut resumed = ChangeLogListener::start(config(&db, "resume"))
        .await
        .unwrap();
    let events = read_n(&mut resumed, 2).await;
    assert_eq!(
        events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [pending, later]
    );
    assert!(events
        .iter()
        .all(|e| seen.iter().all(|s| s.sequence != e.sequence)));
    nothing_more(&mut resumed).await;
}

#[tokio::test]
async fn test_new_consumer_starts_from_now_or_beginning() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let old = insert_change(&client, Uuid::new_v4(), "c", json!({})).await;
    let mut from_now = config(&db, "now");
    from_now.start = StartPosition::Now;
    let mut now = ChangeLogListener::start(from_now).await.unwrap();
    let mut beginning = ChangeLogListener::start(config(&db, "beginning"))
        .await
        .unwrap();
    let new = insert_change(&client, Uuid::new_v4(), "c", json!({})).await;
    assert_eq!(read_n(&mut now, 1).await[0].sequence, new);
    let all = read_n(&mut beginning, 2).await;
    assert_eq!(
        all.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [old, new]
    );
}

#[tokio::test]
async fn test_duplicate_event_prevention() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let mut listener = ChangeLogListener::start(config(&db, "dups")).await.unwrap();
    let mut seen = HashSet::new();
    for round in 0..5 {
        for i in 0..20 {
            insert_change(
                &client,
                Uuid::new_v4(),
                "c",
                json!({"round": round, "i": i}),
            )
            .await;
        }
        for e in read_n(&mut listener, 20).await {
            assert!(seen.insert(e.id), "event {} handed out twice", e.sequence);
        }
    }
    nothing_more(&mut listener).await;
    listener.save_checkpoint().await.unwrap();
    drop(listener);
    // A clean restart re-sends nothing old.
    let mut restarted = ChangeLogListener::start(config(&db, "dups")).await.unwrap();
    nothing_more(&mut restarted).await;
    assert_eq!(seen.len(), 100);
}

#[tokio::test]
async fn test_events_received_in_order() {
    let db = TestDb::new().await;
    let setup = db.client().await;
    setup
        .batch_execute("CREATE TABLE tb_item (id uuid PRIMARY KEY, version int NOT NULL DEFAULT 0)")
        .await
        .unwrap();
    let entities: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    for e in &entities {
        setup
            .execute("INSERT INTO tb_item (id) VALUES ($1)", &[e])
            .await
            .unwrap();
    }
    let mut listener = ChangeLogListener::start(config(&db, "order"))
        .await
        .unwrap();
    // Eight writers bump versions concurrently; each change row is written under the entity's row
    // lock (as the AFTER capture trigger does), so per entity, id order is commit order.
    let mut writers = Vec::new();
    for w in 0..8u64 {
        let client = db.client().await;
        let entities = entities.clone();
        writers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(w);
            for _ in 0..25 {
                let entity = entities[rng.random_range(0..entities.len())];
                bump(&client, entity, rng.random_range(0..3)).await;
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let events = read_n(&mut listener, 200).await;
    let mut versions: HashMap<Uuid, Vec<i64>> = HashMap::new();
    for e in &events {
        versions
            .entry(e.entity_id)
            .or_default()
            .push(e.after.as_ref().unwrap()["version"].as_i64().unwrap());
    }
    for (entity, v) in versions {
        let expected: Vec<i64> = (1..=v.len() as i64).collect();
        assert_eq!(v, expected, "entity {entity} out of order");
    }
}

/// In one transaction: bump the entity's version (taking its row lock), sleep `ms`, log the change.
async fn bump(client: &Client, entity: Uuid, ms: u64) -> i64 {
    client.batch_execute("BEGIN").await.unwrap();
    let version: i32 = client
        .query_one(
            "UPDATE tb_item SET version = version + 1 WHERE id = $1 RETURNING version",
            &[&entity],
        )
        .await
        .unwrap()
        .get(0);
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let seq = insert_change(client, entity, "u", json!({"version": version})).await;
    client.batch_execute("COMMIT").await.unwrap();
    seq
}

/// correctness.md 2, test 1.
#[tokio::test]
async fn late_commit_is_delivered_once_after_it_commits() {
    let db = TestDb::new().await;
    let mut listener = ChangeLogListener::start(config(&db, "late")).await.unwrap();
    let a = db.client().await;
    let b = db.client().await;
    a.batch_execute("BEGIN").await.unwrap();
    let a_seq = insert_change(&a, Uuid::new_v4(), "c", json!({"who": "a"})).await;
    b.batch_execute("BEGIN").await.unwrap();
    let b_seq = insert_change(&b, Uuid::new_v4(), "c", json!({"who": "b"})).await;
    b.batch_execute("COMMIT").await.unwrap();
    assert!(a_seq < b_seq);

    let first = read_n(&mut listener, 1).await;
    assert_eq!(first[0].sequence, b_seq, "only the committed row");
    nothing_more(&mut listener).await;

    a.batch_execute("COMMIT").await.unwrap();
    let second = read_n(&mut listener, 1).await;
    assert_eq!(second[0].sequence, a_seq, "the late commit arrives");
    nothing_more(&mut listener).await;
}

/// correctness.md 2, test 2.
#[tokio::test]
async fn one_entity_is_delivered_in_commit_order_across_three_sessions() {
    let db = TestDb::new().await;
    let setup = db.client().await;
    setup
        .batch_execute(
            "CREATE TABLE tb_item (id uuid PRIMARY KEY, version int NOT NULL DEFAULT 0);
                        CREATE TABLE tb_other (n int)",
        )
        .await
        .unwrap();
    let entity = Uuid::new_v4();
    setup
        .execute("INSERT INTO tb_item (id) VALUES ($1)", &[&entity])
        .await
        .unwrap();
    let mut listener = ChangeLogListener::start(config(&db, "three"))
        .await
        .unwrap();
    let (t1, t2, t3) = (db.client().await, db.client().await, db.client().await);

    // T2 writes elsewhere first: it holds the earliest xid. T3 stays open throughout.
    t2.batch_execute("BEGIN; INSERT INTO tb_other VALUES (2)")
        .await
        .unwrap();
    t3.batch_execute("BEGIN; INSERT INTO tb_other VALUES (3)")
        .await
        .unwrap();
    let t2_xid: String = t2
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .unwrap()
        .get(0);
    let a_to_b = bump(&t1, entity, 0).await; // T1: version 0 -> 1, commits
    let version: i32 = t2
        .query_one(
            "UPDATE tb_item SET version = version + 1 WHERE id = $1 RETURNING version",
            &[&entity],
        )
        .await
        .unwrap()
        .get(0);
    let b_to_c = insert_change(&t2, entity, "u", json!({"version": version})).await;
    t2.batch_execute("COMMIT").await.unwrap();
    let t1_xid: String = setup
        .query_one(
            "SELECT txid::text FROM core.tb_entity_change_log WHERE id = $1",
            &[&a_to_b],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        t2_xid.parse::<u64>().unwrap() < t1_xid.parse::<u64>().unwrap(),
        "T2 has the earlier xid"
    );

    let events = read_n(&mut listener, 2).await; // while T3 is still open
    assert_eq!(
        events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [a_to_b, b_to_c]
    );
    assert_eq!(events[0].after.as_ref().unwrap()["version"], 1);
    assert_eq!(events[1].after.as_ref().unwrap()["version"], 2);
    t3.batch_execute("COMMIT").await.unwrap();
}

/// correctness.md 2, test 3.
#[tokio::test]
async fn a_long_transaction_does_not_delay_other_rows() {
    let db = TestDb::new().await;
    let mut listener = ChangeLogListener::start(config(&db, "long")).await.unwrap();
    let long = db.client().await;
    long.batch_execute("BEGIN").await.unwrap();
    let held = insert_change(&long, Uuid::new_v4(), "c", json!({"long": true})).await;
    let started = std::time::Instant::now();
    let client = db.client().await;
    let mut quick = Vec::new();
    for i in 0..10 {
        quick.push(insert_change(&client, Uuid::new_v4(), "c", json!({"i": i})).await);
        let got = read_n(&mut listener, 1).await;
        assert_eq!(got[0].sequence, quick[i]);
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "other rows flowed while it was open"
    );
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(started.elapsed())).await;
    long.batch_execute("COMMIT").await.unwrap();
    assert_eq!(read_n(&mut listener, 1).await[0].sequence, held);
}

/// correctness.md 2, test 4: writers with random early writes, sleeps and rollbacks, a periodic
/// long writer, and a reader killed and restarted at random. Every committed row is delivered at
/// least once, no rolled-back row is, and per entity the first deliveries follow commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_writers_with_reader_restarts_lose_nothing() {
    let db = TestDb::new().await;
    let setup = db.client().await;
    setup
        .batch_execute(
            "CREATE TABLE tb_item (id uuid PRIMARY KEY, version int NOT NULL DEFAULT 0);
                        CREATE TABLE tb_other (n int)",
        )
        .await
        .unwrap();
    let entities: Vec<Uuid> = (0..12).map(|_| Uuid::new_v4()).collect();
    for e in &entities {
        setup
            .execute("INSERT INTO tb_item (id) VALUES ($1)", &[e])
            .await
            .unwrap();
    }
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut writers = Vec::new();
    for w in 0..6u64 {
        let client = db.client().await;
        let entities = entities.clone();
        writers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(100 + w);
            for _ in 0..60 {
                client.batch_execute("BEGIN").await.unwrap();
                if rng.random_bool(0.5) {
                    // An early write elsewhere: this transaction gets its xid now.
                    client
                        .batch_execute("INSERT INTO tb_other VALUES (1)")
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(rng.random_range(0..5))).await;
                }
                let entity = entities[rng.random_range(0..entities.len())];
                let version: i32 = client
                    .query_one(
                        "UPDATE tb_item SET version = version + 1 WHERE id = $1 RETURNING version",
                        &[&entity],
                    )
                    .await
                    .unwrap()
                    .get(0);
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..4))).await;
                insert_change(&client, entity, "u", json!({"version": version})).await;
                if rng.random_bool(0.15) {
                    client.batch_execute("ROLLBACK").await.unwrap();
                } else {
                    client.batch_execute("COMMIT").await.unwrap();
                }
            }
        }));
    }
    let long_writer = {
        let client = db.client().await;
        let writing = writing.clone();
        tokio::spawn(async move {
            let entity = Uuid::new_v4();
            client
                .execute("INSERT INTO tb_item (id) VALUES ($1)", &[&entity])
                .await
                .unwrap();
            while writing.load(std::sync::atomic::Ordering::Relaxed) {
                client.batch_execute("BEGIN").await.unwrap();
                let version: i32 = client
                    .query_one(
                        "UPDATE tb_item SET version = version + 1 WHERE id = $1 RETURNING version",
                        &[&entity],
                    )
                    .await
                    .unwrap()
                    .get(0);
                insert_change(&client, entity, "u", json!({"version": version})).await;
                tokio::time::sleep(Duration::from_millis(400)).await;
                client.batch_execute("COMMIT").await.unwrap();
            }
        })
    };

    // The reader: runs for a random while, marks done and saves at random, then is dropped.
    let mut rng = StdRng::seed_from_u64(7);
    let mut deliveries: Vec<(u32, EntityEvent)> = Vec::new();
    let mut run = 0u32;
    let writers_done = async {
        for w in writers {
            w.await.unwrap();
        }
    };
    tokio::pin!(writers_done);
    let mut finished = false;
    while !finished {
        run += 1;
        let mut cfg = config(&db, "random");
        cfg.batch_size = rng.random_range(1..50);
        let mut listener = ChangeLogListener::start(cfg).await.unwrap();
        let lifetime = Duration::from_millis(rng.random_range(50..400));
        let until = tokio::time::Instant::now() + lifetime;
        loop {
            tokio::select! {
                _ = &mut writers_done, if !finished => { finished = true; }
                _ = tokio::time::sleep_until(until) => break,
                batch = listener.next_batch() => {
                    let batch = batch.unwrap().unwrap();
                    deliveries.extend(batch.events.into_iter().map(|e| (run, e)));
                    if rng.random_bool(0.7) {
                        listener.mark_done(batch.end);
                    }
                    if rng.random_bool(0.3) {
                        listener.save_checkpoint().await.unwrap();
                    }
                }
            }
        }
    }
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    long_writer.await.unwrap();
    // A final reader drains the rest.
    let mut listener = ChangeLogListener::start(config(&db, "random"))
        .await
        .unwrap();
    run += 1;
    let committed: Vec<i64> = setup
        .query("SELECT id FROM core.tb_entity_change_log ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    loop {
        let seen: HashSet<i64> = deliveries.iter().map(|(_, e)| e.sequence).collect();
        if committed.iter().all(|s| seen.contains(s)) {
            break;
        }
        let batch = next_events(&mut listener, Duration::from_secs(10))
            .await
            .expect("the final reader receives what is missing");
        listener.mark_done(batch.end);
        deliveries.extend(batch.events.into_iter().map(|e| (run, e)));
    }
    let committed_set: HashSet<i64> = committed.iter().copied().collect();
    assert!(
        committed.len() > 250,
        "the run wrote enough: {}",
        committed.len()
    );
    for (_, e) in &deliveries {
        assert!(
            committed_set.contains(&e.sequence),
            "row {} was never committed",
            e.sequence
        );
        assert_eq!(e.kind, EventKind::Updated);
    }
    // Per entity, first deliveries come in commit order: versions 1, 2, 3, ... with no gap.
    let mut first: BTreeMap<Uuid, Vec<i64>> = BTreeMap::new();
    let mut delivered = HashSet::new();
    for (_, e) in &deliveries {
        if delivered.insert(e.sequence) {
            first
                .entry(e.entity_id)
                .or_default()
                .push(e.after.as_ref().unwrap()["version"].as_i64().unwrap());
        }
    }
    for (entity, versions) in &first {
        let committed_versions: i64 = setup
            .query_one("SELECT version FROM tb_item WHERE id = $1", &[entity])
            .await
            .unwrap()
            .get::<_, i32>(0)
            .into();
        // Rolled-back bumps free their version number again, so versions are 1..=final.
        assert_eq!(
            versions,
            &(1..=committed_versions).collect::<Vec<_>>(),
            "entity {entity}"
        );
    }
    // Within one reader run, one entity's deliveries never go backwards.
    let mut last: HashMap<(u32, Uuid), i64> = HashMap::new();
    for (run, e) in &deliveries {
        let v = e.after.as_ref().unwrap()["version"].as_i64().unwrap();
        if let Some(prev) = last.insert((*run, e.entity_id), v) {
            assert!(
                v > prev,
                "run {run}: entity {} went from {prev} to {v}",
                e.entity_id
            );
        }
    }
}

#[tokio::test]
async fn test_malformed_entry_handling() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let good_before = insert_change(&client, Uuid::new_v4(), "c", json!({"n": 1})).await;
    // An unknown operation code and an envelope that is not an object.
    let bad_op = insert_change(&client, Uuid::new_v4(), "t", json!({"n": 2})).await;
    let not_object: i64 = client
        .query_one(
            &format!(
                "INSERT INTO core.tb_entity_change_log
                     (fk_customer_org, object_type, object_id, modification_type, change_status, object_data)
                 VALUES ('{TENANT}', 'Item', gen_random_uuid(), 'INSERT', 'new', '\"just a string\"') RETURNING id"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let good_after = insert_change(&client, Uuid::new_v4(), "c", json!({"n": 3})).await;

    let mut listener = ChangeLogListener::start(config(&db, "malformed"))
        .await
        .unwrap();
    let events = read_n(&mut listener, 2).await;
    assert_eq!(
        events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [good_before, good_after]
    );
    assert_eq!(listener.stats().quarantined(), 2);
    let rows = client
        .query(
            "SELECT sequence, reason, row_data->>'object_type' FROM core.observer_quarantine
              WHERE consumer_id = 'malformed' ORDER BY sequence",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].get::<_, i64>(0), bad_op);
    let reason: String = rows[0].get(1);
    assert!(
        reason.contains("'t'"),
        "reason names the operation: {reason}"
    );
    assert_eq!(rows[1].get::<_, i64>(0), not_object);
    assert_eq!(
        rows[0].get::<_, Option<String>>(2).as_deref(),
        Some("Item"),
        "the row is copied"
    );
    // The stream did not stall: the checkpoint passes the bad rows.
    listener.save_checkpoint().await.unwrap();
    drop(listener);
    let mut again = ChangeLogListener::start(config(&db, "malformed"))
        .await
        .unwrap();
    nothing_more(&mut again).await;
}

#[tokio::test]
async fn test_connection_retry() {
    let db = TestDb::new().await;
    let admin = connect(&fraiseql_observers::testing::admin_url()).await;
    let client = db.client().await;
    let mut listener = ChangeLogListener::start(config(&db, "retry"))
        .await
        .unwrap();
    let stats = listener.stats();
    let first = insert_change(&client, Uuid::new_v4(), "c", json!({})).await;
    assert_eq!(read_n(&mut listener, 1).await[0].sequence, first);

    // Refuse new connections and kill the listener's: it fails, keeps retrying, turns unhealthy.
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS false",
            db.name
        ))
        .await
        .unwrap();
    let terminate = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE datname = '{}' AND application_name LIKE 'fraiseql-observers-listener:%'",
        db.name
    );
    admin.batch_execute(&terminate).await.unwrap();
    let missed = insert_change(&client, Uuid::new_v4(), "c", json!({"during": "outage"})).await;
    let reader = tokio::spawn(async move {
        let events = read_n(&mut listener, 1).await;
        (listener, events)
    });
    eventually(
        Duration::from_secs(20),
        "the listener to report itself unhealthy",
        || {
            let unhealthy = !stats.is_healthy();
            async move { unhealthy.then_some(()) }
        },
    )
    .await;

    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS true",
            db.name
        ))
        .await
        .unwrap();
    let (mut listener, events) = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("the listener recovers")
        .unwrap();
    assert_eq!(
        events[0].sequence, missed,
        "the change written during the outage arrives"
    );
    assert!(listener.stats().is_healthy());
    assert!(listener.stats().reconnects() >= 1);
    nothing_more(&mut listener).await;
}

#[tokio::test]
async fn stop_returns_promptly() {
    let db = TestDb::new().await;
    let mut listener = ChangeLogListener::start(config(&db, "stop")).await.unwrap();
    let stop = listener.stop_handle();
    let waiting = tokio::spawn(async move { listener.next_batch().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    stop.stop();
    let result = tokio::time::timeout(Duration::from_secs(1), waiting)
        .await
        .unwrap()
        .unwrap();
    assert!(result.unwrap().is_none());
    assert!(started.elapsed() < Duration::from_millis(500));
}

#[tokio::test]
async fn a_second_instance_fences_the_first() {
    let db = TestDb::new().await;
    let client = db.client().await;
    insert_change(&client, Uuid::new_v4(), "c", json!({})).await;
    let mut first = ChangeLogListener::start(config(&db, "fenced"))
        .await
        .unwrap();
    let batch = read_n(&mut first, 1).await;
    let second = ChangeLogListener::start(config(&db, "fenced"))
        .await
        .unwrap();
    assert!(second.epoch() > first.epoch());
    first.mark_done(batch[0].position);
    match first.save_checkpoint().await {
        Err(fraiseql_observers::Error::Fenced { .. }) => {}
        other => panic!("expected Fenced, got {other:?}"),
    }
}

#[tokio::test]
async fn a_checkpoint_ahead_of_the_database_is_refused() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO core.observer_checkpoints (consumer_id, snapshot) VALUES ('ahead', '999999999:999999999:')",
        )
        .await
        .unwrap();
    match ChangeLogListener::start(config(&db, "ahead")).await {
        Err(e @ fraiseql_observers::Error::CheckpointAhead { .. }) => {
            assert!(
                e.to_string().contains("checkpoint reset"),
                "says how to recover: {e}"
            );
        }
        Err(e) => panic!("expected CheckpointAhead, got {e}"),
        Ok(_) => panic!("expected CheckpointAhead, got a listener"),
    }
}

#[tokio::test]
async fn notify_hint_wakes_the_listener_early() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute("SELECT core.observer_set_notify(true)")
        .await
        .unwrap();
    let mut cfg = config(&db, "notify");
    cfg.notify = true;
    cfg.min_poll_interval = Duration::from_secs(5);
    cfg.poll_interval = Duration::from_secs(5);
    let mut listener = ChangeLogListener::start(cfg).await.unwrap();
    nothing_more(&mut listener).await; // now idle in a 5 s sleep
    let started = std::time::Instant::now();
    let seq = insert_change(&client, Uuid::new_v4(), "c", json!({})).await;
    assert_eq!(read_n(&mut listener, 1).await[0].sequence, seq);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "woken by NOTIFY, not by the 5 s poll"
    );
}

/// correctness.md 2, "plan trap": with a generic plan the batch query must still use the
/// (txid, id) index on a large table.
#[tokio::test]
async fn batch_query_keeps_an_index_plan_under_a_generic_plan() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(&format!(
            "INSERT INTO core.tb_entity_change_log
                 (fk_customer_org, object_type, object_id, modification_type, change_status, object_data)
             SELECT '{TENANT}', 'Item', gen_random_uuid(), 'INSERT', 'new', '{{\"op\":\"c\",\"after\":{{}}}}'
               FROM generate_series(1, 100000);
             ANALYZE core.tb_entity_change_log;
             SET plan_cache_mode = force_generic_plan;"
        ))
        .await
        .unwrap();
    // The listener's own statement text.
    let ids_sql = fraiseql_observers::listener::change_log::batch_ids_sql("id");
    client
        .batch_execute(&format!(
            "PREPARE batch (text, text, text[], text, bigint) AS {ids_sql}"
        ))
        .await
        .unwrap();
    let snapshot: String = client
        .query_one("SELECT pg_current_snapshot()::text", &[])
        .await
        .unwrap()
        .get(0);
    let xmax: String = client
        .query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text", &[])
        .await
        .unwrap()
        .get(0);
    let plan: Vec<String> = client
        .query(
            &format!("EXPLAIN EXECUTE batch('{xmax}', '{xmax}', '{{}}', '{snapshot}', -1)"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(
        !plan.contains("Seq Scan"),
        "generic plan scans the table:\n{plan}"
    );
    assert!(
        plan.contains("idx_entity_log_txid"),
        "generic plan uses the txid index:\n{plan}"
    );
}
