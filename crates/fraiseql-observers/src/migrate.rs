//! Embedded, versioned, idempotent migrations, recorded in `core.observer_schema_migrations`.
//!
//! Each migration runs in its own transaction under an advisory lock, so two instances starting
//! together apply it once. A migration already applied is skipped; one whose text changed after it
//! was applied is an error (edit by adding a new migration, never by rewriting an old one).

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use tokio_postgres::Client;

/// One migration: a version, a name, and its SQL.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

macro_rules! migration {
    ($version:literal, $name:literal) => {
        Migration {
            version: $version,
            name: $name,
            sql: include_str!(concat!("../migrations/", $name, ".sql")),
        }
    };
}

/// Every migration this build knows, in order.
pub const MIGRATIONS: &[Migration] = &[
    migration!(1, "0001_change_log"),
    migration!(2, "0002_observer_bookkeeping"),
    migration!(3, "0003_log_mutation_event"),
    migration!(4, "0004_capture"),
    migration!(5, "0005_notify_hint"),
    migration!(6, "0006_delivery"),
    migration!(7, "0007_leases"),
    migration!(8, "0008_capture_invoker"),
    migration!(9, "0009_control"),
    migration!(10, "0010_backfill"),
    migration!(11, "0011_delivery_log"),
    migration!(12, "0012_distributed"),
    migration!(13, "0013_capture_write_cost"),
];

/// Arbitrary constant key for the migration advisory lock ("fqlobsmg").
const LOCK_KEY: i64 = 0x6671_6c6f_6273_6d67;

impl Migration {
    pub fn checksum(&self) -> String {
        let digest = Sha256::digest(self.sql.as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// What `run` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub applied: Vec<i32>,
    pub already_applied: Vec<i32>,
}

/// Whether the observer's tables are installed (`migrate` has run), as operator commands check
/// before they read them.
pub async fn is_migrated(client: &Client) -> Result<bool> {
    Ok(client
        .query_one(
            "SELECT to_regclass('core.observer_dlq_items') IS NOT NULL",
            &[],
        )
        .await?
        .get(0))
}

/// Apply every migration not applied yet.
pub async fn run(client: &mut Client) -> Result<Report> {
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS core;
             CREATE TABLE IF NOT EXISTS core.observer_schema_migrations (
                 version INTEGER PRIMARY KEY,
                 name TEXT NOT NULL,
                 checksum TEXT NOT NULL,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             );",
        )
        .await
        .or_else(|e| {
            // Two instances creating the schema at once: the loser sees a unique violation.
            if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
                Ok(())
            } else {
                Err(e)
            }
        })?;

    let mut report = Report::default();
    for m in MIGRATIONS {
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
            .await?;
        let applied = tx
            .query_opt(
                "SELECT checksum FROM core.observer_schema_migrations WHERE version = $1",
                &[&m.version],
            )
            .await?;
        let checksum = m.checksum();
        match applied {
            Some(row) => {
                let stored: String = row.get(0);
                if stored != checksum {
                    return Err(Error::MigrationChanged {
                        version: m.version,
                        name: m.name,
                        applied: stored,
                        embedded: checksum,
                    });
                }
                report.already_applied.push(m.version);
            }
            None => {
                tx.batch_execute(m.sql)
                    .await
                    .map_err(|source| Error::Migration {
                        version: m.version,
                        name: m.name,
                        source,
                    })?;
                tx.execute(
                    "INSERT INTO core.observer_schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    &[&m.version, &m.name, &checksum],
                )
                .await?;
                tracing::info!(version = m.version, name = m.name, "migration applied");
                report.applied.push(m.version);
            }
        }
        tx.commit().await?;
    }
    Ok(report)
}
