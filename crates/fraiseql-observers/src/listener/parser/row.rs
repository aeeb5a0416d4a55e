//! Reading one change-log row, as [`TableShape::select_list`] selects it, from the driver's row:
//! the sequence and the timestamps typed, everything else raw text. Pure.

use chrono::{DateTime, Utc};

use super::decode::DecodeError;
use super::shape::{SLOTS, SLOT_COUNT};
#[cfg(doc)]
use super::{decode, TableShape};

/// One row of the change log as [`TableShape::select_list`] selects it: the sequence and the
/// timestamps typed, everything else raw text for [`decode`] to parse.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChangeLogRow {
    pub sequence: i64,
    pub change_id: Option<String>,
    pub tenant: Option<String>,
    pub author: Option<String>,
    pub object_type: Option<String>,
    pub object_id: Option<String>,
    pub modification_type: Option<String>,
    pub change_status: Option<String>,
    pub object_data: Option<String>,
    pub object_data_before: Option<String>,
    pub extra_metadata: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub commit_time: Option<DateTime<Utc>>,
}

impl ChangeLogRow {
    /// Read a row selected with [`TableShape::select_list`] (extra columns after it are ignored).
    /// Fails only when the row does not have that layout, which is a bug of the caller's SQL.
    /// The owned copy of [`ChangeLogRowRef::from_row`].
    pub fn from_row(row: &tokio_postgres::Row) -> Result<ChangeLogRow, DecodeError> {
        ChangeLogRowRef::from_row(row).map(ChangeLogRow::from)
    }
}

impl From<ChangeLogRowRef<'_>> for ChangeLogRow {
    fn from(row: ChangeLogRowRef<'_>) -> Self {
        let owned = |text: Option<&str>| text.map(str::to_owned);
        ChangeLogRow {
            sequence: row.sequence,
            change_id: owned(row.change_id),
            tenant: owned(row.tenant),
            author: owned(row.author),
            object_type: owned(row.object_type),
            object_id: owned(row.object_id),
            modification_type: owned(row.modification_type),
            change_status: owned(row.change_status),
            object_data: owned(row.object_data),
            object_data_before: owned(row.object_data_before),
            extra_metadata: owned(row.extra_metadata),
            created_at: row.created_at,
            commit_time: row.commit_time,
        }
    }
}

/// The same row as [`ChangeLogRow`], borrowing its text from the driver's row buffer instead of
/// copying it: what the reader decodes, so a row's JSON is never copied before it is parsed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ChangeLogRowRef<'a> {
    pub sequence: i64,
    pub change_id: Option<&'a str>,
    pub tenant: Option<&'a str>,
    pub author: Option<&'a str>,
    pub object_type: Option<&'a str>,
    pub object_id: Option<&'a str>,
    pub modification_type: Option<&'a str>,
    pub change_status: Option<&'a str>,
    pub object_data: Option<&'a str>,
    pub object_data_before: Option<&'a str>,
    pub extra_metadata: Option<&'a str>,
    pub created_at: Option<DateTime<Utc>>,
    pub commit_time: Option<DateTime<Utc>>,
}

impl<'a> ChangeLogRowRef<'a> {
    /// Read a row selected with [`TableShape::select_list`] (extra columns after it are ignored),
    /// borrowing its text from `row`. Fails only when the row does not have that layout, which is
    /// a bug of the caller's SQL.
    pub fn from_row(row: &'a tokio_postgres::Row) -> Result<ChangeLogRowRef<'a>, DecodeError> {
        if row.len() < SLOT_COUNT {
            return Err(DecodeError::new(format!(
                "the row has {} columns, the change-log select list has {SLOT_COUNT}",
                row.len()
            )));
        }
        fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
            row: &'a tokio_postgres::Row,
            slot: usize,
        ) -> Result<T, DecodeError> {
            row.try_get(slot).map_err(|e| {
                DecodeError::new(format!("column {} cannot be read: {e}", SLOTS[slot].0))
            })
        }
        Ok(ChangeLogRowRef {
            sequence: get(row, 0)?,
            change_id: get(row, 1)?,
            tenant: get(row, 2)?,
            author: get(row, 3)?,
            object_type: get(row, 4)?,
            object_id: get(row, 5)?,
            modification_type: get(row, 6)?,
            change_status: get(row, 7)?,
            object_data: get(row, 8)?,
            object_data_before: get(row, 9)?,
            extra_metadata: get(row, 10)?,
            created_at: get(row, 11)?,
            commit_time: get(row, 12)?,
        })
    }
}

impl<'a> From<&'a ChangeLogRow> for ChangeLogRowRef<'a> {
    fn from(row: &'a ChangeLogRow) -> Self {
        ChangeLogRowRef {
            sequence: row.sequence,
            change_id: row.change_id.as_deref(),
            tenant: row.tenant.as_deref(),
            author: row.author.as_deref(),
            object_type: row.object_type.as_deref(),
            object_id: row.object_id.as_deref(),
            modification_type: row.modification_type.as_deref(),
            change_status: row.change_status.as_deref(),
            object_data: row.object_data.as_deref(),
            object_data_before: row.object_data_before.as_deref(),
            extra_metadata: row.extra_metadata.as_deref(),
            created_at: row.created_at,
            commit_time: row.commit_time,
        }
    }
}

impl<'a> From<&ChangeLogRowRef<'a>> for ChangeLogRowRef<'a> {
    fn from(row: &ChangeLogRowRef<'a>) -> Self {
        *row
    }
}
