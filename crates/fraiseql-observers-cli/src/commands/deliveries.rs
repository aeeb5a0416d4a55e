//! `deliveries list`: the delivery log (`core.observer_delivery_log`), every attempt with its
//! outcome, newest first.

use crate::table::{self, Table};
use crate::Cli;
use clap::{Subcommand, ValueEnum};
use fraiseql_observers::delivery::log::{self, Attempt, Filter};
use fraiseql_observers::retention;
use serde_json::json;
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum DeliveriesCommand {
    /// List attempts, newest first: the configured consumer's with --config, else every
    /// consumer's.
    List {
        #[arg(long)]
        observer: Option<String>,
        /// An entity: its id, or `Type/id`.
        #[arg(long)]
        entity: Option<String>,
        /// One change's attempts (its sequence).
        #[arg(long)]
        sequence: Option<i64>,
        #[arg(long, value_enum)]
        status: Option<Status>,
        /// Only attempts started within this period: 90s, 30m, 1h, 7d.
        #[arg(long)]
        since: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Status {
    Ok,
    Failed,
}

pub async fn execute(cli: &Cli, command: &DeliveriesCommand) -> anyhow::Result<ExitCode> {
    let DeliveriesCommand::List {
        observer,
        entity,
        sequence,
        status,
        since,
        limit,
        json,
    } = command;
    let filter = Filter {
        consumer: super::configured_consumer(cli)?,
        observer: observer.clone(),
        entity: entity.clone(),
        sequence: *sequence,
        ok: status.map(|s| matches!(s, Status::Ok)),
        since: since
            .as_deref()
            .map(retention::parse_duration)
            .transpose()?,
        limit: *limit,
    };
    let client = super::connect_migrated(
        &super::database_url(cli, None)?,
        "fraiseql-observers-deliveries",
    )
    .await?;
    let attempts = log::list(&client, &filter).await?;
    if *json {
        let all: Vec<_> = attempts.iter().map(attempt_json).collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else if attempts.is_empty() {
        println!("no attempts recorded");
    } else {
        print!("{}", attempts_table(&attempts));
    }
    Ok(ExitCode::SUCCESS)
}

/// Attempts as a table (also used by `explain`).
pub fn attempts_table(attempts: &[Attempt]) -> Table {
    let mut t = Table::new(&[
        "STARTED (UTC)",
        "SEQUENCE",
        "OBSERVER",
        "ACTION",
        "ENTITY",
        "ATTEMPT",
        "OUTCOME",
        "STATUS",
        "MS",
        "ERROR",
    ]);
    for a in attempts {
        t.row(vec![
            table::time(&a.started_at),
            a.event_sequence.to_string(),
            a.observer.clone(),
            format!("{}[{}]", a.action_type, a.action_index),
            a.entity_key.clone(),
            a.attempt.to_string(),
            a.outcome.to_string(),
            a.status_code.map_or_else(|| "-".into(), |c| c.to_string()),
            format!("{:.1}", a.duration.as_secs_f64() * 1e3),
            table::truncate(a.error.as_deref().unwrap_or(""), 60),
        ]);
    }
    t
}

fn attempt_json(a: &Attempt) -> serde_json::Value {
    json!({
        "event_id": a.event_id,
        "sequence": a.event_sequence,
        "entity_type": a.entity_type,
        "entity": a.entity_key,
        "observer": a.observer,
        "action_index": a.action_index,
        "action_type": a.action_type,
        "delivery_id": a.delivery_id,
        "attempt": a.attempt,
        "started_at": a.started_at.to_rfc3339(),
        "duration_ms": a.duration.as_secs_f64() * 1e3,
        "outcome": a.outcome,
        "status_code": a.status_code,
        "error": a.error,
        "response_excerpt": a.response_excerpt,
    })
}
