//! `core.observer_quarantine`: change-log rows a consumer could not decode, with the reason and
//! a copy of the row as read. The reader (`change_log.rs`) writes them and goes on; operators
//! read them here.

use crate::error::Result;
use chrono::{DateTime, Utc};
use tokio_postgres::Client;

/// One quarantined row.
#[derive(Debug, Clone, PartialEq)]
pub struct QuarantinedRow {
    pub consumer_id: String,
    pub sequence: i64,
    pub reason: String,
    pub quarantined_at: DateTime<Utc>,
    /// The change-log row as read (`None` when it was gone by the time it was quarantined).
    pub row: Option<serde_json::Value>,
}

/// Quarantined rows, newest first, of `consumer` (every consumer when `None`); at most `limit`.
pub async fn list(
    client: &Client,
    consumer: Option<&str>,
    limit: i64,
) -> Result<Vec<QuarantinedRow>> {
    Ok(client
        .query(
            "SELECT consumer_id, sequence, reason, quarantined_at, row_data
               FROM core.observer_quarantine
              WHERE $1::text IS NULL OR consumer_id = $1
              ORDER BY quarantined_at DESC, sequence DESC
              LIMIT $2",
            &[&consumer, &limit],
        )
        .await?
        .iter()
        .map(|r| QuarantinedRow {
            consumer_id: r.get(0),
            sequence: r.get(1),
            reason: r.get(2),
            quarantined_at: r.get(3),
            row: r.get(4),
        })
        .collect())
}
