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
//! * [`migrate`] installs the change log, the capture trigger and the observer's own tables.
//!
//! The library reads no environment variables and installs no global state.

pub mod actions;
pub mod capture;
pub mod condition;
pub mod config;
pub mod db;
pub mod delivery;
pub mod error;
pub mod event;
pub mod executor;
pub mod leader;
pub mod listener;
pub mod matcher;
pub mod metrics;
pub mod migrate;
pub mod template;

pub use config::{Config, Observer};
pub use error::{ConfigError, Error, Result};
pub use event::{EntityEvent, EventKind, FieldChange, Position};
pub use executor::ObserverExecutor;
pub use listener::{ChangeLogListener, ListenerConfig, StartPosition};
pub use matcher::EventMatcher;
