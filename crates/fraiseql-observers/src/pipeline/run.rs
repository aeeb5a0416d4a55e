//! The running pipeline: its tasks (reader, lanes, retry worker, monitor, checkpoint writer) and
//! shutdown.
//!
//! Invariants:
//! * Any task's error ends the run at once (the first one is returned); the dispatcher never
//!   hands out an event after it.
//! * No task dies silently: a task that panics, or one meant to run for the whole run (retry
//!   worker, monitor, lanes, checkpoint writer) that ends, ends the run with
//!   `Error::TaskFailed` ([`supervised`], [`first_failure`]).
//! * The checkpoint writer is stopped between two writes, never in the middle of one, and does
//!   not outlive a dropped run.
//! * A graceful shutdown saves the checkpoint last, after the lanes finished (or the timeout),
//!   and logs whether it was saved: "checkpoint saved" only when the write succeeded.

use super::chains::Chains;
use super::executor::ObserverExecutor;
use super::lane;
use super::monitor::Monitor;
use crate::config::RuntimeConfig;
use crate::db;
use crate::delivery::lanes::Watermark;
use crate::error::{Error, Result};
use crate::listener::checkpoint::Checkpoint;
use crate::listener::{Batch, ChangeLogListener, Checkpointer};
use futures::FutureExt as _;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

/// Events in flight per lane (routed, or waiting in a chain), at most: with the default 64 lanes,
/// 1,024 events. Decoded events are what a catch-up holds in memory (an order update with its
/// before, after and changed fields is ~20 KB): 256 per lane held 456 MiB at peak through a 5 M
/// backlog, 16 holds 127 MiB, with the same drain rate (BENCHMARKS.md).
const EVENTS_PER_LANE: usize = 16;

/// Positions the watermark holds per lane, at most (done ones waiting behind one in flight
/// included): with the default 64 lanes, 65,536.
const POSITIONS_PER_LANE: usize = 1024;

pub(super) async fn run(
    executor: Arc<ObserverExecutor>,
    listener: ChangeLogListener,
    database_url: &str,
    runtime: &RuntimeConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let watermark = Arc::new(Watermark::default());
    let mut checkpointer = listener.checkpointer();
    let stop = listener.stop_handle();
    let monitor = Monitor {
        status: executor.status(),
        stats: listener.stats(),
        watermark: watermark.clone(),
        connection: db::Reconnecting::new(
            db::parse_url(database_url)?,
            "fraiseql-observers-monitor",
        ),
        consumer: executor.consumer().to_string(),
        sequence_column: listener.sequence_column(),
        backlog_alert_threshold: runtime.backlog_alert_threshold,
    };
    let mut tasks = JoinSet::new();
    let (fatal_tx, mut fatal_rx) = mpsc::unbounded_channel::<Error>();

    // Lanes, and the delivery chains they hand out to; at most this many events in flight.
    let outstanding = Arc::new(Semaphore::new(runtime.concurrency.max(1) * EVENTS_PER_LANE));
    let held_limit = runtime.concurrency.max(1) * POSITIONS_PER_LANE;
    let chains = Arc::new(Chains::new(executor.clone(), fatal_tx.clone()));
    let _abort_chains = AbortChains(chains.clone());
    let mut lanes = Vec::with_capacity(runtime.concurrency);
    let mut lane_tasks = JoinSet::new();
    for _ in 0..runtime.concurrency {
        let (tx, mut rx) = mpsc::channel::<lane::Dispatched>(EVENTS_PER_LANE);
        lanes.push(tx);
        let (executor, chains, watermark) = (executor.clone(), chains.clone(), watermark.clone());
        lane_tasks.spawn(supervised("a lane", Lifetime::WholeRun, async move {
            lane::run(&executor, &chains, &mut rx, &watermark).await
        }));
    }

    // The reader: it ends (`Ok`) only when stopped.
    let (batch_tx, mut batch_rx) = mpsc::channel::<Batch>(1);
    let mut reader = JoinSet::new();
    reader.spawn(supervised("the reader", Lifetime::MayEnd, async move {
        let mut listener = listener;
        while let Some(batch) = listener.next_batch().await? {
            if batch_tx.send(batch).await.is_err() {
                break;
            }
        }
        Ok(())
    }));

    // The retry worker.
    tasks.spawn(supervised(
        "the retry worker",
        Lifetime::WholeRun,
        retry_worker(
            executor.clone(),
            runtime.retry_poll_interval,
            runtime.concurrency.max(1),
        ),
    ));

    tasks.spawn(supervised("the monitor", Lifetime::WholeRun, async move {
        monitor.run().await;
        Ok(())
    }));

    // The checkpoint writer, off the dispatch path (a write waits for a commit): it owns a
    // clone of the checkpointer (same progress, its own connection). A set of its own: it is
    // stopped between two writes, not aborted with the others.
    let (checkpoint_stop, mut checkpoint_stopped) = tokio::sync::watch::channel(false);
    let mut checkpoint_task = JoinSet::new();
    {
        let watermark = watermark.clone();
        let mut checkpointer = checkpointer.clone();
        let mut tick = tokio::time::interval(runtime.checkpoint_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        checkpoint_task.spawn(supervised(
            "the checkpoint writer",
            Lifetime::MayEnd,
            async move {
                loop {
                    tokio::select! {
                        _ = checkpoint_stopped.changed() => return Ok(()),
                        _ = tick.tick() => checkpoint(&watermark, &mut checkpointer).await?,
                    }
                }
            },
        ));
    }
    drop(fatal_tx);

    tokio::pin!(shutdown);
    let result: Result<()> = loop {
        tokio::select! {
            biased;
            Some(e) = fatal_rx.recv() => break Err(e),
            e = first_failure(&mut tasks) => break Err(e),
            e = first_failure(&mut lane_tasks) => break Err(e),
            e = first_failure(&mut checkpoint_task) => break Err(e),
            _ = &mut shutdown => break Ok(()),
            batch = batch_rx.recv() => match batch {
                Some(batch) => {
                    lane::dispatch(&executor, batch, &lanes, &outstanding, held_limit, &watermark).await
                }
                // The reader ended: stopped (`Ok`), failed, or panicked.
                None => break ended(reader.join_next().await),
            },
        }
    };

    // Stop reading; let the lanes finish what they hold.
    stop.stop();
    drop(batch_rx);
    drop(lanes);
    if result.is_ok() {
        let drained = tokio::time::timeout(runtime.shutdown_timeout, async {
            while lane_tasks.join_next().await.is_some() {}
            while !chains.is_idle() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                in_flight = watermark.in_flight(),
                "shutdown timeout reached; unfinished events will be delivered again on restart"
            );
        }
    }
    lane_tasks.abort_all();
    chains.abort();
    tasks.abort_all();
    reader.abort_all();
    while tasks.join_next().await.is_some() {}
    // The attempts made so far are in the delivery log before the run returns.
    executor.log.flush().await;
    checkpoint_stop.send_replace(true);
    let stopped = ended(checkpoint_task.join_next().await);
    result?;
    stopped?;
    final_checkpoint(&watermark, &mut checkpointer, executor.consumer()).await
}

/// The retry worker: runs the due heads of the retry queue, `limit` at a time; never ends but
/// on an error.
pub(super) async fn retry_worker(
    executor: Arc<ObserverExecutor>,
    interval: Duration,
    limit: usize,
) -> Result<()> {
    loop {
        if executor.run_due_retries(limit).await? > 0 {
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = executor.retry_wake.notified() => {
                // A failure was just queued; its first retry is not due yet.
                tokio::time::sleep(interval).await;
            }
        }
    }
}

/// The last checkpoint write, at a graceful shutdown. There is no next tick to retry it: a
/// transient failure is reported as one (the events since the last saved checkpoint will be
/// delivered again on restart), not as saved; a fence is returned.
async fn final_checkpoint(
    watermark: &Watermark,
    checkpointer: &mut Checkpointer,
    consumer: &str,
) -> Result<()> {
    if let Some(position) = watermark.advance() {
        checkpointer.mark_done(position);
    }
    let result = checkpointer.save().await;
    report_final_save(
        consumer,
        checkpointer.epoch(),
        &checkpointer.done(),
        &result,
    );
    match result {
        Err(e) if e.is_transient() => Ok(()),
        other => other,
    }
}

/// Log what became of the last checkpoint write: saved, or not (with the error).
fn report_final_save(consumer: &str, epoch: i64, checkpoint: &Checkpoint, result: &Result<()>) {
    let snapshot = checkpoint.snapshot.to_string();
    match result {
        Ok(()) => tracing::info!(consumer, epoch, snapshot, "stopped; checkpoint saved"),
        Err(e) => tracing::error!(
            consumer,
            epoch,
            snapshot,
            error = %e,
            "stopped; checkpoint NOT saved: the events since the last saved checkpoint will be \
             delivered again on restart"
        ),
    }
}

/// Move the checkpoint to the watermark and write it. Transient failures wait for the next tick.
async fn checkpoint(watermark: &Watermark, checkpointer: &mut Checkpointer) -> Result<()> {
    if let Some(position) = watermark.advance() {
        checkpointer.mark_done(position);
    }
    match checkpointer.save().await {
        Err(e) if e.is_transient() => {
            tracing::warn!(error = %e, "checkpoint not saved; will retry");
            Ok(())
        }
        other => other,
    }
}

/// Stops the delivery chains when the run ends or its future is dropped (a lost lead).
pub(super) struct AbortChains(pub(super) Arc<Chains>);

impl Drop for AbortChains {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whether a task may end before the run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lifetime {
    /// It ends when asked to (the reader when stopped, the checkpoint writer).
    MayEnd,
    /// It runs as long as the run: ending at all is a failure.
    WholeRun,
}

/// `task`, with its panic caught and turned into `Error::TaskFailed` naming it (as is its end,
/// when it must run for the whole run).
pub(super) async fn supervised(
    name: &'static str,
    lifetime: Lifetime,
    task: impl Future<Output = Result<()>>,
) -> Result<()> {
    match AssertUnwindSafe(task).catch_unwind().await {
        Ok(Ok(())) if lifetime == Lifetime::WholeRun => {
            Err(Error::TaskFailed(format!("{name} stopped")))
        }
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_string());
            tracing::error!(task = name, panic = %message, "an engine task panicked");
            Err(Error::TaskFailed(format!("{name} panicked: {message}")))
        }
    }
}

/// A finished task's result (a task aborted or gone counts as failed).
fn ended(joined: Option<std::result::Result<Result<()>, tokio::task::JoinError>>) -> Result<()> {
    match joined {
        None | Some(Ok(Ok(()))) => Ok(()),
        Some(Ok(Err(e))) => Err(e),
        Some(Err(e)) => Err(Error::TaskFailed(e.to_string())),
    }
}

/// Resolves with the error of the first task of `tasks` that fails (every task in it is meant
/// to run until the run ends, see [`Lifetime`]); never resolves while they all run, or when
/// there is none.
pub(super) async fn first_failure(tasks: &mut JoinSet<Result<()>>) -> Error {
    loop {
        match tasks.join_next().await {
            None => std::future::pending::<()>().await,
            Some(joined) => {
                if let Err(e) = ended(Some(joined)) {
                    return e;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listener::snapshot::Snapshot;
    use std::sync::Mutex;

    /// What `report_final_save` logs for `result`.
    fn final_save_log(result: &Result<()>) -> String {
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let checkpoint = Checkpoint {
            snapshot: Snapshot::beginning(),
            batch: None,
        };
        tracing::subscriber::with_default(subscriber, || {
            report_final_save("orders", 7, &checkpoint, result)
        });
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn the_last_checkpoint_write_is_logged_as_saved_only_when_it_was() {
        let saved = final_save_log(&Ok(()));
        assert!(
            saved.contains("INFO") && saved.contains("stopped; checkpoint saved"),
            "{saved}"
        );
        assert!(
            saved.contains("consumer=\"orders\"") && saved.contains("epoch=7"),
            "{saved}"
        );

        let failed = final_save_log(&Err(Error::Reconnect("connection refused".into())));
        assert!(failed.contains("ERROR"), "{failed}");
        assert!(failed.contains("checkpoint NOT saved"), "{failed}");
        assert!(!failed.contains("checkpoint saved"), "{failed}");
        assert!(
            failed.contains("connection refused") && failed.contains("epoch=7"),
            "{failed}"
        );
    }

    #[tokio::test]
    async fn a_panicking_task_ends_the_run_with_its_name() {
        let mut tasks = JoinSet::new();
        tasks.spawn(supervised("the monitor", Lifetime::WholeRun, async {
            std::future::pending::<()>().await;
            Ok(())
        }));
        tasks.spawn(supervised("the retry worker", Lifetime::WholeRun, async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            panic!("row decoding failed");
        }));
        let failure = tokio::time::timeout(Duration::from_secs(5), first_failure(&mut tasks))
            .await
            .expect("a panic ends the run");
        match failure {
            Error::TaskFailed(m) => {
                assert_eq!(m, "the retry worker panicked: row decoding failed")
            }
            other => panic!("expected TaskFailed, got {other}"),
        }
    }

    #[tokio::test]
    async fn a_task_that_must_run_for_the_whole_run_fails_when_it_ends_or_errs() {
        let mut tasks = JoinSet::new();
        tasks.spawn(supervised("a lane", Lifetime::WholeRun, async { Ok(()) }));
        assert!(matches!(
            first_failure(&mut tasks).await,
            Error::TaskFailed(m) if m == "a lane stopped"
        ));
        tasks.spawn(supervised(
            "the checkpoint writer",
            Lifetime::MayEnd,
            async {
                Err(Error::Fenced {
                    consumer: "c".into(),
                    epoch: 3,
                })
            },
        ));
        assert!(matches!(
            first_failure(&mut tasks).await,
            Error::Fenced { epoch: 3, .. }
        ));
        // A task that may end, ending well, is no failure; an empty set never resolves.
        tasks.spawn(supervised("the reader", Lifetime::MayEnd, async { Ok(()) }));
        let pending =
            tokio::time::timeout(Duration::from_millis(50), first_failure(&mut tasks)).await;
        assert!(pending.is_err());
    }
}
