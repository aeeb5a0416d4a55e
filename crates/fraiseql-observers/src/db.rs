//! Opening connections to PostgreSQL.

use crate::error::{Error, Result};
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
    let mut config = config.clone();
    config.application_name(application);
    config.keepalives(true);
    config.keepalives_idle(std::time::Duration::from_secs(10));
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "database connection closed");
        }
    });
    Ok(client)
}
