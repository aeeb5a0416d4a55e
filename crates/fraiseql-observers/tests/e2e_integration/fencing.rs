//! The retry queue's and the dead letter queue's writes against a change of leader and against
//! concurrent operators, on a real PostgreSQL: a deposed leader's fenced write never lands after
//! the new leader's claim; an operator's retry is finished only by the operator who holds it.

use fraiseql_observers::delivery::dead_letter::{self, Reason};
use fraiseql_observers::delivery::{delivery_id, entity_key, retry_queue, DeliveryItem};
use fraiseql_observers::listener::checkpoint;
use fraiseql_observers::testing::{eventually, order_event, TestDb};
use fraiseql_observers::{EntityEvent, Error, EventKind, StartPosition};
use serde_json::json;
use std::time::Duration;
use tokio_postgres::Client;
use uuid::Uuid;

fn item<'a>(event: &'a EntityEvent, key: &'a str, id: &'a str) -> DeliveryItem<'a> {
    DeliveryItem {
        observer: "notify",
        action_index: 0,
        action_type: "webhook",
        entity_key: key,
        ordered: true,
        event,
        delivery_id: id,
    }
}

#[derive(Debug, Clone, Copy)]
enum Write {
    Enqueue,
    DeadLetter,
}

/// The fenced write `write` of `event` by the leader of `consumer` at `epoch`.
async fn fenced(
    client: &Client,
    write: Write,
    consumer: &str,
    epoch: i64,
    event: &EntityEvent,
) -> fraiseql_observers::Result<()> {
    let (key, id) = (entity_key(event), delivery_id(event.id, "notify", 0));
    let item = item(event, &key, &id);
    match write {
        Write::Enqueue => retry_queue::enqueue(
            client,
            consumer,
            epoch,
            &item,
            1,
            5,
            Duration::from_secs(60),
            Some("HTTP 503"),
        )
        .await
        .map(|queued| assert!(queued)),
        Write::DeadLetter => {
            dead_letter::insert(
                client,
                consumer,
                epoch,
                &item,
                1,
                Reason::Permanent,
                "HTTP 400",
            )
            .await
        }
    }
}

async fn written(client: &Client, write: Write, consumer: &str) -> i64 {
    let table = match write {
        Write::Enqueue => "core.observer_retry_queue",
        Write::DeadLetter => "core.observer_dlq_items",
    };
    client
        .query_one(
            &format!("SELECT count(*) FROM {table} WHERE consumer_id = $1"),
            &[&consumer],
        )
        .await
        .unwrap()
        .get(0)
}

/// The deposed leader's write passed the fence and its transaction is still open when the new
/// leader claims the consumer: the claim waits for it, so the write lands before the claim (and
/// the new leader, which loads the queue after claiming, sees it). Once the claim committed, the
/// deposed leader's writes are fenced.
#[tokio::test]
async fn a_deposed_leaders_write_never_lands_after_the_new_leaders_claim() {
    let db = TestDb::new().await;
    let observer = db.client().await;
    for (n, write) in [Write::Enqueue, Write::DeadLetter].into_iter().enumerate() {
        let consumer = format!("fence{n}");
        let deposed = db.client().await;
        let (_, old_epoch) = checkpoint::claim(&deposed, &consumer, StartPosition::Now)
            .await
            .unwrap();
        let event = order_event(EventKind::Created, None, Some(json!({"total": n})));
        deposed.batch_execute("BEGIN").await.unwrap();
        fenced(&deposed, write, &consumer, old_epoch, &event)
            .await
            .unwrap();

        let leader = db.client().await;
        let pid: i32 = leader
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        let claim = {
            let consumer = consumer.clone();
            tokio::spawn(async move {
                let (_, epoch) = checkpoint::claim(&leader, &consumer, StartPosition::Now)
                    .await
                    .unwrap();
                (leader, epoch)
            })
        };
        eventually(
            Duration::from_secs(10),
            "the new leader's claim to wait for the deposed leader's write",
            || {
                let observer = &observer;
                let finished = claim.is_finished();
                async move {
                    assert!(
                        !finished,
                        "{write:?}: the claim went through while a deposed leader's fenced write \
                         was uncommitted: that write would land after the claim"
                    );
                    let waiting: i64 = observer
                        .query_one(
                            "SELECT count(*) FROM pg_locks WHERE pid = $1 AND NOT granted",
                            &[&pid],
                        )
                        .await
                        .unwrap()
                        .get(0);
                    (waiting > 0).then_some(())
                }
            },
        )
        .await;
        deposed.batch_execute("COMMIT").await.unwrap();
        let (leader, new_epoch) = claim.await.unwrap();
        assert!(new_epoch > old_epoch);
        assert_eq!(
            written(&leader, write, &consumer).await,
            1,
            "{write:?}: the write landed before the claim"
        );

        // After the claim, the deposed leader is fenced, in a transaction or not.
        let mut later = event.clone();
        later.id = Uuid::from_u128(7 + n as u128);
        let refused = fenced(&deposed, write, &consumer, old_epoch, &later).await;
        assert!(
            matches!(refused, Err(Error::Fenced { .. })),
            "{write:?}: {refused:?}"
        );
        assert_eq!(written(&leader, write, &consumer).await, 1);
        fenced(&leader, write, &consumer, new_epoch, &later)
            .await
            .unwrap();
    }
}

async fn status(client: &Client, id: i64) -> (String, Option<Uuid>) {
    let item = dead_letter::get(client, id).await.unwrap().unwrap();
    (item.status, item.claim_token)
}

/// Operator A's retry outlives its lease and operator B claims the item: A's failure neither
/// flips it back to `pending` under B nor is recorded as B's outcome, and neither does the
/// daemon dead-lettering the same delivery again. B's outcome is the one recorded.
#[tokio::test]
async fn only_the_claim_holder_finishes_a_dead_letter_retry() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let consumer = "orders";
    let (_, epoch) = checkpoint::claim(&client, consumer, StartPosition::Now)
        .await
        .unwrap();
    let event = order_event(EventKind::Created, None, Some(json!({"total": 1})));
    fenced(&client, Write::DeadLetter, consumer, epoch, &event)
        .await
        .unwrap();
    let id = dead_letter::list(&client, Some(consumer), Some("pending"), 1)
        .await
        .unwrap()[0]
        .id;

    let a = dead_letter::claim_for_retry(&client, consumer, id, Duration::from_millis(1))
        .await
        .unwrap()
        .expect("A claims the pending item");
    let b = eventually(
        Duration::from_secs(10),
        "B to claim the item once A's lease ran out",
        || {
            let client = &client;
            async move {
                dead_letter::claim_for_retry(client, consumer, id, Duration::from_secs(600))
                    .await
                    .unwrap()
            }
        },
    )
    .await;
    assert_ne!(a.claim_token, b.claim_token);
    let b_token = b.claim_token.unwrap();

    // A's attempt failed: not recorded, the item stays B's.
    let recorded = dead_letter::finish_retry(&client, id, a.claim_token.unwrap(), Some("HTTP 503"))
        .await
        .unwrap();
    assert!(!recorded, "A no longer holds the item");
    assert_eq!(
        status(&client, id).await,
        ("retrying".to_string(), Some(b_token))
    );

    // The daemon dead-letters the same delivery again (a replay): recorded in its history, but
    // the item stays B's.
    fenced(&client, Write::DeadLetter, consumer, epoch, &event)
        .await
        .unwrap();
    let item = dead_letter::get(&client, id).await.unwrap().unwrap();
    assert_eq!(
        (item.status.as_str(), item.claim_token),
        ("retrying", Some(b_token))
    );
    assert_eq!(
        item.history.as_array().unwrap().len(),
        4,
        "{}",
        item.history
    );

    // B's outcome is recorded.
    assert!(dead_letter::finish_retry(&client, id, b_token, None)
        .await
        .unwrap());
    assert_eq!(status(&client, id).await, ("delivered".to_string(), None));
    // Finishing twice changes nothing.
    assert!(
        !dead_letter::finish_retry(&client, id, b_token, Some("late"))
            .await
            .unwrap()
    );
    assert_eq!(status(&client, id).await.0, "delivered");
}
