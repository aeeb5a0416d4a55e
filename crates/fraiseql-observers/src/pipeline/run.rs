//! The running pipeline: its tasks (reader, lanes, retry worker, monitor, checkpoint writer) and
//! shutdown.
//!
//! Invariants:
//! * Any task's error ends the run at once (the first one is returned); the dispatcher never
//!   hands out an event after it.
//! * The checkpoint writer is stopped between two writes, never in the middle of one, and does
//!   not outlive a dropped run.
//! * A graceful shutdown saves the checkpoint last, after the lanes finished (or the timeout).

use super::chains::Chains;
use super::executor::ObserverExecutor;
use super::lane;
use super::monitor::Monitor;
use crate::config::RuntimeConfig;
use crate::db;
use crate::delivery::lanes::Watermark;
use crate::error::{Error, Result};
use crate::listener::{Batch, ChangeLogListener, Checkpointer};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

/// Events in flight per lane (routed, or waiting in a chain), at most: with the default 64 lanes,
/// 16,384 events.
const EVENTS_PER_LANE: usize = 256;

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
    let chains = Arc::new(Chains::new(executor.clone(), fatal_tx.clone()));
    let _abort_chains = AbortChains(chains.clone());
    let mut lanes = Vec::with_capacity(runtime.concurrency);
    let mut lane_tasks = JoinSet::new();
    for _ in 0..runtime.concurrency {
        let (tx, mut rx) = mpsc::channel::<lane::Dispatched>(EVENTS_PER_LANE);
        lanes.push(tx);
        let (executor, chains, watermark, fatal) = (
            executor.clone(),
            chains.clone(),
            watermark.clone(),
            fatal_tx.clone(),
        );
        lane_tasks.spawn(async move {
            if let Err(e) = lane::run(&executor, &chains, &mut rx, &watermark).await {
                let _ = fatal.send(e);
            }
        });
    }

    // The reader.
    let (batch_tx, mut batch_rx) = mpsc::channel::<Batch>(2);
    let reader_fatal = fatal_tx.clone();
    tasks.spawn(async move {
        let mut listener = listener;
        loop {
            match listener.next_batch().await {
                Ok(Some(batch)) => {
                    if batch_tx.send(batch).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    let _ = reader_fatal.send(e);
                    return;
                }
            }
        }
    });

    // The retry worker.
    {
        let (executor, fatal) = (executor.clone(), fatal_tx.clone());
        let (interval, limit) = (runtime.retry_poll_interval, runtime.concurrency.max(1));
        tasks.spawn(async move {
            loop {
                match executor.run_due_retries(limit).await {
                    Ok(n) if n > 0 => continue,
                    Ok(_) => {}
                    Err(e) => {
                        let _ = fatal.send(e);
                        return;
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = executor.retry_wake.notified() => {
                        // A failure was just queued; its first retry is not due yet.
                        tokio::time::sleep(interval).await;
                    }
                }
            }
        });
    }

    tasks.spawn(monitor.run());

    // The checkpoint writer, off the dispatch path (a write waits for a commit): it owns a
    // clone of the checkpointer (same progress, its own connection).
    let (checkpoint_stop, mut checkpoint_stopped) = tokio::sync::watch::channel(false);
    let mut checkpoint_task = {
        let (watermark, fatal) = (watermark.clone(), fatal_tx.clone());
        let mut checkpointer = checkpointer.clone();
        let mut tick = tokio::time::interval(runtime.checkpoint_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        AbortOnDrop(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = checkpoint_stopped.changed() => return,
                    _ = tick.tick() => {
                        if let Err(e) = checkpoint(&watermark, &mut checkpointer).await {
                            let _ = fatal.send(e);
                            return;
                        }
                    }
                }
            }
        }))
    };
    drop(fatal_tx);

    tokio::pin!(shutdown);
    let result: Result<()> = loop {
        tokio::select! {
            biased;
            Some(e) = fatal_rx.recv() => break Err(e),
            _ = &mut shutdown => break Ok(()),
            batch = batch_rx.recv() => match batch {
                Some(batch) => lane::dispatch(&executor, batch, &lanes, &outstanding, &watermark).await,
                None => break Ok(()),
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
    while tasks.join_next().await.is_some() {}
    checkpoint_stop.send_replace(true);
    let _ = (&mut checkpoint_task.0).await;
    result?;
    checkpoint(&watermark, &mut checkpointer).await?;
    tracing::info!(consumer = %executor.consumer(), "stopped; checkpoint saved");
    Ok(())
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
struct AbortChains(Arc<Chains>);

impl Drop for AbortChains {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A spawned task that is aborted when its handle is dropped: if the `run` future is dropped (a
/// lost lead), the checkpoint writer does not outlive it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
