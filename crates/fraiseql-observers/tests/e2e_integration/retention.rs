//! Pruning the change log: only rows every consumer has processed, and only old ones.

use fraiseql_observers::listener::checkpoint;
use fraiseql_observers::testing::TestDb;
use fraiseql_observers::{retention, ChangeLogListener, ListenerConfig, StartPosition};
use std::time::Duration;
use tokio_postgres::Client;

async fn row(client: &Client, age_days: i32) -> i64 {
    client
        .query_one(
            "INSERT INTO core.tb_entity_change_log
                 (fk_customer_org, object_type, object_id, modification_type, change_status, object_data, created_at)
             VALUES (gen_random_uuid(), 'Item', gen_random_uuid(), 'INSERT', 'new',
                     '{\"op\": \"c\", \"after\": {}}', now() - make_interval(days => $1))
             RETURNING id",
            &[&age_days],
        )
        .await
        .unwrap()
        .get(0)
}

async fn remaining(client: &Client) -> Vec<i64> {
    client
        .query("SELECT id FROM core.tb_entity_change_log ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn only_old_rows_every_consumer_processed_are_pruned() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let week = Duration::from_secs(7 * 86_400);
    let old: Vec<i64> = futures::future::join_all((0..3).map(|_| row(&client, 30))).await;
    let recent = row(&client, 0).await;

    // No consumer: nothing is known to be processed.
    assert!(retention::prune(&client, week, 100).await.is_err());
    assert_eq!(remaining(&client).await.len(), 4);

    // Consumer a processes everything so far.
    let mut a = ChangeLogListener::start(ListenerConfig {
        database_url: db.url.clone(),
        consumer_id: "a".into(),
        start: StartPosition::Beginning,
        ..ListenerConfig::default()
    })
    .await
    .unwrap();
    let mut seen = 0;
    while seen < 4 {
        let batch = a.next_batch().await.unwrap().unwrap();
        seen += batch.events.len();
        a.mark_done(batch.end);
    }
    a.save_checkpoint().await.unwrap();
    let unprocessed = row(&client, 30).await; // old, but written after a's checkpoint

    // Consumer b has processed nothing yet: it holds everything back.
    checkpoint::claim(&client, "b", StartPosition::Beginning)
        .await
        .unwrap();
    assert_eq!(retention::prune(&client, week, 100).await.unwrap(), 0);

    client
        .execute(
            "DELETE FROM core.observer_checkpoints WHERE consumer_id = 'b'",
            &[],
        )
        .await
        .unwrap();
    // Small batches: several statements.
    assert_eq!(retention::prune(&client, week, 2).await.unwrap(), 3);
    assert_eq!(remaining(&client).await, [recent, unprocessed]);
    assert!(old.iter().all(|id| *id < recent));
}
