//! `fraiseql-observers`: the daemon (`run`) and the operator commands around it.
//!
//! The binary is the only place that reads the environment, installs global state (the tracing
//! subscriber, the Prometheus recorder, signal handlers) and chooses exit codes: 0 on success and
//! after a graceful stop, 1 on any error (a configuration error, a lost lead, a failed retry), 2
//! on a usage error (clap's own).
//!
//! Invariant: every command's output comes from the database or the configuration file; nothing
//! is printed that was not read.

mod allocator;
mod commands;
mod demo;
mod server;
mod table;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "fraiseql-observers",
    version,
    about = "Turn every committed PostgreSQL change into reliable actions"
)]
pub struct Cli {
    /// PostgreSQL URL. Taken, in order, from this option, from DATABASE_URL, and from the
    /// configuration's `[database] url`.
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// The observers' configuration file (TOML).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

/// What `run` does (`--role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RunRole {
    Single,
    Reader,
    Worker,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Watch database changes become signed webhooks, with nothing to set up (a throwaway
    /// PostgreSQL cluster unless --database-url / DATABASE_URL names a server).
    Demo,
    /// Apply the database migrations that are not applied yet.
    Migrate,
    /// Check a configuration and print the compiled observers, or every error (exit code 1).
    Validate,
    /// Run the daemon: read the change log, deliver, checkpoint, until SIGINT or SIGTERM.
    /// `--role reader` reads and matches and publishes to the `[distributed]` work stream;
    /// `--role worker` delivers the work stream's partitions it owns.
    Run {
        /// single (default: read and deliver here), reader, or worker.
        #[arg(long, value_enum, default_value_t = RunRole::Single)]
        role: RunRole,
        /// A worker's name in the registry (`status`); default: host name and process id.
        #[arg(long)]
        worker_id: Option<String>,
    },
    /// The dead letter queue: deliveries that will not succeed by retrying.
    #[command(subcommand)]
    Dlq(commands::dlq::DlqCommand),
    /// The delivery log: every attempt, successes included, with its outcome.
    #[command(subcommand)]
    Deliveries(commands::deliveries::DeliveriesCommand),
    /// Where each consumer stands in the change log.
    #[command(subcommand)]
    Checkpoint(commands::checkpoint::CheckpointCommand),
    /// Change-log rows the reader could not decode.
    #[command(subcommand)]
    Quarantine(commands::quarantine::QuarantineCommand),
    /// What one change did: its recorded attempts, which observers fire for it today and why the
    /// others do not, its retries and dead letters (needs --config).
    Explain {
        /// The change's sequence (`id` of the change log).
        #[arg(long)]
        sequence: i64,
    },
    /// Send a range of past changes again through one observer, in order (needs --config).
    Replay {
        #[arg(long)]
        observer: String,
        /// First sequence of the range.
        #[arg(long)]
        from: i64,
        /// Last sequence of the range (inclusive).
        #[arg(long)]
        to: i64,
        /// Only say what would be sent.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete change-log rows every consumer has processed, older than a retention period, and
    /// delivery-log rows older than their own.
    Prune {
        /// The change log's retention period: 7d, 12h, 30m, 90s.
        #[arg(long)]
        older_than: String,
        /// The delivery log's retention period.
        #[arg(long, default_value = "7d")]
        deliveries_older_than: String,
        /// Rows deleted per statement (short transactions).
        #[arg(long, default_value_t = 10_000)]
        batch_size: i64,
    },
    /// Which tables write their changes to the change log.
    #[command(subcommand)]
    Capture(commands::capture::CaptureCommand),
    /// The NOTIFY wake-up hint sent on captured commits.
    #[command(subcommand)]
    Notify(commands::capture::NotifyCommand),
    /// Copy a captured table's existing rows into the change log as SNAPSHOT events
    /// (resumable, throttled); `backfill status`, `backfill cancel`.
    Backfill(commands::backfill::BackfillArgs),
    /// Pause one observer of the configured consumer: the running daemon holds its deliveries,
    /// in order, until `resume` (durable; honoured within a second).
    Pause {
        #[arg(long)]
        observer: String,
    },
    /// Resume a paused observer: what it held is sent, in order.
    Resume {
        #[arg(long)]
        observer: String,
    },
    /// The configured consumer: its leader, queues, distributed workers and their partitions, and
    /// paused observers with the events each holds.
    Status,
    /// Ask the running daemon to re-read its configuration file (as SIGHUP does) and print its answer.
    Reload {
        /// Seconds to wait for the daemon's answer.
        #[arg(long, default_value_t = 10)]
        wait: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::execute(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
