//! One change-log row -> one [`EntityEvent`]: the values parsed, the operation decided, the
//! images checked. Pure.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::row::ChangeLogRowRef;
use super::shape::{ShapeKind, TableShape};
#[cfg(doc)]
use super::ChangeLogRow;
use crate::delivery::stored::DECODE_DEPTH;
use crate::event::{sorted_fields, EntityEvent, EventKind, Image, Position};
use crate::json_scan::{object_fields_by_serde, scan_json, scan_object, ObjectScan};

/// Why one change-log row could not become an event. The reason names the column and, for ids
/// and operation codes, the offending value (cut to 64 characters); it never quotes payload JSON
/// (only the parser's line and column), so it is safe to log and to store with the quarantined row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct DecodeError {
    pub reason: String,
}

impl DecodeError {
    pub(super) fn new(reason: impl Into<String>) -> Self {
        DecodeError {
            reason: reason.into(),
        }
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
/// * The images are checked (valid JSON, objects, nested at most [`DECODE_DEPTH`] levels,
///   numbers serde_json reads) and kept as text: they are parsed only when something needs
///   their values ([`Image`]), and the changes are computed when asked
///   ([`EntityEvent::changes`]).
/// * `created_at` is the column, or `source_ts` when the column is NULL or missing; with neither,
///   error.
///
/// The envelope's parts are sliced out of its text, not parsed into values and moved.
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
        Some(text) => Some(parse_uuid(tenant_column(shape.kind()), text)?),
    };
    let modification = row.modification_type.map(modification_kind).transpose()?;

    let images = match shape.kind() {
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
    before: Option<Image>,
    after: Option<Image>,
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
    // One byte scan checks the envelope (images included) and finds its fields; serde_json
    // reads what the scan leaves to it, and words every error.
    let fields = match scan_object(text) {
        Some(scan) => checked("object_data", text, scan)?.fields,
        None => {
            check_json("object_data", text)?;
            match object_fields_by_serde(text) {
                Ok(fields) => fields,
                Err(_) => {
                    let raw: &RawValue = serde_json::from_str(text).map_err(|e| {
                        DecodeError::new(format!("object_data is not valid JSON: {e}"))
                    })?;
                    return Err(DecodeError::new(format!(
                        "object_data is not a JSON object (found {})",
                        raw_type(raw.get())
                    )));
                }
            }
        }
    };
    let envelope = sorted_fields(fields);
    let field = |name: &str| -> Option<&str> {
        envelope
            .binary_search_by(|(key, _)| key.as_ref().cmp(name))
            .ok()
            .map(|i| envelope[i].1)
    };
    let op: Cow<'_, str> = match field("op") {
        None => {
            return Err(DecodeError::new(
                "unknown operation: the envelope has no 'op'",
            ))
        }
        Some(raw) => match raw_type(raw) {
            "null" => {
                return Err(DecodeError::new(
                    "unknown operation: the envelope has no 'op'",
                ))
            }
            "a string" => serde_json::from_str(raw)
                .map_err(|e| DecodeError::new(format!("object_data is not valid JSON: {e}")))?,
            other => {
                return Err(DecodeError::new(format!(
                    "unknown operation: 'op' is {other}"
                )))
            }
        },
    };
    let op_kind = match op.as_ref() {
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
    let before = image("the envelope's 'before'", field("before"))?;
    let after = image("the envelope's 'after'", field("after"))?;
    let source = image("the envelope's 'source'", field("source"))?.map(Image::into_value);
    let source_ts = match &source {
        Some(source) => source_timestamp(source)?,
        None => None,
    };
    // A Debezium snapshot read (`op` 'r' with `source.snapshot`, as `backfill` writes) is a
    // Snapshot; FraiseQL's own 'r' rows (NOOP/CUSTOM/READ without it) stay Custom.
    let kind = if kind == EventKind::Custom && op == "r" && is_snapshot(source.as_ref()) {
        EventKind::Snapshot
    } else {
        kind
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
        Some(text) => match scan_object(text) {
            Some(scan) => Ok(Some(Image::from_text(
                checked(column, text, scan)?.object.into(),
            ))),
            None => {
                check_json(column, text)?;
                let raw: &RawValue = serde_json::from_str(text)
                    .map_err(|e| DecodeError::new(format!("{column} is not valid JSON: {e}")))?;
                image(column, Some(raw.get()))
            }
        },
    };
    Ok(Images {
        kind,
        before: parse_image("object_data_before", row.object_data_before)?,
        after: parse_image("object_data", row.object_data)?,
        source: None,
        source_ts: row.commit_time,
    })
}

/// Whether an envelope's `source` marks a snapshot read: `snapshot` is `true` or a string other
/// than `"false"` (Debezium writes `"true"`, `"first"`, `"last"`, `"incremental"`...).
fn is_snapshot(source: Option<&Value>) -> bool {
    match source.and_then(|s| s.get("snapshot")) {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => !s.is_empty() && s != "false",
        _ => false,
    }
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

/// An image (or the `source` block), as checked JSON text: missing or JSON null is none, an
/// object is kept, anything else is an error.
fn image(what: &str, raw: Option<&str>) -> Result<Option<Image>, DecodeError> {
    match raw.map(|raw| (raw, raw_type(raw))) {
        None | Some((_, "null")) => Ok(None),
        Some((raw, "an object")) => Ok(Some(Image::from_text(raw.into()))),
        Some((_, other)) => Err(DecodeError::new(format!(
            "{what} is not a JSON object (found {other})"
        ))),
    }
}

/// An object the scan accepted (valid JSON), checked for what [`parse_json`] would still refuse:
/// nesting deeper than serde_json's default limit, a number it cannot read (see [`check_json`]).
fn checked<'a>(
    column: &str,
    text: &str,
    scan: ObjectScan<'a>,
) -> Result<ObjectScan<'a>, DecodeError> {
    if scan.depth > DECODE_DEPTH || scan.long_number {
        parse_json(column, text)?;
    }
    Ok(scan)
}

/// What [`parse_json`] would refuse in a text whose values are only sliced, not parsed: invalid
/// JSON, nesting deeper than serde_json's default limit, a number serde_json cannot read (one
/// beyond f64's range: written with an exponent or 300 and more digits, which are parsed in
/// full to find out).
fn check_json(column: &str, text: &str) -> Result<(), DecodeError> {
    let scan = scan_json(text);
    if scan.depth > DECODE_DEPTH || scan.long_number {
        // serde_json's own parse, for its error (or to accept the text after all).
        parse_json(column, text)?;
    }
    Ok(())
}

/// The JSON type of a value's text (checked JSON: its first byte tells).
fn raw_type(text: &str) -> &'static str {
    match text.trim_start().as_bytes().first() {
        Some(b'n') => "null",
        Some(b't' | b'f') => "a boolean",
        Some(b'"') => "a string",
        Some(b'[') => "an array",
        Some(b'{') => "an object",
        _ => "a number",
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
