//! Opening connections to PostgreSQL.
//!
//! Invariant: every connection is named after its job in `pg_stat_activity`, has TCP keepalives
//! on, and bounds its statements and its idle transactions as suited to that job
//! ([`session_timeouts`]), so that neither a stuck query nor a vanished client holds locks or a
//! snapshot for long.

use crate::error::{Error, Result};
use std::sync::Arc;
use tokio_postgres::{Client, Config, NoTls};

/// Parse a `postgres://` URL (or a key=value connection string).
pub fn parse_url(url: &str) -> Result<Config> {
    let config: Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| Error::DatabaseUrl(e.to_string()))?;
    if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
        return Err(Error::DatabaseUrl(
            "sslmode=require is not supported yet: connect over a local socket, a trusted network, or a TLS-terminating proxy".into(),
        ));
    }
    Ok(config)
}

/// Open one connection with TCP keepalives on, driving it on a background task. `application`
/// names it in `pg_stat_activity`.
pub async fn connect(config: &Config, application: &str) -> Result<Client> {
    let config = with_defaults(config, application);
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "database connection closed");
        }
    });
    set_timeouts(&client, application).await?;
    Ok(client)
}

/// `statement_timeout` and `idle_in_transaction_session_timeout` of a connection, by its job
/// (the `application` name it was opened with, up to a `:`). Zero: no bound.
///
/// | job | statement | idle in transaction |
/// |---|---|---|
/// | `fraiseql-observers-leader` (the lock; see `leader.rs` for its other settings) | 5 s | 5 s |
/// | `fraiseql-observers-listener` (batch reads; a catch-up chunk may be large) | 120 s | 60 s |
/// | `fraiseql-observers-checkpoint`, `-delivery` (small fenced writes) | 30 s | 30 s |
/// | `fraiseql-observers-monitor` (counting a backlog) | 60 s | 10 s |
/// | `fraiseql-observers-migrate` (an index on an existing log may take long) | none | 60 s |
/// | anything else (operator commands, embedders) | 300 s | 60 s |
pub fn session_timeouts(application: &str) -> (u64, u64) {
    let job = application.split(':').next().unwrap_or(application);
    match job {
        "fraiseql-observers-leader" => (5_000, 5_000),
        "fraiseql-observers-listener" => (120_000, 60_000),
        "fraiseql-observers-checkpoint" | "fraiseql-observers-delivery" => (30_000, 30_000),
        "fraiseql-observers-monitor" => (60_000, 10_000),
        "fraiseql-observers-migrate" => (0, 60_000),
        _ => (300_000, 60_000),
    }
}

async fn set_timeouts(client: &Client, application: &str) -> Result<()> {
    let (statement, idle) = session_timeouts(application);
    client
        .batch_execute(&format!(
            "SET statement_timeout = {statement}; SET idle_in_transaction_session_timeout = {idle};"
        ))
        .await?;
    Ok(())
}

/// One connection shared by concurrent tasks (their statements pipeline on it), opened on first
/// use and reopened when it is found closed. A failure to (re)open it is `Error::Reconnect`:
/// transient.
pub struct Reconnecting {
    config: Config,
    application: &'static str,
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
}

impl Reconnecting {
    pub fn new(config: Config, application: &'static str) -> Reconnecting {
        Reconnecting {
            config,
            application,
            client: tokio::sync::Mutex::new(None),
        }
    }

    /// The open connection, or a new one when there is none or it was lost.
    pub async fn client(&self) -> Result<Arc<Client>> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        // Once running, any failure to reconnect is worth retrying (a database restarting or
        // refusing connections for a while answers with all kinds of errors).
        let client = connect(&self.config, self.application)
            .await
            .map_err(|e| Error::Reconnect(e.to_string()))?;
        let client = Arc::new(client);
        *slot = Some(client.clone());
        Ok(client)
    }
}

/// Like [`connect`], and forward every `NOTIFY` the connection receives as a wake-up on the
/// returned channel (payloads are ignored: a notification is only a hint).
pub async fn connect_with_notifications(
    config: &Config,
    application: &str,
) -> Result<(Client, tokio::sync::mpsc::UnboundedReceiver<()>)> {
    use futures::StreamExt;
    let config = with_defaults(config, application);
    let (client, mut connection) = config.connect(NoTls).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notification(_)) => {
                    let _ = tx.send(());
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "database connection closed");
                    break;
                }
            }
        }
    });
    set_timeouts(&client, application).await?;
    Ok((client, rx))
}

/// The connection settings every connection of ours uses: its name in `pg_stat_activity`, TCP
/// keepalives (a dead peer is noticed in about 10 + 3 x 5 s), a connect timeout unless the URL
/// sets one.
fn with_defaults(config: &Config, application: &str) -> Config {
    let mut config = config.clone();
    config.application_name(application);
    config.keepalives(true);
    config.keepalives_idle(std::time::Duration::from_secs(10));
    config.keepalives_interval(std::time::Duration::from_secs(5));
    config.keepalives_retries(3);
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    config
}

#[cfg(test)]
mod tests {
    use super::session_timeouts;

    #[test]
    fn every_job_bounds_its_statements_and_idle_transactions() {
        assert_eq!(
            session_timeouts("fraiseql-observers-leader:orders"),
            (5_000, 5_000)
        );
        assert_eq!(
            session_timeouts("fraiseql-observers-listener:orders").0,
            120_000
        );
        assert_eq!(
            session_timeouts("fraiseql-observers-checkpoint:orders"),
            (30_000, 30_000)
        );
        assert_eq!(session_timeouts("fraiseql-observers-delivery").0, 30_000);
        assert_eq!(session_timeouts("fraiseql-observers-migrate"), (0, 60_000));
        assert_eq!(
            session_timeouts("fraiseql-observers-dlq"),
            (300_000, 60_000)
        );
        assert!([
            "leader",
            "listener",
            "checkpoint",
            "delivery",
            "monitor",
            "migrate",
            "x"
        ]
        .iter()
        .all(|job| session_timeouts(&format!("fraiseql-observers-{job}")).1 > 0));
    }
}
