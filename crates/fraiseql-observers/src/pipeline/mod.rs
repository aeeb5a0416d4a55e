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

pub use executor::{Held, ObserverExecutor, Routed};
pub use monitor::EngineStatus;

use crate::config::{Config, Observer, RuntimeConfig};
use crate::error::{Error, Result};
use crate::listener::{ChangeLogListener, ListenerConfig};
use std::future::Future;
use std::sync::Arc;

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
async fn prepare_actions(observers: &[Observer]) -> Result<()> {
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
    pub async fn start(database_url: &str, config: Config) -> Result<Pipeline> {
        let listener = listener_config(database_url, &config.runtime);
        Pipeline::start_with(listener, config.observers, config.runtime).await
    }

    /// [`Pipeline::start`] with listener settings of the caller's own (e.g. tests that reconnect
    /// faster than the defaults); start from [`listener_config`].
    pub async fn start_with(
        listener: ListenerConfig,
        observers: Vec<Observer>,
        runtime: RuntimeConfig,
    ) -> Result<Pipeline> {
        prepare_actions(&observers).await?;
        let url = listener.database_url.clone();
        let listener = ChangeLogListener::start(listener).await?;
        let executor = ObserverExecutor::new(observers, &url, &runtime, listener.epoch()).await?;
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
        run::run(
            self.executor,
            self.listener,
            &self.database_url,
            &self.runtime,
            shutdown,
        )
        .await
    }
}
