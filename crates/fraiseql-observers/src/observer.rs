//! What a configuration compiles to: an [`Observer`] (which events it concerns, what to do with
//! them, and, with [`OnFailure`] from the failure policy, what becomes of a delivery that will not
//! succeed). No I/O, and nothing of the TOML loader: the matcher and the
//! executor depend on this, not on [`crate::config`].

use std::time::Duration;

use uuid::Uuid;

use crate::actions::Action;
use crate::condition::Condition;
pub use crate::delivery::log::Record;
pub use crate::delivery::policy::OnFailure;
use crate::delivery::schedule::RetryPolicy;
use crate::event::EventKind;

/// One compiled observer: which events it concerns, and what to do with them.
#[derive(Debug)]
pub struct Observer {
    pub name: String,
    /// `None` for `entity = "*"`.
    pub entity: Option<String>,
    pub event_types: Vec<EventKind>,
    pub condition: Option<Condition>,
    /// Only this tenant's events (the row's tenant column, never the payload).
    pub tenant: Option<Uuid>,
    pub actions: Vec<Action>,
    pub retry: RetryPolicy,
    pub on_failure: OnFailure,
    /// One entity's deliveries keep their order (a failing one parks its successors).
    pub ordered: bool,
    /// A paused observer matches nothing.
    pub enabled: bool,
    /// Coalescing window (only for actions that [coalesce](Action::coalesces)): changes of one
    /// entity within it become one delivery of the latest state.
    pub coalesce: Option<Duration>,
    /// Which attempts go to the delivery log (`record`, default all).
    pub record: Record,
    pub description: Option<String>,
}
