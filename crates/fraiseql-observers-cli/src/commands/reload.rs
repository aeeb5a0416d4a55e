//! `reload`: ask the running daemon(s) of the configuration's consumer to re-read their
//! configuration file (as SIGHUP does), and print how the leader answered: applied, or refused
//! with every error (exit 1). The request is a row in the database, so it reaches a daemon on
//! another host; the daemon validates its own file.

use crate::Cli;
use anyhow::{anyhow, bail};
use fraiseql_observers::control;
use std::process::ExitCode;
use std::time::{Duration, Instant};

pub async fn execute(cli: &Cli, wait: u64) -> anyhow::Result<ExitCode> {
    let consumer = super::configured_consumer(cli)?
        .ok_or_else(|| anyhow!("this command needs the configuration: pass --config FILE"))?;
    let client = super::connect_migrated(
        &super::database_url(cli, None)?,
        "fraiseql-observers-reload-cli",
    )
    .await?;
    let generation = control::request_reload(&client, &consumer).await?;
    let deadline = Instant::now() + Duration::from_secs(wait);
    loop {
        if let Some(answer) = control::reload_answer(&client, &consumer).await? {
            if answer.generation >= generation {
                return match answer.result {
                    Ok(()) => {
                        println!("consumer '{consumer}': configuration reloaded and applied");
                        Ok(ExitCode::SUCCESS)
                    }
                    Err(errors) => {
                        bail!("consumer '{consumer}': the daemon refused the configuration (it keeps running the previous one):\n{errors}")
                    }
                };
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "consumer '{consumer}': no daemon answered within {wait} s (is one running? it \
                 applies the request when it next reads it)"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
