//! The reader's connection and statements: opening it (primary only, shape discovered,
//! statements prepared, LISTEN issued), the SQL of the batch, page and chunk queries, and the
//! calls that run them. The reader (`change_log.rs`) decides what to read; this runs it.

use super::change_log::ListenerStats;
use super::parser::{ChangeLogRowRef, TableShape};
use super::sizing::ReadFailure;
use super::snapshot::Snapshot;
use super::ListenerConfig;
use crate::db;
use crate::error::{Error, Result};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_postgres::{Client, Row, Statement};

pub(super) struct Connection {
    /// Shared with the task prefetching the next chunk.
    pub(super) client: Arc<Client>,
    pub(super) notifications: Option<mpsc::UnboundedReceiver<()>>,
    pub(super) snapshot: Statement,
    pub(super) poll: Statement,
    pub(super) ids: Statement,
    pub(super) ids_range: Statement,
    pub(super) max_sequence: Statement,
    pub(super) chunk: ChunkStatements,
    pub(super) quarantine: Statement,
}

/// The two forms of the chunk query: by a list of sequences, or by a range when the chunk's
/// sequences are consecutive (one index range scan instead of one index probe per row).
#[derive(Clone)]
pub(super) struct ChunkStatements {
    pub(super) list: Statement,
    pub(super) range: Statement,
}

/// Open the reader's connection: primary only, shape discovered, statements prepared, LISTEN
/// issued (when enabled) before the first poll.
pub(super) async fn open(
    db_config: &tokio_postgres::Config,
    config: &ListenerConfig,
) -> Result<(Connection, TableShape)> {
    let application = format!("fraiseql-observers-listener:{}", config.consumer_id);
    let (client, notifications) = if config.notify {
        let (client, rx) = db::connect_with_notifications(db_config, &application).await?;
        client.batch_execute("LISTEN fraiseql_observers").await?;
        (client, Some(rx))
    } else {
        (db::connect(db_config, &application).await?, None)
    };
    if let Some(timeout) = config.statement_timeout {
        client
            .batch_execute(&format!(
                "SET statement_timeout = {}",
                timeout.as_millis().max(1)
            ))
            .await?;
    }
    let in_recovery: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await?
        .get(0);
    if in_recovery {
        return Err(Error::ReadOnlyStandby);
    }
    let columns = super::range::columns(&client).await?;
    if !columns
        .iter()
        .any(|(name, ty)| name == "txid" && ty == "xid8")
    {
        return Err(Error::ChangeLogShape(
            "core.tb_entity_change_log has no txid xid8 column: run `fraiseql-observers migrate`"
                .into(),
        ));
    }
    let shape = TableShape::from_columns(&columns)?;
    let seq = shape.sequence_column();
    let snapshot = client.prepare("SELECT pg_current_snapshot()::text").await?;
    let poll = client.prepare(&poll_sql(seq)).await?;
    let ids = client.prepare(&batch_ids_page_sql(seq)).await?;
    let ids_range = client.prepare(&batch_ids_range_sql(seq)).await?;
    let max_sequence = client
        .prepare(&format!(
            "SELECT max(l.{seq}) FROM core.tb_entity_change_log l"
        ))
        .await?;
    let chunk = ChunkStatements {
        list: client.prepare(&chunk_rows_sql(&shape)).await?,
        range: client.prepare(&chunk_range_sql(&shape)).await?,
    };
    let quarantine = client
        .prepare(&format!(
            "INSERT INTO core.observer_quarantine (consumer_id, sequence, reason, row_data)
             SELECT $1, $2, $3, (SELECT to_jsonb(l) FROM core.tb_entity_change_log l WHERE l.{seq} = $2)
             ON CONFLICT (consumer_id, sequence) DO NOTHING"
        ))
        .await?;
    Ok((
        Connection {
            client: Arc::new(client),
            notifications,
            snapshot,
            poll,
            ids,
            ids_range,
            max_sequence,
            chunk,
            quarantine,
        },
        shape,
    ))
}

/// Record a row that cannot be decoded, with a copy of it, so it is visible and nothing is lost.
pub(super) async fn quarantine(
    conn: &Connection,
    consumer: &str,
    stats: &ListenerStats,
    sequence: i64,
    reason: &str,
) -> Result<()> {
    stats.statements.fetch_add(1, Ordering::Relaxed);
    let copied = conn
        .client
        .execute(&conn.quarantine, &[&consumer, &sequence, &reason])
        .await;
    match copied {
        Ok(_) => {}
        // The row cannot even be copied (the server fails on it): record it without the copy.
        Err(e) if ReadFailure::of_db(&e).is_some() => {
            stats.statements.fetch_add(1, Ordering::Relaxed);
            conn.client
                .execute(
                    "INSERT INTO core.observer_quarantine (consumer_id, sequence, reason)
                     VALUES ($1, $2, $3) ON CONFLICT (consumer_id, sequence) DO NOTHING",
                    &[&consumer, &sequence, &reason],
                )
                .await?;
        }
        Err(e) => return Err(e.into()),
    }
    stats.quarantined.fetch_add(1, Ordering::Relaxed);
    metrics::counter!(crate::metrics::ROWS_QUARANTINED).increment(1);
    tracing::warn!(
        consumer,
        sequence,
        reason,
        "change-log row cannot be decoded; quarantined in core.observer_quarantine"
    );
    Ok(())
}

/// The batch query: sequences of the rows visible in `$4` (the upper snapshot) and not in the
/// lower one, whose xmax is `$1` and xip `$3`; `$2` is the upper xmax and `$5` the last sequence
/// already handled. Two index-friendly halves: written as one `OR`, a generic plan scans the
/// whole table (correctness.md section 2).
pub fn batch_ids_sql(seq: &str) -> String {
    format!(
        "SELECT b.seq FROM (
             SELECT l.txid, l.{seq} AS seq FROM core.tb_entity_change_log l
              WHERE l.txid >= $1::text::xid8 AND l.txid < $2::text::xid8
           UNION ALL
             SELECT l.txid, l.{seq} AS seq FROM core.tb_entity_change_log l
              WHERE l.txid = ANY ($3::text[]::xid8[]) AND l.txid < $1::text::xid8
         ) b
         WHERE pg_visible_in_snapshot(b.txid, $4::text::pg_snapshot) AND b.seq > $5
         ORDER BY b.seq"
    )
}

/// One poll in one round trip: the current snapshot (as text) and the first page of the batch
/// from the snapshot `$4` (whose xmax is `$1` and xip `$2`) to it: the sequences of the rows
/// visible in the current snapshot and not in `$4`, at most `$3` of them, ascending (an empty
/// array when the snapshot has not moved). The statement's own snapshot is the one it returns
/// (`pg_current_snapshot()` is the active snapshot), so it sees every row of the transactions
/// visible in it. The same two index-friendly halves as [`batch_ids_sql`]; `OFFSET 0` keeps the
/// snapshot one value rather than a call per row.
pub fn poll_sql(seq: &str) -> String {
    format!(
        "SELECT s.snap::text, ARRAY(
             SELECT b.seq FROM (
                 SELECT l.txid, l.{seq} AS seq FROM core.tb_entity_change_log l
                  WHERE l.txid >= $1::text::xid8 AND l.txid < pg_snapshot_xmax(s.snap)
               UNION ALL
                 SELECT l.txid, l.{seq} AS seq FROM core.tb_entity_change_log l
                  WHERE l.txid = ANY ($2::text[]::xid8[]) AND l.txid < $1::text::xid8
             ) b
             WHERE s.snap::text <> $4 AND pg_visible_in_snapshot(b.txid, s.snap)
             ORDER BY b.seq
             LIMIT $3)
           FROM (SELECT pg_current_snapshot() AS snap OFFSET 0) s"
    )
}

/// [`batch_ids_sql`] one page at a time: at most `$6` sequences (keyset on `$5`).
pub fn batch_ids_page_sql(seq: &str) -> String {
    format!("{} LIMIT $6", batch_ids_sql(seq))
}

/// The later pages of a large batch: the sequences after `$1` and at most `$2` of the rows visible
/// in `$3` (the upper snapshot) and not in `$4` (the lower one), at most `$5` of them, ascending.
/// A range scan of the sequence's index: over all the pages of a batch each sequence of its range
/// is read once, where the snapshot-diff query would scan the whole batch for every page.
pub fn batch_ids_range_sql(seq: &str) -> String {
    format!(
        "SELECT l.{seq} FROM core.tb_entity_change_log l
          WHERE l.{seq} > $1 AND l.{seq} <= $2
            AND pg_visible_in_snapshot(l.txid, $3::text::pg_snapshot)
            AND NOT pg_visible_in_snapshot(l.txid, $4::text::pg_snapshot)
          ORDER BY l.{seq}
          LIMIT $5"
    )
}

/// The chunk query: the rows whose sequences are in `$1` (`bigint[]`, ascending), in sequence
/// order, selected with [`TableShape::select_list`].
pub fn chunk_rows_sql(shape: &TableShape) -> String {
    let seq = shape.sequence_column();
    format!(
        "SELECT {} FROM core.tb_entity_change_log l WHERE l.{seq} = ANY ($1::bigint[]) ORDER BY l.{seq}",
        shape.select_list()
    )
}

/// The chunk query for consecutive sequences: the rows with a sequence from `$1` to `$2`, in
/// sequence order, selected with [`TableShape::select_list`].
pub fn chunk_range_sql(shape: &TableShape) -> String {
    let seq = shape.sequence_column();
    format!(
        "SELECT {} FROM core.tb_entity_change_log l WHERE l.{seq} BETWEEN $1 AND $2 ORDER BY l.{seq}",
        shape.select_list()
    )
}

/// Fetch the rows of `ids` (ascending sequences), in sequence order. When the ids are
/// consecutive, every row in their range is one of them, so the range query returns exactly the
/// rows the list query would.
pub(super) async fn fetch_chunk(
    client: Arc<Client>,
    statements: ChunkStatements,
    ids: Vec<i64>,
) -> Result<Vec<Row>> {
    let (Some(&first), Some(&last)) = (ids.first(), ids.last()) else {
        return Ok(Vec::new());
    };
    let consecutive = i128::from(last) - i128::from(first) + 1 == ids.len() as i128;
    let rows = if consecutive {
        client.query(&statements.range, &[&first, &last]).await?
    } else {
        client.query(&statements.list, &[&ids]).await?
    };
    Ok(rows)
}

pub(super) async fn current_snapshot(conn: &Connection) -> Result<Snapshot> {
    let text: String = conn.client.query_one(&conn.snapshot, &[]).await?.get(0);
    text.parse()
}

/// The current snapshot and the sequences of the rows visible in it and not in `lower`,
/// ascending, at most `limit` of them: one statement ([`poll_sql`]).
pub(super) async fn poll(
    conn: &Connection,
    lower: &Snapshot,
    limit: usize,
) -> Result<(Snapshot, Vec<i64>)> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let row = conn
        .client
        .query_one(
            &conn.poll,
            &[
                &lower.xmax.to_string(),
                &lower.xip_text(),
                &limit,
                &lower.to_string(),
            ],
        )
        .await?;
    let text: String = row.get(0);
    Ok((text.parse()?, row.get(1)))
}

/// Sequences of the rows visible in `upper` and not in `lower`, after `after`, ascending, at
/// most `limit` of them.
pub(super) async fn batch_ids(
    conn: &Connection,
    lower: &Snapshot,
    upper: &Snapshot,
    after: i64,
    limit: usize,
) -> Result<Vec<i64>> {
    let lower_xmax = lower.xmax.to_string();
    let upper_xmax = upper.xmax.to_string();
    let upper_text = upper.to_string();
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = conn
        .client
        .query(
            &conn.ids,
            &[
                &lower_xmax,
                &upper_xmax,
                &lower.xip_text(),
                &upper_text,
                &after,
                &limit,
            ],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// [`batch_ids`] for sequences after `after` and at most `up_to`, by a range scan.
pub(super) async fn batch_ids_in_range(
    conn: &Connection,
    lower: &Snapshot,
    upper: &Snapshot,
    after: i64,
    up_to: i64,
    limit: usize,
) -> Result<Vec<i64>> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = conn
        .client
        .query(
            &conn.ids_range,
            &[
                &after,
                &up_to,
                &upper.to_string(),
                &lower.to_string(),
                &limit,
            ],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The bytes a row holds once read: its text plus a little for the typed columns.
pub(super) fn row_bytes(row: &ChangeLogRowRef<'_>) -> usize {
    let text = [
        row.change_id,
        row.tenant,
        row.author,
        row.object_type,
        row.object_id,
        row.modification_type,
        row.change_status,
        row.object_data,
        row.object_data_before,
        row.extra_metadata,
    ];
    32 + text.iter().map(|t| t.map_or(0, str::len)).sum::<usize>()
}

/// The size of the largest of the newest rows of the log, to size the first chunk before any was
/// read. `None` when the log is empty or the sample cannot be read (it is only an estimate).
pub(super) async fn sample_row_bytes(conn: &Connection, shape: &TableShape) -> Option<usize> {
    let seq = shape.sequence_column();
    let sql = format!(
        "SELECT max(octet_length(s::text))::bigint FROM (
             SELECT {} FROM core.tb_entity_change_log l ORDER BY l.{seq} DESC LIMIT 100) s",
        shape.select_list()
    );
    let row = conn.client.query_one(&sql, &[]).await.ok()?;
    let bytes: Option<i64> = row.get(0);
    bytes.and_then(|b| usize::try_from(b).ok())
}
