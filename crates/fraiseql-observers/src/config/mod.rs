//! Configuration: TOML (FraiseQL's layout) -> parsed tables -> compiled observers. Pure: the
//! environment and the files named by `*_file` keys are read through lookups the caller passes
//! in ([`Sources`]), never here.
//!
//! The layers: [`crate::fields`] reads a table into a raw struct (every mistake reported);
//! `runtime.rs` is `[observers.runtime]`; `interpolate.rs` expands `${VAR}`; `observer.rs`
//! compiles one `[observers.NAME]` into an [`Observer`], its actions through [`crate::actions`].
//! This module imports `actions`; `actions` never imports it.
//!
//! ```toml
//! [database]
//! url = "${DATABASE_URL}"
//!
//! [observers.runtime]
//! consumer_id = "orders"
//! batch_size = 1000
//!
//! [observers.order_shipped]
//! entity = "Order"
//! event_type = "UPDATE"
//! condition = "field_changed_to('status', 'shipped')"
//!
//! [[observers.order_shipped.actions]]
//! type = "webhook"
//! url = "https://example.com/hooks/orders"
//! signing_secret_env = "ORDER_WEBHOOK_SECRET"
//! ```
//!
//! Invariants: an unknown key is an error; every error is reported at once, each with its path
//! (`observers.order_shipped.actions[0].url`); a secret is only ever named by the environment
//! variable that holds it (`*_env`) and never appears in a message.

mod interpolate;
mod observer;
mod runtime;

use serde::Deserialize;

use crate::actions::{CompileContext, EmailSettings, HttpClient, RedisSettings};
use crate::error::ConfigError;
use crate::fields::parse_fields;

pub use crate::error::ConfigErrors;
pub use crate::observer::{Observer, OnFailure};
pub use interpolate::interpolate;
pub use runtime::{LogFormat, RuntimeConfig};

/// A compiled configuration, ready to run.
#[derive(Debug)]
pub struct Config {
    pub database: DatabaseConfig,
    pub runtime: RuntimeConfig,
    /// In file order.
    pub observers: Vec<Observer>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatabaseConfig {
    /// `[database] url`; the CLI's `--database-url` / `DATABASE_URL` take over when absent.
    pub url: Option<String>,
}

/// What a configuration may read besides its own text. The library reads neither the
/// environment nor a file by itself: the caller decides where both come from.
#[derive(Clone, Copy)]
pub struct Sources<'a> {
    /// Resolves `${VAR}` references and `*_env` secrets.
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// Reads the files named by `*_file` keys (push credentials).
    pub read_file: &'a dyn Fn(&str) -> std::io::Result<String>,
}

/// Parse and compile a configuration, reading `*_file` keys from the file system. `env` resolves
/// `${VAR}` references and `*_env` secrets. [`load_with`] takes both lookups from the caller.
pub fn load(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
    let read_file = |path: &str| std::fs::read_to_string(path);
    load_with(
        text,
        Sources {
            env,
            read_file: &read_file,
        },
    )
}

/// Parse and compile a configuration; everything it reads besides `text` comes from `sources`.
/// Pure: the one HTTP client its actions share connects on first use.
pub fn load_with(text: &str, sources: Sources<'_>) -> Result<Config, ConfigErrors> {
    let env = sources.env;
    let mut root: toml::Table = toml::from_str(text).map_err(|e| {
        let at = e
            .span()
            .map(|span| {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!("line {line}")
            })
            .unwrap_or_else(|| "file".to_string());
        ConfigErrors(vec![ConfigError::new(at, e.message().trim().to_string())])
    })?;
    let mut errors = Vec::new();
    interpolate::interpolate_table(&mut root, "", env, &mut errors);

    let mut database = DatabaseConfig::default();
    let mut runtime = RuntimeConfig::default();
    let mut observers = Vec::new();
    let mut email = None;
    let mut redis = None;
    let empty = toml::Table::new();
    let observer_tables = match root.get("observers") {
        Some(toml::Value::Table(t)) => t,
        _ => &empty,
    };
    for (key, value) in &root {
        match (key.as_str(), value) {
            ("database", toml::Value::Table(t)) => {
                match parse_fields::<RawDatabase, _>(t, "database") {
                    Ok(raw) => database.url = raw.url,
                    Err(e) => errors.extend(e),
                }
            }
            ("observers", toml::Value::Table(_)) => {}
            ("database" | "observers", _) => errors.push(ConfigError::new(key, "must be a table")),
            _ => errors.push(ConfigError::new(
                key.clone(),
                "unknown key; expected one of: database, observers",
            )),
        }
    }
    // The runtime first: actions compile against its shared settings (SMTP server, Redis).
    match observer_tables.get("runtime") {
        None => {}
        Some(toml::Value::Table(table)) => {
            let path = "observers.runtime";
            match parse_fields::<runtime::RawRuntime, _>(table, path) {
                Ok(raw) => {
                    if let Some(t) = &raw.email {
                        match EmailSettings::parse(t, &format!("{path}.email"), env) {
                            Ok(s) => email = Some(s),
                            Err(e) => errors.extend(e),
                        }
                    }
                    if let Some(t) = &raw.redis {
                        match RedisSettings::parse(t, &format!("{path}.redis"), env) {
                            Ok(s) => redis = Some(s),
                            Err(e) => errors.extend(e),
                        }
                    }
                    raw.apply(&mut runtime, path, &mut errors);
                }
                Err(e) => errors.extend(e),
            }
        }
        Some(_) => errors.push(ConfigError::new("observers.runtime", "must be a table")),
    }
    let context = CompileContext {
        env,
        read_file: sources.read_file,
        http: HttpClient::new(),
        email: email.as_ref(),
        redis: redis.as_ref(),
    };
    for (name, value) in observer_tables
        .iter()
        .filter(|(name, _)| *name != "runtime")
    {
        let path = format!("observers.{name}");
        let Some(table) = value.as_table() else {
            errors.push(ConfigError::new(path, "must be a table"));
            continue;
        };
        match observer::compile_observer(name, table, &path, &context) {
            Ok(o) => observers.push(o),
            Err(e) => errors.extend(e),
        }
    }
    if errors.is_empty() {
        Ok(Config {
            database,
            runtime,
            observers,
        })
    } else {
        Err(ConfigErrors(errors))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    url: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::schedule::BackoffStrategy;
    use crate::event::EventKind;
    use crate::listener::StartPosition;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOOK_URL" => Some("http://127.0.0.1:9/hook".into()),
            "SECRET" => Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()),
            "DATABASE_URL" => Some("postgres://localhost/app".into()),
            _ => None,
        }
    }

    #[test]
    fn a_full_configuration_compiles() {
        let config = load(
            r#"
            [database]
            url = "${DATABASE_URL}"

            [observers.runtime]
            consumer_id = "orders"
            batch_size = 500
            start_position = "beginning"

            [observers.order_shipped]
            entity = "Order"
            event_type = ["update", "INSERT"]
            condition = "status == 'shipped'"
            ordered = false
            retry = { max_attempts = 3, initial_delay_ms = 10, max_delay_ms = 100, backoff_strategy = "linear", jitter = false }

            [[observers.order_shipped.actions]]
            type = "webhook"
            url = "${HOOK_URL}"
            allow_private_networks = true
            "#,
            &env,
        )
        .unwrap();
        assert_eq!(
            config.database.url.as_deref(),
            Some("postgres://localhost/app")
        );
        assert_eq!(config.runtime.consumer_id, "orders");
        assert_eq!(config.runtime.batch_size, 500);
        assert_eq!(config.runtime.start_position, StartPosition::Beginning);
        let o = &config.observers[0];
        assert_eq!(o.entity.as_deref(), Some("Order"));
        assert_eq!(o.event_types, [EventKind::Updated, EventKind::Created]);
        assert!(!o.ordered);
        assert_eq!(o.retry.max_attempts, 3);
        assert_eq!(o.retry.strategy, BackoffStrategy::Linear);
        assert_eq!(o.actions.len(), 1);
    }

    #[test]
    fn every_error_is_reported_at_once_with_its_path() {
        let errors = load(
            r#"
            colour = "blue"
            [observers.runtime]
            batch_size = 0
            pool = 3
            [observers.bad]
            entity = "Order"
            event_type = "UPSERT"
            condition = "status == "
            tenant = "acme"
            typo = 1
            [[observers.bad.actions]]
            type = "email"
            [observers.worse]
            entity = "User"
            event_type = "INSERT"
            [[observers.worse.actions]]
            type = "webhook"
            url = "${MISSING_URL}"
            "#,
            &env,
        )
        .unwrap_err()
        .0;
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        for expected in [
            "colour",
            "observers.runtime.pool",
            "observers.bad.typo",
            "observers.worse.actions[0].url",
        ] {
            assert!(
                paths.contains(&expected),
                "{expected} missing from {paths:?}"
            );
        }
        assert!(errors
            .iter()
            .any(|e| e.message.contains("MISSING_URL is not set")));
    }

    #[test]
    fn compile_errors_name_their_observer_paths() {
        let errors = load(
            r#"
            [observers.runtime]
            batch_size = 0
            [observers.bad]
            entity = "Order"
            event_type = "UPSERT"
            condition = "status == "
            tenant = "acme"
            [[observers.bad.actions]]
            type = "email"
            "#,
            &env,
        )
        .unwrap_err()
        .0;
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        for expected in [
            "observers.runtime.batch_size",
            "observers.bad.event_type",
            "observers.bad.condition",
            "observers.bad.tenant",
            "observers.bad.actions[0].type",
        ] {
            assert!(
                paths.contains(&expected),
                "{expected} missing from {paths:?}"
            );
        }
    }

    #[test]
    fn a_toml_syntax_error_names_its_line() {
        let errors = load("[observers\nx = 1", &env).unwrap_err().0;
        assert_eq!(errors[0].path, "line 1");
    }
}
