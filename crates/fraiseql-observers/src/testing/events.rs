//! Sample events.

use chrono::TimeZone;
use serde_json::Value;
use uuid::Uuid;

use crate::{EntityEvent, EventKind, Position};

/// An `Order` event of `kind` with the given images (changes computed when both exist): change
/// id `...0001`, sequence 101, entity `...00aa`, tenant `...00bb`, author `alice`, created
/// 2024-05-01 12:30:00 UTC.
pub fn order_event(kind: EventKind, before: Option<Value>, after: Option<Value>) -> EntityEvent {
    EntityEvent {
        id: Uuid::parse_str("0190f0a2-0000-7000-8000-000000000001").unwrap(),
        sequence: 101,
        kind,
        entity_type: "Order".into(),
        entity_id: Uuid::parse_str("0190f0a2-0000-7000-8000-0000000000aa").unwrap(),
        tenant: Some(Uuid::parse_str("0190f0a2-0000-7000-8000-0000000000bb").unwrap()),
        author: Some("alice".into()),
        before: before.map(Into::into),
        after: after.map(Into::into),
        change_status: "updated".into(),
        extra_metadata: serde_json::json!({}),
        source: None,
        created_at: chrono::Utc.with_ymd_and_hms(2024, 5, 1, 12, 30, 0).unwrap(),
        source_ts: None,
        position: Position {
            batch: 1,
            sequence: 101,
        },
    }
}
