//! Actions: what an observer does with a matching event. One file per action, one shape.
//!
//! Every action file (`webhook.rs`, `slack.rs`, and the ones to come) has the same three parts,
//! in the order data flows (parse -> compile -> run):
//!
//! 1. `FooConfig`: the action as written in TOML (`#[serde(deny_unknown_fields)]`). **Every field
//!    is optional or has a default**: which fields are required, and which combinations are
//!    allowed, is decided by `compile`, so that every mistake is reported with its path instead
//!    of serde stopping at the first one.
//! 2. `pub fn compile(config: &FooConfig, path: &str, env: &dyn Fn(&str) -> Option<String>)
//!    -> Result<Foo, Vec<ConfigError>>` (or `ctx: &CompileContext` for actions that need server
//!    settings from `[observers.runtime.*]`): pure (no I/O); reports every error with its path
//!    (`observers.order_paid.actions[0].url`); resolves `*_env` secrets through `env` (the
//!    library never reads the environment itself); compiles templates.
//! 3. `Foo::execute(&self, http, &DeliveryRequest) -> Result<(), ActionError>`: sends for real
//!    and classifies the outcome. It never reports success without having delivered.
//!
//! Server settings shared by several actions (`[observers.runtime.email]`,
//! `[observers.runtime.redis]`) are parsed by their action module (`EmailSettings::parse`,
//! `RedisSettings::parse`) and handed to compilation in a [`CompileContext`]. They own the one
//! client (SMTP pool, Redis connection manager) that every action compiled with them shares; it
//! connects lazily on first use, so compiling stays free of I/O. An action whose settings are
//! absent fails at compile.
//!
//! Adding an action = one file, one [`ActionConfig`] variant, one [`Action`] variant, its entry
//! in [`AVAILABLE`], its tests against a local receiver. A type not in [`AVAILABLE`] is refused
//! at configuration load with a clear message: no stub ever reports success.
//!
//! Delivery identity: [`crate::delivery::delivery_id`] derives one id per (event, observer,
//! action) that is the same on every retry, crash replay and restart; receivers use it to
//! deduplicate. An action receives it in its [`DeliveryRequest`].

pub mod cache;
pub mod email;
pub mod http;
pub mod push;
pub mod search;
pub mod slack;
pub mod sms;
pub mod webhook;

use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::config::parse_fields;
use crate::error::ConfigError;
use crate::event::EntityEvent;

pub use cache::{Cache, CacheConfig, RedisSettings};
pub use email::{Email, EmailConfig, EmailSettings};
pub use http::HttpClient;
pub use push::{Push, PushConfig};
pub use search::{Search, SearchConfig};
pub use slack::{Slack, SlackConfig};
pub use sms::{Sms, SmsConfig};
pub use webhook::{Webhook, WebhookConfig};

/// The action types this version can run.
pub const AVAILABLE: &[&str] = &[
    "webhook", "slack", "email", "sms", "push", "search", "cache",
];

/// What compiling an action may use besides its own table: the environment (for `*_env`
/// secrets) and the server settings of `[observers.runtime.*]`, `None` when a section is absent.
#[derive(Clone, Copy)]
pub struct CompileContext<'a> {
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// `[observers.runtime.email]`.
    pub email: Option<&'a EmailSettings>,
    /// `[observers.runtime.redis]`.
    pub redis: Option<&'a RedisSettings>,
}

impl<'a> CompileContext<'a> {
    /// A context with the environment only (no `[observers.runtime.*]` settings).
    pub fn new(env: &'a dyn Fn(&str) -> Option<String>) -> CompileContext<'a> {
        CompileContext {
            env,
            email: None,
            redis: None,
        }
    }
}

impl std::fmt::Debug for CompileContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompileContext")
            .field("email", &self.email)
            .field("redis", &self.redis)
            .finish_non_exhaustive()
    }
}

/// How an attempt failed. The delivery engine retries `Transient` and dead-letters the others.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ActionError {
    /// May succeed later (timeout, connection refused, 408/429/5xx). `retry_after` is the
    /// receiver's own request (`Retry-After`), already clamped to [1 s, 10 min].
    #[error("{message}")]
    Transient {
        message: String,
        retry_after: Option<Duration>,
    },
    /// Will fail the same way every time (4xx, a refused target, a template that cannot render
    /// this event).
    #[error("{message}")]
    Permanent { message: String },
    /// The endpoint no longer exists (410; Slack's `no_service`): stop sending to it.
    #[error("{message}")]
    Gone { message: String },
}

impl ActionError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, ActionError::Transient { .. })
    }

    /// The wait the receiver asked for, if it asked.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ActionError::Transient { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            ActionError::Transient { message, .. }
            | ActionError::Permanent { message }
            | ActionError::Gone { message } => message,
        }
    }

    /// The same error, its message prefixed with `context` ("webhook https://x/hook: ...").
    pub fn context(self, context: &str) -> ActionError {
        let prefix = |m: String| format!("{context}: {m}");
        match self {
            ActionError::Transient {
                message,
                retry_after,
            } => ActionError::Transient {
                message: prefix(message),
                retry_after,
            },
            ActionError::Permanent { message } => ActionError::Permanent {
                message: prefix(message),
            },
            ActionError::Gone { message } => ActionError::Gone {
                message: prefix(message),
            },
        }
    }
}

/// One attempt to deliver one event through one action.
#[derive(Debug, Clone, Copy)]
pub struct DeliveryRequest<'a> {
    pub event: &'a EntityEvent,
    /// From `delivery::delivery_id`: identical on every attempt of this delivery.
    pub delivery_id: &'a str,
    /// 1 for the first attempt.
    pub attempt: u32,
}

/// An action as written in the configuration, chosen by its `type` key.
#[derive(Debug, Clone)]
pub enum ActionConfig {
    Webhook(WebhookConfig),
    Slack(SlackConfig),
    Email(EmailConfig),
    Sms(SmsConfig),
    Cache(CacheConfig),
    Push(Box<PushConfig>),
    Search(SearchConfig),
}

impl ActionConfig {
    /// Read one action table (`[[observers.x.actions]]`). Reports every unknown key, every value
    /// of the wrong type, and an unknown or not-yet-available `type`, each with its path.
    pub fn parse(table: &toml::Table, path: &str) -> Result<ActionConfig, Vec<ConfigError>> {
        let type_path = format!("{path}.type");
        let kind = match table.get("type") {
            None => {
                return Err(vec![ConfigError::new(
                    type_path,
                    format!("missing; one of: {}", AVAILABLE.join(", ")),
                )])
            }
            Some(toml::Value::String(kind)) => kind.as_str(),
            Some(other) => {
                return Err(vec![ConfigError::new(
                    type_path,
                    format!("must be a string, not {}", other.type_str()),
                )])
            }
        };
        let mut rest = table.clone();
        rest.remove("type");
        match kind {
            "webhook" => parse_fields(&rest, path).map(ActionConfig::Webhook),
            "slack" => parse_fields(&rest, path).map(ActionConfig::Slack),
            "email" => parse_fields(&rest, path).map(ActionConfig::Email),
            "sms" => parse_fields(&rest, path).map(ActionConfig::Sms),
            "cache" => parse_fields(&rest, path).map(ActionConfig::Cache),
            "push" => parse_fields(&rest, path).map(|c| ActionConfig::Push(Box::new(c))),
            "search" => parse_fields(&rest, path).map(ActionConfig::Search),
            _ => Err(vec![ConfigError::new(
                type_path,
                format!(
                    "unknown action type '{kind}'; known types: {}",
                    AVAILABLE.join(", ")
                ),
            )]),
        }
    }

    /// The `type` key of this action.
    pub fn kind(&self) -> &'static str {
        match self {
            ActionConfig::Webhook(_) => "webhook",
            ActionConfig::Slack(_) => "slack",
            ActionConfig::Email(_) => "email",
            ActionConfig::Sms(_) => "sms",
            ActionConfig::Cache(_) => "cache",
            ActionConfig::Push(_) => "push",
            ActionConfig::Search(_) => "search",
        }
    }

    /// Compile into a runtime action (see the module docs). Pure.
    pub fn compile(
        &self,
        path: &str,
        ctx: &CompileContext<'_>,
    ) -> Result<Action, Vec<ConfigError>> {
        match self {
            ActionConfig::Webhook(c) => webhook::compile(c, path, ctx.env).map(Action::Webhook),
            ActionConfig::Slack(c) => slack::compile(c, path, ctx.env).map(Action::Slack),
            ActionConfig::Email(c) => email::compile(c, path, ctx).map(Action::Email),
            ActionConfig::Sms(c) => sms::compile(c, path, ctx.env).map(Action::Sms),
            ActionConfig::Cache(c) => cache::compile(c, path, ctx).map(Action::Cache),
            ActionConfig::Push(c) => {
                push::compile(c, path, ctx.env).map(|a| Action::Push(Box::new(a)))
            }
            ActionConfig::Search(c) => search::compile(c, path, ctx.env).map(Action::Search),
        }
    }
}

/// Lets a configuration module deserialize `actions = [...]` directly. Errors are joined into one
/// message; use [`ActionConfig::parse`] to get each error with its full path.
impl<'de> Deserialize<'de> for ActionConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let table = toml::Table::deserialize(deserializer)?;
        ActionConfig::parse(&table, "action").map_err(|errors| {
            serde::de::Error::custom(
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })
    }
}

/// A compiled action, ready to run.
#[derive(Debug)]
pub enum Action {
    Webhook(Webhook),
    Slack(Slack),
    Email(Email),
    Sms(Sms),
    Cache(Cache),
    Push(Box<Push>),
    Search(Search),
}

impl Action {
    /// The `type` of the action (`"webhook"`, `"email"`, ...): a label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Webhook(_) => "webhook",
            Action::Slack(_) => "slack",
            Action::Email(_) => "email",
            Action::Sms(_) => "sms",
            Action::Cache(_) => "cache",
            Action::Push(_) => "push",
            Action::Search(_) => "search",
        }
    }

    /// Deliver once. `Ok` only when the receiver accepted the delivery.
    pub async fn execute(
        &self,
        http: &HttpClient,
        request: &DeliveryRequest<'_>,
    ) -> Result<(), ActionError> {
        match self {
            Action::Webhook(a) => a.execute(http, request).await,
            Action::Slack(a) => a.execute(http, request).await,
            Action::Email(a) => a.execute(request).await,
            Action::Sms(a) => a.execute(http, request).await,
            Action::Cache(a) => a.execute(request).await,
            Action::Push(a) => a.execute(http, request).await,
            Action::Search(a) => a.execute(http, request).await,
        }
    }

    /// Deliver several events in one request, for actions that can (search: one `_bulk`): one
    /// result per request, in order. `None` when this action delivers one event at a time.
    pub async fn execute_batch(
        &self,
        http: &HttpClient,
        requests: &[DeliveryRequest<'_>],
    ) -> Option<Vec<Result<(), ActionError>>> {
        match self {
            Action::Search(a) => Some(a.execute_batch(http, requests).await),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared compile steps (used by every action file).

/// Where a URL comes from: written in the file, or read from the environment (then a secret).
struct UrlSetting<'a> {
    key: &'a str,
    value: Option<&'a str>,
    env_key: &'a str,
    env_value: Option<&'a str>,
}

/// Resolve a `url` / `url_env` pair: exactly one must be set. Returns the URL and whether it is a
/// secret (read from the environment, or `always_secret`).
fn resolve_url(
    setting: UrlSetting<'_>,
    always_secret: bool,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<ConfigError>,
) -> Option<(String, bool)> {
    match (setting.value, setting.env_value) {
        (None, None) => {
            errors.push(ConfigError::new(
                format!("{path}.{}", setting.key),
                format!("missing; set '{}' or '{}'", setting.key, setting.env_key),
            ));
            None
        }
        (Some(_), Some(_)) => {
            errors.push(ConfigError::new(
                format!("{path}.{}", setting.key),
                format!(
                    "set either '{}' or '{}', not both",
                    setting.key, setting.env_key
                ),
            ));
            None
        }
        (Some(url), None) => Some((url.to_string(), always_secret)),
        (None, Some(var)) => {
            secret_from_env(var, &format!("{path}.{}", setting.env_key), env, errors)
                .map(|url| (url, true))
        }
    }
}

/// Read a secret through `env`. Errors name the variable, never its value.
fn secret_from_env(
    var: &str,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<ConfigError>,
) -> Option<String> {
    match env(var) {
        None => {
            errors.push(ConfigError::new(
                path,
                format!("environment variable '{var}' is not set"),
            ));
            None
        }
        Some(value) if value.trim().is_empty() => {
            errors.push(ConfigError::new(
                path,
                format!("environment variable '{var}' is empty"),
            ));
            None
        }
        Some(value) => Some(value),
    }
}

/// `timeout_ms`: default 10 s, between 1 ms and 5 min.
fn timeout_setting(value: Option<u64>, path: &str, errors: &mut Vec<ConfigError>) -> Duration {
    const DEFAULT_MS: u64 = 10_000;
    const MAX_MS: u64 = 300_000;
    match value {
        None => Duration::from_millis(DEFAULT_MS),
        Some(ms) if (1..=MAX_MS).contains(&ms) => Duration::from_millis(ms),
        Some(ms) => {
            errors.push(ConfigError::new(
                format!("{path}.timeout_ms"),
                format!("must be between 1 and {MAX_MS}, not {ms}"),
            ));
            Duration::from_millis(DEFAULT_MS)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::field_names;

    fn table(s: &str) -> toml::Table {
        toml::from_str(s).unwrap()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    /// The TOML example at the top of an action file's docs, as the configuration table of its
    /// one action (docs that show syntax the parser rejects are a known failure of this kind of
    /// system, so the examples are executed).
    pub(crate) fn doc_example(source: &str) -> toml::Table {
        let docs: String = source
            .lines()
            .filter_map(|l| l.strip_prefix("//!"))
            .map(|l| l.strip_prefix(' ').unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let start = docs.find("```toml").expect("a toml example") + "```toml".len();
        let end = start + docs[start..].find("```").expect("the example ends");
        let file: toml::Table = toml::from_str(&docs[start..end]).expect("the example parses");
        file["observers"]["order_paid"]["actions"][0]
            .as_table()
            .unwrap()
            .clone()
    }

    #[test]
    fn actions_can_be_shared_across_tasks() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Action>();
        send_sync::<HttpClient>();
        fn send<T: Send>(_: T) {}
        #[allow(dead_code)]
        fn execute_future_is_send(a: &Action, h: &HttpClient, r: &DeliveryRequest<'_>) {
            send(a.execute(h, r));
        }
    }

    #[test]
    fn field_names_come_from_serde() {
        let fields = field_names::<WebhookConfig>();
        assert!(fields.contains(&"url") && fields.contains(&"signing_secret_env"));
    }

    #[test]
    fn every_unknown_key_and_wrong_type_is_reported() {
        let errors = ActionConfig::parse(
            &table(
                r#"type = "webhook"
                   url = "https://example.com"
                   urll = "x"
                   retries = 3
                   timeout_ms = "fast""#,
            ),
            "observers.o.actions[0]",
        )
        .unwrap_err();
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "observers.o.actions[0].urll",
                "observers.o.actions[0].retries",
                "observers.o.actions[0].timeout_ms"
            ],
            "{errors:?}"
        );
        assert!(errors[0].message.contains("expected one of"), "{errors:?}");
    }

    #[test]
    fn unknown_types_are_refused_listing_the_known_ones() {
        let err = ActionConfig::parse(&table(r#"type = "fax""#), "a").unwrap_err();
        assert_eq!(err[0].path, "a.type");
        assert!(
            err[0]
                .message
                .contains("webhook, slack, email, sms, push, search, cache"),
            "{err:?}"
        );
        let err = ActionConfig::parse(&table("url = 'x'"), "a").unwrap_err();
        assert_eq!(err[0].path, "a.type");
    }

    #[test]
    fn deserialize_goes_through_parse() {
        #[derive(Deserialize)]
        struct File {
            actions: Vec<ActionConfig>,
        }
        let file: File = toml::from_str(
            r#"[[actions]]
               type = "slack"
               webhook_url_env = "X""#,
        )
        .unwrap();
        assert_eq!(file.actions[0].kind(), "slack");
        let err = toml::from_str::<File>(
            r#"[[actions]]
               type = "fax""#,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("unknown action type 'fax'"), "{err}");
        let compiled = file.actions[0]
            .compile("a", &CompileContext::new(&no_env))
            .unwrap_err();
        assert_eq!(compiled[0].path, "a.webhook_url_env");
    }
}
