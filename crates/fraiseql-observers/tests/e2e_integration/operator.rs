//! What operator commands read and do, against a real PostgreSQL: the schema probe, checkpoints
//! with their leader, a reset refused under a leader, an event's retries and dead letters,
//! quarantined rows, and the `Operator` handle (no epoch: explain, replay, dead-letter retries
//! claimed once).

use crate::sample::order_event;
use fraiseql_observers::actions::FailureKind;
use fraiseql_observers::delivery::dead_letter::{self, Reason};
use fraiseql_observers::delivery::{delivery_id, entity_key, retry_queue, DeliveryItem};
use fraiseql_observers::leader::Leadership;
use fraiseql_observers::listener::{checkpoint, quarantine};
use fraiseql_observers::matcher::Verdict;
use fraiseql_observers::operator::{self, Reset};
use fraiseql_observers::testing::{eventually, TestDb};
use fraiseql_observers::{config, migrate, EntityEvent, EventKind, Operator, StartPosition};
use serde_json::json;
use std::time::Duration;
use tokio_postgres::Client;
use uuid::Uuid;

fn delivery<'a>(
    event: &'a EntityEvent,
    observer: &'a str,
    key: &'a str,
    id: &'a str,
) -> DeliveryItem<'a> {
    DeliveryItem {
        observer,
        action_index: 0,
        action_type: "webhook",
        entity_key: key,
        ordered: true,
        event,
        delivery_id: id,
    }
}

/// Dead-letter `event` for `observer` (action 0) under `consumer`, led at `epoch`; its id.
async fn dead_letter_of(
    client: &Client,
    consumer: &str,
    epoch: i64,
    event: &EntityEvent,
    observer: &str,
) -> i64 {
    let (key, id) = (entity_key(event), delivery_id(event.id, observer, 0));
    dead_letter::insert(
        client,
        consumer,
        epoch,
        &delivery(event, observer, &key, &id),
        3,
        Reason::Exhausted,
        "HTTP 503",
    )
    .await
    .unwrap();
    dead_letter::for_event(client, event.id)
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.observer == observer && d.consumer_id == consumer)
        .expect("the dead letter just inserted")
        .id
}

#[tokio::test]
async fn the_schema_probe_says_whether_migrate_has_run() {
    let db = TestDb::empty().await;
    let mut client = db.client().await;
    assert!(!migrate::is_migrated(&client).await.unwrap());
    migrate::run(&mut client).await.unwrap();
    assert!(migrate::is_migrated(&client).await.unwrap());
}

#[tokio::test]
async fn checkpoints_show_their_leader_and_reset_only_without_one() {
    let db = TestDb::new().await;
    let client = db.client().await;
    assert!(operator::consumers(&client, None).await.unwrap().is_empty());
    let (_, epoch) = checkpoint::claim(&client, "orders", StartPosition::Now)
        .await
        .unwrap();
    checkpoint::claim(&client, "users", StartPosition::Beginning)
        .await
        .unwrap();

    let all = operator::consumers(&client, None).await.unwrap();
    let names: Vec<_> = all.iter().map(|c| c.checkpoint.consumer.as_str()).collect();
    assert_eq!(names, ["orders", "users"]);
    assert!(all.iter().all(|c| c.leader.is_none()));
    let orders = operator::consumers(&client, Some("orders")).await.unwrap();
    assert_eq!(orders.len(), 1);
    assert_eq!(orders[0].checkpoint.epoch, epoch);
    assert!(orders[0].checkpoint.checkpoint.batch.is_none());
    assert!(operator::consumers(&client, Some("nobody"))
        .await
        .unwrap()
        .is_empty());

    // Under a running leader: shown, and a reset changes nothing.
    let leader = Leadership::acquire(&db.url, "orders", || panic!("no other instance"))
        .await
        .unwrap();
    let led = operator::consumers(&client, Some("orders")).await.unwrap();
    let pid = led[0].leader.expect("the leader's backend");
    assert_eq!(
        operator::reset_checkpoint(&client, "orders", StartPosition::Beginning)
            .await
            .unwrap(),
        Reset::Leading { pid: Some(pid) }
    );
    assert_eq!(
        checkpoint::list(&client, Some("orders")).await.unwrap()[0].epoch,
        epoch,
        "the refused reset left the checkpoint alone"
    );

    // Once it is gone: reset, and the lock taken for it is released again.
    drop(leader);
    let reset = eventually(Duration::from_secs(10), "the leader gone", || async {
        match operator::reset_checkpoint(&client, "orders", StartPosition::Beginning)
            .await
            .unwrap()
        {
            Reset::Leading { .. } => None,
            done => Some(done),
        }
    })
    .await;
    let Reset::Done {
        existed,
        checkpoint,
    } = reset
    else {
        unreachable!()
    };
    assert!(existed);
    assert_eq!(checkpoint.snapshot.to_string(), "1:1:");
    let other = db.client().await;
    assert!(fraiseql_observers::leader::try_lock(&other, "orders")
        .await
        .unwrap());
    let created = operator::reset_checkpoint(&client, "fresh", StartPosition::Now);
    assert!(matches!(
        created.await.unwrap(),
        Reset::Done { existed: false, .. }
    ));
}

#[tokio::test]
async fn an_events_retries_and_dead_letters_are_read_by_event() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let (_, epoch) = checkpoint::claim(&client, "orders", StartPosition::Now)
        .await
        .unwrap();
    let event = order_event(EventKind::Created, None, Some(json!({"total": 10})));
    let mut other = event.clone();
    other.id = Uuid::from_u128(42);

    let (key, id) = (entity_key(&event), delivery_id(event.id, "notify", 0));
    retry_queue::enqueue(
        &client,
        "orders",
        epoch,
        &delivery(&event, "notify", &key, &id),
        2,
        5,
        Duration::from_secs(60),
        Some("HTTP 503"),
    )
    .await
    .unwrap();
    let dead = dead_letter_of(&client, "orders", epoch, &event, "archive").await;

    let found = operator::deliveries_of(&client, event.id).await.unwrap();
    assert_eq!(found.retries.len(), 1);
    let retry = &found.retries[0];
    assert_eq!(
        (retry.observer.as_str(), retry.action_index, retry.attempts),
        ("notify", 0, 2)
    );
    assert_eq!(retry.last_error, "HTTP 503");
    assert!(retry.next_attempt_at > chrono::Utc::now());
    assert_eq!(found.dead_letters.len(), 1);
    let letter = &found.dead_letters[0];
    assert_eq!(letter.id, dead);
    assert_eq!(
        (letter.observer.as_str(), letter.status.as_str()),
        ("archive", "pending")
    );
    assert_eq!(letter.reason, "exhausted");

    let none = operator::deliveries_of(&client, other.id).await.unwrap();
    assert!(none.retries.is_empty() && none.dead_letters.is_empty());
}

#[tokio::test]
async fn quarantined_rows_are_listed_newest_first_by_consumer() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO core.observer_quarantine (consumer_id, sequence, reason, row_data, quarantined_at)
             VALUES ('orders', 7, 'bad op', '{\"op\": \"X\"}', now() - interval '1 minute'),
                    ('orders', 9, 'bad uuid', NULL, now()),
                    ('users', 8, 'bad json', NULL, now())",
        )
        .await
        .unwrap();
    let orders = quarantine::list(&client, Some("orders"), 50).await.unwrap();
    let seen: Vec<_> = orders
        .iter()
        .map(|r| (r.sequence, r.reason.as_str()))
        .collect();
    assert_eq!(seen, [(9, "bad uuid"), (7, "bad op")]);
    assert_eq!(orders[1].row, Some(json!({"op": "X"})));
    assert_eq!(orders[0].row, None);
    assert_eq!(quarantine::list(&client, None, 50).await.unwrap().len(), 3);
    assert_eq!(quarantine::list(&client, None, 1).await.unwrap().len(), 1);
}

#[tokio::test]
async fn the_operator_needs_no_epoch_and_claims_a_dead_letter_once() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let config = config::load(
        r#"
        [observers.paid]
        entity = "Order"
        event_type = "INSERT"
        [[observers.paid.actions]]
        type = "webhook"
        url = "https://hooks.example.com/orders"

        [observers.big]
        entity = "Order"
        event_type = "INSERT"
        condition = "total > 100"
        [[observers.big.actions]]
        type = "webhook"
        url = "https://hooks.example.com/big"
        "#,
        &|_| None,
    )
    .unwrap();
    let operator = Operator::new(&db.url, "orders", config.observers)
        .await
        .unwrap();

    let event = order_event(EventKind::Created, None, Some(json!({"total": 10})));
    let verdicts = operator.explain(&event);
    assert_eq!(
        verdicts,
        [
            ("paid", Some(Verdict::Matched)),
            ("big", Some(Verdict::ConditionFalse))
        ]
    );
    assert!(operator.replay("big", &event).await.unwrap().is_none());
    assert!(operator.replay("nope", &event).await.is_err());

    // A dead letter of an observer no longer configured: claimed, not sent (a permanent
    // failure), pending again with its attempts unchanged and reason `not_accepted`. One claimed
    // by someone else is not sent.
    let (_, epoch) = checkpoint::claim(&client, "orders", StartPosition::Now)
        .await
        .unwrap();
    let id = dead_letter_of(&client, "orders", epoch, &event, "removed").await;
    let result = operator.retry_dead_letter(id).await.unwrap();
    assert!(
        matches!(&result, Some(Err(e)) if e.kind == FailureKind::Permanent),
        "{result:?}"
    );
    let item = dead_letter::get(&client, id).await.unwrap().unwrap();
    assert_eq!(
        (item.status.as_str(), item.attempts, item.reason.as_str()),
        ("pending", 3, "not_accepted")
    );
    assert!(item.last_error.contains("no longer configured"));

    dead_letter::claim_for_retry(&client, "orders", id, Duration::from_secs(60))
        .await
        .unwrap()
        .expect("pending again");
    assert!(operator.retry_dead_letter(id).await.unwrap().is_none());
    assert!(operator
        .retry_dead_letter(id + 1000)
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn a_reset_keeps_epochs_growing_so_an_older_leader_stays_fenced() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let (_, first) = checkpoint::claim(&client, "orders", StartPosition::Now)
        .await
        .unwrap();
    let (stale, second) = checkpoint::claim(&client, "orders", StartPosition::Now)
        .await
        .unwrap();
    assert!(second > first);

    let reset = operator::reset_checkpoint(&client, "orders", StartPosition::Beginning)
        .await
        .unwrap();
    assert!(
        matches!(reset, Reset::Done { existed: true, .. }),
        "{reset:?}"
    );
    let after = checkpoint::list(&client, Some("orders")).await.unwrap()[0].epoch;
    assert!(
        after > second,
        "epoch {after} after the reset, {second} before"
    );

    // Neither the last leader before the reset nor an older one can write the checkpoint.
    for epoch in [first, second] {
        let write = checkpoint::save(&client, "orders", epoch, &stale).await;
        assert!(
            matches!(write, Err(fraiseql_observers::Error::Fenced { .. })),
            "epoch {epoch}: {write:?}"
        );
    }
    let (_, next) = checkpoint::claim(&client, "orders", StartPosition::Now)
        .await
        .unwrap();
    assert!(next > after);
}

#[tokio::test]
async fn dead_letters_are_listed_counted_and_retried_per_consumer() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let config = config::load(
        r#"
        [observers.paid]
        entity = "Order"
        event_type = "INSERT"
        [[observers.paid.actions]]
        type = "webhook"
        url = "http://127.0.0.1:9/down"
        "#,
        &|_| None,
    )
    .unwrap();
    // Two consumers, each with an observer named `paid` and a dead letter of it.
    let (_, orders_epoch) = checkpoint::claim(&client, "orders", StartPosition::Now)
        .await
        .unwrap();
    let (_, billing_epoch) = checkpoint::claim(&client, "billing", StartPosition::Now)
        .await
        .unwrap();
    let ours_event = order_event(EventKind::Created, None, Some(json!({"total": 10})));
    let theirs_event = order_event(EventKind::Created, None, Some(json!({"total": 20})));
    let ours = dead_letter_of(&client, "orders", orders_epoch, &ours_event, "paid").await;
    let theirs = dead_letter_of(&client, "billing", billing_epoch, &theirs_event, "paid").await;

    let listed = |consumer| {
        let client = &client;
        async move {
            dead_letter::list(client, consumer, Some("pending"), 10)
                .await
                .unwrap()
                .into_iter()
                .map(|d| d.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(listed(Some("orders")).await, [ours]);
    assert_eq!(listed(Some("billing")).await, [theirs]);
    assert_eq!(listed(None).await, [theirs, ours]);
    assert_eq!(
        dead_letter::pending_count(&client, "orders").await.unwrap(),
        1
    );
    assert_eq!(
        dead_letter::pending_count(&client, "billing")
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        dead_letter::pending_ids(&client, "orders").await.unwrap(),
        [ours]
    );

    // Retrying everything of `orders` never sends billing's dead letter to our `paid`.
    let operator = Operator::new(&db.url, "orders", config.observers)
        .await
        .unwrap();
    assert!(operator.retry_dead_letter(theirs).await.unwrap().is_none());
    for id in dead_letter::pending_ids(&client, "orders").await.unwrap() {
        assert!(operator.retry_dead_letter(id).await.unwrap().is_some());
    }
    let theirs_after = dead_letter::get(&client, theirs).await.unwrap().unwrap();
    assert_eq!(
        (theirs_after.status.as_str(), theirs_after.attempts),
        ("pending", 3),
        "billing's dead letter untouched"
    );
    assert_eq!(theirs_after.history.as_array().unwrap().len(), 1);
    let ours_after = dead_letter::get(&client, ours).await.unwrap().unwrap();
    assert_eq!(ours_after.attempts, 4, "ours retried once");
    assert!(
        dead_letter::claim_for_retry(&client, "orders", theirs, Duration::from_secs(60))
            .await
            .unwrap()
            .is_none()
    );
}
