//! `quarantine list`: change-log rows the reader could not decode (`core.observer_quarantine`),
//! with the reason; `--json` adds the copy of each row as it was read.

use crate::table::{self, Table};
use crate::Cli;
use clap::Subcommand;
use fraiseql_observers::listener::quarantine;
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
    let rows = quarantine::list(&client, consumer.as_deref(), *limit).await?;
    if *json {
        let all: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "consumer_id": r.consumer_id,
                    "sequence": r.sequence,
                    "reason": r.reason,
                    "quarantined_at": r.quarantined_at,
                    "row": r.row,
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
                r.consumer_id.clone(),
                r.sequence.to_string(),
                table::truncate(&r.reason, 100),
                table::time(&r.quarantined_at),
            ]);
        }
        print!("{t}");
    }
    Ok(ExitCode::SUCCESS)
}
