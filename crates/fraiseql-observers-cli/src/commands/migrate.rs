//! `migrate`: apply the migrations this build embeds that the database does not have yet, and
//! print what was applied. Idempotent.

use crate::Cli;
use fraiseql_observers::migrate::{self, MIGRATIONS};
use std::process::ExitCode;

pub async fn execute(cli: &Cli) -> anyhow::Result<ExitCode> {
    let url = super::database_url(cli, None)?;
    let mut client = super::connect(&url, "fraiseql-observers-migrate").await?;
    let report = migrate::run(&mut client).await?;
    for m in MIGRATIONS {
        if report.applied.contains(&m.version) {
            println!("applied  {:>4}  {}", m.version, m.name);
        }
    }
    if report.applied.is_empty() {
        println!(
            "the database is up to date ({} migrations already applied)",
            report.already_applied.len()
        );
    } else {
        println!(
            "{} migration(s) applied, {} already applied",
            report.applied.len(),
            report.already_applied.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}
