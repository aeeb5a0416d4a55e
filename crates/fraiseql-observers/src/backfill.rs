//! Backfill: copy the rows a captured table already holds into the change log as snapshot
//! changes, so a new search index, cache or receiver starts from the current state (SQL of
//! migration 0010 and here).
//!
//! Invariants:
//!
//! * Only captured tables (`capture enable`): the snapshot rows are written exactly as the capture
//!   trigger writes a create (entity, id and tenant columns, excluded columns removed), with the
//!   Debezium read operation: `op` `r`, `source.snapshot` = `"incremental"`,
//!   `source.backfill` = the backfill's id, and `source.observers` when `--observer` named some.
//!   `modification_type` is `NOOP`, `change_status` is `existing`. The listener decodes them as
//!   [`EventKind::Snapshot`](crate::EventKind::Snapshot).
//! * Rows are read in primary-key order, in keyset pages (`WHERE key > last ORDER BY key LIMIT n`),
//!   each page in a short transaction of its own that reads the rows `FOR SHARE` and writes their
//!   snapshot rows. A writer that changes one of those rows waits for the page (its change-log row
//!   comes after the snapshot), and a page that reaches a row a writer has changed but not
//!   committed waits for it and copies the committed state (its snapshot comes after the
//!   change). So per entity the change log never holds a snapshot older than an earlier change:
//!   never stale-after-fresh.
//! * The progress (`last_key`, `rows_done`) moves in the page's own transaction: after a crash the
//!   backfill resumes after the last committed page: no row is skipped, none is copied twice.
//! * Throttled to `rate` rows per second over the run. Cancelling (`cancel`) takes effect at the
//!   next page: the page in progress either commits before the cancel or not at all.
//! * Serialising rows runs with the rights of the role running the backfill (as the capture
//!   trigger runs as the writer): run it as a role that may read the table.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::json;
use tokio_postgres::Client;
use uuid::Uuid;

use crate::error::{Error, Result};

/// The advisory lock class held (with the backfill's id) by the process running a backfill.
pub const LOCK_CLASS: i32 = 0x6662_6b66; // "fbkf"

/// What to backfill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackfillSpec {
    /// The captured table (`tb_user`, `app.tb_user`), resolved with the connection's
    /// `search_path`.
    pub table: String,
    /// An SQL condition on the table's columns (`status = 'active'`); rows it rejects are not
    /// copied.
    pub predicate: Option<String>,
    /// Only these observers receive the snapshot events; empty: every observer asking for
    /// `SNAPSHOT` events.
    pub observers: Vec<String>,
    /// Rows per page (one short transaction each).
    pub batch_size: u32,
    /// Rows per second at most.
    pub rate: Option<u32>,
    /// The tenant of rows whose tenant column is NULL (or of a table without one); else the
    /// session setting `fraiseql.tenant_id`, as for capture.
    pub tenant: Option<Uuid>,
}

impl BackfillSpec {
    pub fn new(table: impl Into<String>) -> BackfillSpec {
        BackfillSpec {
            table: table.into(),
            predicate: None,
            observers: Vec::new(),
            batch_size: 1000,
            rate: None,
            tenant: None,
        }
    }
}

/// A backfill as recorded in `core.observer_backfill`.
#[derive(Debug, Clone, PartialEq)]
pub struct BackfillInfo {
    pub id: i64,
    /// Schema-qualified, quoted where needed.
    pub table: String,
    pub predicate: Option<String>,
    pub observers: Vec<String>,
    /// `running` (unfinished: being run, or interrupted and resumable), `done` or `cancelled`.
    pub state: String,
    /// Whether a process is running it now (holds its lock).
    pub active: bool,
    pub rows_done: i64,
    pub rows_estimate: Option<i64>,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Where a run stands, after each page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub rows_done: i64,
    pub rows_estimate: Option<i64>,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every row was copied.
    Done { rows: i64 },
    /// Someone cancelled it (`backfill cancel`).
    Cancelled { rows: i64 },
}

/// A backfill taken by this process (its lock held on `client`'s session until the client is
/// dropped or the run ends).
#[derive(Debug)]
pub struct Backfill {
    pub id: i64,
    /// Whether it continues an interrupted backfill.
    pub resumed: bool,
    sql: PageSql,
    rate: Option<u32>,
    rows_estimate: Option<i64>,
}

/// The statements of one backfill, built once from the catalogs.
#[derive(Debug)]
struct PageSql {
    first: String,
    next: String,
}

/// What the catalogs say about the table.
struct TableInfo {
    oid: u32,
    schema: String,
    name: String,
    entity: String,
    id_column: String,
    tenant_column: Option<String>,
    exclude_columns: Vec<String>,
    /// (column, type as SQL) of the key pages are ordered by.
    key: Vec<(String, String)>,
}

fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

async fn table_info(client: &Client, table: &str) -> Result<TableInfo> {
    let row = client
        .query_opt(
            "SELECT c.oid, n.nspname::text, c.relname::text, r.entity, r.id_column, r.tenant_column,
                    r.exclude_columns
               FROM pg_catalog.pg_class c
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
               LEFT JOIN core.observer_capture r ON r.table_name = c.oid
              WHERE c.oid = to_regclass($1)",
            &[&table],
        )
        .await?
        .ok_or_else(|| Error::Invalid(format!("backfill: no table {table}")))?;
    let oid: u32 = row.get(0);
    let entity: Option<String> = row.get(3);
    let Some(entity) = entity else {
        return Err(Error::Invalid(format!(
            "backfill: {table} is not captured; run `fraiseql-observers capture enable --table {table} --entity ...` first (a backfill writes its rows as capture does)"
        )));
    };
    let id_column: String = row.get(4);
    let mut key: Vec<(String, String)> = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
               FROM pg_catalog.pg_index i
              CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
               JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
              WHERE i.indrelid = $1 AND i.indisprimary
              ORDER BY k.ord",
            &[&oid],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    if key.is_empty() {
        // No primary key: the id column, when a unique index covers exactly it.
        let unique: bool = client
            .query_one(
                "SELECT EXISTS (
                     SELECT 1 FROM pg_catalog.pg_index i
                       JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid
                      WHERE i.indrelid = $1 AND i.indisunique AND i.indpred IS NULL
                        AND i.indnkeyatts = 1 AND a.attnum = i.indkey[0] AND a.attname = $2)",
                &[&oid, &id_column],
            )
            .await?
            .get(0);
        if !unique {
            return Err(Error::Invalid(format!(
                "backfill: {table} has no primary key and no unique index on its id column {id_column}; a backfill pages in key order and needs one"
            )));
        }
        key.push((id_column.clone(), "uuid".into()));
    }
    Ok(TableInfo {
        oid,
        schema: row.get(1),
        name: row.get(2),
        entity,
        id_column,
        tenant_column: row.get(5),
        exclude_columns: row.get(6),
        key,
    })
}

/// The page statements. `$1` is the resume key (text form, `next` only), the rest is inlined:
/// `$1`/`$2` of the first page are the batch size and the source block.
fn page_sql(info: &TableInfo, predicate: Option<&str>, tenant: Option<Uuid>) -> PageSql {
    let table = format!("{}.{}", ident(&info.schema), ident(&info.name));
    let keys: Vec<String> = info
        .key
        .iter()
        .map(|(c, _)| format!("t.{}", ident(c)))
        .collect();
    let key_list = keys.join(", ");
    let p_keys: Vec<String> = info
        .key
        .iter()
        .map(|(c, _)| format!("p.{}", ident(c)))
        .collect();
    let p_key_list = p_keys.join(", ");
    let last_key = format!(
        "ARRAY[{}]",
        p_keys
            .iter()
            .map(|k| format!("{k}::text"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let resume = info
        .key
        .iter()
        .enumerate()
        .map(|(i, (_, ty))| format!("($1::text[])[{}]::{ty}", i + 1))
        .collect::<Vec<_>>()
        .join(", ");
    let predicate = predicate.map(|p| format!(" AND ({p})")).unwrap_or_default();
    let table_text = literal(&format!("{}.{}", ident(&info.schema), ident(&info.name)));
    let tenant_fallback = match tenant {
        Some(t) => format!("'{t}'::uuid"),
        None => format!(
            "(SELECT core.observer_capture_tenant({table_text}, {}))",
            info.tenant_column
                .as_deref()
                .map(literal)
                .unwrap_or_else(|| "NULL".into())
        ),
    };
    let tenant_expr = match &info.tenant_column {
        Some(c) => format!("COALESCE(p.{}, {tenant_fallback})", ident(c)),
        None => tenant_fallback,
    };
    let id_expr = format!(
        "COALESCE(p.{}, (SELECT core.observer_capture_missing_id({table_text}, {})))",
        ident(&info.id_column),
        literal(&info.id_column)
    );
    let excluded = if info.exclude_columns.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = info.exclude_columns.iter().map(|c| literal(c)).collect();
        format!(" - ARRAY[{}]::text[]", list.join(", "))
    };
    let build = |where_key: &str, limit: &str, source: &str| {
        format!(
            "WITH page AS (
                 SELECT t.* FROM {table} t
                  WHERE true{where_key}{predicate}
                  ORDER BY {key_list}
                  LIMIT {limit}
                    FOR SHARE OF t
             ), written AS (
                 INSERT INTO core.tb_entity_change_log
                        (fk_customer_org, object_type, object_id, modification_type, change_status, object_data)
                 SELECT {tenant_expr}, {entity}, {id_expr}, 'NOOP', 'existing',
                        jsonb_build_object('before', NULL::jsonb, 'after', to_jsonb(p.*){excluded}, 'op', 'r',
                                           'source', {source}::jsonb || jsonb_build_object(
                                               'db', current_database(),
                                               'txId', pg_current_xact_id()::text::bigint,
                                               'ts_ms', floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint,
                                               'ts_us', floor(extract(epoch FROM clock_timestamp()) * 1000000)::bigint))
                   FROM page p
                  ORDER BY {p_key_list}
                 RETURNING 1
             )
             SELECT (SELECT count(*) FROM written),
                    (SELECT {last_key} FROM page p ORDER BY {p_key_list} DESC LIMIT 1)",
            entity = literal(&info.entity),
        )
    };
    PageSql {
        first: build("", "$1", "$2"),
        next: build(&format!(" AND ({key_list}) > ({resume})"), "$2", "$3"),
    }
}

impl Backfill {
    /// Start a backfill of `spec.table`, or resume its unfinished one (same predicate and
    /// observers; the batch size, rate and tenant of `spec` apply from now on). Takes the
    /// backfill's lock on `client`'s session: fails when another process runs it.
    pub async fn start(client: &Client, spec: &BackfillSpec) -> Result<Backfill> {
        if spec.batch_size == 0 {
            return Err(Error::Invalid(
                "backfill: --batch must be at least 1".into(),
            ));
        }
        if spec.rate == Some(0) {
            return Err(Error::Invalid("backfill: --rate must be at least 1".into()));
        }
        let info = table_info(client, &spec.table).await?;
        let predicate = spec
            .predicate
            .as_deref()
            .map(str::trim)
            .filter(|p| !p.is_empty());
        // The predicate is checked by the server before anything is written.
        if let Some(p) = predicate {
            let table = format!("{}.{}", ident(&info.schema), ident(&info.name));
            client
                .execute(&format!("SELECT 1 FROM {table} t WHERE ({p}) LIMIT 0"), &[])
                .await
                .map_err(|e| {
                    Error::Invalid(format!(
                        "backfill: the --where predicate does not work on {table}: {}",
                        e.as_db_error().map(|d| d.message()).unwrap_or("invalid")
                    ))
                })?;
        }
        let batch = i32::try_from(spec.batch_size).unwrap_or(i32::MAX);
        let rate = spec.rate.map(|r| i32::try_from(r).unwrap_or(i32::MAX));
        let existing = client
            .query_opt(
                "SELECT id, predicate, observers FROM core.observer_backfill
                  WHERE table_name = $1::oid::regclass AND state = 'running'",
                &[&info.oid],
            )
            .await?;
        let (id, resumed) = match existing {
            Some(row) => {
                let id: i64 = row.get(0);
                let stored_predicate: Option<String> = row.get(1);
                let stored_observers: Vec<String> = row.get(2);
                if stored_predicate.as_deref() != predicate || stored_observers != spec.observers {
                    return Err(Error::Invalid(format!(
                        "backfill: {} has an unfinished backfill ({id}) with another --where or --observer; run it again with the same options to finish it, or `fraiseql-observers backfill cancel --table {}`",
                        spec.table, spec.table
                    )));
                }
                (id, true)
            }
            None => {
                let estimate = estimate(client, &info, predicate).await?;
                let row = client
                    .query_one(
                        "INSERT INTO core.observer_backfill
                                (table_name, predicate, observers, tenant, batch_size, rate_per_second, rows_estimate)
                         VALUES ($1::oid::regclass, $2, $3, $4, $5, $6, $7)
                         RETURNING id",
                        &[&info.oid, &predicate, &spec.observers, &spec.tenant, &batch, &rate, &estimate],
                    )
                    .await?;
                (row.get(0), false)
            }
        };
        let locked: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock($1, $2::bigint::int)",
                &[&LOCK_CLASS, &id],
            )
            .await?
            .get(0);
        if !locked {
            return Err(Error::Invalid(format!(
                "backfill {id} of {} is being run by another process",
                spec.table
            )));
        }
        let row = client
            .query_one(
                "UPDATE core.observer_backfill
                    SET batch_size = $2, rate_per_second = $3, tenant = COALESCE($4, tenant), updated_at = now()
                  WHERE id = $1
                  RETURNING tenant, rows_estimate",
                &[&id, &batch, &rate, &spec.tenant],
            )
            .await?;
        let tenant: Option<Uuid> = row.get(0);
        tracing::info!(backfill = id, table = %spec.table, resumed, "backfill taken");
        Ok(Backfill {
            id,
            resumed,
            sql: page_sql(&info, predicate, tenant),
            rate: spec.rate,
            rows_estimate: row.get(1),
        })
    }

    /// Copy page after page until every row is copied or the backfill is cancelled; `progress`
    /// is called after each page.
    pub async fn run(
        &self,
        client: &mut Client,
        mut progress: impl FnMut(Progress),
    ) -> Result<Outcome> {
        let started = Instant::now();
        let mut copied_here: i64 = 0;
        let source_base = |observers: &[String]| {
            let mut source = json!({
                "schema": null, "table": null, "snapshot": "incremental", "backfill": self.id,
            });
            if !observers.is_empty() {
                source["observers"] = json!(observers);
            }
            source
        };
        loop {
            let tx = client.transaction().await?;
            let row = tx
                .query_opt(
                    "SELECT b.state, b.last_key, b.batch_size, b.rows_done, b.observers,
                            n.nspname::text, c.relname::text
                       FROM core.observer_backfill b
                       JOIN pg_catalog.pg_class c ON c.oid = b.table_name
                       JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                      WHERE b.id = $1
                        FOR UPDATE OF b",
                    &[&self.id],
                )
                .await?
                .ok_or_else(|| Error::Invalid(format!("backfill {} is gone", self.id)))?;
            let state: String = row.get(0);
            let rows_done: i64 = row.get(3);
            if state != "running" {
                tx.rollback().await?;
                self.unlock(client).await?;
                tracing::info!(backfill = self.id, rows_done, "backfill cancelled");
                return Ok(Outcome::Cancelled { rows: rows_done });
            }
            let last_key: Option<Vec<String>> = row.get(1);
            let batch: i32 = row.get(2);
            let observers: Vec<String> = row.get(4);
            let mut source = source_base(&observers);
            source["schema"] = json!(row.get::<_, String>(5));
            source["table"] = json!(row.get::<_, String>(6));
            let limit = i64::from(batch);
            let page = match &last_key {
                None => tx.query_one(&self.sql.first, &[&limit, &source]).await?,
                Some(key) => {
                    tx.query_one(&self.sql.next, &[key, &limit, &source])
                        .await?
                }
            };
            let written: i64 = page.get(0);
            let new_key: Option<Vec<String>> = page.get(1);
            let done = written < limit;
            tx.execute(
                "UPDATE core.observer_backfill
                    SET last_key = COALESCE($2, last_key), rows_done = rows_done + $3,
                        updated_at = now(),
                        state = CASE WHEN $4 THEN 'done' ELSE state END,
                        finished_at = CASE WHEN $4 THEN now() END
                  WHERE id = $1",
                &[&self.id, &new_key, &written, &done],
            )
            .await?;
            tx.commit().await?;
            copied_here += written;
            let rows_done = rows_done + written;
            progress(Progress {
                rows_done,
                rows_estimate: self.rows_estimate,
            });
            if done {
                self.unlock(client).await?;
                tracing::info!(backfill = self.id, rows_done, "backfill done");
                return Ok(Outcome::Done { rows: rows_done });
            }
            if let Some(rate) = self.rate {
                let due = Duration::from_secs_f64(copied_here as f64 / f64::from(rate));
                let elapsed = started.elapsed();
                if due > elapsed {
                    tokio::time::sleep(due - elapsed).await;
                }
            }
        }
    }

    async fn unlock(&self, client: &Client) -> Result<()> {
        client
            .execute(
                "SELECT pg_advisory_unlock($1, $2::bigint::int)",
                &[&LOCK_CLASS, &self.id],
            )
            .await?;
        Ok(())
    }
}

/// How many rows the backfill will copy: exact with a predicate, the planner's estimate without
/// one (exact when the table was never analysed).
async fn estimate(
    client: &Client,
    info: &TableInfo,
    predicate: Option<&str>,
) -> Result<Option<i64>> {
    let table = format!("{}.{}", ident(&info.schema), ident(&info.name));
    if predicate.is_none() {
        let reltuples: f32 = client
            .query_one(
                "SELECT reltuples FROM pg_catalog.pg_class WHERE oid = $1",
                &[&info.oid],
            )
            .await?
            .get(0);
        if reltuples >= 0.0 {
            return Ok(Some(reltuples as i64));
        }
    }
    let predicate = predicate
        .map(|p| format!(" WHERE ({p})"))
        .unwrap_or_default();
    let count: i64 = client
        .query_one(&format!("SELECT count(*) FROM {table} t{predicate}"), &[])
        .await?
        .get(0);
    Ok(Some(count))
}

/// Every backfill, the newest first.
pub async fn list(client: &Client) -> Result<Vec<BackfillInfo>> {
    let rows = client
        .query(
            "SELECT b.id, COALESCE(format('%I.%I', n.nspname, c.relname), b.table_name::oid::text),
                    b.predicate, b.observers, b.state,
                    EXISTS (SELECT 1 FROM pg_catalog.pg_locks l
                             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                               AND l.classid = $1::int::oid AND l.objid = b.id::int::oid
                               AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())),
                    b.rows_done, b.rows_estimate, b.started_at, b.updated_at, b.finished_at
               FROM core.observer_backfill b
               LEFT JOIN pg_catalog.pg_class c ON c.oid = b.table_name
               LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              ORDER BY b.id DESC",
            &[&LOCK_CLASS],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| BackfillInfo {
            id: r.get(0),
            table: r.get(1),
            predicate: r.get(2),
            observers: r.get(3),
            state: r.get(4),
            active: r.get(5),
            rows_done: r.get(6),
            rows_estimate: r.get(7),
            started_at: r.get(8),
            updated_at: r.get(9),
            finished_at: r.get(10),
        })
        .collect())
}

/// Cancel the unfinished backfill of `table` (a process running it stops at its next page).
/// Returns its id, or `None` when the table has no unfinished backfill.
pub async fn cancel(client: &Client, table: &str) -> Result<Option<i64>> {
    let row = client
        .query_opt(
            "UPDATE core.observer_backfill
                SET state = 'cancelled', finished_at = now(), updated_at = now()
              WHERE table_name = to_regclass($1) AND state = 'running'
              RETURNING id",
            &[&table],
        )
        .await?;
    let id = row.map(|r| r.get(0));
    tracing::info!(table, backfill = ?id, "backfill cancel requested");
    Ok(id)
}
