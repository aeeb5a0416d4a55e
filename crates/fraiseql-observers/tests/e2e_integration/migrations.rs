//! Migrations against fresh and existing databases (both change-log shapes), and the NOTIFY hint
//! they install.

use fraiseql_observers::capture::{self, CaptureSpec};
use fraiseql_observers::migrate;
use fraiseql_observers::testing::TestDb;
use futures::StreamExt;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls, Notification};

/// Every migration version this build embeds, in order.
fn all() -> Vec<i32> {
    migrate::MIGRATIONS.iter().map(|m| m.version).collect()
}

/// Columns of the change-log table: (name, type, not null, default).
async fn change_log_columns(client: &Client) -> Vec<(String, String, bool, Option<String>)> {
    client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                    pg_get_expr(d.adbin, d.adrelid)
               FROM pg_attribute a
               LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
              WHERE a.attrelid = 'core.tb_entity_change_log'::regclass AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// Index definitions on the change-log table, sorted.
async fn change_log_indexes(client: &Client) -> Vec<String> {
    client
        .query(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = 'core' AND tablename = 'tb_entity_change_log' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Every row of the change log, as JSON without the txid column, in key order.
async fn change_log_rows(client: &Client, key: &str) -> Vec<serde_json::Value> {
    client
        .query(
            &format!("SELECT to_jsonb(t) - 'txid' FROM core.tb_entity_change_log t ORDER BY {key}"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn log_mutation_event_installed(client: &Client) -> bool {
    client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                             WHERE n.nspname = 'core' AND p.proname = 'log_mutation_event')",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn running_twice_applies_nothing_the_second_time() {
    let db = TestDb::empty().await;
    let mut client = db.client().await;
    let first = migrate::run(&mut client).await.unwrap();
    assert_eq!(first.applied, all());
    assert!(first.already_applied.is_empty());

    let columns = change_log_columns(&client).await;
    let indexes = change_log_indexes(&client).await;
    let second = migrate::run(&mut client).await.unwrap();
    assert!(second.applied.is_empty(), "{second:?}");
    assert_eq!(second.already_applied, all());
    assert_eq!(change_log_columns(&client).await, columns);
    assert_eq!(change_log_indexes(&client).await, indexes);
    let recorded: i64 = client
        .query_one("SELECT count(*) FROM core.observer_schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, all().len() as i64);
}

#[tokio::test]
async fn an_existing_mission_shape_table_keeps_its_rows_and_gains_txid() {
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
                 object_id UUID NOT NULL,
                 modification_type TEXT NOT NULL CHECK (modification_type IN ('INSERT', 'UPDATE', 'DELETE', 'NOOP')),
                 change_status TEXT NOT NULL,
                 object_data JSONB NOT NULL,
                 extra_metadata JSONB DEFAULT '{}'::jsonb,
                 created_at TIMESTAMPTZ DEFAULT CURRENT_TIMESTAMP
             );
             CREATE INDEX idx_entity_log_object ON core.tb_entity_change_log (object_type, object_id);
             INSERT INTO core.tb_entity_change_log
                    (fk_customer_org, object_type, object_id, modification_type, change_status, object_data)
             SELECT gen_random_uuid(), 'User', gen_random_uuid(), 'INSERT', 'new',
                    jsonb_build_object('before', NULL, 'after', jsonb_build_object('n', g), 'op', 'c')
               FROM generate_series(1, 3) g;",
        )
        .await
        .unwrap();
    let rows_before = change_log_rows(&client, "id").await;
    let columns_before = change_log_columns(&client).await;

    let report = migrate::run(&mut client).await.unwrap();
    assert_eq!(report.applied, all());

    assert_eq!(
        change_log_rows(&client, "id").await,
        rows_before,
        "rows untouched"
    );
    let mut expected = columns_before;
    expected.push((
        "txid".into(),
        "xid8".into(),
        true,
        Some("pg_current_xact_id()".into()),
    ));
    assert_eq!(change_log_columns(&client).await, expected);
    assert!(change_log_indexes(&client)
        .await
        .iter()
        .any(|d| d.contains("idx_entity_log_txid") && d.contains("(txid, id)")));
    // The rows that were there all carry the migrating transaction's id: committed history.
    let distinct_txids: i64 = client
        .query_one(
            "SELECT count(DISTINCT txid::text) FROM core.tb_entity_change_log",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(distinct_txids, 1);

    // The helper is installed and writes after the existing rows.
    assert!(log_mutation_event_installed(&client).await);
    client
        .execute(
            "SELECT core.log_mutation_event(gen_random_uuid(), NULL, 'User', gen_random_uuid(), 'DELETE', 'deleted')",
            &[],
        )
        .await
        .unwrap();
    let last: (i64, String) = client
        .query_one(
            "SELECT id, object_data->>'op' FROM core.tb_entity_change_log ORDER BY id DESC LIMIT 1",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(last, (4, "d".to_string()));
}

#[tokio::test]
async fn an_existing_later_shape_table_only_gains_txid_and_its_index() {
    let db = TestDb::empty().await;
    let mut client = db.client().await;
    client
        .batch_execute(
            "CREATE SCHEMA core;
             CREATE TABLE core.tb_entity_change_log (
                 pk_entity_change_log BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 id UUID NOT NULL DEFAULT gen_random_uuid() UNIQUE,
                 tenant_id UUID NOT NULL,
                 fk_customer_org BIGINT,
                 fk_contact BIGINT,
                 seq BIGINT,
                 object_type TEXT NOT NULL,
                 object_id UUID NOT NULL,
                 modification_type TEXT NOT NULL
                     CHECK (modification_type IN ('INSERT', 'UPDATE', 'DELETE', 'CUSTOM', 'NOOP', 'READ')),
                 change_status TEXT NOT NULL,
                 object_data JSONB,
                 object_data_before JSONB,
                 extra_metadata JSONB DEFAULT '{}'::jsonb,
                 actor_type TEXT,
                 trace_id TEXT,
                 schema_version INTEGER NOT NULL DEFAULT 1,
                 commit_time TIMESTAMPTZ,
                 created_at TIMESTAMPTZ NOT NULL DEFAULT now()
             );
             CREATE INDEX idx_tb_entity_change_log_tenant ON core.tb_entity_change_log (tenant_id, created_at);
             ALTER TABLE core.tb_entity_change_log ENABLE ROW LEVEL SECURITY;
             CREATE POLICY tenant_isolation ON core.tb_entity_change_log
                 USING (tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::uuid);
             INSERT INTO core.tb_entity_change_log
                    (tenant_id, fk_customer_org, object_type, object_id, modification_type, change_status, object_data)
             SELECT gen_random_uuid(), g, 'Order', gen_random_uuid(), 'INSERT', 'new', jsonb_build_object('n', g)
               FROM generate_series(1, 3) g;",
        )
        .await
        .unwrap();
    let rows_before = change_log_rows(&client, "pk_entity_change_log").await;
    let columns_before = change_log_columns(&client).await;
    let indexes_before = change_log_indexes(&client).await;

    let report = migrate::run(&mut client).await.unwrap();
    assert_eq!(report.applied, all());

    let mut expected = columns_before;
    expected.push((
        "txid".into(),
        "xid8".into(),
        true,
        Some("pg_current_xact_id()".into()),
    ));
    assert_eq!(change_log_columns(&client).await, expected);
    let added: Vec<String> = change_log_indexes(&client)
        .await
        .into_iter()
        .filter(|d| !indexes_before.contains(d))
        .collect();
    assert_eq!(
        added,
        ["CREATE INDEX idx_entity_log_txid ON core.tb_entity_change_log USING btree (txid, pk_entity_change_log)"]
    );
    assert_eq!(
        change_log_rows(&client, "pk_entity_change_log").await,
        rows_before
    );
    let triggers: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'core.tb_entity_change_log'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(triggers, 0);

    assert!(
        !log_mutation_event_installed(&client).await,
        "FraiseQL ships its own log_mutation_event for this shape"
    );

    // Capture writes the mission's shape only: enabling it here fails clearly.
    client
        .batch_execute("CREATE TABLE tb_order (id UUID PRIMARY KEY, org UUID)")
        .await
        .unwrap();
    let err = capture::enable(&client, &CaptureSpec::new("tb_order", "Order"))
        .await
        .unwrap_err();
    let fraiseql_observers::Error::Database(e) = &err else {
        panic!("expected a database error, got {err:?}");
    };
    let message = e.as_db_error().expect("a server error").message();
    assert!(message.contains("not in the mission's shape"), "{message}");
}

/// A connection LISTENing on the hint channel, with its notifications forwarded to a channel.
async fn listener(url: &str) -> (Client, mpsc::UnboundedReceiver<Notification>) {
    let (client, mut connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                let _ = tx.send(n);
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {}", capture::NOTIFY_CHANNEL))
        .await
        .unwrap();
    (client, rx)
}

async fn next_notification(rx: &mut mpsc::UnboundedReceiver<Notification>) -> Notification {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a notification within 5 s")
        .expect("the listener is alive")
}

/// Nothing more arrives within a short while.
async fn assert_quiet(rx: &mut mpsc::UnboundedReceiver<Notification>, what: &str) {
    if let Ok(Some(n)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
        panic!("{what}: unexpected notification {n:?}");
    }
}

#[tokio::test]
async fn the_notify_hint_reaches_a_listener_and_can_be_switched_off() {
    let db = TestDb::new().await;
    let writer = db.client().await;
    writer
        .batch_execute(
            "CREATE TABLE tb_item (id UUID PRIMARY KEY DEFAULT gen_random_uuid(), org UUID NOT NULL);",
        )
        .await
        .unwrap();
    let mut spec = CaptureSpec::new("tb_item", "Item");
    spec.tenant_column = Some("org".into());
    capture::enable(&writer, &spec).await.unwrap();
    let (_listening, mut rx) = listener(&db.url).await;
    let insert_three =
        "INSERT INTO tb_item (org) SELECT gen_random_uuid() FROM generate_series(1, 3)";

    // Off by default.
    assert!(!capture::notify_enabled(&writer).await.unwrap());
    writer.batch_execute(insert_three).await.unwrap();
    assert_quiet(&mut rx, "hint off by default").await;

    capture::set_notify(&writer, true).await.unwrap();
    capture::set_notify(&writer, true).await.unwrap();
    assert!(capture::notify_enabled(&writer).await.unwrap());
    writer.batch_execute(insert_three).await.unwrap();
    let n = next_notification(&mut rx).await;
    assert_eq!(n.channel(), "fraiseql_observers");
    assert_eq!(n.payload(), "");
    assert_quiet(&mut rx, "one statement, one hint").await;

    writer
        .execute(
            "SELECT core.log_mutation_event(gen_random_uuid(), NULL, 'Item', gen_random_uuid(), 'NOOP', 'noop:unchanged')",
            &[],
        )
        .await
        .unwrap();
    next_notification(&mut rx).await;

    capture::set_notify(&writer, false).await.unwrap();
    assert!(!capture::notify_enabled(&writer).await.unwrap());
    writer.batch_execute(insert_three).await.unwrap();
    assert_quiet(&mut rx, "hint switched off").await;

    let logged: i64 = writer
        .query_one("SELECT count(*) FROM core.tb_entity_change_log", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, 10, "capture is unaffected by the hint");
}
