//! Where a consumer stands in the change log, stored in `core.observer_checkpoints`.
//!
//! Invariant: every change-log row visible in `snapshot` has been handled; when `batch` is set,
//! so have the rows of that batch (visible in the batch snapshot and not in `snapshot`) whose
//! sequence is at most the recorded one. Every write is fenced by the epoch the writer took when it
//! claimed the consumer: a write that matches no row means another instance took over.

use super::snapshot::Snapshot;
use crate::error::{Error, Result};
use chrono::{DateTime, Utc};
use tokio_postgres::Client;

/// Where a consumer that has no checkpoint yet starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StartPosition {
    /// Changes committed after the consumer first starts (the default: a new observer does not
    /// replay history).
    #[default]
    Now,
    /// Every change in the log, from the first row.
    Beginning,
}

/// A batch handed out partly: its upper snapshot and the last sequence handled in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchProgress {
    pub snapshot: Snapshot,
    pub done_sequence: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub snapshot: Snapshot,
    pub batch: Option<BatchProgress>,
}

/// Claim `consumer` for this instance: create its checkpoint if it has none (at `start`), bump
/// its epoch, and return the stored checkpoint with the new epoch.
pub async fn claim(
    client: &Client,
    consumer: &str,
    start: StartPosition,
) -> Result<(Checkpoint, i64)> {
    let initial = match start {
        StartPosition::Now => None,
        StartPosition::Beginning => Some(Snapshot::beginning().to_string()),
    };
    client
        .execute(
            "INSERT INTO core.observer_checkpoints (consumer_id, snapshot)
             VALUES ($1, COALESCE($2::text::pg_snapshot, pg_current_snapshot()))
             ON CONFLICT (consumer_id) DO NOTHING",
            &[&consumer, &initial],
        )
        .await?;
    let row = client
        .query_one(
            "UPDATE core.observer_checkpoints
                SET epoch = epoch + 1, updated_at = now()
              WHERE consumer_id = $1
          RETURNING snapshot::text, batch_snapshot::text, batch_done_sequence, epoch",
            &[&consumer],
        )
        .await?;
    Ok((from_columns(&row)?, row.get(3)))
}

/// The stored checkpoint of `consumer` and its epoch, if it has one.
pub async fn load(client: &Client, consumer: &str) -> Result<Option<(Checkpoint, i64)>> {
    let row = client
        .query_opt(
            "SELECT snapshot::text, batch_snapshot::text, batch_done_sequence, epoch
               FROM core.observer_checkpoints WHERE consumer_id = $1",
            &[&consumer],
        )
        .await?;
    row.map(|row| Ok((from_columns(&row)?, row.get(3))))
        .transpose()
}

/// Store `checkpoint` if `epoch` still leads `consumer`; `Error::Fenced` otherwise.
pub async fn save(
    client: &Client,
    consumer: &str,
    epoch: i64,
    checkpoint: &Checkpoint,
) -> Result<()> {
    let snapshot = checkpoint.snapshot.to_string();
    let batch_snapshot = checkpoint.batch.as_ref().map(|b| b.snapshot.to_string());
    let done = checkpoint.batch.as_ref().map(|b| b.done_sequence);
    let updated = client
        .execute(
            "UPDATE core.observer_checkpoints
                SET snapshot = $2::text::pg_snapshot,
                    batch_snapshot = $3::text::pg_snapshot,
                    batch_done_sequence = $4,
                    updated_at = now()
              WHERE consumer_id = $1 AND epoch = $5",
            &[&consumer, &snapshot, &batch_snapshot, &done, &epoch],
        )
        .await?;
    if updated == 0 {
        return Err(Error::Fenced {
            consumer: consumer.to_string(),
            epoch,
        });
    }
    Ok(())
}

/// Forget where `consumer` stands and start again from `start` (for an operator, e.g. after the
/// database was restored). Returns whether a checkpoint existed.
pub async fn reset(client: &Client, consumer: &str, start: StartPosition) -> Result<bool> {
    let existed = client
        .execute(
            "DELETE FROM core.observer_checkpoints WHERE consumer_id = $1",
            &[&consumer],
        )
        .await?
        > 0;
    let initial = match start {
        StartPosition::Now => None,
        StartPosition::Beginning => Some(Snapshot::beginning().to_string()),
    };
    client
        .execute(
            "INSERT INTO core.observer_checkpoints (consumer_id, snapshot)
             VALUES ($1, COALESCE($2::text::pg_snapshot, pg_current_snapshot()))",
            &[&consumer, &initial],
        )
        .await?;
    Ok(existed)
}

/// A consumer's stored checkpoint, as an operator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerCheckpoint {
    pub consumer: String,
    pub checkpoint: Checkpoint,
    pub epoch: i64,
    pub updated_at: DateTime<Utc>,
}

/// The checkpoint of `consumer`, or of every consumer when `None`, by consumer id.
pub async fn list(client: &Client, consumer: Option<&str>) -> Result<Vec<ConsumerCheckpoint>> {
    client
        .query(
            "SELECT snapshot::text, batch_snapshot::text, batch_done_sequence, epoch, updated_at,
                    consumer_id
               FROM core.observer_checkpoints
              WHERE $1::text IS NULL OR consumer_id = $1
              ORDER BY consumer_id",
            &[&consumer],
        )
        .await?
        .iter()
        .map(|row| {
            Ok(ConsumerCheckpoint {
                checkpoint: from_columns(row)?,
                epoch: row.get(3),
                updated_at: row.get(4),
                consumer: row.get(5),
            })
        })
        .collect()
}

fn from_columns(row: &tokio_postgres::Row) -> Result<Checkpoint> {
    let snapshot: String = row.get(0);
    let batch_snapshot: Option<String> = row.get(1);
    let done: Option<i64> = row.get(2);
    let batch = match (batch_snapshot, done) {
        (Some(s), Some(done_sequence)) => Some(BatchProgress {
            snapshot: s.parse()?,
            done_sequence,
        }),
        _ => None,
    };
    Ok(Checkpoint {
        snapshot: snapshot.parse()?,
        batch,
    })
}
