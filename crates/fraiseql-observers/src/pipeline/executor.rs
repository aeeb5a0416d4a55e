//! `ObserverExecutor`: one event through the observers (match, execute), and the one failure
//! path: every failed attempt, fresh or retried from the queue, goes through
//! [`policy::after_failure`] and its decision is recorded here.
//!
//! Invariants:
//! * An event is done when every matching action succeeded or its failure was handed over
//!   durably (a committed retry-queue or dead-letter row, or a log line for `on_failure = "log"`).
//! * For an ordered observer, while an (observer, entity) has items in the retry queue, its new
//!   deliveries are parked behind them (durably) instead of running.
//! * A paused observer (`control`) sends nothing: each of its deliveries, before any attempt,
//!   is queued in the retry queue with its attempts unchanged (parked in order), to run after
//!   the resume.
//! * Every durable write is fenced by the consumer's epoch; `Error::Fenced` stops everything.

use crate::actions::{ActionError, DeliveryRequest};
use crate::config::{Observer, RuntimeConfig};
use crate::control::{self, Paused};
use crate::db;
use crate::delivery::flow::{self, Endpoint};
use crate::delivery::log::{Attempt, DeliveryLog, Started};
use crate::delivery::parking::Parking;
use crate::delivery::policy::{self, Decision, Reason, Stage};
use crate::delivery::{dead_letter, delivery_id, entity_key, retry_queue, DeliveryItem};
use crate::distributed::{self, WorkStream};
use crate::error::Result;
use crate::event::EntityEvent;
use crate::matcher::{EventMatcher, Verdict};
use crate::metrics as m;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_postgres::Client;

use super::monitor::EngineStatus;

/// A coalescing observer that matched an event: `(observer index, window)`. Its delivery waits
/// for the end of the window (see [`ObserverExecutor::process_event`]).
pub type Held = (usize, Duration);

pub struct ObserverExecutor {
    pub(super) observers: Vec<Observer>,
    matcher: EventMatcher,
    /// Metric handles: `meters[observer]`.
    pub(super) meters: Vec<m::ObserverMeters>,
    /// The endpoint of each action: `endpoints[observer][action]`.
    pub(super) endpoints: Vec<Vec<Arc<Endpoint>>>,
    /// Delivery bookkeeping (retry queue, dead letters).
    store: Arc<db::Reconnecting>,
    pub(super) consumer: String,
    pub(super) epoch: i64,
    pub(super) parking: Parking,
    /// The observers paused by an operator (kept current by the pipeline's pause watcher).
    pub(super) paused: Arc<Paused>,
    pub(super) retry_wake: Notify,
    pub(super) status: Arc<EngineStatus>,
    /// Every attempt of the observers that record them (`record`).
    pub(super) log: DeliveryLog,
    /// The consumer whose paused observers apply (the consumer itself, or, for a distributed
    /// worker's partition `C/p`, `C`).
    pub(super) control: String,
    /// A distributed reader's work stream: each fired observer's deliveries are published there
    /// (one message per event and observer) instead of run.
    publisher: Option<WorkStream>,
}

impl ObserverExecutor {
    /// Build the executor for `runtime.consumer_id` led at `epoch` (from
    /// `ChangeLogListener::epoch`): loads which entities are parked and which observers are
    /// paused, releases the leases a dead predecessor held, and sets up each endpoint's flow
    /// control.
    pub async fn new(
        observers: Vec<Observer>,
        database_url: &str,
        runtime: &RuntimeConfig,
        epoch: i64,
    ) -> Result<ObserverExecutor> {
        let consumer = runtime.consumer_id.clone();
        ObserverExecutor::scoped(observers, database_url, runtime, epoch, &consumer, None).await
    }

    /// [`new`](Self::new) for the deliveries of `consumer` (a distributed worker's partition,
    /// `C/p`, led at `epoch`): its retry queue, dead letters, parking and delivery log are
    /// `consumer`'s; the paused observers are `runtime.consumer_id`'s.
    pub async fn scoped(
        observers: Vec<Observer>,
        database_url: &str,
        runtime: &RuntimeConfig,
        epoch: i64,
        consumer: &str,
        store: Option<Arc<db::Reconnecting>>,
    ) -> Result<ObserverExecutor> {
        let control_id = runtime.consumer_id.clone();
        let config = db::parse_url(database_url)?;
        let log = DeliveryLog::start(config.clone(), consumer);
        let store = store.unwrap_or_else(|| {
            Arc::new(db::Reconnecting::new(config, "fraiseql-observers-delivery"))
        });
        let client = store.client().await?;
        let released = retry_queue::release_leases(&client, consumer, epoch).await?;
        if released > 0 {
            tracing::info!(
                consumer,
                released,
                "released retry leases of a previous leader"
            );
        }
        let paused = Arc::new(Paused::default());
        paused.replace(control::paused(&client, &control_id).await?);
        let counts = retry_queue::blocked_keys(&client, consumer).await?;
        let parking = Parking::from_counts(counts.into_iter().filter_map(|((name, key), n)| {
            let i = observers.iter().position(|o| o.name == name)?;
            Some(((i, key), n))
        }));
        Ok(ObserverExecutor {
            matcher: EventMatcher::new(&observers),
            meters: observers
                .iter()
                .map(|o| m::ObserverMeters::new(&o.name, o.actions.iter().map(|a| a.kind())))
                .collect(),
            endpoints: endpoints(&observers, runtime),
            observers,
            store,
            consumer: consumer.to_string(),
            epoch,
            parking,
            paused,
            retry_wake: Notify::new(),
            status: Arc::new(EngineStatus::default()),
            log,
            control: control_id,
            publisher: None,
        })
    }

    /// Publish each fired observer's deliveries to `stream` instead of running them (a
    /// distributed reader).
    pub fn publishing(mut self, stream: WorkStream) -> ObserverExecutor {
        self.publisher = Some(stream);
        self
    }

    /// Whether deliveries are published to a work stream rather than run here.
    pub(super) fn is_publishing(&self) -> bool {
        self.publisher.is_some()
    }

    pub fn observers(&self) -> &[Observer] {
        &self.observers
    }

    pub fn status(&self) -> Arc<EngineStatus> {
        self.status.clone()
    }

    pub(super) fn matcher(&self) -> &EventMatcher {
        &self.matcher
    }

    pub(super) fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Match one event and run the actions of every observer that fires, in configuration
    /// order. Returns once every delivery is done or handed over durably, with the observers
    /// that coalesce (`coalesce_ms`): those are not run here; the caller delivers them with
    /// [`deliver`](Self::deliver) when their window ends. `Err` only when a failure could not be
    /// recorded (fenced, or a database error that is not transient). The lanes do the same in
    /// two steps: [`route`](Self::route) in the lane, each observer's
    /// [`deliver_observer`](Self::deliver_observer) on its (observer, entity) chain.
    pub async fn process_event(&self, event: &EntityEvent) -> Result<Vec<Held>> {
        let routed = self.route(event).await?;
        for i in routed.fired {
            self.deliver_observer(i, event).await?;
        }
        Ok(routed.held)
    }

    /// Which observers fire for `event`: those to deliver now, and those that coalesce. An
    /// observer whose condition cannot be evaluated is recorded as a failed delivery here.
    pub async fn route(&self, event: &EntityEvent) -> Result<Routed> {
        let mut routed = Routed::default();
        for (i, verdict) in self.matcher.evaluate(&self.observers, event) {
            let observer = &self.observers[i];
            match verdict {
                Verdict::Matched => {
                    self.meters[i].matched.increment(1);
                    self.status.events_matched.fetch_add(1, Ordering::Relaxed);
                    match observer.coalesce {
                        Some(window) => routed.held.push((i, window)),
                        None => routed.fired.push(i),
                    }
                }
                Verdict::ConditionError(message) => {
                    self.meters[i].condition_errors.increment(1);
                    tracing::warn!(observer = %observer.name, sequence = event.sequence, error = %message,
                        "condition could not be evaluated; recorded as a failed delivery");
                    let error = format!("condition could not be evaluated: {message}");
                    let decision = policy::give_up(Reason::Permanent, observer.on_failure);
                    for a in 0..observer.actions.len() {
                        let item = self.item(i, a, event);
                        self.record_fresh(&item, 0, decision, &error).await?;
                    }
                }
                _ => {}
            }
        }
        Ok(routed)
    }

    /// Deliver `event` through every action of observer `i`, in order.
    pub async fn deliver_observer(&self, i: usize, event: &EntityEvent) -> Result<()> {
        if let Some(stream) = &self.publisher {
            self.publish(stream, i, event).await;
            return Ok(());
        }
        for a in 0..self.observers[i].actions.len() {
            self.deliver(i, a, event).await?;
        }
        Ok(())
    }

    /// Publish observer `i`'s deliveries of `event` to the work stream, retrying in place until
    /// the stream acknowledges it (nothing was delivered yet: never the retry queue). The
    /// partition is that of (observer, entity); the message id makes a republish a duplicate.
    async fn publish(&self, stream: &WorkStream, i: usize, event: &EntityEvent) {
        let name = &self.observers[i].name;
        let partition =
            distributed::partition_of(name, &entity_key(event), stream.config().partitions);
        let id = distributed::work_msg_id(event.id, name);
        let actions = self.observers[i].actions.iter().map(|a| a.kind());
        let body = distributed::WorkItem::encode(name, actions, event);
        let mut delay = Duration::from_millis(50);
        let mut failing = false;
        loop {
            match stream.publish(partition, &id, body.clone()).await {
                Ok(()) => {
                    metrics::counter!(m::WORK_PUBLISHED).increment(1);
                    if failing {
                        tracing::info!(observer = %name, partition, "work stream answers again");
                    }
                    return;
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(observer = %name, partition, sequence = event.sequence, error = %e,
                            "cannot publish to the work stream; retrying in place");
                    }
                    failing = true;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Deliver one event through action `a` of observer `i`: in-line attempts while the next
    /// one is due soon, then the retry queue or the dead letter queue.
    pub async fn deliver(&self, i: usize, a: usize, event: &EntityEvent) -> Result<()> {
        let observer = &self.observers[i];
        let action = &observer.actions[a];
        let item = self.item(i, a, event);
        if observer.ordered && self.parking.is_parked(i, &item.key) {
            self.meters[i].actions[a].parked.increment(1);
            return self
                .record_fresh(&item, 0, Decision::Queue(Duration::ZERO), "")
                .await;
        }
        let endpoint = &self.endpoints[i][a];
        let mut attempt = 1;
        loop {
            if self.paused.contains(&observer.name) {
                // Held, not skipped: it waits in the queue (not claimed while paused).
                self.meters[i].actions[a].paused.increment(1);
                return self
                    .record_fresh(&item, attempt - 1, Decision::Queue(Duration::ZERO), "")
                    .await;
            }
            let request = DeliveryRequest {
                event,
                delivery_id: &item.delivery_id,
                attempt,
            };
            let pass = match endpoint.admit().await {
                Ok(pass) => pass,
                Err((wait, why)) => {
                    self.meters[i].actions[a].throttled.increment(1);
                    let error = format!("endpoint {}: {}", endpoint.name(), why.describe());
                    return self
                        .record_fresh(&item, attempt - 1, Decision::Queue(wait), &error)
                        .await;
                }
            };
            let started = Started::now();
            let result = action.execute(&request).await;
            endpoint.record(result.as_ref().is_err_and(|e| e.is_retryable()));
            drop(pass);
            self.log_attempt(
                i,
                a,
                event,
                &item.delivery_id,
                attempt,
                started,
                result.as_ref().err(),
            )
            .await;
            let Err(e) = result else {
                self.delivered(i, a, event);
                return Ok(());
            };
            let decision = policy::after_failure(
                &e,
                attempt,
                &observer.retry,
                observer.on_failure,
                Stage::Lane,
                rand::random(),
            );
            if let Decision::RetryNow(delay) = decision {
                self.meters[i].actions[a].retried.increment(1);
                tracing::debug!(observer = %observer.name, sequence = event.sequence, attempt,
                    error = %e, delay_ms = delay.as_millis() as u64, "delivery failed; will retry");
                tokio::time::sleep(delay).await;
                attempt += 1;
                continue;
            }
            return self
                .record_fresh(&item, attempt, decision, e.message())
                .await;
        }
    }

    /// A delivery of the `a`th action of observer `i` succeeded.
    pub(super) fn delivered(&self, i: usize, a: usize, event: &EntityEvent) {
        let meters = &self.meters[i].actions[a];
        meters.ok.increment(1);
        let latency = (chrono::Utc::now() - event.created_at)
            .num_microseconds()
            .unwrap_or(0);
        meters.latency.record(latency.max(0) as f64 / 1e6);
    }

    /// Record attempt `attempt` of action `a` of observer `i` in the delivery log, when the
    /// observer records it (`failed`: the attempt's error, `None` when it succeeded).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn log_attempt(
        &self,
        i: usize,
        a: usize,
        event: &EntityEvent,
        delivery_id: &str,
        attempt: u32,
        started: Started,
        failed: Option<&ActionError>,
    ) {
        let observer = &self.observers[i];
        if !observer.record.wants(failed.is_none()) {
            return;
        }
        let delivery = DeliveryItem {
            observer: &observer.name,
            action_index: a,
            action_type: observer.actions[a].kind(),
            entity_key: &entity_key(event),
            ordered: observer.ordered,
            event,
            delivery_id,
        };
        let result = failed.map_or(Ok(()), Err);
        self.log
            .record(Attempt::new(delivery, attempt, started, result))
            .await;
    }

    pub(super) fn is_parked(&self, i: usize, key: &str) -> bool {
        self.observers[i].ordered && self.parking.is_parked(i, key)
    }

    /// Whether observer `i` is paused by an operator.
    pub(super) fn is_paused(&self, i: usize) -> bool {
        self.paused.contains(&self.observers[i].name)
    }

    /// The paused observers, for the pipeline's pause watcher.
    pub(super) fn paused(&self) -> &Paused {
        &self.paused
    }

    fn item<'a>(&'a self, i: usize, a: usize, event: &'a EntityEvent) -> Fresh<'a> {
        let observer = &self.observers[i];
        Fresh {
            i,
            a,
            event,
            key: entity_key(event),
            delivery_id: delivery_id(event.id, &observer.name, a),
        }
    }

    /// Record the decision about a delivery that is not in the retry queue yet. `attempts` is
    /// how many attempts failed (0 when none was made).
    async fn record_fresh(
        &self,
        fresh: &Fresh<'_>,
        attempts: u32,
        decision: Decision,
        error: &str,
    ) -> Result<()> {
        let observer = &self.observers[fresh.i];
        let action = &observer.actions[fresh.a];
        let item = DeliveryItem {
            observer: &observer.name,
            action_index: fresh.a,
            action_type: action.kind(),
            entity_key: &fresh.key,
            ordered: observer.ordered,
            event: fresh.event,
            delivery_id: &fresh.delivery_id,
        };
        match decision {
            Decision::RetryNow(delay) | Decision::Queue(delay) => {
                // Count first, so the entity is parked before the row exists; undo when the row
                // was already there (a replay), since it is counted already.
                if observer.ordered {
                    self.parking.park(fresh.i, &fresh.key);
                }
                let (max, error) = (
                    observer.retry.max_attempts,
                    (!error.is_empty()).then_some(error),
                );
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
                    self.parking.release(fresh.i, &fresh.key);
                }
                if attempts > 0 {
                    self.meters[fresh.i].actions[fresh.a].retried.increment(1);
                    self.retry_wake.notify_one();
                }
            }
            Decision::DeadLetter(reason) => {
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
                self.given_up(
                    fresh.i,
                    fresh.a,
                    fresh.event,
                    attempts,
                    reason,
                    error,
                    false,
                );
            }
            Decision::Drop(reason) => {
                self.given_up(fresh.i, fresh.a, fresh.event, attempts, reason, error, true);
            }
        }
        Ok(())
    }

    /// Metrics and the log line of a delivery given up: dead-lettered, or dropped.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn given_up(
        &self,
        i: usize,
        a: usize,
        event: &EntityEvent,
        attempts: u32,
        reason: Reason,
        error: &str,
        dropped: bool,
    ) {
        let (observer, meters) = (&self.observers[i], &self.meters[i].actions[a]);
        let action = observer.actions[a].kind();
        if dropped {
            meters.dropped.increment(1);
            tracing::error!(observer = %observer.name, action, sequence = event.sequence,
                event_id = %event.id, attempts, reason = reason.as_str(), error,
                "delivery failed for good; dropped (on_failure = \"log\")");
        } else {
            meters.dead_lettered.increment(1);
            metrics::counter!(m::DEAD_LETTERED).increment(1);
            tracing::warn!(observer = %observer.name, action, sequence = event.sequence,
                event_id = %event.id, attempts, reason = reason.as_str(), error,
                "delivery dead-lettered");
        }
    }

    /// Run a bookkeeping write, retrying while the database is unreachable: the event is not
    /// done until its failure is recorded, so waiting here is what keeps it from being lost.
    pub(super) async fn durably<T, F, Fut>(&self, write: F) -> Result<T>
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
}

/// The endpoints (flow control) of every action of `observers`: `[observer][action]`.
pub(super) fn endpoints(
    observers: &[Observer],
    runtime: &RuntimeConfig,
) -> Vec<Vec<Arc<Endpoint>>> {
    flow::endpoints(
        observers.iter().map(|o| o.actions.as_slice()),
        flow::Limits {
            max_in_flight: runtime.max_in_flight.unwrap_or(runtime.concurrency),
            rate_limit: runtime.rate_limit,
            breaker: runtime.circuit_breaker,
        },
    )
}

/// The observers that fire for one event.
#[derive(Debug, Default)]
pub struct Routed {
    /// Observers to deliver now (configuration order).
    pub fired: Vec<usize>,
    /// Observers that coalesce, with their window.
    pub held: Vec<Held>,
}

/// A delivery not yet in the retry queue: observer `i`, action `a`, with its entity key and id.
struct Fresh<'a> {
    i: usize,
    a: usize,
    event: &'a EntityEvent,
    key: String,
    delivery_id: String,
}
