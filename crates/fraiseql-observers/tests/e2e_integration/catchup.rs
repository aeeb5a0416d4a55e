//! Bounded catch-up against a real PostgreSQL (issue 9, item 3): a large backlog is read in pages
//! of sequences and chunks bounded by rows and bytes, a `statement_timeout` shrinks the read, a row
//! the server fails to produce is quarantined, and a large batch resumes mid-batch after a stop.

use crate::listener::{config, TENANT};
use fraiseql_observers::listener::change_log::Batch;
use fraiseql_observers::testing::TestDb;
use fraiseql_observers::{ChangeLogListener, EntityEvent};
use std::time::Duration;
use tokio_postgres::Client;

/// Rows `from..=to` of a backlog, in transactions of at most 5,000 rows: envelope `{"op": "c",
/// "after": {"n": g, "pad": ...}}` plus, for the rows in `marked`, a top-level `key` (read by
/// the test cast below).
async fn fill(client: &Client, from: i64, to: i64, marked: (i64, i64), key: &str, value: &str) {
    let mut first = from;
    while first <= to {
        let last = (first + 4999).min(to);
        client
            .batch_execute(&format!(
                "INSERT INTO core.tb_entity_change_log
                     (fk_customer_org, object_type, object_id, modification_type, change_status, object_data)
                 SELECT '{TENANT}', 'Item', gen_random_uuid(), 'INSERT', 'new',
                        jsonb_build_object('op', 'c',
                            'after', jsonb_build_object('n', g, 'pad', repeat('x', 200)))
                        || CASE WHEN g BETWEEN {} AND {} THEN jsonb_build_object('{key}', {value})
                                ELSE '{{}}'::jsonb END
                   FROM generate_series({first}, {last}) g",
                marked.0, marked.1
            ))
            .await
            .expect("fill the backlog");
        first = last + 1;
    }
}

/// In this test database only: reading a change-log payload as text (the reader's `::text`) fails
/// when it has a top-level `boom` key, and sleeps `slow` seconds when it has a `slow` key.
async fn install_test_cast(client: &Client) {
    client
        .batch_execute(
            "CREATE FUNCTION test_jsonb_text(j jsonb) RETURNS text STRICT LANGUAGE plpgsql AS $$
             BEGIN
                 IF j ? 'boom' THEN RAISE EXCEPTION 'boom: this value cannot be read'; END IF;
                 IF j ? 'slow' THEN PERFORM pg_sleep((j->>'slow')::float8); END IF;
                 RETURN jsonb_out(j)::text;
             END $$;
             CREATE CAST (jsonb AS text) WITH FUNCTION test_jsonb_text(jsonb);",
        )
        .await
        .expect("install the test cast");
}

/// Read batches (marking each done) until `n` events arrived.
async fn read_events(listener: &mut ChangeLogListener, n: usize) -> (Vec<EntityEvent>, usize) {
    let mut events = Vec::new();
    let mut quarantined = 0;
    tokio::time::timeout(Duration::from_secs(120), async {
        while events.len() < n {
            let batch: Batch = listener
                .next_batch()
                .await
                .expect("next_batch")
                .expect("not stopped");
            listener.mark_done(batch.end);
            quarantined += batch.quarantined;
            events.extend(batch.events);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {} of {n} events arrived", events.len()));
    (events, quarantined)
}

async fn nothing_more(listener: &mut ChangeLogListener) {
    let more = tokio::time::timeout(Duration::from_millis(300), async {
        loop {
            let batch = listener.next_batch().await.unwrap().unwrap();
            if !batch.events.is_empty() {
                return batch;
            }
            listener.mark_done(batch.end);
        }
    })
    .await;
    if let Ok(batch) = more {
        panic!(
            "unexpected events: {:?}",
            batch.events.iter().map(|e| e.sequence).collect::<Vec<_>>()
        );
    }
}

fn ns(events: &[EntityEvent]) -> Vec<i64> {
    events
        .iter()
        .map(|e| e.after.as_ref().unwrap()["n"].as_i64().unwrap())
        .collect()
}

/// 50,000 rows behind, read with pages of 2,000 sequences and chunks of at most 32 KiB: every row
/// once, in order, and never more held at once than the bounds.
#[tokio::test]
async fn a_large_backlog_is_read_in_bounded_pages_and_chunks() {
    let db = TestDb::new().await;
    let client = db.client().await;
    fill(&client, 1, 50_000, (0, -1), "none", "0").await;
    let sequences: Vec<i64> = client
        .query("SELECT id FROM core.tb_entity_change_log ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();

    let mut cfg = config(&db, "bounded");
    cfg.batch_size = 1000;
    cfg.id_page_size = 2000;
    cfg.max_chunk_bytes = 32 * 1024;
    let mut listener = ChangeLogListener::start(cfg).await.unwrap();
    let stats = listener.stats();
    let (events, quarantined) = read_events(&mut listener, 50_000).await;
    // 25 full pages: the batch is known complete once its last chunk is done, without another
    // call to `next_batch`.
    listener.save_checkpoint().await.unwrap();
    let open: bool = client
        .query_one(
            "SELECT batch_snapshot IS NOT NULL FROM core.observer_checkpoints WHERE consumer_id = 'bounded'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!open, "a batch read whole leaves no in-batch progress");
    nothing_more(&mut listener).await;

    assert_eq!(quarantined, 0);
    assert_eq!(
        events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        sequences,
        "every row once, in sequence order"
    );
    assert_eq!(ns(&events), (1..=50_000).collect::<Vec<_>>());
    assert!(
        stats.largest_id_page() <= 2000,
        "id page held: {}",
        stats.largest_id_page()
    );
    assert!(
        stats.id_pages() >= 25,
        "the batch was read in pages: {}",
        stats.id_pages()
    );
    assert!(
        stats.largest_chunk_bytes() <= 32 * 1024,
        "chunk bytes held: {}",
        stats.largest_chunk_bytes()
    );
    assert!(
        stats.largest_chunk_rows() < 1000,
        "the byte bound made chunks smaller than batch_size: {}",
        stats.largest_chunk_rows()
    );
}

/// A stretch of slow rows makes a 1,000-row chunk outlast `statement_timeout`: the reader reads
/// it in smaller chunks rather than retrying the same chunk forever.
#[tokio::test]
async fn a_statement_timeout_shrinks_the_chunk() {
    let db = TestDb::new().await;
    let client = db.client().await;
    install_test_cast(&client).await;
    fill(&client, 1, 2000, (700, 899), "slow", "0.01").await;

    let mut cfg = config(&db, "timeout");
    cfg.batch_size = 1000;
    cfg.statement_timeout = Some(Duration::from_millis(500));
    let mut listener = ChangeLogListener::start(cfg).await.unwrap();
    let stats = listener.stats();
    let (events, quarantined) = read_events(&mut listener, 2000).await;
    nothing_more(&mut listener).await;

    assert_eq!(quarantined, 0, "a slow row is not a bad row");
    assert_eq!(ns(&events), (1..=2000).collect::<Vec<_>>());
    assert!(stats.shrinks() >= 1, "the timeout shrank the chunk");
    let timeouts: i64 = client
        .query_one(
            "SELECT count(*) FROM core.observer_quarantine WHERE consumer_id = 'timeout'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(timeouts, 0);
}

/// One row the server cannot produce (its payload's cast raises) in a 1,000-row chunk: the chunk
/// is halved down to that row, which is quarantined with the server's reason; every other row is
/// delivered, in order.
#[tokio::test]
async fn a_row_the_server_fails_on_is_quarantined_and_the_rest_delivered() {
    let db = TestDb::new().await;
    let client = db.client().await;
    install_test_cast(&client).await;
    fill(&client, 1, 3000, (1234, 1234), "boom", "true").await;
    let bad: i64 = client
        .query_one(
            "SELECT id FROM core.tb_entity_change_log WHERE object_data ? 'boom'",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    let mut cfg = config(&db, "bisect");
    cfg.batch_size = 1000;
    let mut listener = ChangeLogListener::start(cfg).await.unwrap();
    let stats = listener.stats();
    let (events, quarantined) = read_events(&mut listener, 2999).await;
    nothing_more(&mut listener).await;

    assert_eq!(quarantined, 1);
    let expected: Vec<i64> = (1..=3000).filter(|n| *n != 1234).collect();
    assert_eq!(ns(&events), expected, "every other row once, in order");
    assert!(stats.shrinks() >= 1);
    let rows = client
        .query(
            "SELECT sequence, reason, row_data IS NOT NULL FROM core.observer_quarantine
              WHERE consumer_id = 'bisect'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, i64>(0), bad);
    let reason: String = rows[0].get(1);
    assert!(reason.contains("boom"), "{reason}");
    assert!(rows[0].get::<_, bool>(2), "a copy of the row is kept");
}

/// A batch of 10,000 rows read in pages of 1,000: stopped after 4,500 events were done, a new
/// listener resumes from the in-batch progress, with the rest only, in order.
#[tokio::test]
async fn a_paged_batch_resumes_mid_batch_after_a_stop() {
    let db = TestDb::new().await;
    let client = db.client().await;
    fill(&client, 1, 10_000, (0, -1), "none", "0").await;

    let mut cfg = config(&db, "resume");
    cfg.batch_size = 500;
    cfg.id_page_size = 1000;
    let mut listener = ChangeLogListener::start(cfg.clone()).await.unwrap();
    let (first, _) = read_events(&mut listener, 4500).await;
    assert_eq!(ns(&first), (1..=4500).collect::<Vec<_>>());
    listener.save_checkpoint().await.unwrap();
    // Handed out, never done: comes again.
    let pending = listener.next_batch().await.unwrap().unwrap();
    assert_eq!(ns(&pending.events)[0], 4501);
    drop(listener);

    let row = client
        .query_one(
            "SELECT batch_done_sequence FROM core.observer_checkpoints WHERE consumer_id = 'resume'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, Option<i64>>(0),
        Some(first.last().unwrap().sequence),
        "the progress inside the batch is stored"
    );

    let mut resumed = ChangeLogListener::start(cfg).await.unwrap();
    let stats = resumed.stats();
    let (rest, _) = read_events(&mut resumed, 5500).await;
    nothing_more(&mut resumed).await;
    assert_eq!(ns(&rest), (4501..=10_000).collect::<Vec<_>>());
    assert!(stats.largest_id_page() <= 1000);
}

/// The plan trap (correctness.md 2) for the two page queries: under a generic plan, the first
/// page keeps the `(txid, id)` index and the later pages scan the primary key's range, never the
/// table.
#[tokio::test]
async fn page_queries_keep_index_plans_under_a_generic_plan() {
    use fraiseql_observers::listener::change_log::{batch_ids_page_sql, batch_ids_range_sql};
    let db = TestDb::new().await;
    let client = db.client().await;
    fill(&client, 1, 100_000, (0, -1), "none", "0").await;
    client
        .batch_execute(&format!(
            "ANALYZE core.tb_entity_change_log;
             SET plan_cache_mode = force_generic_plan;
             PREPARE page (text, text, text[], text, bigint, bigint) AS {};
             PREPARE later_page (bigint, bigint, text, text, bigint) AS {};",
            batch_ids_page_sql("id"),
            batch_ids_range_sql("id")
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
    let explain = |sql: String| {
        let client = &client;
        async move {
            client
                .query(&sql, &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join("\n")
        }
    };
    let first = explain(format!(
        "EXPLAIN EXECUTE page('{xmax}', '{xmax}', '{{}}', '{snapshot}', -1, 1000)"
    ))
    .await;
    assert!(!first.contains("Seq Scan"), "first page:\n{first}");
    assert!(
        first.contains("idx_entity_log_txid"),
        "first page:\n{first}"
    );
    let later = explain(format!(
        "EXPLAIN EXECUTE later_page(50000, 100000, '{snapshot}', '1:1:', 1000)"
    ))
    .await;
    assert!(!later.contains("Seq Scan"), "later pages:\n{later}");
    assert!(
        later.contains("tb_entity_change_log_pkey") && !later.contains("Sort"),
        "later pages scan the primary key in order:\n{later}"
    );
}
