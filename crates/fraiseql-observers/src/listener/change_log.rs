//! `ChangeLogListener`: the gap-safe reader of `core.tb_entity_change_log`.
//!
//! It reads with snapshot-diff batches (`correctness.md` section 2, the algorithm PgQ uses): a
//! batch is exactly the rows whose writing transaction is visible in the current snapshot and was
//! not visible in the previous one. So a transaction that drew a low `id` and commits late is read
//! in a later batch (never lost), an open transaction delays only its own rows, and within a batch
//! rows come in `id` order, which for one entity is commit order (the capture trigger runs AFTER
//! the row is written, under the row lock).
//!
//! Invariants:
//! * Every committed row is handed out once per run, in `(batch, sequence)` order, and never a row
//!   of a transaction that is still open or rolled back.
//! * The stored checkpoint moves only through [`ChangeLogListener::mark_done`] +
//!   [`ChangeLogListener::save_checkpoint`], never because rows were fetched: a crash replays what
//!   was in flight (duplicates, never loss).
//! * A row that cannot be decoded is quarantined (with its reason and a copy of the row) and
//!   skipped; it never stalls the stream.
//! * A lost connection is retried with capped exponential backoff; the reading position is kept in
//!   memory, so nothing is re-read or skipped when it comes back.
//! * While a consumer works on one chunk of a batch, the next chunk of the same batch is already
//!   being fetched and decoded (one chunk ahead, never more): a prefetch is only used if it is
//!   exactly the chunk due next, and is dropped (aborted) on reconnect, so it never changes what
//!   is handed out or in what order.
//! * What is held at once is bounded whatever the backlog (see [`super::sizing`]): a batch's
//!   sequences are read in pages of at most `id_page_size` (keyset on the sequence: the first page
//!   by the snapshot diff, later ones by a range scan of the sequence up to the highest sequence the
//!   batch can hold), and a chunk of rows holds at most `batch_size` rows and about
//!   `max_chunk_bytes`. A `statement_timeout` cancellation halves the page or chunk instead of
//!   retrying it at the same size; a chunk the server fails to produce is halved down to the bad
//!   row, which is quarantined like an undecodable one.

use super::checkpoint::{self, BatchState, Checkpoint, Checkpointer, Progress, StartPosition};
use super::parser::{self, ChangeLogRowRef, TableShape};
use super::sizing::{ReadFailure, Sizing};
use super::snapshot::Snapshot;
use super::statements::{
    batch_ids, batch_ids_in_range, current_snapshot, fetch_chunk, open, poll, quarantine,
    row_bytes, sample_row_bytes, Connection,
};
use crate::db;
use crate::error::{Error, Result};
use crate::event::{EntityEvent, Position};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_postgres::Row;

/// Consecutive failures after which the listener reports itself unhealthy (it keeps retrying).
pub const UNHEALTHY_AFTER_FAILURES: u32 = 10;

pub use super::statements::{
    batch_ids_page_sql, batch_ids_range_sql, batch_ids_sql, chunk_range_sql, chunk_rows_sql,
    poll_sql,
};

/// How the listener reads. `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// `postgres://...` URL of the primary.
    pub database_url: String,
    /// Names this consumer's checkpoint. Two consumers with different ids each see every change.
    pub consumer_id: String,
    /// The most events handed out per [`ChangeLogListener::next_batch`] call (a large catch-up
    /// batch is handed out in chunks of this size, smaller when rows are large: `max_chunk_bytes`).
    pub batch_size: usize,
    /// The longest sleep between two polls when the log is idle.
    pub poll_interval: Duration,
    /// The first sleep after the log goes idle; it doubles up to `poll_interval`.
    pub min_poll_interval: Duration,
    /// Where a consumer without a checkpoint starts.
    pub start: StartPosition,
    /// Wake up on `NOTIFY fraiseql_observers` (see `capture::set_notify`) as well as by polling.
    pub notify: bool,
    /// First delay before reconnecting after a lost connection; doubles up to `retry_max_delay`.
    pub retry_initial_delay: Duration,
    pub retry_max_delay: Duration,
    /// The most sequences of a batch held at once (a larger batch is read in pages of this size).
    pub id_page_size: usize,
    /// About the most bytes of row text in one chunk: the chunk's row count is this divided by
    /// the size of the largest row of the previous chunk (at least one row, at most `batch_size`).
    pub max_chunk_bytes: usize,
    /// The reader connection's `statement_timeout`, replacing the one `db` sets for its job
    /// (`None`: keep that one). A read it cancels is made smaller, not retried as it was.
    pub statement_timeout: Option<Duration>,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            database_url: String::new(),
            consumer_id: "default".to_string(),
            batch_size: 1000,
            poll_interval: Duration::from_millis(100),
            // After activity the next change is usually a few milliseconds away: 1 ms keeps
            // the commit-to-delivery median near 1 ms at 1,000 changes/s (5 ms gave 3.5 ms),
            // for a handful of extra snapshot polls each time the log goes idle.
            min_poll_interval: Duration::from_millis(1),
            start: StartPosition::Now,
            notify: false,
            retry_initial_delay: Duration::from_millis(100),
            retry_max_delay: Duration::from_secs(30),
            id_page_size: 100_000,
            max_chunk_bytes: 16 * 1024 * 1024,
            statement_timeout: None,
        }
    }
}

/// Events handed out by one [`ChangeLogListener::next_batch`] call, in order.
#[derive(Debug, Clone)]
pub struct Batch {
    pub events: Vec<EntityEvent>,
    /// The position of the last row of this chunk (decoded or quarantined). Once every event of
    /// the batch is done, `mark_done(end)` covers the whole chunk, quarantined rows included.
    pub end: Position,
    /// Rows read (events plus quarantined rows).
    pub rows: usize,
    /// Rows that could not be decoded and were quarantined.
    pub quarantined: usize,
}

/// Health and counters shared with whoever watches the listener.
#[derive(Debug, Default)]
pub struct ListenerStats {
    consecutive_failures: AtomicU32,
    rows_read: AtomicU64,
    pub(super) quarantined: AtomicU64,
    reconnects: AtomicU64,
    polls: AtomicU64,
    batch_queries: AtomicU64,
    pub(super) statements: AtomicU64,
    largest_id_page: AtomicU64,
    largest_chunk_rows: AtomicU64,
    largest_chunk_bytes: AtomicU64,
    id_pages: AtomicU64,
    shrinks: AtomicU64,
}

impl ListenerStats {
    /// False after [`UNHEALTHY_AFTER_FAILURES`] consecutive failures to reach the database.
    pub fn is_healthy(&self) -> bool {
        self.consecutive_failures() < UNHEALTHY_AFTER_FAILURES
    }
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }
    pub fn rows_read(&self) -> u64 {
        self.rows_read.load(Ordering::Relaxed)
    }
    pub fn quarantined(&self) -> u64 {
        self.quarantined.load(Ordering::Relaxed)
    }
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
    /// Looks for a new batch (one statement each: the current snapshot and the first page of the
    /// batch up to it; an idle poll is only that).
    pub fn polls(&self) -> u64 {
        self.polls.load(Ordering::Relaxed)
    }
    /// Polls that found a new snapshot and so looked for the batch's rows (any transaction in the
    /// cluster that took an id moves the snapshot, whether it wrote to the change log or not).
    pub fn batch_queries(&self) -> u64 {
        self.batch_queries.load(Ordering::Relaxed)
    }
    /// Statements the reader sent while reading (each one round trip): polls, later id pages,
    /// chunks of rows (prefetched ones included), quarantine copies. Not the checkpoint's.
    pub fn statements(&self) -> u64 {
        self.statements.load(Ordering::Relaxed)
    }
    /// The most sequences held in one id page so far.
    pub fn largest_id_page(&self) -> u64 {
        self.largest_id_page.load(Ordering::Relaxed)
    }
    /// The most rows read in one chunk so far.
    pub fn largest_chunk_rows(&self) -> u64 {
        self.largest_chunk_rows.load(Ordering::Relaxed)
    }
    /// The most bytes of row text read in one chunk so far.
    pub fn largest_chunk_bytes(&self) -> u64 {
        self.largest_chunk_bytes.load(Ordering::Relaxed)
    }
    /// Id pages read (one per batch, more for a batch larger than `id_page_size`).
    pub fn id_pages(&self) -> u64 {
        self.id_pages.load(Ordering::Relaxed)
    }
    /// Reads made smaller because the server cancelled them (`statement_timeout`) or failed on a
    /// row of the chunk.
    pub fn shrinks(&self) -> u64 {
        self.shrinks.load(Ordering::Relaxed)
    }
}

/// Stops a listener from another task: its pending or next `next_batch` returns `Ok(None)`.
#[derive(Debug, Clone)]
pub struct StopHandle(Arc<watch::Sender<bool>>);

impl StopHandle {
    pub fn stop(&self) {
        self.0.send_replace(true);
    }
}

/// The next chunk of a batch, being fetched on a task of its own while the consumer works on the
/// current one (it is decoded by the reader when it is due, so an event is allocated on the
/// consumer's thread). Aborted when dropped.
struct Prefetch {
    batch: u64,
    start: usize,
    end: usize,
    task: tokio::task::JoinHandle<Result<Vec<Row>>>,
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Prefetch {
    /// The chunk's rows; `None` when the task was cancelled (fetch it again). A panic in the task
    /// is resumed here.
    async fn join(mut self) -> Option<Result<Vec<Row>>> {
        match (&mut self.task).await {
            Ok(result) => Some(result),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => None,
        }
    }
}

/// Reads committed changes from `core.tb_entity_change_log` as [`EntityEvent`]s.
pub struct ChangeLogListener {
    config: ListenerConfig,
    db_config: tokio_postgres::Config,
    conn: Option<Connection>,
    shape: TableShape,
    prefetch: Option<Prefetch>,
    /// Everything visible here has been handed out or sits in `progress.batches`.
    read: Snapshot,
    progress: Arc<Mutex<Progress>>,
    checkpointer: Checkpointer,
    next_batch_no: u64,
    sizing: Sizing,
    idle_delay: Duration,
    stop_tx: Arc<watch::Sender<bool>>,
    stop_rx: watch::Receiver<bool>,
    stats: Arc<ListenerStats>,
    /// The server the lead started on; a reconnect must reach the same one.
    server: ServerIdentity,
}

/// Which server a connection reached: its cluster (`system_identifier`, shared by a primary and
/// its physical standbys) and its timeline (a standby promoted to primary starts a new one).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ServerIdentity {
    system: String,
    timeline: String,
}

impl std::fmt::Display for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cluster {}, timeline {}", self.system, self.timeline)
    }
}

/// The identity of the server `client` is connected to (a primary: the caller checked).
async fn server_identity(client: &tokio_postgres::Client) -> Result<ServerIdentity> {
    let row = client
        .query_one(
            "SELECT (SELECT system_identifier::text FROM pg_control_system()),
                    substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)",
            &[],
        )
        .await?;
    let timeline = u32::from_str_radix(row.get::<_, &str>(1), 16)
        .map_err(|e| Error::Invalid(format!("the server's timeline: {e}")))?;
    Ok(ServerIdentity {
        system: row.get(0),
        timeline: timeline.to_string(),
    })
}

impl ChangeLogListener {
    /// Connect, claim the consumer (bumping its fencing epoch), load its checkpoint (creating it
    /// at `config.start` for a new consumer) and get ready to resume exactly where it stopped.
    pub async fn start(config: ListenerConfig) -> Result<Self> {
        if config.batch_size == 0 {
            return Err(Error::Invalid("batch_size must be at least 1".into()));
        }
        if config.id_page_size == 0 || config.max_chunk_bytes == 0 {
            return Err(Error::Invalid(
                "id_page_size and max_chunk_bytes must be at least 1".into(),
            ));
        }
        let db_config = db::parse_url(&config.database_url)?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let (conn, shape) = open(&db_config, &config).await?;
        let server = server_identity(&conn.client).await?;
        let (stored, epoch) =
            checkpoint::claim(&conn.client, &config.consumer_id, config.start).await?;

        let current: Snapshot = current_snapshot(&conn).await?;
        let stored_upper = stored
            .batch
            .as_ref()
            .map_or(&stored.snapshot, |b| &b.snapshot);
        if stored_upper.is_ahead_of(&current) {
            return Err(Error::CheckpointAhead {
                consumer: config.consumer_id.clone(),
                stored: stored_upper.to_string(),
                current: current.to_string(),
            });
        }

        let progress = Arc::new(Mutex::new(Progress::new(stored.clone())));
        let checkpointer =
            Checkpointer::new(&config.consumer_id, epoch, &db_config, progress.clone());
        let mut sizing = Sizing::new(
            config.batch_size,
            config.max_chunk_bytes,
            config.id_page_size,
        );
        if let Some(bytes) = sample_row_bytes(&conn, &shape).await {
            sizing.assume_row_bytes(bytes);
        }
        let mut listener = ChangeLogListener {
            sizing,
            idle_delay: config.min_poll_interval,
            read: stored.snapshot.clone(),
            progress,
            checkpointer,
            config,
            db_config,
            conn: Some(conn),
            shape,
            prefetch: None,
            next_batch_no: 1,
            stop_tx: Arc::new(stop_tx),
            stop_rx,
            stats: Arc::new(ListenerStats::default()),
            server,
        };
        if let Some(progress) = stored.batch {
            // Resume the batch that was in progress: its rows after the last one done.
            let (_, ids, pages_up_to) = listener
                .id_page(
                    &stored.snapshot,
                    Some(&progress.snapshot),
                    progress.done_sequence,
                    None,
                )
                .await?;
            listener.read = progress.snapshot.clone();
            if ids.is_empty() {
                listener.lock().set_done(Checkpoint {
                    snapshot: progress.snapshot,
                    batch: None,
                });
            } else {
                listener.push_batch(stored.snapshot, progress.snapshot, ids, pages_up_to);
            }
        }
        tracing::info!(
            consumer = %listener.config.consumer_id,
            epoch,
            snapshot = %listener.read,
            "change-log listener started"
        );
        Ok(listener)
    }

    /// The fencing epoch this instance holds.
    pub fn epoch(&self) -> i64 {
        self.checkpointer.epoch()
    }

    /// The change log's sequence column (`id`, or `pk_entity_change_log` in the later shape).
    pub fn sequence_column(&self) -> &'static str {
        self.shape.sequence_column()
    }

    pub fn consumer_id(&self) -> &str {
        &self.config.consumer_id
    }

    pub fn stats(&self) -> Arc<ListenerStats> {
        self.stats.clone()
    }

    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.stop_tx.clone())
    }

    /// Stop: the next `next_batch` returns `Ok(None)`.
    pub fn stop(&self) {
        self.stop_tx.send_replace(true);
    }

    /// The next chunk of committed changes, waiting (adaptive polling) until there is one.
    /// `Ok(None)` once stopped. Lost connections are retried here, without end; other errors
    /// (a missing table, a permission denied, ...) are returned.
    pub async fn next_batch(&mut self) -> Result<Option<Batch>> {
        let mut stop = self.stop_rx.clone();
        let mut failure_delay = self.config.retry_initial_delay;
        loop {
            if *stop.borrow() {
                return Ok(None);
            }
            let step = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return Ok(None),
                step = self.step() => step,
            };
            match step {
                Ok(Some(batch)) => {
                    self.stats.consecutive_failures.store(0, Ordering::Relaxed);
                    return Ok(Some(batch));
                }
                Ok(None) => {
                    self.stats.consecutive_failures.store(0, Ordering::Relaxed);
                    failure_delay = self.config.retry_initial_delay;
                    self.idle(&mut stop).await;
                }
                Err(e) if e.is_transient() => {
                    self.conn = None;
                    self.prefetch = None;
                    let failures = self
                        .stats
                        .consecutive_failures
                        .fetch_add(1, Ordering::Relaxed)
                        + 1;
                    if failures == UNHEALTHY_AFTER_FAILURES {
                        tracing::error!(consumer = %self.config.consumer_id, failures, error = %e,
                            "change-log listener cannot reach the database; unhealthy, still retrying");
                    } else {
                        tracing::warn!(consumer = %self.config.consumer_id, failures, error = %e,
                            retry_in_ms = failure_delay.as_millis() as u64, "change-log listener lost the database; retrying");
                    }
                    let jitter = rand::random_range(0.5..1.0);
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => return Ok(None),
                        _ = tokio::time::sleep(failure_delay.mul_f64(jitter)) => {}
                    }
                    failure_delay = (failure_delay * 2).min(self.config.retry_max_delay);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A handle that marks events done and saves the checkpoint, usable from another task while
    /// this listener waits in `next_batch`. It opens a connection of its own when it first saves.
    pub fn checkpointer(&self) -> Checkpointer {
        self.checkpointer.clone()
    }

    /// Record that every event handed out at or before `position` is done (its actions succeeded
    /// or were handed over durably). Cheap; the checkpoint is written by `save_checkpoint`.
    pub fn mark_done(&self, position: Position) {
        self.checkpointer.mark_done(position);
    }

    /// Write what `mark_done` recorded, if anything changed. `Error::Fenced` when another instance
    /// has claimed this consumer since: stop dispatching at once.
    pub async fn save_checkpoint(&mut self) -> Result<()> {
        self.checkpointer.save().await
    }

    /// One poll: hand out the next chunk of a known batch, or look for a new batch.
    /// `Ok(None)` when there is nothing new.
    async fn step(&mut self) -> Result<Option<Batch>> {
        if self.conn.is_none() {
            self.reconnect().await?;
        }
        self.next_page_if_due().await?;
        if let Some(batch) = self.next_chunk().await? {
            return Ok(Some(batch));
        }

        // One statement: the current snapshot and the first page of the batch up to it.
        let read = self.read.clone();
        let (current, ids, pages_up_to) = self.id_page(&read, None, i64::MIN, None).await?;
        if current == self.read {
            return Ok(None);
        }
        self.stats.batch_queries.fetch_add(1, Ordering::Relaxed);
        if ids.is_empty() {
            // Nothing of ours committed between the two snapshots: widen the newest batch (its
            // row set is unchanged) or, with none outstanding, the done checkpoint.
            let mut progress = self.lock();
            match progress.batches.back_mut() {
                Some(last) => last.upper = current.clone(),
                None => progress.set_done(Checkpoint {
                    snapshot: current.clone(),
                    batch: None,
                }),
            }
            drop(progress);
            self.read = current;
            return Ok(None);
        }
        let lower = std::mem::replace(&mut self.read, current.clone());
        self.push_batch(lower, current, ids, pages_up_to);
        self.idle_delay = self.config.min_poll_interval;
        Box::pin(self.step()).await
    }

    /// When the newest batch's page is handed out and more pages remain, read the next one.
    async fn next_page_if_due(&mut self) -> Result<()> {
        let due = self.lock().batches.back().and_then(|b| {
            let up_to = b.pages_up_to?;
            (b.next == b.ids.len()).then(|| {
                (
                    b.no,
                    b.lower.clone(),
                    b.upper.clone(),
                    *b.ids.last().expect("a page is never empty"),
                    up_to,
                )
            })
        });
        let Some((no, lower, upper, after, up_to)) = due else {
            return Ok(());
        };
        let (_, ids, pages_up_to) = self
            .id_page(&lower, Some(&upper), after, Some(up_to))
            .await?;
        let mut progress = self.lock();
        if ids.is_empty() {
            progress.no_more_pages(no);
        } else if let Some(batch) = progress.batches.iter_mut().find(|b| b.no == no) {
            batch.ids = ids;
            batch.next = 0;
            batch.pages_up_to = pages_up_to;
        }
        Ok(())
    }

    /// Hand out the next chunk of the newest batch, if it has rows not handed out yet.
    async fn next_chunk(&mut self) -> Result<Option<Batch>> {
        let conn = self.conn.as_ref().expect("connected");
        let chunk_rows = self.sizing.chunk_rows();
        let pending = self.lock().batches.back().and_then(|b| {
            (b.next < b.ids.len()).then(|| {
                let end = (b.next + chunk_rows).min(b.ids.len());
                let after = (end + chunk_rows).min(b.ids.len());
                (
                    b.no,
                    b.next,
                    end,
                    b.ids[b.next..end].to_vec(),
                    b.ids[end..after].to_vec(),
                )
            })
        });
        let Some((no, start, end, chunk, following)) = pending else {
            return Ok(None);
        };
        let last_id = *chunk.last().expect("chunk is not empty");
        let prefetched = match self.prefetch.take() {
            Some(p) if p.batch == no && p.start == start && p.end == end => p.join().await,
            _ => None,
        };
        let fetched = match prefetched {
            Some(result) => result,
            None => {
                self.stats.statements.fetch_add(1, Ordering::Relaxed);
                fetch_chunk(conn.client.clone(), conn.chunk.clone(), chunk.clone()).await
            }
        };
        let rows = match fetched {
            Ok(rows) => rows,
            Err(e) => return self.chunk_failed(no, start, &chunk, e).await,
        };
        if !following.is_empty() {
            let following_end = end + following.len();
            self.stats.statements.fetch_add(1, Ordering::Relaxed);
            let task = tokio::spawn(fetch_chunk(
                conn.client.clone(),
                conn.chunk.clone(),
                following,
            ));
            self.prefetch = Some(Prefetch {
                batch: no,
                start: end,
                end: following_end,
                task,
            });
        }
        let read = rows.len();
        let mut events = Vec::with_capacity(read);
        let mut quarantined = 0;
        let (mut bytes, mut largest) = (0, 0);
        for row in &rows {
            let sequence: i64 = row.try_get(0)?;
            let position = Position {
                batch: no,
                sequence,
            };
            let decoded = ChangeLogRowRef::from_row(row).and_then(|raw| {
                let size = row_bytes(&raw);
                bytes += size;
                largest = largest.max(size);
                parser::decode(&self.shape, raw, position)
            });
            match decoded {
                Ok(event) => events.push(event),
                Err(e) => {
                    quarantined += 1;
                    quarantine(
                        conn,
                        &self.config.consumer_id,
                        &self.stats,
                        sequence,
                        &e.reason,
                    )
                    .await?;
                }
            }
        }
        self.sizing.chunk_read(read, largest);
        self.stats
            .largest_chunk_rows
            .fetch_max(read as u64, Ordering::Relaxed);
        self.stats
            .largest_chunk_bytes
            .fetch_max(bytes as u64, Ordering::Relaxed);
        self.stats
            .rows_read
            .fetch_add(read as u64, Ordering::Relaxed);
        metrics::counter!(crate::metrics::ROWS_READ).increment(read as u64);
        self.handed_out(no, end);
        Ok(Some(Batch {
            events,
            end: Position {
                batch: no,
                sequence: last_id,
            },
            rows: read,
            quarantined,
        }))
    }

    /// A chunk read failed: read it smaller (a timeout, or a row the server cannot produce, in a
    /// chunk of several rows), quarantine its row (a chunk of one row the server cannot produce),
    /// or hand the error on.
    async fn chunk_failed(
        &mut self,
        no: u64,
        start: usize,
        chunk: &[i64],
        e: Error,
    ) -> Result<Option<Batch>> {
        self.prefetch = None;
        let Some(failure) = ReadFailure::of(&e) else {
            return Err(e);
        };
        if self.sizing.chunk_failed(chunk.len()) {
            self.stats.shrinks.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(consumer = %self.config.consumer_id, ?failure, rows = chunk.len(),
                next_rows = self.sizing.chunk_rows(), error = %e,
                "reading a chunk of the change log failed; reading it in smaller chunks");
            return Box::pin(self.step()).await;
        }
        if failure == ReadFailure::Timeout {
            return Err(e);
        }
        let sequence = chunk[0];
        let conn = self.conn.as_ref().expect("connected");
        let reason = format!("the server failed to read this row: {e}");
        quarantine(
            conn,
            &self.config.consumer_id,
            &self.stats,
            sequence,
            &reason,
        )
        .await?;
        self.stats.rows_read.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::metrics::ROWS_READ).increment(1);
        self.handed_out(no, start + 1);
        Ok(Some(Batch {
            events: Vec::new(),
            end: Position {
                batch: no,
                sequence,
            },
            rows: 1,
            quarantined: 1,
        }))
    }

    /// Record that batch `no` is handed out up to index `end` of its page; a batch handed out
    /// whole keeps only its last sequence (all `mark_done` needs).
    fn handed_out(&self, no: u64, end: usize) {
        if let Some(batch) = self.lock().batches.iter_mut().find(|b| b.no == no) {
            batch.next = end;
            if batch.next == batch.ids.len() && batch.pages_up_to.is_none() && batch.ids.len() > 1 {
                let last = *batch.ids.last().expect("not empty");
                batch.ids = vec![last];
                batch.next = 1;
            }
        }
    }

    /// The next page of sequences of the batch `(lower, upper)`, after `after`, ascending, with
    /// the highest sequence later pages can hold when more may follow, and `upper`. Without
    /// `upper` (a poll), `upper` is the current snapshot, taken by the same statement. Without
    /// `up_to`, the page comes from the snapshot diff (index on `(txid, sequence)`); with it, from
    /// a range scan of the sequence (its primary key), which reads each sequence of the range once
    /// over all pages.
    async fn id_page(
        &mut self,
        lower: &Snapshot,
        upper: Option<&Snapshot>,
        after: i64,
        up_to: Option<i64>,
    ) -> Result<(Snapshot, Vec<i64>, Option<i64>)> {
        loop {
            let conn = self.conn.as_ref().expect("connected");
            let limit = self.sizing.page_ids();
            if upper.is_none() {
                self.stats.polls.fetch_add(1, Ordering::Relaxed);
            }
            self.stats.statements.fetch_add(1, Ordering::Relaxed);
            // One sequence more than the page holds says whether another page follows (it is read
            // again as the first of that page), so a batch is known complete once handed out.
            let page = match (upper, up_to) {
                (None, _) => poll(conn, lower, limit + 1).await,
                (Some(upper), None) => batch_ids(conn, lower, upper, after, limit + 1)
                    .await
                    .map(|ids| (upper.clone(), ids)),
                (Some(upper), Some(up_to)) => {
                    batch_ids_in_range(conn, lower, upper, after, up_to, limit + 1)
                        .await
                        .map(|ids| (upper.clone(), ids))
                }
            };
            let (upper, mut ids) = match page {
                Ok(ids) => ids,
                Err(e) => {
                    if ReadFailure::of(&e) == Some(ReadFailure::Timeout)
                        && self.sizing.page_failed()
                    {
                        self.stats.shrinks.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(consumer = %self.config.consumer_id, ids = limit,
                            next_ids = self.sizing.page_ids(), error = %e,
                            "reading a page of change-log sequences timed out; reading smaller pages");
                        continue;
                    }
                    return Err(e);
                }
            };
            let more = ids.len() > limit;
            ids.truncate(limit);
            self.sizing.page_read();
            self.stats.id_pages.fetch_add(1, Ordering::Relaxed);
            self.stats
                .largest_id_page
                .fetch_max(ids.len() as u64, Ordering::Relaxed);
            if !more {
                return Ok((upper, ids, None));
            }
            let up_to = match up_to {
                Some(up_to) => up_to,
                // Every row visible in `upper` was written before this query: none of the batch
                // lies above the highest sequence it sees.
                None => {
                    self.stats.statements.fetch_add(1, Ordering::Relaxed);
                    let row = conn.client.query_one(&conn.max_sequence, &[]).await?;
                    row.get::<_, Option<i64>>(0).unwrap_or(i64::MAX)
                }
            };
            return Ok((upper, ids, Some(up_to)));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().expect("progress lock poisoned")
    }

    fn push_batch(
        &mut self,
        lower: Snapshot,
        upper: Snapshot,
        ids: Vec<i64>,
        pages_up_to: Option<i64>,
    ) {
        let no = self.next_batch_no;
        self.next_batch_no += 1;
        self.lock().batches.push_back(BatchState {
            no,
            lower,
            upper,
            ids,
            next: 0,
            pages_up_to,
        });
    }

    /// Reopen the connection after a loss. Every failure here counts as transient: the daemon
    /// keeps retrying (and reports itself unhealthy) rather than exiting while the database is
    /// away, whatever it answers meanwhile.
    ///
    /// The server reached must be the one the lead started on (same cluster, same timeline):
    /// otherwise `Error::ServerChanged` ends the lead before anything is read from it.
    async fn reconnect(&mut self) -> Result<()> {
        let (conn, shape) = open(&self.db_config, &self.config)
            .await
            .map_err(|e| Error::Reconnect(e.to_string()))?;
        let server = server_identity(&conn.client)
            .await
            .map_err(|e| Error::Reconnect(e.to_string()))?;
        if server != self.server {
            tracing::error!(consumer = %self.config.consumer_id, before = %self.server, after = %server,
                "the change-log listener reconnected to another database server; ending the lead");
            return Err(Error::ServerChanged {
                consumer: self.config.consumer_id.clone(),
                before: self.server.to_string(),
                after: server.to_string(),
            });
        }
        self.prefetch = None;
        self.conn = Some(conn);
        self.shape = shape;
        self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        tracing::info!(consumer = %self.config.consumer_id, "change-log listener reconnected");
        Ok(())
    }

    /// Sleep before the next poll: short after activity, doubling towards `poll_interval` while
    /// idle; a NOTIFY (when enabled) or a stop cuts it short.
    async fn idle(&mut self, stop: &mut watch::Receiver<bool>) {
        let delay = self.idle_delay;
        self.idle_delay = (delay * 2).min(self.config.poll_interval);
        let notified = async {
            match self.conn.as_mut().and_then(|c| c.notifications.as_mut()) {
                Some(rx) => {
                    if rx.recv().await.is_some() {
                        while rx.try_recv().is_ok() {}
                    } else {
                        std::future::pending::<()>().await
                    }
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = notified => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    }
}
