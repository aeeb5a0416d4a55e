//! Reading a range of past changes by sequence, for operators: explain what an event did,
//! replay a range for one observer. Not gap-safe reading (that is `change_log.rs`): a range of
//! sequences names rows that are already committed.

use super::parser::{self, ChangeLogRow, TableShape};
use crate::error::{Error, Result};
use crate::event::{EntityEvent, Position};
use tokio_postgres::Client;

/// The change log's columns and their types, from the catalog (none when the table is missing).
pub async fn columns(client: &Client) -> Result<Vec<(String, String)>> {
    Ok(client
        .query(TableShape::CATALOG_QUERY, &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// The change log's shape, from the catalog.
pub async fn discover(client: &Client) -> Result<TableShape> {
    TableShape::from_columns(&columns(client).await?)
}

/// The rows with `from <= sequence <= to`, in sequence order, decoded (a row that cannot be
/// decoded comes back as its sequence and the reason). At most `limit` rows.
pub async fn read(
    client: &Client,
    shape: &TableShape,
    from: i64,
    to: i64,
    limit: i64,
) -> Result<Vec<std::result::Result<EntityEvent, (i64, String)>>> {
    if from > to {
        return Err(Error::Invalid(format!("empty range {from}..={to}")));
    }
    let seq = shape.sequence_column();
    let rows = client
        .query(
            &format!(
                "SELECT {} FROM core.tb_entity_change_log l
                  WHERE l.{seq} BETWEEN $1 AND $2 ORDER BY l.{seq} LIMIT $3",
                shape.select_list()
            ),
            &[&from, &to, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| {
            let sequence: i64 = row.get(0);
            let position = Position { batch: 0, sequence };
            ChangeLogRow::from_row(row)
                .and_then(|raw| parser::decode(shape, &raw, position))
                .map_err(|e| (sequence, e.reason))
        })
        .collect())
}
