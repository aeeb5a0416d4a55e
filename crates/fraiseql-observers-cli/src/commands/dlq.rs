//! `dlq list | show | retry | discard`: the dead letter queue (`core.observer_dlq_items`).
//!
//! Invariant: a retry goes through `Operator::retry_dead_letter`, which claims the item
//! atomically before sending; two operators (or two shells) retrying one item send it once.

use crate::table::{self, Table};
use crate::Cli;
use anyhow::bail;
use clap::{Args, Subcommand, ValueEnum};
use fraiseql_observers::delivery::dead_letter::{self, DlqItem};
use fraiseql_observers::distributed;
use serde_json::json;
use std::process::ExitCode;

const DLQ_APP: &str = "fraiseql-observers-dlq";

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters, newest first: the configured consumer's (its distributed partitions'
    /// included) with --config, else every consumer's.
    List {
        #[arg(long, value_enum)]
        status: Option<Status>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter: every field, the event, the history.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Deliver dead letters again with the action as configured now (needs --config; only the
    /// configured consumer's, its distributed partitions' included).
    Retry(RetryArgs),
    /// Mark a pending dead letter as discarded (it is kept, with its history).
    Discard { id: i64 },
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct RetryArgs {
    /// The dead letter to retry.
    id: Option<i64>,
    /// Every pending dead letter of the configured consumer, oldest first.
    #[arg(long)]
    all: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Status {
    Pending,
    Retrying,
    Delivered,
    Discarded,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Retrying => "retrying",
            Status::Delivered => "delivered",
            Status::Discarded => "discarded",
        }
    }
}

pub async fn execute(cli: &Cli, command: &DlqCommand) -> anyhow::Result<ExitCode> {
    match command {
        DlqCommand::List {
            status,
            limit,
            json,
        } => {
            let client = super::connect_migrated(&super::database_url(cli, None)?, DLQ_APP).await?;
            let consumer = super::configured_consumer(cli)?;
            let items = dead_letter::list(
                &client,
                consumer.as_deref(),
                status.map(Status::as_str),
                *limit,
            )
            .await?;
            if *json {
                let all: Vec<_> = items.iter().map(item_json).collect();
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if items.is_empty() {
                println!("no dead letters");
            } else {
                let mut t = Table::new(&[
                    "ID",
                    "OBSERVER",
                    "ACTION",
                    "ENTITY",
                    "ATTEMPTS",
                    "REASON",
                    "STATUS",
                    "LAST ERROR",
                    "CREATED (UTC)",
                ]);
                for i in &items {
                    t.row(vec![
                        i.id.to_string(),
                        i.observer.clone(),
                        format!("{}[{}]", i.action_type, i.action_index),
                        i.entity_key.clone(),
                        i.attempts.to_string(),
                        i.reason.clone(),
                        i.status.clone(),
                        table::truncate(&i.last_error, 80),
                        table::time(&i.created_at),
                    ]);
                }
                print!("{t}");
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Show { id, json } => {
            let client = super::connect_migrated(&super::database_url(cli, None)?, DLQ_APP).await?;
            let Some(item) = dead_letter::get(&client, *id).await? else {
                bail!("no dead letter with id {id}");
            };
            if *json {
                println!("{}", serde_json::to_string_pretty(&item_json(&item))?);
            } else {
                print!("{}", describe(&item)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Retry(args) => retry(cli, args).await,
        DlqCommand::Discard { id } => {
            let client = super::connect_migrated(&super::database_url(cli, None)?, DLQ_APP).await?;
            if dead_letter::discard(&client, *id).await? {
                println!("dead letter {id}: discarded");
                return Ok(ExitCode::SUCCESS);
            }
            match dead_letter::get(&client, *id).await? {
                None => bail!("no dead letter with id {id}"),
                Some(item) => bail!(
                    "dead letter {id} is not pending (status {}); nothing discarded",
                    item.status
                ),
            }
        }
    }
}

async fn retry(cli: &Cli, args: &RetryArgs) -> anyhow::Result<ExitCode> {
    let operator = super::operator(cli).await?;
    let client = operator.client();
    let ids = match (args.id, args.all) {
        (Some(id), _) => {
            let Some(item) = dead_letter::get(client, id).await? else {
                bail!("no dead letter with id {id}");
            };
            if !distributed::is_consumer_or_partition(&item.consumer_id, operator.consumer()) {
                bail!(
                    "dead letter {id} belongs to consumer '{}', not '{}' (this configuration); nothing sent",
                    item.consumer_id,
                    operator.consumer()
                );
            }
            vec![id]
        }
        (None, _) => dead_letter::pending_ids(client, operator.consumer()).await?,
    };
    if ids.is_empty() {
        println!("no pending dead letters");
        return Ok(ExitCode::SUCCESS);
    }
    let (mut delivered, mut failed, mut skipped, mut held) = (0, 0, 0, 0);
    for id in ids {
        // A paused observer sends nothing, operators' retries included: its items stay pending.
        if let Some(item) = dead_letter::get(client, id).await? {
            if operator.is_paused(&item.observer).await? {
                held += 1;
                println!(
                    "dead letter {id}: observer '{}' is paused; not sent (resume it first)",
                    item.observer
                );
                continue;
            }
        }
        match operator.retry_dead_letter(id).await? {
            Some(Ok(())) => {
                delivered += 1;
                println!("dead letter {id}: delivered");
            }
            Some(Err(e)) => {
                failed += 1;
                println!("dead letter {id}: failed again ({e})");
            }
            None => {
                skipped += 1;
                let status = dead_letter::get(client, id)
                    .await?
                    .map_or_else(|| "gone".to_string(), |i| i.status);
                println!("dead letter {id}: not pending (status {status}); not sent");
            }
        }
    }
    if args.all {
        println!(
            "{delivered} delivered, {failed} failed again, {skipped} not pending, {held} held (observer paused)"
        );
    }
    Ok(if failed == 0 && skipped == 0 && held == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn item_json(i: &DlqItem) -> serde_json::Value {
    json!({
        "id": i.id,
        "consumer_id": i.consumer_id,
        "observer": i.observer,
        "action_index": i.action_index,
        "action_type": i.action_type,
        "entity_key": i.entity_key,
        "delivery_id": i.delivery_id,
        "attempts": i.attempts,
        "reason": i.reason,
        "last_error": i.last_error,
        "status": i.status,
        "created_at": i.created_at,
        "updated_at": i.updated_at,
        "event": i.event,
        "history": i.history,
    })
}

fn describe(i: &DlqItem) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<14}{v}\n"));
    line("id", i.id.to_string());
    line("status", i.status.clone());
    line("consumer", i.consumer_id.clone());
    line("observer", i.observer.clone());
    line(
        "action",
        format!("{} (actions[{}])", i.action_type, i.action_index),
    );
    line("entity", i.entity_key.clone());
    line(
        "event",
        format!(
            "{} {} (sequence {})",
            i.event.kind, i.event.id, i.event.sequence
        ),
    );
    line("delivery id", i.delivery_id.clone());
    line("attempts", i.attempts.to_string());
    line("reason", i.reason.clone());
    line("last error", i.last_error.clone());
    line("created", format!("{} UTC", table::time(&i.created_at)));
    line("updated", format!("{} UTC", table::time(&i.updated_at)));
    out.push_str("\nevent:\n");
    out.push_str(&serde_json::to_string_pretty(&i.event)?);
    out.push_str("\n\nhistory:\n");
    out.push_str(&serde_json::to_string_pretty(&i.history)?);
    out.push('\n');
    Ok(out)
}
