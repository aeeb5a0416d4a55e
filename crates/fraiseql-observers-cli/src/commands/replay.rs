//! `explain --sequence N`: what one change did (which observers fired and why the others did
//! not, and its pending retries and dead letters). `replay --observer X --from N --to M`: send a
//! range of past changes again through one observer, in sequence order (`--dry-run` only says
//! what would be sent). Both read the change log; neither touches a checkpoint.

use crate::Cli;
use anyhow::bail;
use fraiseql_observers::listener::range;
use fraiseql_observers::matcher::Verdict;
use fraiseql_observers::ObserverExecutor;
use std::process::ExitCode;

const APP: &str = "fraiseql-observers-replay";

async fn executor(cli: &Cli) -> anyhow::Result<(ObserverExecutor, tokio_postgres::Client)> {
    let config = super::load_config(super::config_path(cli)?)?;
    let url = super::database_url(cli, Some(&config))?;
    let client = super::connect_migrated(&url, APP).await?;
    // An epoch no consumer holds: nothing here writes delivery bookkeeping.
    let executor =
        ObserverExecutor::new(config.observers, &url, &config.runtime.consumer_id, -1).await?;
    Ok((executor, client))
}

fn describe(verdict: &Option<Verdict>) -> String {
    match verdict {
        None => "not for this entity or event type".into(),
        Some(Verdict::Matched) => "FIRES".into(),
        Some(Verdict::Paused) => "paused (enabled = false)".into(),
        Some(Verdict::OtherTenant) => "another tenant".into(),
        Some(Verdict::ConditionFalse) => "condition is false".into(),
        Some(Verdict::ConditionError(e)) => format!("condition error: {e}"),
    }
}

pub async fn explain(cli: &Cli, sequence: i64) -> anyhow::Result<ExitCode> {
    let (executor, client) = executor(cli).await?;
    let shape = range::discover(&client).await?;
    let Some(row) = range::read(&client, &shape, sequence, sequence, 1)
        .await?
        .pop()
    else {
        bail!("no change-log row with sequence {sequence}");
    };
    let event = match row {
        Ok(event) => event,
        Err((_, reason)) => {
            println!("change {sequence} cannot be decoded: {reason}");
            return Ok(ExitCode::FAILURE);
        }
    };
    println!(
        "change {} ({}): {} {} {} tenant {} status {} at {}",
        event.sequence,
        event.id,
        event.kind,
        event.entity_type,
        event.entity_id,
        event
            .tenant
            .map(|t| t.to_string())
            .unwrap_or_else(|| "-".into()),
        event.change_status,
        event.created_at.to_rfc3339(),
    );
    for (name, verdict) in executor.explain(&event) {
        println!("  {name}: {}", describe(&verdict));
    }
    let pending = client
        .query(
            "SELECT observer, action_index, attempts, next_attempt_at::text, coalesce(last_error, '')
               FROM core.observer_retry_queue WHERE event_id = $1 ORDER BY observer, action_index",
            &[&event.id],
        )
        .await?;
    for r in &pending {
        println!(
            "  retry queue: {} action {} after {} attempt(s), next at {}: {}",
            r.get::<_, String>(0),
            r.get::<_, i32>(1),
            r.get::<_, i32>(2),
            r.get::<_, String>(3),
            r.get::<_, String>(4)
        );
    }
    let dead = client
        .query(
            "SELECT id, observer, action_index, status, reason, last_error
               FROM core.observer_dlq_items WHERE event_id = $1 ORDER BY id",
            &[&event.id],
        )
        .await?;
    for r in &dead {
        println!(
            "  dead letter {}: {} action {} {} ({}): {}",
            r.get::<_, i64>(0),
            r.get::<_, String>(1),
            r.get::<_, i32>(2),
            r.get::<_, String>(3),
            r.get::<_, String>(4),
            r.get::<_, String>(5)
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn replay(
    cli: &Cli,
    observer: &str,
    from: i64,
    to: i64,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    let (executor, client) = executor(cli).await?;
    if !executor.observers().iter().any(|o| o.name == observer) {
        bail!("no observer named '{observer}' in this configuration");
    }
    let shape = range::discover(&client).await?;
    let (mut sent, mut failed, mut skipped) = (0, 0, 0);
    let mut next = from;
    while next <= to {
        let rows = range::read(&client, &shape, next, to, 1000).await?;
        let Some(last) = rows.last() else { break };
        next = match last {
            Ok(e) => e.sequence,
            Err((s, _)) => *s,
        } + 1;
        for row in rows {
            let event = match row {
                Ok(event) => event,
                Err((sequence, reason)) => {
                    println!("{sequence}: cannot be decoded ({reason}); skipped");
                    skipped += 1;
                    continue;
                }
            };
            let fires = executor
                .explain(&event)
                .into_iter()
                .any(|(name, v)| name == observer && v == Some(Verdict::Matched));
            if !fires {
                skipped += 1;
                continue;
            }
            if dry_run {
                println!(
                    "{}: would send {} {} {}",
                    event.sequence, event.kind, event.entity_type, event.entity_id
                );
                sent += 1;
                continue;
            }
            let results = executor.replay(observer, &event).await?.unwrap_or_default();
            for (a, result) in results.iter().enumerate() {
                match result {
                    Ok(()) => {
                        sent += 1;
                        println!("{}: action {a} delivered", event.sequence);
                    }
                    Err(e) => {
                        failed += 1;
                        println!("{}: action {a} failed: {e}", event.sequence);
                    }
                }
            }
        }
    }
    let verb = if dry_run { "would send" } else { "sent" };
    println!("{verb} {sent}, failed {failed}, skipped {skipped} (not matching or undecodable)");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
