//! The capture trigger and `core.log_mutation_event` against a real database: what lands in
//! `core.tb_entity_change_log` for each kind of write, and which writes fail.

use fraiseql_observers::capture::{self, CaptureInfo, CaptureSpec};
use fraiseql_observers::testing::TestDb;
use serde_json::{json, Value};
use tokio_postgres::Client;
use uuid::Uuid;

const TENANT: Uuid = Uuid::from_u128(0x1111_1111_1111_1111_1111_1111_1111_1111);
const OTHER_TENANT: Uuid = Uuid::from_u128(0x2222_2222_2222_2222_2222_2222_2222_2222);
const CONTACT: Uuid = Uuid::from_u128(0x3333_3333_3333_3333_3333_3333_3333_3333);
const ALICE: Uuid = Uuid::from_u128(0xa11c_e000_0000_4000_8000_0000_0000_0001);

/// A FraiseQL-style write table (trinity identifiers, a secret, audit columns). The tenant column
/// is nullable so the fallback to `fraiseql.tenant_id` can be exercised.
const TB_USER: &str = "
    CREATE TABLE tb_user (
        pk_user INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id UUID DEFAULT gen_random_uuid() NOT NULL UNIQUE,
        identifier TEXT UNIQUE NOT NULL,
        email TEXT NOT NULL,
        password_hash TEXT NOT NULL,
        fk_customer_org UUID,
        is_active BOOLEAN NOT NULL DEFAULT true,
        tags TEXT[] NOT NULL DEFAULT '{}',
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        updated_at TIMESTAMPTZ
    )";

fn user_spec() -> CaptureSpec {
    CaptureSpec {
        table: "tb_user".into(),
        entity: "User".into(),
        tenant_column: Some("fk_customer_org".into()),
        exclude_columns: vec!["password_hash".into()],
        id_column: "id".into(),
    }
}

/// A database with `tb_user` captured as `User`, and a writer connection whose time zone is UTC
/// (timestamps inside the images follow the writer's `TimeZone`).
async fn captured_users() -> (TestDb, Client) {
    let db = TestDb::new().await;
    let client = db.client().await;
    client.batch_execute(TB_USER).await.unwrap();
    client.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
    capture::enable(&client, &user_spec()).await.unwrap();
    (db, client)
}

async fn insert_alice(client: &Client) {
    client
        .execute(
            "INSERT INTO tb_user (id, identifier, email, password_hash, fk_customer_org, tags, created_at)
             VALUES ($1, 'alice', 'alice@example.com', 'argon2$secret', $2, '{admin}', '2024-01-02T03:04:05.123456Z')",
            &[&ALICE, &TENANT],
        )
        .await
        .unwrap();
}

/// One change-log row, every column.
#[derive(Debug)]
struct LogRow {
    id: i64,
    pk: Uuid,
    tenant: Uuid,
    contact: Option<Uuid>,
    object_type: String,
    object_id: Uuid,
    modification_type: String,
    change_status: String,
    object_data: Value,
    extra_metadata: Option<Value>,
    txid: String,
}

async fn log_rows(client: &Client) -> Vec<LogRow> {
    client
        .query(
            "SELECT id, pk_entity_change_log, fk_customer_org, fk_contact, object_type, object_id,
                    modification_type, change_status, object_data, extra_metadata, txid::text
               FROM core.tb_entity_change_log ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| LogRow {
            id: r.get(0),
            pk: r.get(1),
            tenant: r.get(2),
            contact: r.get(3),
            object_type: r.get(4),
            object_id: r.get(5),
            modification_type: r.get(6),
            change_status: r.get(7),
            object_data: r.get(8),
            extra_metadata: r.get(9),
            txid: r.get(10),
        })
        .collect()
}

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// Checks the envelope's volatile source fields (txId equals the row's txid column, ts_ms and
/// ts_us agree and lie within a minute of the database clock) and returns the envelope without
/// them, for exact comparison.
async fn stable_envelope(client: &Client, row: &LogRow) -> Value {
    let mut envelope = row.object_data.clone();
    let source = envelope["source"]
        .as_object_mut()
        .expect("the envelope has a source object");
    let tx_id = source.remove("txId").expect("source.txId");
    assert_eq!(
        tx_id.as_i64(),
        Some(row.txid.parse::<i64>().unwrap()),
        "source.txId is the writing transaction, as a number"
    );
    let ts_ms = source
        .remove("ts_ms")
        .and_then(|v| v.as_i64())
        .expect("source.ts_ms");
    let ts_us = source
        .remove("ts_us")
        .and_then(|v| v.as_i64())
        .expect("source.ts_us");
    assert_eq!(ts_us / 1000, ts_ms, "ts_ms and ts_us are the same instant");
    let now_ms: i64 = client
        .query_one(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        (now_ms - ts_ms).abs() < 60_000,
        "ts_ms {ts_ms} is near the database clock {now_ms}"
    );
    envelope
}

fn alice_image(email: &str) -> Value {
    json!({
        "pk_user": 1,
        "id": ALICE.to_string(),
        "identifier": "alice",
        "email": email,
        "fk_customer_org": TENANT.to_string(),
        "is_active": true,
        "tags": ["admin"],
        "created_at": "2024-01-02T03:04:05.123456+00:00",
        "updated_at": null
    })
}

fn source(db: &TestDb) -> Value {
    json!({"schema": "public", "table": "tb_user", "db": db.name})
}

fn assert_db_error_contains(err: &fraiseql_observers::Error, needles: &[&str]) {
    let fraiseql_observers::Error::Database(e) = err else {
        panic!("expected Error::Database, got {err:?}");
    };
    let message = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    for needle in needles {
        assert!(
            message.contains(needle),
            "error message {message:?} should contain {needle:?}"
        );
    }
}

#[tokio::test]
async fn insert_is_logged_with_the_exact_envelope() {
    let (db, client) = captured_users().await;
    insert_alice(&client).await;

    let rows = log_rows(&client).await;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.modification_type, "INSERT");
    assert_eq!(row.change_status, "new");
    assert_eq!(row.object_type, "User");
    assert_eq!(row.object_id, ALICE);
    assert_eq!(row.tenant, TENANT);
    assert_eq!(row.contact, None);
    assert_eq!(row.extra_metadata, Some(json!({})));
    assert_eq!(
        stable_envelope(&client, row).await,
        json!({"before": null, "after": alice_image("alice@example.com"), "op": "c", "source": source(&db)})
    );
}

#[tokio::test]
async fn update_is_logged_with_the_exact_envelope() {
    let (db, client) = captured_users().await;
    insert_alice(&client).await;
    client
        .execute(
            "UPDATE tb_user SET email = 'alice@new.example.com' WHERE id = $1",
            &[&ALICE],
        )
        .await
        .unwrap();

    let rows = log_rows(&client).await;
    assert_eq!(rows.len(), 2);
    let row = &rows[1];
    assert_eq!(row.modification_type, "UPDATE");
    assert_eq!(row.change_status, "updated");
    assert_eq!(row.object_type, "User");
    assert_eq!(row.object_id, ALICE);
    assert_eq!(row.tenant, TENANT);
    assert_eq!(row.contact, None);
    assert_eq!(
        stable_envelope(&client, row).await,
        json!({
            "before": alice_image("alice@example.com"),
            "after": alice_image("alice@new.example.com"),
            "op": "u",
            "source": source(&db)
        })
    );
}

#[tokio::test]
async fn delete_is_logged_with_the_exact_envelope() {
    let (db, client) = captured_users().await;
    insert_alice(&client).await;
    client
        .execute("DELETE FROM tb_user WHERE id = $1", &[&ALICE])
        .await
        .unwrap();

    let rows = log_rows(&client).await;
    assert_eq!(rows.len(), 2);
    let row = &rows[1];
    assert_eq!(row.modification_type, "DELETE");
    assert_eq!(row.change_status, "deleted");
    assert_eq!(row.object_type, "User");
    assert_eq!(row.object_id, ALICE);
    assert_eq!(row.tenant, TENANT);
    assert_eq!(
        stable_envelope(&client, row).await,
        json!({"before": alice_image("alice@example.com"), "after": null, "op": "d", "source": source(&db)})
    );
}

#[tokio::test]
async fn one_insert_of_1000_rows_logs_1000_rows() {
    let (_db, client) = captured_users().await;
    client
        .execute(
            "INSERT INTO tb_user (identifier, email, password_hash, fk_customer_org)
             SELECT 'user' || g, 'user' || g || '@example.com', 'secret', $1
               FROM generate_series(1, 1000) g",
            &[&TENANT],
        )
        .await
        .unwrap();

    let rows = log_rows(&client).await;
    assert_eq!(rows.len(), 1000);
    assert!(rows
        .iter()
        .all(|r| r.modification_type == "INSERT" && r.object_data["op"] == "c"));
    // Every user appears exactly once, with its own image, and the rows are in insertion order.
    let logged: Vec<(Uuid, String)> = rows
        .iter()
        .map(|r| {
            assert_eq!(r.object_data["after"]["id"], json!(r.object_id.to_string()));
            (
                r.object_id,
                r.object_data["after"]["identifier"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    let users: Vec<(Uuid, String)> = client
        .query("SELECT id, identifier FROM tb_user ORDER BY pk_user", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(logged, users);
    // One statement, one transaction, one source block.
    assert!(rows.iter().all(|r| r.txid == rows[0].txid));
    assert!(rows
        .iter()
        .all(|r| r.object_data["source"] == rows[0].object_data["source"]));
}

#[tokio::test]
async fn an_update_of_three_rows_logs_three_updates_with_matching_images() {
    let (_db, client) = captured_users().await;
    client
        .execute(
            "INSERT INTO tb_user (identifier, email, password_hash, fk_customer_org)
             SELECT 'user' || g, 'user' || g || '@example.com', 'secret', $1
               FROM generate_series(1, 5) g",
            &[&TENANT],
        )
        .await
        .unwrap();
    let updated = client
        .execute(
            "UPDATE tb_user SET is_active = false WHERE identifier IN ('user1', 'user3', 'user5')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(updated, 3);

    let rows = log_rows(&client).await;
    let updates: Vec<&LogRow> = rows
        .iter()
        .filter(|r| r.modification_type == "UPDATE")
        .collect();
    assert_eq!(updates.len(), 3);
    let mut identifiers = Vec::new();
    for row in updates {
        let data = &row.object_data;
        assert_eq!(data["op"], "u");
        assert_eq!(data["before"]["id"], data["after"]["id"]);
        assert_eq!(data["after"]["id"], json!(row.object_id.to_string()));
        assert_eq!(data["before"]["is_active"], json!(true));
        assert_eq!(data["after"]["is_active"], json!(false));
        let mut before = data["before"].clone();
        before["is_active"] = json!(false);
        assert_eq!(before, data["after"], "only is_active changed");
        identifiers.push(data["after"]["identifier"].as_str().unwrap().to_string());
    }
    identifiers.sort();
    assert_eq!(identifiers, ["user1", "user3", "user5"]);
}

#[tokio::test]
async fn excluded_columns_never_reach_the_envelope() {
    let (_db, client) = captured_users().await;
    insert_alice(&client).await;
    client
        .batch_execute(
            "UPDATE tb_user SET email = 'a@b.example', password_hash = 'argon2$other-secret';
             UPDATE tb_user SET password_hash = 'argon2$third-secret';
             DELETE FROM tb_user;",
        )
        .await
        .unwrap();

    let rows = log_rows(&client).await;
    let ops: Vec<&str> = rows.iter().map(|r| r.modification_type.as_str()).collect();
    assert_eq!(ops, ["INSERT", "UPDATE", "UPDATE", "DELETE"]);
    for row in &rows {
        let text = row.object_data.to_string();
        assert!(!text.contains("password_hash"), "{text}");
        assert!(!text.contains("secret"), "{text}");
    }
    // A change of an excluded column alone is still a change, logged with equal visible images.
    let only_secret = &rows[2].object_data;
    assert_eq!(only_secret["before"], only_secret["after"]);
}

#[tokio::test]
async fn a_no_op_update_logs_nothing() {
    let (_db, client) = captured_users().await;
    insert_alice(&client).await;
    let updated = client
        .execute("UPDATE tb_user SET email = email, tags = tags", &[])
        .await
        .unwrap();
    assert_eq!(updated, 1, "the update itself touched the row");
    assert_eq!(
        count(&client, "SELECT count(*) FROM core.tb_entity_change_log").await,
        1,
        "only the insert is logged"
    );
}

#[tokio::test]
async fn a_changed_primary_key_is_logged_as_delete_then_create() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE tb_slot (code TEXT PRIMARY KEY, id UUID NOT NULL DEFAULT gen_random_uuid(), label TEXT);
             SET fraiseql.tenant_id = '11111111-1111-1111-1111-111111111111';
             INSERT INTO tb_slot (code, label) VALUES ('a', 'first'), ('b', 'second');",
        )
        .await
        .unwrap();
    capture::enable(&client, &CaptureSpec::new("tb_slot", "Slot"))
        .await
        .unwrap();
    client
        .batch_execute("UPDATE tb_slot SET code = 'z' WHERE code = 'a'")
        .await
        .unwrap();

    let rows = log_rows(&client).await;
    let ops: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| {
            (
                r.modification_type.as_str(),
                r.object_data["op"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(ops, [("DELETE", "d"), ("INSERT", "c")]);
    assert_eq!(rows[0].object_id, rows[1].object_id, "same entity id");
    assert_eq!(rows[0].object_data["before"]["code"], "a");
    assert_eq!(rows[0].object_data["after"], Value::Null);
    assert_eq!(rows[1].object_data["before"], Value::Null);
    assert_eq!(rows[1].object_data["after"]["code"], "z");
    assert_eq!(rows[1].change_status, "new");
}

#[tokio::test]
async fn tenant_comes_from_the_column_else_from_the_session_setting() {
    let (_db, mut client) = captured_users().await;
    insert_alice(&client).await;
    let tx = client.transaction().await.unwrap();
    tx.batch_execute(&format!(
        "SET LOCAL fraiseql.tenant_id = '{OTHER_TENANT}';
         INSERT INTO tb_user (identifier, email, password_hash) VALUES ('bob', 'bob@example.com', 'x');
         INSERT INTO tb_user (identifier, email, password_hash, fk_customer_org)
              VALUES ('carol', 'carol@example.com', 'x', '{TENANT}');"
    ))
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let rows = log_rows(&client).await;
    let tenants: Vec<(&str, Uuid)> = rows
        .iter()
        .map(|r| {
            (
                r.object_data["after"]["identifier"].as_str().unwrap(),
                r.tenant,
            )
        })
        .collect();
    assert_eq!(
        tenants,
        [("alice", TENANT), ("bob", OTHER_TENANT), ("carol", TENANT)],
        "the column wins; the setting fills in when it is NULL"
    );
}

#[tokio::test]
async fn a_table_without_tenant_column_takes_the_session_tenant() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE tb_note (id UUID PRIMARY KEY DEFAULT gen_random_uuid(), body TEXT)",
        )
        .await
        .unwrap();
    capture::enable(&client, &CaptureSpec::new("tb_note", "Note"))
        .await
        .unwrap();
    let tx = client.transaction().await.unwrap();
    tx.batch_execute(&format!(
        "SET LOCAL fraiseql.tenant_id = '{OTHER_TENANT}'; INSERT INTO tb_note (body) VALUES ('hi'), ('there')"
    ))
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let rows = log_rows(&client).await;
    assert_eq!(rows.len(), 2);
    assert!(rows
        .iter()
        .all(|r| r.tenant == OTHER_TENANT && r.object_type == "Note"));
}

#[tokio::test]
async fn a_write_without_any_tenant_fails_naming_the_table_and_writes_nothing() {
    let (_db, mut client) = captured_users().await;
    let err = client
        .execute(
            "INSERT INTO tb_user (identifier, email, password_hash) VALUES ('bob', 'bob@example.com', 'x')",
            &[],
        )
        .await
        .expect_err("a change without a tenant cannot be captured");
    let db_err = err.as_db_error().expect("a server error");
    assert_eq!(
        db_err.message(),
        "fraiseql-observers: cannot capture a change of public.tb_user: no tenant (column fk_customer_org is NULL and fraiseql.tenant_id is not set)"
    );
    assert!(db_err
        .hint()
        .unwrap_or_default()
        .contains("fraiseql.tenant_id"));

    // A SET LOCAL that was rolled back leaves the setting at '' in this session: still no tenant.
    let tx = client.transaction().await.unwrap();
    tx.batch_execute(&format!("SET LOCAL fraiseql.tenant_id = '{TENANT}'"))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let err = client
        .execute(
            "INSERT INTO tb_user (identifier, email, password_hash) VALUES ('bob', 'bob@example.com', 'x')",
            &[],
        )
        .await
        .expect_err("a rolled-back SET LOCAL leaves no tenant");
    assert!(err
        .as_db_error()
        .unwrap()
        .message()
        .contains("no tenant (column fk_customer_org is NULL"));

    assert_eq!(count(&client, "SELECT count(*) FROM tb_user").await, 0);
    assert_eq!(
        count(&client, "SELECT count(*) FROM core.tb_entity_change_log").await,
        0
    );
}

#[tokio::test]
async fn a_malformed_session_setting_fails_the_write() {
    let (_db, client) = captured_users().await;
    client
        .batch_execute("SET fraiseql.tenant_id = 'not-a-uuid'")
        .await
        .unwrap();
    let err = client
        .execute(
            "INSERT INTO tb_user (identifier, email, password_hash) VALUES ('bob', 'bob@example.com', 'x')",
            &[],
        )
        .await
        .expect_err("malformed tenant setting");
    assert!(err
        .as_db_error()
        .unwrap()
        .message()
        .contains("cannot capture a change of public.tb_user: fraiseql.tenant_id is not a UUID"));

    client
        .batch_execute(&format!(
            "SET fraiseql.tenant_id = '{TENANT}'; SET fraiseql.contact_id = 'nobody'"
        ))
        .await
        .unwrap();
    let err = client
        .execute(
            "INSERT INTO tb_user (identifier, email, password_hash) VALUES ('bob', 'bob@example.com', 'x')",
            &[],
        )
        .await
        .expect_err("malformed contact setting");
    assert!(err
        .as_db_error()
        .unwrap()
        .message()
        .contains("cannot capture a change of public.tb_user: fraiseql.contact_id is not a UUID"));
    assert_eq!(count(&client, "SELECT count(*) FROM tb_user").await, 0);
    assert_eq!(
        count(&client, "SELECT count(*) FROM core.tb_entity_change_log").await,
        0
    );
}

#[tokio::test]
async fn the_author_comes_from_the_contact_setting() {
    let (_db, mut client) = captured_users().await;
    insert_alice(&client).await;
    let tx = client.transaction().await.unwrap();
    tx.batch_execute(&format!(
        "SET LOCAL fraiseql.contact_id = '{CONTACT}'; UPDATE tb_user SET email = 'x@example.com'"
    ))
    .await
    .unwrap();
    tx.commit().await.unwrap();
    client.batch_execute("DELETE FROM tb_user").await.unwrap();

    let contacts: Vec<Option<Uuid>> = log_rows(&client).await.iter().map(|r| r.contact).collect();
    assert_eq!(contacts, [None, Some(CONTACT), None]);
}

#[tokio::test]
async fn txid_is_the_writers_transaction() {
    let (_db, mut client) = captured_users().await;
    let tx = client.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO tb_user (identifier, email, password_hash, fk_customer_org) VALUES ('a', 'a@x', 'x', $1), ('b', 'b@x', 'x', $1)",
        &[&TENANT],
    )
    .await
    .unwrap();
    let writer: String = tx
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .unwrap()
        .get(0);
    tx.commit().await.unwrap();

    let rows = log_rows(&client).await;
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert_eq!(row.txid, writer);
        assert_eq!(row.object_data["source"]["txId"].to_string(), writer);
    }
}

#[tokio::test]
async fn disable_stops_capture() {
    let (_db, client) = captured_users().await;
    insert_alice(&client).await;
    capture::disable(&client, "tb_user").await.unwrap();
    client
        .batch_execute("UPDATE tb_user SET email = 'x@example.com'; DELETE FROM tb_user")
        .await
        .unwrap();

    assert_eq!(
        count(&client, "SELECT count(*) FROM core.tb_entity_change_log").await,
        1
    );
    assert!(capture::list(&client).await.unwrap().is_empty());
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'tb_user'::regclass"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pg_proc WHERE proname ~ '^observer_capture_[0-9]+$'"
        )
        .await,
        0
    );
    // Disabling what is not captured changes nothing and does not fail.
    capture::disable(&client, "tb_user").await.unwrap();
}

#[tokio::test]
async fn enabling_twice_replaces_the_definition() {
    let (_db, client) = captured_users().await;
    let mut redefined = user_spec();
    redefined.entity = "Account".into();
    redefined.exclude_columns = vec!["password_hash".into(), "email".into()];
    capture::enable(&client, &redefined).await.unwrap();
    capture::enable(&client, &redefined).await.unwrap();
    insert_alice(&client).await;

    let rows = log_rows(&client).await;
    assert_eq!(rows.len(), 1, "one set of triggers");
    assert_eq!(rows[0].object_type, "Account");
    assert!(rows[0].object_data["after"].get("email").is_none());
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'tb_user'::regclass"
        )
        .await,
        3
    );
    assert_eq!(
        capture::list(&client).await.unwrap(),
        [CaptureInfo {
            table: "public.tb_user".into(),
            entity: "Account".into(),
            id_column: "id".into(),
            tenant_column: Some("fk_customer_org".into()),
            exclude_columns: vec!["password_hash".into(), "email".into()],
        }]
    );
}

#[tokio::test]
async fn enable_rejects_bad_specs_naming_the_table_and_column() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE tb_legacy (pk_legacy SERIAL PRIMARY KEY, uuid UUID, org TEXT, name TEXT);
             CREATE VIEW v_legacy AS SELECT * FROM tb_legacy;",
        )
        .await
        .unwrap();

    let err = capture::enable(&client, &CaptureSpec::new("tb_legacy", "Legacy"))
        .await
        .unwrap_err();
    assert_db_error_contains(
        &err,
        &["cannot enable capture on public.tb_legacy", "no column id"],
    );

    let mut spec = CaptureSpec::new("tb_legacy", "Legacy");
    spec.id_column = "name".into();
    let err = capture::enable(&client, &spec).await.unwrap_err();
    assert_db_error_contains(
        &err,
        &["public.tb_legacy", "column name", "is text, not uuid"],
    );

    spec.id_column = "uuid".into();
    spec.tenant_column = Some("org".into());
    let err = capture::enable(&client, &spec).await.unwrap_err();
    assert_db_error_contains(
        &err,
        &["public.tb_legacy", "column org (the tenant column)"],
    );

    spec.tenant_column = None;
    spec.exclude_columns = vec!["name".into(), "secret_token".into()];
    let err = capture::enable(&client, &spec).await.unwrap_err();
    assert_db_error_contains(&err, &["public.tb_legacy", "secret_token", "do not exist"]);

    let err = capture::enable(&client, &CaptureSpec::new("v_legacy", "Legacy"))
        .await
        .unwrap_err();
    assert_db_error_contains(&err, &["public.v_legacy", "not a table"]);

    let err = capture::enable(&client, &CaptureSpec::new("tb_missing", "Legacy"))
        .await
        .unwrap_err();
    assert_db_error_contains(&err, &["\"tb_missing\" does not exist"]);

    // Nothing was installed by the failed attempts.
    assert!(capture::list(&client).await.unwrap().is_empty());
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'tb_legacy'::regclass"
        )
        .await,
        0
    );

    // With a valid spec the same table is captured.
    spec.exclude_columns = vec!["name".into()];
    capture::enable(&client, &spec).await.unwrap();
    assert_eq!(capture::list(&client).await.unwrap().len(), 1);
}

#[tokio::test]
async fn quoted_names_in_other_schemas_are_captured() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            r#"CREATE SCHEMA "Sales";
               CREATE TABLE "Sales"."Order Line" ("Line Id" UUID PRIMARY KEY, "Org" UUID NOT NULL, "Qty" INT);"#,
        )
        .await
        .unwrap();
    let spec = CaptureSpec {
        table: r#""Sales"."Order Line""#.into(),
        entity: "OrderLine".into(),
        tenant_column: Some("Org".into()),
        exclude_columns: vec![],
        id_column: "Line Id".into(),
    };
    capture::enable(&client, &spec).await.unwrap();
    let line = Uuid::new_v4();
    client
        .execute(
            r#"INSERT INTO "Sales"."Order Line" VALUES ($1, $2, 3)"#,
            &[&line, &TENANT],
        )
        .await
        .unwrap();

    let rows = log_rows(&client).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].object_id, line);
    assert_eq!(rows[0].tenant, TENANT);
    assert_eq!(rows[0].object_data["after"]["Qty"], json!(3));
    assert_eq!(rows[0].object_data["source"]["schema"], "Sales");
    assert_eq!(rows[0].object_data["source"]["table"], "Order Line");
    assert_eq!(
        capture::list(&client).await.unwrap()[0].table,
        r#""Sales"."Order Line""#
    );
}

#[tokio::test]
async fn log_mutation_event_inserts_a_row_and_returns_its_uuid() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let before = json!({"id": ALICE.to_string(), "email": "old@example.com"});
    let after = json!({"id": ALICE.to_string(), "email": "new@example.com"});
    let returned: Uuid = client
        .query_one(
            "SELECT core.log_mutation_event($1, $2, 'User', $3, 'UPDATE', 'updated', $4, $5, 'tb_user', 'public', $6)",
            &[&TENANT, &CONTACT, &ALICE, &before, &after, &json!({"trace": "abc"})],
        )
        .await
        .unwrap()
        .get(0);
    let writer_tx: Vec<LogRow> = log_rows(&client).await;
    assert_eq!(writer_tx.len(), 1);
    let row = &writer_tx[0];
    assert_eq!(
        row.pk, returned,
        "the returned UUID is the row's pk_entity_change_log"
    );
    assert_eq!(row.tenant, TENANT);
    assert_eq!(row.contact, Some(CONTACT));
    assert_eq!(row.object_type, "User");
    assert_eq!(row.object_id, ALICE);
    assert_eq!(row.modification_type, "UPDATE");
    assert_eq!(row.change_status, "updated");
    assert_eq!(row.extra_metadata, Some(json!({"trace": "abc"})));
    assert_eq!(
        stable_envelope(&client, row).await,
        json!({
            "before": before,
            "after": after,
            "op": "u",
            "source": {"schema": "public", "table": "tb_user", "db": db.name, "organization": TENANT.to_string()}
        })
    );

    // The defaults, and each modification type's op code.
    for (kind, op) in [("INSERT", "c"), ("DELETE", "d"), ("NOOP", "r")] {
        client
            .execute(
                "SELECT core.log_mutation_event($1, NULL, 'User', $2, $3, 'ok')",
                &[&TENANT, &ALICE, &kind],
            )
            .await
            .unwrap();
        let rows = log_rows(&client).await;
        let last = rows.last().unwrap();
        assert_eq!(last.modification_type, kind);
        assert_eq!(last.object_data["op"], op);
        assert_eq!(last.object_data["before"], Value::Null);
        assert_eq!(last.object_data["after"], Value::Null);
        assert_eq!(last.object_data["source"]["schema"], "public");
        assert_eq!(last.object_data["source"]["table"], Value::Null);
        assert_eq!(last.extra_metadata, Some(json!({})));
        assert_eq!(last.contact, None);
    }
    assert!(log_rows(&client)
        .await
        .windows(2)
        .all(|w| w[0].id < w[1].id));
}

#[tokio::test]
async fn log_mutation_event_is_rolled_back_with_the_caller() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    let tx = client.transaction().await.unwrap();
    let pk: Uuid = tx
        .query_one(
            "SELECT core.log_mutation_event($1, NULL, 'User', $2, 'INSERT', 'new', NULL, '{}'::jsonb)",
            &[&TENANT, &ALICE],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        count(
            tx.client(),
            "SELECT count(*) FROM core.tb_entity_change_log"
        )
        .await,
        1,
        "visible inside the caller's transaction"
    );
    tx.rollback().await.unwrap();

    let other = db.client().await;
    assert_eq!(
        count(&other, "SELECT count(*) FROM core.tb_entity_change_log").await,
        0
    );
    let found = other
        .query_opt(
            "SELECT 1 FROM core.tb_entity_change_log WHERE pk_entity_change_log = $1",
            &[&pk],
        )
        .await
        .unwrap();
    assert!(found.is_none());
}

#[tokio::test]
async fn log_mutation_event_rejects_an_unknown_modification_type() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let err = client
        .execute(
            "SELECT core.log_mutation_event($1, NULL, 'User', $2, 'UPSERT', 'ok')",
            &[&TENANT, &ALICE],
        )
        .await
        .unwrap_err();
    let message = err.as_db_error().unwrap().message().to_string();
    assert!(
        message.contains("unknown modification_type 'UPSERT'"),
        "{message}"
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM core.tb_entity_change_log").await,
        0
    );
}

#[tokio::test]
async fn a_large_update_after_small_ones_in_the_same_session_stays_fast() {
    // The trigger's cached plans are made for the first statements' (tiny) transition tables; a
    // nested-loop plan reused for a large UPDATE is quadratic (minutes for tens of thousands of
    // rows). The generated function forbids nested loops; this guards that.
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE tb_counter (id UUID PRIMARY KEY DEFAULT gen_random_uuid(), n INT NOT NULL);
             SET fraiseql.tenant_id = '11111111-1111-1111-1111-111111111111';
             INSERT INTO tb_counter (n) SELECT g FROM generate_series(1, 30000) g;",
        )
        .await
        .unwrap();
    capture::enable(&client, &CaptureSpec::new("tb_counter", "Counter"))
        .await
        .unwrap();
    for n in 1..=8 {
        client
            .execute("UPDATE tb_counter SET n = -n WHERE n = $1", &[&n])
            .await
            .unwrap();
    }
    client
        .batch_execute("SET statement_timeout = '15s'")
        .await
        .unwrap();
    let updated = client
        .execute("UPDATE tb_counter SET n = n + 1", &[])
        .await
        .expect("a 30,000-row update finishes well within 15 s");
    assert_eq!(updated, 30000);
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM core.tb_entity_change_log WHERE modification_type = 'UPDATE'"
        )
        .await,
        30008
    );
}

#[tokio::test]
async fn columns_named_like_the_triggers_own_identifiers_are_captured() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE tb_clash (id UUID PRIMARY KEY, n INT, o INT, v_table TEXT,
                                    tg_table_name TEXT, tg_table_schema TEXT, observer_new TEXT);
             SET fraiseql.tenant_id = '11111111-1111-1111-1111-111111111111';",
        )
        .await
        .unwrap();
    capture::enable(&client, &CaptureSpec::new("tb_clash", "Clash"))
        .await
        .unwrap();
    let id = Uuid::new_v4();
    client
        .execute(
            "INSERT INTO tb_clash VALUES ($1, 1, 2, 'vt', 'tn', 'ts', 'on')",
            &[&id],
        )
        .await
        .unwrap();
    client
        .batch_execute("UPDATE tb_clash SET n = 10, o = 20; DELETE FROM tb_clash;")
        .await
        .unwrap();

    let rows = log_rows(&client).await;
    let ops: Vec<&str> = rows
        .iter()
        .map(|r| r.object_data["op"].as_str().unwrap())
        .collect();
    assert_eq!(ops, ["c", "u", "d"]);
    let first = json!({"id": id.to_string(), "n": 1, "o": 2, "v_table": "vt", "tg_table_name": "tn",
                       "tg_table_schema": "ts", "observer_new": "on"});
    let mut second = first.clone();
    second["n"] = json!(10);
    second["o"] = json!(20);
    assert_eq!(rows[0].object_data["after"], first);
    assert_eq!(rows[1].object_data["before"], first);
    assert_eq!(rows[1].object_data["after"], second);
    assert_eq!(rows[2].object_data["before"], second);
    assert_eq!(rows[2].object_data["source"]["table"], "tb_clash");
    assert!(rows.iter().all(|r| r.object_id == id));
}

#[tokio::test]
async fn a_writer_without_rights_on_the_change_log_is_captured_and_cannot_forge_rows() {
    // Only the final insert into the log runs with the rights of whoever installed the
    // migrations (fraiseql_capture.write); the writer needs none on the log.
    let db = TestDb::new().await;
    let admin = db.client().await;
    let role = format!("{}_writer", db.name);
    admin
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {role};
             CREATE ROLE {role} LOGIN;
             CREATE TABLE tb_doc (id UUID PRIMARY KEY DEFAULT gen_random_uuid(), org UUID NOT NULL, body TEXT);
             GRANT SELECT, INSERT, UPDATE, DELETE ON tb_doc TO {role};"
        ))
        .await
        .unwrap();
    let mut spec = CaptureSpec::new("tb_doc", "Doc");
    spec.tenant_column = Some("org".into());
    capture::enable(&admin, &spec).await.unwrap();

    let writer =
        fraiseql_observers::testing::connect(&db.url.replacen("postgres@", &format!("{role}@"), 1))
            .await;
    writer
        .execute(
            "INSERT INTO tb_doc (org, body) VALUES ($1, 'hello')",
            &[&TENANT],
        )
        .await
        .unwrap();
    let forged = writer
        .execute(
            "INSERT INTO core.tb_entity_change_log (fk_customer_org, object_type, object_id, modification_type, change_status, object_data)
             VALUES ($1, 'Doc', gen_random_uuid(), 'INSERT', 'new', '{}')",
            &[&TENANT],
        )
        .await;
    drop(writer);

    let rows = log_rows(&admin).await;
    admin
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role};"))
        .await
        .unwrap();
    assert!(forged.is_err(), "the writer has no right on the change log");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].object_type, "Doc");
    assert_eq!(rows[0].object_data["after"]["body"], "hello");
}

#[tokio::test]
async fn a_dropped_table_is_forgotten_by_the_next_enable() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE tb_old (id UUID PRIMARY KEY);
             CREATE TABLE tb_new (id UUID PRIMARY KEY);",
        )
        .await
        .unwrap();
    capture::enable(&client, &CaptureSpec::new("tb_old", "Old"))
        .await
        .unwrap();
    client.batch_execute("DROP TABLE tb_old").await.unwrap();
    assert!(capture::list(&client).await.unwrap().is_empty());

    capture::enable(&client, &CaptureSpec::new("tb_new", "New"))
        .await
        .unwrap();
    let listed: Vec<String> = capture::list(&client)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.table)
        .collect();
    assert_eq!(listed, ["public.tb_new"]);
    assert_eq!(
        count(&client, "SELECT count(*) FROM core.observer_capture").await,
        1
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pg_proc WHERE proname ~ '^observer_capture_[0-9]+$'"
        )
        .await,
        1,
        "the dropped table's generated function is gone"
    );
}

/// Issue 9, 5b: serialising a row runs the writer's code (a cast of a column type to `json`), and
/// that code must run with the writer's rights, never with those of whoever enabled capture.
#[tokio::test]
async fn a_cast_in_a_captured_row_runs_as_the_writer_not_as_the_capture_owner() {
    let db = TestDb::new().await;
    let admin = db.client().await;
    let role = format!("{}_caster", db.name);
    admin
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {role};
             CREATE ROLE {role} LOGIN;
             GRANT CREATE ON SCHEMA public TO {role};"
        ))
        .await
        .unwrap();
    let writer =
        fraiseql_observers::testing::connect(&db.url.replacen("postgres@", &format!("{role}@"), 1))
            .await;
    // Everything below belongs to the writer: a type, a cast of it to json that records who runs
    // it, and a table using the type.
    writer
        .batch_execute(
            "CREATE TYPE mood AS ENUM ('ok', 'sad');
             CREATE TABLE cast_runs (who TEXT NOT NULL);
             CREATE FUNCTION mood_json(m mood) RETURNS json LANGUAGE sql VOLATILE AS $f$
                 INSERT INTO public.cast_runs (who) VALUES (current_user) RETURNING pg_catalog.to_json(m::text || '!')
             $f$;
             CREATE CAST (mood AS json) WITH FUNCTION mood_json(mood);
             CREATE TABLE tb_mood (id UUID PRIMARY KEY DEFAULT gen_random_uuid(), org UUID NOT NULL, m mood);",
        )
        .await
        .unwrap();
    // A superuser enables capture on it (as an operator would).
    let mut spec = CaptureSpec::new("tb_mood", "Mood");
    spec.tenant_column = Some("org".into());
    capture::enable(&admin, &spec).await.unwrap();

    writer
        .execute(
            "INSERT INTO tb_mood (org, m) VALUES ($1, 'sad')",
            &[&TENANT],
        )
        .await
        .unwrap();
    let direct = writer
        .execute(
            "SELECT fraiseql_capture.write('tb_mood'::regclass, ARRAY[ROW('c', gen_random_uuid(), $1::uuid, NULL, '{}')::fraiseql_capture.change])",
            &[&TENANT],
        )
        .await;
    drop(writer);
    let has_insert: bool = admin
        .query_one(
            "SELECT has_table_privilege($1, 'core.tb_entity_change_log', 'INSERT')",
            &[&role],
        )
        .await
        .unwrap()
        .get(0);

    let runs: Vec<String> = admin
        .query("SELECT who FROM cast_runs", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let rows = log_rows(&admin).await;
    admin
        .batch_execute(&format!("DROP OWNED BY {role} CASCADE; DROP ROLE {role};"))
        .await
        .unwrap();
    assert!(!has_insert, "the writer has no INSERT on the change log");
    assert!(!runs.is_empty(), "the cast ran");
    assert!(
        runs.iter().all(|who| *who == role),
        "the cast ran as {runs:?}, not as the writer {role}"
    );
    assert!(
        direct.is_err(),
        "the log writer is not callable outside a capture trigger"
    );
    assert_eq!(rows.len(), 1, "the change landed in the log");
    assert_eq!(rows[0].object_type, "Mood");
    assert_eq!(rows[0].object_data["after"]["m"], "sad!");
}

/// Tables captured before migration 0008 get the SECURITY INVOKER trigger function from the
/// migration itself, with their settings and `enabled_at` kept.
#[tokio::test]
async fn migration_0008_regenerates_the_trigger_of_tables_captured_before_it() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    // Back to the state before 0008: 0004's definitions (re-runnable), no fraiseql_capture.
    let m0004 = fraiseql_observers::migrate::MIGRATIONS
        .iter()
        .find(|m| m.version == 4)
        .unwrap();
    client
        .batch_execute(&format!(
            "DROP SCHEMA fraiseql_capture CASCADE;
             DELETE FROM core.observer_schema_migrations WHERE version = 8;
             {}",
            m0004.sql
        ))
        .await
        .unwrap();
    client.batch_execute(TB_USER).await.unwrap();
    capture::enable(&client, &user_spec()).await.unwrap();
    let definer = "SELECT p.prosecdef FROM pg_proc p
                    WHERE p.oid = format('core.observer_capture_%s', 'tb_user'::regclass::oid)::regproc";
    let before: bool = client.query_one(definer, &[]).await.unwrap().get(0);
    let enabled_at = "SELECT enabled_at::text FROM core.observer_capture";
    let enabled_before: String = client.query_one(enabled_at, &[]).await.unwrap().get(0);
    assert!(before, "0004 generated a SECURITY DEFINER function");

    let report = fraiseql_observers::migrate::run(&mut client).await.unwrap();
    assert_eq!(report.applied, [8]);
    let after: bool = client.query_one(definer, &[]).await.unwrap().get(0);
    let enabled_after: String = client.query_one(enabled_at, &[]).await.unwrap().get(0);
    assert!(!after, "0008 regenerated it as SECURITY INVOKER");
    assert_eq!(enabled_after, enabled_before);
    assert_eq!(
        capture::list(&client).await.unwrap(),
        [CaptureInfo {
            table: "public.tb_user".into(),
            entity: "User".into(),
            id_column: "id".into(),
            tenant_column: Some("fk_customer_org".into()),
            exclude_columns: vec!["password_hash".into()],
        }]
    );
    insert_alice(&client).await;
    let rows = log_rows(&client).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].object_data["after"],
        alice_image("alice@example.com")
    );
}

#[tokio::test]
async fn a_captured_write_compiles_nothing_with_the_servers_default_jit() {
    // The generated trigger runs with enable_nestloop = off and fraiseql_capture.write inherits
    // it: a join planned there carries the nested loop's disable cost, far above
    // jit_above_cost, and with jit = on (PostgreSQL's default) every captured statement
    // JIT-compiled it (13 single-row inserts/s instead of ~2,000). The plans of the nested
    // statements, as auto_explain reports them, must show no JIT.
    use futures::StreamExt;
    let (db, writer) = captured_users().await;
    let (client, mut connection) = db.config().connect(tokio_postgres::NoTls).await.unwrap();
    let (tx, mut notices) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notice(notice) = message {
                let _ = tx.send(notice.message().to_string());
            }
        }
    });
    let jit_available: bool = client
        .query_one("SELECT pg_jit_available()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        jit_available,
        "this server cannot JIT: the test would prove nothing"
    );
    client
        .batch_execute(
            "RESET jit; RESET jit_above_cost; LOAD 'auto_explain';
             SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on;
             SET client_min_messages = log",
        )
        .await
        .unwrap();
    insert_alice(&client).await;
    client
        .batch_execute("RESET client_min_messages")
        .await
        .unwrap();
    drop(client);
    let mut plans = Vec::new();
    while let Some(notice) = notices.recv().await {
        plans.push(notice);
    }
    assert!(
        plans
            .iter()
            .any(|p| p.contains("INSERT INTO core.tb_entity_change_log")),
        "auto_explain reported the nested statements: {plans:#?}"
    );
    for plan in &plans {
        assert!(
            !plan.contains("JIT"),
            "a captured write was JIT-compiled: {plan}"
        );
    }
    assert_eq!(log_rows(&writer).await.len(), 1);
}
