//! A distributed worker (`run --role worker`): delivers the partitions of the work stream it
//! owns, each exactly as a single-process leader delivers a consumer.
//!
//! ```text
//! lock connection: heartbeat (registry, live workers) -> take / give back partitions
//! partition p (consumer C/p, its own epoch): pull consumer --> chains per (observer, entity)
//!     --> deliver_observer (retries, retry queue, DLQ of C/p) --> ack the message
//! ```
//!
//! Invariants:
//! * A partition is delivered only while its lease (advisory lock of `C/p`) is held on the
//!   worker's lock connection; a heartbeat that fails drops every partition at once (no drain,
//!   no ack), and the worker contends again.
//! * Taking a partition bumps `C/p`'s epoch, then recreates its JetStream consumer: the
//!   messages not acknowledged yet come again, in stream order (a takeover keeps per-entity
//!   order; a repeat carries the same delivery id).
//! * A message is acknowledged only after its deliveries are done or handed over durably
//!   (success, or committed to `C/p`'s retry queue / dead letters); a redelivery of a message
//!   still in flight is not run twice.
//! * Each worker aims at `ceil(partitions / live workers)` partitions: it takes free ones, and
//!   gives extras back gracefully (stop fetching, finish and acknowledge what is in flight,
//!   then unlock) when another worker joins.
//! * Flow control (`max_in_flight`, rate limits, breakers) is per endpoint per worker, shared
//!   by its partitions (those compiled from the same configuration).
//! * A reload (`reloads` changes) drains every owned partition as a give-back does (stop
//!   fetching, finish and acknowledge what is in flight), keeps its lease, and starts it again
//!   with the configuration compiled then; a configuration that does not compile is logged and
//!   the running one stays.
//! * A message for an observer the partition's configuration does not hold (the reader's and
//!   the workers' configurations differ) is not delivered and never left pending: each of its
//!   deliveries is dead-lettered as `not_accepted` (one item per action type the message names,
//!   the delivery id the action would have had, fenced under `C/p`'s epoch) before it is
//!   acknowledged, in stream order; a `dlq retry` sends them once the workers know it.

use super::chains::{Chains, Done, Job};
use super::executor::{self, ObserverExecutor};
use super::run::{first_failure, retry_worker, supervised, AbortChains, Lifetime};
use super::{prepare_actions, EngineStatus};
use crate::config::Config;
use crate::control::{self, Paused};
use crate::db;
use crate::delivery::dead_letter::{self, Reason};
use crate::delivery::flow::Endpoint;
use crate::delivery::{delivery_id, entity_key, DeliveryItem};
use crate::distributed::{
    self, claim_partition, remove_worker, PartitionLocks, WorkItem, WorkStream,
};
use crate::error::{ConfigErrors, Error, Result};
use crate::metrics as m;
use async_nats::jetstream::{self, AckKind};
use futures::{FutureExt as _, StreamExt as _};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

/// How often a worker beats and rebalances.
pub const TICK: Duration = Duration::from_secs(1);

/// How long an acknowledgement is retried before the message is left to a redelivery (with
/// the same delivery id).
const ACK_PATIENCE: Duration = Duration::from_secs(30);

/// What a worker reports (`/healthz`, `/metrics`).
#[derive(Debug, Default)]
pub struct WorkerStatus {
    /// The partitions owned now.
    pub partitions: Mutex<Vec<u32>>,
    /// Live workers of the consumer, this one included.
    pub live_workers: AtomicU64,
    /// Messages of the owned partitions not acknowledged yet (JetStream pending + in flight).
    pub lag: AtomicU64,
    /// Partitions taken since start (takeovers included).
    pub taken: AtomicU64,
    /// The delivery figures, shared by the partitions.
    pub engine: Arc<EngineStatus>,
}

/// Builds the configuration again (one per partition: observers hold their own clients): the
/// last one accepted, after a reload.
pub type Compile = Arc<dyn Fn() -> std::result::Result<Config, ConfigErrors> + Send + Sync>;

/// The endpoints of a configuration (`[observer][action]`) and what they were built from: the
/// partitions compiled from the same configuration share them, so flow control is per worker.
#[derive(Default)]
struct SharedEndpoints {
    fingerprint: String,
    endpoints: Vec<Vec<Arc<Endpoint>>>,
}

/// What the endpoints of `config` depend on: each observer's actions' endpoints and limits,
/// and the runtime's defaults.
fn endpoints_fingerprint(config: &Config) -> String {
    let r = &config.runtime;
    let mut text = format!(
        "{:?} {:?} {:?} {:?}",
        r.max_in_flight, r.concurrency, r.rate_limit, r.circuit_breaker
    );
    for o in &config.observers {
        text.push_str(&format!("\n{}:", o.name));
        for a in &o.actions {
            text.push_str(&format!(" {} {:?}", a.endpoint(), a.limits()));
        }
    }
    text
}

struct Shared {
    database_url: String,
    consumer: String,
    worker: String,
    stream: WorkStream,
    compile: Compile,
    /// The endpoints of the configuration compiled last: the partitions compiled from the
    /// same configuration share them.
    endpoints: Mutex<SharedEndpoints>,
    status: Arc<WorkerStatus>,
    shutdown_timeout: Duration,
    /// One bookkeeping connection for every partition (retry queue, dead letters, claims).
    store: Arc<db::Reconnecting>,
    /// The paused observers of the consumer, read once for every partition.
    paused: Arc<Paused>,
}

/// Run a worker named `worker` until `shutdown` resolves: own partitions of the work stream of
/// `compile()`'s `[distributed]` and deliver them. Whenever `reloads` changes, every owned
/// partition drains and starts again with `compile()`'s configuration then (its
/// `[distributed]` section is not read again). Lost leases are contended again; returns an
/// error only for a mistake that would repeat (no `[distributed]`, a bad configuration).
pub async fn run(
    database_url: &str,
    compile: Compile,
    worker: &str,
    status: Arc<WorkerStatus>,
    shutdown: impl Future<Output = ()>,
    mut reloads: watch::Receiver<u64>,
) -> Result<()> {
    let config = compile().map_err(|e| Error::Invalid(e.to_string()))?;
    let Some(dist) = config.distributed.clone() else {
        return Err(Error::Invalid(
            "a worker needs a [distributed] section".into(),
        ));
    };
    let shutdown = shutdown.shared();
    prepare_actions(&config.observers).await?;
    let stream = tokio::select! {
        _ = shutdown.clone() => return Ok(()),
        s = WorkStream::connect(&dist, &config.runtime.consumer_id) => s?,
    };
    let shared = Arc::new(Shared {
        database_url: database_url.to_string(),
        consumer: config.runtime.consumer_id.clone(),
        worker: worker.to_string(),
        stream,
        compile,
        // Flow control per worker: these endpoints, shared by every partition.
        endpoints: Mutex::new(SharedEndpoints {
            fingerprint: endpoints_fingerprint(&config),
            endpoints: executor::endpoints(&config.observers, &config.runtime),
        }),
        status,
        shutdown_timeout: config.runtime.shutdown_timeout,
        store: Arc::new(db::Reconnecting::new(
            db::parse_url(database_url)?,
            "fraiseql-observers-delivery",
        )),
        paused: Arc::new(Paused::default()),
    });
    let watcher = tokio::spawn(watch_paused_of(shared.clone()));
    let _stop_watcher = AbortOnDrop(watcher);
    tracing::info!(consumer = %shared.consumer, worker, partitions = dist.partitions,
        stream = %dist.stream, "worker started");
    let mut backoff = Duration::from_millis(200);
    loop {
        let locks = tokio::select! {
            _ = shutdown.clone() => return Ok(()),
            l = PartitionLocks::open(database_url, &shared.consumer) => l,
        };
        let error = match locks {
            Ok(locks) => match session(&shared, &locks, shutdown.clone(), &mut reloads).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            },
            Err(e) => e,
        };
        if !error.is_transient() && !matches!(error, Error::Invalid(_) | Error::TaskFailed(_)) {
            return Err(error);
        }
        shared
            .status
            .partitions
            .lock()
            .expect("status lock")
            .clear();
        metrics::gauge!(m::PARTITIONS_OWNED).set(0.0);
        tracing::warn!(consumer = %shared.consumer, worker, error = %error,
            retry_in_ms = backoff.as_millis() as u64,
            "worker lost its lock connection: every partition dropped at once; contending again");
        tokio::select! {
            _ = shutdown.clone() => return Ok(()),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// A partition being delivered here.
struct Owned {
    drain: watch::Sender<bool>,
    draining: bool,
    /// Draining for a reload: started again (lease kept) once drained.
    restart: bool,
    task: JoinHandle<Result<()>>,
}

impl Owned {
    fn start(shared: &Arc<Shared>, p: u32) -> Owned {
        let (drain, drained) = watch::channel(false);
        Owned {
            drain,
            draining: false,
            restart: false,
            task: tokio::spawn(partition(shared.clone(), p, drained)),
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Aborts every partition task when the session ends or is dropped.
struct AbortAll(BTreeMap<u32, Owned>);

impl Drop for AbortAll {
    fn drop(&mut self) {
        for owned in self.0.values() {
            owned.task.abort();
        }
    }
}

/// One lock session: beat, rebalance, until shutdown (`Ok`, after draining every partition) or
/// until the lock connection fails (the error; every partition is dropped at once).
async fn session(
    shared: &Arc<Shared>,
    locks: &PartitionLocks,
    shutdown: impl Future<Output = ()>,
    reloads: &mut watch::Receiver<u64>,
) -> Result<()> {
    let partitions = shared.stream.config().partitions;
    let mut owned = AbortAll(BTreeMap::new());
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Where this worker starts looking for free partitions: spread over the workers.
    let offset = distributed::partition_of("worker", &shared.worker, partitions);
    let lag = tokio::spawn(watch_lag(shared.clone()));
    let _stop_lag = AbortOnDrop(lag);
    tokio::pin!(shutdown);
    // Partitions taken from now on compile the latest configuration anyway.
    reloads.borrow_and_update();
    let mut reloadable = true;
    loop {
        tokio::select! {
            _ = &mut shutdown => return stop(shared, locks, owned).await,
            changed = reloads.changed(), if reloadable => {
                match changed {
                    Ok(()) => {
                        reloads.borrow_and_update();
                        reload(shared, &mut owned);
                    }
                    // Nobody can ask for a reload any more.
                    Err(_) => reloadable = false,
                }
                continue;
            }
            _ = tick.tick() => {}
        }
        // Partitions that ended: drained (given back), or failed (given back, taken again).
        let ended: Vec<u32> = owned
            .0
            .iter()
            .filter(|(_, o)| o.task.is_finished())
            .map(|(p, _)| *p)
            .collect();
        for p in ended {
            let o = owned.0.remove(&p).expect("listed");
            let restart = o.restart;
            match o.task.await {
                Ok(Ok(())) if restart => {
                    owned.0.insert(p, Owned::start(shared, p));
                    tracing::info!(
                        partition = p,
                        "partition drained and started again with the reloaded configuration"
                    );
                    continue;
                }
                Ok(Ok(())) => tracing::info!(partition = p, "partition drained and given back"),
                Ok(Err(e)) => tracing::warn!(partition = p, error = %e,
                    "partition stopped; giving it back (taken again when free)"),
                Err(e) => tracing::error!(partition = p, error = %e, "partition task failed"),
            }
            locks.release(p).await?;
        }
        let list: Vec<u32> = owned.0.keys().copied().collect();
        let live = locks.heartbeat(&shared.worker, &list).await?;
        let target = (partitions as usize).div_ceil(live);
        let active = owned
            .0
            .values()
            .filter(|o| !o.draining || o.restart)
            .count();
        if active > target {
            // Give extras back: the highest partitions first.
            for o in owned
                .0
                .values_mut()
                .rev()
                .filter(|o| !o.draining)
                .take(active - target)
            {
                o.draining = true;
                o.drain.send_replace(true);
            }
        } else if active < target {
            let mut active = active;
            for k in 0..partitions {
                let p = (offset + k) % partitions;
                if active >= target {
                    break;
                }
                if owned.0.contains_key(&p) || !locks.try_take(p).await? {
                    continue;
                }
                owned.0.insert(p, Owned::start(shared, p));
                shared.status.taken.fetch_add(1, Ordering::Relaxed);
                tracing::info!(partition = p, target, live, "partition taken");
                active += 1;
            }
        }
        let list: Vec<u32> = owned.0.keys().copied().collect();
        metrics::gauge!(m::PARTITIONS_OWNED).set(list.len() as f64);
        shared
            .status
            .live_workers
            .store(live as u64, Ordering::Relaxed);
        *shared.status.partitions.lock().expect("status lock") = list;
    }
}

/// A reload: check that the configuration compiles now (else log it and keep running the
/// current one), then drain every owned partition to start it again with it.
fn reload(shared: &Arc<Shared>, owned: &mut AbortAll) {
    match (shared.compile)() {
        Ok(config) => {
            let mut restarting = Vec::new();
            for (p, o) in owned.0.iter_mut().filter(|(_, o)| !o.draining) {
                o.draining = true;
                o.restart = true;
                o.drain.send_replace(true);
                restarting.push(*p);
            }
            tracing::info!(worker = %shared.worker, observers = config.observers.len(),
                partitions = ?restarting,
                "configuration reloaded: draining the partitions to start them again with it");
        }
        Err(errors) => {
            for e in &errors.0 {
                tracing::error!(worker = %shared.worker, error = %e,
                    "reload refused; the running configuration stays");
            }
        }
    }
}

/// Keep the worker's paused observers (those of the consumer, for every partition) current,
/// every [`control::PAUSE_POLL`], on a connection of its own.
async fn watch_paused_of(shared: Arc<Shared>) {
    let Ok(config) = db::parse_url(&shared.database_url) else {
        return;
    };
    let connection = db::Reconnecting::new(config, "fraiseql-observers-control");
    loop {
        tokio::time::sleep(control::PAUSE_POLL).await;
        let read = match connection.client().await {
            Ok(client) => control::paused(&client, &shared.consumer).await,
            Err(e) => Err(e),
        };
        match read {
            Ok(now) => {
                let (paused, resumed) = shared.paused.replace(now);
                for observer in paused.iter().chain(&resumed) {
                    tracing::info!(consumer = %shared.consumer, observer = %observer,
                        paused = paused.contains(observer), "observer pause changed");
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot read the paused observers; retrying"),
        }
    }
}

/// Every 5 s, the lag of the owned partitions (JetStream `num_pending` + in flight), off the
/// beat: a slow or absent NATS server never delays a heartbeat.
async fn watch_lag(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let list = shared
            .status
            .partitions
            .lock()
            .expect("status lock")
            .clone();
        let mut lag = 0;
        for p in list {
            lag += shared.stream.pending(p).await.unwrap_or(0);
        }
        shared.status.lag.store(lag, Ordering::Relaxed);
        metrics::gauge!(m::PARTITION_LAG).set(lag as f64);
    }
}

/// A graceful stop: drain every partition (up to the shutdown timeout), give them back, leave
/// the registry.
async fn stop(shared: &Shared, locks: &PartitionLocks, owned: AbortAll) -> Result<()> {
    for o in owned.0.values() {
        o.drain.send_replace(true);
    }
    // Keep beating while draining: the leases must outlive the deliveries in flight.
    let deadline = Instant::now() + shared.shutdown_timeout;
    let mut beat = Instant::now();
    while !owned.0.values().all(|o| o.task.is_finished()) {
        if Instant::now() >= deadline {
            tracing::warn!(
                "shutdown timeout reached; unacknowledged messages go to the next owner"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        if beat.elapsed() >= TICK {
            beat = Instant::now();
            let list: Vec<u32> = owned.0.keys().copied().collect();
            locks.heartbeat(&shared.worker, &list).await?;
        }
    }
    for p in owned.0.keys().copied().collect::<Vec<_>>() {
        let _ = locks.release(p).await;
    }
    drop(owned);
    let client = db::connect(
        &db::parse_url(&shared.database_url)?,
        "fraiseql-observers-worker",
    )
    .await?;
    remove_worker(&client, &shared.consumer, &shared.worker).await?;
    tracing::info!(worker = %shared.worker, "worker stopped; partitions given back");
    Ok(())
}

/// Deliver partition `p` until `drain` is set (then finish and acknowledge what is in flight,
/// and return `Ok`) or until a failure (the error: the partition is given back).
async fn partition(shared: Arc<Shared>, p: u32, mut drain: watch::Receiver<bool>) -> Result<()> {
    let id = distributed::partition_consumer(&shared.consumer, p);
    let config = (shared.compile)().map_err(|e| Error::Invalid(e.to_string()))?;
    let fingerprint = endpoints_fingerprint(&config);
    let client = shared.store.client().await?;
    let epoch = claim_partition(&client, &shared.consumer, p).await?;
    let runtime = config.runtime;
    let mut executor = ObserverExecutor::scoped(
        config.observers,
        &shared.database_url,
        &runtime,
        epoch,
        &id,
        Some(shared.store.clone()),
    )
    .await?;
    executor.endpoints = {
        let mut current = shared.endpoints.lock().expect("endpoints lock");
        if current.fingerprint != fingerprint {
            *current = SharedEndpoints {
                fingerprint,
                endpoints: executor.endpoints.clone(),
            };
        }
        current.endpoints.clone()
    };
    executor.paused = shared.paused.clone();
    executor.status = shared.status.engine.clone();
    let executor = Arc::new(executor);
    let consumer = shared.stream.take_partition(p).await?;
    tracing::debug!(partition = p, epoch, "partition consumer ready");

    let (fatal_tx, mut fatal_rx) = mpsc::unbounded_channel::<Error>();
    let chains = Arc::new(Chains::new(executor.clone(), fatal_tx));
    let _abort_chains = AbortChains(chains.clone());
    let mut tasks = JoinSet::new();
    tasks.spawn(supervised(
        "the retry worker",
        Lifetime::WholeRun,
        retry_worker(
            executor.clone(),
            runtime.retry_poll_interval,
            runtime.concurrency.max(1),
        ),
    ));

    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<u64>();
    let mut in_flight: HashMap<u64, jetstream::Message> = HashMap::new();
    let mut acks = JoinSet::new();
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| Error::WorkStream(format!("pull: {e}")))?;
    let mut draining = *drain.borrow();
    while !(draining && in_flight.is_empty()) {
        tokio::select! {
            biased;
            Some(e) = fatal_rx.recv() => return Err(e),
            e = first_failure(&mut tasks) => return Err(e),
            Some(seq) = done_rx.recv() => {
                if let Some(message) = in_flight.remove(&seq) {
                    acks.spawn(acknowledge(message, p));
                }
            }
            Some(_) = acks.join_next(), if !acks.is_empty() => {}
            _ = drain.changed(), if !draining => draining = true,
            next = messages.next(), if !draining => match next {
                Some(Ok(message)) => {
                    let Ok(info) = message.info() else { continue };
                    let seq = info.stream_sequence;
                    if let Some(held) = in_flight.get_mut(&seq) {
                        // Redelivered while still in flight: not run twice; acknowledge
                        // the latest delivery when done.
                        *held = message;
                        continue;
                    }
                    let item = match WorkItem::decode(&message.payload) {
                        Ok(item) => item,
                        Err(e) => {
                            tracing::error!(partition = p, stream_sequence = seq, error = %e,
                                "unreadable work message; terminated");
                            let _ = message.ack_with(AckKind::Term).await;
                            continue;
                        }
                    };
                    let Some(i) = executor.observers().iter().position(|o| o.name == item.observer) else {
                        // In stream order, before the next message is read: every message of
                        // this (observer, entity) takes this path, so nothing is overtaken.
                        executor.dead_letter_unknown(p, &item).await?;
                        acks.spawn(acknowledge(message, p));
                        continue;
                    };
                    let done_tx = done_tx.clone();
                    let done = Done::then(1, Box::new(move || {
                        let _ = done_tx.send(seq);
                    }));
                    in_flight.insert(seq, message);
                    let key = entity_key(&item.event);
                    chains.submit(key, Job { observer: i, event: Arc::new(item.event), done });
                }
                Some(Err(e)) => {
                    tracing::warn!(partition = p, error = %e, "work stream pull failed; continuing");
                }
                None => {
                    messages = consumer
                        .messages()
                        .await
                        .map_err(|e| Error::WorkStream(format!("pull: {e}")))?;
                }
            },
        }
    }
    while acks.join_next().await.is_some() {}
    tasks.abort_all();
    executor.log.flush().await;
    Ok(())
}

/// The action type recorded for a message from a reader that did not name the observer's
/// actions ([`WorkItem::actions`] empty).
const UNNAMED_ACTIONS: &str = "unknown";

impl ObserverExecutor {
    /// A work message for an observer this partition's configuration does not hold (the
    /// reader's and the workers' configurations differ): each of its deliveries is given up as
    /// [`Reason::NotAccepted`], as a queued retry of a removed observer is: dead-lettered under
    /// this partition's consumer and epoch (fenced), with the delivery id the action would have
    /// had and no attempt made, so a `dlq retry` once the workers know the observer sends it.
    /// One item per action the reader named; a message from an older reader, which names none,
    /// gives one item (action 0, type `unknown`) standing for all of them. Returns once every
    /// item is durable (the message may then be acknowledged); an error (fenced) loses the
    /// partition.
    async fn dead_letter_unknown(&self, p: u32, item: &WorkItem) -> Result<()> {
        let mut error = format!(
            "observer '{}' is not in this worker's configuration (the reader's and the \
             workers' configurations differ)",
            item.observer
        );
        let actions: Vec<&str> = if item.actions.is_empty() {
            error.push_str(
                "; sent by a reader that does not name the observer's actions: this item stands \
                 for all of them (`dlq retry` sends action 0; `replay` sends every action)",
            );
            vec![UNNAMED_ACTIONS]
        } else {
            item.actions.iter().map(String::as_str).collect()
        };
        let key = entity_key(&item.event);
        let error = &error;
        for (a, action_type) in actions.into_iter().enumerate() {
            let id = delivery_id(item.event.id, &item.observer, a);
            let delivery = &DeliveryItem {
                observer: &item.observer,
                action_index: a,
                action_type,
                entity_key: &key,
                ordered: false,
                event: &item.event,
                delivery_id: &id,
            };
            self.durably(|c| async move {
                dead_letter::insert(
                    &c,
                    &self.consumer,
                    self.epoch,
                    delivery,
                    0,
                    Reason::NotAccepted,
                    error,
                )
                .await
            })
            .await?;
            metrics::counter!(m::DEAD_LETTERED).increment(1);
            tracing::warn!(partition = p, consumer = %self.consumer, observer = %item.observer,
                action = a, action_type, sequence = item.event.sequence,
                event_id = %item.event.id, delivery_id = %id, attempts = 0,
                reason = Reason::NotAccepted.as_str(), error = %error,
                "delivery dead-lettered: observer unknown to this worker");
        }
        Ok(())
    }
}

/// Acknowledge `message` (confirmed by the server), retrying for [`ACK_PATIENCE`]; after that
/// it is left to a redelivery, which carries the same delivery ids.
async fn acknowledge(message: jetstream::Message, p: u32) {
    let started = Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match message.double_ack().await {
            Ok(()) => return,
            Err(e) if started.elapsed() < ACK_PATIENCE => {
                tracing::debug!(partition = p, error = %e, "acknowledgement not confirmed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                tracing::warn!(partition = p, error = %e,
                    "acknowledgement not confirmed; the message will be delivered again (same delivery id)");
                return;
            }
        }
    }
}
