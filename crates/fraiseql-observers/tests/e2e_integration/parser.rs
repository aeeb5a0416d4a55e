//! The row decoder against real rows of a real `core.tb_entity_change_log`, in both table shapes:
//! rows are written with plain INSERTs (as FraiseQL mutation functions write them), the shape is
//! discovered from the catalog, and rows are read with the decoder's own select list.

use chrono::{DateTime, Utc};
use fraiseql_observers::listener::parser::{
    decode, ChangeLogRow, DecodeError, ShapeKind, TableShape,
};
use fraiseql_observers::testing::TestDb;
use fraiseql_observers::{EntityEvent, Error, EventKind, FieldChange, Position};
use serde_json::{json, Value};
use tokio_postgres::Client;
use uuid::Uuid;

/// The shape of the database's change log, discovered the way the reader does it.
async fn shape_of(client: &Client) -> fraiseql_observers::Result<TableShape> {
    let rows = client
        .query(TableShape::CATALOG_QUERY, &[])
        .await
        .expect("catalog query runs");
    let columns: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    TableShape::from_columns(&columns)
}

/// Every row of the change log, decoded in sequence order; one result per row.
async fn read_log(client: &Client) -> Vec<Result<EntityEvent, DecodeError>> {
    let shape = shape_of(client)
        .await
        .expect("the change log has a known shape");
    // The reader appends its own columns after the select list; do the same.
    let sql = format!(
        "SELECT {}, l.txid::text FROM core.tb_entity_change_log l ORDER BY l.{}",
        shape.select_list(),
        shape.sequence_column()
    );
    let rows = client
        .query(&sql, &[])
        .await
        .expect("select list is valid SQL");
    rows.iter()
        .map(|row| {
            let row = ChangeLogRow::from_row(row)?;
            decode(&shape, &row, position(row.sequence))
        })
        .collect()
}

fn position(sequence: i64) -> Position {
    Position { batch: 1, sequence }
}

fn ok(result: &Result<EntityEvent, DecodeError>) -> &EntityEvent {
    result
        .as_ref()
        .unwrap_or_else(|e| panic!("row should decode: {e}"))
}

fn failure(result: &Result<EntityEvent, DecodeError>) -> &str {
    match result {
        Ok(event) => panic!("row should not decode, got {event:?}"),
        Err(e) => &e.reason,
    }
}

fn at(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap()
}

/// One change, as both table shapes can record it.
#[derive(Clone)]
struct Change {
    id: Uuid,
    tenant: Uuid,
    object_type: &'static str,
    object_id: Uuid,
    modification: &'static str,
    op: &'static str,
    status: &'static str,
    before: Option<Value>,
    after: Option<Value>,
    metadata: Value,
    created_at: Option<DateTime<Utc>>,
    ts_us: i64,
}

impl Change {
    fn new(modification: &'static str, op: &'static str) -> Change {
        Change {
            id: Uuid::new_v4(),
            tenant: Uuid::new_v4(),
            object_type: "User",
            object_id: Uuid::new_v4(),
            modification,
            op,
            status: match modification {
                "INSERT" => "new",
                "UPDATE" => "updated",
                "DELETE" => "deleted",
                _ => "noop:unchanged",
            },
            before: None,
            after: None,
            metadata: json!({}),
            created_at: Some(at(1_704_067_200_000_000)),
            ts_us: 1_704_067_199_999_001,
        }
    }

    fn before(mut self, image: Value) -> Change {
        self.before = Some(image);
        self
    }

    fn after(mut self, image: Value) -> Change {
        self.after = Some(image);
        self
    }

    fn source(&self) -> Value {
        json!({"schema": "public", "table": "tb_user", "db": "app", "ts_us": self.ts_us})
    }
}

/// Write `change` into an envelope-shaped log the way a mutation function does; returns the
/// row's sequence number.
async fn insert_envelope(client: &Client, change: &Change, author: Option<Uuid>) -> i64 {
    client
        .query_one(
            "INSERT INTO core.tb_entity_change_log
                 (pk_entity_change_log, fk_customer_org, fk_contact, object_type, object_id,
                  modification_type, change_status, object_data, extra_metadata, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7,
                     jsonb_build_object('before', $8::jsonb, 'after', $9::jsonb, 'op', $10::text,
                                        'source', jsonb_build_object('schema', 'public',
                                            'table', 'tb_user', 'db', 'app', 'ts_us', $11::bigint)),
                     $12, $13)
             RETURNING id",
            &[
                &change.id,
                &change.tenant,
                &author,
                &change.object_type,
                &change.object_id,
                &change.modification,
                &change.status,
                &change.before,
                &change.after,
                &change.op,
                &change.ts_us,
                &change.metadata,
                &change.created_at,
            ],
        )
        .await
        .expect("insert an envelope row")
        .get(0)
}

/// The later FraiseQL table shape, created by hand as an existing FraiseQL database has it.
const SPLIT_TABLE: &str = "
CREATE SCHEMA core;
CREATE TABLE core.tb_entity_change_log (
    pk_entity_change_log BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id UUID NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    tenant_id UUID NOT NULL,
    fk_customer_org BIGINT,
    fk_contact BIGINT,
    object_type TEXT NOT NULL,
    object_id UUID NOT NULL,
    modification_type TEXT NOT NULL CHECK (
        modification_type IN ('INSERT', 'UPDATE', 'DELETE', 'CUSTOM', 'NOOP', 'READ')),
    change_status TEXT NOT NULL,
    object_data JSONB,
    object_data_before JSONB,
    extra_metadata JSONB DEFAULT '{}'::jsonb,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    commit_time TIMESTAMPTZ,
    seq BIGINT,
    actor_type TEXT,
    trace_id TEXT,
    schema_version INTEGER
);
ALTER TABLE core.tb_entity_change_log ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON core.tb_entity_change_log
    USING (tenant_id = current_setting('fraiseql.tenant_id', true)::uuid);
";

async fn insert_split(client: &Client, change: &Change, author: Option<i64>) -> i64 {
    let modification = if change.modification == "NOOP" {
        "CUSTOM"
    } else {
        change.modification
    };
    client
        .query_one(
            "INSERT INTO core.tb_entity_change_log
                 (id, tenant_id, fk_customer_org, fk_contact, object_type, object_id,
                  modification_type, change_status, object_data, object_data_before,
                  extra_metadata, created_at, commit_time, seq, actor_type, trace_id,
                  schema_version)
             VALUES ($1, $2, 17, $3, $4, $5, $6, $7, $8, $9, $10, $11,
                     'epoch'::timestamptz + $12::bigint * interval '1 microsecond', 1, 'user', 'trace-1', 2)
             RETURNING pk_entity_change_log",
            &[
                &change.id,
                &change.tenant,
                &author,
                &change.object_type,
                &change.object_id,
                &modification,
                &change.status,
                &change.after,
                &change.before,
                &change.metadata,
                &change.created_at,
                &change.ts_us,
            ],
        )
        .await
        .expect("insert a split row")
        .get(0)
}

async fn column_names(client: &Client) -> Vec<String> {
    client
        .query(TableShape::CATALOG_QUERY, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn test_debezium_envelope_parsing() {
    let db = TestDb::new().await;
    let client = db.client().await;
    // The envelope exactly as schema-conventions 6.2 documents it.
    client
        .batch_execute(
            r#"INSERT INTO core.tb_entity_change_log
                   (pk_entity_change_log, fk_customer_org, fk_contact, object_type, object_id,
                    modification_type, change_status, object_data)
               VALUES ('0b0e6f2a-7d3c-4a51-9a55-4c1b2a7f0001',
                       '550e8400-e29b-41d4-a716-446655440001', NULL, 'User',
                       '550e8400-e29b-41d4-a716-446655440000', 'UPDATE', 'updated',
                       '{"before": {"id": "550e8400-e29b-41d4-a716-446655440000", "email": "old@example.com"},
                         "after":  {"id": "550e8400-e29b-41d4-a716-446655440000", "email": "new@example.com"},
                         "op": "u",
                         "source": {"table": "tb_user", "schema": "public", "db": "production",
                                    "organization": "550e8400-e29b-41d4-a716-446655440001",
                                    "ts_ms": 1704067200000}}')"#,
        )
        .await
        .unwrap();

    assert_eq!(shape_of(&client).await.unwrap().kind(), ShapeKind::Envelope);
    let events = read_log(&client).await;
    assert_eq!(events.len(), 1);
    let event = ok(&events[0]);
    assert_eq!(
        event.id,
        Uuid::parse_str("0b0e6f2a-7d3c-4a51-9a55-4c1b2a7f0001").unwrap()
    );
    assert_eq!(event.kind, EventKind::Updated);
    assert_eq!(event.entity_type, "User");
    assert_eq!(
        event.entity_id,
        Uuid::parse_str("550e8400-e29b-41d4-a716-446655440000").unwrap()
    );
    assert_eq!(
        event.before.as_deref(),
        Some(&json!({"id": "550e8400-e29b-41d4-a716-446655440000", "email": "old@example.com"}))
    );
    assert_eq!(
        event.after.as_deref(),
        Some(&json!({"id": "550e8400-e29b-41d4-a716-446655440000", "email": "new@example.com"}))
    );
    assert_eq!(
        event.source,
        Some(
            json!({"table": "tb_user", "schema": "public", "db": "production",
                    "organization": "550e8400-e29b-41d4-a716-446655440001",
                    "ts_ms": 1_704_067_200_000_i64})
        )
    );
    assert_eq!(event.source_ts, Some(at(1_704_067_200_000_000)));
    assert_eq!(
        event.changes_owned(),
        Some(vec![FieldChange {
            field: "email".into(),
            old: Some(json!("old@example.com")),
            new: Some(json!("new@example.com")),
        }])
    );
    // extra_metadata was left to its column default.
    assert_eq!(event.extra_metadata, json!({}));
    assert_eq!(event.author, None);
}

#[tokio::test]
async fn test_insert_operation_detection() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let created = Change::new("INSERT", "c").after(json!({"email": "a@example.com"}));
    insert_envelope(&client, &created, None).await;
    // An INSERT row whose envelope says update: rejected, not guessed.
    let disagreeing = Change::new("INSERT", "u").after(json!({"email": "a@example.com"}));
    insert_envelope(&client, &disagreeing, None).await;

    let events = read_log(&client).await;
    assert_eq!(events.len(), 2);
    assert_eq!(ok(&events[0]).kind, EventKind::Created);
    assert_eq!(ok(&events[0]).id, created.id);
    assert_eq!(
        failure(&events[1]),
        "modification_type 'INSERT' disagrees with the envelope's operation 'u'"
    );
}

#[tokio::test]
async fn test_update_operation_detection() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let updated = Change::new("UPDATE", "u")
        .before(json!({"n": 1}))
        .after(json!({"n": 2}));
    insert_envelope(&client, &updated, None).await;
    let noop = Change::new("NOOP", "u")
        .before(json!({"n": 2}))
        .after(json!({"n": 2}));
    insert_envelope(&client, &noop, None).await;
    let disagreeing = Change::new("UPDATE", "d").before(json!({"n": 2}));
    insert_envelope(&client, &disagreeing, None).await;

    let events = read_log(&client).await;
    assert_eq!(events.len(), 3);
    assert_eq!(ok(&events[0]).kind, EventKind::Updated);
    // A NOOP row is not an entity change, whatever op its envelope carries.
    assert_eq!(ok(&events[1]).kind, EventKind::Custom);
    assert_eq!(ok(&events[1]).change_status, "noop:unchanged");
    assert!(failure(&events[2]).contains("disagrees"));
}

#[tokio::test]
async fn test_delete_operation_detection() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let deleted = Change::new("DELETE", "d").before(json!({"email": "gone@example.com"}));
    insert_envelope(&client, &deleted, None).await;
    let without_before = Change::new("DELETE", "d");
    insert_envelope(&client, &without_before, None).await;
    let disagreeing = Change::new("DELETE", "c").after(json!({"email": "x"}));
    insert_envelope(&client, &disagreeing, None).await;

    let events = read_log(&client).await;
    assert_eq!(events.len(), 3);
    let event = ok(&events[0]);
    assert_eq!(event.kind, EventKind::Deleted);
    assert_eq!(event.data(), &json!({"email": "gone@example.com"}));
    // A delete logged without its pre-image is legal: no data, and "what changed" is unknown.
    let event = ok(&events[1]);
    assert_eq!(event.kind, EventKind::Deleted);
    assert_eq!(event.data(), &Value::Null);
    assert_eq!(event.changes(), None);
    assert!(failure(&events[2]).contains("disagrees"));
}

#[tokio::test]
async fn test_before_after_value_extraction() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let before = json!({
        "id": "7f0c2d9e-0000-4000-8000-000000000001", "pk_user": 12, "email": "a@example.com",
        "tags": ["a", "b"], "address": {"city": "Lyon", "zip": null}, "score": 1.5,
        "note": "quote \" and newline \n and ünïcode", "active": true, "removed_field": 1
    });
    let after = json!({
        "id": "7f0c2d9e-0000-4000-8000-000000000001", "pk_user": 12, "email": "a@example.com",
        "tags": ["a", "b", "c"], "address": {"city": "Paris", "zip": null}, "score": 1.5,
        "note": "quote \" and newline \n and ünïcode", "active": false, "added_field": null
    });
    let change = Change::new("UPDATE", "u")
        .before(before.clone())
        .after(after.clone());
    insert_envelope(&client, &change, None).await;
    // An update logged without a pre-image.
    let blind = Change::new("UPDATE", "u").after(json!({"status": "paid"}));
    insert_envelope(&client, &blind, None).await;

    let events = read_log(&client).await;
    let event = ok(&events[0]);
    assert_eq!(event.before.as_deref(), Some(&before));
    assert_eq!(event.after.as_deref(), Some(&after));
    let fields: Vec<&str> = event.changes().unwrap().iter().map(|c| c.field).collect();
    assert_eq!(
        fields,
        ["active", "added_field", "address", "removed_field", "tags"]
    );
    let address = event.field_change("address").unwrap().unwrap();
    assert_eq!(address.old, Some(&json!({"city": "Lyon", "zip": null})));
    assert_eq!(address.new, Some(&json!({"city": "Paris", "zip": null})));
    assert_eq!(event.field_change("email").unwrap(), None);

    let event = ok(&events[1]);
    assert_eq!(event.before, None);
    assert_eq!(event.after.as_deref(), Some(&json!({"status": "paid"})));
    assert_eq!(
        event.changes(),
        None,
        "no pre-image: cannot tell what changed"
    );
    assert!(event.field_change("status").is_err());
}

#[tokio::test]
async fn test_invalid_json_handling() {
    // A user's change log created by hand with TEXT columns, then migrated (adds txid only):
    // broken JSON and non-UUID ids can exist there, and each must fail its own row only.
    let db = TestDb::empty().await;
    let mut client = db.client().await;
    client
        .batch_execute(
            "CREATE SCHEMA core;
             CREATE TABLE core.tb_entity_change_log (
                 id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 pk_entity_change_log UUID NOT NULL DEFAULT gen_random_uuid(),
                 fk_customer_org UUID NOT NULL,
                 fk_contact UUID,
                 object_type TEXT NOT NULL,
                 object_id TEXT NOT NULL,
                 modification_type TEXT NOT NULL,
                 change_status TEXT NOT NULL,
                 object_data TEXT NOT NULL,
                 extra_metadata TEXT,
                 created_at TIMESTAMPTZ DEFAULT now()
             );",
        )
        .await
        .unwrap();
    fraiseql_observers::migrate::run(&mut client).await.unwrap();
    assert!(column_names(&client).await.contains(&"txid".to_string()));

    let good = r#"{"op": "c", "before": null, "after": {"email": "a@example.com"}}"#;
    let rows: [(&str, &str, Option<&str>); 6] = [
        ("550e8400-e29b-41d4-a716-446655440000", good, None),
        (
            "550e8400-e29b-41d4-a716-446655440000",
            r#"{"op": "c", "after": {"email": "secret@example.com""#,
            None,
        ),
        ("abc", good, None),
        ("550e8400-e29b-41d4-a716-446655440000", "", None),
        (
            "550e8400-e29b-41d4-a716-446655440000",
            good,
            Some("{not json"),
        ),
        (
            "550e8400-e29b-41d4-a716-446655440000",
            good,
            Some(r#"{"ip": "10.0.0.1"}"#),
        ),
    ];
    for (object_id, object_data, metadata) in rows {
        client
            .execute(
                "INSERT INTO core.tb_entity_change_log
                     (fk_customer_org, object_type, object_id, modification_type, change_status,
                      object_data, extra_metadata)
                 VALUES (gen_random_uuid(), 'User', $1, 'INSERT', 'new', $2, $3)",
                &[&object_id, &object_data, &metadata],
            )
            .await
            .unwrap();
    }

    let events = read_log(&client).await;
    assert_eq!(events.len(), 6, "every row yields a result");
    assert_eq!(
        ok(&events[0]).after.as_deref(),
        Some(&json!({"email": "a@example.com"}))
    );
    let broken = failure(&events[1]);
    assert!(
        broken.starts_with("object_data is not valid JSON"),
        "{broken}"
    );
    assert!(
        !broken.contains("secret@example.com"),
        "payload leaked: {broken}"
    );
    assert_eq!(failure(&events[2]), "object_id is not a UUID: 'abc'");
    assert!(failure(&events[3]).starts_with("object_data is not valid JSON"));
    assert!(failure(&events[4]).starts_with("extra_metadata is not valid JSON"));
    // The rows after the bad ones still decode.
    assert_eq!(ok(&events[5]).extra_metadata, json!({"ip": "10.0.0.1"}));

    // In the standard JSONB table: valid JSON that is not a valid envelope.
    let db = TestDb::new().await;
    let client = db.client().await;
    for object_data in [
        "[1, 2]",
        r#"{"op": "u", "before": "x", "after": {"a": 1}}"#,
        r#"{"op": "t", "before": null, "after": null}"#,
        r#"{"before": null, "after": {"a": 1}}"#,
        r#"{"op": "u", "before": {"a": 0}, "after": {"a": 1}}"#,
    ] {
        client
            .execute(
                "INSERT INTO core.tb_entity_change_log
                     (fk_customer_org, object_type, object_id, modification_type, change_status,
                      object_data)
                 VALUES (gen_random_uuid(), 'User', gen_random_uuid(), 'UPDATE', 'updated',
                         $1::text::jsonb)",
                &[&object_data],
            )
            .await
            .unwrap();
    }
    let events = read_log(&client).await;
    assert_eq!(events.len(), 5);
    assert_eq!(
        failure(&events[0]),
        "object_data is not a JSON object (found an array)"
    );
    assert_eq!(
        failure(&events[1]),
        "the envelope's 'before' is not a JSON object (found a string)"
    );
    assert_eq!(failure(&events[2]), "unknown operation 't'");
    assert!(failure(&events[3]).contains("no 'op'"));
    assert_eq!(ok(&events[4]).kind, EventKind::Updated);
}

#[tokio::test]
async fn test_insert_to_entity_event() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let author = Uuid::new_v4();
    let mut change = Change::new("INSERT", "c").after(json!({"email": "a@example.com", "n": 1}));
    change.metadata = json!({"request_id": "r-1"});
    let sequence = insert_envelope(&client, &change, Some(author)).await;

    let events = read_log(&client).await;
    let expected = EntityEvent {
        id: change.id,
        sequence,
        kind: EventKind::Created,
        entity_type: "User".into(),
        entity_id: change.object_id,
        tenant: Some(change.tenant),
        author: Some(author.to_string()),
        before: None,
        after: change.after.clone().map(Into::into),
        change_status: "new".into(),
        extra_metadata: json!({"request_id": "r-1"}),
        source: Some(change.source()),
        created_at: change.created_at.unwrap(),
        source_ts: Some(at(change.ts_us)),
        position: position(sequence),
    };
    assert_eq!(
        expected.changes_owned(),
        Some(vec![
            FieldChange {
                field: "email".into(),
                old: None,
                new: Some(json!("a@example.com")),
            },
            FieldChange {
                field: "n".into(),
                old: None,
                new: Some(json!(1)),
            },
        ])
    );
    assert_eq!(events.len(), 1);
    assert_eq!(ok(&events[0]), &expected);
}

#[tokio::test]
async fn test_update_to_entity_event() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let change = Change::new("UPDATE", "u")
        .before(json!({"email": "a@example.com", "n": 1}))
        .after(json!({"email": "b@example.com", "n": 1}));
    insert_envelope(&client, &Change::new("INSERT", "c").after(json!({})), None).await;
    let sequence = insert_envelope(&client, &change, None).await;

    let events = read_log(&client).await;
    let expected = EntityEvent {
        id: change.id,
        sequence,
        kind: EventKind::Updated,
        entity_type: "User".into(),
        entity_id: change.object_id,
        tenant: Some(change.tenant),
        author: None,
        before: change.before.clone().map(Into::into),
        after: change.after.clone().map(Into::into),
        change_status: "updated".into(),
        extra_metadata: json!({}),
        source: Some(change.source()),
        created_at: change.created_at.unwrap(),
        source_ts: Some(at(change.ts_us)),
        position: position(sequence),
    };
    assert_eq!(
        expected.changes_owned(),
        Some(vec![FieldChange {
            field: "email".into(),
            old: Some(json!("a@example.com")),
            new: Some(json!("b@example.com")),
        }])
    );
    assert_eq!(events.len(), 2);
    assert_eq!(sequence, 2);
    assert_eq!(ok(&events[1]), &expected);
}

#[tokio::test]
async fn test_delete_to_entity_event() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let change = Change::new("DELETE", "d").before(json!({"email": "a@example.com"}));
    let sequence = insert_envelope(&client, &change, None).await;

    let events = read_log(&client).await;
    let expected = EntityEvent {
        id: change.id,
        sequence,
        kind: EventKind::Deleted,
        entity_type: "User".into(),
        entity_id: change.object_id,
        tenant: Some(change.tenant),
        author: None,
        before: change.before.clone().map(Into::into),
        after: None,
        change_status: "deleted".into(),
        extra_metadata: json!({}),
        source: Some(change.source()),
        created_at: change.created_at.unwrap(),
        source_ts: Some(at(change.ts_us)),
        position: position(sequence),
    };
    assert_eq!(
        expected.changes_owned(),
        Some(vec![FieldChange {
            field: "email".into(),
            old: Some(json!("a@example.com")),
            new: None,
        }])
    );
    assert_eq!(events.len(), 1);
    let event = ok(&events[0]);
    assert_eq!(event, &expected);
    assert_eq!(event.data(), &json!({"email": "a@example.com"}));
}

#[tokio::test]
async fn test_multitenant_context_preserved() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let tenant_a = Uuid::new_v4();
    let tenant_b = Uuid::new_v4();
    // Each row's payload claims the other tenant; the row's column is what counts.
    let mut expected = Vec::new();
    for (i, (tenant, claimed)) in [
        (tenant_a, tenant_b),
        (tenant_b, tenant_a),
        (tenant_a, tenant_b),
    ]
    .into_iter()
    .enumerate()
    {
        let mut change = Change::new("INSERT", "c")
            .after(json!({"n": i, "fk_customer_org": claimed, "tenant_id": claimed}));
        change.tenant = tenant;
        change.metadata = json!({"tenant": claimed});
        insert_envelope(&client, &change, None).await;
        expected.push((change.id, tenant));
    }
    // A row written with a literal envelope whose source names the other organization.
    client
        .execute(
            "INSERT INTO core.tb_entity_change_log
                 (fk_customer_org, object_type, object_id, modification_type, change_status,
                  object_data)
             VALUES ($1, 'Order', gen_random_uuid(), 'INSERT', 'new',
                     jsonb_build_object('op', 'c', 'before', NULL,
                         'after', jsonb_build_object('total', 10),
                         'source', jsonb_build_object('organization', $2::uuid, 'ts_ms', 1)))",
            &[&tenant_b, &tenant_a],
        )
        .await
        .unwrap();

    let events = read_log(&client).await;
    assert_eq!(events.len(), 4);
    for (event, (id, tenant)) in events.iter().zip(&expected) {
        let event = ok(event);
        assert_eq!(event.id, *id);
        assert_eq!(event.tenant, Some(*tenant));
    }
    assert_eq!(ok(&events[3]).tenant, Some(tenant_b));
    let of_a = events
        .iter()
        .filter(|e| ok(e).tenant == Some(tenant_a))
        .count();
    assert_eq!(of_a, 2);
}

#[tokio::test]
async fn test_author_metadata_captured() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let author = Uuid::new_v4();
    let mut with_author = Change::new("UPDATE", "u")
        .before(json!({"a": 1}))
        .after(json!({"a": 2}));
    with_author.metadata =
        json!({"request_id": "req-42", "ip": "203.0.113.9", "via": ["api", "v2"]});
    insert_envelope(&client, &with_author, Some(author)).await;
    let anonymous = Change::new("INSERT", "c").after(json!({"a": 1}));
    insert_envelope(&client, &anonymous, None).await;
    // extra_metadata left to its default, and explicitly NULL.
    client
        .batch_execute(
            r#"INSERT INTO core.tb_entity_change_log
                   (fk_customer_org, fk_contact, object_type, object_id, modification_type,
                    change_status, object_data)
               VALUES (gen_random_uuid(), '9a1f0c3e-1111-4222-8333-444455556666', 'User',
                       gen_random_uuid(), 'INSERT', 'new', '{"op": "c", "after": {"a": 1}}');
               INSERT INTO core.tb_entity_change_log
                   (fk_customer_org, object_type, object_id, modification_type, change_status,
                    object_data, extra_metadata)
               VALUES (gen_random_uuid(), 'User', gen_random_uuid(), 'INSERT', 'new',
                       '{"op": "c", "after": {"a": 1}}', NULL);"#,
        )
        .await
        .unwrap();

    let events = read_log(&client).await;
    assert_eq!(events.len(), 4);
    let event = ok(&events[0]);
    assert_eq!(event.author, Some(author.to_string()));
    assert_eq!(
        event.extra_metadata,
        json!({"request_id": "req-42", "ip": "203.0.113.9", "via": ["api", "v2"]})
    );
    assert_eq!(ok(&events[1]).author, None);
    assert_eq!(
        ok(&events[2]).author.as_deref(),
        Some("9a1f0c3e-1111-4222-8333-444455556666")
    );
    assert_eq!(ok(&events[2]).extra_metadata, json!({}));
    assert_eq!(ok(&events[3]).extra_metadata, json!({}));
}

#[tokio::test]
async fn test_timestamp_accuracy() {
    let db = TestDb::new().await;
    let client = db.client().await;
    // The session's time zone must not matter.
    client
        .batch_execute("SET TimeZone = 'Asia/Kathmandu'")
        .await
        .unwrap();
    client
        .batch_execute(
            r#"INSERT INTO core.tb_entity_change_log
                   (fk_customer_org, object_type, object_id, modification_type, change_status,
                    object_data, created_at)
               VALUES
                   (gen_random_uuid(), 'User', gen_random_uuid(), 'INSERT', 'new',
                    '{"op": "c", "after": {"a": 1}, "source": {"ts_us": 1709633472345677, "ts_ms": 1709633472345}}',
                    '2024-03-05 10:11:12.345678+00'),
                   (gen_random_uuid(), 'User', gen_random_uuid(), 'INSERT', 'new',
                    '{"op": "c", "after": {"a": 1}, "source": {"ts_ms": 1709633472345}}',
                    '2024-03-05 15:56:12.000001+05:45'),
                   (gen_random_uuid(), 'User', gen_random_uuid(), 'INSERT', 'new',
                    '{"op": "c", "after": {"a": 1}, "source": {"ts_us": 1709633472000009}}',
                    NULL);"#,
        )
        .await
        .unwrap();
    let stored = client
        .query(
            "SELECT created_at, (object_data #>> '{source,ts_us}')::bigint,
                    (object_data #>> '{source,ts_ms}')::bigint
               FROM core.tb_entity_change_log ORDER BY id",
            &[],
        )
        .await
        .unwrap();

    let events = read_log(&client).await;
    assert_eq!(events.len(), 3);

    let first = ok(&events[0]);
    assert_eq!(first.created_at, at(1_709_633_472_345_678));
    assert_eq!(Some(first.created_at), stored[0].get(0));
    assert_eq!(
        first.source_ts,
        Some(at(1_709_633_472_345_677)),
        "ts_us wins"
    );
    assert_eq!(
        first.source_ts.map(|t| t.timestamp_micros()),
        stored[0].get::<_, Option<i64>>(1)
    );

    let second = ok(&events[1]);
    assert_eq!(second.created_at, at(1_709_633_472_000_001));
    assert_eq!(Some(second.created_at), stored[1].get(0));
    assert_eq!(
        second.source_ts.map(|t| t.timestamp_millis()),
        stored[1].get::<_, Option<i64>>(2)
    );
    assert_eq!(second.source_ts, Some(at(1_709_633_472_345_000)));

    // created_at NULL: the source timestamp stands in for it.
    let third = ok(&events[2]);
    assert_eq!(stored[2].get::<_, Option<DateTime<Utc>>>(0), None);
    assert_eq!(third.created_at, at(1_709_633_472_000_009));
    assert_eq!(third.source_ts, Some(third.created_at));
}

#[tokio::test]
async fn test_split_shape_decodes_into_the_same_events_as_the_envelope_shape() {
    let split_db = TestDb::empty().await;
    let mut split = split_db.client().await;
    split.batch_execute(SPLIT_TABLE).await.unwrap();
    let columns_before = column_names(&split).await;
    fraiseql_observers::migrate::run(&mut split).await.unwrap();
    let mut columns_after = column_names(&split).await;
    assert_eq!(columns_after.pop().as_deref(), Some("txid"));
    assert_eq!(
        columns_after, columns_before,
        "the migration adds txid only"
    );
    let shape = shape_of(&split).await.unwrap();
    assert_eq!(shape.kind(), ShapeKind::Split);
    assert_eq!(shape.sequence_column(), "pk_entity_change_log");

    let envelope_db = TestDb::new().await;
    let envelope = envelope_db.client().await;

    let entity = Uuid::new_v4();
    let tenant = Uuid::new_v4();
    let changes = [
        Change::new("INSERT", "c").after(json!({"id": entity, "email": "a@x.io", "n": 1})),
        Change::new("UPDATE", "u")
            .before(json!({"id": entity, "email": "a@x.io", "n": 1}))
            .after(json!({"id": entity, "email": "b@x.io", "n": 1})),
        Change::new("UPDATE", "u").after(json!({"id": entity, "email": "c@x.io", "n": 2})),
        Change::new("NOOP", "r")
            .before(json!({"id": entity, "email": "c@x.io", "n": 2}))
            .after(json!({"id": entity, "email": "c@x.io", "n": 2})),
        Change::new("DELETE", "d").before(json!({"id": entity, "email": "c@x.io", "n": 2})),
        Change::new("DELETE", "d"),
    ]
    .map(|mut change| {
        change.object_id = entity;
        change.tenant = tenant;
        change.metadata = json!({"trace": change.id});
        change
    });
    for (i, change) in changes.iter().enumerate() {
        let author = Uuid::new_v4();
        let a = insert_envelope(&envelope, change, Some(author)).await;
        let s = insert_split(&split, change, Some(1000 + i as i64)).await;
        assert_eq!(a, s);
    }

    let from_envelope = read_log(&envelope).await;
    let from_split = read_log(&split).await;
    assert_eq!(from_split.len(), changes.len());
    for (i, (a, s)) in from_envelope.iter().zip(&from_split).enumerate() {
        let (a, s) = (ok(a), ok(s));
        // The only differences the shapes allow: the split shape has no envelope `source`, and
        // its author is an internal BIGINT key rather than a UUID.
        assert!(a.source.is_some());
        assert_eq!(s.source, None);
        assert_eq!(s.author, Some((1000 + i).to_string()));
        let mut normalized = a.clone();
        normalized.source = None;
        normalized.author = s.author.clone();
        assert_eq!(&normalized, s, "change {i}");
    }
    let kinds: Vec<EventKind> = from_split.iter().map(|e| ok(e).kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::Created,
            EventKind::Updated,
            EventKind::Updated,
            EventKind::Custom,
            EventKind::Deleted,
            EventKind::Deleted
        ]
    );
    assert_eq!(ok(&from_split[2]).changes(), None);
    assert_eq!(ok(&from_split[1]).tenant, Some(tenant));
    assert_eq!(ok(&from_split[1]).source_ts, Some(at(changes[1].ts_us)));
}

#[tokio::test]
async fn test_unusable_change_log_is_refused_naming_its_columns() {
    // No table at all.
    let db = TestDb::empty().await;
    let client = db.client().await;
    match shape_of(&client).await {
        Err(Error::ChangeLogShape(message)) => assert!(message.contains("does not exist")),
        other => panic!("expected a shape error, got {other:?}"),
    }

    // A table with the sequence column but an object_id the decoder cannot use and no payload.
    client
        .batch_execute(
            "CREATE SCHEMA core;
             CREATE TABLE core.tb_entity_change_log (
                 id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 pk_entity_change_log UUID NOT NULL DEFAULT gen_random_uuid(),
                 object_type TEXT NOT NULL,
                 object_id BIGINT NOT NULL,
                 created_at TIMESTAMP DEFAULT now()
             );",
        )
        .await
        .unwrap();
    match shape_of(&client).await {
        Err(Error::ChangeLogShape(message)) => {
            assert!(message.contains("missing column object_data"), "{message}");
            assert!(message.contains("column object_id is bigint"), "{message}");
            assert!(
                message.contains("column created_at is timestamp without time zone"),
                "{message}"
            );
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
}
