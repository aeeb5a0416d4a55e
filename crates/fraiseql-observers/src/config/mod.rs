//! Configuration: TOML (FraiseQL's layout) -> parsed tables -> compiled observers. Pure: the
//! environment and the files named by `*_file` keys are read through lookups the caller passes
//! in ([`Sources`]), never here.
//!
//! The layers: [`crate::fields`] reads a table into a raw struct (every mistake reported);
//! `runtime.rs` is `[observers.runtime]`; `interpolate.rs` expands `${VAR}`; `aliases.rs`
//! rewrites the design document's key names to ours (with a [`ConfigWarning`] each);
//! `observer.rs` compiles one `[observers.NAME]` into an [`Observer`], its actions through
//! [`crate::actions`]. This module imports `actions`; `actions` never imports it.
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
//! variable that holds it (`*_env`) and never appears in a message. The library prints nothing:
//! deprecation warnings come back with the [`Config`], for the caller to show.

mod aliases;
mod interpolate;
mod observer;
mod runtime;

use serde::Deserialize;

use crate::actions::{Brokers, CompileContext, EmailSettings, HttpClient, RedisSettings};
use crate::error::ConfigError;
use crate::fields::parse_fields;

pub use crate::error::ConfigErrors;
pub use crate::observer::{Observer, OnFailure};
pub use aliases::{Alias, Scope, ALIASES};
pub use interpolate::interpolate;
pub use runtime::{LogFormat, RuntimeConfig};

/// A compiled configuration, ready to run.
#[derive(Debug)]
pub struct Config {
    pub database: DatabaseConfig,
    pub runtime: RuntimeConfig,
    /// In file order.
    pub observers: Vec<Observer>,
    /// `[distributed]`: the work stream of `run --role reader|worker`, when set.
    pub distributed: Option<crate::distributed::DistributedConfig>,
    /// What this process does with the configuration (not a key of the file: `run --role`
    /// sets it). A reader or worker role needs `[distributed]` ([`Config::with_role`]).
    pub role: crate::distributed::Role,
    /// What loaded but should be written otherwise (the design document's key names), in file
    /// order. The library prints nothing: `validate` prints these, `run` logs them.
    pub warnings: Vec<ConfigWarning>,
}

/// A key that loaded but is deprecated: where, and what to write instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    /// `observers.runtime.max_concurrency`.
    pub path: String,
    pub message: String,
}

impl ConfigWarning {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> ConfigWarning {
        ConfigWarning {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
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
    let mut warnings = Vec::new();
    interpolate::interpolate_table(&mut root, "", env, &mut errors);

    let mut database = DatabaseConfig::default();
    let mut runtime = RuntimeConfig::default();
    let mut observers = Vec::new();
    let mut email = None;
    let mut redis = None;
    let mut distributed = None;
    let mut distributed_table = None;
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
            // Compiled with the actions' context, below.
            ("distributed", toml::Value::Table(t)) => distributed_table = Some(t),
            ("observers", toml::Value::Table(_)) => {}
            ("database" | "observers" | "distributed", _) => {
                errors.push(ConfigError::new(key, "must be a table"))
            }
            _ => errors.push(ConfigError::new(
                key.clone(),
                "unknown key; expected one of: database, observers, distributed",
            )),
        }
    }
    // The runtime first: actions compile against its shared settings (SMTP server, Redis).
    match observer_tables.get("runtime") {
        None => {}
        Some(toml::Value::Table(table)) => {
            let path = "observers.runtime";
            let mut table = table.clone();
            aliases::rewrite(&mut table, Scope::Runtime, path, &mut errors, &mut warnings);
            match parse_fields::<runtime::RawRuntime, _>(&table, path) {
                Ok(mut raw) => {
                    if let Some(t) = &mut raw.email {
                        let at = format!("{path}.email");
                        aliases::rewrite(t, Scope::Email, &at, &mut errors, &mut warnings);
                        match EmailSettings::parse(t, &at, env) {
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
        brokers: Brokers::default(),
    };
    if let Some(t) = distributed_table {
        match crate::distributed::DistributedConfig::parse(t, "distributed", &context) {
            Ok(d) => distributed = Some(d),
            Err(e) => errors.extend(e),
        }
    }
    for (name, value) in observer_tables
        .iter()
        .filter(|(name, _)| *name != "runtime")
    {
        let path = format!("observers.{name}");
        let Some(table) = value.as_table() else {
            errors.push(ConfigError::new(path, "must be a table"));
            continue;
        };
        match observer::compile_observer(name, table, &path, &context, &mut warnings) {
            Ok(o) => observers.push(o),
            Err(e) => errors.extend(e),
        }
    }
    if errors.is_empty() {
        Ok(Config {
            database,
            runtime,
            observers,
            distributed,
            role: crate::distributed::Role::Single,
            warnings,
        })
    } else {
        Err(ConfigErrors(errors))
    }
}

impl Config {
    /// This configuration run as `role`: a reader or a worker needs a `[distributed]` section.
    pub fn with_role(mut self, role: crate::distributed::Role) -> Result<Config, ConfigErrors> {
        if role != crate::distributed::Role::Single && self.distributed.is_none() {
            return Err(ConfigErrors(vec![ConfigError::new(
                "distributed",
                format!(
                    "missing; `--role {}` needs a [distributed] section (nats_url, stream, partitions)",
                    role.as_str()
                ),
            )]));
        }
        self.role = role;
        Ok(self)
    }
}

/// Every key each table of the configuration accepts, by table (`observers.runtime`,
/// `observers.NAME.retry`, `actions, type = "sms"`), asked of the parsers themselves: for
/// documentation and the test that keeps the README complete. The design document's names
/// ([`ALIASES`]) are not in it.
pub fn keys() -> Vec<(String, &'static [&'static str])> {
    use crate::actions::cache::RedisSettingsConfig;
    use crate::actions::email::EmailSettingsConfig;
    use crate::actions::nats::StreamConfig;
    use crate::actions::{
        CacheConfig, EmailConfig, NatsConfig, PushConfig, RabbitMqConfig, SearchConfig,
        SlackConfig, SmsConfig, WebhookConfig,
    };
    use crate::fields::field_names;
    let action = |kind: &str| format!("actions, type = \"{kind}\"");
    vec![
        ("database".into(), field_names::<RawDatabase>()),
        (
            "distributed".into(),
            crate::distributed::DistributedConfig::keys(),
        ),
        (
            "observers.runtime".into(),
            field_names::<runtime::RawRuntime>(),
        ),
        (
            "observers.runtime.email".into(),
            field_names::<EmailSettingsConfig>(),
        ),
        (
            "observers.runtime.redis".into(),
            field_names::<RedisSettingsConfig>(),
        ),
        (
            "observers.runtime.circuit_breaker".into(),
            field_names::<runtime::RawBreaker>(),
        ),
        (
            "observers.NAME".into(),
            field_names::<observer::RawObserver>(),
        ),
        (
            "observers.NAME.retry".into(),
            field_names::<observer::RawRetry>(),
        ),
        (
            "actions, every type".into(),
            &["type", "max_in_flight", "rate_limit"],
        ),
        (action("webhook"), field_names::<WebhookConfig>()),
        (action("slack"), field_names::<SlackConfig>()),
        (action("email"), field_names::<EmailConfig>()),
        (action("sms"), field_names::<SmsConfig>()),
        (action("push"), field_names::<PushConfig>()),
        (action("search"), field_names::<SearchConfig>()),
        (action("cache"), field_names::<CacheConfig>()),
        (action("nats"), field_names::<NatsConfig>()),
        (
            "actions, type = \"nats\", stream".into(),
            field_names::<StreamConfig>(),
        ),
        (action("rabbitmq"), field_names::<RabbitMqConfig>()),
    ]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    url: Option<String>,
}

/// The settings a running daemon keeps until it restarts: `database.url`,
/// `observers.runtime.consumer_id`, `metrics_address`, `log_format` and `exit_on_lost_lead`.
/// Every other setting, and every observer, applies on a reload. Puts the running values
/// (`database`, `runtime`) back into `new` and returns the paths of those that differed, for the
/// caller to warn about.
pub fn keep_restart_only(
    database: &DatabaseConfig,
    runtime: &RuntimeConfig,
    new: &mut Config,
) -> Vec<&'static str> {
    let mut kept = Vec::new();
    if new.database != *database {
        kept.push("database.url");
        new.database = database.clone();
    }
    let r = &mut new.runtime;
    if r.consumer_id != runtime.consumer_id {
        kept.push("observers.runtime.consumer_id");
        r.consumer_id = runtime.consumer_id.clone();
    }
    if r.metrics_address != runtime.metrics_address {
        kept.push("observers.runtime.metrics_address");
        r.metrics_address = runtime.metrics_address.clone();
    }
    if r.log_format != runtime.log_format {
        kept.push("observers.runtime.log_format");
        r.log_format = runtime.log_format;
    }
    if r.exit_on_lost_lead != runtime.exit_on_lost_lead {
        kept.push("observers.runtime.exit_on_lost_lead");
        r.exit_on_lost_lead = runtime.exit_on_lost_lead;
    }
    kept
}

/// The first ```` ```toml ```` block of a module's `//!` documentation (`source` is the module's
/// text, from `include_str!`), for the tests that parse each module's documented example.
#[cfg(test)]
pub(crate) fn doc_toml(source: &str) -> String {
    let docs: String = source
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let start = docs.find("```toml").expect("a toml block") + "```toml".len();
    let end = start + docs[start..].find("```").expect("the block's end");
    docs[start..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::schedule::BackoffStrategy;
    use crate::event::EventKind;
    use crate::listener::StartPosition;
    use std::time::Duration;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOOK_URL" => Some("http://127.0.0.1:9/hook".into()),
            "SECRET" => Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()),
            "DATABASE_URL" => Some("postgres://localhost/app".into()),
            _ => None,
        }
    }

    #[test]
    fn a_reload_keeps_the_settings_that_need_a_restart() {
        let running = load(
            "[database]\nurl = \"postgres://a/app\"\n[observers.runtime]\nconsumer_id = \"c1\"\nbatch_size = 10\n",
            &env,
        )
        .unwrap();
        let mut new = load(
            "[database]\nurl = \"postgres://b/app\"\n[observers.runtime]\nconsumer_id = \"c2\"\nbatch_size = 20\nmetrics_address = \"127.0.0.1:1\"\n",
            &env,
        )
        .unwrap();
        let kept = keep_restart_only(&running.database, &running.runtime, &mut new);
        assert_eq!(
            kept,
            [
                "database.url",
                "observers.runtime.consumer_id",
                "observers.runtime.metrics_address"
            ]
        );
        assert_eq!(new.database, running.database);
        assert_eq!(new.runtime.consumer_id, "c1");
        assert_eq!(new.runtime.metrics_address, None);
        assert_eq!(new.runtime.batch_size, 20, "the rest applies");
        assert!(keep_restart_only(&running.database, &running.runtime, &mut new).is_empty());
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

    /// Every secret a test configuration names: an APNs key for push, plausible values for the
    /// rest.
    fn any_env(name: &str) -> Option<String> {
        use p256::pkcs8::EncodePrivateKey;
        Some(match name {
            "APNS_KEY" => p256::SecretKey::from_slice(&[7; 32])
                .unwrap()
                .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
                .unwrap()
                .to_string(),
            "TWILIO_ACCOUNT_SID" => "AC0123456789abcdef0123456789abcdef".into(),
            _ => format!("value-of-{name}"),
        })
    }

    /// One observer with one action of `kind`, its keys written after `type`.
    fn with_action(runtime: &str, kind: &str, keys: &str) -> String {
        format!(
            r#"
            [observers.runtime]
            {runtime}
            [observers.runtime.redis]
            url = "redis://127.0.0.1:6379/0"
            [observers.runtime.email]
            host = "smtp.example.com"
            from = "shop@example.com"

            [observers.o]
            entity = "Order"
            event_type = "UPDATE"

            [[observers.o.actions]]
            type = "{kind}"
            {keys}
            "#
        )
    }

    const SMS: &str = r#"account_sid_env = "TWILIO_ACCOUNT_SID"
            auth_token_env = "TWILIO_AUTH_TOKEN"
            from = "+15005550006"
            message_template = "paid""#;
    const PUSH: &str = r#"provider = "apns"
            title_template = "paid"
            team_id = "TEAM123456"
            key_id = "KEY1234567"
            private_key_env = "APNS_KEY"
            topic = "com.example.shop""#;

    fn warning_paths(config: &Config) -> Vec<&str> {
        config.warnings.iter().map(|w| w.path.as_str()).collect()
    }

    fn error_paths(text: &str) -> Vec<String> {
        load(text, &any_env)
            .unwrap_err()
            .0
            .into_iter()
            .map(|e| e.path)
            .collect()
    }

    #[test]
    fn the_design_documents_runtime_keys_load_with_warnings() {
        let config = load(
            &with_action(
                "max_concurrency = 8\nshutdown_timeout = \"5s\"",
                "webhook",
                "url = \"https://example.com/hook\"",
            ),
            &any_env,
        )
        .unwrap();
        assert_eq!(config.runtime.concurrency, 8);
        assert_eq!(config.runtime.shutdown_timeout, Duration::from_secs(5));
        assert_eq!(
            warning_paths(&config),
            [
                "observers.runtime.max_concurrency",
                "observers.runtime.shutdown_timeout"
            ]
        );
        assert!(config.warnings[0].message.contains("'concurrency'"));
        assert!(config.warnings[1]
            .message
            .contains("shutdown_timeout_ms = 5000"));

        let errors = error_paths(&with_action(
            "max_concurrency = 8\nconcurrency = 4\nshutdown_timeout = \"5s\"\nshutdown_timeout_ms = 1",
            "webhook",
            "url = \"https://example.com/hook\"",
        ));
        assert_eq!(
            errors,
            [
                "observers.runtime.max_concurrency",
                "observers.runtime.shutdown_timeout"
            ]
        );
        let errors = error_paths(&with_action(
            "shutdown_timeout = 30",
            "webhook",
            "url = \"https://example.com/hook\"",
        ));
        assert_eq!(errors, ["observers.runtime.shutdown_timeout"]);
    }

    #[test]
    fn start_tls_loads_with_a_warning() {
        let text = with_action("", "webhook", "url = \"https://example.com/hook\"").replace(
            "from = \"shop@example.com\"",
            "from = \"shop@example.com\"\ntls = \"start_tls\"",
        );
        let config = load(&text, &any_env).unwrap();
        assert_eq!(warning_paths(&config), ["observers.runtime.email.tls"]);
        assert!(config.warnings[0].message.contains(r#"tls = "starttls""#));
    }

    #[test]
    fn the_design_documents_sms_keys_load_with_warnings() {
        for (alias, value) in [
            ("phone", "+33612345678"),
            ("phone_template", "{{ after.phone }}"),
        ] {
            let config = load(
                &with_action("", "sms", &format!("{SMS}\n{alias} = \"{value}\"")),
                &any_env,
            )
            .unwrap();
            assert_eq!(
                warning_paths(&config),
                [format!("observers.o.actions[0].{alias}")]
            );
        }
        let errors = error_paths(&with_action(
            "",
            "sms",
            &format!("{SMS}\nphone = \"+33612345678\"\nto = \"+33612345678\""),
        ));
        assert_eq!(errors, ["observers.o.actions[0].phone"]);
        let errors = error_paths(&with_action(
            "",
            "sms",
            &format!("{SMS}\nphone_template = \"{{{{ after.phone }}}}\"\nto_template = \"x\""),
        ));
        assert_eq!(errors, ["observers.o.actions[0].phone_template"]);
    }

    #[test]
    fn the_design_documents_push_key_loads_with_a_warning() {
        let config = load(
            &with_action(
                "",
                "push",
                &format!("{PUSH}\ndevice_token = \"{{{{ after.token }}}}\""),
            ),
            &any_env,
        )
        .unwrap();
        assert_eq!(
            warning_paths(&config),
            ["observers.o.actions[0].device_token"]
        );
        assert!(config.warnings[0].message.contains("'token_template'"));
        let errors = error_paths(&with_action(
            "",
            "push",
            &format!("{PUSH}\ndevice_token = \"abc\"\ntoken_template = \"abc\""),
        ));
        assert_eq!(errors, ["observers.o.actions[0].device_token"]);
    }

    #[test]
    fn the_design_documents_cache_keys_load_with_warnings() {
        let config = load(
            &with_action(
                "",
                "cache",
                "key_pattern = \"order:{{ data.id }}\"\naction = \"refresh\"",
            ),
            &any_env,
        )
        .unwrap();
        assert_eq!(
            warning_paths(&config),
            [
                "observers.o.actions[0].key_pattern",
                "observers.o.actions[0].action"
            ]
        );
        let errors = error_paths(&with_action(
            "",
            "cache",
            "key_pattern = \"a\"\nkeys = [\"a\"]\naction = \"invalidate\"\noperation = \"invalidate\"",
        ));
        assert_eq!(
            errors,
            [
                "observers.o.actions[0].key_pattern",
                "observers.o.actions[0].action"
            ]
        );
    }

    #[test]
    fn our_own_keys_give_no_warning() {
        let config = load(
            &with_action(
                "concurrency = 8",
                "sms",
                &format!("{SMS}\nto = \"+33612345678\""),
            ),
            &any_env,
        )
        .unwrap();
        assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    }

    #[test]
    fn on_failure_alert_is_refused_naming_what_to_use() {
        let text = with_action("", "webhook", "url = \"https://example.com/hook\"").replace(
            "event_type = \"UPDATE\"",
            "event_type = \"UPDATE\"\non_failure = \"alert\"",
        );
        let errors = load(&text, &any_env).unwrap_err().0;
        assert_eq!(errors[0].path, "observers.o.on_failure");
        assert!(
            errors[0].message.contains("on_failure = \"dlq\"")
                && errors[0]
                    .message
                    .contains("fraiseql_observers_dead_lettered_total"),
            "{errors:?}"
        );
        let text = text.replace("\"alert\"", "\"page\"");
        let errors = load(&text, &any_env).unwrap_err().0;
        assert!(
            errors[0].message.contains("\"dlq\" or \"log\""),
            "{errors:?}"
        );
        for (value, expected) in [("dlq", OnFailure::Dlq), ("log", OnFailure::Log)] {
            let config =
                load(&text.replace("\"page\"", &format!("\"{value}\"")), &any_env).unwrap();
            assert_eq!(config.observers[0].on_failure, expected);
        }
    }

    #[test]
    fn keys_cover_every_action_kind() {
        let tables: Vec<String> = keys().into_iter().map(|(t, _)| t).collect();
        for kind in crate::actions::AVAILABLE {
            let table = format!("actions, type = \"{kind}\"");
            assert!(tables.contains(&table), "{table} missing from {tables:?}");
        }
        assert!(keys().iter().all(|(_, k)| !k.is_empty()));
    }

    #[test]
    fn a_toml_syntax_error_names_its_line() {
        let errors = load("[observers\nx = 1", &env).unwrap_err().0;
        assert_eq!(errors[0].path, "line 1");
    }
}
