//! A captured table of versioned items, for tests that check what arrives and in which order:
//! `tb_item` (entity `Item`), written with increasing versions per item.

use fraiseql_observers::testing::{Request, TestDb};
use std::collections::{HashMap, HashSet};
use tokio_postgres::Client;

/// Create `tb_item` with capture enabled; returns a connection to write with.
pub async fn schema(db: &TestDb) -> Client {
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE tb_item (
                 pk_item INTEGER PRIMARY KEY,
                 id UUID DEFAULT gen_random_uuid() UNIQUE NOT NULL,
                 version INTEGER NOT NULL,
                 fk_customer_org UUID NOT NULL);
             SELECT core.observer_enable_capture('tb_item', 'Item', 'fk_customer_org');",
        )
        .await
        .unwrap();
    client
}

/// Insert item `item`, or set its version, through the capture trigger.
pub async fn write(client: &Client, item: i32, version: i32) {
    client
        .execute(
            "INSERT INTO tb_item (pk_item, version, fk_customer_org)
             VALUES ($1, $2, '11111111-1111-1111-1111-111111111111')
             ON CONFLICT (pk_item) DO UPDATE SET version = EXCLUDED.version",
            &[&item, &version],
        )
        .await
        .unwrap();
}

/// The versions each item was first delivered with (by delivery id), in arrival order.
pub fn first_deliveries(requests: &[Request]) -> HashMap<String, Vec<i64>> {
    let mut seen = HashSet::new();
    let mut by_item: HashMap<String, Vec<i64>> = HashMap::new();
    for r in requests {
        if seen.insert(r.id()) {
            by_item
                .entry(r.entity())
                .or_default()
                .push(r.json()["data"]["after"]["version"].as_i64().unwrap());
        }
    }
    by_item
}

/// How many first deliveries in all.
pub fn count(by_item: &HashMap<String, Vec<i64>>) -> usize {
    by_item.values().map(Vec::len).sum()
}
