//! The library's error type. Whether a failure is worth retrying is decided here, in one place.

use thiserror::Error;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum Error {
    #[error("database: {}", describe_db(.0))]
    Database(#[from] tokio_postgres::Error),

    #[error("invalid database url: {0}")]
    DatabaseUrl(String),

    #[error("migration {version} ({name}) failed: {}", describe_db(.source))]
    Migration {
        version: i32,
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },

    #[error("migration {version} ({name}) was changed after it was applied (checksum {applied} in the database, {embedded} in this build)")]
    MigrationChanged {
        version: i32,
        name: &'static str,
        applied: String,
        embedded: String,
    },

    #[error("the change log is not usable: {0}")]
    ChangeLogShape(String),

    #[error("checkpoint of consumer '{consumer}' is ahead of the database (stored {stored}, current {current}): the database was probably restored or replaced; reset the checkpoint with `fraiseql-observers checkpoint reset --consumer {consumer}`")]
    CheckpointAhead {
        consumer: String,
        stored: String,
        current: String,
    },

    #[error("consumer '{consumer}' is led by another instance now (epoch {epoch} was superseded)")]
    Fenced { consumer: String, epoch: i64 },

    #[error(
        "the database is a standby (in recovery); the change log must be read from the primary"
    )]
    ReadOnlyStandby,

    /// The reader reconnected to another server than the one its lead started on: another
    /// cluster (`system_identifier`), or the same one on another timeline (a standby promoted
    /// since). What was read may not be there: the lead ends and is contended again, with the
    /// start-up checks (lock, epoch, checkpoint not ahead of the database).
    #[error("consumer '{consumer}': the database server changed under the lead (was {before}, now {after}); stopped reading, contending again")]
    ServerChanged {
        consumer: String,
        before: String,
        after: String,
    },

    /// The database could not be reached again after a lost connection (any cause: it may be
    /// restarting, refusing connections for a while, or failing over). Retried.
    #[error("cannot reconnect to the database: {0}")]
    Reconnect(String),

    #[error("invalid snapshot '{0}'")]
    Snapshot(String),

    #[error("{0}")]
    Invalid(String),

    #[error("the listener was stopped")]
    Stopped,

    /// The lead of a consumer was lost (its lock connection failed) and the configuration asks
    /// to exit rather than contend again (`exit_on_lost_lead`).
    #[error("lost the lead of consumer '{consumer}' (the lock connection failed); stopped at once, without draining: another instance may lead now")]
    LostLead { consumer: String },

    /// The work stream of distributed delivery (JetStream) cannot be reached or refused an
    /// operation for now (a publish without PubAck, a lost connection). Retried.
    #[error("work stream: {0}")]
    WorkStream(String),

    /// An engine task ended abnormally (a panic): the run stops rather than go on without it.
    #[error("an engine task failed: {0}")]
    TaskFailed(String),
}

impl Error {
    /// Whether trying the same operation again later may succeed (a lost connection, a server
    /// restarting), as opposed to a mistake that will fail the same way every time.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Database(e) => is_transient_db(e),
            Error::Migration { source, .. } => is_transient_db(source),
            Error::Reconnect(_) | Error::WorkStream(_) => true,
            _ => false,
        }
    }
}

/// One mistake in the configuration, found while compiling it (no I/O).
///
/// `path` names where the mistake is, in the configuration's own terms
/// (`observers.order_paid.actions[0].url`); every mistake of a file is reported at once, so
/// compilation returns a `Vec<ConfigError>`. A message never contains a secret's value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl From<crate::fields::FieldError> for ConfigError {
    fn from(e: crate::fields::FieldError) -> ConfigError {
        ConfigError::new(e.path, e.message)
    }
}

/// Every mistake found in a configuration, in file order.
///
/// Its `Display` is the one way they are shown, by the library and the CLI alike: a count, then
/// one `path: message` line per mistake (a line starts with the path, so it can be searched).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} configuration error(s):", self.0.len())?;
        for e in &self.0 {
            write!(f, "\n{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Connection-level failures and the server's "try again" SQLSTATEs are transient.
pub fn is_transient_db(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    if e.is_closed() {
        return true;
    }
    match e.code() {
        // No SQLSTATE: the connection or the protocol failed, not the statement.
        None => true,
        Some(code) => {
            let class = &code.code()[..2];
            // 08: connection exception, 57: operator intervention (shutdown, admin terminate),
            // 53: insufficient resources, 40: serialization failure / deadlock.
            matches!(class, "08" | "57" | "53" | "40") || *code == SqlState::LOCK_NOT_AVAILABLE
        }
    }
}

/// The server's own words for a database error (message, detail, hint), or the client's.
pub fn describe_db(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = db.message().to_string();
            if let Some(detail) = db.detail() {
                text.push_str(&format!(" ({detail})"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!("; hint: {hint}"));
            }
            text
        }
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}
