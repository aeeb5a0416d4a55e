//! The retry queue with a parked backlog, on a real PostgreSQL: items parked behind another
//! sleep (claims skip them instead of probing each one on every poll), and each wakes when the
//! item ahead of it leaves the queue; heads are claimed in order, as before.

use fraiseql_observers::delivery::policy::Reason;
use fraiseql_observers::delivery::{delivery_id, entity_key, retry_queue, DeliveryItem};
use fraiseql_observers::listener::checkpoint;
use fraiseql_observers::testing::{order_event, TestDb};
use fraiseql_observers::{EventKind, StartPosition};
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;
use tokio_postgres::Client;
use uuid::Uuid;

const CONSUMER: &str = "parked";

/// Queue the delivery of entity `entity`'s event number `sequence` after `attempts` failures.
async fn enqueue(client: &Client, epoch: i64, entity: u128, sequence: i64, attempts: u32) -> i64 {
    let mut event = order_event(EventKind::Updated, None, Some(json!({"n": sequence})));
    event.id = Uuid::from_u128(1000 + sequence as u128);
    event.entity_id = Uuid::from_u128(entity);
    event.sequence = sequence;
    let (key, id) = (entity_key(&event), delivery_id(event.id, "notify", 0));
    let item = DeliveryItem {
        observer: "notify",
        action_index: 0,
        action_type: "webhook",
        entity_key: &key,
        ordered: true,
        event: &event,
        delivery_id: &id,
    };
    let error = (attempts > 0).then_some("HTTP 503");
    retry_queue::enqueue(
        client,
        CONSUMER,
        epoch,
        &item,
        attempts,
        5,
        Duration::ZERO,
        error,
    )
    .await
    .unwrap();
    sequence
}

/// The event sequences of the items claimed now.
async fn claim(client: &Client, epoch: i64, ids: &mut HashMap<i64, i64>) -> Vec<i64> {
    let mut claimed: Vec<i64> =
        retry_queue::claim_due(client, CONSUMER, epoch, 10, Duration::from_secs(60))
            .await
            .unwrap()
            .into_iter()
            .map(|item| {
                ids.insert(item.event.sequence, item.id);
                item.event.sequence
            })
            .collect();
    claimed.sort();
    claimed
}

async fn sleeping(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM core.observer_retry_queue WHERE dormant",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn parked_items_sleep_until_the_item_ahead_of_them_leaves() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let (_, epoch) = checkpoint::claim(&client, CONSUMER, StartPosition::Now)
        .await
        .unwrap();
    // Entity 1: a failed head and five deliveries parked behind it; entity 2: a failed head.
    enqueue(&client, epoch, 1, 10, 1).await;
    for sequence in 11..=15 {
        enqueue(&client, epoch, 1, sequence, 0).await;
    }
    enqueue(&client, epoch, 2, 20, 1).await;
    let mut ids = HashMap::new();

    assert_eq!(
        claim(&client, epoch, &mut ids).await,
        [10, 20],
        "heads only"
    );
    assert_eq!(sleeping(&client).await, 5, "the parked items sleep");
    assert!(
        claim(&client, epoch, &mut ids).await.is_empty(),
        "heads are leased"
    );

    // Delivered: the next one wakes and is the only one claimed.
    retry_queue::remove(&client, CONSUMER, epoch, ids[&10])
        .await
        .unwrap();
    assert_eq!(claim(&client, epoch, &mut ids).await, [11]);
    assert_eq!(sleeping(&client).await, 4);

    // Dead-lettered: the next one wakes.
    retry_queue::dead_letter(
        &client,
        CONSUMER,
        epoch,
        ids[&11],
        1,
        Reason::Permanent,
        "HTTP 400",
    )
    .await
    .unwrap();
    assert_eq!(claim(&client, epoch, &mut ids).await, [12]);

    // Failed again: it stays the head, nothing behind it wakes.
    retry_queue::reschedule(
        &client,
        CONSUMER,
        epoch,
        ids[&12],
        1,
        Duration::ZERO,
        "HTTP 503",
    )
    .await
    .unwrap();
    assert_eq!(claim(&client, epoch, &mut ids).await, [12]);
    assert_eq!(sleeping(&client).await, 3);

    // A new leader wakes every item and frees every lease; it still claims heads only.
    let (_, next) = checkpoint::claim(&client, CONSUMER, StartPosition::Now)
        .await
        .unwrap();
    retry_queue::release_leases(&client, CONSUMER, next)
        .await
        .unwrap();
    assert_eq!(sleeping(&client).await, 0);
    assert_eq!(claim(&client, next, &mut ids).await, [12, 20]);
    assert_eq!(sleeping(&client).await, 3);

    // Drained in order.
    let mut order = Vec::new();
    for _ in 0..10 {
        for sequence in claim(&client, next, &mut ids).await {
            order.push(sequence);
        }
        for sequence in [12, 13, 14, 15, 20] {
            if let Some(id) = ids.remove(&sequence) {
                retry_queue::remove(&client, CONSUMER, next, id)
                    .await
                    .unwrap();
            }
        }
    }
    assert_eq!(order, [13, 14, 15]);
    assert_eq!(retry_queue::len(&client, CONSUMER).await.unwrap(), 0);
}
