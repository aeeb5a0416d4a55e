//! Unit tests of the parser: shape detection, reading and decoding rows.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use uuid::Uuid;

use super::shape::SLOT_COUNT;
use super::{decode, ChangeLogRow, DecodeError, ShapeKind, TableShape};
use crate::error::Error;
use crate::event::{EntityEvent, EventKind, Position};

const CHANGE_ID: &str = "00000000-0000-0000-0000-00000000c0de";
const ENTITY: &str = "550e8400-e29b-41d4-a716-446655440000";
const TENANT: &str = "550e8400-e29b-41d4-a716-446655440001";

fn cols(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect()
}

fn envelope_columns() -> Vec<(String, String)> {
    cols(TableShape::MISSION_COLUMNS)
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
    assert_eq!(
        event.before.as_deref(),
        Some(json!({"email": "a", "n": 1})).as_ref()
    );
    assert_eq!(
        event.after.as_deref(),
        Some(json!({"email": "b", "n": 1})).as_ref()
    );
    let changes = event.changes_owned().unwrap();
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
fn a_snapshot_read_is_snapshot_and_other_r_rows_stay_custom() {
    let snapshot = |value: Value| {
        row(
            "NOOP",
            json!({"op": "r", "before": null, "after": {"a": 1}, "source": {"snapshot": value}}),
        )
    };
    for value in [
        json!("incremental"),
        json!("true"),
        json!("last"),
        json!(true),
    ] {
        let event = decode_envelope(&snapshot(value.clone())).unwrap();
        assert_eq!(event.kind, EventKind::Snapshot, "{value}");
        assert_eq!(event.kind.op(), "r");
        assert_eq!(
            event.changes_owned().as_ref().map(Vec::len),
            Some(1),
            "every field is new"
        );
    }
    for value in [json!("false"), json!(false), json!(""), Value::Null] {
        let event = decode_envelope(&snapshot(value.clone())).unwrap();
        assert_eq!(event.kind, EventKind::Custom, "{value}");
    }
    // A create that carries a snapshot flag is still a create.
    let r = row(
        "INSERT",
        json!({"op": "c", "after": {"a": 1}, "source": {"snapshot": "true"}}),
    );
    assert_eq!(decode_envelope(&r).unwrap().kind, EventKind::Created);
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
        assert_eq!(event.changes_owned(), Some(vec![]));
    }
    // A conflict row: nil object id, no images at all.
    let mut r = row("noop", json!({"op": "r", "before": null, "after": null}));
    r.object_id = Some(Uuid::nil().to_string());
    r.change_status = Some("conflict:duplicate".into());
    let event = decode_envelope(&r).unwrap();
    assert_eq!(event.kind, EventKind::Custom);
    assert_eq!(event.entity_id, Uuid::nil());
    assert_eq!(event.changes_owned(), None);
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
    assert_eq!(event.changes_owned(), None);
    assert_eq!(event.data(), &Value::Null);
}

#[test]
fn changes_follow_the_kind() {
    let created = decode_envelope(&row(
        "INSERT",
        json!({"op": "c", "after": {"a": 1, "b": 2}}),
    ))
    .unwrap()
    .changes_owned()
    .unwrap();
    assert_eq!(created.len(), 2);
    assert!(created.iter().all(|c| c.old.is_none() && c.new.is_some()));

    let deleted = decode_envelope(&row("DELETE", json!({"op": "d", "before": {"a": 1}})))
        .unwrap()
        .changes_owned()
        .unwrap();
    assert_eq!(deleted.len(), 1);
    assert_eq!(deleted[0].old, Some(json!(1)));
    assert_eq!(deleted[0].new, None);

    // An update without a pre-image cannot tell what changed: None, not Some(vec![]).
    let update = decode_envelope(&row("UPDATE", json!({"op": "u", "after": {"a": 1}}))).unwrap();
    assert_eq!(update.changes_owned(), None);
    assert!(update.field_change("a").is_err());

    let same = decode_envelope(&row(
        "UPDATE",
        json!({"op": "u", "before": {"a": 1}, "after": {"a": 1}}),
    ))
    .unwrap();
    assert_eq!(same.changes_owned(), Some(vec![]));
}

#[test]
fn source_ts_prefers_micros_then_millis() {
    let with = |source: Value| {
        let r = row("INSERT", json!({"op": "c", "after": {}, "source": source}));
        decode_envelope(&r)
    };
    let both = with(json!({"ts_us": 1_704_067_200_123_457_i64, "ts_ms": 1_704_067_200_999_i64}));
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
    assert!(
        reason(with(json!({"ts_ms": "1704067200000"}))).contains("source.ts_ms is not a number")
    );
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
    assert_eq!(event.before.as_deref(), Some(json!({"a": 1})).as_ref());
    assert_eq!(event.after.as_deref(), Some(json!({"a": 2})).as_ref());
    assert_eq!(event.source, None);
    assert_eq!(event.source_ts, Some(at(1_704_067_200_000_042)));
    assert_eq!(event.changes_owned().unwrap().len(), 1);

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
    assert_eq!(event.after.as_deref(), None);
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
    assert!(
        message.contains(
            "as the envelope shape (sequence column BIGINT id): column id is uuid, expected bigint"
        ),
        "{message}"
    );
    assert!(message.contains("as the split shape (sequence column BIGINT pk_entity_change_log): missing column pk_entity_change_log"), "{message}");

    let message = shape_error(&[]);
    assert!(message.contains("does not exist"), "{message}");
}
