//! The nats action: publish each event to a NATS JetStream subject and wait for the stream's
//! acknowledgement (PubAck).
//!
//! ```toml
//! [[observers.order_paid.actions]]
//! type = "nats"
//! url = "nats://127.0.0.1:4222"              # or url_env = "NATS_URL"; tls:// for TLS
//! subject = "fraiseql.{{ event.entity_type }}.{{ event.kind }}"
//! body_template = '{"order": {{ after.id }}}'   # default: the webhook body
//! timeout_ms = 10000                         # the wait for the PubAck; default 10 s
//! token_env = "NATS_TOKEN"                   # or creds_file = "...", or nkey_seed_env = "..."
//! stream = { name = "FRAISEQL", subjects = ["fraiseql.>"], storage = "file", max_age = "7d", duplicate_window = "2m" }
//! ```
//!
//! Invariants:
//!
//! * Every message carries `Nats-Msg-Id` (the delivery id, identical on every retry: the stream
//!   drops a republish within its `duplicate_window`), `webhook-id` (the same id, as the webhook
//!   action sends it), `event-type` (`order.created`, as the body's `type`) and `content-type:
//!   application/json`. The body is the webhook action's default body, or `body_template` (JSON
//!   mode).
//! * `Ok` only once the stream acknowledged the message (a duplicate acknowledged as such is
//!   delivered too). No PubAck within `timeout_ms`, a negative answer (no stream for the subject,
//!   a full stream, a lost connection) are transient: the delivery goes through the same retry
//!   queue and DLQ as every action. A subject that renders empty or with wildcards, a body that
//!   cannot render and a message above the server's `max_payload` are permanent.
//! * The subject is a key-mode template (an absent value is an error, never a short subject).
//! * Compiling is pure: every action compiled with the same connection settings (url,
//!   credentials, TLS) shares one client, connected on first use and reconnecting by itself.
//!   `creds_file` and `ca_file` are read through the compile context; secrets come from `*_env`.
//!   The connection keys are read by `nats/connection.rs` ([`NatsConnection`]), which
//!   `[distributed]` uses too.
//!   Messages show only the host and port, never the URL (it may hold a password).
//! * When the pipeline starts ([`Nats::prepare`]) the stream is checked: with `stream = { name,
//!   subjects, ... }` it is created when missing; then the subject (its template with every
//!   templated token as `*`) must be captured by a stream (by the named one, when `stream` names
//!   one). A missing stream stops the start with an error naming the subject and the stream; a
//!   server that cannot be reached then is only logged (publishes retry).

mod connection;

pub use connection::{is_refusal, NatsConnection, NatsConnectionKeys};

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, stream::StorageType};
use futures::TryStreamExt;
use serde::Deserialize;
use tokio::sync::OnceCell;

use super::webhook::{default_body_json, event_type};
use super::{template, timeout_setting, ActionError, CompileContext, DeliveryRequest};
use crate::error::ConfigError;
use crate::event::EntityEvent;
use crate::template::{EventContext, Template, TemplateMode};

/// The nats action as written in the configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    pub url: Option<String>,
    pub url_env: Option<String>,
    pub subject: Option<String>,
    pub body_template: Option<String>,
    pub timeout_ms: Option<u64>,
    pub creds_file: Option<String>,
    pub nkey_seed_env: Option<String>,
    pub token_env: Option<String>,
    pub tls: Option<bool>,
    pub ca_file: Option<String>,
    pub stream: Option<StreamConfig>,
}

/// `stream = { name, subjects, storage, max_age, duplicate_window }`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    pub name: Option<String>,
    pub subjects: Option<Vec<String>>,
    pub storage: Option<String>,
    pub max_age: Option<String>,
    pub duplicate_window: Option<String>,
}

/// One server: its settings and the client every action compiled with them shares.
struct NatsServer {
    connection: NatsConnection,
    context: OnceCell<jetstream::Context>,
}

/// The NATS clients of a configuration, one per connection settings. Cloning shares them.
#[derive(Clone, Default)]
pub struct NatsClients {
    servers: Arc<Mutex<HashMap<String, Arc<NatsServer>>>>,
}

impl fmt::Debug for NatsClients {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.servers.lock().map(|s| s.len()).unwrap_or(0);
        f.debug_struct("NatsClients").field("servers", &n).finish()
    }
}

impl NatsClients {
    fn server(&self, connection: NatsConnection) -> Arc<NatsServer> {
        let mut servers = self
            .servers
            .lock()
            .expect("the client map is never poisoned");
        servers
            .entry(connection.identity().to_string())
            .or_insert_with(|| {
                Arc::new(NatsServer {
                    connection,
                    context: OnceCell::new(),
                })
            })
            .clone()
    }
}

impl NatsServer {
    /// The shared JetStream context, connected on first use (a failed connect is retried on the
    /// next use).
    async fn context(&self, timeout: Duration) -> Result<jetstream::Context, ActionError> {
        let s = &self.connection;
        let connect = async {
            let options = s
                .options()
                .map_err(ActionError::permanent)?
                .name("fraiseql-observers")
                .connection_timeout(timeout);
            let client = options.connect(s.url()).await.map_err(|e| {
                let message = format!("cannot connect: {}", e.kind());
                match is_refusal(e.kind()) {
                    true => ActionError::permanent(message),
                    false => ActionError::transient(message),
                }
            })?;
            Ok::<_, ActionError>(jetstream::new(client))
        };
        self.context.get_or_try_init(|| connect).await.cloned()
    }
}

/// How `stream` is used at start.
#[derive(Debug, Clone)]
struct StreamSpec {
    name: String,
    /// `None`: the stream must exist. `Some`: it is created (with these settings) when missing.
    create: Option<jetstream::stream::Config>,
}

/// A compiled nats action.
pub struct Nats {
    server: Arc<NatsServer>,
    subject: Template,
    /// The subject template's source, for messages.
    subject_source: String,
    /// The subjects it may publish to: the template with every templated token as `*`.
    subject_pattern: String,
    body: Option<Template>,
    timeout: Duration,
    stream: Option<StreamSpec>,
}

impl fmt::Debug for Nats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nats")
            .field("server", &self.server.connection.shown())
            .field("subject", &self.subject_source)
            .field("body_template", &self.body.is_some())
            .field("timeout", &self.timeout)
            .field("stream", &self.stream.as_ref().map(|s| &s.name))
            .finish()
    }
}

/// Compile a nats action. Pure; reports every error with its path.
pub fn compile(
    config: &NatsConfig,
    path: &str,
    ctx: &CompileContext<'_>,
) -> Result<Nats, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let connection = NatsConnection::compile(
        &NatsConnectionKeys {
            url_key: "url",
            url: config.url.as_deref(),
            url_env_key: "url_env",
            url_env: config.url_env.as_deref(),
            creds_file: config.creds_file.as_deref(),
            nkey_seed_env: config.nkey_seed_env.as_deref(),
            token_env: config.token_env.as_deref(),
            tls: config.tls,
            ca_file: config.ca_file.as_deref(),
        },
        path,
        ctx,
        &mut errors,
    );

    let subject = match config.subject.as_deref() {
        None => {
            errors.push(ConfigError::new(
                format!("{path}.subject"),
                "missing; a subject template, e.g. \"fraiseql.{{ event.entity_type }}.{{ event.kind }}\"",
            ));
            None
        }
        Some(source) => {
            let pattern = subject_pattern(source);
            if let Err(e) = check_subject(&pattern, true) {
                errors.push(ConfigError::new(format!("{path}.subject"), e));
            }
            template(source, TemplateMode::Key, "subject", path, &mut errors)
                .map(|t| (t, source.to_string(), pattern))
        }
    };
    let body = config.body_template.as_deref().and_then(|source| {
        template(
            source,
            TemplateMode::Json,
            "body_template",
            path,
            &mut errors,
        )
    });
    let timeout = timeout_setting(config.timeout_ms, path, &mut errors);

    let stream = config
        .stream
        .as_ref()
        .and_then(|s| stream_spec(s, &format!("{path}.stream"), &mut errors));

    match (errors.is_empty(), connection, subject) {
        (true, Some(connection), Some((subject, subject_source, subject_pattern))) => Ok(Nats {
            server: ctx.brokers.nats.server(connection),
            subject,
            subject_source,
            subject_pattern,
            body,
            timeout,
            stream,
        }),
        _ => Err(errors),
    }
}

/// `stream = { ... }`, checked: a name, and the settings to create it with when `subjects` is
/// given.
fn stream_spec(
    config: &StreamConfig,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<StreamSpec> {
    let name = match config.name.as_deref() {
        None => {
            errors.push(ConfigError::new(
                format!("{path}.name"),
                "missing; the stream's name",
            ));
            None
        }
        Some(name)
            if name.is_empty()
                || name
                    .chars()
                    .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\')) =>
        {
            errors.push(ConfigError::new(
                format!("{path}.name"),
                "not a valid stream name (no spaces, '.', '*', '>', '/' or '\\')",
            ));
            None
        }
        Some(name) => Some(name.to_string()),
    };
    let creating = config.subjects.is_some();
    if !creating {
        for (key, set) in [
            ("storage", config.storage.is_some()),
            ("max_age", config.max_age.is_some()),
            ("duplicate_window", config.duplicate_window.is_some()),
        ] {
            if set {
                errors.push(ConfigError::new(
                    format!("{path}.{key}"),
                    "only used to create the stream: set `subjects` too",
                ));
            }
        }
    }
    let subjects = config.subjects.clone().unwrap_or_default();
    if creating && subjects.is_empty() {
        errors.push(ConfigError::new(
            format!("{path}.subjects"),
            "is empty; give at least one subject (\"fraiseql.>\")",
        ));
    }
    for (i, subject) in subjects.iter().enumerate() {
        if let Err(e) = check_subject(subject, true) {
            errors.push(ConfigError::new(format!("{path}.subjects[{i}]"), e));
        }
    }
    let storage = match config.storage.as_deref() {
        None | Some("file") => StorageType::File,
        Some("memory") => StorageType::Memory,
        Some(other) => {
            errors.push(ConfigError::new(
                format!("{path}.storage"),
                format!("must be \"file\" or \"memory\", not '{other}'"),
            ));
            StorageType::File
        }
    };
    let mut duration = |key: &str, value: Option<&str>, default: Duration| match value {
        None => default,
        Some(text) => parse_duration(text).unwrap_or_else(|| {
            errors.push(ConfigError::new(
                format!("{path}.{key}"),
                format!(
                    "'{text}' is not a duration (a number and ms, s, m, h or d: \"2m\", \"7d\")"
                ),
            ));
            default
        }),
    };
    let max_age = duration("max_age", config.max_age.as_deref(), Duration::ZERO);
    let duplicate_window = duration(
        "duplicate_window",
        config.duplicate_window.as_deref(),
        Duration::from_secs(120),
    );
    name.map(|name| StreamSpec {
        create: creating.then(|| jetstream::stream::Config {
            name: name.clone(),
            subjects,
            storage,
            max_age,
            duplicate_window,
            ..Default::default()
        }),
        name,
    })
}

/// `"500ms"`, `"90s"`, `"2m"`, `"1h"`, `"7d"`; `"0"` is no limit.
fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(ms).map(Duration::from_millis)
}

/// The subjects a subject template may publish to: every dot-separated token holding template
/// syntax becomes `*` (`fraiseql.{{ event.entity_type }}.{{ event.kind }}` -> `fraiseql.*.*`).
/// Dots inside `{{ }}` and `{% %}` do not separate tokens.
fn subject_pattern(source: &str) -> String {
    let mut tokens = Vec::new();
    let (mut token, mut templated, mut inside) = (String::new(), false, false);
    let mut chars = source.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek().copied(), inside) {
            ('{', Some('{' | '%'), false) => {
                inside = true;
                templated = true;
            }
            ('}' | '%', Some('}'), true) => {
                chars.next();
                inside = false;
            }
            ('.', _, false) => {
                tokens.push(if templated { "*".to_string() } else { token });
                (token, templated) = (String::new(), false);
            }
            (c, _, false) => token.push(c),
            _ => {}
        }
    }
    tokens.push(if templated { "*".to_string() } else { token });
    tokens.join(".")
}

/// A subject's shape: non-empty dot-separated tokens without whitespace; wildcards (`*`, a last
/// `>`) only where `wildcards` allows them.
fn check_subject(subject: &str, wildcards: bool) -> Result<(), String> {
    if subject.is_empty() {
        return Err("the subject is empty".into());
    }
    let tokens: Vec<_> = subject.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Err(format!("'{subject}' has an empty token"));
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("'{subject}' contains whitespace"));
        }
        let wildcard = *token == "*" || (*token == ">" && i == tokens.len() - 1);
        if wildcard && !wildcards {
            return Err(format!(
                "'{subject}' is a wildcard; a message needs a concrete subject"
            ));
        }
        if !wildcard && (token.contains('*') || token.contains('>')) {
            return Err(format!("'{subject}' has '*' or '>' inside a token"));
        }
    }
    Ok(())
}

/// Whether some subject matches both `a` and `b` (each may hold `*` and a last `>`).
fn subjects_collide(a: &str, b: &str) -> bool {
    let (a, b): (Vec<_>, Vec<_>) = (a.split('.').collect(), b.split('.').collect());
    let mut i = 0;
    loop {
        match (a.get(i), b.get(i)) {
            (None, None) => return true,
            (Some(&">"), Some(_)) | (Some(_), Some(&">")) => return true,
            (Some(x), Some(y)) if x == y || *x == "*" || *y == "*" => i += 1,
            _ => return false,
        }
    }
}

impl Nats {
    pub(crate) fn endpoint(&self) -> String {
        self.server.connection.shown().to_string()
    }

    /// Publish the event once and wait for the PubAck. `Ok` only once the stream stored it
    /// (or reported it a duplicate of one it stored).
    pub async fn execute(&self, request: &DeliveryRequest<'_>) -> Result<(), ActionError> {
        let context = format!("nats {}", self.server.connection.shown());
        let outcome = self.publish(request).await.map_err(|e| e.context(&context));
        tracing::debug!(
            action = "nats",
            delivery_id = request.delivery_id,
            attempt = request.attempt,
            nats = %self.server.connection.shown(),
            stream = outcome.as_ref().ok().map(|(s, _, _)| s.as_str()),
            sequence = outcome.as_ref().ok().map(|(_, seq, _)| *seq),
            duplicate = outcome.as_ref().ok().map(|(_, _, d)| *d),
            ok = outcome.is_ok(),
            "nats publish done"
        );
        outcome.map(|_| ())
    }

    /// Publish; the stream, sequence and duplicate flag of the PubAck.
    async fn publish(
        &self,
        request: &DeliveryRequest<'_>,
    ) -> Result<(String, u64, bool), ActionError> {
        let event = request.event;
        let ctx = EventContext::new(event);
        let subject = self.subject.render_context(&ctx).map_err(|e| {
            ActionError::permanent(format!("subject cannot render this event: {e}"))
        })?;
        check_subject(&subject, false)
            .map_err(|e| ActionError::permanent(format!("subject: {e}")))?;
        let body = self.body(event)?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", request.delivery_id);
        headers.insert("webhook-id", request.delivery_id);
        headers.insert("event-type", event_type(event).as_str());
        headers.insert("content-type", "application/json");
        let mut js = self.server.context(self.timeout).await?;
        js.set_timeout(self.timeout);
        let ack = js
            .publish_with_headers(subject.clone(), headers, body.into())
            .await
            .map_err(|e| classify_publish(e.kind(), &e.to_string(), &subject))?
            .await
            .map_err(|e| classify_publish(e.kind(), &e.to_string(), &subject))?;
        Ok((ack.stream, ack.sequence, ack.duplicate))
    }

    fn body(&self, event: &EntityEvent) -> Result<String, ActionError> {
        match &self.body {
            Some(template) => template.render(event).map_err(|e| {
                ActionError::permanent(format!("the body template cannot render this event: {e}"))
            }),
            None => Ok(default_body_json(event)),
        }
    }

    /// At pipeline start: create the stream if asked to, then check that a stream (the named
    /// one, if any) captures the subject. A permanent error is a configuration mistake (no such
    /// stream); a transient one means the server could not be asked.
    pub async fn prepare(&self) -> Result<(), ActionError> {
        let context = format!("nats {}", self.server.connection.shown());
        self.check_stream().await.map_err(|e| e.context(&context))
    }

    async fn check_stream(&self) -> Result<(), ActionError> {
        let js = self.server.context(self.timeout).await?;
        let pattern = &self.subject_pattern;
        if let Some(StreamSpec {
            name,
            create: Some(config),
        }) = &self.stream
        {
            js.get_or_create_stream(config.clone()).await.map_err(|e| {
                ActionError::permanent(format!("cannot create stream '{name}': {e}"))
            })?;
        }
        let streams: Vec<jetstream::stream::Info> = js
            .streams()
            .try_collect()
            .await
            .map_err(|e| ActionError::transient(format!("cannot list the streams: {e}")))?;
        let captures = |info: &jetstream::stream::Info| {
            info.config
                .subjects
                .iter()
                .any(|s| subjects_collide(s, pattern))
        };
        let source = &self.subject_source;
        match &self.stream {
            Some(spec) => match streams.iter().find(|i| i.config.name == spec.name) {
                None => Err(ActionError::permanent(format!(
                    "stream '{}' does not exist (set `stream.subjects` to have it created)",
                    spec.name
                ))),
                Some(info) if !captures(info) => Err(ActionError::permanent(format!(
                    "stream '{}' (subjects {:?}) does not capture subject '{pattern}' (from '{source}')",
                    spec.name, info.config.subjects
                ))),
                Some(_) => Ok(()),
            },
            None if streams.iter().any(captures) => Ok(()),
            None => Err(ActionError::permanent(format!(
                "no JetStream stream captures subject '{pattern}' (from '{source}'): create one, \
                 or set `stream = {{ name, subjects }}` to have it created"
            ))),
        }
    }
}

/// A publish failure: no PubAck in time, no stream, a lost connection or a refusal by the
/// stream are transient; a message above the server's limit is permanent.
fn classify_publish(kind: PublishErrorKind, message: &str, subject: &str) -> ActionError {
    let message = format!("publish to '{subject}' failed: {message}");
    match kind {
        PublishErrorKind::MaxPayloadExceeded => ActionError::permanent(message),
        _ => ActionError::transient(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        match k {
            "NATS_URL" => Some("nats://user:s3cret@127.0.0.1:4222".into()),
            "NATS_TOKEN" => Some("t0ken".into()),
            _ => None,
        }
    }

    fn compile_toml(source: &str) -> Result<Nats, Vec<ConfigError>> {
        let table: toml::Table = toml::from_str(&format!("type = \"nats\"\n{source}")).unwrap();
        compile_table(&table)
    }

    fn compile_table(table: &toml::Table) -> Result<Nats, Vec<ConfigError>> {
        let config = match crate::actions::ActionConfig::parse(table, "p")?.settings {
            crate::actions::Settings::Nats(c) => c,
            other => panic!("{other:?}"),
        };
        compile(&config, "p", &CompileContext::new(&env))
    }

    fn paths(errors: &[ConfigError]) -> Vec<&str> {
        errors.iter().map(|e| e.path.as_str()).collect()
    }

    #[test]
    fn doc_example_compiles() {
        let table = crate::actions::tests::doc_example(include_str!("nats.rs"));
        let nats = compile_table(&table).unwrap();
        assert_eq!(nats.subject_pattern, "fraiseql.*.*");
        assert_eq!(nats.endpoint(), "127.0.0.1:4222");
        let spec = nats.stream.as_ref().unwrap();
        let config = spec.create.as_ref().unwrap();
        assert_eq!(config.max_age, Duration::from_secs(7 * 86_400));
        assert_eq!(config.duplicate_window, Duration::from_secs(120));
    }

    #[test]
    fn errors_have_paths_and_no_secrets() {
        let errors = compile_toml(
            r#"url = "http://u:s3cret@host"
               subject = "a..b"
               token_env = "NATS_TOKEN"
               nkey_seed_env = "NOPE"
               stream = { subjects = [], storage = "disk", max_age = "soon" }"#,
        )
        .unwrap_err();
        assert_eq!(
            paths(&errors),
            [
                "p.url",
                "p.token_env",
                "p.nkey_seed_env",
                "p.subject",
                "p.stream.name",
                "p.stream.subjects",
                "p.stream.storage",
                "p.stream.max_age"
            ],
            "{errors:?}"
        );
        assert!(errors.iter().all(|e| !e.message.contains("s3cret")));
        let errors = compile_toml("url_env = 'NATS_URL'").unwrap_err();
        assert_eq!(paths(&errors), ["p.subject"]);
        let errors = compile_toml(
            r#"url = "nats://h"
               subject = "a"
               stream = { name = "S", max_age = "1h" }"#,
        )
        .unwrap_err();
        assert_eq!(paths(&errors), ["p.stream.max_age"]);
        let ok = compile_toml(
            r#"url_env = "NATS_URL"
               subject = "orders.{{ data.id }}"
               token_env = "NATS_TOKEN""#,
        )
        .unwrap();
        let debug = format!("{ok:?}");
        assert!(
            !debug.contains("s3cret") && !debug.contains("t0ken"),
            "{debug}"
        );
    }

    #[test]
    fn one_client_per_connection_settings() {
        let ctx = CompileContext::new(&env);
        let config = |subject: &str, token: Option<&str>| NatsConfig {
            url: Some("nats://127.0.0.1:4222".into()),
            subject: Some(subject.into()),
            token_env: token.map(String::from),
            ..Default::default()
        };
        let a = compile(&config("a", None), "p", &ctx).unwrap();
        let b = compile(&config("b", None), "p", &ctx).unwrap();
        let c = compile(&config("c", Some("NATS_TOKEN")), "p", &ctx).unwrap();
        assert!(Arc::ptr_eq(&a.server, &b.server));
        assert!(!Arc::ptr_eq(&a.server, &c.server));
    }

    #[test]
    fn subjects() {
        assert_eq!(
            subject_pattern("fraiseql.{{ event.entity_type }}.{{ event.kind }}"),
            "fraiseql.*.*"
        );
        assert_eq!(subject_pattern("a.b-{{ data.id }}.c"), "a.*.c");
        assert_eq!(
            subject_pattern("x.{% if data.a %}{{ data.a }}{% else %}none{% endif %}"),
            "x.*"
        );
        assert!(check_subject("a.*.>", true).is_ok());
        assert!(check_subject("a.*", false).is_err());
        assert!(check_subject("a.b c", false).is_err());
        assert!(check_subject("a.>.b", true).is_err());
        assert!(check_subject("a.x*", true).is_err());
        assert!(subjects_collide("fraiseql.>", "fraiseql.*.*"));
        assert!(subjects_collide("fraiseql.order.*", "fraiseql.*.*"));
        assert!(!subjects_collide("fraiseql.order", "fraiseql.*.*"));
        assert!(!subjects_collide("other.>", "fraiseql.*.*"));
        assert!(!subjects_collide("fraiseql.>", "fraiseql"));
        assert!(subjects_collide("a.b", "a.b"));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("2 weeks"), None);
        assert_eq!(parse_duration("m"), None);
    }
}
