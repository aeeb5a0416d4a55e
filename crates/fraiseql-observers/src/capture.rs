//! Opting tables into change capture, and switching the NOTIFY hint (SQL installed by migrations
//! 0004 and 0005).
//!
//! Invariant: this module holds no state and no SQL logic of its own. Every operation is one call of
//! a `core.observer_*` function, so the database stays the single source of truth (the registry
//! `core.observer_capture`, the generated triggers) and a `psql` user gets exactly the same
//! behaviour. Validation errors come back as [`Error::Database`] carrying the server's message
//! (which names the table and column).
//!
//! Rights: the generated trigger function is SECURITY INVOKER (migration 0008): rows are serialised
//! as the writer, and only `fraiseql_capture.write` (SECURITY DEFINER, plain values) inserts into
//! the log, so writers need no rights on it.
//!
//! What a captured table produces: one `core.tb_entity_change_log` row per inserted, updated or
//! deleted row, in the writer's transaction, written by an AFTER statement-level trigger. No-op
//! updates log nothing; an update that only changes an excluded column is logged with equal
//! before/after images. The tenant comes from the tenant column, else from the session setting
//! `fraiseql.tenant_id`; with neither, the user's write fails. The author comes from
//! `fraiseql.contact_id`.

use crate::error::{Error, Result};
use tokio_postgres::Client;

/// What to capture from one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureSpec {
    /// The table, as SQL would name it (`tb_user`, `public.tb_user`, `"My Table"`); resolved with
    /// the connection's `search_path`.
    pub table: String,
    /// The entity name written to `object_type` (`User`).
    pub entity: String,
    /// A UUID column holding the tenant; `None` takes the tenant from `fraiseql.tenant_id`.
    pub tenant_column: Option<String>,
    /// Columns never written to the change log (secrets such as `password_hash`).
    pub exclude_columns: Vec<String>,
    /// The UUID column holding the entity id (`object_id`), `id` by default.
    pub id_column: String,
}

impl CaptureSpec {
    /// Capture `table` as `entity`, with the id in `id`, the tenant from `fraiseql.tenant_id`, and
    /// every column included.
    pub fn new(table: impl Into<String>, entity: impl Into<String>) -> CaptureSpec {
        CaptureSpec {
            table: table.into(),
            entity: entity.into(),
            tenant_column: None,
            exclude_columns: Vec::new(),
            id_column: "id".to_string(),
        }
    }
}

/// One captured table, as recorded in `core.observer_capture`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureInfo {
    /// Schema-qualified, quoted where needed (`public.tb_user`).
    pub table: String,
    pub entity: String,
    pub id_column: String,
    pub tenant_column: Option<String>,
    pub exclude_columns: Vec<String>,
}

/// Start capturing a table, or redefine its capture (idempotent). Fails, naming the table and the
/// column, when the id or tenant column is missing or not a UUID, or an excluded column is missing.
pub async fn enable(client: &Client, spec: &CaptureSpec) -> Result<()> {
    if spec.entity.trim().is_empty() {
        return Err(Error::Invalid(format!(
            "capture of {}: the entity name is empty",
            spec.table
        )));
    }
    client
        .execute(
            "SELECT core.observer_enable_capture($1::text::regclass, $2, $3, $4, $5)",
            &[
                &spec.table,
                &spec.entity,
                &spec.tenant_column,
                &spec.exclude_columns,
                &spec.id_column,
            ],
        )
        .await?;
    tracing::info!(
        table = %spec.table,
        entity = %spec.entity,
        tenant_column = spec.tenant_column.as_deref().unwrap_or("-"),
        excluded = spec.exclude_columns.len(),
        "capture enabled"
    );
    Ok(())
}

/// Stop capturing a table (drops its triggers and generated function). A table that is not
/// captured is left as it is.
pub async fn disable(client: &Client, table: &str) -> Result<()> {
    client
        .execute(
            "SELECT core.observer_disable_capture($1::text::regclass)",
            &[&table],
        )
        .await?;
    tracing::info!(table, "capture disabled");
    Ok(())
}

/// Every captured table, ordered by name.
pub async fn list(client: &Client) -> Result<Vec<CaptureInfo>> {
    let rows = client
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) AS table_name,
                    r.entity, r.id_column, r.tenant_column, r.exclude_columns
               FROM core.observer_capture r
               JOIN pg_catalog.pg_class c ON c.oid = r.table_name::oid
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              ORDER BY 1",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| CaptureInfo {
            table: row.get(0),
            entity: row.get(1),
            id_column: row.get(2),
            tenant_column: row.get(3),
            exclude_columns: row.get(4),
        })
        .collect())
}

/// Switch the wake-up hint on or off: when on, every statement inserting into the change log sends
/// `NOTIFY fraiseql_observers` with an empty payload. It costs writers a cluster-wide lock at
/// commit; polling remains the source of truth either way.
pub async fn set_notify(client: &Client, enabled: bool) -> Result<()> {
    client
        .execute("SELECT core.observer_set_notify($1)", &[&enabled])
        .await?;
    tracing::info!(enabled, "change-log notify hint switched");
    Ok(())
}

/// Whether the wake-up hint is on.
pub async fn notify_enabled(client: &Client) -> Result<bool> {
    let row = client
        .query_one("SELECT core.observer_notify_enabled()", &[])
        .await?;
    Ok(row.get(0))
}

/// The channel the hint is sent on.
pub const NOTIFY_CHANNEL: &str = "fraiseql_observers";
