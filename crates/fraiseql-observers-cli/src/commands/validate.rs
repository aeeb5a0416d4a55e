//! `validate --config FILE`: compile the configuration (no database, no network) and print the
//! observers as compiled, or every error with its path, one per line (exit code 1). Deprecated
//! keys (the design document's names) load, and each is printed as a warning on stderr, one per
//! line starting with its path.

use crate::Cli;
use fraiseql_observers::config::{self, Config, OnFailure, RuntimeConfig};
use fraiseql_observers::delivery::schedule::{BackoffStrategy, RetryPolicy};
use fraiseql_observers::Observer;
use std::process::ExitCode;

pub fn execute(cli: &Cli) -> anyhow::Result<ExitCode> {
    let path = super::config_path(cli)?;
    let text = super::read_file(path)?;
    match config::load(&text, &super::env_lookup) {
        Ok(config) => {
            if !config.warnings.is_empty() {
                eprintln!("{}: {} warning(s):", path.display(), config.warnings.len());
                for w in &config.warnings {
                    eprintln!("{w}");
                }
            }
            print!("{}", describe(&config));
            println!(
                "{}: valid, {} observer(s)",
                path.display(),
                config.observers.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            eprintln!("{}: {errors}", path.display());
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The compiled configuration, as text.
pub fn describe(config: &Config) -> String {
    let mut out = describe_runtime(&config.runtime);
    for o in &config.observers {
        out.push('\n');
        out.push_str(&describe_observer(o));
    }
    out
}

fn describe_runtime(r: &RuntimeConfig) -> String {
    let mut out = String::from("runtime\n");
    let mut line = |k: &str, v: String| out.push_str(&format!("  {k:<24}{v}\n"));
    line("consumer_id", r.consumer_id.clone());
    line(
        "start_position",
        format!("{:?}", r.start_position).to_lowercase(),
    );
    line("batch_size", r.batch_size.to_string());
    line("concurrency", r.concurrency.to_string());
    line(
        "poll_interval",
        format!("{} ms", r.poll_interval.as_millis()),
    );
    line("notify", r.notify.to_string());
    line(
        "backlog_alert_threshold",
        r.backlog_alert_threshold.to_string(),
    );
    line(
        "shutdown_timeout",
        format!("{} ms", r.shutdown_timeout.as_millis()),
    );
    line(
        "metrics_address",
        r.metrics_address
            .clone()
            .unwrap_or_else(|| "(none)".to_string()),
    );
    line("log_format", format!("{:?}", r.log_format).to_lowercase());
    out
}

fn describe_observer(o: &Observer) -> String {
    let mut out = format!("observer {}\n", o.name);
    let mut line = |k: &str, v: String| out.push_str(&format!("  {k:<24}{v}\n"));
    if let Some(d) = &o.description {
        line("description", d.clone());
    }
    line(
        "entity",
        o.entity
            .clone()
            .unwrap_or_else(|| "* (every entity)".into()),
    );
    line(
        "event_types",
        o.event_types
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    );
    line(
        "condition",
        o.condition
            .as_ref()
            .map(|c| c.source().to_string())
            .unwrap_or_else(|| "(none)".into()),
    );
    line(
        "tenant",
        o.tenant
            .map(|t| t.to_string())
            .unwrap_or_else(|| "(any)".into()),
    );
    line("enabled", o.enabled.to_string());
    line("ordered", o.ordered.to_string());
    line(
        "on_failure",
        match o.on_failure {
            OnFailure::Dlq => "dlq",
            OnFailure::Log => "log",
        }
        .to_string(),
    );
    line("retry", describe_retry(&o.retry));
    for (i, a) in o.actions.iter().enumerate() {
        line(&format!("actions[{i}]"), a.kind().to_string());
    }
    out
}

fn describe_retry(r: &RetryPolicy) -> String {
    let strategy = match r.strategy {
        BackoffStrategy::Exponential => "exponential",
        BackoffStrategy::Linear => "linear",
        BackoffStrategy::Fixed => "fixed",
    };
    format!(
        "max_attempts {}, {strategy} backoff from {} ms up to {} ms, jitter {}",
        r.max_attempts,
        r.initial_delay.as_millis(),
        r.max_delay.as_millis(),
        if r.jitter { "on" } else { "off" }
    )
}
