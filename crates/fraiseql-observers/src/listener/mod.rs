//! Reading the change log: the gap-safe reader, the row decoder, the checkpoint (and its
//! checkpointer), and how far behind a consumer is (backlog).

pub mod backlog;
pub mod change_log;
pub mod checkpoint;
pub mod parser;
pub mod quarantine;
pub mod range;
pub mod sizing;
pub mod snapshot;
mod statements;

pub use change_log::{Batch, ChangeLogListener, ListenerConfig, ListenerStats, StopHandle};
pub use checkpoint::{Checkpointer, StartPosition};
