//! `checkpoint show | reset`: where each consumer stands (`core.observer_checkpoints`).
//!
//! Invariant: `reset` runs only while it holds the consumer's leader lock itself, so it never
//! moves the checkpoint under a running daemon (stop the daemon first; standbys may keep waiting).

use crate::table::{self, Table};
use crate::Cli;
use anyhow::bail;
use clap::{Subcommand, ValueEnum};
use fraiseql_observers::operator::{self, ConsumerStatus, Reset};
use fraiseql_observers::StartPosition;
use std::process::ExitCode;
use tokio_postgres::Client;

const APP: &str = "fraiseql-observers-checkpoint-cli";

#[derive(Debug, Subcommand)]
pub enum CheckpointCommand {
    /// Show the checkpoint of one consumer, or of every consumer.
    Show {
        #[arg(long)]
        consumer: Option<String>,
    },
    /// Forget where a consumer stands and start again (e.g. after the database was restored).
    /// The daemon of that consumer must be stopped.
    Reset {
        #[arg(long)]
        consumer: String,
        /// `now`: only changes committed from now on; `beginning`: every change in the log again.
        #[arg(long, value_enum, default_value_t = ResetFrom::Now)]
        from: ResetFrom,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ResetFrom {
    Now,
    Beginning,
}

pub async fn execute(cli: &Cli, command: &CheckpointCommand) -> anyhow::Result<ExitCode> {
    let client = super::connect_migrated(&super::database_url(cli, None)?, APP).await?;
    match command {
        CheckpointCommand::Show { consumer } => show(&client, consumer.as_deref()).await,
        CheckpointCommand::Reset { consumer, from } => reset(&client, consumer, *from).await,
    }
}

async fn show(client: &Client, consumer: Option<&str>) -> anyhow::Result<ExitCode> {
    let consumers = operator::consumers(client, consumer).await?;
    if consumers.is_empty() {
        match consumer {
            Some(c) => bail!("no checkpoint for consumer '{c}' (it has never run)"),
            None => {
                println!("no checkpoints (no consumer has run yet)");
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
    let mut t = Table::new(&[
        "CONSUMER",
        "SNAPSHOT",
        "BATCH IN PROGRESS",
        "EPOCH",
        "LEADER",
        "UPDATED (UTC)",
    ]);
    for ConsumerStatus { checkpoint, leader } in consumers {
        let batch = match &checkpoint.checkpoint.batch {
            Some(b) => format!(
                "up to {}, done through sequence {}",
                b.snapshot, b.done_sequence
            ),
            None => "-".to_string(),
        };
        let leader = match leader {
            Some(pid) => format!("running (backend pid {pid})"),
            None => "none".to_string(),
        };
        t.row(vec![
            checkpoint.consumer,
            checkpoint.checkpoint.snapshot.to_string(),
            batch,
            checkpoint.epoch.to_string(),
            leader,
            table::time(&checkpoint.updated_at),
        ]);
    }
    print!("{t}");
    Ok(ExitCode::SUCCESS)
}

async fn reset(client: &Client, consumer: &str, from: ResetFrom) -> anyhow::Result<ExitCode> {
    let start = match from {
        ResetFrom::Now => StartPosition::Now,
        ResetFrom::Beginning => StartPosition::Beginning,
    };
    let (existed, stored) = match operator::reset_checkpoint(client, consumer, start).await? {
        Reset::Done {
            existed,
            checkpoint,
        } => (existed, checkpoint),
        Reset::Leading { pid } => {
            let holder = pid
                .map(|pid| format!(" (backend pid {pid})"))
                .unwrap_or_default();
            bail!("a daemon is running for consumer '{consumer}'{holder}; stop it, then reset");
        }
    };
    println!(
        "consumer '{consumer}': checkpoint {} ({}); it resumes from {} at its next start",
        if existed { "reset" } else { "created" },
        stored.snapshot,
        match from {
            ResetFrom::Now => "changes committed from now on",
            ResetFrom::Beginning => "the beginning of the change log",
        }
    );
    Ok(ExitCode::SUCCESS)
}
