//! The durable retry queue (`core.observer_retry_queue`): failed deliveries waiting for their next
//! attempt, and, for ordered observers, the deliveries of the same entity parked behind them.
//!
//! Invariants:
//! * Only heads are claimed: for an ordered observer, an item is attempted only when no item of
//!   the same (observer, entity) has a lower `(event_sequence, action_index)`. Items of unordered
//!   observers are always heads.
//! * Items parked behind another may sleep (`dormant`, skipped by claims) only while an earlier
//!   item of their (observer, entity) is queued: removing a head wakes its successor, and a new
//!   leader wakes them all ([`claim_due`]).
//! * A claim is a lease (`locked_until`): an item claimed by a process that died is claimed again
//!   once its lease runs out, or at once when the next leader starts (`release_leases`).
//! * Items of a paused observer are not claimed (`core.observer_paused`): they wait, in order.
//! * Every write is fenced by the consumer's epoch ([`FENCE`], which locks the checkpoint row):
//!   a deposed leader's writes match no row and return `Error::Fenced`, and none lands after the
//!   next leader's claim.

use super::dead_letter::LIVE_CLAIM;
use super::policy::Reason;
use super::{stored, DeliveryItem};
use crate::error::{Error, Result};
use crate::event::EntityEvent;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::time::Duration;
use tokio_postgres::Client;
use uuid::Uuid;

/// A queued delivery, as claimed by the retry worker.
#[derive(Debug, Clone)]
pub struct QueuedItem {
    pub id: i64,
    pub observer: String,
    pub action_index: usize,
    pub entity_key: String,
    pub ordered: bool,
    pub event: EntityEvent,
    pub delivery_id: String,
    /// Attempts made so far.
    pub attempts: u32,
    pub max_attempts: u32,
}

/// The epoch fence of every write here and in the dead letter queue: the consumer's checkpoint
/// row still carries the writer's epoch, **locked** (`FOR SHARE`) until the write commits. A new
/// leader's claim (`UPDATE ... SET epoch = epoch + 1`) waits for writes that passed the fence, so
/// they land before its claim and it sees them; a write that reaches the row after the claim
/// re-reads it, finds the new epoch, and matches nothing (`Error::Fenced`). A non-locking
/// `EXISTS` would let a deposed write that started before the claim commit after it.
pub(super) const FENCE: &str = "EXISTS (SELECT 1 FROM core.observer_checkpoints c \
     WHERE c.consumer_id = $1 AND c.epoch = $2 FOR SHARE OF c)";

/// Queue `item` for an attempt in `delay` (after `attempts` failed attempts; 0 for an item parked
/// behind another). Returns false when it was queued already (a replay after a crash).
#[allow(clippy::too_many_arguments)]
pub async fn enqueue(
    client: &Client,
    consumer: &str,
    epoch: i64,
    item: &DeliveryItem<'_>,
    attempts: u32,
    max_attempts: u32,
    delay: Duration,
    error: Option<&str>,
) -> Result<bool> {
    let event = serde_json::to_value(item.event).map_err(|e| Error::Invalid(e.to_string()))?;
    let history = match error {
        Some(e) => serde_json::json!([{"attempt": attempts, "error": e, "at": chrono::Utc::now()}]),
        None => serde_json::json!([]),
    };
    let rows = client
        .query(
            &format!(
                "INSERT INTO core.observer_retry_queue
                     (consumer_id, observer, action_index, action_type, entity_key, ordered, event_id,
                      event_sequence, event, delivery_id, attempts, max_attempts, next_attempt_at,
                      last_error, history)
                 SELECT $1, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
                        now() + make_interval(secs => $14), $15, $16
                  WHERE {FENCE}
                 ON CONFLICT (consumer_id, delivery_id) DO NOTHING
                 RETURNING id"
            ),
            &[
                &consumer,
                &epoch,
                &item.observer,
                &(item.action_index as i32),
                &item.action_type,
                &item.entity_key,
                &item.ordered,
                &item.event.id,
                &item.event.sequence,
                &event,
                &item.delivery_id,
                &(attempts as i32),
                &(max_attempts as i32),
                &delay.as_secs_f64(),
                &error,
                &history,
            ],
        )
        .await?;
    if rows.is_empty() {
        ensure_leader(client, consumer, epoch).await?;
        return Ok(false);
    }
    Ok(true)
}

/// How many parked items [`claim_due`] puts to sleep at most per call.
const DORMANT_BATCH: i64 = 10_000;

/// Wakes the new head of the (observer, entity) of the item deleted by the CTE `gone` (`id,
/// observer, entity_key, ordered`): the first item left behind it, if it was put to sleep.
const WAKE_SUCCESSOR: &str = "woken AS (
    UPDATE core.observer_retry_queue w SET dormant = false
     WHERE w.dormant AND w.id = (
           SELECT n.id FROM core.observer_retry_queue n, gone g
            WHERE g.ordered AND n.consumer_id = $1 AND n.observer = g.observer
              AND n.entity_key = g.entity_key AND n.ordered AND n.id <> g.id
            ORDER BY n.event_sequence, n.action_index
            LIMIT 1))";

/// Claim up to `limit` due heads for `lease`; items of a paused observer (`control::pause`) wait.
///
/// Parked items are due (they wait for their head, not for a time), so a claim that had to skip
/// them would cost one probe per parked item, every poll (1.5 s with 100,000 parked). Instead,
/// due items found parked behind an earlier one are put to sleep (`dormant`) once, and a
/// sleeping item is woken when the item ahead of it leaves ([`remove`], [`dead_letter`]), or when
/// a new leader starts ([`release_leases`]). Only the retry worker claims and removes, one after
/// the other, so an item never sleeps after the item it waited for left.
pub async fn claim_due(
    client: &Client,
    consumer: &str,
    epoch: i64,
    limit: i64,
    lease: Duration,
) -> Result<Vec<QueuedItem>> {
    client
        .execute(
            &format!(
                "UPDATE core.observer_retry_queue q SET dormant = true
                  WHERE q.id IN (
                        SELECT h.id FROM core.observer_retry_queue h
                         WHERE h.consumer_id = $1 AND NOT h.dormant AND h.ordered
                           AND h.next_attempt_at <= now()
                           AND EXISTS (
                               SELECT 1 FROM core.observer_retry_queue p
                                WHERE p.consumer_id = h.consumer_id AND p.observer = h.observer
                                  AND p.entity_key = h.entity_key AND p.ordered
                                  AND (p.event_sequence, p.action_index) < (h.event_sequence, h.action_index))
                         LIMIT $3)
                    AND {FENCE}"
            ),
            &[&consumer, &epoch, &DORMANT_BATCH],
        )
        .await?;
    let rows = client
        .query(
            &format!(
                "UPDATE core.observer_retry_queue q
                    SET locked_until = now() + make_interval(secs => $4)
                  WHERE q.id IN (
                        SELECT h.id FROM core.observer_retry_queue h
                         WHERE h.consumer_id = $1 AND NOT h.dormant
                           AND h.next_attempt_at <= now()
                           AND (h.locked_until IS NULL OR h.locked_until < now())
                           AND NOT EXISTS (
                               SELECT 1 FROM core.observer_paused x
                                WHERE x.consumer_id = h.consumer_id AND x.observer = h.observer)
                           AND NOT (h.ordered AND EXISTS (
                               SELECT 1 FROM core.observer_retry_queue p
                                WHERE p.consumer_id = h.consumer_id AND p.observer = h.observer
                                  AND p.entity_key = h.entity_key AND p.ordered
                                  AND (p.event_sequence, p.action_index) < (h.event_sequence, h.action_index)))
                         ORDER BY h.next_attempt_at
                         LIMIT $3
                           FOR UPDATE SKIP LOCKED)
                    AND {FENCE}
              RETURNING q.id, q.observer, q.action_index, q.entity_key, q.ordered, q.event::text,
                        q.delivery_id, q.attempts, q.max_attempts"
            ),
            &[&consumer, &epoch, &limit, &lease.as_secs_f64()],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let id: i64 = r.get(0);
            // As text, parsed as deep as the parser decodes: what was queued reads back.
            let event: String = r.get(5);
            Ok(QueuedItem {
                id,
                observer: r.get(1),
                action_index: r.get::<_, i32>(2) as usize,
                entity_key: r.get(3),
                ordered: r.get(4),
                event: stored::event(&event)
                    .map_err(|e| Error::Invalid(format!("queued event {id}: {e}")))?,
                delivery_id: r.get(6),
                attempts: r.get::<_, i32>(7) as u32,
                max_attempts: r.get::<_, i32>(8) as u32,
            })
        })
        .collect()
}

/// The item was delivered: remove it (its successor becomes the head, and is woken).
pub async fn remove(client: &Client, consumer: &str, epoch: i64, id: i64) -> Result<()> {
    let n: i64 = client
        .query_one(
            &format!(
                "WITH gone AS (
                     DELETE FROM core.observer_retry_queue
                      WHERE id = $3 AND consumer_id = $1 AND {FENCE}
                  RETURNING id, observer, entity_key, ordered),
                 {WAKE_SUCCESSOR}
                 SELECT count(*) FROM gone"
            ),
            &[&consumer, &epoch, &id],
        )
        .await?
        .get(0);
    if n == 0 {
        ensure_leader(client, consumer, epoch).await?;
    }
    Ok(())
}

/// The attempt failed and another is allowed: record it and schedule the next one.
pub async fn reschedule(
    client: &Client,
    consumer: &str,
    epoch: i64,
    id: i64,
    attempts: u32,
    delay: Duration,
    error: &str,
) -> Result<()> {
    let n = client
        .execute(
            &format!(
                "UPDATE core.observer_retry_queue
                    SET attempts = $4, next_attempt_at = now() + make_interval(secs => $5),
                        locked_until = NULL, last_error = $6,
                        history = history || jsonb_build_array(jsonb_build_object(
                            'attempt', $4::int, 'error', $6::text, 'at', now()))
                  WHERE id = $3 AND consumer_id = $1 AND {FENCE}"
            ),
            &[
                &consumer,
                &epoch,
                &id,
                &(attempts as i32),
                &delay.as_secs_f64(),
                &error,
            ],
        )
        .await?;
    if n == 0 {
        ensure_leader(client, consumer, epoch).await?;
    }
    Ok(())
}

/// Move the item to the dead letter queue, atomically (one statement); its successor becomes
/// the head, and is woken.
pub async fn dead_letter(
    client: &Client,
    consumer: &str,
    epoch: i64,
    id: i64,
    attempts: u32,
    reason: Reason,
    error: &str,
) -> Result<()> {
    let n = client
        .execute(
            &format!(
                "WITH moved AS (
                     DELETE FROM core.observer_retry_queue
                      WHERE id = $3 AND consumer_id = $1 AND {FENCE}
                  RETURNING *),
                 gone AS (SELECT id, observer, entity_key, ordered FROM moved),
                 {WAKE_SUCCESSOR}
                 INSERT INTO core.observer_dlq_items
                     (consumer_id, observer, action_index, action_type, entity_key, event_id,
                      event_sequence, event, delivery_id, attempts, reason, last_error, history)
                 SELECT consumer_id, observer, action_index, action_type, entity_key, event_id,
                        event_sequence, event, delivery_id, $4, $5, $6,
                        history || jsonb_build_array(jsonb_build_object('attempt', $4::int, 'error', $6::text, 'at', now()))
                   FROM moved
                 ON CONFLICT (consumer_id, delivery_id) DO UPDATE
                    SET attempts = EXCLUDED.attempts, reason = EXCLUDED.reason,
                        last_error = EXCLUDED.last_error,
                        status = CASE WHEN {LIVE_CLAIM} THEN 'retrying' ELSE 'pending' END,
                        claimed_until = CASE WHEN {LIVE_CLAIM} THEN core.observer_dlq_items.claimed_until END,
                        claim_token = CASE WHEN {LIVE_CLAIM} THEN core.observer_dlq_items.claim_token END,
                        history = core.observer_dlq_items.history || EXCLUDED.history,
                        updated_at = now()"
            ),
            &[&consumer, &epoch, &id, &(attempts as i32), &reason.as_str(), &error],
        )
        .await?;
    if n == 0 {
        ensure_leader(client, consumer, epoch).await?;
    }
    Ok(())
}

/// Release the leases of `consumer`'s items, and wake its sleeping ones (see [`claim_due`]):
/// called by a new leader, whose predecessor is gone. Returns how many leases were released.
pub async fn release_leases(client: &Client, consumer: &str, epoch: i64) -> Result<u64> {
    client
        .execute(
            &format!("UPDATE core.observer_retry_queue SET dormant = false WHERE consumer_id = $1 AND dormant AND {FENCE}"),
            &[&consumer, &epoch],
        )
        .await?;
    Ok(client
        .execute(
            &format!("UPDATE core.observer_retry_queue SET locked_until = NULL WHERE consumer_id = $1 AND locked_until IS NOT NULL AND {FENCE}"),
            &[&consumer, &epoch],
        )
        .await?)
}

/// How many queued items each (observer, entity) of an ordered observer has: while it has any,
/// that entity's new deliveries for that observer are parked behind them.
pub async fn blocked_keys(
    client: &Client,
    consumer: &str,
) -> Result<HashMap<(String, String), u32>> {
    Ok(client
        .query(
            "SELECT observer, entity_key, count(*) FROM core.observer_retry_queue
              WHERE consumer_id = $1 AND ordered GROUP BY observer, entity_key",
            &[&consumer],
        )
        .await?
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get::<_, i64>(2) as u32))
        .collect())
}

/// Items waiting in the queue.
pub async fn len(client: &Client, consumer: &str) -> Result<i64> {
    Ok(client
        .query_one(
            "SELECT count(*) FROM core.observer_retry_queue WHERE consumer_id = $1",
            &[&consumer],
        )
        .await?
        .get(0))
}

/// A queued delivery of one event, as an operator sees it (`explain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRetry {
    pub observer: String,
    pub action_index: usize,
    /// Attempts made so far.
    pub attempts: u32,
    pub next_attempt_at: DateTime<Utc>,
    /// Empty for a delivery parked behind another (it has not failed itself).
    pub last_error: String,
}

/// The queued deliveries of event `event_id` (every consumer), by observer and action.
pub async fn for_event(client: &Client, event_id: Uuid) -> Result<Vec<PendingRetry>> {
    Ok(client
        .query(
            "SELECT observer, action_index, attempts, next_attempt_at, coalesce(last_error, '')
               FROM core.observer_retry_queue WHERE event_id = $1 ORDER BY observer, action_index",
            &[&event_id],
        )
        .await?
        .iter()
        .map(|r| PendingRetry {
            observer: r.get(0),
            action_index: r.get::<_, i32>(1) as usize,
            attempts: r.get::<_, i32>(2) as u32,
            next_attempt_at: r.get(3),
            last_error: r.get(4),
        })
        .collect())
}

async fn ensure_leader(client: &Client, consumer: &str, epoch: i64) -> Result<()> {
    let current: Option<i64> = client
        .query_opt(
            "SELECT epoch FROM core.observer_checkpoints WHERE consumer_id = $1",
            &[&consumer],
        )
        .await?
        .map(|r| r.get(0));
    if current == Some(epoch) {
        Ok(())
    } else {
        Err(Error::Fenced {
            consumer: consumer.to_string(),
            epoch,
        })
    }
}
