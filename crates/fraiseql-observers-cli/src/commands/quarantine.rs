//! `quarantine list`: change-log rows the reader could not decode (`core.observer_quarantine`),
//! with the reason; `--json` adds the copy of each row as it was read.

use crate::table::{self, Table};
use crate::Cli;
use chrono::{DateTime, Utc};
use clap::Subcommand;
use serde_json::json;
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum QuarantineCommand {
    /// List quarantined rows, newest first.
    List {
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        consumer: Option<String>,
        /// Print JSON (with the row as read) instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub async fn execute(cli: &Cli, command: &QuarantineCommand) -> anyhow::Result<ExitCode> {
    let QuarantineCommand::List {
        limit,
        consumer,
        json,
    } = command;
    let client = super::connect_migrated(
        &super::database_url(cli, None)?,
        "fraiseql-observers-quarantine",
    )
    .await?;
    let rows = client
        .query(
            "SELECT consumer_id, sequence, reason, quarantined_at, row_data
               FROM core.observer_quarantine
              WHERE $1::text IS NULL OR consumer_id = $1
              ORDER BY quarantined_at DESC, sequence DESC
              LIMIT $2",
            &[consumer, limit],
        )
        .await?;
    if *json {
        let all: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "consumer_id": r.get::<_, String>(0),
                    "sequence": r.get::<_, i64>(1),
                    "reason": r.get::<_, String>(2),
                    "quarantined_at": r.get::<_, DateTime<Utc>>(3),
                    "row": r.get::<_, Option<serde_json::Value>>(4),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else if rows.is_empty() {
        println!("no quarantined rows");
    } else {
        let mut t = Table::new(&["CONSUMER", "SEQUENCE", "REASON", "QUARANTINED (UTC)"]);
        for r in &rows {
            t.row(vec![
                r.get(0),
                r.get::<_, i64>(1).to_string(),
                table::truncate(&r.get::<_, String>(2), 100),
                table::time(&r.get::<_, DateTime<Utc>>(3)),
            ]);
        }
        print!("{t}");
    }
    Ok(ExitCode::SUCCESS)
}
