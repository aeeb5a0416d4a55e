//! Where a consumer stands in the change log, stored in `core.observer_checkpoints`.
//!
//! Invariant: every change-log row visible in `snapshot` has been handled; when `batch` is set,
//! so have the rows of that batch (visible in the batch snapshot and not in `snapshot`) whose
//! sequence is at most the recorded one. Every write is fenced by the epoch the writer took when it
//! claimed the consumer: a write that matches no row means another instance took over.

use super::snapshot::Snapshot;
use crate::db;
use crate::error::{Error, Result};
use crate::event::Position;
use chrono::{DateTime, Utc};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
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

/// One diff between two snapshots, being handed out or waiting to be marked done.
#[derive(Debug)]
pub(super) struct BatchState {
    pub(super) no: u64,
    pub(super) lower: Snapshot,
    pub(super) upper: Snapshot,
    /// The page of the batch's sequences being handed out (the whole batch when it fits one).
    pub(super) ids: Vec<i64>,
    pub(super) next: usize,
    /// While more pages of sequences remain after `ids`: the highest sequence they can hold.
    pub(super) pages_up_to: Option<i64>,
}

/// What has been handed out and what is done; shared by the reader and its checkpointers.
#[derive(Debug)]
pub(super) struct Progress {
    /// Batches not yet marked done, oldest first.
    pub(super) batches: VecDeque<BatchState>,
    /// What is done, as last computed by `mark_done`, and whether it still needs saving.
    done: Checkpoint,
    dirty: bool,
    /// The last position `mark_done` was given, to re-check a batch that turns out complete later.
    last_marked: Option<Position>,
}

impl Progress {
    pub(super) fn new(done: Checkpoint) -> Progress {
        Progress {
            batches: VecDeque::new(),
            done,
            dirty: false,
            last_marked: None,
        }
    }

    pub(super) fn set_done(&mut self, done: Checkpoint) {
        self.done = done;
        self.dirty = true;
    }

    /// Batch `no` turned out to have no pages after the one handed out: it may be complete with
    /// what is already marked done.
    pub(super) fn no_more_pages(&mut self, no: u64) {
        if let Some(batch) = self.batches.iter_mut().find(|b| b.no == no) {
            batch.pages_up_to = None;
        }
        if let Some(position) = self.last_marked {
            self.mark_done(position);
        }
    }

    fn mark_done(&mut self, position: Position) {
        self.last_marked = Some(position);
        while let Some(front) = self.batches.front() {
            let complete = front.no < position.batch
                || (front.no == position.batch
                    && front.next == front.ids.len()
                    && front.pages_up_to.is_none()
                    && front
                        .ids
                        .last()
                        .is_some_and(|last| *last <= position.sequence));
            if complete {
                let front = self.batches.pop_front().expect("front exists");
                self.set_done(Checkpoint {
                    snapshot: front.upper,
                    batch: None,
                });
                continue;
            }
            if front.no == position.batch {
                let done = Checkpoint {
                    snapshot: front.lower.clone(),
                    batch: Some(BatchProgress {
                        snapshot: front.upper.clone(),
                        done_sequence: position.sequence,
                    }),
                };
                self.set_done(done);
            }
            break;
        }
    }
}

/// Marks events done and writes the checkpoint, on a connection of its own. Clones share the
/// listener's progress (each opens its own connection).
pub struct Checkpointer {
    consumer: String,
    epoch: i64,
    db_config: tokio_postgres::Config,
    client: Option<Client>,
    progress: Arc<Mutex<Progress>>,
}

impl Clone for Checkpointer {
    fn clone(&self) -> Self {
        Checkpointer {
            consumer: self.consumer.clone(),
            epoch: self.epoch,
            db_config: self.db_config.clone(),
            client: None,
            progress: self.progress.clone(),
        }
    }
}

impl Checkpointer {
    pub(super) fn new(
        consumer: &str,
        epoch: i64,
        db_config: &tokio_postgres::Config,
        progress: Arc<Mutex<Progress>>,
    ) -> Checkpointer {
        Checkpointer {
            consumer: consumer.to_string(),
            epoch,
            db_config: db_config.clone(),
            client: None,
            progress,
        }
    }

    /// Record that every event handed out at or before `position` is done.
    pub fn mark_done(&self, position: Position) {
        self.lock().mark_done(position);
    }

    /// Write what `mark_done` recorded, if anything changed since the last write. Fenced by the
    /// epoch: `Error::Fenced` means another instance leads this consumer now.
    pub async fn save(&mut self) -> Result<()> {
        let (done, was_dirty) = {
            let mut progress = self.lock();
            let state = (progress.done.clone(), progress.dirty);
            progress.dirty = false;
            state
        };
        if !was_dirty {
            return Ok(());
        }
        let result = self.write(&done).await;
        if result.is_err() {
            // Not written: write it (or something newer) next time.
            self.lock().dirty = true;
        }
        result
    }

    /// The checkpoint as `mark_done` last computed it (saved or not).
    pub fn done(&self) -> Checkpoint {
        self.lock().done.clone()
    }

    /// Whether events have been handed out and not yet marked done.
    pub fn has_outstanding(&self) -> bool {
        !self.lock().batches.is_empty()
    }

    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    async fn write(&mut self, done: &Checkpoint) -> Result<()> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            let application = format!("fraiseql-observers-checkpoint:{}", self.consumer);
            let client = db::connect(&self.db_config, &application)
                .await
                .map_err(|e| Error::Reconnect(e.to_string()))?;
            self.client = Some(client);
        }
        let client = self.client.as_ref().expect("connected");
        let result = save(client, &self.consumer, self.epoch, done).await;
        if result.as_ref().is_err_and(|e| e.is_transient()) {
            self.client = None;
        }
        result
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().expect("progress lock poisoned")
    }
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
///
/// The row is updated in place and its epoch bumped, never deleted: epochs only grow, so an
/// instance that claimed the consumer before the reset is fenced afterwards.
pub async fn reset(client: &Client, consumer: &str, start: StartPosition) -> Result<bool> {
    let initial = match start {
        StartPosition::Now => None,
        StartPosition::Beginning => Some(Snapshot::beginning().to_string()),
    };
    let existed = client
        .execute(
            "UPDATE core.observer_checkpoints
                SET snapshot = COALESCE($2::text::pg_snapshot, pg_current_snapshot()),
                    batch_snapshot = NULL,
                    batch_done_sequence = NULL,
                    epoch = epoch + 1,
                    updated_at = now()
              WHERE consumer_id = $1",
            &[&consumer, &initial],
        )
        .await?
        > 0;
    if !existed {
        client
            .execute(
                "INSERT INTO core.observer_checkpoints (consumer_id, snapshot)
                 VALUES ($1, COALESCE($2::text::pg_snapshot, pg_current_snapshot()))",
                &[&consumer, &initial],
            )
            .await?;
    }
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
