//! The cache action: keep a Redis cache in step with entities (invalidate, refresh, publish).
//!
//! ```toml
//! [observers.runtime.redis]
//! url_env = "REDIS_URL"                      # or url = "redis://127.0.0.1:6379/0"
//! key_prefix = "shop:"                       # optional, before every key and pattern
//! connect_timeout_ms = 5000                  # default 5 s
//! timeout_ms = 2000                          # each command; default 2 s
//!
//! [[observers.order_paid.actions]]
//! type = "cache"
//! operation = "invalidate"                   # "invalidate", "refresh" or "publish"
//! keys = ["order:{{ data.id }}", "orders:customer:{{ data.customer_id }}:*"]
//! pattern = false                            # true: every key is a glob pattern
//! ```
//!
//! The other operations:
//!
//! ```text
//! operation = "refresh"                      # SET each key to the value
//! keys = ["order:{{ data.id }}"]
//! value_template = '{"id": {{ after.id }}, "total": {{ after.total }}}'   # default {{ data }}
//! format = "json"                            # "json" (default) or "text" for the template
//! ttl_seconds = 3600                         # optional
//!
//! operation = "publish"                      # PUBLISH a message on a channel
//! channel = "invalidations"                  # a text template
//! message_template = '{"order": {{ after.id }}}'   # default: see below
//! format = "json"
//! ```
//!
//! Invariants:
//!
//! * Connection settings come from `[observers.runtime.redis]` ([`RedisSettings`]); a cache
//!   action without them fails at compile. Every action compiled with the same settings shares
//!   one connection manager (reconnecting, multiplexed), connected on first use: compiling does
//!   no I/O. The URL may hold a password, so messages show only host and port.
//! * Keys are text templates ([`TemplateMode::Key`]: printing an absent or null value is an
//!   error, never a truncated key; use `data`, which is the before-image on a delete, rather
//!   than `after`), each prefixed with `key_prefix`. `invalidate` UNLINKs them. A key
//!   is a glob pattern when `pattern = true` or when its template contains `*`; patterns are
//!   expanded with `SCAN MATCH` (`COUNT 1000`) and the matches UNLINKed. In a pattern, every
//!   value printed by `{{ }}` has the glob metacharacters `* ? [ ] \` backslash-escaped
//!   ([`TemplateMode::Glob`]), and so has `key_prefix`: only the template's literal text is a
//!   wildcard, and no event value can widen the match.
//! * `refresh` SETs every key to the rendered value (JSON mode by default: the entity's data),
//!   with `EX ttl_seconds` when given, in one `MULTI`/`EXEC`. On a delete event there is no
//!   state to store: `refresh` UNLINKs the keys instead (it never caches a deleted entity).
//! * `publish` PUBLISHes the rendered message on the rendered channel (a key-mode template, no
//!   `key_prefix`); the
//!   default message is `{"entity_type", "entity_id", "kind", "event_id"}`. Having no
//!   subscriber is success (the number of receivers is logged at debug).
//! * Every key of the table is read by the operation it belongs to: a key that the chosen
//!   operation does not use (`ttl_seconds` on `invalidate`...) is a compile error.
//! * A key, pattern or channel that renders empty is a permanent error. Connection failures,
//!   timeouts and the server's "try again" answers (LOADING, TRYAGAIN, MASTERDOWN...) are
//!   transient; refused credentials, missing permissions and command errors are permanent.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, RetryMethod};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::OnceCell;

use super::{resolve_url, template, ActionError, CompileContext, DeliveryRequest, UrlSetting};
use crate::error::ConfigError;
use crate::event::{EntityEvent, EventKind};
use crate::fields::parse_fields;
use crate::template::{escape_glob, EventContext, Template, TemplateMode};

const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;
const DEFAULT_TIMEOUT_MS: u64 = 2_000;
const MAX_TIMEOUT_MS: u64 = 300_000;
/// How many keys one `SCAN` step asks the server to look at.
const SCAN_COUNT: u64 = 1000;

/// `[observers.runtime.redis]` as written in the configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettingsConfig {
    pub url: Option<String>,
    pub url_env: Option<String>,
    pub key_prefix: Option<String>,
    pub connect_timeout_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
}

/// The Redis server every cache action talks to, with its shared connection manager.
/// Cloning is cheap and keeps sharing the connection.
#[derive(Clone)]
pub struct RedisSettings {
    shared: Arc<RedisServer>,
}

struct RedisServer {
    client: redis::Client,
    /// `host:port`, for messages (never the URL: it may hold a password).
    shown: String,
    key_prefix: String,
    connect_timeout: Duration,
    timeout: Duration,
    manager: OnceCell<ConnectionManager>,
}

impl fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.shared;
        f.debug_struct("RedisSettings")
            .field("server", &s.shown)
            .field("key_prefix", &s.key_prefix)
            .field("connect_timeout", &s.connect_timeout)
            .field("timeout", &s.timeout)
            .finish()
    }
}

impl RedisSettings {
    /// Read `[observers.runtime.redis]` (`path` is where it sits, for messages). Pure; reports
    /// every error; `url_env` is read through `env`.
    pub fn parse(
        table: &toml::Table,
        path: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<RedisSettings, Vec<ConfigError>> {
        let config: RedisSettingsConfig = parse_fields::<_, ConfigError>(table, path)?;
        RedisSettings::compile(&config, path, env)
    }

    /// Check settings already read into a [`RedisSettingsConfig`].
    pub fn compile(
        config: &RedisSettingsConfig,
        path: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<RedisSettings, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let client = resolve_url(
            UrlSetting {
                key: "url",
                value: config.url.as_deref(),
                env_key: "url_env",
                env_value: config.url_env.as_deref(),
            },
            true,
            path,
            env,
            &mut errors,
        )
        .and_then(|(url, _)| {
            let key = if config.url.is_some() { "url" } else { "url_env" };
            let valid = url.starts_with("redis://")
                || url.starts_with("rediss://")
                || url.starts_with("unix://")
                || url.starts_with("redis+unix://");
            match valid.then(|| redis::Client::open(url.as_str())) {
                Some(Ok(client)) => Some(client),
                // The parser's message may quote the URL, which may hold a password.
                _ => {
                    errors.push(ConfigError::new(
                        format!("{path}.{key}"),
                        "not a valid Redis URL (redis://[user:password@]host[:port][/db], or rediss:// for TLS)",
                    ));
                    None
                }
            }
        });
        let key_prefix = config.key_prefix.clone().unwrap_or_default();
        if key_prefix.chars().any(char::is_control) {
            errors.push(ConfigError::new(
                format!("{path}.key_prefix"),
                "must not contain control characters",
            ));
        }
        let connect_timeout = millis(
            config.connect_timeout_ms,
            DEFAULT_CONNECT_TIMEOUT_MS,
            "connect_timeout_ms",
            path,
            &mut errors,
        );
        let timeout = millis(
            config.timeout_ms,
            DEFAULT_TIMEOUT_MS,
            "timeout_ms",
            path,
            &mut errors,
        );
        match (errors.is_empty(), client) {
            (true, Some(client)) => Ok(RedisSettings {
                shared: Arc::new(RedisServer {
                    shown: client.get_connection_info().addr().to_string(),
                    client,
                    key_prefix,
                    connect_timeout,
                    timeout,
                    manager: OnceCell::new(),
                }),
            }),
            _ => Err(errors),
        }
    }

    /// `key_prefix`, as configured.
    pub fn key_prefix(&self) -> &str {
        &self.shared.key_prefix
    }

    /// The shared connection, connected on first use (a failed connect is retried on the next
    /// use).
    async fn connection(&self) -> Result<ConnectionManager, ActionError> {
        let s = &self.shared;
        let connect = async {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(s.connect_timeout))
                .set_response_timeout(Some(s.timeout))
                .set_number_of_retries(2);
            tokio::time::timeout(
                s.connect_timeout,
                ConnectionManager::new_with_config(s.client.clone(), config),
            )
            .await
            .map_err(|_| {
                ActionError::transient(format!(
                    "cannot connect within {} ms",
                    s.connect_timeout.as_millis()
                ))
            })?
            .map_err(|e| classify_redis(&e, "cannot connect"))
        };
        s.manager.get_or_try_init(|| connect).await.cloned()
    }
}

fn millis(
    value: Option<u64>,
    default: u64,
    key: &str,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Duration {
    match value {
        None => Duration::from_millis(default),
        Some(ms) if (1..=MAX_TIMEOUT_MS).contains(&ms) => Duration::from_millis(ms),
        Some(ms) => {
            errors.push(ConfigError::new(
                format!("{path}.{key}"),
                format!("must be between 1 and {MAX_TIMEOUT_MS}, not {ms}"),
            ));
            Duration::from_millis(default)
        }
    }
}

/// The cache action as written in the configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    pub operation: Option<String>,
    pub keys: Option<Vec<String>>,
    pub pattern: Option<bool>,
    pub value_template: Option<String>,
    pub format: Option<String>,
    pub ttl_seconds: Option<u64>,
    pub channel: Option<String>,
    pub message_template: Option<String>,
}

/// One key of `keys`: a template, and whether it is a glob pattern.
struct Key {
    template: Template,
    pattern: bool,
}

enum Operation {
    Invalidate {
        keys: Vec<Key>,
    },
    Refresh {
        keys: Vec<Template>,
        value: Template,
        ttl_seconds: Option<u64>,
    },
    Publish {
        channel: Template,
        message: Option<Template>,
    },
}

impl Operation {
    fn name(&self) -> &'static str {
        match self {
            Operation::Invalidate { .. } => "invalidate",
            Operation::Refresh { .. } => "refresh",
            Operation::Publish { .. } => "publish",
        }
    }
}

/// A compiled cache action.
pub struct Cache {
    server: RedisSettings,
    operation: Operation,
}

impl fmt::Debug for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("server", &self.server)
            .field("operation", &self.operation.name())
            .finish_non_exhaustive()
    }
}

/// The keys each operation reads; any other key of the table is an error.
const USED_BY: &[(&str, &[&str])] = &[
    ("invalidate", &["keys", "pattern"]),
    (
        "refresh",
        &["keys", "value_template", "format", "ttl_seconds"],
    ),
    ("publish", &["channel", "message_template", "format"]),
];

/// Compile a cache action. Pure; reports every error with its path.
pub fn compile(
    config: &CacheConfig,
    path: &str,
    ctx: &CompileContext<'_>,
) -> Result<Cache, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let operation_name = match config.operation.as_deref() {
        None => {
            errors.push(ConfigError::new(
                format!("{path}.operation"),
                "missing; one of \"invalidate\", \"refresh\", \"publish\"",
            ));
            None
        }
        Some(name) if USED_BY.iter().any(|(op, _)| *op == name) => Some(name),
        Some(other) => {
            errors.push(ConfigError::new(
                format!("{path}.operation"),
                format!("must be \"invalidate\", \"refresh\" or \"publish\", not '{other}'"),
            ));
            None
        }
    };

    if let Some(name) = operation_name {
        let used = USED_BY
            .iter()
            .find(|(op, _)| *op == name)
            .map(|(_, keys)| *keys)
            .unwrap_or_default();
        let set: [(&str, bool); 7] = [
            ("keys", config.keys.is_some()),
            ("pattern", config.pattern.is_some()),
            ("value_template", config.value_template.is_some()),
            ("format", config.format.is_some()),
            ("ttl_seconds", config.ttl_seconds.is_some()),
            ("channel", config.channel.is_some()),
            ("message_template", config.message_template.is_some()),
        ];
        for (key, is_set) in set {
            if is_set && !used.contains(&key) {
                errors.push(ConfigError::new(
                    format!("{path}.{key}"),
                    format!(
                        "is not used by operation \"{name}\" (it uses: {})",
                        used.join(", ")
                    ),
                ));
            }
        }
    }

    let json = match config.format.as_deref() {
        None | Some("json") => true,
        Some("text") => false,
        Some(other) => {
            errors.push(ConfigError::new(
                format!("{path}.format"),
                format!("must be \"json\" or \"text\", not '{other}'"),
            ));
            true
        }
    };
    let value_mode = if json {
        TemplateMode::Json
    } else {
        TemplateMode::Text
    };
    // `format` says how the operation's template renders: without that template it would be
    // read by nothing. (refresh with format = "text" and no template is reported below.)
    let formatted_template = match operation_name {
        Some("refresh") => Some(("value_template", config.value_template.is_some())),
        Some("publish") => Some(("message_template", config.message_template.is_some())),
        _ => None,
    };
    if let (Some((key, false)), Some(_)) = (formatted_template, &config.format) {
        if json || key != "value_template" {
            errors.push(ConfigError::new(
                format!("{path}.format"),
                format!("applies to {key}, which is not set"),
            ));
        }
    }

    let operation = match operation_name {
        Some("invalidate") => {
            let keys = key_templates(config, path, &mut errors)
                .into_iter()
                .map(|(template, pattern)| Key { template, pattern })
                .collect::<Vec<_>>();
            Some(Operation::Invalidate { keys })
        }
        Some("refresh") => {
            let keys = key_templates(config, path, &mut errors);
            for (i, (_, pattern)) in keys.iter().enumerate() {
                if *pattern {
                    errors.push(ConfigError::new(
                        format!("{path}.keys[{i}]"),
                        "refresh sets exact keys; a glob pattern ('*') cannot be set",
                    ));
                }
            }
            let value = match (&config.value_template, json) {
                (Some(source), _) => {
                    template(source, value_mode, "value_template", path, &mut errors)
                }
                (None, true) => template(
                    "{{ data }}",
                    TemplateMode::Json,
                    "value_template",
                    path,
                    &mut errors,
                ),
                (None, false) => {
                    errors.push(ConfigError::new(
                        format!("{path}.value_template"),
                        "missing; format = \"text\" needs a value_template (the default value is the entity's data as JSON)",
                    ));
                    None
                }
            };
            if config.ttl_seconds == Some(0) {
                errors.push(ConfigError::new(
                    format!("{path}.ttl_seconds"),
                    "must be at least 1 (leave it out for no expiry)",
                ));
            }
            value.map(|value| Operation::Refresh {
                keys: keys.into_iter().map(|(t, _)| t).collect(),
                value,
                ttl_seconds: config.ttl_seconds,
            })
        }
        Some("publish") => {
            let channel = match &config.channel {
                None => {
                    errors.push(ConfigError::new(
                        format!("{path}.channel"),
                        "missing; the channel to publish on",
                    ));
                    None
                }
                Some(source) => template(source, TemplateMode::Text, "channel", path, &mut errors),
            };
            let message = config.message_template.as_deref().and_then(|source| {
                template(source, value_mode, "message_template", path, &mut errors)
            });
            match (channel, config.message_template.is_some(), message) {
                (Some(channel), false, _) => Some(Operation::Publish {
                    channel,
                    message: None,
                }),
                (Some(channel), true, Some(message)) => Some(Operation::Publish {
                    channel,
                    message: Some(message),
                }),
                _ => None,
            }
        }
        _ => None,
    };

    let server = match ctx.redis {
        Some(settings) => Some(settings.clone()),
        None => {
            errors.push(ConfigError::new(
                format!("{path}.type"),
                "a cache action needs [observers.runtime.redis] (url or url_env)",
            ));
            None
        }
    };

    match (errors.is_empty(), server, operation) {
        (true, Some(server), Some(operation)) => Ok(Cache { server, operation }),
        _ => Err(errors),
    }
}

/// `keys`, compiled: each template with whether it is a pattern.
fn key_templates(
    config: &CacheConfig,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Vec<(Template, bool)> {
    let keys = match &config.keys {
        None => {
            errors.push(ConfigError::new(
                format!("{path}.keys"),
                "missing; a list of key templates",
            ));
            return Vec::new();
        }
        Some(keys) if keys.is_empty() => {
            errors.push(ConfigError::new(
                format!("{path}.keys"),
                "is empty; give at least one key",
            ));
            return Vec::new();
        }
        Some(keys) => keys,
    };
    let all_patterns = config.pattern == Some(true);
    keys.iter()
        .enumerate()
        .filter_map(|(i, source)| {
            let pattern = all_patterns || source.contains('*');
            let mode = if pattern {
                TemplateMode::Glob
            } else {
                TemplateMode::Key
            };
            template(source, mode, &format!("keys[{i}]"), path, errors).map(|t| (t, pattern))
        })
        .collect()
}

impl Cache {
    pub(crate) fn endpoint(&self) -> String {
        self.server.shared.shown.clone()
    }

    /// Run the operation once. `Ok` only when Redis carried it out.
    pub async fn execute(&self, request: &DeliveryRequest<'_>) -> Result<(), ActionError> {
        let context = format!(
            "cache {} redis {}",
            self.operation.name(),
            self.server.shared.shown
        );
        let ctx = EventContext::new(request.event);
        let outcome = self.run(request.event, &ctx).await;
        tracing::debug!(
            action = "cache",
            operation = self.operation.name(),
            delivery_id = request.delivery_id,
            attempt = request.attempt,
            redis = %self.server.shared.shown,
            affected = outcome.as_ref().ok(),
            ok = outcome.is_ok(),
            "cache action done"
        );
        outcome.map(|_| ()).map_err(|e| e.context(&context))
    }

    /// Carry out the operation; returns how many keys (or receivers) it touched.
    async fn run(&self, event: &EntityEvent, ctx: &EventContext) -> Result<u64, ActionError> {
        let prefix = &self.server.shared.key_prefix;
        match &self.operation {
            Operation::Invalidate { keys } => {
                let mut exact = Vec::new();
                let mut patterns = Vec::new();
                for (i, key) in keys.iter().enumerate() {
                    let rendered = render_nonempty(&key.template, ctx, &format!("keys[{i}]"))?;
                    if key.pattern {
                        patterns.push(format!("{}{rendered}", escape_glob(prefix)));
                    } else {
                        exact.push(format!("{prefix}{rendered}"));
                    }
                }
                let mut conn = self.server.connection().await?;
                let mut removed = unlink(&mut conn, &exact).await?;
                for pattern in &patterns {
                    removed += self.unlink_matching(&mut conn, pattern).await?;
                }
                Ok(removed)
            }
            Operation::Refresh {
                keys,
                value,
                ttl_seconds,
            } => {
                let keys = keys
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        render_nonempty(t, ctx, &format!("keys[{i}]"))
                            .map(|k| format!("{prefix}{k}"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let mut conn = self.server.connection().await?;
                if event.kind == EventKind::Deleted {
                    return unlink(&mut conn, &keys).await;
                }
                let value = value.render_context(ctx).map_err(|e| {
                    ActionError::permanent(format!("value_template cannot render this event: {e}"))
                })?;
                let mut pipe = redis::pipe();
                pipe.atomic();
                for key in &keys {
                    let set = pipe.cmd("SET").arg(key).arg(&value);
                    if let Some(ttl) = ttl_seconds {
                        set.arg("EX").arg(*ttl);
                    }
                    set.ignore();
                }
                pipe.query_async::<()>(&mut conn)
                    .await
                    .map_err(|e| classify_redis(&e, "SET failed"))?;
                Ok(keys.len() as u64)
            }
            Operation::Publish { channel, message } => {
                let channel = render_nonempty(channel, ctx, "channel")?;
                let message = match message {
                    Some(t) => t.render_context(ctx).map_err(|e| {
                        ActionError::permanent(format!(
                            "message_template cannot render this event: {e}"
                        ))
                    })?,
                    None => default_message(event).to_string(),
                };
                let mut conn = self.server.connection().await?;
                redis::cmd("PUBLISH")
                    .arg(&channel)
                    .arg(&message)
                    .query_async::<u64>(&mut conn)
                    .await
                    .map_err(|e| classify_redis(&e, "PUBLISH failed"))
            }
        }
    }

    /// `SCAN MATCH pattern` to the end, UNLINKing each step's matches.
    async fn unlink_matching(
        &self,
        conn: &mut ConnectionManager,
        pattern: &str,
    ) -> Result<u64, ActionError> {
        let mut cursor: u64 = 0;
        let mut removed = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(conn)
                .await
                .map_err(|e| classify_redis(&e, "SCAN failed"))?;
            removed += unlink(conn, &keys).await?;
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }
}

async fn unlink<K: redis::ToRedisArgs + Send + Sync>(
    conn: &mut ConnectionManager,
    keys: &[K],
) -> Result<u64, ActionError> {
    if keys.is_empty() {
        return Ok(0);
    }
    redis::cmd("UNLINK")
        .arg(keys)
        .query_async::<u64>(conn)
        .await
        .map_err(|e| classify_redis(&e, "UNLINK failed"))
}

fn render_nonempty(t: &Template, ctx: &EventContext, key: &str) -> Result<String, ActionError> {
    let rendered = t
        .render_context(ctx)
        .map_err(|e| ActionError::permanent(format!("{key} cannot render this event: {e}")))?;
    if rendered.is_empty() {
        return Err(ActionError::permanent(format!(
            "{key} rendered empty for this event"
        )));
    }
    Ok(rendered)
}

/// The default `publish` message: `{"entity_type", "entity_id", "kind", "event_id"}`.
pub fn default_message(event: &EntityEvent) -> serde_json::Value {
    json!({
        "entity_type": event.entity_type,
        "entity_id": event.entity_id.to_string(),
        "kind": event.kind.as_str(),
        "event_id": event.id.to_string(),
    })
}

/// A Redis failure as an action error: connection failures and "try again" answers are
/// transient; refused credentials, missing permissions and command errors are permanent.
fn classify_redis(e: &RedisError, what: &str) -> ActionError {
    let permanent = matches!(
        e.kind(),
        redis::ErrorKind::AuthenticationFailed | redis::ErrorKind::InvalidClientConfig
    ) || matches!(e.retry_method(), RetryMethod::NoRetry);
    if permanent {
        ActionError::permanent(format!("{what}: {e}"))
    } else {
        ActionError::transient(format!("{what}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        (k == "REDIS_URL").then(|| "redis://:s3cret@127.0.0.1:6379/0".to_string())
    }

    fn settings() -> RedisSettings {
        RedisSettings::parse(
            &toml::from_str(r#"url = "redis://127.0.0.1:6379""#).unwrap(),
            "r",
            &env,
        )
        .unwrap()
    }

    fn compile_toml(source: &str) -> Result<Cache, Vec<ConfigError>> {
        let settings = settings();
        let table: toml::Table = toml::from_str(&format!("type = \"cache\"\n{source}")).unwrap();
        let config = match crate::actions::ActionConfig::parse(&table, "p")?.settings {
            crate::actions::Settings::Cache(c) => c,
            other => panic!("{other:?}"),
        };
        let ctx = CompileContext {
            redis: Some(&settings),
            ..CompileContext::new(&env)
        };
        compile(&config, "p", &ctx)
    }

    fn paths(errors: &[ConfigError]) -> Vec<&str> {
        errors.iter().map(|e| e.path.as_str()).collect()
    }

    #[test]
    fn doc_example_compiles() {
        let source = include_str!("cache.rs");
        let docs: String = source
            .lines()
            .filter_map(|l| l.strip_prefix("//!"))
            .map(|l| l.strip_prefix(' ').unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let start = docs.find("```toml").unwrap() + 7;
        let end = start + docs[start..].find("```").unwrap();
        let file: toml::Table = toml::from_str(&docs[start..end]).unwrap();
        let settings = RedisSettings::parse(
            file["observers"]["runtime"]["redis"].as_table().unwrap(),
            "observers.runtime.redis",
            &env,
        )
        .unwrap();
        assert_eq!(settings.key_prefix(), "shop:");
        let debug = format!("{settings:?}");
        assert!(
            debug.contains("127.0.0.1:6379") && !debug.contains("s3cret"),
            "{debug}"
        );

        let table = crate::actions::tests::doc_example(source);
        let config = match crate::actions::ActionConfig::parse(&table, "p")
            .unwrap()
            .settings
        {
            crate::actions::Settings::Cache(c) => c,
            other => panic!("{other:?}"),
        };
        let ctx = CompileContext {
            redis: Some(&settings),
            ..CompileContext::new(&env)
        };
        let cache = compile(&config, "p", &ctx).unwrap();
        match &cache.operation {
            Operation::Invalidate { keys } => {
                assert_eq!(
                    keys.iter().map(|k| k.pattern).collect::<Vec<_>>(),
                    [false, true]
                );
            }
            _ => panic!("invalidate expected"),
        }

        // The other operations shown in the docs compile too.
        let other = &docs[docs.find("```text").unwrap() + 7..];
        let other = &other[..other.find("```").unwrap()];
        for block in other.split("\n\n") {
            compile_toml(block).unwrap_or_else(|e| panic!("{block}: {e:?}"));
        }
    }

    #[test]
    fn settings_errors_and_secrets() {
        let errors = RedisSettings::parse(
            &toml::from_str(
                r#"url = "http://user:s3cret@host"
                   timeout_ms = 0"#,
            )
            .unwrap(),
            "r",
            &env,
        )
        .unwrap_err();
        assert_eq!(paths(&errors), ["r.url", "r.timeout_ms"]);
        assert!(!errors[0].message.contains("s3cret"));
        let errors = RedisSettings::parse(&toml::from_str("key_prefix = 'x'").unwrap(), "r", &env)
            .unwrap_err();
        assert_eq!(paths(&errors), ["r.url"]);
        let errors = RedisSettings::parse(&toml::from_str("url_env = 'NOPE'").unwrap(), "r", &env)
            .unwrap_err();
        assert!(
            errors[0].message.contains("'NOPE' is not set"),
            "{errors:?}"
        );
        let ok = RedisSettings::parse(&toml::from_str("url_env = 'REDIS_URL'").unwrap(), "r", &env)
            .unwrap();
        assert!(!format!("{ok:?}").contains("s3cret"));
    }

    #[test]
    fn keys_the_operation_does_not_use_are_errors() {
        let errors = compile_toml(
            r#"operation = "invalidate"
               keys = ["a"]
               ttl_seconds = 10
               channel = "c""#,
        )
        .unwrap_err();
        assert_eq!(paths(&errors), ["p.ttl_seconds", "p.channel"]);
        let errors = compile_toml(
            r#"operation = "refresh"
               keys = ["a:*", "b:{{ after.id }}"]
               pattern = true
               ttl_seconds = 0"#,
        )
        .unwrap_err();
        assert_eq!(
            paths(&errors),
            ["p.pattern", "p.keys[0]", "p.keys[1]", "p.ttl_seconds"]
        );
        let errors = compile_toml(r#"operation = "publish""#).unwrap_err();
        assert_eq!(paths(&errors), ["p.channel"]);
        let errors = compile_toml(
            r#"operation = "publish"
               channel = "c"
               format = "text""#,
        )
        .unwrap_err();
        assert_eq!(paths(&errors), ["p.format"]);
        let errors = compile_toml(r#"operation = "evict""#).unwrap_err();
        assert_eq!(paths(&errors), ["p.operation"]);
        let errors = compile_toml(
            r#"operation = "refresh"
               keys = []
               format = "text""#,
        )
        .unwrap_err();
        assert_eq!(paths(&errors), ["p.keys", "p.value_template"]);
    }

    #[test]
    fn a_cache_action_needs_redis_settings() {
        let config = CacheConfig {
            operation: Some("invalidate".into()),
            keys: Some(vec!["a".into()]),
            ..Default::default()
        };
        let errors = compile(&config, "p", &CompileContext::new(&env)).unwrap_err();
        assert_eq!(paths(&errors), ["p.type"]);
        assert!(errors[0].message.contains("[observers.runtime.redis]"));
    }
}
