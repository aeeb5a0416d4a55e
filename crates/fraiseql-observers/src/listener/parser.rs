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

use crate::error::{Error, Result};
use crate::event::{diff_fields, EntityEvent, EventKind, Position};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

/// The fully qualified name of the change log, as the catalog query and the messages name it.
const TABLE: &str = "core.tb_entity_change_log";

/// Which of the two known layouts of `core.tb_entity_change_log` a database has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShapeKind {
    /// The mission's layout (FraiseQL schema-conventions 6.1): `id BIGINT` is the sequence,
    /// `pk_entity_change_log UUID` the change id, `fk_customer_org UUID` the tenant,
    /// `fk_contact UUID` the author, and `object_data` holds a Debezium envelope
    /// `{before, after, op, source}`.
    Envelope,
    /// The later FraiseQL layout: `pk_entity_change_log BIGINT` is the sequence, `id UUID` the
    /// change id, `tenant_id UUID` the tenant, `fk_contact BIGINT` the author; `object_data` is the
    /// after-image, `object_data_before` the pre-image, `modification_type` the operation and
    /// `commit_time` the source timestamp.
    Split,
}

impl ShapeKind {
    fn name(self) -> &'static str {
        match self {
            ShapeKind::Envelope => "envelope",
            ShapeKind::Split => "split",
        }
    }
}

/// Which column types a column may have for the decoder to read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TypeClass {
    /// Read with its own type: must be `bigint`.
    Bigint,
    /// Read as text and parsed as a UUID per row: `uuid` or a text type.
    UuidLike,
    /// Read as text and parsed as JSON per row: `jsonb`, `json` or a text type.
    JsonLike,
    /// Read as text, any type (`text`, an enum, a number for `fk_contact`...).
    AnyText,
    /// Read with its own type: must be `timestamp with time zone` (a `timestamp` without a time
    /// zone is refused rather than read in a guessed zone).
    Timestamptz,
}

impl TypeClass {
    fn accepts(self, data_type: &str) -> bool {
        const TEXT: [&str; 3] = ["text", "character varying", "character"];
        match self {
            TypeClass::Bigint => data_type == "bigint",
            TypeClass::UuidLike => data_type == "uuid" || TEXT.contains(&data_type),
            TypeClass::JsonLike => {
                data_type == "jsonb" || data_type == "json" || TEXT.contains(&data_type)
            }
            TypeClass::AnyText => true,
            TypeClass::Timestamptz => data_type == "timestamp with time zone",
        }
    }

    fn expected(self) -> &'static str {
        match self {
            TypeClass::Bigint => "bigint",
            TypeClass::UuidLike => "uuid or text",
            TypeClass::JsonLike => "jsonb, json or text",
            TypeClass::AnyText => "any type",
            TypeClass::Timestamptz => "timestamp with time zone",
        }
    }
}

/// One column the decoder reads, in one shape.
#[derive(Debug, Clone, Copy)]
struct ColumnSpec {
    name: &'static str,
    class: TypeClass,
    required: bool,
}

const fn required(name: &'static str, class: TypeClass) -> Option<ColumnSpec> {
    Some(ColumnSpec {
        name,
        class,
        required: true,
    })
}

const fn optional(name: &'static str, class: TypeClass) -> Option<ColumnSpec> {
    Some(ColumnSpec {
        name,
        class,
        required: false,
    })
}

/// The number of columns in [`TableShape::select_list`].
const SLOT_COUNT: usize = 13;

/// The select list's columns, in order: the alias each gets, and whether a missing column is
/// `NULL::timestamptz` (true) or `NULL::text` (false). Slot 0 (the sequence) is always present.
const SLOTS: [(&str, bool); SLOT_COUNT] = [
    ("sequence", false),
    ("change_id", false),
    ("tenant", false),
    ("author", false),
    ("object_type", false),
    ("object_id", false),
    ("modification_type", false),
    ("change_status", false),
    ("object_data", false),
    ("object_data_before", false),
    ("extra_metadata", false),
    ("created_at", true),
    ("commit_time", true),
];

/// Where each slot comes from in the envelope shape (`None`: not part of this shape, NULL).
const ENVELOPE_COLUMNS: [Option<ColumnSpec>; SLOT_COUNT] = [
    required("id", TypeClass::Bigint),
    required("pk_entity_change_log", TypeClass::UuidLike),
    optional("fk_customer_org", TypeClass::UuidLike),
    optional("fk_contact", TypeClass::AnyText),
    required("object_type", TypeClass::AnyText),
    required("object_id", TypeClass::UuidLike),
    optional("modification_type", TypeClass::AnyText),
    optional("change_status", TypeClass::AnyText),
    required("object_data", TypeClass::JsonLike),
    None,
    optional("extra_metadata", TypeClass::JsonLike),
    optional("created_at", TypeClass::Timestamptz),
    None,
];

/// Where each slot comes from in the split shape.
const SPLIT_COLUMNS: [Option<ColumnSpec>; SLOT_COUNT] = [
    required("pk_entity_change_log", TypeClass::Bigint),
    required("id", TypeClass::UuidLike),
    optional("tenant_id", TypeClass::UuidLike),
    optional("fk_contact", TypeClass::AnyText),
    required("object_type", TypeClass::AnyText),
    required("object_id", TypeClass::UuidLike),
    required("modification_type", TypeClass::AnyText),
    optional("change_status", TypeClass::AnyText),
    required("object_data", TypeClass::JsonLike),
    optional("object_data_before", TypeClass::JsonLike),
    optional("extra_metadata", TypeClass::JsonLike),
    optional("created_at", TypeClass::Timestamptz),
    optional("commit_time", TypeClass::Timestamptz),
];

fn columns_of(kind: ShapeKind) -> &'static [Option<ColumnSpec>; SLOT_COUNT] {
    match kind {
        ShapeKind::Envelope => &ENVELOPE_COLUMNS,
        ShapeKind::Split => &SPLIT_COLUMNS,
    }
}

/// The change log's layout as discovered from the catalog: its [`ShapeKind`] and which optional
/// columns exist. Built once at start-up by [`TableShape::from_columns`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableShape {
    kind: ShapeKind,
    /// Per select-list slot: whether the table has the column (else the slot selects NULL).
    present: [bool; SLOT_COUNT],
}

impl TableShape {
    /// SQL listing the change log's columns as rows `(column_name text, data_type text)`, in
    /// column order. `data_type` is the base type's SQL name without modifiers (`bigint`, `uuid`,
    /// `jsonb`, `character varying`, `timestamp with time zone`; a domain reports its base type).
    /// When the table does not exist the query returns no rows (it uses `to_regclass`, so it does
    /// not fail), and [`TableShape::from_columns`] says so.
    pub const CATALOG_QUERY: &'static str = "\
SELECT a.attname::text AS column_name, \
       format_type(CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE a.atttypid END, NULL) AS data_type \
  FROM pg_attribute a \
  JOIN pg_type t ON t.oid = a.atttypid \
 WHERE a.attrelid = to_regclass('core.tb_entity_change_log') \
   AND a.attnum > 0 \
   AND NOT a.attisdropped \
 ORDER BY a.attnum";

    /// Decide the shape from the rows of [`TableShape::CATALOG_QUERY`].
    ///
    /// The envelope shape needs a BIGINT `id`, a UUID-or-text `pk_entity_change_log`, and
    /// `object_type`, `object_id` (UUID or text), `object_data` (JSONB, JSON or text); the split
    /// shape needs a BIGINT `pk_entity_change_log`, a UUID-or-text `id`, the same three, and
    /// `modification_type`. Every other column is optional and selected as NULL when missing, but
    /// a column that exists must have a type the decoder can read. When neither shape fits, the
    /// [`Error::ChangeLogShape`] names every missing column and every column of the wrong type
    /// (for the shape whose sequence column is there, or for both when neither is).
    pub fn from_columns(columns: &[(String, String)]) -> Result<TableShape> {
        if columns.is_empty() {
            return Err(Error::ChangeLogShape(format!(
                "{TABLE} does not exist; create it with `fraiseql-observers migrate`"
            )));
        }
        let envelope = Self::check(ShapeKind::Envelope, columns);
        let split = Self::check(ShapeKind::Split, columns);
        let (envelope_problems, split_problems) = match (envelope, split) {
            (Ok(shape), _) | (_, Ok(shape)) => return Ok(shape),
            (Err(e), Err(s)) => (e, s),
        };
        let has_bigint = |name: &str| {
            columns
                .iter()
                .any(|(n, t)| n == name && TypeClass::Bigint.accepts(t))
        };
        let describe = |kind: ShapeKind, problems: &[String]| {
            let sequence = columns_of(kind)[0].map_or("", |c| c.name);
            format!(
                "as the {} shape (sequence column BIGINT {sequence}): {}",
                kind.name(),
                problems.join("; ")
            )
        };
        let message = match (has_bigint("id"), has_bigint("pk_entity_change_log")) {
            (true, false) => format!(
                "{TABLE} does not fit {}",
                describe(ShapeKind::Envelope, &envelope_problems)
            ),
            (false, true) => format!(
                "{TABLE} does not fit {}",
                describe(ShapeKind::Split, &split_problems)
            ),
            _ => format!(
                "{TABLE} fits neither known shape; {}; {}",
                describe(ShapeKind::Envelope, &envelope_problems),
                describe(ShapeKind::Split, &split_problems)
            ),
        };
        Err(Error::ChangeLogShape(message))
    }

    /// The shape `kind` if `columns` fit it, else every problem found.
    fn check(kind: ShapeKind, columns: &[(String, String)]) -> Result<TableShape, Vec<String>> {
        let mut problems = Vec::new();
        let mut present = [false; SLOT_COUNT];
        for (slot, spec) in columns_of(kind).iter().enumerate() {
            let Some(spec) = spec else { continue };
            match columns.iter().find(|(name, _)| name == spec.name) {
                None if spec.required => problems.push(format!("missing column {}", spec.name)),
                None => {}
                Some((_, data_type)) if !spec.class.accepts(data_type) => problems.push(format!(
                    "column {} is {data_type}, expected {}",
                    spec.name,
                    spec.class.expected()
                )),
                Some(_) => present[slot] = true,
            }
        }
        if problems.is_empty() {
            Ok(TableShape { kind, present })
        } else {
            Err(problems)
        }
    }

    /// Which layout the table has.
    pub fn kind(&self) -> ShapeKind {
        self.kind
    }

    /// The BIGINT column holding the monotonic number: `"id"` (envelope shape) or
    /// `"pk_entity_change_log"` (split shape).
    pub fn sequence_column(&self) -> &'static str {
        match self.kind {
            ShapeKind::Envelope => "id",
            ShapeKind::Split => "pk_entity_change_log",
        }
    }

    /// The column holding the change's own UUID (the event id): `"pk_entity_change_log"`
    /// (envelope shape) or `"id"` (split shape).
    pub fn change_id_column(&self) -> &'static str {
        match self.kind {
            ShapeKind::Envelope => "pk_entity_change_log",
            ShapeKind::Split => "id",
        }
    }

    /// The SELECT list for the change log aliased `l`, in the order [`ChangeLogRow::from_row`]
    /// reads it: the sequence (bigint), then as text the change id, tenant, author, object_type,
    /// object_id, modification_type, change_status, object_data, object_data_before,
    /// extra_metadata, then created_at and the source commit time (timestamptz). A column the
    /// table lacks (or that its shape does not have) is `NULL::text` / `NULL::timestamptz`.
    /// No trailing comma: the caller may append its own columns after a comma.
    pub fn select_list(&self) -> String {
        let columns = columns_of(self.kind);
        let mut list = String::with_capacity(512);
        for (slot, (alias, timestamp)) in SLOTS.iter().enumerate() {
            if slot > 0 {
                list.push_str(", ");
            }
            let expression = match columns[slot] {
                Some(spec) if self.present[slot] => match spec.class {
                    TypeClass::Bigint | TypeClass::Timestamptz => format!("l.{}", spec.name),
                    _ => format!("l.{}::text", spec.name),
                },
                _ if *timestamp => "NULL::timestamptz".to_string(),
                _ => "NULL::text".to_string(),
            };
            list.push_str(&expression);
            list.push_str(" AS ");
            list.push_str(alias);
        }
        list
    }
}

/// Why one change-log row could not become an event. The reason names the column and, for ids
/// and operation codes, the offending value (cut to 64 characters); it never quotes payload JSON
/// (only the parser's line and column), so it is safe to log and to store with the quarantined row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct DecodeError {
    pub reason: String,
}

impl DecodeError {
    fn new(reason: impl Into<String>) -> Self {
        DecodeError {
            reason: reason.into(),
        }
    }
}

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
    pub fn from_row(row: &tokio_postgres::Row) -> Result<ChangeLogRow, DecodeError> {
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
        Ok(ChangeLogRow {
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
    /// Like [`ChangeLogRow::from_row`], borrowing from `row`.
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

/// Turn one change-log row into an event.
///
/// * `id` is the change id column parsed as a UUID (missing or invalid: error; never random);
///   `sequence` is the row's; `position` is the one given.
/// * Envelope shape: `object_data` must be a JSON object with a string `op`: `c` Created,
///   `u` Updated, `d` Deleted, `r` Custom; any other value, or none, is an error ("unknown
///   operation 't'"). `modification_type` (matched case-insensitively), when present:
///   `NOOP`/`CUSTOM`/`READ` make the event Custom whichever valid op the envelope has;
///   `INSERT`/`UPDATE`/`DELETE` must agree with the op (`c`/`u`/`d`), else error; any other
///   value is an error. `before`/`after` come from the envelope (missing or JSON null: none).
///   `source` is the envelope's `source` (must be an object when present), and `source_ts` is
///   `source.ts_us` (microseconds) or else `source.ts_ms` (milliseconds); a fractional number
///   (as `extract(epoch ...) * 1000` produces) keeps its microseconds, a non-number is an error.
/// * Split shape: `modification_type` decides (`INSERT`/`UPDATE`/`DELETE`; `CUSTOM`/`NOOP`/
///   `READ` are Custom; anything else or NULL is an error); `after` is `object_data`, `before`
///   is `object_data_before`; `source` is none and `source_ts` is `commit_time`.
/// * A Created or Updated event must have an after-image; a Deleted one may lack its
///   before-image (its data is then null). Images, when present, must be JSON objects. An image
///   the operation does not need (a `before` on a create) is kept as it is.
/// * `entity_type` is `object_type` (required, not blank); `entity_id` is `object_id` parsed as a
///   UUID (required; the nil UUID of a conflict row is a valid UUID); `tenant` is the tenant
///   column parsed as a UUID when not NULL (never taken from the payload); `author` is the
///   author column's text; `change_status` is the column or `""`; `extra_metadata` is the parsed
///   column, `{}` when the column is missing, NULL or JSON null (invalid JSON: error).
/// * `changes`: Created: every field of `after` as new; Deleted with a before-image: every field
///   as removed; Updated/Custom with both images: their difference; anything else: `None`
///   ("cannot tell", not "nothing changed").
/// * `created_at` is the column, or `source_ts` when the column is NULL or missing; with neither,
///   error.
///
/// Each JSON text is parsed once and its parts are moved, not cloned, into the event.
///
/// `row` is a [`ChangeLogRow`] or a [`ChangeLogRowRef`] (by reference); both decode the same.
pub fn decode<'a>(
    shape: &TableShape,
    row: impl Into<ChangeLogRowRef<'a>>,
    position: Position,
) -> Result<EntityEvent, DecodeError> {
    let row = row.into();
    let id = required_uuid(shape.change_id_column(), row.change_id)?;
    let entity_type = match row.object_type {
        Some(t) if !t.trim().is_empty() => t.to_string(),
        Some(_) => return Err(DecodeError::new("object_type is empty")),
        None => return Err(DecodeError::new("object_type is NULL")),
    };
    let entity_id = required_uuid("object_id", row.object_id)?;
    let tenant = match row.tenant {
        None => None,
        Some(text) => Some(parse_uuid(tenant_column(shape.kind), text)?),
    };
    let modification = row.modification_type.map(modification_kind).transpose()?;

    let images = match shape.kind {
        ShapeKind::Envelope => envelope_images(&row, modification)?,
        ShapeKind::Split => split_images(&row, modification)?,
    };
    let Images {
        kind,
        before,
        after,
        source,
        source_ts,
    } = images;

    match kind {
        EventKind::Created if after.is_none() => {
            return Err(DecodeError::new(
                "a create (INSERT, op 'c') has no after-image",
            ))
        }
        EventKind::Updated if after.is_none() => {
            return Err(DecodeError::new(
                "an update (UPDATE, op 'u') has no after-image",
            ))
        }
        _ => {}
    }

    let empty = Value::Object(Map::new());
    let changes = match (kind, &before, &after) {
        (EventKind::Created, _, Some(after)) => Some(diff_fields(&empty, after)),
        (EventKind::Deleted, Some(before), _) => Some(diff_fields(before, &empty)),
        (EventKind::Updated | EventKind::Custom, Some(before), Some(after)) => {
            Some(diff_fields(before, after))
        }
        _ => None,
    };

    let extra_metadata = match row.extra_metadata {
        None => empty,
        Some(text) => match parse_json("extra_metadata", text)? {
            Value::Null => empty,
            value => value,
        },
    };

    let created_at = row.created_at.or(source_ts).ok_or_else(|| {
        DecodeError::new("created_at is NULL and the row carries no source timestamp")
    })?;

    Ok(EntityEvent {
        id,
        sequence: row.sequence,
        kind,
        entity_type,
        entity_id,
        tenant,
        author: row.author.map(str::to_string),
        before,
        after,
        changes,
        change_status: row.change_status.unwrap_or_default().to_string(),
        extra_metadata,
        source,
        created_at,
        source_ts,
        position,
    })
}

/// What the shape-specific part of decoding yields.
struct Images {
    kind: EventKind,
    before: Option<Value>,
    after: Option<Value>,
    source: Option<Value>,
    source_ts: Option<DateTime<Utc>>,
}

fn envelope_images(
    row: &ChangeLogRowRef<'_>,
    modification: Option<EventKind>,
) -> Result<Images, DecodeError> {
    let text = row
        .object_data
        .ok_or_else(|| DecodeError::new("object_data is NULL"))?;
    let mut envelope = match parse_json("object_data", text)? {
        Value::Object(map) => map,
        other => {
            return Err(DecodeError::new(format!(
                "object_data is not a JSON object (found {})",
                json_type(&other)
            )))
        }
    };
    let op = match envelope.remove("op") {
        None | Some(Value::Null) => {
            return Err(DecodeError::new(
                "unknown operation: the envelope has no 'op'",
            ))
        }
        Some(Value::String(op)) => op,
        Some(other) => {
            return Err(DecodeError::new(format!(
                "unknown operation: 'op' is {}",
                json_type(&other)
            )))
        }
    };
    let op_kind = match op.as_str() {
        "c" => EventKind::Created,
        "u" => EventKind::Updated,
        "d" => EventKind::Deleted,
        "r" => EventKind::Custom,
        other => {
            return Err(DecodeError::new(format!(
                "unknown operation {}",
                quoted(other)
            )))
        }
    };
    let kind = match modification {
        None => op_kind,
        Some(EventKind::Custom) => EventKind::Custom,
        Some(kind) if kind == op_kind => kind,
        Some(_) => {
            return Err(DecodeError::new(format!(
                "modification_type {} disagrees with the envelope's operation {}",
                quoted(row.modification_type.unwrap_or_default()),
                quoted(&op)
            )))
        }
    };
    let before = image("the envelope's 'before'", envelope.remove("before"))?;
    let after = image("the envelope's 'after'", envelope.remove("after"))?;
    let source = image("the envelope's 'source'", envelope.remove("source"))?;
    let source_ts = match &source {
        Some(source) => source_timestamp(source)?,
        None => None,
    };
    Ok(Images {
        kind,
        before,
        after,
        source,
        source_ts,
    })
}

fn split_images(
    row: &ChangeLogRowRef<'_>,
    modification: Option<EventKind>,
) -> Result<Images, DecodeError> {
    let kind = modification.ok_or_else(|| DecodeError::new("modification_type is NULL"))?;
    let parse_image = |column: &str, text: Option<&str>| match text {
        None => Ok(None),
        Some(text) => image(column, Some(parse_json(column, text)?)),
    };
    Ok(Images {
        kind,
        before: parse_image("object_data_before", row.object_data_before)?,
        after: parse_image("object_data", row.object_data)?,
        source: None,
        source_ts: row.commit_time,
    })
}

/// `modification_type` (case-insensitive) as the kind it implies.
fn modification_kind(text: &str) -> Result<EventKind, DecodeError> {
    const KINDS: [(&str, EventKind); 6] = [
        ("INSERT", EventKind::Created),
        ("UPDATE", EventKind::Updated),
        ("DELETE", EventKind::Deleted),
        ("NOOP", EventKind::Custom),
        ("CUSTOM", EventKind::Custom),
        ("READ", EventKind::Custom),
    ];
    KINDS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(text))
        .map(|(_, kind)| *kind)
        .ok_or_else(|| DecodeError::new(format!("unknown modification_type {}", quoted(text))))
}

fn tenant_column(kind: ShapeKind) -> &'static str {
    match kind {
        ShapeKind::Envelope => "fk_customer_org",
        ShapeKind::Split => "tenant_id",
    }
}

fn required_uuid(column: &str, text: Option<&str>) -> Result<Uuid, DecodeError> {
    match text {
        Some(text) => parse_uuid(column, text),
        None => Err(DecodeError::new(format!("{column} is NULL"))),
    }
}

fn parse_uuid(column: &str, text: &str) -> Result<Uuid, DecodeError> {
    Uuid::parse_str(text)
        .map_err(|_| DecodeError::new(format!("{column} is not a UUID: {}", quoted(text))))
}

fn parse_json(column: &str, text: &str) -> Result<Value, DecodeError> {
    serde_json::from_str(text)
        .map_err(|e| DecodeError::new(format!("{column} is not valid JSON: {e}")))
}

/// An image (or the `source` block): missing or JSON null is none, an object is kept, anything
/// else is an error.
fn image(what: &str, value: Option<Value>) -> Result<Option<Value>, DecodeError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(object @ Value::Object(_)) => Ok(Some(object)),
        Some(other) => Err(DecodeError::new(format!(
            "{what} is not a JSON object (found {})",
            json_type(&other)
        ))),
    }
}

/// `source.ts_us`, else `source.ts_ms`, as a time; none when neither is there (or both are null).
fn source_timestamp(source: &Value) -> Result<Option<DateTime<Utc>>, DecodeError> {
    for (field, micros_per_unit) in [("ts_us", 1_i64), ("ts_ms", 1000)] {
        let micros = match source.get(field) {
            None | Some(Value::Null) => continue,
            Some(Value::Number(n)) => match n.as_i64() {
                Some(whole) => whole.checked_mul(micros_per_unit),
                // A fraction (or a number beyond i64, which then saturates and is out of range).
                None => n
                    .as_f64()
                    .filter(|f| f.is_finite())
                    .map(|f| (f * micros_per_unit as f64).round() as i64),
            },
            Some(other) => {
                return Err(DecodeError::new(format!(
                    "source.{field} is not a number (found {})",
                    json_type(other)
                )))
            }
        };
        return micros
            .and_then(DateTime::from_timestamp_micros)
            .map(Some)
            .ok_or_else(|| DecodeError::new(format!("source.{field} is out of range")));
    }
    Ok(None)
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `'text'`, cut to 64 characters, for error messages.
fn quoted(text: &str) -> String {
    const LIMIT: usize = 64;
    match text.char_indices().nth(LIMIT) {
        Some((end, _)) => format!("'{}...'", &text[..end]),
        None => format!("'{text}'"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CHANGE_ID: &str = "00000000-0000-0000-0000-00000000c0de";
    const ENTITY: &str = "550e8400-e29b-41d4-a716-446655440000";
    const TENANT: &str = "550e8400-e29b-41d4-a716-446655440001";

    fn cols(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect()
    }

    fn envelope_columns() -> Vec<(String, String)> {
        cols(&[
            ("id", "bigint"),
            ("pk_entity_change_log", "uuid"),
            ("fk_customer_org", "uuid"),
            ("fk_contact", "uuid"),
            ("object_type", "text"),
            ("object_id", "uuid"),
            ("modification_type", "text"),
            ("change_status", "text"),
            ("object_data", "jsonb"),
            ("extra_metadata", "jsonb"),
            ("created_at", "timestamp with time zone"),
            ("txid", "xid8"),
        ])
    }

    fn split_columns() -> Vec<(String, String)> {
        cols(&[
            ("pk_entity_change_log", "bigint"),
            ("id", "uuid"),
            ("tenant_id", "uuid"),
            ("fk_customer_org", "bigint"),
            ("fk_contact", "bigint"),
            ("object_type", "text"),
            ("object_id", "uuid"),
            ("modification_type", "text"),
            ("change_status", "text"),
            ("object_data", "jsonb"),
            ("object_data_before", "jsonb"),
            ("extra_metadata", "jsonb"),
            ("created_at", "timestamp with time zone"),
            ("commit_time", "timestamp with time zone"),
            ("seq", "bigint"),
            ("txid", "xid8"),
        ])
    }

    fn envelope_shape() -> TableShape {
        TableShape::from_columns(&envelope_columns()).unwrap()
    }

    fn split_shape() -> TableShape {
        TableShape::from_columns(&split_columns()).unwrap()
    }

    fn at(micros: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(micros).unwrap()
    }

    fn row(modification_type: &str, object_data: Value) -> ChangeLogRow {
        ChangeLogRow {
            sequence: 7,
            change_id: Some(CHANGE_ID.into()),
            tenant: Some(TENANT.into()),
            author: Some("author-1".into()),
            object_type: Some("User".into()),
            object_id: Some(ENTITY.into()),
            modification_type: Some(modification_type.into()),
            change_status: Some("updated".into()),
            object_data: Some(object_data.to_string()),
            object_data_before: None,
            extra_metadata: Some(r#"{"k":"v"}"#.into()),
            created_at: Some(at(1_704_067_200_123_456)),
            commit_time: None,
        }
    }

    fn position() -> Position {
        Position {
            batch: 3,
            sequence: 7,
        }
    }

    fn decode_envelope(row: &ChangeLogRow) -> Result<EntityEvent, DecodeError> {
        decode(&envelope_shape(), row, position())
    }

    fn reason(result: Result<EntityEvent, DecodeError>) -> String {
        result.expect_err("the row must not decode").reason
    }

    #[test]
    fn envelope_update_decodes_every_field() {
        let row = row(
            "UPDATE",
            json!({"op": "u", "before": {"email": "a", "n": 1}, "after": {"email": "b", "n": 1},
                   "source": {"table": "tb_user", "ts_ms": 1_704_067_200_000_i64}}),
        );
        let event = decode_envelope(&row).unwrap();
        assert_eq!(event.id, Uuid::parse_str(CHANGE_ID).unwrap());
        assert_eq!(event.sequence, 7);
        assert_eq!(event.position, position());
        assert_eq!(event.kind, EventKind::Updated);
        assert_eq!(event.entity_type, "User");
        assert_eq!(event.entity_id, Uuid::parse_str(ENTITY).unwrap());
        assert_eq!(event.tenant, Some(Uuid::parse_str(TENANT).unwrap()));
        assert_eq!(event.author.as_deref(), Some("author-1"));
        assert_eq!(event.before, Some(json!({"email": "a", "n": 1})));
        assert_eq!(event.after, Some(json!({"email": "b", "n": 1})));
        let changes = event.changes.unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].field, "email");
        assert_eq!(event.change_status, "updated");
        assert_eq!(event.extra_metadata, json!({"k": "v"}));
        assert_eq!(
            event.source,
            Some(json!({"table": "tb_user", "ts_ms": 1_704_067_200_000_i64}))
        );
        assert_eq!(event.source_ts, Some(at(1_704_067_200_000_000)));
        assert_eq!(event.created_at, at(1_704_067_200_123_456));
    }

    #[test]
    fn each_op_maps_to_its_kind() {
        let cases = [
            ("INSERT", "c", EventKind::Created),
            ("UPDATE", "u", EventKind::Updated),
            ("DELETE", "d", EventKind::Deleted),
            ("NOOP", "r", EventKind::Custom),
        ];
        for (modification, op, kind) in cases {
            let r = row(
                modification,
                json!({"op": op, "before": {"a": 1}, "after": {"a": 1}}),
            );
            assert_eq!(decode_envelope(&r).unwrap().kind, kind, "op {op}");
            let mut without_type = r.clone();
            without_type.modification_type = None;
            assert_eq!(
                decode_envelope(&without_type).unwrap().kind,
                kind,
                "op {op}"
            );
        }
    }

    #[test]
    fn unknown_or_missing_op_is_an_error() {
        for op in ["t", "m", "", "C"] {
            let r = row("UPDATE", json!({"op": op, "after": {}}));
            assert_eq!(
                reason(decode_envelope(&r)),
                format!("unknown operation '{op}'")
            );
        }
        let r = row("UPDATE", json!({"after": {}}));
        assert!(reason(decode_envelope(&r)).contains("no 'op'"));
        let r = row("UPDATE", json!({"op": 1, "after": {}}));
        assert!(reason(decode_envelope(&r)).contains("unknown operation"));
        // NOOP does not excuse an unknown operation.
        let r = row("NOOP", json!({"op": "t", "after": {}}));
        assert_eq!(reason(decode_envelope(&r)), "unknown operation 't'");
    }

    #[test]
    fn op_disagreeing_with_modification_type_is_an_error() {
        for (modification, op) in [
            ("INSERT", "u"),
            ("UPDATE", "c"),
            ("DELETE", "u"),
            ("INSERT", "r"),
        ] {
            let r = row(
                modification,
                json!({"op": op, "before": {"a": 1}, "after": {"a": 2}}),
            );
            let reason = reason(decode_envelope(&r));
            assert!(
                reason.contains("disagrees"),
                "{modification}/{op}: {reason}"
            );
        }
        let r = row("MERGE", json!({"op": "u", "after": {}}));
        assert_eq!(
            reason(decode_envelope(&r)),
            "unknown modification_type 'MERGE'"
        );
    }

    #[test]
    fn noop_is_custom_whatever_the_op() {
        for op in ["c", "u", "d", "r"] {
            let r = row(
                "NOOP",
                json!({"op": op, "before": {"a": 1}, "after": {"a": 1}}),
            );
            let event = decode_envelope(&r).unwrap();
            assert_eq!(event.kind, EventKind::Custom, "op {op}");
            assert_eq!(event.changes, Some(vec![]));
        }
        // A conflict row: nil object id, no images at all.
        let mut r = row("noop", json!({"op": "r", "before": null, "after": null}));
        r.object_id = Some(Uuid::nil().to_string());
        r.change_status = Some("conflict:duplicate".into());
        let event = decode_envelope(&r).unwrap();
        assert_eq!(event.kind, EventKind::Custom);
        assert_eq!(event.entity_id, Uuid::nil());
        assert_eq!(event.changes, None);
        assert_eq!(event.data(), &Value::Null);
    }

    #[test]
    fn broken_json_is_an_error_that_does_not_quote_the_payload() {
        let mut r = row("UPDATE", json!({}));
        r.object_data = Some(r#"{"op": "u", "after": {"secret": "hunter2""#.into());
        let reason = reason(decode_envelope(&r));
        assert!(
            reason.starts_with("object_data is not valid JSON"),
            "{reason}"
        );
        assert!(!reason.contains("hunter2"), "{reason}");

        let mut r = row("UPDATE", json!({"op": "u", "after": {}}));
        r.extra_metadata = Some("{nope".into());
        assert!(reason_of(&r).starts_with("extra_metadata is not valid JSON"));

        let mut r = row("UPDATE", json!({}));
        r.object_data = None;
        assert_eq!(reason_of(&r), "object_data is NULL");
    }

    fn reason_of(r: &ChangeLogRow) -> String {
        reason(decode_envelope(r))
    }

    #[test]
    fn non_object_envelope_and_images_are_errors() {
        let r = row("UPDATE", json!([1, 2]));
        assert_eq!(
            reason_of(&r),
            "object_data is not a JSON object (found an array)"
        );
        let r = row("UPDATE", json!({"op": "u", "before": "x", "after": {}}));
        assert_eq!(
            reason_of(&r),
            "the envelope's 'before' is not a JSON object (found a string)"
        );
        let r = row("UPDATE", json!({"op": "u", "after": [1]}));
        assert!(reason_of(&r).contains("'after' is not a JSON object"));
        let r = row("UPDATE", json!({"op": "u", "after": {}, "source": "pg"}));
        assert!(reason_of(&r).contains("'source' is not a JSON object"));
    }

    #[test]
    fn non_uuid_ids_are_errors() {
        let mut r = row("INSERT", json!({"op": "c", "after": {}}));
        r.object_id = Some("abc".into());
        assert_eq!(reason_of(&r), "object_id is not a UUID: 'abc'");

        let mut r = row("INSERT", json!({"op": "c", "after": {}}));
        r.change_id = Some("42".into());
        assert_eq!(reason_of(&r), "pk_entity_change_log is not a UUID: '42'");

        let mut r = row("INSERT", json!({"op": "c", "after": {}}));
        r.change_id = None;
        assert_eq!(reason_of(&r), "pk_entity_change_log is NULL");

        let mut r = row("INSERT", json!({"op": "c", "after": {}}));
        r.tenant = Some("acme".into());
        assert_eq!(reason_of(&r), "fk_customer_org is not a UUID: 'acme'");

        let mut r = row("INSERT", json!({"op": "c", "after": {}}));
        r.object_id = Some("x".repeat(100));
        let reason = reason_of(&r);
        assert!(reason.ends_with("...'") && reason.len() < 110, "{reason}");
    }

    #[test]
    fn missing_tenant_author_status_and_metadata_are_none_or_defaults() {
        let mut r = row("INSERT", json!({"op": "c", "after": {"a": 1}}));
        r.tenant = None;
        r.author = None;
        r.change_status = None;
        r.extra_metadata = None;
        let event = decode_envelope(&r).unwrap();
        assert_eq!(event.tenant, None);
        assert_eq!(event.author, None);
        assert_eq!(event.change_status, "");
        assert_eq!(event.extra_metadata, json!({}));

        r.extra_metadata = Some("null".into());
        assert_eq!(decode_envelope(&r).unwrap().extra_metadata, json!({}));
    }

    #[test]
    fn object_type_is_required() {
        let mut r = row("INSERT", json!({"op": "c", "after": {}}));
        r.object_type = Some("  ".into());
        assert_eq!(reason_of(&r), "object_type is empty");
        r.object_type = None;
        assert_eq!(reason_of(&r), "object_type is NULL");
    }

    #[test]
    fn create_and_update_need_an_after_image_delete_does_not_need_a_before_image() {
        let r = row("INSERT", json!({"op": "c", "before": null, "after": null}));
        assert!(reason_of(&r).contains("no after-image"));
        let r = row("UPDATE", json!({"op": "u", "before": {"a": 1}}));
        assert!(reason_of(&r).contains("no after-image"));

        let r = row("DELETE", json!({"op": "d", "before": null, "after": null}));
        let event = decode_envelope(&r).unwrap();
        assert_eq!(event.kind, EventKind::Deleted);
        assert_eq!(event.changes, None);
        assert_eq!(event.data(), &Value::Null);
    }

    #[test]
    fn changes_follow_the_kind() {
        let created = decode_envelope(&row(
            "INSERT",
            json!({"op": "c", "after": {"a": 1, "b": 2}}),
        ))
        .unwrap()
        .changes
        .unwrap();
        assert_eq!(created.len(), 2);
        assert!(created.iter().all(|c| c.old.is_none() && c.new.is_some()));

        let deleted = decode_envelope(&row("DELETE", json!({"op": "d", "before": {"a": 1}})))
            .unwrap()
            .changes
            .unwrap();
        assert_eq!(deleted.len(), 1);
        assert_eq!(deleted[0].old, Some(json!(1)));
        assert_eq!(deleted[0].new, None);

        // An update without a pre-image cannot tell what changed: None, not Some(vec![]).
        let update =
            decode_envelope(&row("UPDATE", json!({"op": "u", "after": {"a": 1}}))).unwrap();
        assert_eq!(update.changes, None);
        assert!(update.field_change("a").is_err());

        let same = decode_envelope(&row(
            "UPDATE",
            json!({"op": "u", "before": {"a": 1}, "after": {"a": 1}}),
        ))
        .unwrap();
        assert_eq!(same.changes, Some(vec![]));
    }

    #[test]
    fn source_ts_prefers_micros_then_millis() {
        let with = |source: Value| {
            let r = row("INSERT", json!({"op": "c", "after": {}, "source": source}));
            decode_envelope(&r)
        };
        let both =
            with(json!({"ts_us": 1_704_067_200_123_457_i64, "ts_ms": 1_704_067_200_999_i64}));
        assert_eq!(both.unwrap().source_ts, Some(at(1_704_067_200_123_457)));
        let millis = with(json!({"ts_ms": 1_704_067_200_123_i64}));
        assert_eq!(millis.unwrap().source_ts, Some(at(1_704_067_200_123_000)));
        let null_micros = with(json!({"ts_us": null, "ts_ms": 1_704_067_200_123_i64}));
        assert_eq!(
            null_micros.unwrap().source_ts,
            Some(at(1_704_067_200_123_000))
        );
        let fractional = with(json!({"ts_ms": 1_704_067_200_123.457}));
        assert_eq!(
            fractional.unwrap().source_ts,
            Some(at(1_704_067_200_123_457))
        );
        assert_eq!(with(json!({"table": "t"})).unwrap().source_ts, None);
        assert!(reason(with(json!({"ts_ms": "1704067200000"})))
            .contains("source.ts_ms is not a number"));
        assert!(reason(with(json!({"ts_us": i64::MAX}))).contains("out of range"));
        assert!(reason(with(json!({"ts_ms": i64::MAX}))).contains("out of range"));
    }

    #[test]
    fn created_at_falls_back_to_source_ts_and_is_required() {
        let mut r = row(
            "INSERT",
            json!({"op": "c", "after": {}, "source": {"ts_us": 1_704_067_200_000_001_i64}}),
        );
        r.created_at = None;
        assert_eq!(
            decode_envelope(&r).unwrap().created_at,
            at(1_704_067_200_000_001)
        );
        let mut r = row("INSERT", json!({"op": "c", "after": {}}));
        r.created_at = None;
        assert!(reason_of(&r).starts_with("created_at is NULL"));
    }

    #[test]
    fn split_shape_decodes_from_modification_type_and_separate_images() {
        let shape = split_shape();
        let mut r = row("update", json!({"a": 2}));
        r.object_data_before = Some(json!({"a": 1}).to_string());
        r.commit_time = Some(at(1_704_067_200_000_042));
        let event = decode(&shape, &r, position()).unwrap();
        assert_eq!(event.kind, EventKind::Updated);
        assert_eq!(event.before, Some(json!({"a": 1})));
        assert_eq!(event.after, Some(json!({"a": 2})));
        assert_eq!(event.source, None);
        assert_eq!(event.source_ts, Some(at(1_704_067_200_000_042)));
        assert_eq!(event.changes.unwrap().len(), 1);

        for (modification, kind) in [
            ("CUSTOM", EventKind::Custom),
            ("READ", EventKind::Custom),
            ("NOOP", EventKind::Custom),
            ("INSERT", EventKind::Created),
        ] {
            let r = row(modification, json!({"a": 1}));
            assert_eq!(decode(&shape, &r, position()).unwrap().kind, kind);
        }

        let mut delete = row("DELETE", json!({}));
        delete.object_data = None;
        delete.object_data_before = Some(json!({"a": 1}).to_string());
        let event = decode(&shape, &delete, position()).unwrap();
        assert_eq!(event.kind, EventKind::Deleted);
        assert_eq!(event.after, None);
        assert_eq!(event.data(), &json!({"a": 1}));

        let mut r = row("UPSERT", json!({}));
        assert_eq!(
            reason(decode(&shape, &r, position())),
            "unknown modification_type 'UPSERT'"
        );
        r.modification_type = None;
        assert_eq!(
            reason(decode(&shape, &r, position())),
            "modification_type is NULL"
        );

        let mut r = row("INSERT", json!({}));
        r.object_data = None;
        assert!(reason(decode(&shape, &r, position())).contains("no after-image"));
        r.object_data = Some("\"x\"".into());
        assert_eq!(
            reason(decode(&shape, &r, position())),
            "object_data is not a JSON object (found a string)"
        );
        let mut r = row("INSERT", json!({}));
        r.change_id = Some("1".into());
        r.tenant = Some("2".into());
        assert_eq!(
            reason(decode(&shape, &r, position())),
            "id is not a UUID: '1'"
        );
        r.change_id = Some(CHANGE_ID.into());
        assert_eq!(
            reason(decode(&shape, &r, position())),
            "tenant_id is not a UUID: '2'"
        );
    }

    #[test]
    fn shapes_are_detected_from_their_columns() {
        let envelope = envelope_shape();
        assert_eq!(envelope.kind(), ShapeKind::Envelope);
        assert_eq!(envelope.sequence_column(), "id");
        assert_eq!(envelope.change_id_column(), "pk_entity_change_log");
        let list = envelope.select_list();
        assert!(list.starts_with("l.id AS sequence, l.pk_entity_change_log::text AS change_id, l.fk_customer_org::text AS tenant"), "{list}");
        assert!(list.contains("NULL::text AS object_data_before"), "{list}");
        assert!(
            list.ends_with("l.created_at AS created_at, NULL::timestamptz AS commit_time"),
            "{list}"
        );

        let split = split_shape();
        assert_eq!(split.kind(), ShapeKind::Split);
        assert_eq!(split.sequence_column(), "pk_entity_change_log");
        let list = split.select_list();
        assert!(list.starts_with("l.pk_entity_change_log AS sequence, l.id::text AS change_id, l.tenant_id::text AS tenant, l.fk_contact::text AS author"), "{list}");
        assert!(
            list.contains("l.object_data_before::text AS object_data_before"),
            "{list}"
        );
        assert!(list.ends_with("l.commit_time AS commit_time"), "{list}");
        assert_eq!(list.split(", ").count(), SLOT_COUNT);
    }

    #[test]
    fn optional_columns_may_be_missing_and_text_or_json_types_are_accepted() {
        let minimal = cols(&[
            ("id", "bigint"),
            ("pk_entity_change_log", "text"),
            ("object_type", "character varying"),
            ("object_id", "text"),
            ("object_data", "text"),
        ]);
        let shape = TableShape::from_columns(&minimal).unwrap();
        assert_eq!(shape.kind(), ShapeKind::Envelope);
        assert_eq!(
            shape.select_list(),
            "l.id AS sequence, l.pk_entity_change_log::text AS change_id, NULL::text AS tenant, \
             NULL::text AS author, l.object_type::text AS object_type, l.object_id::text AS object_id, \
             NULL::text AS modification_type, NULL::text AS change_status, \
             l.object_data::text AS object_data, NULL::text AS object_data_before, \
             NULL::text AS extra_metadata, NULL::timestamptz AS created_at, \
             NULL::timestamptz AS commit_time"
        );
        let mut json = minimal.clone();
        json[4].1 = "json".into();
        assert!(TableShape::from_columns(&json).is_ok());
    }

    fn shape_error(columns: &[(String, String)]) -> String {
        match TableShape::from_columns(columns) {
            Err(Error::ChangeLogShape(message)) => message,
            other => panic!("expected a shape error, got {other:?}"),
        }
    }

    #[test]
    fn shape_error_names_missing_and_mistyped_columns() {
        let mut columns = envelope_columns();
        columns.retain(|(n, _)| n != "object_data" && n != "object_type");
        columns.iter_mut().for_each(|(n, t)| {
            if n == "object_id" {
                *t = "bigint".into();
            }
            if n == "created_at" {
                *t = "timestamp without time zone".into();
            }
        });
        let message = shape_error(&columns);
        assert!(message.contains("as the envelope shape"), "{message}");
        assert!(!message.contains("split"), "{message}");
        assert!(message.contains("missing column object_type"), "{message}");
        assert!(message.contains("missing column object_data"), "{message}");
        assert!(
            message.contains("column object_id is bigint, expected uuid or text"),
            "{message}"
        );
        assert!(
            message.contains("column created_at is timestamp without time zone"),
            "{message}"
        );

        let mut columns = split_columns();
        columns.retain(|(n, _)| n != "modification_type");
        let message = shape_error(&columns);
        assert!(message.contains("as the split shape"), "{message}");
        assert!(
            message.contains("missing column modification_type"),
            "{message}"
        );

        // Neither sequence column: both shapes are explained.
        let message = shape_error(&cols(&[("id", "uuid"), ("object_type", "text")]));
        assert!(message.contains("fits neither known shape"), "{message}");
        assert!(message.contains("as the envelope shape (sequence column BIGINT id): column id is uuid, expected bigint"), "{message}");
        assert!(message.contains("as the split shape (sequence column BIGINT pk_entity_change_log): missing column pk_entity_change_log"), "{message}");

        let message = shape_error(&[]);
        assert!(message.contains("does not exist"), "{message}");
    }
}
