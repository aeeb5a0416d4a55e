//! `EntityEvent`: one committed change of one entity, as the observers see it. No I/O here.

use std::borrow::Cow;
use std::fmt;
use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use serde::de::Deserializer;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::json_scan::{object_fields_by_serde, scan_object, Fields};

/// What happened to the entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    /// Debezium `c`, `modification_type = 'INSERT'`.
    Created,
    /// Debezium `u`, `modification_type = 'UPDATE'`.
    Updated,
    /// Debezium `d`, `modification_type = 'DELETE'`.
    Deleted,
    /// Debezium `r` (a read of the current state with no change: FraiseQL's `NOOP` rows and
    /// `CUSTOM`/`READ` rows of the later table shape).
    Custom,
    /// Debezium `r` with `source.snapshot` set: a copy of a row that already existed, written by
    /// `backfill` (see [`crate::backfill`]). Observers receive it only when they list
    /// `"SNAPSHOT"`; search and cache actions treat it as an upsert.
    Snapshot,
}

impl EventKind {
    /// The name observers use in configuration (`event_type = "INSERT"`).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "INSERT",
            EventKind::Updated => "UPDATE",
            EventKind::Deleted => "DELETE",
            EventKind::Custom => "CUSTOM",
            EventKind::Snapshot => "SNAPSHOT",
        }
    }

    /// The Debezium operation code.
    pub fn op(self) -> &'static str {
        match self {
            EventKind::Created => "c",
            EventKind::Updated => "u",
            EventKind::Deleted => "d",
            EventKind::Custom | EventKind::Snapshot => "r",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One top-level field whose value differs between the before- and the after-image.
/// `old` is `None` when the field was absent before, `new` is `None` when it is absent after.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldChange {
    pub field: String,
    pub old: Option<Value>,
    pub new: Option<Value>,
}

/// [`FieldChange`] borrowing its values from the event's images.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FieldChangeRef<'a> {
    pub field: &'a str,
    pub old: Option<&'a Value>,
    pub new: Option<&'a Value>,
}

impl FieldChangeRef<'_> {
    /// An owned copy.
    pub fn to_owned(&self) -> FieldChange {
        FieldChange {
            field: self.field.to_string(),
            old: self.old.cloned(),
            new: self.new.cloned(),
        }
    }
}

/// One image of a row (`before` or `after`): a JSON object kept as the row's JSON text and
/// parsed only when something needs its values (a condition, a template, an action that reads
/// fields). The default webhook body copies the text as it is ([`Image::text`]).
///
/// Invariant: the text is one JSON object that serde_json parses (the parser checks this when
/// it decodes a row: [`Image::from_text`] is its only unchecked constructor).
pub struct Image {
    /// The text; empty only after a change through `DerefMut`, then written again from `value`.
    text: OnceLock<Box<str>>,
    /// The values; set on first use, or from the start for an image made of a value.
    value: OnceLock<Value>,
}

impl Image {
    /// An image from JSON text the caller has checked (see the invariant).
    pub(crate) fn from_text(text: Box<str>) -> Image {
        Image {
            text: OnceLock::from(text),
            value: OnceLock::new(),
        }
    }

    /// The image as JSON text (as the row had it: key order and spacing are the database's).
    pub fn text(&self) -> &str {
        self.text.get_or_init(|| {
            let value = self
                .value
                .get()
                .expect("an image holds its text or its value");
            serde_json::to_string(value)
                .expect("a JSON value serializes")
                .into_boxed_str()
        })
    }

    /// The image's values, parsed on first use.
    pub fn value(&self) -> &Value {
        self.value.get_or_init(|| {
            let text = self
                .text
                .get()
                .expect("an image holds its text or its value");
            parse_checked(text)
        })
    }

    /// The image's values, owned.
    pub fn into_value(self) -> Value {
        self.value();
        self.value.into_inner().expect("parsed above")
    }

    /// The image's top-level fields as JSON text, in key order, the last of a repeated key
    /// winning (as in a parsed map). Parses no value.
    pub fn fields(&self) -> Vec<(Cow<'_, str>, &str)> {
        top_level_fields(self.text()).unwrap_or_default()
    }
}

/// Parse JSON text that was checked when its row was decoded (valid, at most
/// [`crate::delivery::stored::DECODE_DEPTH`] levels deep, numbers in range).
fn parse_checked(text: &str) -> Value {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    deserializer.disable_recursion_limit();
    Value::deserialize(&mut deserializer).unwrap_or_else(|e| {
        // Unreachable by the invariant; an image is never a reason to panic.
        tracing::error!(error = %e, "an image checked at decode does not parse");
        Value::Null
    })
}

/// The top-level fields of a JSON object's text (values as their text), sorted by key, the last
/// of a repeated key kept. `None` when the text is not a JSON object. One byte scan
/// ([`scan_object`]); serde_json reads what the scan leaves to it.
pub(crate) fn top_level_fields(text: &str) -> Option<Fields<'_>> {
    let fields = match scan_object(text) {
        Some(scan) => scan.fields,
        None => object_fields_by_serde(text).ok()?,
    };
    Some(sorted_fields(fields))
}

/// Fields sorted by key, the last of a repeated key kept.
pub(crate) fn sorted_fields(mut fields: Fields<'_>) -> Fields<'_> {
    // A stable sort keeps repeated keys in text order; the last of each run wins.
    fields.sort_by(|a, b| a.0.cmp(&b.0));
    fields.dedup_by(|later, earlier| {
        if later.0 == earlier.0 {
            std::mem::swap(later, earlier);
            true
        } else {
            false
        }
    });
    fields
}

impl From<Value> for Image {
    /// An image of a value (its text is written when first asked for).
    fn from(value: Value) -> Image {
        Image {
            text: OnceLock::new(),
            value: OnceLock::from(value),
        }
    }
}

impl std::ops::Deref for Image {
    type Target = Value;
    fn deref(&self) -> &Value {
        self.value()
    }
}

impl std::ops::DerefMut for Image {
    /// The values, to change them (the text is written again from them when next asked for).
    fn deref_mut(&mut self) -> &mut Value {
        self.value();
        self.text = OnceLock::new();
        self.value.get_mut().expect("parsed above")
    }
}

impl AsRef<Value> for Image {
    fn as_ref(&self) -> &Value {
        self.value()
    }
}

impl Clone for Image {
    fn clone(&self) -> Image {
        Image {
            text: self.text.clone(),
            value: self.value.clone(),
        }
    }
}

impl PartialEq for Image {
    fn eq(&self, other: &Image) -> bool {
        let same_text = match (self.text.get(), other.text.get()) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        };
        same_text || self.value() == other.value()
    }
}

impl PartialEq<Value> for Image {
    fn eq(&self, other: &Value) -> bool {
        self.value() == other
    }
}

impl PartialEq<Image> for Value {
    fn eq(&self, other: &Image) -> bool {
        self == other.value()
    }
}

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.value(), f)
    }
}

impl Serialize for Image {
    /// As its values (any serializer); the default webhook body copies [`Image::text`] instead.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.value().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Image {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Image, D::Error> {
        Value::deserialize(deserializer).map(Image::from)
    }
}

/// Where a change stands in the change log, as the listener needs it to checkpoint.
///
/// `batch` numbers the listener's batches in the order it handed them out; `sequence` is the
/// change-log row's monotonic number. Positions compare by `(batch, sequence)`, which is the order
/// in which events are handed out (a row's `sequence` alone is not: a transaction that commits late
/// carries a low number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Position {
    pub batch: u64,
    pub sequence: i64,
}

/// A committed change of one entity, decoded from one row of `core.tb_entity_change_log`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntityEvent {
    /// The change row's own UUID (`pk_entity_change_log` in the mission's table shape, `id` in the
    /// later one). Stable across replays: the idempotency key, never a random UUID.
    pub id: Uuid,
    /// The change row's monotonic number (`id` BIGINT, or `pk_entity_change_log` BIGINT).
    pub sequence: i64,
    pub kind: EventKind,
    /// `object_type`: `User`, `Order`, ...
    pub entity_type: String,
    /// `object_id`.
    pub entity_id: Uuid,
    /// The tenant (`fk_customer_org`, or `tenant_id` in the later shape). Taken from the row's
    /// column, never from the payload.
    pub tenant: Option<Uuid>,
    /// Who made the change (`fk_contact`), when known.
    pub author: Option<String>,
    /// The row before the change (`None` for creates, and for updates logged without a pre-image).
    pub before: Option<Image>,
    /// The row after the change (`None` for deletes).
    pub after: Option<Image>,
    /// `change_status` (`new`, `updated`, `failed:validation`, ...).
    pub change_status: String,
    /// `extra_metadata`, passed through (an empty object when the row has none).
    pub extra_metadata: Value,
    /// The envelope's `source` block (schema, table, txId, ts_ms, ...), when there is one.
    pub source: Option<Value>,
    /// When the change-log row was written (`created_at`).
    pub created_at: DateTime<Utc>,
    /// When the change happened according to the envelope (`source.ts_us`, else `source.ts_ms`).
    pub source_ts: Option<DateTime<Utc>>,
    /// Where the event stands in the listener's stream (for checkpointing).
    pub position: Position,
}

impl EntityEvent {
    /// The observers a snapshot event is for (`source.observers`, written by `backfill
    /// --observer`); `None` for every other event and for a snapshot meant for every observer
    /// that asks for snapshots.
    pub fn snapshot_targets(&self) -> Option<impl Iterator<Item = &str>> {
        if self.kind != EventKind::Snapshot {
            return None;
        }
        let targets = self.source.as_ref()?.get("observers")?.as_array()?;
        Some(targets.iter().filter_map(Value::as_str))
    }

    /// The entity's current state: `after`, or `before` for a delete; `Null` when neither exists.
    pub fn data(&self) -> &Value {
        static NULL: Value = Value::Null;
        self.data_image().map_or(&NULL, Image::value)
    }

    /// The image [`EntityEvent::data`] reads.
    pub fn data_image(&self) -> Option<&Image> {
        match self.kind {
            EventKind::Deleted => self.before.as_ref().or(self.after.as_ref()),
            _ => self.after.as_ref().or(self.before.as_ref()),
        }
    }

    /// The images the changes are the difference of: `(old, new)`, an absent side meaning "no
    /// field". Created and Snapshot: every field of `after` as new; Deleted with a before-image:
    /// every field as removed; Updated/Custom with both images: their difference; anything else:
    /// `None` ("cannot tell", not "nothing changed").
    pub fn change_images(&self) -> Option<(Option<&Image>, Option<&Image>)> {
        match (self.kind, &self.before, &self.after) {
            (EventKind::Created | EventKind::Snapshot, _, Some(after)) => Some((None, Some(after))),
            (EventKind::Deleted, Some(before), _) => Some((Some(before), None)),
            (EventKind::Updated | EventKind::Custom, Some(before), Some(after)) => {
                Some((Some(before), Some(after)))
            }
            _ => None,
        }
    }

    /// Top-level fields that differ between the images (see [`EntityEvent::change_images`]), in
    /// key order. `None` when there is no before-image to compare with (then "did X change"
    /// cannot be answered); `Some(vec![])` when both images exist and are equal. Computed on
    /// each call, from the parsed images.
    pub fn changes(&self) -> Option<Vec<FieldChangeRef<'_>>> {
        let (old, new) = self.change_images()?;
        let empty = empty_object();
        Some(diff_field_refs(
            old.map_or(empty, Image::value),
            new.map_or(empty, Image::value),
        ))
    }

    /// [`EntityEvent::changes`] as owned values.
    pub fn changes_owned(&self) -> Option<Vec<FieldChange>> {
        self.changes()
            .map(|changes| changes.iter().map(FieldChangeRef::to_owned).collect())
    }

    /// The change to one top-level field, if it changed. `Err(())` when the event has no
    /// before-image, so the question cannot be answered.
    #[allow(clippy::result_unit_err)]
    pub fn field_change(&self, field: &str) -> Result<Option<FieldChangeRef<'_>>, ()> {
        let (old, new) = self.change_images().ok_or(())?;
        fn side<'a>(image: Option<&'a Image>, field: &str) -> Option<(&'a String, &'a Value)> {
            image?.value().as_object()?.get_key_value(field)
        }
        let (old, new) = (side(old, field), side(new, field));
        let (o, n) = (old.map(|(_, v)| v), new.map(|(_, v)| v));
        Ok(match old.or(new) {
            Some((key, _)) if o != n => Some(FieldChangeRef {
                field: key.as_str(),
                old: o,
                new: n,
            }),
            _ => None,
        })
    }
}

fn empty_object() -> &'static Value {
    static EMPTY: OnceLock<Value> = OnceLock::new();
    EMPTY.get_or_init(|| Value::Object(Map::new()))
}

/// [`diff_fields`] borrowing from the images.
pub fn diff_field_refs<'a>(before: &'a Value, after: &'a Value) -> Vec<FieldChangeRef<'a>> {
    let empty = empty_object().as_object().expect("an object");
    let b = before.as_object().unwrap_or(empty);
    let a = after.as_object().unwrap_or(empty);
    let mut keys: Vec<&'a String> = b
        .keys()
        .chain(a.keys().filter(|k| !b.contains_key(*k)))
        .collect();
    keys.sort();
    keys.into_iter()
        .filter_map(|k| {
            let old = b.get(k);
            let new = a.get(k);
            (old != new).then_some(FieldChangeRef {
                field: k.as_str(),
                old,
                new,
            })
        })
        .collect()
}

/// The top-level fields that differ between two images. Keys are compared in sorted order so the
/// result is deterministic.
pub fn diff_fields(before: &Value, after: &Value) -> Vec<FieldChange> {
    diff_field_refs(before, after)
        .iter()
        .map(FieldChangeRef::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn diff_reports_changed_added_and_removed_fields_in_key_order() {
        let changes = diff_fields(
            &json!({"a": 1, "b": "x", "gone": true}),
            &json!({"a": 2, "b": "x", "new": null}),
        );
        let fields: Vec<_> = changes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(fields, ["a", "gone", "new"]);
        assert_eq!(changes[0].old, Some(json!(1)));
        assert_eq!(changes[0].new, Some(json!(2)));
        assert_eq!(changes[1].new, None);
        assert_eq!(changes[2].old, None);
        assert_eq!(changes[2].new, Some(Value::Null));
    }

    #[test]
    fn diff_of_equal_images_is_empty() {
        assert!(diff_fields(&json!({"a": 1}), &json!({"a": 1})).is_empty());
    }
}
