//! One module per command, each the same shape: take what it needs from [`Cli`], do it, print,
//! return an exit code. Shared here: where the configuration and the database URL come from, and
//! the tracing set-up.

pub mod backfill;
pub mod capture;
pub mod checkpoint;
pub mod deliveries;
pub mod dlq;
pub mod migrate;
pub mod pause;
pub mod prune;
pub mod quarantine;
pub mod reload;
pub mod replay;
pub mod run;
pub mod validate;

use crate::{Cli, Command};
use anyhow::{anyhow, bail, Context as _};
use fraiseql_observers::config::{self, Config, LogFormat};
use fraiseql_observers::Operator;
use std::path::Path;
use std::process::ExitCode;
use tokio_postgres::Client;

pub async fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    if !matches!(cli.command, Command::Run { .. }) {
        // `run` sets tracing up itself, once it knows the configured log format.
        init_tracing(LogFormat::Text, "warn");
    }
    match &cli.command {
        Command::Demo => {
            crate::demo::run(cli.database_url.clone()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => migrate::execute(&cli).await,
        Command::Validate => validate::execute(&cli),
        Command::Run { role, worker_id } => run::execute(&cli, *role, worker_id.as_deref()).await,
        Command::Dlq(command) => dlq::execute(&cli, command).await,
        Command::Deliveries(command) => deliveries::execute(&cli, command).await,
        Command::Checkpoint(command) => checkpoint::execute(&cli, command).await,
        Command::Quarantine(command) => quarantine::execute(&cli, command).await,
        Command::Explain { sequence } => replay::explain(&cli, *sequence).await,
        Command::Replay {
            observer,
            from,
            to,
            dry_run,
        } => replay::replay(&cli, observer, *from, *to, *dry_run).await,
        Command::Prune {
            older_than,
            deliveries_older_than,
            batch_size,
        } => prune::execute(&cli, older_than, deliveries_older_than, *batch_size).await,
        Command::Capture(command) => capture::execute(&cli, command).await,
        Command::Notify(command) => capture::execute_notify(&cli, command).await,
        Command::Backfill(args) => backfill::execute(&cli, args).await,
        Command::Pause { observer } => pause::pause(&cli, observer).await,
        Command::Resume { observer } => pause::resume(&cli, observer).await,
        Command::Status => pause::status(&cli).await,
        Command::Reload { wait } => reload::execute(&cli, *wait).await,
    }
}

/// Logs go to stderr (stdout is for the commands' output), filtered by `RUST_LOG`, else by
/// `default` (`info` for the daemon, `warn` for operator commands, whose output says what they
/// did). The server's NOTICEs are kept out below `warn`.
pub fn init_tracing(format: LogFormat, default: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{default},tokio_postgres=warn"))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// The process environment, as the configuration's `${VAR}` and `*_env` lookups see it.
pub fn env_lookup(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The `--config` file, or an error saying this command needs one.
pub fn config_path(cli: &Cli) -> anyhow::Result<&Path> {
    cli.config
        .as_deref()
        .ok_or_else(|| anyhow!("this command needs the configuration: pass --config FILE"))
}

pub fn read_file(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Parse and compile the configuration file. Every error, with its path, is in the message.
pub fn load_config(path: &Path) -> anyhow::Result<Config> {
    let text = read_file(path)?;
    config::load(&text, &env_lookup).map_err(|errors| anyhow!("{}: {errors}", path.display()))
}

/// The database URL: `--database-url`, else `DATABASE_URL`, else the configuration's
/// `[database] url` (`config` when the command loaded it; otherwise only that key is read from
/// the `--config` file, so a command that needs no secrets does not ask for them).
pub fn database_url(cli: &Cli, config: Option<&Config>) -> anyhow::Result<String> {
    if let Some(url) = cli.database_url.as_deref().filter(|u| !u.is_empty()) {
        return Ok(url.to_string());
    }
    let from_config = match (config, cli.config.as_deref()) {
        (Some(config), _) => config.database.url.clone(),
        (None, Some(path)) => configured_url(path)?,
        (None, None) => None,
    };
    from_config.filter(|u| !u.is_empty()).ok_or_else(|| {
        anyhow!(
            "no database configured: pass --database-url, set DATABASE_URL, or set [database] url in the configuration"
        )
    })
}

/// Only `[database] url` of a configuration file, interpolated.
fn configured_url(path: &Path) -> anyhow::Result<Option<String>> {
    let text = read_file(path)?;
    let root: toml::Table =
        toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
    let Some(url) = root
        .get("database")
        .and_then(|d| d.get("url"))
        .and_then(|u| u.as_str())
    else {
        return Ok(None);
    };
    config::interpolate(url, &env_lookup)
        .map(Some)
        .map_err(|e| anyhow!("{}: database.url: {e}", path.display()))
}

/// The consumer a command is scoped to: `[observers.runtime] consumer_id` of the `--config`
/// file (only that key is read, interpolated; the default when it is not set), or `None`
/// without `--config`.
pub fn configured_consumer(cli: &Cli) -> anyhow::Result<Option<String>> {
    let Some(path) = cli.config.as_deref() else {
        return Ok(None);
    };
    let text = read_file(path)?;
    let root: toml::Table =
        toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
    let Some(consumer) = root
        .get("observers")
        .and_then(|o| o.get("runtime"))
        .and_then(|r| r.get("consumer_id"))
        .and_then(|c| c.as_str())
    else {
        return Ok(Some(config::RuntimeConfig::default().consumer_id));
    };
    config::interpolate(consumer, &env_lookup)
        .map(Some)
        .map_err(|e| anyhow!("{}: observers.runtime.consumer_id: {e}", path.display()))
}

/// One connection for an operator command.
pub async fn connect(url: &str, application: &str) -> anyhow::Result<Client> {
    let config = fraiseql_observers::db::parse_url(url)?;
    fraiseql_observers::db::connect(&config, application)
        .await
        .context("cannot connect to the database")
}

/// Connect, and fail with the hint to migrate when the observer's tables are missing.
pub async fn connect_migrated(url: &str, application: &str) -> anyhow::Result<Client> {
    let client = connect(url, application).await?;
    ensure_migrated(&client).await?;
    Ok(client)
}

/// Fail with the hint to migrate when the observer's tables are missing.
pub async fn ensure_migrated(client: &Client) -> anyhow::Result<()> {
    if !fraiseql_observers::migrate::is_migrated(client).await? {
        bail!("the database has no fraiseql-observers tables: run `fraiseql-observers migrate`");
    }
    Ok(())
}

/// The operator handle for a command that needs the configuration (explain, replay, dlq
/// retry), on a migrated database.
pub async fn operator(cli: &Cli) -> anyhow::Result<Operator> {
    let config = load_config(config_path(cli)?)?;
    let url = database_url(cli, Some(&config))?;
    let consumer = &config.runtime.consumer_id;
    let operator = match Operator::new(&url, consumer, config.observers).await {
        Err(e @ fraiseql_observers::Error::DatabaseUrl(_)) => return Err(e.into()),
        other => other.context("cannot connect to the database")?,
    };
    ensure_migrated(operator.client()).await?;
    Ok(operator)
}
