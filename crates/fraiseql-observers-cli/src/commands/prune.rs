//! `prune --older-than 7d [--deliveries-older-than 7d]`: delete change-log rows that every
//! consumer has processed and that are older than the retention period (see
//! `fraiseql_observers::retention`), and delivery-log rows older than theirs.

use crate::Cli;
use fraiseql_observers::delivery::log;
use fraiseql_observers::retention;
use std::process::ExitCode;

pub async fn execute(
    cli: &Cli,
    older_than: &str,
    deliveries_older_than: &str,
    batch_size: i64,
) -> anyhow::Result<ExitCode> {
    let retention_period = retention::parse_duration(older_than)?;
    let log_period = retention::parse_duration(deliveries_older_than)?;
    let client =
        super::connect_migrated(&super::database_url(cli, None)?, "fraiseql-observers-prune")
            .await?;
    // The delivery log first: it does not depend on any consumer's progress.
    let deleted = log::prune(&client, log_period, batch_size).await?;
    println!("deleted {deleted} delivery-log rows older than {deliveries_older_than}");
    let deleted = retention::prune(&client, retention_period, batch_size).await?;
    println!("deleted {deleted} processed change-log rows older than {older_than}");
    Ok(ExitCode::SUCCESS)
}
