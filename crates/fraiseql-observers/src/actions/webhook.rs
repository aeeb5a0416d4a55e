//! The webhook action: an HTTP request with a JSON body, signed the Standard Webhooks way.
//!
//! ```toml
//! [[observers.order_paid.actions]]
//! type = "webhook"
//! url = "https://example.com/hooks/orders"   # or url_env = "ORDERS_HOOK_URL"
//! method = "POST"                            # POST (default), PUT or PATCH
//! headers = { x-team = "billing" }           # static, non-secret headers
//! body_template = '{"order": {{ after.id }}, "email": {{ after.email }}}'   # JSON mode
//! timeout_ms = 10000                         # default 10 s
//! signing_secret_env = "ORDERS_HOOK_SECRET"  # "whsec_<base64>", several = rotation
//! allow_private_networks = false             # default: private targets are refused
//! ```
//!
//! Invariants:
//!
//! * Every request carries `content-type: application/json`, `user-agent`,
//!   `webhook-id` and `idempotency-key` (both the delivery id: identical on every retry),
//!   `webhook-timestamp` (unix seconds of this attempt) and, when a secret is configured,
//!   `webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`, one `v1,`
//!   signature per secret, space-separated (rotation: receivers accept any one).
//! * A secret `whsec_<base64>` is used as its base64-decoded bytes (Standard Webhooks); a secret
//!   without the prefix is used as its raw UTF-8 bytes. Secrets never appear in messages, logs or
//!   `Debug` output.
//! * The body is valid JSON by construction (see [`crate::template`]); the default body is
//!   `{"type": "order.created", "timestamp": <event time>, "data": {event fields, before, after,
//!   changes}}`. Its timestamp is the event's own time, not the send time, so a retry sends the
//!   same body.
//! * Only `Ok` when the receiver answered 2xx; see [`super::http::classify`].
//! * Messages show a `url` without its query string; a URL from `url_env` is shown as scheme and
//!   host only. A URL whose path carries a token belongs in `url_env`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use reqwest::Method;
use ring::hmac;
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::http::{classify, HttpClient, HttpRequest, Target};
use super::{
    resolve_url, secret_from_env, timeout_setting, ActionError, CompileContext, DeliveryRequest,
    UrlSetting,
};
use crate::error::ConfigError;
use crate::event::{EntityEvent, EventKind, Image};
use crate::template::{changes_json, event_json, Rfc3339, Shown, Template, TemplateMode};

/// Headers the action sets itself; a configured header cannot replace them.
const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
    "connection",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "idempotency-key",
];

/// The webhook action as written in the configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: Option<String>,
    pub url_env: Option<String>,
    pub method: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub body_template: Option<String>,
    pub timeout_ms: Option<u64>,
    pub signing_secret_env: Option<String>,
    #[serde(default)]
    pub allow_private_networks: bool,
}

/// A compiled webhook action.
pub struct Webhook {
    http: HttpClient,
    target: Target,
    method: Method,
    headers: HeaderMap,
    body: Option<Template>,
    timeout: Duration,
    signing_keys: Vec<SigningKey>,
}

/// A signing secret prepared for HMAC-SHA256 once, when the action compiles (not per event).
/// Its `Debug` shows nothing of the key.
#[derive(Clone)]
pub struct SigningKey(hmac::Key);

impl SigningKey {
    /// The key for a secret's bytes (a `whsec_` secret base64-decoded, another one as it is).
    pub fn new(secret: &[u8]) -> SigningKey {
        SigningKey(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

impl fmt::Debug for Webhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Webhook")
            .field("target", &self.target)
            .field("method", &self.method)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("body_template", &self.body.is_some())
            .field("timeout", &self.timeout)
            .field("signing_keys", &self.signing_keys.len())
            .finish()
    }
}

/// Compile a webhook configuration. Pure; reports every error with its path.
pub fn compile(
    config: &WebhookConfig,
    path: &str,
    ctx: &CompileContext<'_>,
) -> Result<Webhook, Vec<ConfigError>> {
    let env = ctx.env;
    let mut errors = Vec::new();

    let target = resolve_url(
        UrlSetting {
            key: "url",
            value: config.url.as_deref(),
            env_key: "url_env",
            env_value: config.url_env.as_deref(),
        },
        false,
        path,
        env,
        &mut errors,
    )
    .and_then(|(url, secret)| {
        let key = if config.url.is_some() {
            "url"
        } else {
            "url_env"
        };
        Target::parse(&url, secret, config.allow_private_networks)
            .map_err(|e| errors.push(ConfigError::new(format!("{path}.{key}"), e)))
            .ok()
    });

    let method = match config
        .method
        .as_deref()
        .map(str::to_ascii_uppercase)
        .as_deref()
    {
        None | Some("POST") => Method::POST,
        Some("PUT") => Method::PUT,
        Some("PATCH") => Method::PATCH,
        Some(other) => {
            errors.push(ConfigError::new(
                format!("{path}.method"),
                format!("must be POST, PUT or PATCH, not '{other}'"),
            ));
            Method::POST
        }
    };

    let mut headers = HeaderMap::new();
    for (name, value) in &config.headers {
        let header_path = format!("{path}.headers.{name}");
        if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            errors.push(ConfigError::new(
                header_path,
                "is set by the webhook action itself and cannot be configured",
            ));
            continue;
        }
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(n), Ok(v)) => {
                headers.insert(n, v);
            }
            (Err(_), _) => errors.push(ConfigError::new(header_path, "not a valid header name")),
            (_, Err(_)) => errors.push(ConfigError::new(
                header_path,
                "not a valid header value (control characters or non-ASCII text)",
            )),
        }
    }

    let body = config.body_template.as_deref().and_then(|source| {
        Template::compile(source, TemplateMode::Json)
            .map_err(|e| {
                errors.push(ConfigError::new(
                    format!("{path}.body_template"),
                    e.to_string(),
                ))
            })
            .ok()
    });

    let timeout = timeout_setting(config.timeout_ms, path, &mut errors);

    let signing_keys = match &config.signing_secret_env {
        None => Vec::new(),
        Some(var) => {
            let secret_path = format!("{path}.signing_secret_env");
            secret_from_env(var, &secret_path, env, &mut errors)
                .map(|secrets| parse_signing_keys(&secrets, var, &secret_path, &mut errors))
                .unwrap_or_default()
                .iter()
                .map(|secret| SigningKey::new(secret))
                .collect()
        }
    };

    match (errors.is_empty(), target) {
        (true, Some(target)) => Ok(Webhook {
            http: ctx.http.clone(),
            target,
            method,
            headers,
            body,
            timeout,
            signing_keys,
        }),
        _ => Err(errors),
    }
}

/// Space-separated secrets: `whsec_<base64>` (decoded) or anything else (raw bytes).
fn parse_signing_keys(
    secrets: &str,
    var: &str,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Vec<Vec<u8>> {
    secrets
        .split_whitespace()
        .enumerate()
        .filter_map(|(i, secret)| match secret.strip_prefix("whsec_") {
            Some(encoded) => match BASE64.decode(encoded) {
                Ok(key) if !key.is_empty() => Some(key),
                _ => {
                    errors.push(ConfigError::new(
                        path,
                        format!(
                            "secret #{} in environment variable '{var}' starts with 'whsec_' but the rest is not valid base64",
                            i + 1
                        ),
                    ));
                    None
                }
            },
            None => Some(secret.as_bytes().to_vec()),
        })
        .collect()
}

impl Webhook {
    pub(crate) fn endpoint(&self) -> String {
        self.target.endpoint()
    }

    /// Send the event once. `Ok` only on a 2xx answer.
    pub async fn execute(&self, request: &DeliveryRequest<'_>) -> Result<(), ActionError> {
        let context = format!("webhook {}", self.target.shown());
        let body = self.body(request.event).map_err(|e| e.context(&context))?;
        let timestamp = chrono::Utc::now().timestamp();
        let mut headers = self.headers.clone();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let id = HeaderValue::from_str(request.delivery_id).map_err(|_| {
            ActionError::permanent(format!(
                "{context}: the delivery id is not a valid header value"
            ))
        })?;
        headers.insert("webhook-id", id.clone());
        headers.insert("idempotency-key", id);
        headers.insert("webhook-timestamp", HeaderValue::from(timestamp));
        if !self.signing_keys.is_empty() {
            let signature = sign(&self.signing_keys, request.delivery_id, timestamp, &body);
            headers.insert(
                "webhook-signature",
                HeaderValue::from_str(&signature).expect("base64 is a valid header value"),
            );
        }
        let response = self
            .http
            .send(HttpRequest {
                method: self.method.clone(),
                target: &self.target,
                headers,
                body: body.into_bytes(),
                timeout: self.timeout,
            })
            .await
            .map_err(|e| e.context(&context))?;
        let outcome = classify(response.status, &response.headers).map_err(|e| {
            e.context(&context)
                .with_excerpt(response.body_snippet(super::EXCERPT_CHARS))
        });
        tracing::debug!(
            action = "webhook",
            delivery_id = request.delivery_id,
            attempt = request.attempt,
            target_url = %self.target.shown(),
            status = response.status.as_u16(),
            ok = outcome.is_ok(),
            "webhook delivered"
        );
        outcome
    }

    /// The body for this event: the template's output, or the default body.
    fn body(&self, event: &EntityEvent) -> Result<String, ActionError> {
        match &self.body {
            Some(template) => template.render(event).map_err(|e| {
                ActionError::permanent(format!("the body template cannot render this event: {e}"))
            }),
            None => Ok(default_body_json(event)),
        }
    }
}

/// The default body as JSON text: the same JSON as `default_body(event)`, written straight from
/// the event: the images (and the values in `changes`) are copied as the row's JSON text, not
/// parsed and written again, so their keys keep the database's order and spacing. Keys come in
/// the order a `serde_json::Map` (a sorted map: serde_json's `preserve_order` is off) would
/// write them; the rest is written by serde_json, compact.
pub fn default_body_json(event: &EntityEvent) -> String {
    let e = event;
    let image_len = |image: &Option<Image>| image.as_ref().map_or(0, |i| i.text().len());
    let mut out = Vec::with_capacity(512 + 2 * (image_len(&e.before) + image_len(&e.after)));
    let image = |out: &mut Vec<u8>, image: &Option<Image>| match image {
        Some(image) => out.extend_from_slice(image.text().as_bytes()),
        None => out.extend_from_slice(b"null"),
    };
    out.extend_from_slice(b"{\"data\":{\"after\":");
    image(&mut out, &e.after);
    out.extend_from_slice(b",\"author\":");
    write_json(&mut out, &e.author);
    out.extend_from_slice(b",\"before\":");
    image(&mut out, &e.before);
    out.extend_from_slice(b",\"change_status\":");
    write_json(&mut out, &e.change_status);
    out.extend_from_slice(b",\"changes\":");
    write_changes(&mut out, e);
    // The event's time, written once: `created_at` and the body's `timestamp`.
    let mut created_at = Vec::with_capacity(40);
    write_json(&mut created_at, &Rfc3339(&e.created_at));
    out.extend_from_slice(b",\"created_at\":");
    out.extend_from_slice(&created_at);
    out.extend_from_slice(b",\"entity_id\":");
    write_json(&mut out, &Shown(&e.entity_id));
    out.extend_from_slice(b",\"entity_type\":");
    write_json(&mut out, &e.entity_type);
    out.extend_from_slice(b",\"extra_metadata\":");
    write_json(&mut out, &e.extra_metadata);
    out.extend_from_slice(b",\"id\":");
    write_json(&mut out, &Shown(&e.id));
    out.extend_from_slice(b",\"kind\":");
    write_json(&mut out, e.kind.as_str());
    out.extend_from_slice(b",\"op\":");
    write_json(&mut out, e.kind.op());
    out.extend_from_slice(b",\"sequence\":");
    write_json(&mut out, &e.sequence);
    out.extend_from_slice(b",\"source\":");
    write_json(&mut out, &e.source);
    out.extend_from_slice(b",\"source_ts\":");
    write_json(&mut out, &e.source_ts.as_ref().map(Rfc3339));
    out.extend_from_slice(b",\"tenant\":");
    write_json(&mut out, &e.tenant.as_ref().map(Shown));
    out.extend_from_slice(b"},\"timestamp\":");
    out.extend_from_slice(&created_at);
    out.extend_from_slice(b",\"type\":");
    write_json(&mut out, &EventType(e));
    out.push(b'}');
    String::from_utf8(out).expect("JSON text is UTF-8")
}

/// One value as compact JSON, appended.
fn write_json<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    serde_json::to_writer(out, value).expect("serializing to memory cannot fail");
}

/// `changes` as JSON text sliced from the images: `{field: {"new", "old"}}` in field order, or
/// `null` (see [`EntityEvent::change_images`]). A field whose text is the same on both sides is
/// unchanged; one whose text differs is parsed and compared as values (`1.0` and `1.00` are the
/// same number), so the fields are exactly those of [`EntityEvent::changes`].
fn write_changes(out: &mut Vec<u8>, event: &EntityEvent) {
    let Some((old, new)) = event.change_images() else {
        out.extend_from_slice(b"null");
        return;
    };
    let old = old.map(Image::fields).unwrap_or_default();
    let new = new.map(Image::fields).unwrap_or_default();
    let (mut o, mut n) = (old.iter().peekable(), new.iter().peekable());
    let mut first = true;
    out.push(b'{');
    loop {
        let (field, before, after) = match (o.peek(), n.peek()) {
            (None, None) => break,
            (Some((ko, _)), Some((kn, _))) if ko == kn => {
                let ((k, b), (_, a)) = (o.next().unwrap(), n.next().unwrap());
                (k, Some(*b), Some(*a))
            }
            (Some((ko, _)), Some((kn, _))) if ko > kn => {
                let (k, a) = n.next().unwrap();
                (k, None, Some(*a))
            }
            (Some(_), _) => {
                let (k, b) = o.next().unwrap();
                (k, Some(*b), None)
            }
            (None, Some(_)) => {
                let (k, a) = n.next().unwrap();
                (k, None, Some(*a))
            }
        };
        if same_value(before, after) {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        write_json(out, field.as_ref());
        out.extend_from_slice(b":{\"new\":");
        out.extend_from_slice(after.unwrap_or("null").as_bytes());
        out.extend_from_slice(b",\"old\":");
        out.extend_from_slice(before.unwrap_or("null").as_bytes());
        out.push(b'}');
    }
    out.push(b'}');
}

/// Whether two fields' JSON texts hold the same value (both absent counts as the same).
fn same_value(a: Option<&str>, b: Option<&str>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            let parsed = |text: &str| serde_json::from_str::<serde_json::Value>(text).ok();
            a == b || parsed(a) == parsed(b)
        }
        _ => false,
    }
}

/// The event's type as the default body's `type` says it: `order.created` (the message sinks
/// send it as a header too).
pub(crate) fn event_type(event: &EntityEvent) -> String {
    format!("{}.{}", event.entity_type.to_lowercase(), verb(event.kind))
}

/// `order.created`: the lowercased entity type and the verb.
struct EventType<'a>(&'a EntityEvent);

impl Serialize for EventType<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let event = self.0;
        serializer.collect_str(&format_args!(
            "{}.{}",
            event.entity_type.to_lowercase(),
            verb(event.kind)
        ))
    }
}

fn verb(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Created => "created",
        EventKind::Updated => "updated",
        EventKind::Deleted => "deleted",
        EventKind::Custom => "custom",
        EventKind::Snapshot => "snapshot",
    }
}

/// `{"type": "order.created", "timestamp": ..., "data": {event fields, before, after, changes}}`.
/// [`default_body_json`] writes the same JSON without building this value.
pub fn default_body(event: &EntityEvent) -> serde_json::Value {
    let verb = verb(event.kind);
    let mut data = event_json(event);
    if let Some(fields) = data.as_object_mut() {
        fields.insert("before".into(), json!(event.before.as_deref()));
        fields.insert("after".into(), json!(event.after.as_deref()));
        fields.insert("changes".into(), changes_json(event));
    }
    json!({
        "type": format!("{}.{verb}", event.entity_type.to_lowercase()),
        "timestamp": event.created_at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        "data": data,
    })
}

/// The `webhook-signature` value: `v1,<base64 HMAC-SHA256>` per key, space-separated.
/// HMAC-SHA256 by `ring` (already linked for TLS): its assembly SHA-256 uses the CPU's SHA
/// extensions when there are any, and vector code otherwise (`sha2`'s portable code was about
/// four times the instructions where a CPU has no SHA extensions, see BENCHMARKS.md). The keys
/// come prepared ([`SigningKey`]): the key's own two blocks are hashed once, not per event.
pub fn sign(keys: &[SigningKey], id: &str, timestamp: i64, body: &str) -> String {
    let timestamp = timestamp.to_string();
    let mut out = String::with_capacity(keys.len() * 48);
    for (i, key) in keys.iter().enumerate() {
        let mut mac = hmac::Context::with_key(&key.0);
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body.as_bytes());
        if i > 0 {
            out.push(' ');
        }
        out.push_str("v1,");
        BASE64.encode_string(mac.sign().as_ref(), &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn doc_example_compiles_and_renders_json() {
        let table = crate::actions::tests::doc_example(include_str!("webhook.rs"));
        let config = match crate::actions::ActionConfig::parse(&table, "p")
            .unwrap()
            .settings
        {
            crate::actions::Settings::Webhook(c) => c,
            other => panic!("{other:?}"),
        };
        let env = env_of(&[("ORDERS_HOOK_SECRET", "whsec_AAEC")]);
        let hook = compile(&config, "p", &CompileContext::new(&env)).unwrap();
        assert_eq!(hook.method, Method::POST);
        assert_eq!(hook.headers["x-team"], "billing");
        assert_eq!(hook.timeout, Duration::from_secs(10));
        let event = crate::event::EntityEvent {
            after: Some(json!({"id": 1, "email": "a@b"}).into()),
            ..sample_event()
        };
        let body: serde_json::Value = serde_json::from_str(&hook.body(&event).unwrap()).unwrap();
        assert_eq!(body, json!({"order": 1, "email": "a@b"}));
    }

    fn sample_event() -> crate::event::EntityEvent {
        crate::event::EntityEvent {
            id: uuid::Uuid::from_u128(1),
            sequence: 1,
            kind: EventKind::Created,
            entity_type: "OrderItem".into(),
            entity_id: uuid::Uuid::from_u128(2),
            tenant: None,
            author: None,
            before: None,
            after: None,
            change_status: "new".into(),
            extra_metadata: json!({}),
            source: None,
            created_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            source_ts: None,
            position: crate::event::Position {
                batch: 0,
                sequence: 1,
            },
        }
    }

    /// For an event made of values (not decoded from a row), the body written straight from
    /// the event is byte for byte `default_body`'s JSON.
    #[test]
    fn default_body_json_is_default_body_serialized() {
        let before =
            json!({"id": 1, "status": "new", "total": 10.5, "note": "a \"quote\"", "tags": ["x"]});
        let after = json!({"id": 1, "status": "paid", "total": 12, "extra": {"b": 1, "a": [null]}});
        let created = crate::event::EntityEvent {
            after: Some(after.clone().into()),
            tenant: Some(uuid::Uuid::from_u128(9)),
            author: Some("someone".into()),
            source: Some(json!({"table": "tb_order", "ts_us": 1})),
            source_ts: chrono::DateTime::from_timestamp(1_700_000_000, 123_456_000),
            extra_metadata: json!({"z": 1, "a": "b"}),
            ..sample_event()
        };
        let updated = crate::event::EntityEvent {
            kind: EventKind::Updated,
            before: Some(before.clone().into()),
            ..created.clone()
        };
        let deleted = crate::event::EntityEvent {
            kind: EventKind::Deleted,
            before: Some(before.into()),
            after: None,
            tenant: None,
            ..sample_event()
        };
        let custom_without_before = crate::event::EntityEvent {
            kind: EventKind::Custom,
            after: Some(after.into()),
            ..sample_event()
        };
        for event in [
            sample_event(),
            created,
            updated,
            deleted,
            custom_without_before,
        ] {
            assert_eq!(default_body_json(&event), default_body(&event).to_string());
        }
    }

    /// For events decoded from rows, the body copies the images' text (PostgreSQL's key order
    /// and spacing): it parses, and equals `default_body`'s value, for unicode and escapes, a
    /// deep image, numbers written differently on each side, repeated keys and every kind.
    #[test]
    fn the_spliced_body_parses_and_equals_the_value_body() {
        use crate::listener::parser::{decode, ChangeLogRow, TableShape};
        let shape = TableShape::mission();
        let deep = (0..60).fold("1".to_string(), |inner, i| {
            format!("{{\"k{i}\": [{inner}]}}")
        });
        let images = [
            // PostgreSQL's jsonb text: keys by length, then bytes; a space after ':' and ','.
            r#"{"id": 7, "note": "caf\u00e9 \"quoted\" \\ back\nslash", "total": 10.50, "emoji": "😀 é ü", "ctrl": "\u0001\t"}"#.to_string(),
            r#"{"id": 7, "note": "café \"quoted\" \\ back\nslash", "total": 10.5, "emoji": "😀 é ü", "added": null}"#.to_string(),
            format!(r#"{{"id": 7, "doc": {deep}, "tags": ["a", {{"b": [1, 2.0, -3e2]}}]}}"#),
            r#"{"id": 7, "id": 8, "x": {"y": 1, "y": 2}, "big": 123456789012345678901234567890}"#.to_string(),
            r#"{}"#.to_string(),
        ];
        let row = |op: &str, modification: &str, before: &str, after: &str| ChangeLogRow {
            sequence: 1,
            change_id: Some("0f8fad5b-d9cb-469f-a165-70867728950e".into()),
            tenant: Some("aaaaaaaa-0000-0000-0000-000000000001".into()),
            author: Some("sam \"o'neil\"".into()),
            object_type: Some("Order".into()),
            object_id: Some("3f2c7b9e-8d1a-4c5e-9b7f-1a2b3c4d5e6f".into()),
            modification_type: Some(modification.into()),
            change_status: Some("updated".into()),
            object_data: Some(format!(
                r#"{{"op": "{op}", "after": {after}, "before": {before}, "source": {{"ts_ms": 1767607872123, "table": "tb_order"}}}}"#
            )),
            object_data_before: None,
            extra_metadata: Some(r#"{"ü": "x"}"#.into()),
            created_at: chrono::DateTime::from_timestamp(1_700_000_000, 5_000),
            commit_time: None,
        };
        let position = crate::event::Position {
            batch: 1,
            sequence: 1,
        };
        let mut checked = 0;
        for before in &images {
            for after in &images {
                for (op, modification, b, a) in [
                    ("c", "INSERT", "null", after.as_str()),
                    ("u", "UPDATE", before.as_str(), after.as_str()),
                    ("u", "UPDATE", "null", after.as_str()),
                    ("d", "DELETE", before.as_str(), "null"),
                    ("r", "NOOP", before.as_str(), after.as_str()),
                ] {
                    let event = decode(&shape, &row(op, modification, b, a), position).unwrap();
                    let spliced = default_body_json(&event);
                    let parsed: serde_json::Value =
                        serde_json::from_str(&spliced).unwrap_or_else(|e| panic!("{e}: {spliced}"));
                    assert_eq!(parsed, default_body(&event), "{spliced}");
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 125);
    }

    #[test]
    fn default_body_type_is_lowercased_entity_and_verb() {
        let body = default_body(&sample_event());
        assert_eq!(body["type"], "orderitem.created");
        assert_eq!(body["timestamp"], "2023-11-14T22:13:20Z");
        assert_eq!(body["data"]["changes"], serde_json::Value::Null);
        assert_eq!(body["data"]["before"], serde_json::Value::Null);
    }

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification's reference libraries.
        let key = BASE64.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = sign(
            &[SigningKey::new(&key)],
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn compile_reports_every_error() {
        let config = WebhookConfig {
            url: Some("ftp://example.com".into()),
            method: Some("DELETE".into()),
            headers: BTreeMap::from([
                ("webhook-signature".to_string(), "x".to_string()),
                ("bad header".to_string(), "x".to_string()),
            ]),
            body_template: Some("{{ after.x ".into()),
            timeout_ms: Some(0),
            signing_secret_env: Some("SECRET".into()),
            ..Default::default()
        };
        let env = env_of(&[("SECRET", "whsec_***")]);
        let errors = compile(&config, "p", &CompileContext::new(&env)).unwrap_err();
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "p.url",
                "p.method",
                "p.headers.bad header",
                "p.headers.webhook-signature",
                "p.body_template",
                "p.timeout_ms",
                "p.signing_secret_env"
            ],
            "{errors:#?}"
        );
        assert!(!errors.iter().any(|e| e.message.contains("***")));
    }

    #[test]
    fn raw_secret_without_prefix_is_used_as_bytes() {
        let config = WebhookConfig {
            url: Some("https://example.com/h".into()),
            signing_secret_env: Some("S".into()),
            ..Default::default()
        };
        let env = env_of(&[("S", "plain-secret whsec_AAEC")]);
        let hook = compile(&config, "p", &CompileContext::new(&env)).unwrap();
        let mut errors = Vec::new();
        let secrets = parse_signing_keys("plain-secret whsec_AAEC", "S", "p", &mut errors);
        assert_eq!(secrets, vec![b"plain-secret".to_vec(), vec![0, 1, 2]]);
        assert!(errors.is_empty());
        // The compiled keys are those secrets': the same signatures, one per key.
        let expected = [
            SigningKey::new(b"plain-secret"),
            SigningKey::new(&[0, 1, 2]),
        ];
        assert_eq!(
            sign(&hook.signing_keys, "msg_1", 1, "{}"),
            sign(&expected, "msg_1", 1, "{}")
        );
        let debug = format!("{hook:?} {:?}", hook.signing_keys);
        assert!(!debug.contains("plain-secret"), "{debug}");
    }
}
