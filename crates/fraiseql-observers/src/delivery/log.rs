//! The delivery log: one row per attempt, successes included, in
//! `core.observer_delivery_log`.
//!
//! Invariants:
//! * Off the delivery path: an attempt is handed to a channel and written in batches (one
//!   statement per batch) by one writer task. Delivery waits only when the writer is
//!   [`CHANNEL`] attempts behind (back-pressure, never a silent drop).
//! * What is written is what happened: the outcome, the receiver's status code and a bounded
//!   excerpt of its answer ([`crate::actions::EXCERPT_CHARS`]). Never a secret: actions keep
//!   secrets out of their error messages, and bodies are not stored.
//! * Rows are not fenced: a deposed leader's attempts were made too. A crash loses at most the
//!   attempts not yet written (the last batch); the deliveries themselves are unaffected.

use super::DeliveryItem;
use crate::actions::{ActionError, FailureKind};
use crate::db;
use crate::error::{Error, Result};
use chrono::{DateTime, Utc};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Client;
use uuid::Uuid;

/// Attempts waiting for the writer, at most; a full channel makes delivery wait.
const CHANNEL: usize = 16_384;

/// Attempts written per statement, at most.
const BATCH: usize = 2_000;

/// Which attempts an observer records (`record = "all" | "failures" | "none"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Record {
    #[default]
    All,
    Failures,
    None,
}

impl Record {
    pub fn parse(text: &str) -> Option<Record> {
        match text {
            "all" => Some(Record::All),
            "failures" => Some(Record::Failures),
            "none" => Some(Record::None),
            _ => None,
        }
    }

    /// Whether an attempt that succeeded (`ok`) or failed is recorded.
    pub fn wants(self, ok: bool) -> bool {
        match self {
            Record::All => true,
            Record::Failures => !ok,
            Record::None => false,
        }
    }
}

/// One attempt, as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub event_id: Uuid,
    pub event_sequence: i64,
    pub entity_type: String,
    pub entity_key: String,
    pub observer: String,
    pub action_index: i32,
    pub action_type: String,
    pub delivery_id: String,
    pub attempt: i32,
    pub started_at: DateTime<Utc>,
    pub duration: Duration,
    /// `ok`, or the failure's class: `transient`, `permanent`, `gone`.
    pub outcome: &'static str,
    pub status_code: Option<i32>,
    pub error: Option<String>,
    pub response_excerpt: Option<String>,
}

/// When an attempt started: the wall clock for the log, a monotonic clock for its duration.
#[derive(Debug, Clone, Copy)]
pub struct Started {
    at: DateTime<Utc>,
    clock: Instant,
}

impl Started {
    pub fn now() -> Started {
        Started {
            at: Utc::now(),
            clock: Instant::now(),
        }
    }
}

impl Attempt {
    /// The attempt number `attempt` of `delivery`, `started` then and ending now with `result`.
    pub fn new(
        delivery: DeliveryItem<'_>,
        attempt: u32,
        started: Started,
        result: Result<(), &ActionError>,
    ) -> Attempt {
        let (outcome, status_code, error, response_excerpt) = match result {
            Ok(()) => ("ok", None, None, None),
            Err(e) => (
                outcome(e.kind),
                e.status.map(i32::from),
                Some(e.message.clone()),
                e.excerpt.clone(),
            ),
        };
        Attempt {
            event_id: delivery.event.id,
            event_sequence: delivery.event.sequence,
            entity_type: delivery.event.entity_type.clone(),
            entity_key: delivery.entity_key.to_string(),
            observer: delivery.observer.to_string(),
            action_index: delivery.action_index as i32,
            action_type: delivery.action_type.to_string(),
            delivery_id: delivery.delivery_id.to_string(),
            attempt: attempt as i32,
            started_at: started.at,
            duration: started.clock.elapsed(),
            outcome,
            status_code,
            error,
            response_excerpt,
        }
    }

    pub fn ok(&self) -> bool {
        self.outcome == "ok"
    }
}

fn outcome(kind: FailureKind) -> &'static str {
    match kind {
        FailureKind::Transient => "transient",
        FailureKind::Permanent => "permanent",
        FailureKind::Gone => "gone",
    }
}

enum Message {
    Attempt(Box<Attempt>),
    Flush(oneshot::Sender<()>),
}

/// The handle that records attempts; its writer task ends when every handle is dropped,
/// after writing what it holds.
#[derive(Clone)]
pub struct DeliveryLog {
    tx: mpsc::Sender<Message>,
}

impl DeliveryLog {
    /// Start the writer for `consumer`, on its own connection to `config`.
    pub fn start(config: tokio_postgres::Config, consumer: &str) -> DeliveryLog {
        let (tx, rx) = mpsc::channel(CHANNEL);
        let store = db::Reconnecting::new(config, "fraiseql-observers-delivery-log");
        tokio::spawn(write_all(store, consumer.to_string(), rx));
        DeliveryLog { tx }
    }

    /// Hand `attempt` to the writer; waits only while the writer is far behind.
    pub async fn record(&self, attempt: Attempt) {
        // The writer only ends when every handle is gone, so this cannot fail while `self` lives.
        let _ = self.tx.send(Message::Attempt(Box::new(attempt))).await;
    }

    /// Wait until every attempt recorded before this call is written (or given up on).
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Message::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

/// The writer: batches of whatever is waiting, one statement each, retried while the database
/// is unreachable.
async fn write_all(store: db::Reconnecting, consumer: String, mut rx: mpsc::Receiver<Message>) {
    let mut messages = Vec::with_capacity(BATCH);
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut messages, BATCH).await > 0 {
        let mut flushes = Vec::new();
        for message in messages.drain(..) {
            match message {
                Message::Attempt(a) => batch.push(*a),
                Message::Flush(done) => flushes.push(done),
            }
        }
        if !batch.is_empty() {
            write_batch(&store, &consumer, &batch).await;
            batch.clear();
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

async fn write_batch(store: &db::Reconnecting, consumer: &str, batch: &[Attempt]) {
    let mut delay = Duration::from_millis(100);
    loop {
        let result = match store.client().await {
            Ok(client) => insert(&client, consumer, batch).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => return,
            Err(e) if e.is_transient() && delay < Duration::from_secs(60) => {
                tracing::warn!(error = %e, attempts = batch.len(),
                    retry_in_ms = delay.as_millis() as u64, "cannot write the delivery log; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => {
                metrics::counter!(crate::metrics::DELIVERY_LOG_LOST).increment(batch.len() as u64);
                tracing::error!(error = %e, attempts = batch.len(),
                    "delivery log rows could not be written; they are lost (deliveries are not)");
                return;
            }
        }
    }
}

/// Write `batch` in one statement.
pub async fn insert(client: &Client, consumer: &str, batch: &[Attempt]) -> Result<()> {
    fn column<'a, T>(batch: &'a [Attempt], f: impl Fn(&'a Attempt) -> T) -> Vec<T> {
        batch.iter().map(f).collect()
    }
    client
        .execute(
            "INSERT INTO core.observer_delivery_log (consumer_id, event_id, event_sequence,
                 entity_type, entity_key, observer, action_index, action_type, delivery_id, attempt,
                 started_at, duration_ms, outcome, status_code, error, response_excerpt)
             SELECT $1, * FROM unnest($2::uuid[], $3::int8[], $4::text[], $5::text[], $6::text[],
                 $7::int4[], $8::text[], $9::text[], $10::int4[], $11::timestamptz[],
                 $12::float8[], $13::text[], $14::int4[], $15::text[], $16::text[])",
            &[
                &consumer,
                &column(batch, |a| a.event_id),
                &column(batch, |a| a.event_sequence),
                &column(batch, |a| a.entity_type.as_str()),
                &column(batch, |a| a.entity_key.as_str()),
                &column(batch, |a| a.observer.as_str()),
                &column(batch, |a| a.action_index),
                &column(batch, |a| a.action_type.as_str()),
                &column(batch, |a| a.delivery_id.as_str()),
                &column(batch, |a| a.attempt),
                &column(batch, |a| a.started_at),
                &column(batch, |a| a.duration.as_secs_f64() * 1e3),
                &column(batch, |a| a.outcome),
                &column(batch, |a| a.status_code),
                &column(batch, |a| a.error.as_deref()),
                &column(batch, |a| a.response_excerpt.as_deref()),
            ],
        )
        .await?;
    Ok(())
}

/// What `deliveries list` asks for. Every filter is optional.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// One consumer's attempts (else every consumer's).
    pub consumer: Option<String>,
    pub observer: Option<String>,
    /// An entity's id, or `Type/id`.
    pub entity: Option<String>,
    pub sequence: Option<i64>,
    /// `Some(true)`: successes only; `Some(false)`: failures only.
    pub ok: Option<bool>,
    /// Attempts started at most this long ago.
    pub since: Option<Duration>,
    pub limit: i64,
}

/// The attempts `filter` selects, newest first.
pub async fn list(client: &Client, filter: &Filter) -> Result<Vec<Attempt>> {
    if filter.limit < 1 {
        return Err(Error::Invalid("the limit must be at least 1".into()));
    }
    let since = filter.since.map(|d| d.as_secs_f64());
    let rows = client
        .query(
            "SELECT event_id, event_sequence, entity_type, entity_key, observer, action_index,
                    action_type, delivery_id, attempt, started_at, duration_ms, outcome,
                    status_code, error, response_excerpt
               FROM core.observer_delivery_log
              WHERE ($1::text IS NULL OR consumer_id = $1)
                AND ($2::text IS NULL OR observer = $2)
                AND ($3::text IS NULL OR entity_key = $3 OR split_part(entity_key, '/', 2) = $3)
                AND ($4::int8 IS NULL OR event_sequence = $4)
                AND ($5::bool IS NULL OR (outcome = 'ok') = $5)
                AND ($6::float8 IS NULL OR started_at >= now() - make_interval(secs => $6))
              ORDER BY started_at DESC, event_sequence DESC, attempt DESC
              LIMIT $7",
            &[
                &filter.consumer,
                &filter.observer,
                &filter.entity,
                &filter.sequence,
                &filter.ok,
                &since,
                &filter.limit,
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Attempt {
            event_id: r.get(0),
            event_sequence: r.get(1),
            entity_type: r.get(2),
            entity_key: r.get(3),
            observer: r.get(4),
            action_index: r.get(5),
            action_type: r.get(6),
            delivery_id: r.get(7),
            attempt: r.get(8),
            started_at: r.get(9),
            duration: Duration::from_secs_f64(r.get::<_, f64>(10).max(0.0) / 1e3),
            outcome: match r.get::<_, &str>(11) {
                "ok" => "ok",
                "transient" => "transient",
                "gone" => "gone",
                _ => "permanent",
            },
            status_code: r.get(12),
            error: r.get(13),
            response_excerpt: r.get(14),
        })
        .collect())
}

/// Delete attempts older than `older_than`, `batch_size` rows per statement. Returns how many.
pub async fn prune(client: &Client, older_than: Duration, batch_size: i64) -> Result<u64> {
    if batch_size < 1 {
        return Err(Error::Invalid("batch size must be at least 1".into()));
    }
    let statement = client
        .prepare(
            "WITH doomed AS (
                 SELECT ctid FROM core.observer_delivery_log
                  WHERE started_at < now() - make_interval(secs => $1)
                  LIMIT $2)
             DELETE FROM core.observer_delivery_log l USING doomed WHERE l.ctid = doomed.ctid",
        )
        .await?;
    let mut total = 0;
    loop {
        let deleted = client
            .execute(&statement, &[&older_than.as_secs_f64(), &batch_size])
            .await?;
        total += deleted;
        if deleted < batch_size as u64 {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_levels() {
        assert_eq!(Record::parse("all"), Some(Record::All));
        assert_eq!(Record::parse("failures"), Some(Record::Failures));
        assert_eq!(Record::parse("none"), Some(Record::None));
        assert_eq!(Record::parse("some"), None);
        assert!(Record::All.wants(true) && Record::All.wants(false));
        assert!(!Record::Failures.wants(true) && Record::Failures.wants(false));
        assert!(!Record::None.wants(true) && !Record::None.wants(false));
    }
}
