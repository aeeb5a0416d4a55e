//! How far a consumer is behind: the committed changes its checkpoint does not cover yet, and
//! how old the oldest of them is. Read-only; run by the pipeline's monitor on a connection of its
//! own.

use super::change_log::batch_ids_sql;
use super::snapshot::Snapshot;
use crate::error::Result;
use tokio_postgres::Client;

/// What a consumer has yet to process.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Backlog {
    /// Committed change-log rows not covered by the stored checkpoint. Rows of a batch in
    /// progress count until the batch is done: an upper bound.
    pub rows: u64,
    /// Age of the oldest of them, in seconds (0 when there is none).
    pub lag_seconds: f64,
}

/// The backlog of `consumer`, whose change log orders rows by `sequence_column`
/// (`ChangeLogListener::sequence_column`). `None` when the consumer has no checkpoint yet.
pub async fn measure(
    client: &Client,
    consumer: &str,
    sequence_column: &str,
) -> Result<Option<Backlog>> {
    let row = client
        .query_opt(
            "SELECT snapshot::text, pg_current_snapshot()::text
               FROM core.observer_checkpoints WHERE consumer_id = $1",
            &[&consumer],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let lower: Snapshot = row.get::<_, String>(0).parse()?;
    let current: Snapshot = row.get::<_, String>(1).parse()?;
    let ids = batch_ids_sql(sequence_column);
    let counted = client
        .query_one(
            &format!(
                "SELECT count(*), min(x.seq), (SELECT extract(epoch FROM now() - l.created_at)::float8
                    FROM core.tb_entity_change_log l WHERE l.{sequence_column} = min(x.seq))
                   FROM ({ids}) x"
            ),
            &[
                &lower.xmax.to_string(),
                &current.xmax.to_string(),
                &lower.xip_text(),
                &current.to_string(),
                &i64::MIN,
            ],
        )
        .await?;
    Ok(Some(Backlog {
        rows: counted.get::<_, i64>(0).max(0) as u64,
        lag_seconds: counted.get::<_, Option<f64>>(2).unwrap_or(0.0).max(0.0),
    }))
}
