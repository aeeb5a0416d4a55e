//! One change-log row -> one [`EntityEvent`], for both shapes of `core.tb_entity_change_log`.
//! Pure: no I/O; the reader runs the SQL this module writes and hands the rows back.
//!
//! Invariants:
//! * The mapping from table columns to event fields lives here and nowhere else: the reader
//!   discovers the table's shape once ([`TableShape::CATALOG_QUERY`], [`TableShape::from_columns`]),
//!   selects [`TableShape::select_list`], and decodes each row with [`ChangeLogRowRef::from_row`]
//!   (borrowing the row's text, as the reader does) or [`ChangeLogRow::from_row`] (owned), and
//!   [`decode`].
//! * Every column whose content a user's table might hold in an unexpected form (UUIDs, JSON) is
//!   selected **as text** and parsed here, so one bad value is a [`DecodeError`] for that row
//!   only (the reader quarantines the row and goes on), never a failure of the batch. Only the
//!   sequence (BIGINT) and the timestamps (TIMESTAMPTZ) are read with their own types, and
//!   [`TableShape::from_columns`] refuses a table whose columns have types that would fail on every
//!   row, at start-up, with a message naming them.
//! * Nothing is guessed: an unknown operation, an operation that disagrees with
//!   `modification_type`, a change id that is not a UUID, a create or update without an
//!   after-image are errors, never a silent no-op and never a random id.
//! * The event's tenant is the row's tenant column, never anything the payload claims.

mod decode;
mod row;
mod shape;
#[cfg(test)]
mod tests;

pub use decode::{decode, DecodeError};
pub use row::{ChangeLogRow, ChangeLogRowRef};
pub use shape::{ShapeKind, TableShape};
