//! The rabbitmq action: publish each event to a RabbitMQ exchange with publisher confirms.
//!
//! ```toml
//! [[observers.order_paid.actions]]
//! type = "rabbitmq"
//! url_env = "RABBITMQ_URL"                   # amqp://user:password@host:5672/vhost (amqps:// for TLS)
//! exchange = "fraiseql"                      # "" is the default exchange (routing key = queue)
//! routing_key = "{{ event.entity_type }}.{{ event.kind }}"
//! exchange_type = "topic"                    # optional: declare the exchange (durable) if missing
//! body_template = '{"order": {{ after.id }}}'   # default: the webhook body
//! mandatory = true                           # default: a message no queue takes is an error
//! timeout_ms = 10000                         # the wait for the confirm; default 10 s
//! ```
//!
//! Invariants:
//!
//! * Every message is persistent (`delivery_mode = 2`), `content_type = application/json`,
//!   `message_id` = the delivery id (identical on every retry: consumers deduplicate on it),
//!   `type` = the event type (`order.created`), `timestamp` = the event's time, and carries the
//!   header `webhook-id` (the delivery id, as the webhook action sends it). The body is the
//!   webhook action's default body, or `body_template` (JSON mode).
//! * The channel is in confirm mode: `Ok` only once the broker acknowledged the message. A
//!   negative acknowledgement, no confirm within `timeout_ms`, a lost connection or channel, and
//!   (with `mandatory`, the default) a message returned because no queue is bound for its routing
//!   key are transient: the delivery goes through the same retry queue and DLQ as every action.
//!   A routing key that cannot render or renders empty and a body that cannot render are
//!   permanent.
//! * Compiling is pure: every action compiled with the same URL shares one connection and one
//!   confirm-mode channel, opened on first use and opened again after a failure. The URL holds
//!   credentials, so messages show only host and port.
//! * When the pipeline starts ([`RabbitMq::prepare`]) the exchange is checked (a passive
//!   declare), or declared durable with `exchange_type`. A missing exchange stops the start with
//!   an error naming it; a broker that cannot be reached then is only logged (publishes retry).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind};
use serde::Deserialize;

use super::webhook::{default_body_json, event_type};
use super::{
    resolve_url, template, timeout_setting, ActionError, CompileContext, DeliveryRequest,
    UrlSetting,
};
use crate::error::ConfigError;
use crate::event::EntityEvent;
use crate::template::{EventContext, Template, TemplateMode};

/// The rabbitmq action as written in the configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitMqConfig {
    pub url: Option<String>,
    pub url_env: Option<String>,
    pub exchange: Option<String>,
    pub exchange_type: Option<String>,
    pub routing_key: Option<String>,
    pub body_template: Option<String>,
    pub mandatory: Option<bool>,
    pub timeout_ms: Option<u64>,
}

/// One broker: its URL and the connection and confirm-mode channel every action compiled with
/// it shares.
struct AmqpServer {
    uri: AMQPUri,
    /// `host:port`, for messages.
    shown: String,
    open: tokio::sync::Mutex<Option<(Connection, Channel)>>,
}

/// The RabbitMQ connections of a configuration, one per URL. Cloning shares them.
#[derive(Clone, Default)]
pub struct AmqpConnections {
    servers: Arc<Mutex<HashMap<String, Arc<AmqpServer>>>>,
}

impl fmt::Debug for AmqpConnections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.servers.lock().map(|s| s.len()).unwrap_or(0);
        f.debug_struct("AmqpConnections")
            .field("servers", &n)
            .finish()
    }
}

impl AmqpConnections {
    fn server(&self, url: &str, uri: AMQPUri) -> Arc<AmqpServer> {
        let mut servers = self
            .servers
            .lock()
            .expect("the connection map is never poisoned");
        servers
            .entry(url.to_string())
            .or_insert_with(|| {
                Arc::new(AmqpServer {
                    shown: format!("{}:{}", uri.authority.host, uri.authority.port),
                    uri,
                    open: tokio::sync::Mutex::new(None),
                })
            })
            .clone()
    }
}

impl AmqpServer {
    /// The shared confirm-mode channel: the open one, or a new one (on the open connection, or
    /// on a new connection when that one is gone).
    async fn channel(&self, timeout: Duration) -> Result<Channel, ActionError> {
        let mut open = self.open.lock().await;
        if let Some((connection, channel)) = &*open {
            if connection.status().connected() && channel.status().connected() {
                return Ok(channel.clone());
            }
        }
        let reuse = open
            .take()
            .map(|(connection, _)| connection)
            .filter(|c| c.status().connected());
        let connection = match reuse {
            Some(connection) => connection,
            None => {
                let properties = ConnectionProperties::default()
                    .with_connection_name("fraiseql-observers".into());
                tokio::time::timeout(
                    timeout,
                    Connection::connect_uri(self.uri.clone(), properties),
                )
                .await
                .map_err(|_| {
                    ActionError::transient(format!(
                        "cannot connect within {} ms",
                        timeout.as_millis()
                    ))
                })?
                .map_err(|e| classify(&e, "cannot connect"))?
            }
        };
        let channel = within(
            timeout,
            connection.create_channel(),
            "cannot open a channel",
        )
        .await?;
        within(
            timeout,
            channel.confirm_select(ConfirmSelectOptions::default()),
            "cannot enable publisher confirms",
        )
        .await?;
        *open = Some((connection, channel.clone()));
        Ok(channel)
    }

    /// A channel of its own (not the shared one: a failed passive declare closes its channel).
    async fn scratch_channel(&self, timeout: Duration) -> Result<Channel, ActionError> {
        self.channel(timeout).await?;
        let open = self.open.lock().await;
        let (connection, _) = open
            .as_ref()
            .ok_or_else(|| ActionError::transient("the connection closed"))?;
        within(
            timeout,
            connection.create_channel(),
            "cannot open a channel",
        )
        .await
    }
}

/// `future` within `timeout`; a timeout or a lapin error as an action error.
async fn within<T>(
    timeout: Duration,
    future: impl std::future::Future<Output = lapin::Result<T>>,
    what: &str,
) -> Result<T, ActionError> {
    tokio::time::timeout(timeout, future)
        .await
        .map_err(|_| {
            ActionError::transient(format!(
                "{what}: no answer within {} ms",
                timeout.as_millis()
            ))
        })?
        .map_err(|e| classify(&e, what))
}

/// A compiled rabbitmq action.
pub struct RabbitMq {
    server: Arc<AmqpServer>,
    exchange: String,
    exchange_type: Option<lapin::ExchangeKind>,
    routing_key: Template,
    body: Option<Template>,
    mandatory: bool,
    timeout: Duration,
}

impl fmt::Debug for RabbitMq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMq")
            .field("server", &self.server.shown)
            .field("exchange", &self.exchange)
            .field("body_template", &self.body.is_some())
            .field("mandatory", &self.mandatory)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Compile a rabbitmq action. Pure; reports every error with its path.
pub fn compile(
    config: &RabbitMqConfig,
    path: &str,
    ctx: &CompileContext<'_>,
) -> Result<RabbitMq, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let url_key = if config.url.is_some() {
        "url"
    } else {
        "url_env"
    };
    let url = resolve_url(
        UrlSetting {
            key: "url",
            value: config.url.as_deref(),
            env_key: "url_env",
            env_value: config.url_env.as_deref(),
        },
        true,
        path,
        ctx.env,
        &mut errors,
    )
    .and_then(|(url, _)| {
        let valid = url.starts_with("amqp://") || url.starts_with("amqps://");
        match valid.then(|| AMQPUri::from_str(&url)) {
            Some(Ok(uri)) => Some((url, uri)),
            // The parser's message may quote the URL, which holds a password.
            _ => {
                errors.push(ConfigError::new(
                    format!("{path}.{url_key}"),
                    "not a valid AMQP URL (amqp://user:password@host[:port][/vhost], or amqps:// for TLS)",
                ));
                None
            }
        }
    });
    let exchange = match config.exchange.as_deref() {
        None => {
            errors.push(ConfigError::new(
                format!("{path}.exchange"),
                "missing; the exchange to publish to (\"\" for the default exchange)",
            ));
            None
        }
        Some(name) if name.len() > 255 || name.chars().any(char::is_control) => {
            errors.push(ConfigError::new(
                format!("{path}.exchange"),
                "not a valid exchange name (at most 255 bytes, no control characters)",
            ));
            None
        }
        Some(name) => Some(name.to_string()),
    };
    let exchange_type = match config.exchange_type.as_deref() {
        None => None,
        Some("direct") => Some(lapin::ExchangeKind::Direct),
        Some("fanout") => Some(lapin::ExchangeKind::Fanout),
        Some("topic") => Some(lapin::ExchangeKind::Topic),
        Some("headers") => Some(lapin::ExchangeKind::Headers),
        Some(other) => {
            errors.push(ConfigError::new(
                format!("{path}.exchange_type"),
                format!("must be \"direct\", \"fanout\", \"topic\" or \"headers\", not '{other}'"),
            ));
            None
        }
    };
    if exchange_type.is_some() && exchange.as_deref() == Some("") {
        errors.push(ConfigError::new(
            format!("{path}.exchange_type"),
            "the default exchange (\"\") cannot be declared",
        ));
    }
    let routing_key = match config.routing_key.as_deref() {
        None => {
            errors.push(ConfigError::new(
                format!("{path}.routing_key"),
                "missing; a routing key template, e.g. \"{{ event.entity_type }}.{{ event.kind }}\"",
            ));
            None
        }
        Some(source) => template(source, TemplateMode::Key, "routing_key", path, &mut errors),
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

    match (errors.is_empty(), url, exchange, routing_key) {
        (true, Some((url, uri)), Some(exchange), Some(routing_key)) => Ok(RabbitMq {
            server: ctx.brokers.amqp.server(&url, uri),
            exchange,
            exchange_type,
            routing_key,
            body,
            mandatory: config.mandatory.unwrap_or(true),
            timeout,
        }),
        _ => Err(errors),
    }
}

impl RabbitMq {
    pub(crate) fn endpoint(&self) -> String {
        self.server.shown.clone()
    }

    /// Publish the event once and wait for the broker's confirm. `Ok` only on an ack.
    pub async fn execute(&self, request: &DeliveryRequest<'_>) -> Result<(), ActionError> {
        let context = format!(
            "rabbitmq {} exchange '{}'",
            self.server.shown, self.exchange
        );
        let outcome = self.publish(request).await.map_err(|e| e.context(&context));
        tracing::debug!(
            action = "rabbitmq",
            delivery_id = request.delivery_id,
            attempt = request.attempt,
            rabbitmq = %self.server.shown,
            exchange = %self.exchange,
            ok = outcome.is_ok(),
            "rabbitmq publish done"
        );
        outcome
    }

    async fn publish(&self, request: &DeliveryRequest<'_>) -> Result<(), ActionError> {
        let event = request.event;
        let routing_key = self
            .routing_key
            .render_context(&EventContext::new(event))
            .map_err(|e| {
                ActionError::permanent(format!("routing_key cannot render this event: {e}"))
            })?;
        if routing_key.is_empty() || routing_key.len() > 255 {
            return Err(ActionError::permanent(format!(
                "routing_key rendered {} bytes for this event (1 to 255 allowed)",
                routing_key.len()
            )));
        }
        let body = self.body(event)?;
        let mut headers = FieldTable::default();
        headers.insert(
            "webhook-id".into(),
            AMQPValue::LongString(request.delivery_id.into()),
        );
        let properties = BasicProperties::default()
            .with_message_id(ShortString::from(request.delivery_id))
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_type(ShortString::from(event_type(event)))
            .with_timestamp(event.created_at.timestamp().max(0) as u64)
            .with_app_id("fraiseql-observers".into())
            .with_headers(headers);
        let channel = self.server.channel(self.timeout).await?;
        let publish = async {
            channel
                .basic_publish(
                    self.exchange.as_str().into(),
                    routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: self.mandatory,
                        immediate: false,
                    },
                    body.as_bytes(),
                    properties,
                )
                .await?
                .await
        };
        // Whatever fails here (a channel closed by the broker because the exchange is gone, a
        // lost connection, no confirm in time) may succeed later.
        let confirmation = within(self.timeout, publish, "publish failed")
            .await
            .map_err(|e| ActionError::transient(e.message))?;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => Err(ActionError::transient(format!(
                "no queue is bound for routing key '{routing_key}' (the message was returned)"
            ))),
            Confirmation::Nack(_) => Err(ActionError::transient(format!(
                "the broker refused the message (nack) for routing key '{routing_key}'"
            ))),
            Confirmation::NotRequested => {
                Err(ActionError::transient("the channel is not in confirm mode"))
            }
        }
    }

    fn body(&self, event: &EntityEvent) -> Result<String, ActionError> {
        match &self.body {
            Some(template) => template.render(event).map_err(|e| {
                ActionError::permanent(format!("the body template cannot render this event: {e}"))
            }),
            None => Ok(default_body_json(event)),
        }
    }

    /// At pipeline start: the exchange must exist (a passive declare), or is declared durable
    /// with `exchange_type`. The default exchange always exists.
    pub async fn prepare(&self) -> Result<(), ActionError> {
        if self.exchange.is_empty() {
            return Ok(());
        }
        let context = format!("rabbitmq {}", self.server.shown);
        let channel = self
            .server
            .scratch_channel(self.timeout)
            .await
            .map_err(|e| e.context(&context))?;
        let options = ExchangeDeclareOptions {
            passive: self.exchange_type.is_none(),
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let kind = self.exchange_type.clone().unwrap_or_default();
        let declared = within(
            self.timeout,
            channel.exchange_declare(
                self.exchange.as_str().into(),
                kind,
                options,
                FieldTable::default(),
            ),
            "declare failed",
        )
        .await;
        if channel.status().connected() {
            let _ = channel.close(200, "OK".into()).await;
        }
        match declared {
            Ok(()) => Ok(()),
            Err(e) if e.kind == super::FailureKind::Permanent => {
                Err(ActionError::permanent(format!(
                    "{context}: exchange '{}' {}: {}",
                    self.exchange,
                    if options.passive {
                        "does not exist (create it, or set `exchange_type` to have it declared)"
                    } else {
                        "cannot be declared"
                    },
                    e.message()
                )))
            }
            Err(e) => Err(e.context(&context)),
        }
    }
}

/// A lapin error as an action error: refused access, a missing exchange and a refused
/// declaration are permanent; connection and channel failures are transient.
fn classify(e: &lapin::Error, what: &str) -> ActionError {
    let message = format!("{what}: {e}");
    match e.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(
                AMQPSoftError::ACCESSREFUSED
                | AMQPSoftError::NOTFOUND
                | AMQPSoftError::PRECONDITIONFAILED,
            ) => ActionError::permanent(message),
            _ => ActionError::transient(message),
        },
        ErrorKind::AuthProviderError(_) | ErrorKind::InvalidProtocolVersion(_) => {
            ActionError::permanent(message)
        }
        _ => ActionError::transient(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        (k == "RABBITMQ_URL").then(|| "amqp://guest:s3cret@127.0.0.1:5672/%2f".to_string())
    }

    fn compile_toml(source: &str) -> Result<RabbitMq, Vec<ConfigError>> {
        let table: toml::Table = toml::from_str(&format!("type = \"rabbitmq\"\n{source}")).unwrap();
        compile_table(&table)
    }

    fn compile_table(table: &toml::Table) -> Result<RabbitMq, Vec<ConfigError>> {
        let config = match crate::actions::ActionConfig::parse(table, "p")?.settings {
            crate::actions::Settings::RabbitMq(c) => c,
            other => panic!("{other:?}"),
        };
        compile(&config, "p", &CompileContext::new(&env))
    }

    fn paths(errors: &[ConfigError]) -> Vec<&str> {
        errors.iter().map(|e| e.path.as_str()).collect()
    }

    #[test]
    fn doc_example_compiles() {
        let table = crate::actions::tests::doc_example(include_str!("rabbitmq.rs"));
        let action = compile_table(&table).unwrap();
        assert_eq!(action.endpoint(), "127.0.0.1:5672");
        assert_eq!(action.exchange, "fraiseql");
        assert!(action.mandatory);
        let debug = format!("{action:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
    }

    #[test]
    fn errors_have_paths_and_no_secrets() {
        let errors = compile_toml(
            r#"url = "http://guest:s3cret@host"
               exchange_type = "x"
               timeout_ms = 0"#,
        )
        .unwrap_err();
        assert_eq!(
            paths(&errors),
            [
                "p.url",
                "p.exchange",
                "p.exchange_type",
                "p.routing_key",
                "p.timeout_ms"
            ],
            "{errors:?}"
        );
        assert!(errors.iter().all(|e| !e.message.contains("s3cret")));
        let errors = compile_toml(
            r#"url_env = "RABBITMQ_URL"
               exchange = ""
               exchange_type = "topic"
               routing_key = "{{ nope }}""#,
        )
        .unwrap_err();
        assert_eq!(paths(&errors), ["p.exchange_type", "p.routing_key"]);
    }

    #[test]
    fn one_connection_per_url() {
        let ctx = CompileContext::new(&env);
        let config = |url: &str| RabbitMqConfig {
            url: Some(url.into()),
            exchange: Some("x".into()),
            routing_key: Some("k".into()),
            ..Default::default()
        };
        let a = compile(&config("amqp://127.0.0.1"), "p", &ctx).unwrap();
        let b = compile(&config("amqp://127.0.0.1"), "p", &ctx).unwrap();
        let c = compile(&config("amqp://127.0.0.1/other"), "p", &ctx).unwrap();
        assert!(Arc::ptr_eq(&a.server, &b.server));
        assert!(!Arc::ptr_eq(&a.server, &c.server));
        assert_eq!(a.endpoint(), "127.0.0.1:5672");
    }
}
