//! Actions: what an observer does with a matching event. One file (or folder) per action, one
//! shape.
//!
//! Every action (`webhook.rs`, `slack.rs`, `email.rs`, `sms.rs`, `push/`, `search/`, `cache.rs`,
//! `nats.rs`, `rabbitmq.rs`) has the same three parts, in the order data flows (parse -> compile -> run):
//!
//! 1. `FooConfig`: the action as written in TOML (`#[serde(deny_unknown_fields)]`). **Every field
//!    is optional or has a default**: which fields are required, and which combinations are
//!    allowed, is decided by `compile`, so that every mistake is reported with its path instead
//!    of serde stopping at the first one.
//! 2. `pub fn compile(config: &FooConfig, path: &str, ctx: &CompileContext) -> Result<Foo,
//!    Vec<ConfigError>>`: pure. Everything from outside the action's own table comes through the
//!    [`CompileContext`]: `*_env` secrets through `ctx.env` and `*_file` contents through
//!    `ctx.read_file` (the library reads neither the environment nor a file itself; the caller
//!    supplies both lookups), the shared clients (`ctx.http`, `ctx.email`, `ctx.redis`). It
//!    reports every error with its path (`observers.order_paid.actions[0].url`) and compiles
//!    templates. The compiled action keeps the client it sends through.
//! 3. `Foo::execute(&self, &DeliveryRequest) -> Result<(), ActionError>`: sends for real and
//!    classifies the outcome as an [`ActionError`] of one [`FailureKind`]. It never reports
//!    success without having delivered.
//!
//! The kinds are listed once, in [`KINDS`]: one row per action (its `type` name, how its table is
//! read, what it can do). [`AVAILABLE`] and [`Action::kind`] come from it. What differs between
//! kinds is asked of the action, never of its name: [`Action::coalesces`] (delivering only the
//! latest change of an entity loses nothing) and [`Action::execute_batch`] (several events in one
//! request).
//!
//! Adding an action = one file, one row in [`KINDS`], one variant in `Settings` and `Run` (with
//! its `compile` and `execute` arm), its tests against a local receiver. A type not in [`KINDS`]
//! is refused at configuration load with a clear message: no stub ever reports success.
//!
//! Server settings shared by several actions (`[observers.runtime.email]`,
//! `[observers.runtime.redis]`) are parsed by their action module (`EmailSettings::parse`,
//! `RedisSettings::parse`) and handed to compilation in the [`CompileContext`]. They own the one
//! client (SMTP pool, Redis connection manager) that every action compiled with them shares; like
//! the [`HttpClient`], it connects lazily on first use, so compiling stays free of I/O. An action
//! whose settings are absent fails at compile.
//!
//! Message brokers (`nats`, `rabbitmq`): the connection settings are the action's own, and every
//! action compiled with the same settings shares one connection through [`Brokers`] (in the
//! context; connected on first use). What a broker must hold before anything is published (a
//! JetStream stream, a RabbitMQ exchange) is checked once when the pipeline starts,
//! [`Action::prepare`], since compiling does no I/O.
//!
//! Delivery identity: [`crate::delivery::delivery_id`] derives one id per (event, observer,
//! action) that is the same on every retry, crash replay and restart; receivers use it to
//! deduplicate. An action receives it in its [`DeliveryRequest`].

pub mod cache;
pub mod email;
pub mod http;
pub mod limits;
pub mod nats;
pub mod push;
pub mod rabbitmq;
pub mod search;
pub mod slack;
pub mod sms;
pub mod webhook;

use std::fmt;
use std::time::Duration;

use thiserror::Error;

use crate::error::ConfigError;
use crate::event::EntityEvent;
use crate::fields::parse_fields;
use crate::template::{Template, TemplateMode};

pub use cache::{Cache, CacheConfig, RedisSettings};
pub use email::{Email, EmailConfig, EmailSettings};
pub use http::HttpClient;
pub use limits::{Limits, RateLimit};
pub use nats::{Nats, NatsClients, NatsConfig};
pub use push::{Push, PushConfig};
pub use rabbitmq::{AmqpConnections, RabbitMq, RabbitMqConfig};
pub use search::{Search, SearchConfig};
pub use slack::{Slack, SlackConfig};
pub use sms::{Sms, SmsConfig};
pub use webhook::{Webhook, WebhookConfig};

/// One action type: its `type` name, how its table is read, and what it can do.
pub struct Kind {
    /// The `type` key.
    pub name: &'static str,
    /// Whether its deliveries may be coalesced: it keeps the latest state of an entity (an index,
    /// a cache), so delivering only the last change of a window loses nothing.
    pub coalesces: bool,
    parse: fn(&toml::Table, &str) -> Result<Settings, Vec<ConfigError>>,
}

impl fmt::Debug for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// Every action type this version can run, in the order messages list them.
pub const KINDS: &[Kind] = &[
    Kind {
        name: "webhook",
        coalesces: false,
        parse: |t, p| parse_fields(t, p).map(Settings::Webhook),
    },
    Kind {
        name: "slack",
        coalesces: false,
        parse: |t, p| parse_fields(t, p).map(Settings::Slack),
    },
    Kind {
        name: "email",
        coalesces: false,
        parse: |t, p| parse_fields(t, p).map(Settings::Email),
    },
    Kind {
        name: "sms",
        coalesces: false,
        parse: |t, p| parse_fields(t, p).map(Settings::Sms),
    },
    Kind {
        name: "push",
        coalesces: false,
        parse: |t, p| parse_fields(t, p).map(|c| Settings::Push(Box::new(c))),
    },
    Kind {
        name: "search",
        coalesces: true,
        parse: |t, p| parse_fields(t, p).map(Settings::Search),
    },
    Kind {
        name: "cache",
        coalesces: true,
        parse: |t, p| parse_fields(t, p).map(Settings::Cache),
    },
    Kind {
        name: "nats",
        coalesces: false,
        parse: |t, p| parse_fields(t, p).map(|c| Settings::Nats(Box::new(c))),
    },
    Kind {
        name: "rabbitmq",
        coalesces: false,
        parse: |t, p| parse_fields(t, p).map(Settings::RabbitMq),
    },
];

/// The `type` names of [`KINDS`].
pub const AVAILABLE: &[&str] = &{
    let mut names = [""; KINDS.len()];
    let mut i = 0;
    while i < KINDS.len() {
        names[i] = KINDS[i].name;
        i += 1;
    }
    names
};

/// What compiling an action may use besides its own table. Everything from outside the table
/// comes through here, so compiling is pure.
#[derive(Clone)]
pub struct CompileContext<'a> {
    /// Environment lookup, for `*_env` secrets.
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// The content of a file, for `*_file` keys (push credentials).
    pub read_file: &'a dyn Fn(&str) -> std::io::Result<String>,
    /// The HTTP client every HTTP action sends through (connects lazily).
    pub http: HttpClient,
    /// `[observers.runtime.email]`, `None` when absent.
    pub email: Option<&'a EmailSettings>,
    /// `[observers.runtime.redis]`, `None` when absent.
    pub redis: Option<&'a RedisSettings>,
    /// The broker connections (NATS, RabbitMQ) shared by the actions of one configuration.
    pub brokers: Brokers,
}

/// The message-broker connections of one configuration: one per connection settings, shared by
/// every action compiled with them, connected on first use. Cloning shares them.
#[derive(Debug, Clone, Default)]
pub struct Brokers {
    pub nats: NatsClients,
    pub amqp: AmqpConnections,
}

impl<'a> CompileContext<'a> {
    /// A context with the environment only: a new HTTP client, no `[observers.runtime.*]`
    /// settings, and no file reading (a `*_file` key is an error naming the file).
    pub fn new(env: &'a dyn Fn(&str) -> Option<String>) -> CompileContext<'a> {
        CompileContext {
            env,
            read_file: &no_files,
            http: HttpClient::new(),
            email: None,
            redis: None,
            brokers: Brokers::default(),
        }
    }
}

/// The file reader of [`CompileContext::new`]: reads nothing.
fn no_files(_: &str) -> std::io::Result<String> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "this configuration is compiled without file access",
    ))
}

impl fmt::Debug for CompileContext<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompileContext")
            .field("email", &self.email)
            .field("redis", &self.redis)
            .finish_non_exhaustive()
    }
}

/// How an attempt failed. The delivery engine retries `Transient` and dead-letters the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// May succeed later (timeout, connection refused, 408/429/5xx).
    Transient,
    /// Will fail the same way every time (4xx, a refused target, a template that cannot render
    /// this event).
    Permanent,
    /// The endpoint no longer exists (410; Slack's `no_service`): stop sending to it.
    Gone,
}

/// A failed attempt: its kind, a message (never a secret), and for a transient failure the wait
/// the receiver asked for.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{message}")]
pub struct ActionError {
    pub kind: FailureKind,
    pub message: String,
    /// The receiver's own request (`Retry-After`), already clamped to [1 s, 10 min]; only ever
    /// set on a transient failure.
    pub retry_after: Option<Duration>,
    /// The receiver's status code, when it answered (HTTP), for the delivery log.
    pub status: Option<u16>,
    /// The start of the receiver's answer (at most [`EXCERPT_CHARS`] characters, on one line),
    /// for the delivery log; never shown in log lines.
    pub excerpt: Option<String>,
}

/// The longest response excerpt an [`ActionError`] keeps.
pub const EXCERPT_CHARS: usize = 256;

impl ActionError {
    pub fn transient(message: impl Into<String>) -> ActionError {
        ActionError {
            kind: FailureKind::Transient,
            message: message.into(),
            retry_after: None,
            status: None,
            excerpt: None,
        }
    }

    /// A transient failure with the wait the receiver asked for, if it asked.
    pub fn transient_after(
        message: impl Into<String>,
        retry_after: Option<Duration>,
    ) -> ActionError {
        ActionError {
            retry_after,
            ..ActionError::transient(message)
        }
    }

    pub fn permanent(message: impl Into<String>) -> ActionError {
        ActionError {
            kind: FailureKind::Permanent,
            message: message.into(),
            retry_after: None,
            status: None,
            excerpt: None,
        }
    }

    pub fn gone(message: impl Into<String>) -> ActionError {
        ActionError {
            kind: FailureKind::Gone,
            message: message.into(),
            retry_after: None,
            status: None,
            excerpt: None,
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.kind == FailureKind::Transient
    }

    /// The wait the receiver asked for, if it asked.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// The same kind (and wait) with another message.
    pub fn with_message(self, message: impl Into<String>) -> ActionError {
        ActionError {
            message: message.into(),
            ..self
        }
    }

    /// The same error, its message prefixed with `context` ("webhook https://x/hook: ...").
    pub fn context(self, context: &str) -> ActionError {
        let message = format!("{context}: {}", self.message);
        self.with_message(message)
    }

    /// The same error, with the receiver's status code.
    pub fn with_status(self, status: u16) -> ActionError {
        ActionError {
            status: Some(status),
            ..self
        }
    }

    /// The same error, with the start of the receiver's answer (see [`EXCERPT_CHARS`]); unchanged
    /// when `excerpt` is empty.
    pub fn with_excerpt(self, excerpt: String) -> ActionError {
        if excerpt.is_empty() {
            return self;
        }
        ActionError {
            excerpt: Some(excerpt.chars().take(EXCERPT_CHARS).collect()),
            ..self
        }
    }

    /// The same error with `detail` appended in parentheses ("... 404 Not Found (no_service)");
    /// unchanged when `detail` is empty.
    pub fn detail(self, detail: &str) -> ActionError {
        if detail.is_empty() {
            return self;
        }
        let message = format!("{} ({detail})", self.message);
        self.with_message(message)
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

/// An action as written in the configuration: its kind and its table, read.
#[derive(Debug, Clone)]
pub struct ActionConfig {
    kind: &'static Kind,
    settings: Settings,
    limits: Limits,
}

/// The table of each kind, read into its `FooConfig`.
#[derive(Debug, Clone)]
pub(crate) enum Settings {
    Webhook(WebhookConfig),
    Slack(SlackConfig),
    Email(EmailConfig),
    Sms(SmsConfig),
    Push(Box<PushConfig>),
    Search(SearchConfig),
    Cache(CacheConfig),
    Nats(Box<NatsConfig>),
    RabbitMq(RabbitMqConfig),
}

impl ActionConfig {
    /// Read one action table (`[[observers.x.actions]]`). Reports every unknown key, every value
    /// of the wrong type, and an unknown or not-yet-available `type`, each with its path.
    pub fn parse(table: &toml::Table, path: &str) -> Result<ActionConfig, Vec<ConfigError>> {
        let type_path = format!("{path}.type");
        let name = match table.get("type") {
            None => {
                return Err(vec![ConfigError::new(
                    type_path,
                    format!("missing; one of: {}", AVAILABLE.join(", ")),
                )])
            }
            Some(toml::Value::String(name)) => name.as_str(),
            Some(other) => {
                return Err(vec![ConfigError::new(
                    type_path,
                    format!("must be a string, not {}", other.type_str()),
                )])
            }
        };
        let Some(kind) = KINDS.iter().find(|k| k.name == name) else {
            return Err(vec![ConfigError::new(
                type_path,
                format!(
                    "unknown action type '{name}'; known types: {}",
                    AVAILABLE.join(", ")
                ),
            )]);
        };
        let mut rest = table.clone();
        rest.remove("type");
        let limits = limits::take(&mut rest, path);
        let settings = (kind.parse)(&rest, path);
        match (settings, limits) {
            (Ok(settings), Ok(limits)) => Ok(ActionConfig {
                kind,
                settings,
                limits,
            }),
            (settings, limits) => Err(settings
                .err()
                .into_iter()
                .chain(limits.err())
                .flatten()
                .collect()),
        }
    }

    /// The `type` of this action.
    pub fn kind(&self) -> &'static Kind {
        self.kind
    }

    /// Compile into a runtime action (see the module docs). Pure.
    pub fn compile(
        &self,
        path: &str,
        ctx: &CompileContext<'_>,
    ) -> Result<Action, Vec<ConfigError>> {
        let run = match &self.settings {
            Settings::Webhook(c) => webhook::compile(c, path, ctx).map(Run::Webhook),
            Settings::Slack(c) => slack::compile(c, path, ctx).map(Run::Slack),
            Settings::Email(c) => email::compile(c, path, ctx).map(Run::Email),
            Settings::Sms(c) => sms::compile(c, path, ctx).map(Run::Sms),
            Settings::Push(c) => push::compile(c, path, ctx).map(|a| Run::Push(Box::new(a))),
            Settings::Search(c) => search::compile(c, path, ctx).map(Run::Search),
            Settings::Cache(c) => cache::compile(c, path, ctx).map(Run::Cache),
            Settings::Nats(c) => nats::compile(c, path, ctx).map(|a| Run::Nats(Box::new(a))),
            Settings::RabbitMq(c) => rabbitmq::compile(c, path, ctx).map(Run::RabbitMq),
        }?;
        Ok(Action {
            kind: self.kind,
            run,
            limits: self.limits,
        })
    }
}

/// A compiled action, ready to run. It holds its clients, so running it needs only the request.
#[derive(Debug)]
pub struct Action {
    kind: &'static Kind,
    run: Run,
    limits: Limits,
}

#[derive(Debug)]
enum Run {
    Webhook(Webhook),
    Slack(Slack),
    Email(Email),
    Sms(Sms),
    Push(Box<Push>),
    Search(Search),
    Cache(Cache),
    Nats(Box<Nats>),
    RabbitMq(RabbitMq),
}

impl Action {
    /// The `type` of the action (`"webhook"`, `"email"`, ...): a label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        self.kind.name
    }

    /// Its own flow-control settings (`max_in_flight`, `rate_limit`).
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Where it sends, for flow control, metrics and logs: `kind:host:port` (never a secret:
    /// no path, no credentials).
    pub fn endpoint(&self) -> String {
        let target = match &self.run {
            Run::Webhook(a) => a.endpoint(),
            Run::Slack(a) => a.endpoint(),
            Run::Email(a) => a.endpoint(),
            Run::Sms(a) => a.endpoint(),
            Run::Push(a) => a.endpoint(),
            Run::Search(a) => a.endpoint(),
            Run::Cache(a) => a.endpoint(),
            Run::Nats(a) => a.endpoint(),
            Run::RabbitMq(a) => a.endpoint(),
        };
        format!("{}:{target}", self.kind.name)
    }

    /// Whether the deliveries of this action may be coalesced (see [`Kind::coalesces`]).
    pub fn coalesces(&self) -> bool {
        self.kind.coalesces
    }

    /// Deliver once. `Ok` only when the receiver accepted the delivery.
    pub async fn execute(&self, request: &DeliveryRequest<'_>) -> Result<(), ActionError> {
        match &self.run {
            Run::Webhook(a) => a.execute(request).await,
            Run::Slack(a) => a.execute(request).await,
            Run::Email(a) => a.execute(request).await,
            Run::Sms(a) => a.execute(request).await,
            Run::Push(a) => a.execute(request).await,
            Run::Search(a) => a.execute(request).await,
            Run::Cache(a) => a.execute(request).await,
            Run::Nats(a) => a.execute(request).await,
            Run::RabbitMq(a) => a.execute(request).await,
        }
    }

    /// What the action needs to exist before it runs, checked (or created) once when the
    /// pipeline starts: a JetStream stream, a RabbitMQ exchange. A permanent error is a
    /// configuration mistake; a transient one means the server could not be asked. Actions with
    /// nothing to check return `Ok` without I/O.
    pub async fn prepare(&self) -> Result<(), ActionError> {
        match &self.run {
            Run::Nats(a) => a.prepare().await,
            Run::RabbitMq(a) => a.prepare().await,
            _ => Ok(()),
        }
    }

    /// Deliver several events (of distinct entities, or in order) in as few requests as the
    /// action allows: one result per request, in the same order. `None` when the action does
    /// not batch: deliver each with [`Action::execute`] instead.
    pub async fn execute_batch(
        &self,
        requests: &[DeliveryRequest<'_>],
    ) -> Option<Vec<Result<(), ActionError>>> {
        match &self.run {
            Run::Search(a) => Some(a.execute_batch(requests).await),
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

/// Compile a template for `key`; a mistake is reported at `path.key`.
fn template(
    source: &str,
    mode: TemplateMode,
    key: &str,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<Template> {
    Template::compile(source, mode)
        .map_err(|e| errors.push(ConfigError::new(format!("{path}.{key}"), e.to_string())))
        .ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::fields::field_names;

    fn table(s: &str) -> toml::Table {
        toml::from_str(s).unwrap()
    }

    /// The TOML example at the top of an action file's docs, as the configuration table of its
    /// one action (docs that show syntax the parser rejects are a known failure of this kind of
    /// system, so the examples are executed).
    pub(crate) fn doc_example(source: &str) -> toml::Table {
        let file: toml::Table =
            toml::from_str(&crate::config::doc_toml(source)).expect("the example parses");
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
        fn execute_future_is_send(a: &Action, r: &[DeliveryRequest<'_>]) {
            send(a.execute(&r[0]));
            send(a.execute_batch(r));
            send(a.prepare());
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
                .contains("webhook, slack, email, sms, push, search, cache, nats, rabbitmq"),
            "{err:?}"
        );
        let err = ActionConfig::parse(&table("url = 'x'"), "a").unwrap_err();
        assert_eq!(err[0].path, "a.type");
    }

    #[test]
    fn kinds_are_listed_once() {
        assert_eq!(
            AVAILABLE,
            ["webhook", "slack", "email", "sms", "push", "search", "cache", "nats", "rabbitmq"]
        );
        let coalescing: Vec<_> = KINDS
            .iter()
            .filter(|k| k.coalesces)
            .map(|k| k.name)
            .collect();
        assert_eq!(coalescing, ["search", "cache"]);
        let slack = ActionConfig::parse(
            &table(
                r#"type = "slack"
                   webhook_url_env = "X""#,
            ),
            "a",
        )
        .unwrap();
        assert_eq!(slack.kind().name, "slack");
        let errors = slack
            .compile("a", &CompileContext::new(&|_| None))
            .unwrap_err();
        assert_eq!(errors[0].path, "a.webhook_url_env");
    }

    #[test]
    fn same_kind_new_message() {
        let e = ActionError::transient_after("busy", Some(Duration::from_secs(3)));
        let e = e.context("webhook x").detail("queue full").detail("");
        assert_eq!(e.message(), "webhook x: busy (queue full)");
        assert_eq!(e.kind, FailureKind::Transient);
        assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
        assert!(e.is_retryable());
        let gone = ActionError::gone("410").with_message("removed");
        assert_eq!(
            (gone.kind, gone.to_string().as_str()),
            (FailureKind::Gone, "removed")
        );
        assert!(!ActionError::permanent("no").is_retryable());
    }
}
