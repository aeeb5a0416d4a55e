//! `checkpoint show | reset`: where each consumer stands (`core.observer_checkpoints`).
//!
//! Invariant: `reset` runs only while it holds the consumer's leader lock itself, so it never
//! moves the checkpoint under a running daemon (stop the daemon first; standbys may keep waiting).

use crate::table::{self, Table};
use crate::Cli;
use anyhow::bail;
use chrono::{DateTime, Utc};
use clap::{Subcommand, ValueEnum};
use fraiseql_observers::leader::lock_key;
use fraiseql_observers::listener::checkpoint;
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
    let rows = client
        .query(
            "SELECT consumer_id, snapshot::text, batch_snapshot::text, batch_done_sequence, epoch,
                    updated_at
               FROM core.observer_checkpoints
              WHERE $1::text IS NULL OR consumer_id = $1
              ORDER BY consumer_id",
            &[&consumer],
        )
        .await?;
    if rows.is_empty() {
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
    for row in &rows {
        let consumer: String = row.get(0);
        let batch = match (
            row.get::<_, Option<String>>(2),
            row.get::<_, Option<i64>>(3),
        ) {
            (Some(upper), Some(done)) => format!("up to {upper}, done through sequence {done}"),
            _ => "-".to_string(),
        };
        let leader = match leader_pid(client, &consumer).await? {
            Some(pid) => format!("running (backend pid {pid})"),
            None => "none".to_string(),
        };
        t.row(vec![
            consumer,
            row.get(1),
            batch,
            row.get::<_, i64>(4).to_string(),
            leader,
            table::time(&row.get::<_, DateTime<Utc>>(5)),
        ]);
    }
    print!("{t}");
    Ok(ExitCode::SUCCESS)
}

async fn reset(client: &Client, consumer: &str, from: ResetFrom) -> anyhow::Result<ExitCode> {
    let key = lock_key(consumer);
    let locked: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
        .await?
        .get(0);
    if !locked {
        let holder = leader_pid(client, consumer)
            .await?
            .map(|pid| format!(" (backend pid {pid})"))
            .unwrap_or_default();
        bail!("a daemon is running for consumer '{consumer}'{holder}; stop it, then reset");
    }
    let start = match from {
        ResetFrom::Now => StartPosition::Now,
        ResetFrom::Beginning => StartPosition::Beginning,
    };
    let existed = checkpoint::reset(client, consumer, start).await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&key])
        .await?;
    let existed = existed?;
    let (stored, _) = checkpoint::load(client, consumer).await?.ok_or_else(|| {
        anyhow::anyhow!("the checkpoint of '{consumer}' vanished after the reset")
    })?;
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

/// The backend holding `consumer`'s leader lock in this database, if any.
async fn leader_pid(client: &Client, consumer: &str) -> anyhow::Result<Option<i32>> {
    Ok(client
        .query_opt(
            "SELECT pid FROM pg_locks
              WHERE locktype = 'advisory' AND granted AND objsubid = 1
                AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND ((classid::bigint << 32) | objid::bigint) = $1
                AND pid <> pg_backend_pid()
              LIMIT 1",
            &[&lock_key(consumer)],
        )
        .await?
        .map(|r| r.get(0)))
}
