//! Opening connections to PostgreSQL.

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
    Ok(client)
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
    Ok((client, rx))
}

/// The connection settings every connection of ours uses: its name in `pg_stat_activity`, TCP
/// keepalives (a dead peer is noticed), a connect timeout unless the URL sets one.
fn with_defaults(config: &Config, application: &str) -> Config {
    let mut config = config.clone();
    config.application_name(application);
    config.keepalives(true);
    config.keepalives_idle(std::time::Duration::from_secs(10));
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    config
}
