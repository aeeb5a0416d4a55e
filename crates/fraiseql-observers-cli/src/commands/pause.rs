//! `pause --observer X`, `resume --observer X`: hold or release one observer's deliveries in the
//! running daemon of the configuration's consumer, without a restart; `status`: the consumer's
//! leader, paused observers and what they hold.
//!
//! Invariants: the pause is a row in the database (`fraiseql_observers::control`), so it holds
//! across restarts and failovers; the leader honours it within a second. A paused observer's
//! deliveries wait in the retry queue, in order, and are sent after `resume`.

use crate::table::{self, Table};
use crate::Cli;
use anyhow::{anyhow, bail, Context as _};
use fraiseql_observers::control;
use fraiseql_observers::delivery::{dead_letter, retry_queue};
use fraiseql_observers::distributed;
use fraiseql_observers::operator;
use std::process::ExitCode;

const APP: &str = "fraiseql-observers-control-cli";

/// The consumer of `--config`, and whether `observer` is one of its observers.
fn scope(cli: &Cli, observer: &str) -> anyhow::Result<(String, bool)> {
    let path = super::config_path(cli)?;
    let text = super::read_file(path)?;
    let root: toml::Table =
        toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
    let known = root
        .get("observers")
        .and_then(|o| o.as_table())
        .is_some_and(|o| o.contains_key(observer) && observer != "runtime");
    let consumer = super::configured_consumer(cli)?
        .ok_or_else(|| anyhow!("this command needs --config FILE"))?;
    Ok((consumer, known))
}

pub async fn pause(cli: &Cli, observer: &str) -> anyhow::Result<ExitCode> {
    let (consumer, known) = scope(cli, observer)?;
    if !known {
        // A typo would pause nothing.
        bail!(
            "no observer named '{observer}' in {}",
            super::config_path(cli)?.display()
        );
    }
    let client = super::connect_migrated(&super::database_url(cli, None)?, APP).await?;
    if control::pause(&client, &consumer, observer).await? {
        println!(
            "observer '{observer}' of consumer '{consumer}' paused: its deliveries wait, in order, \
             until `fraiseql-observers resume --observer {observer}`"
        );
    } else {
        println!("observer '{observer}' of consumer '{consumer}' was paused already");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn resume(cli: &Cli, observer: &str) -> anyhow::Result<ExitCode> {
    // An observer removed from the file while paused can still be resumed: what it held is
    // then dead-lettered as `not_accepted`.
    let (consumer, _) = scope(cli, observer)?;
    let client = super::connect_migrated(&super::database_url(cli, None)?, APP).await?;
    if control::resume(&client, &consumer, observer).await? {
        println!(
            "observer '{observer}' of consumer '{consumer}' resumed: what it held is sent now, in order"
        );
    } else {
        println!("observer '{observer}' of consumer '{consumer}' was not paused");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn status(cli: &Cli) -> anyhow::Result<ExitCode> {
    let consumer = super::configured_consumer(cli)?
        .ok_or_else(|| anyhow!("this command needs the configuration: pass --config FILE"))?;
    let client = super::connect_migrated(&super::database_url(cli, None)?, APP).await?;
    let leader = operator::consumers(&client, Some(&consumer))
        .await?
        .into_iter()
        .next();
    let leader = match &leader {
        None => "never ran".to_string(),
        Some(s) => match s.leader {
            Some(pid) => format!("running (backend pid {pid}), epoch {}", s.checkpoint.epoch),
            None => format!("no daemon running, epoch {}", s.checkpoint.epoch),
        },
    };
    println!("consumer:     {consumer}");
    println!("leader:       {leader}");
    println!(
        "retry queue:  {}",
        retry_queue::len(&client, &consumer).await?
    );
    println!(
        "dead letters: {} pending",
        dead_letter::pending_count(&client, &consumer).await?
    );
    let workers = distributed::workers(&client, &consumer, None).await?;
    if !workers.is_empty() {
        println!("workers:");
        let mut t = Table::new(&["WORKER", "STATE", "PARTITIONS", "HEARTBEAT"]);
        let live = distributed::live_workers(&client, &consumer).await?;
        for w in workers {
            let alive = live.iter().any(|l| l.worker == w.worker);
            let partitions: Vec<String> = w.partitions.iter().map(u32::to_string).collect();
            t.row(vec![
                w.worker,
                if alive { "live" } else { "gone" }.to_string(),
                format!("{} [{}]", partitions.len(), partitions.join(",")),
                format!("{:.1}s ago", w.heartbeat_age.as_secs_f64()),
            ]);
        }
        print!("{t}");
    }
    let paused = control::paused_with_holds(&client, &consumer).await?;
    if paused.is_empty() {
        println!("paused:       none");
        return Ok(ExitCode::SUCCESS);
    }
    println!("paused:");
    let mut t = Table::new(&["OBSERVER", "PAUSED SINCE (UTC)", "EVENTS HELD"]);
    for p in paused {
        t.row(vec![
            p.observer,
            table::time(&p.paused_at),
            p.held_events.to_string(),
        ]);
    }
    print!("{t}");
    Ok(ExitCode::SUCCESS)
}
