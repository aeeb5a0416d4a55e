//! `backfill` through the binary: a backfill killed with SIGKILL mid-way resumes where its last
//! committed page ended, and in the end every row has exactly one snapshot row; `backfill
//! status` and `backfill cancel` say and do what they should.

use crate::harness::{cli, TENANT};
use fraiseql_observers::testing::{eventually, TestDb};
use std::process::Stdio;
use std::time::Duration;
use tokio_postgres::Client;

const ROWS: i64 = 20_000;

async fn table(db: &TestDb) -> Client {
    let client = db.client().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE tb_item (pk_item BIGINT PRIMARY KEY, id UUID DEFAULT gen_random_uuid() UNIQUE NOT NULL,
                                   version INTEGER NOT NULL, fk_customer_org UUID NOT NULL);
             INSERT INTO tb_item (pk_item, version, fk_customer_org)
                  SELECT g, 0, '{TENANT}' FROM generate_series(1, {ROWS}) g;
             SELECT core.observer_enable_capture('tb_item', 'Item', 'fk_customer_org');"
        ))
        .await
        .unwrap();
    client
}

async fn snapshot_rows(client: &Client) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT object_id) FROM core.tb_entity_change_log
              WHERE object_data->>'op' = 'r' AND object_data->'source'->>'snapshot' = 'incremental'",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn a_backfill_killed_mid_way_resumes_and_copies_every_row_once() {
    let db = TestDb::new().await;
    let client = table(&db).await;

    // 2,000 rows/s in pages of 200: ten seconds of work, killed after a few pages.
    let mut child = tokio::process::Command::new(crate::harness::BIN)
        .args([
            "backfill", "--table", "tb_item", "--batch", "200", "--rate", "2000/s",
        ])
        .arg("--database-url")
        .arg(&db.url)
        .env_remove("DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn backfill");
    eventually(Duration::from_secs(30), "a few committed pages", || {
        let client = &client;
        async move {
            let (n, _) = snapshot_rows(client).await;
            (n >= 1000).then_some(())
        }
    })
    .await;
    child.start_kill().expect("SIGKILL");
    child.wait().await.unwrap();
    let (copied, distinct) = snapshot_rows(&client).await;
    assert!(copied < ROWS, "killed mid-way ({copied})");
    assert_eq!(copied, distinct);
    // The stored progress matches what was committed.
    let done: i64 = client
        .query_one("SELECT rows_done FROM core.observer_backfill", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(done, copied);

    let status = cli(Some(&db.url), &["backfill", "status"]).await;
    assert_eq!(status.code, Some(0), "{}", status.all());
    assert!(status.stdout.contains("interrupted"), "{}", status.stdout);

    // Run again: it resumes, and every row has exactly one snapshot.
    let resumed = cli(
        Some(&db.url),
        &["backfill", "--table", "tb_item", "--batch", "5000"],
    )
    .await;
    assert_eq!(resumed.code, Some(0), "{}", resumed.all());
    assert!(resumed.stdout.contains("resumed"), "{}", resumed.stdout);
    assert!(
        resumed.stdout.contains(&format!("done, {ROWS} rows")),
        "{}",
        resumed.stdout
    );
    assert_eq!(snapshot_rows(&client).await, (ROWS, ROWS));
    let missing: i64 = client
        .query_one(
            "SELECT count(*) FROM tb_item t WHERE NOT EXISTS (
                 SELECT 1 FROM core.tb_entity_change_log l WHERE l.object_id = t.id)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(missing, 0);
    let status = cli(Some(&db.url), &["backfill", "status"]).await;
    assert!(status.stdout.contains("done"), "{}", status.stdout);

    // Cancel: nothing unfinished now; then a fresh backfill cancelled before it runs.
    let cancel = cli(Some(&db.url), &["backfill", "cancel", "--table", "tb_item"]).await;
    assert_eq!(cancel.code, Some(0), "{}", cancel.all());
    assert!(
        cancel.stdout.contains("no unfinished backfill"),
        "{}",
        cancel.stdout
    );
    let bad = cli(
        Some(&db.url),
        &["backfill", "--table", "tb_item", "--rate", "fast"],
    )
    .await;
    assert_ne!(bad.code, Some(0));
    assert!(bad.stderr.contains("--rate"), "{}", bad.stderr);
    let bad = cli(
        Some(&db.url),
        &["backfill", "--table", "tb_item", "--where", "nope = 1"],
    )
    .await;
    assert_ne!(bad.code, Some(0));
    assert!(bad.stderr.contains("--where"), "{}", bad.stderr);
}
