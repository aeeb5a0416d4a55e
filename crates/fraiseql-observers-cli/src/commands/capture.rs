//! `capture enable | disable | list` and `notify enable | disable`: which tables write to the
//! change log, and whether commits also send the NOTIFY wake-up hint. Each is one call of
//! `fraiseql_observers::capture`; the database (`core.observer_capture`) is the source of truth.

use crate::table::Table;
use crate::Cli;
use clap::Subcommand;
use fraiseql_observers::capture::{self, CaptureSpec};
use std::process::ExitCode;

const APP: &str = "fraiseql-observers-capture";

#[derive(Debug, Subcommand)]
pub enum CaptureCommand {
    /// Capture a table's inserts, updates and deletes into the change log (or redefine how).
    Enable {
        /// The table (`tb_user`, `app.tb_user`), resolved with the connection's search_path.
        #[arg(long)]
        table: String,
        /// The entity name observers match (`object_type`), e.g. `User`.
        #[arg(long)]
        entity: String,
        /// A UUID column holding the tenant; without it the tenant comes from the session
        /// setting `fraiseql.tenant_id`.
        #[arg(long)]
        tenant_column: Option<String>,
        /// A column never written to the change log (repeatable), e.g. `password_hash`.
        #[arg(long = "exclude-column", value_name = "COLUMN")]
        exclude_columns: Vec<String>,
        /// The UUID column holding the entity id.
        #[arg(long, default_value = "id")]
        id_column: String,
    },
    /// Stop capturing a table (its trigger is dropped; rows already logged stay).
    Disable {
        #[arg(long)]
        table: String,
    },
    /// List the captured tables.
    List,
}

#[derive(Debug, Subcommand)]
pub enum NotifyCommand {
    /// Send `NOTIFY fraiseql_observers` on each captured commit (daemons with `notify = true`
    /// wake up at once instead of at their next poll).
    Enable,
    /// Stop sending the hint (daemons fall back to polling).
    Disable,
}

pub async fn execute(cli: &Cli, command: &CaptureCommand) -> anyhow::Result<ExitCode> {
    let client = super::connect_migrated(&super::database_url(cli, None)?, APP).await?;
    match command {
        CaptureCommand::Enable {
            table,
            entity,
            tenant_column,
            exclude_columns,
            id_column,
        } => {
            let spec = CaptureSpec {
                table: table.clone(),
                entity: entity.clone(),
                tenant_column: tenant_column.clone(),
                exclude_columns: exclude_columns.clone(),
                id_column: id_column.clone(),
            };
            capture::enable(&client, &spec).await?;
            println!("capturing {table} as entity {entity}");
        }
        CaptureCommand::Disable { table } => {
            capture::disable(&client, table).await?;
            println!("no longer capturing {table}");
        }
        CaptureCommand::List => {
            let captured = capture::list(&client).await?;
            if captured.is_empty() {
                println!("no captured tables");
            } else {
                let mut t = Table::new(&[
                    "TABLE",
                    "ENTITY",
                    "ID COLUMN",
                    "TENANT COLUMN",
                    "EXCLUDED COLUMNS",
                ]);
                for c in captured {
                    t.row(vec![
                        c.table,
                        c.entity,
                        c.id_column,
                        c.tenant_column
                            .unwrap_or_else(|| "(fraiseql.tenant_id)".to_string()),
                        if c.exclude_columns.is_empty() {
                            "-".to_string()
                        } else {
                            c.exclude_columns.join(", ")
                        },
                    ]);
                }
                print!("{t}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn execute_notify(cli: &Cli, command: &NotifyCommand) -> anyhow::Result<ExitCode> {
    let client = super::connect_migrated(&super::database_url(cli, None)?, APP).await?;
    let enabled = matches!(command, NotifyCommand::Enable);
    capture::set_notify(&client, enabled).await?;
    let now = capture::notify_enabled(&client).await?;
    println!(
        "NOTIFY hint {}",
        if now {
            "enabled: captured commits wake daemons configured with notify = true"
        } else {
            "disabled: daemons find changes by polling"
        }
    );
    Ok(ExitCode::SUCCESS)
}
