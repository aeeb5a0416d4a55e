//! Configuration: TOML (FraiseQL's layout) -> parsed tables -> compiled observers. Pure: the
//! environment is passed in as a lookup function, never read here.
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

use crate::actions::cache::RedisSettings;
use crate::actions::email::EmailSettings;
use crate::actions::{Action, ActionConfig, CompileContext};
use crate::condition::Condition;
use crate::delivery::schedule::{BackoffStrategy, RetryPolicy};
use crate::error::ConfigError;
use crate::event::EventKind;
use crate::listener::StartPosition;
use serde::de::{DeserializeOwned, Visitor};
use serde::Deserialize;
use std::fmt;
use std::time::Duration;
use uuid::Uuid;

/// Every error found in a configuration, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} configuration error(s):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

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

/// `[observers.runtime]`: how the daemon reads and delivers.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeConfig {
    /// Names the checkpoint; instances sharing it share the work (one leads, the others wait).
    pub consumer_id: String,
    /// Longest sleep between polls of an idle change log.
    pub poll_interval: Duration,
    /// Events read per batch.
    pub batch_size: usize,
    /// Deliveries in flight at once (lanes: one entity's events run in order in one lane).
    pub concurrency: usize,
    /// Log an alert when this many committed changes wait to be processed.
    pub backlog_alert_threshold: u64,
    /// How long a shutdown waits for in-flight deliveries before giving up on them.
    pub shutdown_timeout: Duration,
    /// Where a consumer with no checkpoint starts.
    pub start_position: StartPosition,
    /// Also wake up on the NOTIFY hint (`fraiseql-observers notify enable`).
    pub notify: bool,
    /// How often the checkpoint is written.
    pub checkpoint_interval: Duration,
    /// How often the retry worker looks for due retries.
    pub retry_poll_interval: Duration,
    /// Address of the `/metrics` and `/healthz` endpoint (e.g. `127.0.0.1:9464`); none when unset.
    pub metrics_address: Option<String>,
    /// `text` or `json` logs (used by the binary).
    pub log_format: LogFormat,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            consumer_id: "fraiseql-observers".to_string(),
            poll_interval: Duration::from_millis(100),
            batch_size: 1000,
            concurrency: 64,
            backlog_alert_threshold: 1000,
            shutdown_timeout: Duration::from_secs(30),
            start_position: StartPosition::Now,
            notify: false,
            checkpoint_interval: Duration::from_millis(100),
            retry_poll_interval: Duration::from_millis(250),
            metrics_address: None,
            log_format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

pub use crate::delivery::policy::OnFailure;

/// One compiled observer: which events it concerns, and what to do with them.
#[derive(Debug)]
pub struct Observer {
    pub name: String,
    /// `None` for `entity = "*"`.
    pub entity: Option<String>,
    pub event_types: Vec<EventKind>,
    pub condition: Option<Condition>,
    /// Only this tenant's events (the row's tenant column, never the payload).
    pub tenant: Option<Uuid>,
    pub actions: Vec<Action>,
    pub retry: RetryPolicy,
    pub on_failure: OnFailure,
    /// One entity's deliveries keep their order (a failing one parks its successors).
    pub ordered: bool,
    /// A paused observer matches nothing.
    pub enabled: bool,
    /// Coalescing window (search and cache actions only): changes of one entity within it become
    /// one delivery of the latest state.
    pub coalesce: Option<Duration>,
    pub description: Option<String>,
}

/// Parse and compile a configuration. `env` resolves `${VAR}` references and `*_env` secrets.
pub fn load(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
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
    interpolate_table(&mut root, "", env, &mut errors);

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
            ("database", toml::Value::Table(t)) => match parse_fields::<RawDatabase>(t, "database")
            {
                Ok(raw) => database.url = raw.url,
                Err(e) => errors.extend(e),
            },
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
            match parse_fields::<RawRuntime>(table, path) {
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
        match compile_observer(name, table, &path, &context) {
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    consumer_id: Option<String>,
    poll_interval_ms: Option<u64>,
    batch_size: Option<usize>,
    concurrency: Option<usize>,
    backlog_alert_threshold: Option<u64>,
    shutdown_timeout_ms: Option<u64>,
    start_position: Option<StartPosition>,
    notify: Option<bool>,
    checkpoint_interval_ms: Option<u64>,
    retry_poll_interval_ms: Option<u64>,
    metrics_address: Option<String>,
    log_format: Option<LogFormat>,
    /// `[observers.runtime.email]`: the SMTP server email actions use.
    email: Option<toml::Table>,
    /// `[observers.runtime.redis]`: the Redis server cache actions use.
    redis: Option<toml::Table>,
}

impl RawRuntime {
    fn apply(self, r: &mut RuntimeConfig, path: &str, errors: &mut Vec<ConfigError>) {
        let mut positive = |key: &str, value: u64| {
            if value == 0 {
                errors.push(ConfigError::new(
                    format!("{path}.{key}"),
                    "must be at least 1",
                ));
            }
            value
        };
        if let Some(v) = self.consumer_id {
            r.consumer_id = v;
        }
        if let Some(v) = self.poll_interval_ms {
            r.poll_interval = Duration::from_millis(positive("poll_interval_ms", v));
        }
        if let Some(v) = self.batch_size {
            r.batch_size = positive("batch_size", v as u64) as usize;
        }
        if let Some(v) = self.concurrency {
            r.concurrency = positive("concurrency", v as u64) as usize;
        }
        if let Some(v) = self.backlog_alert_threshold {
            r.backlog_alert_threshold = v;
        }
        if let Some(v) = self.shutdown_timeout_ms {
            r.shutdown_timeout = Duration::from_millis(v);
        }
        if let Some(v) = self.checkpoint_interval_ms {
            r.checkpoint_interval = Duration::from_millis(positive("checkpoint_interval_ms", v));
        }
        if let Some(v) = self.retry_poll_interval_ms {
            r.retry_poll_interval = Duration::from_millis(positive("retry_poll_interval_ms", v));
        }
        if let Some(v) = self.start_position {
            r.start_position = v;
        }
        if let Some(v) = self.notify {
            r.notify = v;
        }
        if let Some(v) = self.log_format {
            r.log_format = v;
        }
        if let Some(v) = self.metrics_address {
            if v.parse::<std::net::SocketAddr>().is_err() {
                errors.push(ConfigError::new(
                    format!("{path}.metrics_address"),
                    format!("'{v}' is not an address like 127.0.0.1:9464"),
                ));
            }
            r.metrics_address = Some(v);
        }
        if r.consumer_id.is_empty() {
            errors.push(ConfigError::new(
                format!("{path}.consumer_id"),
                "must not be empty",
            ));
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawObserver {
    entity: Option<String>,
    event_type: Option<OneOrMany>,
    condition: Option<String>,
    tenant: Option<String>,
    actions: Option<Vec<toml::Value>>,
    retry: Option<toml::Table>,
    on_failure: Option<OnFailure>,
    ordered: Option<bool>,
    enabled: Option<bool>,
    coalesce_ms: Option<u64>,
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<u32>,
    initial_delay_ms: Option<u64>,
    max_delay_ms: Option<u64>,
    backoff_strategy: Option<BackoffStrategy>,
    jitter: Option<bool>,
}

fn compile_observer(
    name: &str,
    table: &toml::Table,
    path: &str,
    context: &CompileContext<'_>,
) -> Result<Observer, Vec<ConfigError>> {
    let raw: RawObserver = parse_fields(table, path)?;
    let mut errors = Vec::new();
    if name.is_empty()
        || name.len() > 100
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
    {
        errors.push(ConfigError::new(
            path,
            "observer names use letters, digits, '_', '-' and '.' (at most 100)",
        ));
    }
    let entity = match raw.entity.as_deref() {
        None | Some("") => {
            errors.push(ConfigError::new(
                format!("{path}.entity"),
                "missing; the entity type (object_type) to observe, or \"*\" for every entity",
            ));
            None
        }
        Some("*") => None,
        Some(e) => Some(e.to_string()),
    };
    let event_types = match raw.event_type {
        None => {
            errors.push(ConfigError::new(
                format!("{path}.event_type"),
                "missing; one or a list of INSERT, UPDATE, DELETE, CUSTOM",
            ));
            Vec::new()
        }
        Some(types) => {
            let names = match types {
                OneOrMany::One(n) => vec![n],
                OneOrMany::Many(ns) => ns,
            };
            if names.is_empty() {
                errors.push(ConfigError::new(
                    format!("{path}.event_type"),
                    "must not be empty",
                ));
            }
            let mut kinds = Vec::new();
            for n in names {
                match parse_kind(&n) {
                    Some(k) if !kinds.contains(&k) => kinds.push(k),
                    Some(_) => {}
                    None => errors.push(ConfigError::new(
                        format!("{path}.event_type"),
                        format!("unknown event type '{n}'; one of INSERT, UPDATE, DELETE, CUSTOM"),
                    )),
                }
            }
            kinds
        }
    };
    let condition = raw.condition.as_deref().and_then(|source| {
        Condition::compile(source)
            .map_err(|e| errors.push(ConfigError::new(format!("{path}.condition"), e.to_string())))
            .ok()
    });
    let tenant = raw.tenant.as_deref().and_then(|t| {
        Uuid::parse_str(t)
            .map_err(|_| {
                errors.push(ConfigError::new(
                    format!("{path}.tenant"),
                    format!("'{t}' is not a UUID (the tenant is the change log's fk_customer_org)"),
                ))
            })
            .ok()
    });
    let retry = match &raw.retry {
        None => RetryPolicy::default(),
        Some(t) => compile_retry(t, &format!("{path}.retry"), &mut errors),
    };
    let mut actions = Vec::new();
    match raw.actions {
        None => errors.push(ConfigError::new(
            format!("{path}.actions"),
            "missing; at least one [[observers.NAME.actions]] table",
        )),
        Some(list) if list.is_empty() => errors.push(ConfigError::new(
            format!("{path}.actions"),
            "must hold at least one action",
        )),
        Some(list) => {
            for (i, value) in list.iter().enumerate() {
                let action_path = format!("{path}.actions[{i}]");
                let Some(t) = value.as_table() else {
                    errors.push(ConfigError::new(action_path, "must be a table"));
                    continue;
                };
                match ActionConfig::parse(t, &action_path)
                    .and_then(|c| c.compile(&action_path, context))
                {
                    Ok(a) => actions.push(a),
                    Err(e) => errors.extend(e),
                }
            }
        }
    }
    let coalesce = match raw.coalesce_ms {
        None | Some(0) => None,
        Some(ms) => {
            if let Some(a) = actions
                .iter()
                .find(|a| !matches!(a.kind(), "search" | "cache"))
            {
                errors.push(ConfigError::new(
                    format!("{path}.coalesce_ms"),
                    format!(
                        "coalescing keeps only the latest state of an entity: it applies to search and cache actions, and this observer has a {} action (put it in an observer of its own)",
                        a.kind()
                    ),
                ));
            }
            if ms > 60_000 {
                errors.push(ConfigError::new(
                    format!("{path}.coalesce_ms"),
                    "at most 60000 (the checkpoint waits for coalesced changes)",
                ));
            }
            Some(Duration::from_millis(ms))
        }
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Observer {
        coalesce,
        name: name.to_string(),
        entity,
        event_types,
        condition,
        tenant,
        actions,
        retry,
        on_failure: raw.on_failure.unwrap_or_default(),
        ordered: raw.ordered.unwrap_or(true),
        enabled: raw.enabled.unwrap_or(true),
        description: raw.description,
    })
}

fn parse_kind(name: &str) -> Option<EventKind> {
    match name.to_ascii_uppercase().as_str() {
        "INSERT" => Some(EventKind::Created),
        "UPDATE" => Some(EventKind::Updated),
        "DELETE" => Some(EventKind::Deleted),
        "CUSTOM" => Some(EventKind::Custom),
        _ => None,
    }
}

fn compile_retry(table: &toml::Table, path: &str, errors: &mut Vec<ConfigError>) -> RetryPolicy {
    let mut policy = RetryPolicy::default();
    let raw: RawRetry = match parse_fields(table, path) {
        Ok(raw) => raw,
        Err(e) => {
            errors.extend(e);
            return policy;
        }
    };
    if let Some(v) = raw.max_attempts {
        if v == 0 {
            errors.push(ConfigError::new(
                format!("{path}.max_attempts"),
                "must be at least 1",
            ));
        }
        policy.max_attempts = v;
    }
    if let Some(v) = raw.initial_delay_ms {
        policy.initial_delay = Duration::from_millis(v);
    }
    if let Some(v) = raw.max_delay_ms {
        policy.max_delay = Duration::from_millis(v);
    }
    if let Some(v) = raw.backoff_strategy {
        policy.strategy = v;
    }
    if let Some(v) = raw.jitter {
        policy.jitter = v;
    }
    if policy.initial_delay > policy.max_delay {
        errors.push(ConfigError::new(
            format!("{path}.initial_delay_ms"),
            "must not exceed max_delay_ms",
        ));
    }
    policy
}

/// Replace `${VAR}` (and `${VAR:-default}`) in every string value; `$$` is a literal `$`.
fn interpolate_table(
    table: &mut toml::Table,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<ConfigError>,
) {
    for (key, value) in table.iter_mut() {
        let p = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        interpolate_value(value, &p, env, errors);
    }
}

fn interpolate_value(
    value: &mut toml::Value,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<ConfigError>,
) {
    match value {
        toml::Value::String(s) if s.contains('$') => match interpolate(s, env) {
            Ok(v) => *s = v,
            Err(message) => errors.push(ConfigError::new(path, message)),
        },
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate_value(item, &format!("{path}[{i}]"), env, errors);
            }
        }
        toml::Value::Table(t) => interpolate_table(t, path, env, errors),
        _ => {}
    }
}

/// Expand `${VAR}`, `${VAR:-default}` and `$$` in `s`.
pub fn interpolate(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unclosed '${{' in '{s}'"))?;
            let inner = &body[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("'${{{inner}}}' is not a valid variable reference"));
            }
            match (env(name), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => return Err(format!("environment variable {name} is not set")),
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Read a config struct from a table with every error reported: each unknown key, then each key
/// whose value has the wrong type (this works because every field of a raw config is optional).
pub(crate) fn parse_fields<T: DeserializeOwned>(
    table: &toml::Table,
    path: &str,
) -> Result<T, Vec<ConfigError>> {
    let known = field_names::<T>();
    let mut errors = Vec::new();
    for key in table.keys() {
        if !known.contains(&key.as_str()) {
            errors.push(ConfigError::new(
                format!("{path}.{key}"),
                format!("unknown key; expected one of: {}", known.join(", ")),
            ));
            continue;
        }
        let mut single = toml::Table::new();
        single.insert(key.clone(), table[key].clone());
        if let Err(e) = toml::Value::Table(single).try_into::<T>() {
            errors.push(ConfigError::new(
                format!("{path}.{key}"),
                e.message().trim().to_string(),
            ));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    toml::Value::Table(table.clone())
        .try_into::<T>()
        .map_err(|e| vec![ConfigError::new(path, e.message().trim().to_string())])
}

/// The field names a `#[derive(Deserialize)]` struct accepts, asked from serde itself.
pub(crate) fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Probe<'a>(&'a mut &'static [&'static str]);

    impl<'de> serde::Deserializer<'de> for Probe<'_> {
        type Error = serde::de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("probe"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(serde::de::Error::custom("probe"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOOK_URL" => Some("http://127.0.0.1:9/hook".into()),
            "SECRET" => Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()),
            "DATABASE_URL" => Some("postgres://localhost/app".into()),
            _ => None,
        }
    }

    #[test]
    fn interpolation_expands_defaults_and_escapes() {
        assert_eq!(
            interpolate("a${HOOK_URL}b", &env).unwrap(),
            "ahttp://127.0.0.1:9/hookb"
        );
        assert_eq!(interpolate("${NOPE:-x}", &env).unwrap(), "x");
        assert_eq!(interpolate("$$5 and $x", &env).unwrap(), "$5 and $x");
        assert!(interpolate("${NOPE}", &env)
            .unwrap_err()
            .contains("NOPE is not set"));
        assert!(interpolate("${OPEN", &env).is_err());
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
