//! `EntityEvent`: one committed change of one entity, as the observers see it. No I/O here.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

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
    pub before: Option<Value>,
    /// The row after the change (`None` for deletes).
    pub after: Option<Value>,
    /// Top-level fields that differ between `before` and `after`. `None` when there is no
    /// before-image to compare with (then "did X change" cannot be answered); `Some(vec![])` when
    /// both images exist and are equal.
    pub changes: Option<Vec<FieldChange>>,
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
        match self.kind {
            EventKind::Deleted => self.before.as_ref().or(self.after.as_ref()),
            _ => self.after.as_ref().or(self.before.as_ref()),
        }
        .unwrap_or(&NULL)
    }

    /// The change to one top-level field, if it changed. `Err(())` when the event has no
    /// before-image, so the question cannot be answered.
    #[allow(clippy::result_unit_err)]
    pub fn field_change(&self, field: &str) -> Result<Option<&FieldChange>, ()> {
        match &self.changes {
            None => Err(()),
            Some(changes) => Ok(changes.iter().find(|c| c.field == field)),
        }
    }
}

/// The top-level fields that differ between two images. Keys are compared in sorted order so the
/// result is deterministic.
pub fn diff_fields(before: &Value, after: &Value) -> Vec<FieldChange> {
    let empty = Map::new();
    let b = before.as_object().unwrap_or(&empty);
    let a = after.as_object().unwrap_or(&empty);
    let mut keys: Vec<&String> = b
        .keys()
        .chain(a.keys().filter(|k| !b.contains_key(*k)))
        .collect();
    keys.sort();
    keys.into_iter()
        .filter_map(|k| {
            let old = b.get(k);
            let new = a.get(k);
            (old != new).then(|| FieldChange {
                field: k.clone(),
                old: old.cloned(),
                new: new.cloned(),
            })
        })
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
