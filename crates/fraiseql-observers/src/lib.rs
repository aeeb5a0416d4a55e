//! fraiseql-observers: turn every committed PostgreSQL change into reliable actions.
//!
//! Data flows one way, and the modules follow it:
//!
//! ```text
//! listener (source: read the change log, decode rows)  ->  matcher/condition (match)
//!     ->  actions (execute)  ->  delivery (retries, dead letters)  ->  checkpoint (record)
//! ```
//!
//! * [`listener::ChangeLogListener`] reads `core.tb_entity_change_log` with the snapshot-diff
//!   algorithm: every committed row exactly once per pass, in commit order per entity, never a row
//!   of a transaction that is still open.
//! * [`listener::parser`] turns a row into an [`EntityEvent`] (pure).
//! * [`config::load`] parses and compiles observers (pure); [`EventMatcher`] and
//!   [`condition::Condition`] decide which observers an event concerns (pure).
//! * [`Pipeline`] wires and runs every stage (one wiring path for the daemon, the demo, the
//!   benches and the tests): lanes per entity, [`ObserverExecutor::process_event`] running
//!   [`actions`] (webhook, slack, email, sms, push, search, cache, nats, rabbitmq), the failure
//!   policy, durable retry queue and dead letters of [`delivery`], and the checkpoint at the low
//!   watermark of done events.
//! * [`migrate`] installs the change log, the capture trigger ([`capture`]) and the observer's
//!   own tables; [`leader`] elects one active instance per consumer.
//!
//! ```no_run
//! # async fn run() -> fraiseql_observers::Result<()> {
//! use fraiseql_observers::{config, Pipeline};
//!
//! let config = config::load(
//!     r#"
//!     [observers.user_signed_up]
//!     entity = "User"
//!     event_type = "INSERT"
//!     [[observers.user_signed_up.actions]]
//!     type = "webhook"
//!     url = "https://hooks.example.com/users"
//!     "#,
//!     &|name| std::env::var(name).ok(),
//! )
//! .expect("a valid configuration");
//! let pipeline = Pipeline::start("postgres://app@localhost/app", config).await?;
//! pipeline.run(async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```
//!
//! The library reads no environment variables and installs no global state.

pub mod actions;
pub mod backfill;
pub mod capture;
pub mod condition;
pub mod config;
pub mod control;
pub mod db;
pub mod delivery;
pub mod distributed;
pub mod error;
pub mod event;
pub mod fields;
pub mod json_scan;
pub mod leader;
pub mod listener;
pub mod matcher;
pub mod metrics;
pub mod migrate;
pub mod observer;
pub mod operator;
pub mod pipeline;
pub mod postgres_programs;
pub mod retention;
pub mod template;
#[cfg(feature = "testing")]
pub mod testing;

pub use config::Config;
pub use error::{ConfigError, ConfigErrors, Error, Result};
pub use event::{EntityEvent, EventKind, FieldChange, Position};
pub use listener::{ChangeLogListener, ListenerConfig, StartPosition};
pub use matcher::EventMatcher;
pub use observer::{Observer, OnFailure};
pub use operator::Operator;
pub use pipeline::{ObserverExecutor, Pipeline};
