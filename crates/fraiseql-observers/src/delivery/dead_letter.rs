//! The dead letter queue (`core.observer_dlq_items`): deliveries that retrying will not fix, kept
//! with the event, the error and their history until an operator retries or discards them.
//!
//! Invariants:
//! * An operator retry is claimed atomically (`pending` -> `retrying` in one UPDATE, with a lease
//!   and a fresh claim token), so two concurrent retries of one item fire once; a retry whose
//!   process died is claimable again when its lease runs out (`RETRY_LEASE`, longer than any
//!   attempt).
//! * Only the claim holder finishes a retry (`finish_retry` matches its token), and the daemon
//!   dead-lettering the same delivery again does not take a live claim away: an item another
//!   operator is retrying is never flipped back to `pending` under them.

use super::retry_queue::FENCE;
use super::{stored, DeliveryItem};
use crate::error::{Error, Result};
use crate::event::EntityEvent;
use chrono::{DateTime, Utc};
use std::time::Duration;
use tokio_postgres::{Client, Row};
use uuid::Uuid;

pub use super::policy::Reason;

/// One dead letter.
#[derive(Debug, Clone)]
pub struct DlqItem {
    pub id: i64,
    pub consumer_id: String,
    pub observer: String,
    pub action_index: usize,
    pub action_type: String,
    pub entity_key: String,
    pub event: EntityEvent,
    pub delivery_id: String,
    pub attempts: u32,
    pub reason: String,
    pub last_error: String,
    pub status: String,
    pub history: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The token of the operator retry that claimed it last ([`claim_for_retry`]); only that
    /// retry may finish it ([`finish_retry`]).
    pub claim_token: Option<Uuid>,
}

/// `event` and `history` as text, parsed as deep as the parser decodes ([`stored`]): whatever
/// was dead-lettered reads back.
const COLUMNS: &str = "id, consumer_id, observer, action_index, action_type, entity_key, \
    event::text, delivery_id, attempts, reason, last_error, status, history::text, created_at, \
    updated_at, claim_token";

/// In a re-dead-lettering upsert: the existing item is being retried by an operator right now
/// (claimed, lease not run out). It stays theirs: the new failure is recorded in its history,
/// but it is not flipped back to `pending` under them.
pub(super) const LIVE_CLAIM: &str =
    "(core.observer_dlq_items.status = 'retrying' AND core.observer_dlq_items.claimed_until > now())";

fn from_row(r: &Row) -> Result<DlqItem> {
    let id: i64 = r.get(0);
    let event: String = r.get(6);
    let history: String = r.get(12);
    let unreadable =
        |what: &str, e: String| Error::Invalid(format!("dead letter {id}: {what} {e}"));
    Ok(DlqItem {
        id,
        consumer_id: r.get(1),
        observer: r.get(2),
        action_index: r.get::<_, i32>(3) as usize,
        action_type: r.get(4),
        entity_key: r.get(5),
        event: stored::event(&event).map_err(|e| unreadable("event", e))?,
        delivery_id: r.get(7),
        attempts: r.get::<_, i32>(8) as u32,
        reason: r.get(9),
        last_error: r.get(10),
        status: r.get(11),
        history: stored::parse(&history).map_err(|e| unreadable("history", e))?,
        created_at: r.get(13),
        updated_at: r.get(14),
        claim_token: r.get(15),
    })
}

/// Dead-letter a delivery that failed in-line (never queued for retry). Fenced by the epoch
/// (`retry_queue::FENCE`). A
/// replay of the same delivery updates the existing item instead of adding a second one.
pub async fn insert(
    client: &Client,
    consumer: &str,
    epoch: i64,
    item: &DeliveryItem<'_>,
    attempts: u32,
    reason: Reason,
    error: &str,
) -> Result<()> {
    let event = serde_json::to_value(item.event).map_err(|e| Error::Invalid(e.to_string()))?;
    let n = client
        .execute(
            &format!(
            "INSERT INTO core.observer_dlq_items
                 (consumer_id, observer, action_index, action_type, entity_key, event_id,
                  event_sequence, event, delivery_id, attempts, reason, last_error, history)
             SELECT $1, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
                    jsonb_build_array(jsonb_build_object('attempt', $11::int, 'error', $13::text, 'at', now()))
              WHERE {FENCE}
             ON CONFLICT (consumer_id, delivery_id) DO UPDATE
                SET attempts = EXCLUDED.attempts, reason = EXCLUDED.reason,
                    last_error = EXCLUDED.last_error,
                    status = CASE WHEN {LIVE_CLAIM} THEN 'retrying' ELSE 'pending' END,
                    claimed_until = CASE WHEN {LIVE_CLAIM} THEN core.observer_dlq_items.claimed_until END,
                    claim_token = CASE WHEN {LIVE_CLAIM} THEN core.observer_dlq_items.claim_token END,
                    history = core.observer_dlq_items.history || EXCLUDED.history,
                    updated_at = now()"),
            &[
                &consumer,
                &epoch,
                &item.observer,
                &(item.action_index as i32),
                &item.action_type,
                &item.entity_key,
                &item.event.id,
                &item.event.sequence,
                &event,
                &item.delivery_id,
                &(attempts as i32),
                &reason.as_str(),
                &error,
            ],
        )
        .await?;
    if n == 0 {
        return Err(Error::Fenced {
            consumer: consumer.to_string(),
            epoch,
        });
    }
    Ok(())
}

/// The item belongs to consumer `$1`: its own, or one of its distributed partitions' (`C/<p>`,
/// as `distributed::is_consumer_or_partition` tells).
const OF_CONSUMER: &str = "(consumer_id = $1 OR (left(consumer_id, length($1) + 1) = $1 || '/' \
     AND substr(consumer_id, length($1) + 2) ~ '^[0-9]+$'))";

/// Dead letters of `consumer` and its partitions (every consumer when `None`), newest first; `status` filters
/// (`pending`, `retrying`, `delivered`, `discarded`).
pub async fn list(
    client: &Client,
    consumer: Option<&str>,
    status: Option<&str>,
    limit: i64,
) -> Result<Vec<DlqItem>> {
    client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM core.observer_dlq_items
                  WHERE ($2::text IS NULL OR status = $2)
                    AND ($1::text IS NULL OR {OF_CONSUMER})
                  ORDER BY id DESC LIMIT $3"
            ),
            &[&consumer, &status, &limit],
        )
        .await?
        .iter()
        .map(from_row)
        .collect()
}

pub async fn get(client: &Client, id: i64) -> Result<Option<DlqItem>> {
    client
        .query_opt(
            &format!("SELECT {COLUMNS} FROM core.observer_dlq_items WHERE id = $1"),
            &[&id],
        )
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// The dead letters of event `event_id` (every consumer), oldest first.
pub async fn for_event(client: &Client, event_id: Uuid) -> Result<Vec<DlqItem>> {
    client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM core.observer_dlq_items WHERE event_id = $1 ORDER BY id"
            ),
            &[&event_id],
        )
        .await?
        .iter()
        .map(from_row)
        .collect()
}

/// Claim item `id` of `consumer` for an operator retry: `None` when it is not pending (already
/// delivered, discarded, or being retried by someone else right now) or is another consumer's.
pub async fn claim_for_retry(
    client: &Client,
    consumer: &str,
    id: i64,
    lease: Duration,
) -> Result<Option<DlqItem>> {
    client
        .query_opt(
            &format!(
                "UPDATE core.observer_dlq_items
                    SET status = 'retrying', claimed_until = now() + make_interval(secs => $2),
                        claim_token = $4, updated_at = now(),
                        history = history || jsonb_build_array(jsonb_build_object('retry_claimed', now()))
                  WHERE id = $1 AND consumer_id = $3
                    AND (status = 'pending' OR (status = 'retrying' AND claimed_until < now()))
              RETURNING {COLUMNS}"
            ),
            &[&id, &lease.as_secs_f64(), &consumer, &Uuid::new_v4()],
        )
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// Ids of every pending item of `consumer` and of its distributed partitions (`consumer/p`),
/// oldest first (for `dlq retry --all`).
pub async fn pending_ids(client: &Client, consumer: &str) -> Result<Vec<i64>> {
    Ok(client
        .query(
            &format!(
                "SELECT id FROM core.observer_dlq_items
                  WHERE {OF_CONSUMER} AND status = 'pending' ORDER BY id"
            ),
            &[&consumer],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Record the outcome of the operator retry that claimed item `id` with `claim_token`:
/// `delivered`, or back to `pending` with the error. Returns false, changing nothing, when that
/// claim is no longer the item's (its lease ran out and another retry claimed it): the item is
/// then that retry's to finish.
pub async fn finish_retry(
    client: &Client,
    id: i64,
    claim_token: Uuid,
    error: Option<&str>,
) -> Result<bool> {
    let n = client
        .execute(
            "UPDATE core.observer_dlq_items
                SET status = CASE WHEN $2::text IS NULL THEN 'delivered' ELSE 'pending' END,
                    claimed_until = NULL, claim_token = NULL,
                    attempts = attempts + 1,
                    last_error = COALESCE($2, last_error),
                    updated_at = now(),
                    history = history || jsonb_build_array(CASE WHEN $2::text IS NULL
                        THEN jsonb_build_object('retry_delivered', now())
                        ELSE jsonb_build_object('retry_failed', now(), 'error', $2::text) END)
              WHERE id = $1 AND status = 'retrying' AND claim_token = $3",
            &[&id, &error, &claim_token],
        )
        .await?;
    Ok(n > 0)
}

/// An operator retry claimed with `claim_token` but not sent, because the observer no longer
/// accepts the event: back to `pending` with `reason` and `error`, its attempts unchanged.
/// Returns false, changing nothing, when that claim is no longer the item's (see
/// [`finish_retry`]).
pub async fn refuse_retry(
    client: &Client,
    id: i64,
    claim_token: Uuid,
    reason: Reason,
    error: &str,
) -> Result<bool> {
    let n = client
        .execute(
            "UPDATE core.observer_dlq_items
                SET status = 'pending', claimed_until = NULL, claim_token = NULL, reason = $2,
                    last_error = $3, updated_at = now(),
                    history = history || jsonb_build_array(jsonb_build_object(
                        'retry_refused', now(), 'error', $3::text))
              WHERE id = $1 AND status = 'retrying' AND claim_token = $4",
            &[&id, &reason.as_str(), &error, &claim_token],
        )
        .await?;
    Ok(n > 0)
}

/// Discard a pending item (kept, marked `discarded`). Returns false when it was not pending.
pub async fn discard(client: &Client, id: i64) -> Result<bool> {
    Ok(client
        .execute(
            "UPDATE core.observer_dlq_items
                SET status = 'discarded', updated_at = now(),
                    history = history || jsonb_build_array(jsonb_build_object('discarded', now()))
              WHERE id = $1 AND status = 'pending'",
            &[&id],
        )
        .await?
        > 0)
}

/// Pending dead letters of `consumer` (for the metrics).
pub async fn pending_count(client: &Client, consumer: &str) -> Result<i64> {
    Ok(client
        .query_one(
            "SELECT count(*) FROM core.observer_dlq_items
              WHERE consumer_id = $1 AND status = 'pending'",
            &[&consumer],
        )
        .await?
        .get(0))
}
