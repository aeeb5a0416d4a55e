//! `backfill --table T [--where P] [--observer NAME ...] [--batch N] [--rate N/s]`,
//! `backfill status`, `backfill cancel --table T`: copy a captured table's existing rows into the
//! change log as snapshot changes (`fraiseql_observers::backfill` holds the SQL). Progress is a
//! bar on a terminal, plain lines otherwise.

use crate::table::Table;
use crate::Cli;
use anyhow::{anyhow, bail};
use clap::{Args, Subcommand};
use fraiseql_observers::backfill::{self, Backfill, BackfillSpec, Outcome, Progress};
use fraiseql_observers::EventKind;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use uuid::Uuid;

const APP: &str = "fraiseql-observers-backfill";

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct BackfillArgs {
    #[command(subcommand)]
    pub command: Option<BackfillCommand>,
    #[command(flatten)]
    pub start: StartArgs,
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// The captured table whose existing rows to copy (`tb_user`, `app.tb_user`).
    #[arg(long, required = true)]
    pub table: Option<String>,
    /// Only the rows this SQL condition accepts (`status = 'active'`).
    #[arg(long = "where", value_name = "PREDICATE")]
    pub predicate: Option<String>,
    /// Only this observer receives the snapshot events (repeatable); by default every observer
    /// with `event_type` "SNAPSHOT".
    #[arg(long = "observer", value_name = "NAME")]
    pub observers: Vec<String>,
    /// Rows per page (each page is one short transaction).
    #[arg(long, default_value_t = 1000)]
    pub batch: u32,
    /// Rows per second at most (`500/s` or `500`).
    #[arg(long, value_name = "N/s")]
    pub rate: Option<String>,
    /// The tenant of rows whose tenant column is NULL (or of a table without one); else the
    /// session setting `fraiseql.tenant_id`.
    #[arg(long)]
    pub tenant: Option<Uuid>,
}

#[derive(Debug, Subcommand)]
pub enum BackfillCommand {
    /// Every backfill: table, state, rows copied, whether a process runs it now.
    Status,
    /// Cancel a table's unfinished backfill (a running one stops after its current page).
    Cancel {
        #[arg(long)]
        table: String,
    },
}

pub async fn execute(cli: &Cli, args: &BackfillArgs) -> anyhow::Result<ExitCode> {
    match &args.command {
        Some(BackfillCommand::Status) => status(cli).await,
        Some(BackfillCommand::Cancel { table }) => {
            let client = super::connect_migrated(&super::database_url(cli, None)?, APP).await?;
            match backfill::cancel(&client, table).await? {
                Some(id) => println!("backfill {id} of {table} cancelled"),
                None => println!("{table} has no unfinished backfill"),
            }
            Ok(ExitCode::SUCCESS)
        }
        None => start(cli, &args.start).await,
    }
}

fn parse_rate(raw: &str) -> anyhow::Result<u32> {
    let number = raw.trim().trim_end_matches("/s").trim();
    match number.parse::<u32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => bail!("--rate {raw:?}: expected rows per second, e.g. 500/s"),
    }
}

/// With `--config`, every `--observer` must name an observer that asks for snapshot events.
fn check_observers(cli: &Cli, observers: &[String]) -> anyhow::Result<()> {
    let Some(path) = cli.config.as_deref() else {
        return Ok(());
    };
    if observers.is_empty() {
        return Ok(());
    }
    let config = super::load_config(path)?;
    for name in observers {
        let observer = config
            .observers
            .iter()
            .find(|o| &o.name == name)
            .ok_or_else(|| anyhow!("--observer {name}: no such observer in {}", path.display()))?;
        if !observer.event_types.contains(&EventKind::Snapshot) {
            bail!(
                "--observer {name}: it does not list \"SNAPSHOT\" in its event_type, so it would receive nothing"
            );
        }
    }
    Ok(())
}

async fn start(cli: &Cli, args: &StartArgs) -> anyhow::Result<ExitCode> {
    let table = args
        .table
        .clone()
        .ok_or_else(|| anyhow!("backfill needs --table (or a subcommand: status, cancel)"))?;
    check_observers(cli, &args.observers)?;
    let spec = BackfillSpec {
        table: table.clone(),
        predicate: args.predicate.clone(),
        observers: args.observers.clone(),
        batch_size: args.batch,
        rate: args.rate.as_deref().map(parse_rate).transpose()?,
        tenant: args.tenant,
    };
    let mut client = super::connect_migrated(&super::database_url(cli, None)?, APP).await?;
    let job = Backfill::start(&client, &spec).await?;
    println!(
        "backfill {} of {table}: {}",
        job.id,
        if job.resumed { "resumed" } else { "started" }
    );
    let mut report = Reporter::new(job.id);
    let outcome = job.run(&mut client, |p| report.page(p)).await?;
    report.finish();
    match outcome {
        Outcome::Done { rows } => {
            println!("backfill {} of {table}: done, {rows} rows", job.id);
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Cancelled { rows } => {
            println!(
                "backfill {} of {table}: cancelled after {rows} rows",
                job.id
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// A progress bar on a terminal (rows, rate, ETA); plain lines on stderr otherwise, at most one
/// every two seconds.
struct Reporter {
    id: i64,
    bar: Option<indicatif::ProgressBar>,
    last_line: Option<Instant>,
    started: Instant,
    first_rows: Option<i64>,
}

impl Reporter {
    fn new(id: i64) -> Reporter {
        Reporter {
            id,
            bar: None,
            last_line: None,
            started: Instant::now(),
            first_rows: None,
        }
    }

    fn page(&mut self, p: Progress) {
        if std::io::stderr().is_terminal() {
            let bar = self.bar.get_or_insert_with(|| {
                let bar = indicatif::ProgressBar::new(p.rows_estimate.unwrap_or(0).max(0) as u64);
                if let Ok(style) = indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} rows  {per_sec}  ETA {eta}",
                ) {
                    bar.set_style(style);
                }
                bar
            });
            let done = p.rows_done.max(0) as u64;
            if done > bar.length().unwrap_or(0) {
                bar.set_length(done);
            }
            bar.set_position(done);
            return;
        }
        let first = *self.first_rows.get_or_insert(p.rows_done);
        if self
            .last_line
            .is_some_and(|t| t.elapsed() < Duration::from_secs(2))
        {
            return;
        }
        self.last_line = Some(Instant::now());
        let rate = (p.rows_done - first) as f64 / self.started.elapsed().as_secs_f64().max(0.001);
        match p.rows_estimate {
            Some(total) if total > 0 => eprintln!(
                "backfill {}: {} of ~{} rows, {:.0} rows/s",
                self.id, p.rows_done, total, rate
            ),
            _ => eprintln!(
                "backfill {}: {} rows, {:.0} rows/s",
                self.id, p.rows_done, rate
            ),
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

async fn status(cli: &Cli) -> anyhow::Result<ExitCode> {
    let client = super::connect_migrated(&super::database_url(cli, None)?, APP).await?;
    let all = backfill::list(&client).await?;
    if all.is_empty() {
        println!("no backfills");
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new(&[
        "id",
        "table",
        "state",
        "rows",
        "estimate",
        "observers",
        "where",
        "updated",
    ]);
    for b in all {
        let state = match (b.state.as_str(), b.active) {
            ("running", true) => "running".to_string(),
            ("running", false) => "interrupted (run it again to resume)".to_string(),
            (other, _) => other.to_string(),
        };
        table.row(vec![
            b.id.to_string(),
            b.table,
            state,
            b.rows_done.to_string(),
            b.rows_estimate.map(|e| e.to_string()).unwrap_or_default(),
            if b.observers.is_empty() {
                "all with SNAPSHOT".into()
            } else {
                b.observers.join(",")
            },
            b.predicate.unwrap_or_default(),
            b.updated_at.format("%Y-%m-%d %H:%M:%S").to_string(),
        ]);
    }
    print!("{table}");
    Ok(ExitCode::SUCCESS)
}
