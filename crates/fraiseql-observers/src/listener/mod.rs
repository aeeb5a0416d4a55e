//! Reading the change log: the gap-safe reader, the row decoder, the checkpoint.

pub mod change_log;
pub mod checkpoint;
pub mod parser;
pub mod quarantine;
pub mod range;
pub mod snapshot;

pub use change_log::{
    Batch, ChangeLogListener, Checkpointer, ListenerConfig, ListenerStats, StopHandle,
};
pub use checkpoint::StartPosition;
