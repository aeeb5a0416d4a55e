//! The pipeline: the only module that sees every stage. One wiring path, used by the daemon, the
//! demo, the benches and the tests alike.
//!
//! ```text
//! ChangeLogListener --batches--> dispatch --(entity lanes)--> process_event: match, execute
//!        ^                                                        |  failure: policy -> retry queue / DLQ
//!        +---- checkpoint <-- watermark of done events <---------+
//! retry worker: due heads of the retry queue --> execute --> done / reschedule / dead letter
//! monitor: health, backlog, lag, queue sizes
//! ```
//!
//! * [`Pipeline::start`] checks what the actions need from their brokers (a JetStream stream, a
//!   RabbitMQ exchange: [`crate::actions::Action::prepare`]; a missing one is an error before the
//!   consumer is claimed), maps the runtime settings to the listener's (the one place that does),
//!   claims the consumer and builds the executor; [`Pipeline::run`] runs until shutdown.
//! * `executor.rs`: one event through the observers and the one failure path; `lane.rs`:
//!   dispatch, lanes (routing), coalescing; `chains.rs`: each (observer, entity)'s deliveries
//!   in order, off the lanes; `retry.rs`: the retry worker's step; `monitor.rs`: live
//!   figures; `run.rs`: the tasks and shutdown.
//! * [`Pipeline::run`] also watches the paused observers (`control`); [`Pipeline::run_reloading`]
//!   swaps the whole pipeline for a new configuration (drain, then start again) on a reload.
//!
//! Invariants:
//! * The checkpoint moves only to the low watermark of done events: a crash replays at most what
//!   was in flight.
//! * Every durable write is fenced by the consumer's epoch; `Error::Fenced`, or any engine task
//!   failing, stops everything at once.

mod chains;
mod executor;
mod lane;
mod monitor;
mod retry;
mod run;
pub mod worker;

pub use executor::{Held, ObserverExecutor, Routed};
pub use monitor::EngineStatus;

use crate::config::{Config, Observer, RuntimeConfig};
use crate::control;
use crate::db;
use crate::distributed::{DistributedConfig, Role, WorkStream};
use crate::error::{ConfigErrors, Error, Result};
use crate::listener::{ChangeLogListener, ListenerConfig};
use crate::metrics as m;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::watch;

/// The listener settings that `runtime` asks for, reading `database_url`.
pub fn listener_config(database_url: &str, runtime: &RuntimeConfig) -> ListenerConfig {
    ListenerConfig {
        database_url: database_url.to_string(),
        consumer_id: runtime.consumer_id.clone(),
        batch_size: runtime.batch_size,
        poll_interval: runtime.poll_interval,
        start: runtime.start_position,
        notify: runtime.notify,
        ..ListenerConfig::default()
    }
}

/// Check (or create) what every action needs from its broker, all at once. A permanent failure
/// (no stream captures a subject, no such exchange, refused credentials) is a configuration
/// mistake: an error naming the action. A transient one (the broker cannot be reached now) is
/// logged: the action's deliveries retry until it answers.
pub(super) async fn prepare_actions(observers: &[Observer]) -> Result<()> {
    let checks = observers.iter().flat_map(|o| {
        o.actions.iter().enumerate().map(move |(i, action)| async move {
            match action.prepare().await {
                Ok(()) => Ok(()),
                Err(e) if e.is_retryable() => {
                    tracing::warn!(observer = %o.name, action = i, endpoint = %action.endpoint(),
                        error = %e, "cannot check the action's broker now; its deliveries retry until it answers");
                    Ok(())
                }
                Err(e) => Err(format!("observers.{}.actions[{i}]: {e}", o.name)),
            }
        })
    });
    let failed: Vec<String> = futures::future::join_all(checks)
        .await
        .into_iter()
        .filter_map(|r| r.err())
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::Invalid(failed.join("\n")))
    }
}

/// A consumer claimed and ready to run: its listener (holding the fencing epoch) and executor.
pub struct Pipeline {
    database_url: String,
    listener: ChangeLogListener,
    executor: Arc<ObserverExecutor>,
    runtime: RuntimeConfig,
}

impl Pipeline {
    /// Claim `config.runtime.consumer_id` (bumping its epoch), load its checkpoint and build the
    /// executor for `config.observers`. The caller holds the consumer's lead, if it elects one.
    ///
    /// With `config.role` = [`Role::Reader`] the executor publishes each fired observer's
    /// deliveries to the `[distributed]` work stream instead of running them.
    pub async fn start(database_url: &str, config: Config) -> Result<Pipeline> {
        let listener = listener_config(database_url, &config.runtime);
        let publish_to = match config.role {
            Role::Reader => config.distributed.clone(),
            _ => None,
        };
        Pipeline::start_publishing(listener, config.observers, config.runtime, publish_to).await
    }

    /// [`Pipeline::start`] with listener settings of the caller's own (e.g. tests that reconnect
    /// faster than the defaults); start from [`listener_config`].
    pub async fn start_with(
        listener: ListenerConfig,
        observers: Vec<Observer>,
        runtime: RuntimeConfig,
    ) -> Result<Pipeline> {
        Pipeline::start_publishing(listener, observers, runtime, None).await
    }

    /// [`start_with`](Self::start_with), publishing to the work stream of `publish_to` when
    /// given (a distributed reader).
    pub async fn start_publishing(
        listener: ListenerConfig,
        observers: Vec<Observer>,
        runtime: RuntimeConfig,
        publish_to: Option<DistributedConfig>,
    ) -> Result<Pipeline> {
        prepare_actions(&observers).await?;
        let stream = match &publish_to {
            Some(d) => Some(WorkStream::connect(d, &runtime.consumer_id).await?),
            None => None,
        };
        let url = listener.database_url.clone();
        let listener = ChangeLogListener::start(listener).await?;
        let mut executor =
            ObserverExecutor::new(observers, &url, &runtime, listener.epoch()).await?;
        if let Some(stream) = stream {
            executor = executor.publishing(stream);
        }
        Ok(Pipeline {
            database_url: url,
            listener,
            executor: Arc::new(executor),
            runtime,
        })
    }

    /// The fencing epoch this pipeline holds.
    pub fn epoch(&self) -> i64 {
        self.listener.epoch()
    }

    pub fn executor(&self) -> Arc<ObserverExecutor> {
        self.executor.clone()
    }

    pub fn status(&self) -> Arc<EngineStatus> {
        self.executor.status()
    }

    /// Run until `shutdown` resolves: read, match, deliver, retry, checkpoint. On shutdown, stop
    /// reading, let the lanes finish what they hold for up to `runtime.shutdown_timeout`, save
    /// the checkpoint and return. Returns an error (at once) when fenced by another instance or
    /// when the listener fails for a reason that is not transient. Dropping the future (a lost
    /// lead) aborts every task it started: no draining, no checkpoint.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let watcher = watch_paused(self.executor.clone(), self.database_url.clone());
        tokio::select! {
            result = run::run(
                self.executor.clone(),
                self.listener,
                &self.database_url,
                &self.runtime,
                shutdown,
            ) => result,
            e = watcher => Err(e),
        }
    }

    /// [`run`](Self::run), applying each new configuration on the way: whenever `reloads`
    /// changes, `recompile` builds the new configuration (one that fails is logged and the
    /// running one stays); then this pipeline is drained as on a shutdown (in-flight deliveries
    /// finish or are handed to the retry queue, the checkpoint is saved) and a new one starts
    /// from that checkpoint with the new observers and runtime settings, in the same lead
    /// (a new epoch, taken while the consumer's lock is still held). `/healthz` figures carry
    /// over. Returns when `shutdown` resolves, or on the first error.
    pub async fn run_reloading(
        self,
        shutdown: impl Future<Output = ()> + Clone,
        reloads: &mut watch::Receiver<u64>,
        recompile: impl Fn() -> std::result::Result<Config, ConfigErrors>,
    ) -> Result<()> {
        let mut pipeline = self;
        loop {
            let consumer = pipeline.runtime.consumer_id.clone();
            let (url, status) = (pipeline.database_url.clone(), pipeline.status());
            let mut next: Option<Config> = None;
            let stop = async {
                tokio::select! {
                    _ = shutdown.clone() => {}
                    config = next_config(reloads, &recompile) => next = Some(config),
                }
            };
            pipeline.run(stop).await?;
            let Some(config) = next else {
                return Ok(());
            };
            let observers = config.observers.len();
            pipeline = tokio::select! {
                biased;
                _ = shutdown.clone() => return Ok(()),
                started = Pipeline::start(&url, config) => started?,
            };
            if let Some(executor) = Arc::get_mut(&mut pipeline.executor) {
                executor.status = status;
            }
            tracing::info!(consumer = %consumer, observers, epoch = pipeline.epoch(),
                "configuration reloaded: running the new observers from the saved checkpoint");
        }
    }
}

/// The next configuration to run: waits for `reloads` to change and compiles it; a
/// configuration that does not compile is logged (every error) and waited past. Never resolves
/// when nobody can ask for a reload (the sender is gone).
async fn next_config(
    reloads: &mut watch::Receiver<u64>,
    recompile: &impl Fn() -> std::result::Result<Config, ConfigErrors>,
) -> Config {
    loop {
        if reloads.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        reloads.borrow_and_update();
        match recompile() {
            Ok(config) => return config,
            Err(errors) => {
                for e in &errors.0 {
                    tracing::error!(error = %e, "reload refused; the running configuration stays");
                }
            }
        }
    }
}

/// Keep the executor's paused observers current (every [`control::PAUSE_POLL`]), on a
/// connection of its own. Ends only on an error that is not transient.
pub(super) async fn watch_paused(executor: Arc<ObserverExecutor>, database_url: String) -> Error {
    let connection = match db::parse_url(&database_url) {
        Ok(config) => db::Reconnecting::new(config, "fraiseql-observers-control"),
        Err(e) => return e,
    };
    let publish = |executor: &ObserverExecutor| {
        for o in executor.observers() {
            let paused = executor.paused().contains(&o.name);
            metrics::gauge!(m::OBSERVER_PAUSED, "observer" => o.name.clone()).set(if paused {
                1.0
            } else {
                0.0
            });
        }
    };
    publish(&executor);
    let mut failing = false;
    loop {
        tokio::time::sleep(control::PAUSE_POLL).await;
        let read = match connection.client().await {
            Ok(client) => control::paused(&client, &executor.control).await,
            Err(e) => Err(e),
        };
        match read {
            Ok(now) => {
                failing = false;
                let (paused, resumed) = executor.paused().replace(now);
                for observer in &paused {
                    tracing::info!(consumer = %executor.consumer(), observer = %observer,
                        "observer paused: its deliveries wait in the retry queue");
                }
                for observer in &resumed {
                    tracing::info!(consumer = %executor.consumer(), observer = %observer,
                        "observer resumed: its held deliveries are due now, in order");
                }
                if !paused.is_empty() || !resumed.is_empty() {
                    publish(&executor);
                }
            }
            Err(e) if e.is_transient() => {
                if !failing {
                    tracing::warn!(error = %e, "cannot read the paused observers; retrying");
                }
                failing = true;
            }
            Err(e) => return e,
        }
    }
}
