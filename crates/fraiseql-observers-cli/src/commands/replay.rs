//! `explain --sequence N`: what one change did (which observers fired and why the others did
//! not, and its pending retries and dead letters). `replay --observer X --from N --to M`: send a
//! range of past changes again through one observer, in sequence order (`--dry-run` only says
//! what would be sent). Both read the change log; neither touches a checkpoint.

use crate::Cli;
use anyhow::bail;
use chrono::{DateTime, Timelike, Utc};
use fraiseql_observers::delivery::log;
use fraiseql_observers::listener::range;
use fraiseql_observers::matcher::Verdict;
use fraiseql_observers::operator;
use std::process::ExitCode;

fn describe(verdict: &Option<Verdict>) -> String {
    match verdict {
        None => "not for this entity or event type".into(),
        Some(Verdict::Matched) => "FIRES".into(),
        Some(Verdict::Disabled) => "disabled (enabled = false)".into(),
        Some(Verdict::OtherTenant) => "another tenant".into(),
        Some(Verdict::ConditionFalse) => "condition is false".into(),
        Some(Verdict::ConditionError(e)) => format!("condition error: {e}"),
    }
}

pub async fn explain(cli: &Cli, sequence: i64) -> anyhow::Result<ExitCode> {
    let operator = super::operator(cli).await?;
    let client = operator.client();
    let shape = range::discover(client).await?;
    let Some(row) = range::read(client, &shape, sequence, sequence, 1)
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
    let attempts = log::list(
        client,
        &log::Filter {
            consumer: Some(operator.consumer().to_string()),
            sequence: Some(sequence),
            limit: 1000,
            ..log::Filter::default()
        },
    )
    .await?;
    if attempts.is_empty() {
        println!("attempts: none recorded (see `record` in the README)");
    } else {
        println!("attempts (newest first):");
        for line in super::deliveries::attempts_table(&attempts)
            .to_string()
            .lines()
        {
            println!("  {line}");
        }
    }
    println!("today's configuration:");
    for (name, verdict) in operator.explain(&event) {
        let held = verdict == Some(Verdict::Matched) && operator.is_paused(name).await?;
        let note = if held {
            " (paused by an operator: held until `resume`)"
        } else {
            ""
        };
        println!("  {name}: {}{note}", describe(&verdict));
    }
    let deliveries = operator::deliveries_of(client, event.id).await?;
    for r in &deliveries.retries {
        println!(
            "  retry queue: {} action {} after {} attempt(s), next at {}: {}",
            r.observer,
            r.action_index,
            r.attempts,
            pg_time(&r.next_attempt_at),
            r.last_error
        );
    }
    for d in &deliveries.dead_letters {
        println!(
            "  dead letter {}: {} action {} {} ({}): {}",
            d.id, d.observer, d.action_index, d.status, d.reason, d.last_error
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A time as PostgreSQL writes a `timestamptz` in a UTC session (`2024-05-01 10:00:00.25+00`).
fn pg_time(t: &DateTime<Utc>) -> String {
    let mut text = t.format("%Y-%m-%d %H:%M:%S").to_string();
    let micros = t.nanosecond() % 1_000_000_000 / 1000;
    if micros > 0 {
        let fraction = format!(".{micros:06}");
        text.push_str(fraction.trim_end_matches('0'));
    }
    text.push_str("+00");
    text
}

pub async fn replay(
    cli: &Cli,
    observer: &str,
    from: i64,
    to: i64,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    let operator = super::operator(cli).await?;
    let client = operator.client();
    if !operator.observers().iter().any(|o| o.name == observer) {
        bail!("no observer named '{observer}' in this configuration");
    }
    if !dry_run && operator.is_paused(observer).await? {
        bail!(
            "observer '{observer}' of consumer '{}' is paused: nothing sent (resume it first: \
             `fraiseql-observers resume --observer {observer}`)",
            operator.consumer()
        );
    }
    let shape = range::discover(client).await?;
    let (mut sent, mut failed, mut skipped) = (0, 0, 0);
    let mut next = from;
    while next <= to {
        let rows = range::read(client, &shape, next, to, 1000).await?;
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
            let fires = operator
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
            let results = operator.replay(observer, &event).await?.unwrap_or_default();
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

#[cfg(test)]
mod tests {
    use super::pg_time;
    use chrono::{TimeZone, Utc};

    #[test]
    fn times_read_as_postgresql_writes_them() {
        let t = Utc.with_ymd_and_hms(2024, 1, 1, 10, 0, 0).unwrap();
        assert_eq!(pg_time(&t), "2024-01-01 10:00:00+00");
        let t = t + chrono::Duration::milliseconds(500);
        assert_eq!(pg_time(&t), "2024-01-01 10:00:00.5+00");
        let t = t + chrono::Duration::microseconds(1);
        assert_eq!(pg_time(&t), "2024-01-01 10:00:00.500001+00");
    }
}
