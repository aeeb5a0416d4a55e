//! `ObserverExecutor`: the only module that sees every stage.
//!
//! ```text
//! ChangeLogListener --batches--> dispatcher --(entity lanes)--> process_event: match, execute
//!        ^                                                        |  failure: retry queue / DLQ
//!        +---- checkpoint <-- watermark of done events <---------+
//! retry worker: due heads of the retry queue --> execute --> done / reschedule / dead letter
//! ```
//!
//! Invariants:
//! * An event is done when every matching action succeeded or its failure was handed over
//!   durably (a committed retry-queue or dead-letter row). The checkpoint moves only to the low
//!   watermark of done events: a crash replays at most what was in flight.
//! * One entity's events run in one lane, in stream order (which for one entity is commit order).
//! * For an ordered observer, while an (observer, entity) has items in the retry queue, its new
//!   deliveries are parked behind them (durably) instead of running.
//! * Every durable write is fenced by the consumer's epoch; `Error::Fenced` stops everything.

use crate::actions::{self, Action, ActionError, DeliveryRequest, FailureKind};
use crate::config::RuntimeConfig;
use crate::db;
use crate::delivery::dead_letter::{self, Reason};
use crate::delivery::lanes::{lane_of, Coalescer, Group, Watermark};
use crate::delivery::{entity_key, retry_queue, DeliveryItem};
use crate::error::{Error, Result};
use crate::event::EntityEvent;
use crate::listener::{Batch, ChangeLogListener, Checkpointer};
use crate::matcher::{EventMatcher, Verdict};
use crate::metrics as m;
use crate::observer::{Observer, OnFailure};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;
use tokio_postgres::Client;

/// A failure whose next attempt is due within this is retried in the lane; a longer wait goes
/// to the durable retry queue so it blocks neither the checkpoint nor other entities.
pub const INLINE_RETRY_LIMIT: Duration = Duration::from_millis(250);

/// How long a claimed retry (or operator DLQ retry) is reserved for the process that claimed it.
pub const RETRY_LEASE: Duration = Duration::from_secs(300);

/// What happened to one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Failed; queued durably for a later attempt.
    Queued,
    /// Waiting durably behind an earlier failed delivery of the same entity.
    Parked,
    DeadLettered,
    /// Failed for good with `on_failure = "log"`.
    Dropped,
}

/// What `process_event` did with one event.
#[derive(Debug, Default, Clone)]
pub struct ExecutionSummary {
    /// (observer name, action index, outcome) in configuration order.
    pub deliveries: Vec<(String, usize, Outcome)>,
    /// Observers whose entity and kind fit but that did not fire, and why.
    pub skipped: Vec<(String, Verdict)>,
}

/// Live figures the daemon shows at `/healthz` and that tests read.
#[derive(Debug, Default)]
pub struct EngineStatus {
    pub events_read: AtomicU64,
    pub events_matched: AtomicU64,
    pub backlog: AtomicU64,
    pub lag_ms: AtomicI64,
    pub backlog_alert: AtomicBool,
    pub listener_healthy: AtomicBool,
    pub in_flight: AtomicU64,
}

/// A connection for delivery bookkeeping (retry queue, dead letters), reopened when lost.
/// Concurrent statements pipeline on it.
struct Store {
    db_config: tokio_postgres::Config,
    application: &'static str,
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
}

impl Store {
    fn new(db_config: tokio_postgres::Config, application: &'static str) -> Store {
        Store {
            db_config,
            application,
            client: tokio::sync::Mutex::new(None),
        }
    }

    async fn client(&self) -> Result<Arc<Client>> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let client = Arc::new(db::connect(&self.db_config, self.application).await?);
        *slot = Some(client.clone());
        Ok(client)
    }
}

pub struct ObserverExecutor {
    observers: Vec<Observer>,
    matcher: EventMatcher,
    store: Store,
    /// A connection of its own for the monitor's counting queries, so they never delay a
    /// bookkeeping write.
    monitor: Store,
    consumer: String,
    epoch: i64,
    /// (observer index, entity key) -> items in the retry queue (ordered observers only).
    blocked: Mutex<HashMap<(usize, String), u32>>,
    retry_wake: Notify,
    status: Arc<EngineStatus>,
}

impl ObserverExecutor {
    /// Build the executor for `consumer` led at `epoch` (from `ChangeLogListener::epoch`): loads
    /// which entities are parked and releases the leases a dead predecessor held.
    pub async fn new(
        observers: Vec<Observer>,
        database_url: &str,
        consumer: &str,
        epoch: i64,
    ) -> Result<ObserverExecutor> {
        let executor = ObserverExecutor {
            matcher: EventMatcher::new(&observers),
            observers,
            store: Store::new(db::parse_url(database_url)?, "fraiseql-observers-delivery"),
            monitor: Store::new(db::parse_url(database_url)?, "fraiseql-observers-monitor"),
            consumer: consumer.to_string(),
            epoch,
            blocked: Mutex::new(HashMap::new()),
            retry_wake: Notify::new(),
            status: Arc::new(EngineStatus::default()),
        };
        let client = executor.store.client().await?;
        let released = retry_queue::release_leases(&client, consumer, epoch).await?;
        if released > 0 {
            tracing::info!(
                consumer,
                released,
                "released retry leases of a previous leader"
            );
        }
        let keys = retry_queue::blocked_keys(&client, consumer).await?;
        let mut blocked = executor.blocked.lock().expect("blocked lock");
        for ((observer, key), count) in keys {
            if let Some(i) = executor.observers.iter().position(|o| o.name == observer) {
                blocked.insert((i, key), count);
            }
        }
        drop(blocked);
        Ok(executor)
    }

    pub fn observers(&self) -> &[Observer] {
        &self.observers
    }

    pub fn status(&self) -> Arc<EngineStatus> {
        self.status.clone()
    }

    /// Match one event and run the actions of every observer that fires, in configuration
    /// order. Returns once every delivery is done or handed over durably. `Err` only when a
    /// failure could not be recorded (fenced, or a database error that is not transient).
    pub async fn process_event(&self, event: &EntityEvent) -> Result<ExecutionSummary> {
        self.process(event, None).await
    }

    /// `process_event`, except that the observers that coalesce are not run but returned in
    /// `coalesced` (with their window), for the lane to hold.
    async fn process(
        &self,
        event: &EntityEvent,
        mut coalesced: Option<&mut Vec<(usize, Duration)>>,
    ) -> Result<ExecutionSummary> {
        let mut summary = ExecutionSummary::default();
        for (i, verdict) in self.matcher.evaluate(&self.observers, event) {
            let observer = &self.observers[i];
            match verdict {
                Verdict::Matched => {
                    metrics::counter!(m::EVENTS_MATCHED, "observer" => observer.name.clone())
                        .increment(1);
                    self.status.events_matched.fetch_add(1, Ordering::Relaxed);
                    if let (Some(window), Some(held)) =
                        (observer.coalesce, coalesced.as_deref_mut())
                    {
                        held.push((i, window));
                        continue;
                    }
                    for a in 0..observer.actions.len() {
                        let outcome = self.deliver(i, a, event).await?;
                        summary.deliveries.push((observer.name.clone(), a, outcome));
                    }
                }
                Verdict::ConditionError(message) => {
                    metrics::counter!(m::CONDITION_ERRORS, "observer" => observer.name.clone())
                        .increment(1);
                    tracing::warn!(observer = %observer.name, sequence = event.sequence, error = %message,
                        "condition could not be evaluated; recorded as a failed delivery");
                    let error = format!("condition could not be evaluated: {message}");
                    for a in 0..observer.actions.len() {
                        let outcome = self
                            .give_up(i, a, event, 0, Reason::Permanent, &error)
                            .await?;
                        summary.deliveries.push((observer.name.clone(), a, outcome));
                    }
                    summary
                        .skipped
                        .push((observer.name.clone(), Verdict::ConditionError(message)));
                }
                other => summary.skipped.push((observer.name.clone(), other)),
            }
        }
        Ok(summary)
    }

    /// Deliver one event through one action: in-line attempts while the next one is due soon,
    /// then the retry queue or the dead letter queue.
    async fn deliver(&self, i: usize, a: usize, event: &EntityEvent) -> Result<Outcome> {
        let observer = &self.observers[i];
        let action = &observer.actions[a];
        let delivery_id = actions::delivery_id(event.id, &observer.name, a);
        let key = entity_key(event);
        if observer.ordered && self.is_blocked(i, &key) {
            self.queue(i, a, event, &key, &delivery_id, 0, Duration::ZERO, None)
                .await?;
            m::action(&observer.name, action.kind(), "parked");
            return Ok(Outcome::Parked);
        }
        let mut attempt = 1;
        loop {
            let request = DeliveryRequest {
                event,
                delivery_id: &delivery_id,
                attempt,
            };
            match action.execute(&request).await {
                Ok(()) => {
                    self.delivered(observer, action, event);
                    return Ok(Outcome::Delivered);
                }
                Err(e) if e.is_retryable() && observer.retry.allows_another(attempt) => {
                    let delay = observer
                        .retry
                        .delay(attempt, rand::random(), e.retry_after());
                    m::action(&observer.name, action.kind(), "retried");
                    tracing::debug!(observer = %observer.name, sequence = event.sequence, attempt,
                        error = %e, delay_ms = delay.as_millis() as u64, "delivery failed; will retry");
                    if delay <= INLINE_RETRY_LIMIT {
                        tokio::time::sleep(delay).await;
                        attempt += 1;
                        continue;
                    }
                    self.queue(
                        i,
                        a,
                        event,
                        &key,
                        &delivery_id,
                        attempt,
                        delay,
                        Some(e.message()),
                    )
                    .await?;
                    self.retry_wake.notify_one();
                    return Ok(Outcome::Queued);
                }
                Err(e) => {
                    let reason = reason_of(&e);
                    return self
                        .give_up(i, a, event, attempt, reason, e.message())
                        .await;
                }
            }
        }
    }

    fn delivered(&self, observer: &Observer, action: &Action, event: &EntityEvent) {
        m::action(&observer.name, action.kind(), "ok");
        let latency = (chrono::Utc::now() - event.created_at)
            .num_microseconds()
            .unwrap_or(0);
        metrics::histogram!(m::DELIVERY_LATENCY, "observer" => observer.name.clone())
            .record(latency.max(0) as f64 / 1e6);
    }

    /// Queue a delivery in the retry queue, and park the entity behind it (ordered observers).
    #[allow(clippy::too_many_arguments)]
    async fn queue(
        &self,
        i: usize,
        a: usize,
        event: &EntityEvent,
        key: &str,
        delivery_id: &str,
        attempts: u32,
        delay: Duration,
        error: Option<&str>,
    ) -> Result<()> {
        let observer = &self.observers[i];
        let action = &observer.actions[a];
        let item = DeliveryItem {
            observer: &observer.name,
            action_index: a,
            action_type: action.kind(),
            entity_key: key,
            ordered: observer.ordered,
            event,
            delivery_id,
        };
        // Count first, so the entity is parked before the row exists; undo when the row was
        // already there (a replay), since it is counted already.
        if observer.ordered {
            self.block(i, key);
        }
        let max = observer.retry.max_attempts;
        let inserted = self
            .durably(|c| async move {
                retry_queue::enqueue(
                    &c,
                    &self.consumer,
                    self.epoch,
                    &item,
                    attempts,
                    max,
                    delay,
                    error,
                )
                .await
            })
            .await?;
        if !inserted && observer.ordered {
            self.unblock(i, key);
        }
        Ok(())
    }

    /// A delivery that will not succeed: the dead letter queue, or a log line.
    async fn give_up(
        &self,
        i: usize,
        a: usize,
        event: &EntityEvent,
        attempts: u32,
        reason: Reason,
        error: &str,
    ) -> Result<Outcome> {
        let observer = &self.observers[i];
        let action = &observer.actions[a];
        match observer.on_failure {
            OnFailure::Log => {
                m::action(&observer.name, action.kind(), "dropped");
                tracing::error!(observer = %observer.name, action = action.kind(), sequence = event.sequence,
                    event_id = %event.id, attempts, reason = reason.as_str(), error,
                    "delivery failed for good; dropped (on_failure = \"log\")");
                Ok(Outcome::Dropped)
            }
            OnFailure::Dlq => {
                let key = entity_key(event);
                let delivery_id = actions::delivery_id(event.id, &observer.name, a);
                let item = DeliveryItem {
                    observer: &observer.name,
                    action_index: a,
                    action_type: action.kind(),
                    entity_key: &key,
                    ordered: observer.ordered,
                    event,
                    delivery_id: &delivery_id,
                };
                self.durably(|c| async move {
                    dead_letter::insert(
                        &c,
                        &self.consumer,
                        self.epoch,
                        &item,
                        attempts,
                        reason,
                        error,
                    )
                    .await
                })
                .await?;
                m::action(&observer.name, action.kind(), "dead_lettered");
                metrics::counter!(m::DEAD_LETTERED).increment(1);
                tracing::warn!(observer = %observer.name, action = action.kind(), sequence = event.sequence,
                    event_id = %event.id, attempts, reason = reason.as_str(), error,
                    "delivery dead-lettered");
                Ok(Outcome::DeadLettered)
            }
        }
    }

    /// Run a bookkeeping write, retrying while the database is unreachable: the event is not
    /// done until its failure is recorded, so waiting here is what keeps it from being lost.
    async fn durably<T, F, Fut>(&self, write: F) -> Result<T>
    where
        F: Fn(Arc<Client>) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut delay = Duration::from_millis(100);
        loop {
            let attempt = match self.store.client().await {
                Ok(client) => write(client).await,
                Err(e) => Err(e),
            };
            match attempt {
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64,
                        "cannot record a delivery outcome; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                other => return other,
            }
        }
    }

    fn is_blocked(&self, i: usize, key: &str) -> bool {
        let blocked = self.blocked.lock().expect("blocked lock");
        !blocked.is_empty() && blocked.contains_key(&(i, key.to_string()))
    }

    fn block(&self, i: usize, key: &str) {
        *self
            .blocked
            .lock()
            .expect("blocked lock")
            .entry((i, key.to_string()))
            .or_default() += 1;
    }

    fn unblock(&self, i: usize, key: &str) {
        let mut blocked = self.blocked.lock().expect("blocked lock");
        let k = (i, key.to_string());
        if let Some(n) = blocked.get_mut(&k) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                blocked.remove(&k);
            }
        }
    }

    /// Attempt the due heads of the retry queue once. Returns how many items were attempted.
    pub async fn run_due_retries(&self, limit: usize) -> Result<usize> {
        let items = self
            .durably(|c| async move {
                retry_queue::claim_due(&c, &self.consumer, self.epoch, limit as i64, RETRY_LEASE)
                    .await
            })
            .await?;
        let n = items.len();
        let results =
            futures::future::join_all(items.into_iter().map(|item| self.retry_item(item))).await;
        for r in results {
            r?;
        }
        Ok(n)
    }

    async fn retry_item(&self, item: retry_queue::QueuedItem) -> Result<()> {
        let id = item.id;
        let found = self
            .observers
            .iter()
            .position(|o| o.name == item.observer)
            .filter(|i| item.action_index < self.observers[*i].actions.len());
        let Some(i) = found else {
            let error = format!(
                "observer '{}' action {} is no longer configured",
                item.observer, item.action_index
            );
            self.durably(|c| {
                let error = error.clone();
                async move {
                    retry_queue::dead_letter(
                        &c,
                        &self.consumer,
                        self.epoch,
                        id,
                        item.attempts,
                        "permanent",
                        &error,
                    )
                    .await
                }
            })
            .await?;
            return Ok(());
        };
        let observer = &self.observers[i];
        let action = &observer.actions[item.action_index];
        let attempt = item.attempts + 1;
        let request = DeliveryRequest {
            event: &item.event,
            delivery_id: &item.delivery_id,
            attempt,
        };
        let result = action.execute(&request).await;
        let finished = match &result {
            Ok(()) => {
                self.delivered(observer, action, &item.event);
                self.durably(|c| async move {
                    retry_queue::remove(&c, &self.consumer, self.epoch, id).await
                })
                .await?;
                true
            }
            Err(e) if e.is_retryable() && observer.retry.allows_another(attempt) => {
                let delay = observer
                    .retry
                    .delay(attempt, rand::random(), e.retry_after());
                m::action(&observer.name, action.kind(), "retried");
                self.durably(|c| async move {
                    retry_queue::reschedule(
                        &c,
                        &self.consumer,
                        self.epoch,
                        id,
                        attempt,
                        delay,
                        e.message(),
                    )
                    .await
                })
                .await?;
                false
            }
            Err(e) => {
                let reason = reason_of(e);
                match observer.on_failure {
                    OnFailure::Dlq => {
                        self.durably(|c| async move {
                            retry_queue::dead_letter(
                                &c,
                                &self.consumer,
                                self.epoch,
                                id,
                                attempt,
                                reason.as_str(),
                                e.message(),
                            )
                            .await
                        })
                        .await?;
                        m::action(&observer.name, action.kind(), "dead_lettered");
                        metrics::counter!(m::DEAD_LETTERED).increment(1);
                        tracing::warn!(observer = %observer.name, action = action.kind(),
                            sequence = item.event.sequence, attempts = attempt, reason = reason.as_str(),
                            error = e.message(), "delivery dead-lettered");
                    }
                    OnFailure::Log => {
                        self.durably(|c| async move {
                            retry_queue::remove(&c, &self.consumer, self.epoch, id).await
                        })
                        .await?;
                        m::action(&observer.name, action.kind(), "dropped");
                        tracing::error!(observer = %observer.name, sequence = item.event.sequence,
                            attempts = attempt, error = e.message(), "delivery failed for good; dropped");
                    }
                }
                true
            }
        };
        if finished && item.ordered {
            self.unblock(i, &item.entity_key);
        }
        Ok(())
    }

    /// Why each observer does or does not fire for `event` (every observer, configuration order):
    /// `None` when its entity or event type does not fit.
    pub fn explain(&self, event: &EntityEvent) -> Vec<(&str, Option<Verdict>)> {
        let verdicts: HashMap<usize, Verdict> = self
            .matcher
            .evaluate(&self.observers, event)
            .into_iter()
            .collect();
        self.observers
            .iter()
            .enumerate()
            .map(|(i, o)| (o.name.as_str(), verdicts.get(&i).cloned()))
            .collect()
    }

    /// Send `event` again through every action of observer `name`, once each, when it matches
    /// (an operator's replay: same delivery ids, so receivers can deduplicate; failures are
    /// returned, not queued). `Ok(None)` when the observer does not fire for this event.
    pub async fn replay(
        &self,
        name: &str,
        event: &EntityEvent,
    ) -> Result<Option<Vec<std::result::Result<(), ActionError>>>> {
        let i = self
            .observers
            .iter()
            .position(|o| o.name == name)
            .ok_or_else(|| {
                Error::Invalid(format!("no observer named '{name}' in this configuration"))
            })?;
        let fires = self
            .matcher
            .evaluate(&self.observers, event)
            .into_iter()
            .any(|(j, v)| j == i && v == Verdict::Matched);
        if !fires {
            return Ok(None);
        }
        let observer = &self.observers[i];
        let mut results = Vec::with_capacity(observer.actions.len());
        for (a, action) in observer.actions.iter().enumerate() {
            let delivery_id = actions::delivery_id(event.id, &observer.name, a);
            let request = DeliveryRequest {
                event,
                delivery_id: &delivery_id,
                attempt: 1,
            };
            results.push(action.execute(&request).await);
        }
        Ok(Some(results))
    }

    /// Retry dead letter `id` once, on an operator's request: claimed atomically, so two
    /// concurrent retries of one item deliver once. `Ok(None)` when it is not pending.
    pub async fn retry_dead_letter(
        &self,
        id: i64,
    ) -> Result<Option<std::result::Result<(), ActionError>>> {
        let client = self.store.client().await?;
        let Some(item) = dead_letter::claim_for_retry(&client, id, RETRY_LEASE).await? else {
            return Ok(None);
        };
        let action = self
            .observers
            .iter()
            .find(|o| o.name == item.observer)
            .and_then(|o| o.actions.get(item.action_index));
        let result = match action {
            None => Err(ActionError::permanent(format!(
                "observer '{}' action {} is not in this configuration",
                item.observer, item.action_index
            ))),
            Some(action) => {
                let request = DeliveryRequest {
                    event: &item.event,
                    delivery_id: &item.delivery_id,
                    attempt: item.attempts + 1,
                };
                action.execute(&request).await
            }
        };
        dead_letter::finish_retry(&client, id, result.as_ref().err().map(|e| e.message())).await?;
        Ok(Some(result))
    }

    /// Run until `shutdown` resolves: read, match, deliver, retry, checkpoint. On shutdown, stop
    /// reading, let the lanes finish what they hold for up to `runtime.shutdown_timeout`, save
    /// the checkpoint and return. Returns an error (at once) when fenced by another instance or
    /// when the listener fails for a reason that is not transient.
    pub async fn run(
        self: Arc<Self>,
        listener: ChangeLogListener,
        runtime: &RuntimeConfig,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()> {
        let watermark = Arc::new(Watermark::default());
        let mut checkpointer = listener.checkpointer();
        let stop = listener.stop_handle();
        let stats = listener.stats();
        let sequence_column = listener.sequence_column();
        let mut tasks = JoinSet::new();
        let (fatal_tx, mut fatal_rx) = mpsc::unbounded_channel::<Error>();

        // Lanes.
        let mut lanes = Vec::with_capacity(runtime.concurrency);
        let mut lane_tasks = JoinSet::new();
        for _ in 0..runtime.concurrency {
            let (tx, mut rx) = mpsc::channel::<EntityEvent>(256);
            lanes.push(tx);
            let (executor, watermark, fatal) = (self.clone(), watermark.clone(), fatal_tx.clone());
            lane_tasks.spawn(async move {
                if let Err(e) = executor.lane(&mut rx, &watermark).await {
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
            let (executor, fatal) = (self.clone(), fatal_tx.clone());
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

        // The monitor: backlog, lag, queue sizes, health.
        {
            let executor = self.clone();
            let threshold = runtime.backlog_alert_threshold;
            let stats = stats.clone();
            let watermark = watermark.clone();
            tasks.spawn(async move {
                loop {
                    executor
                        .status
                        .listener_healthy
                        .store(stats.is_healthy(), Ordering::Relaxed);
                    metrics::gauge!(m::LISTENER_HEALTHY).set(if stats.is_healthy() {
                        1.0
                    } else {
                        0.0
                    });
                    executor
                        .status
                        .in_flight
                        .store(watermark.in_flight() as u64, Ordering::Relaxed);
                    metrics::gauge!(m::IN_FLIGHT).set(watermark.in_flight() as f64);
                    let started = tokio::time::Instant::now();
                    if let Err(e) = executor.measure_backlog(sequence_column, threshold).await {
                        tracing::debug!(error = %e, "backlog measurement failed");
                    }
                    // Counting a huge backlog is not free: spend at most a tenth of the time on it.
                    let pause = (started.elapsed() * 10).max(Duration::from_secs(1));
                    tokio::time::sleep(pause).await;
                }
            });
        }

        // The checkpoint writer, off the dispatch path (a write waits for a commit): it owns a
        // clone of the checkpointer (same progress, its own connection) and is stopped between
        // two writes, never in the middle of one.
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
                    Some(batch) => self.dispatch(batch, &lanes, &watermark).await,
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
            })
            .await;
            if drained.is_err() {
                tracing::warn!(in_flight = watermark.in_flight(),
                    "shutdown timeout reached; unfinished events will be delivered again on restart");
            }
        }
        lane_tasks.abort_all();
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        checkpoint_stop.send_replace(true);
        let _ = (&mut checkpoint_task.0).await;
        match result {
            Ok(()) => {
                checkpoint(&watermark, &mut checkpointer).await?;
                tracing::info!(consumer = %self.consumer, "stopped; checkpoint saved");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// One lane: its events one after another; coalescing observers' changes held in groups and
    /// delivered at the end of their window (or when the lane closes: nothing held is lost).
    async fn lane(
        &self,
        rx: &mut mpsc::Receiver<EntityEvent>,
        watermark: &Watermark,
    ) -> Result<()> {
        let mut coalescer = Coalescer::new(Instant::now());
        let mut held = Vec::new();
        loop {
            let deadline = coalescer.next_deadline();
            let next = tokio::select! {
                event = rx.recv() => event,
                _ = sleep_until(deadline), if deadline.is_some() => {
                    self.flush(&mut coalescer, Some(Instant::now()), watermark).await?;
                    continue;
                }
            };
            let Some(event) = next else {
                return self.flush(&mut coalescer, None, watermark).await;
            };
            held.clear();
            self.process(&event, Some(&mut held)).await?;
            if held.is_empty() {
                watermark.completed(event.position);
            } else {
                coalescer.hold(&event, &entity_key(&event), &held, Instant::now());
            }
        }
    }

    /// Deliver the coalesced groups that are due (all of them with `now = None`).
    async fn flush(
        &self,
        coalescer: &mut Coalescer,
        now: Option<Instant>,
        watermark: &Watermark,
    ) -> Result<()> {
        let groups = coalescer.take_due(now);
        let delivered = self.flush_batches(&groups).await;
        for (g, group) in groups.iter().enumerate() {
            for a in 0..self.observers[group.observer].actions.len() {
                if !delivered.contains(&(g, a)) {
                    self.deliver(group.observer, a, &group.event).await?;
                }
            }
            for position in coalescer.release(&group.held) {
                watermark.completed(position);
            }
        }
        Ok(())
    }

    /// Actions that batch (search) take every due group of their observer in one request (one
    /// `_bulk` for Elasticsearch): the groups are distinct entities, so no entity's order is at
    /// stake.
    /// Returns the (group, action) pairs delivered; the others go through `deliver` (retries,
    /// parking, dead letters) as usual.
    async fn flush_batches(&self, groups: &[Group]) -> HashSet<(usize, usize)> {
        let mut delivered = HashSet::new();
        let mut by_observer: HashMap<usize, Vec<usize>> = HashMap::new();
        for (g, group) in groups.iter().enumerate() {
            let observer = &self.observers[group.observer];
            if !(observer.ordered && self.is_blocked(group.observer, &entity_key(&group.event))) {
                by_observer.entry(group.observer).or_default().push(g);
            }
        }
        for (i, members) in by_observer {
            let observer = &self.observers[i];
            for (a, action) in observer.actions.iter().enumerate() {
                if members.len() < 2 {
                    continue;
                }
                let ids: Vec<String> = members
                    .iter()
                    .map(|g| actions::delivery_id(groups[*g].event.id, &observer.name, a))
                    .collect();
                let requests: Vec<DeliveryRequest<'_>> = members
                    .iter()
                    .zip(&ids)
                    .map(|(g, id)| DeliveryRequest {
                        event: &groups[*g].event,
                        delivery_id: id,
                        attempt: 1,
                    })
                    .collect();
                let Some(results) = action.execute_batch(&requests).await else {
                    continue;
                };
                for (g, result) in members.iter().zip(results) {
                    if result.is_ok() {
                        self.delivered(observer, action, &groups[*g].event);
                        delivered.insert((*g, a));
                    }
                }
            }
        }
        delivered
    }

    /// Hand a batch to the lanes (waiting when they are full: backpressure on the reader).
    async fn dispatch(
        &self,
        batch: Batch,
        lanes: &[mpsc::Sender<EntityEvent>],
        watermark: &Watermark,
    ) {
        let n = batch.events.len() as u64;
        self.status.events_read.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(m::EVENTS_READ).increment(n);
        for event in batch.events {
            if self.matcher.candidates(&event).is_empty() {
                watermark.passed(event.position);
                continue;
            }
            watermark.dispatched(event.position);
            let lane = &lanes[lane_of(&event, lanes.len())];
            if lane.send(event).await.is_err() {
                return; // shutting down: the event is not done and will be read again
            }
        }
        watermark.passed(batch.end);
    }

    async fn measure_backlog(&self, sequence_column: &str, threshold: u64) -> Result<()> {
        let client = self.monitor.client().await?;
        let row = client
            .query_opt(
                "SELECT snapshot::text, pg_current_snapshot()::text
                   FROM core.observer_checkpoints WHERE consumer_id = $1",
                &[&self.consumer],
            )
            .await?;
        let Some(row) = row else { return Ok(()) };
        let lower: crate::listener::snapshot::Snapshot = row.get::<_, String>(0).parse()?;
        let current: crate::listener::snapshot::Snapshot = row.get::<_, String>(1).parse()?;
        let ids = crate::listener::change_log::batch_ids_sql(sequence_column);
        let counted = client
            .query_one(
                &format!(
                    "SELECT count(*), min(x.seq), (SELECT extract(epoch FROM now() - l.created_at)::float8
                        FROM core.tb_entity_change_log l WHERE l.{sequence_column} = min(x.seq))
                       FROM ({ids}) x"
                ),
                &[
                    &lower.xmax.to_string(),
                    &current.xmax.to_string(),
                    &lower.xip_text(),
                    &current.to_string(),
                    // Rows of a batch in progress count until the batch is done: an upper bound.
                    &i64::MIN,
                ],
            )
            .await?;
        let backlog = counted.get::<_, i64>(0).max(0) as u64;
        let lag = counted.get::<_, Option<f64>>(2).unwrap_or(0.0).max(0.0);
        self.status.backlog.store(backlog, Ordering::Relaxed);
        self.status
            .lag_ms
            .store((lag * 1000.0) as i64, Ordering::Relaxed);
        metrics::gauge!(m::BACKLOG).set(backlog as f64);
        metrics::gauge!(m::LAG_SECONDS).set(lag);
        let alert = backlog > threshold;
        let was = self.status.backlog_alert.swap(alert, Ordering::Relaxed);
        if alert && !was {
            tracing::warn!(consumer = %self.consumer, backlog, threshold, lag_seconds = lag,
                "backlog alert: committed changes are waiting faster than they are processed");
        } else if !alert && was {
            tracing::info!(consumer = %self.consumer, backlog, threshold, "backlog back under the threshold");
        }
        let queued = retry_queue::len(&client, &self.consumer).await?;
        metrics::gauge!(m::RETRY_QUEUE).set(queued as f64);
        let dlq = dead_letter::pending_count(&client).await?;
        metrics::gauge!(m::DLQ_PENDING).set(dlq as f64);
        Ok(())
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

fn reason_of(e: &ActionError) -> Reason {
    match e.kind {
        FailureKind::Transient => Reason::Exhausted,
        FailureKind::Permanent => Reason::Permanent,
        FailureKind::Gone => Reason::Gone,
    }
}

/// Sleep until `deadline` (forever when there is none).
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
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
