//! The push action: a notification to one device or browser, through Firebase Cloud Messaging
//! (FCM HTTP v1), Apple Push Notification service (APNs, token auth) or Web Push (RFC 8030, with
//! RFC 8291 encryption and RFC 8292 VAPID).
//!
//! ```toml
//! [[observers.order_paid.actions]]
//! type = "push"
//! provider = "fcm"                                 # "fcm" | "apns" | "web_push"
//! token_field = "after.device_token"               # or token_template = "{{ after.token }}"
//! title_template = "Order {{ after.id }} paid"     # text mode
//! body_template = "{{ after.total }} EUR"          # text mode
//! data_template = '{"order_id": {{ after.id }}}'   # JSON object
//! service_account_env = "FCM_SERVICE_ACCOUNT"      # the key JSON itself; or service_account_file
//! timeout_ms = 10000
//!
//! [[observers.order_paid.actions]]
//! type = "push"
//! provider = "apns"
//! token_field = "after.device_token"               # hex device token
//! title_template = "Order {{ after.id }} paid"
//! team_id = "TEAM123456"
//! key_id = "KEY1234567"
//! private_key_env = "APNS_KEY"                     # the .p8 PEM; or private_key_file
//! topic = "com.example.shop"                       # the app's bundle id
//! push_type = "alert"                              # "alert" (default) | "background"
//! priority = 10                                    # 10 (alert default), 5 (background default), 1
//! ttl_secs = 86400                                 # apns-expiration = send time + ttl
//!
//! [[observers.order_paid.actions]]
//! type = "push"
//! provider = "web_push"
//! subscription_field = "after.push_subscription"   # {endpoint, keys: {p256dh, auth}}
//! title_template = "Order {{ after.id }} paid"
//! vapid_private_key_env = "VAPID_PRIVATE_KEY"      # base64url P-256 scalar (32 bytes)
//! vapid_subject = "mailto:ops@example.com"
//! urgency = "normal"                               # very-low | low | normal | high
//! ttl_secs = 86400                                 # the TTL header
//! ```
//!
//! Invariants:
//!
//! * Where the message goes comes from the event: `token_field` (a dotted path into the
//!   template context, `after.device_token`) or `token_template` (text mode) for FCM and APNs;
//!   `subscription_field` or `subscription_template` (JSON mode) for Web Push, a subscription as
//!   the browser's `PushSubscription.toJSON()` gives it (an object, or a string holding one).
//!   Exactly one of each pair. An event without a recipient is a permanent error naming the path.
//! * What is sent: the rendered `title_template` and `body_template` (text mode) and the
//!   `data_template` (JSON mode, must render an object); at least one of the three. FCM sends
//!   `{"message": {"token", "notification": {"title", "body"}, "data"}}` with every data value as
//!   a string (strings as they are, other values as their JSON text, `null` left out); APNs sends
//!   `{"aps": {"alert": {"title", "body"}}, ...data}` (`background`: `{"aps":
//!   {"content-available": 1}, ...data}`, and no title or body); Web Push encrypts
//!   `{"title", "body", "data"}` (absent parts left out), at most 3993 bytes.
//! * Keys and credentials are read when the action is compiled, so that a missing or malformed
//!   one is a configuration error: `*_env` through the context's `env` lookup, `*_file` through
//!   its `read_file` (the caller reads the file system, not the action). They never appear in
//!   messages, logs or `Debug`.
//! * Access tokens are cached: the FCM OAuth2 token until five minutes before it expires, the
//!   APNs provider JWT for 50 minutes (Apple accepts them for an hour and refuses a new one more
//!   often than every 20 minutes). A 401 from FCM, or APNs's `ExpiredProviderToken`, drops the
//!   cached token and tries once more with a fresh one; a second refusal is permanent.
//! * Outcomes: a device token that is unregistered or invalid (FCM `UNREGISTERED`, an
//!   `INVALID_ARGUMENT` about the token; APNs 410, `BadDeviceToken`, `DeviceTokenNotForTopic`)
//!   and a Web Push subscription that is gone (404, 410) are [`ActionError::Gone`], with the end of
//!   the token in the message, so the user can remove it; 429 and 5xx are transient (honouring
//!   `Retry-After`); other refusals are permanent.
//! * Endpoints: `base_url` replaces the provider's (FCM `https://fcm.googleapis.com`, APNs
//!   `https://api.push.apple.com`); the FCM token endpoint is the service account's `token_uri`;
//!   a Web Push endpoint comes from the subscription and must be `https` unless
//!   `allow_private_networks` is set (for local push services and tests). Every request goes
//!   through the shared [`HttpClient`] and its SSRF guard; APNs requests are HTTP/2 only
//!   ([`SendOptions::http2_only`]: ALPN over https, prior knowledge over plain http).

mod apns;
mod fcm;
mod web_push;

use std::fmt;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64URL;
use base64::Engine;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::http::{HttpClient, SendOptions};
use super::{secret_from_env, timeout_setting, ActionError, CompileContext, DeliveryRequest};
use crate::error::ConfigError;
use crate::template::{context_json, EventContext, Template, TemplateMode, CONTEXT_NAMES};

use web_push::Subscription;

/// The push action as written in the configuration. Provider-specific keys are refused for the
/// other providers.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushConfig {
    pub provider: Option<String>,
    pub token_field: Option<String>,
    pub token_template: Option<String>,
    pub subscription_field: Option<String>,
    pub subscription_template: Option<String>,
    pub title_template: Option<String>,
    pub body_template: Option<String>,
    pub data_template: Option<String>,
    pub ttl_secs: Option<u64>,
    pub base_url: Option<String>,
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub allow_private_networks: bool,
    // FCM
    pub project_id: Option<String>,
    pub service_account_env: Option<String>,
    pub service_account_file: Option<String>,
    // APNs
    pub team_id: Option<String>,
    pub key_id: Option<String>,
    pub private_key_env: Option<String>,
    pub private_key_file: Option<String>,
    pub topic: Option<String>,
    pub push_type: Option<String>,
    pub priority: Option<u8>,
    // Web Push
    pub vapid_private_key_env: Option<String>,
    pub vapid_subject: Option<String>,
    pub urgency: Option<String>,
}

/// The providers, as `provider` names them.
pub const PROVIDERS: &[&str] = &["fcm", "apns", "web_push"];

/// Default `ttl_secs` (APNs expiration, Web Push TTL): one day.
const DEFAULT_TTL_SECS: u64 = 86_400;
/// The longest `ttl_secs`: 28 days (what push services keep at most).
const MAX_TTL_SECS: u64 = 28 * 86_400;

/// A compiled push action.
pub struct Push {
    http: HttpClient,
    provider: Provider,
    recipient: Recipient,
    title: Option<Template>,
    body: Option<Template>,
    data: Option<Template>,
    timeout: Duration,
}

enum Provider {
    Fcm(Box<fcm::Fcm>),
    Apns(apns::Apns),
    WebPush(web_push::WebPush),
}

impl fmt::Debug for Push {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let provider: &dyn fmt::Debug = match &self.provider {
            Provider::Fcm(p) => p,
            Provider::Apns(p) => p,
            Provider::WebPush(p) => p,
        };
        f.debug_struct("Push")
            .field("provider", provider)
            .field("recipient", &self.recipient)
            .field("title_template", &self.title.is_some())
            .field("body_template", &self.body.is_some())
            .field("data_template", &self.data.is_some())
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Where the device token or subscription is read from.
#[derive(Debug)]
enum Recipient {
    Field(FieldPath),
    Template(Template),
}

/// A dotted path into the template context (`after.device_token`), checked at compile time.
#[derive(Debug, Clone)]
struct FieldPath {
    source: String,
    parts: Vec<String>,
}

impl FieldPath {
    fn parse(source: &str) -> Result<FieldPath, String> {
        let parts: Vec<String> = source.trim().split('.').map(str::to_string).collect();
        if parts.iter().any(|p| p.trim().is_empty() || p.trim() != p) {
            return Err(format!(
                "'{source}' is not a dotted field path such as 'after.device_token'"
            ));
        }
        if !CONTEXT_NAMES.contains(&parts[0].as_str()) || parts.len() < 2 {
            return Err(format!(
                "'{source}' must start with one of {} and name a field ('after.device_token')",
                CONTEXT_NAMES.join(", ")
            ));
        }
        Ok(FieldPath {
            source: source.trim().to_string(),
            parts,
        })
    }

    /// The value at this path, if every step exists and the value is not null.
    fn lookup<'a>(&self, context: &'a Value) -> Option<&'a Value> {
        self.parts
            .iter()
            .try_fold(context, |value, part| value.get(part))
            .filter(|v| !v.is_null())
    }
}

/// The parts of a message, rendered for one event.
#[derive(Debug, Default)]
struct Content {
    title: Option<String>,
    body: Option<String>,
    data: Option<Map<String, Value>>,
}

/// Compile a push configuration. Pure; reports every error with its path; the key files named by
/// `service_account_file` / `private_key_file` are read through `ctx.read_file`.
pub fn compile(
    config: &PushConfig,
    path: &str,
    ctx: &CompileContext<'_>,
) -> Result<Push, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let at = |key: &str| format!("{path}.{key}");

    let provider_name = match config.provider.as_deref() {
        None => {
            errors.push(ConfigError::new(
                at("provider"),
                format!("missing; one of: {}", PROVIDERS.join(", ")),
            ));
            None
        }
        Some(p) if PROVIDERS.contains(&p) => Some(p),
        Some(other) => {
            errors.push(ConfigError::new(
                at("provider"),
                format!(
                    "unknown provider '{other}'; one of: {}",
                    PROVIDERS.join(", ")
                ),
            ));
            None
        }
    };

    if let Some(name) = provider_name {
        refuse_foreign_keys(config, name, path, &mut errors);
    }

    let recipient = match provider_name {
        Some("web_push") => recipient(
            ("subscription_field", config.subscription_field.as_deref()),
            (
                "subscription_template",
                config.subscription_template.as_deref(),
            ),
            TemplateMode::Json,
            path,
            &mut errors,
        ),
        Some(_) => recipient(
            ("token_field", config.token_field.as_deref()),
            ("token_template", config.token_template.as_deref()),
            TemplateMode::Text,
            path,
            &mut errors,
        ),
        None => None,
    };

    let mut template = |key: &str, source: Option<&str>, mode: TemplateMode| {
        source.and_then(|s| {
            Template::compile(s, mode)
                .map_err(|e| errors.push(ConfigError::new(at(key), e.to_string())))
                .ok()
        })
    };
    let title = template(
        "title_template",
        config.title_template.as_deref(),
        TemplateMode::Text,
    );
    let body = template(
        "body_template",
        config.body_template.as_deref(),
        TemplateMode::Text,
    );
    let data = template(
        "data_template",
        config.data_template.as_deref(),
        TemplateMode::Json,
    );
    if config.title_template.is_none()
        && config.body_template.is_none()
        && config.data_template.is_none()
    {
        errors.push(ConfigError::new(
            at("body_template"),
            "nothing to send; set title_template, body_template or data_template",
        ));
    }

    let ttl = match config.ttl_secs {
        None => Duration::from_secs(DEFAULT_TTL_SECS),
        Some(secs) if secs <= MAX_TTL_SECS => Duration::from_secs(secs),
        Some(secs) => {
            errors.push(ConfigError::new(
                at("ttl_secs"),
                format!("must be at most {MAX_TTL_SECS} (28 days), not {secs}"),
            ));
            Duration::from_secs(DEFAULT_TTL_SECS)
        }
    };
    let timeout = timeout_setting(config.timeout_ms, path, &mut errors);

    let provider = match provider_name {
        Some("fcm") => {
            fcm::compile(config, path, ctx, &mut errors).map(|f| Provider::Fcm(Box::new(f)))
        }
        Some("apns") => apns::compile(config, ttl, path, ctx, &mut errors).map(Provider::Apns),
        Some("web_push") => {
            web_push::compile(config, ttl, path, ctx.env, &mut errors).map(Provider::WebPush)
        }
        _ => None,
    };

    match (errors.is_empty(), provider, recipient) {
        (true, Some(provider), Some(recipient)) => Ok(Push {
            http: ctx.http.clone(),
            provider,
            recipient,
            title,
            body,
            data,
            timeout,
        }),
        _ => Err(errors),
    }
}

/// Keys that belong to one provider only.
fn refuse_foreign_keys(
    config: &PushConfig,
    provider: &str,
    path: &str,
    errors: &mut Vec<ConfigError>,
) {
    const FCM_APNS: &[&str] = &["fcm", "apns"];
    const APNS_WEB: &[&str] = &["apns", "web_push"];
    const FCM: &[&str] = &["fcm"];
    const APNS: &[&str] = &["apns"];
    const WEB: &[&str] = &["web_push"];
    let keys: [(&str, bool, &[&str]); 19] = [
        ("token_field", config.token_field.is_some(), FCM_APNS),
        ("token_template", config.token_template.is_some(), FCM_APNS),
        (
            "subscription_field",
            config.subscription_field.is_some(),
            WEB,
        ),
        (
            "subscription_template",
            config.subscription_template.is_some(),
            WEB,
        ),
        ("base_url", config.base_url.is_some(), FCM_APNS),
        ("ttl_secs", config.ttl_secs.is_some(), APNS_WEB),
        ("project_id", config.project_id.is_some(), FCM),
        (
            "service_account_env",
            config.service_account_env.is_some(),
            FCM,
        ),
        (
            "service_account_file",
            config.service_account_file.is_some(),
            FCM,
        ),
        ("team_id", config.team_id.is_some(), APNS),
        ("key_id", config.key_id.is_some(), APNS),
        ("private_key_env", config.private_key_env.is_some(), APNS),
        ("private_key_file", config.private_key_file.is_some(), APNS),
        ("topic", config.topic.is_some(), APNS),
        ("push_type", config.push_type.is_some(), APNS),
        ("priority", config.priority.is_some(), APNS),
        (
            "vapid_private_key_env",
            config.vapid_private_key_env.is_some(),
            WEB,
        ),
        ("vapid_subject", config.vapid_subject.is_some(), WEB),
        ("urgency", config.urgency.is_some(), WEB),
    ];
    for (key, set, providers) in keys {
        if set && !providers.contains(&provider) {
            errors.push(ConfigError::new(
                format!("{path}.{key}"),
                format!(
                    "does not apply to provider '{provider}' (only to {})",
                    providers.join(", ")
                ),
            ));
        }
    }
}

/// A `*_field` / `*_template` pair: exactly one.
fn recipient(
    (field_key, field): (&str, Option<&str>),
    (template_key, template): (&str, Option<&str>),
    mode: TemplateMode,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<Recipient> {
    match (field, template) {
        (None, None) => {
            errors.push(ConfigError::new(
                format!("{path}.{field_key}"),
                format!("missing; set '{field_key}' or '{template_key}'"),
            ));
            None
        }
        (Some(_), Some(_)) => {
            errors.push(ConfigError::new(
                format!("{path}.{field_key}"),
                format!("set either '{field_key}' or '{template_key}', not both"),
            ));
            None
        }
        (Some(field), None) => FieldPath::parse(field)
            .map(Recipient::Field)
            .map_err(|e| errors.push(ConfigError::new(format!("{path}.{field_key}"), e)))
            .ok(),
        (None, Some(source)) => Template::compile(source, mode)
            .map(Recipient::Template)
            .map_err(|e| {
                errors.push(ConfigError::new(
                    format!("{path}.{template_key}"),
                    e.to_string(),
                ))
            })
            .ok(),
    }
}

/// A secret given either inline through an environment variable or as a file path.
pub(super) struct SecretSource<'a> {
    pub env_key: &'a str,
    pub env_value: Option<&'a str>,
    pub file_key: &'a str,
    pub file_value: Option<&'a str>,
}

/// Read a `*_env` / `*_file` secret: exactly one must be set. Errors name the variable or the
/// file, never the content.
pub(super) fn read_secret(
    source: SecretSource<'_>,
    path: &str,
    ctx: &CompileContext<'_>,
    errors: &mut Vec<ConfigError>,
) -> Option<(String, String)> {
    let env_path = format!("{path}.{}", source.env_key);
    let file_path = format!("{path}.{}", source.file_key);
    match (source.env_value, source.file_value) {
        (None, None) => {
            errors.push(ConfigError::new(
                env_path,
                format!("missing; set '{}' or '{}'", source.env_key, source.file_key),
            ));
            None
        }
        (Some(_), Some(_)) => {
            errors.push(ConfigError::new(
                env_path,
                format!(
                    "set either '{}' or '{}', not both",
                    source.env_key, source.file_key
                ),
            ));
            None
        }
        (Some(var), None) => {
            secret_from_env(var, &env_path, ctx.env, errors).map(|value| (value, env_path))
        }
        (None, Some(file)) => match (ctx.read_file)(file) {
            Ok(value) if !value.trim().is_empty() => Some((value, file_path)),
            Ok(_) => {
                errors.push(ConfigError::new(
                    file_path,
                    format!("the file '{file}' is empty"),
                ));
                None
            }
            Err(e) => {
                errors.push(ConfigError::new(
                    file_path,
                    format!("cannot read '{file}': {e}"),
                ));
                None
            }
        },
    }
}

/// A required non-empty string setting.
pub(super) fn required<'a>(
    value: Option<&'a str>,
    key: &str,
    hint: &str,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<&'a str> {
    match value.map(str::trim) {
        Some(v) if !v.is_empty() => Some(v),
        Some(_) => {
            errors.push(ConfigError::new(
                format!("{path}.{key}"),
                "must not be empty",
            ));
            None
        }
        None => {
            errors.push(ConfigError::new(
                format!("{path}.{key}"),
                format!("missing; {hint}"),
            ));
            None
        }
    }
}

impl Push {
    /// The provider (`fcm`, `apns`, `web_push`): web push sends to each subscriber's own
    /// service, so the provider is the unit of flow control.
    pub(crate) fn endpoint(&self) -> String {
        match &self.provider {
            Provider::Fcm(_) => "fcm",
            Provider::Apns(_) => "apns",
            Provider::WebPush(_) => "web_push",
        }
        .to_string()
    }

    /// Send the notification once. `Ok` only when the provider accepted it.
    pub async fn execute(&self, request: &DeliveryRequest<'_>) -> Result<(), ActionError> {
        let http = &self.http;
        let provider = match &self.provider {
            Provider::Fcm(_) => "fcm",
            Provider::Apns(_) => "apns",
            Provider::WebPush(_) => "web_push",
        };
        let context_label = format!("push ({provider})");
        let context = EventContext::new(request.event);
        let content = self
            .content(&context)
            .map_err(|e| e.context(&context_label))?;
        let outcome = match &self.provider {
            Provider::Fcm(fcm) => {
                let token = self.token(request, &context)?;
                fcm.send(http, &token, &content, self.timeout).await
            }
            Provider::Apns(apns) => {
                let token = self.token(request, &context)?;
                apns.send(http, &token, &content, request.delivery_id, self.timeout)
                    .await
            }
            Provider::WebPush(web_push) => {
                let subscription = self
                    .subscription(request, &context)
                    .map_err(|e| e.context(&context_label))?;
                web_push
                    .send(http, &subscription, &content, self.timeout)
                    .await
            }
        }
        .map_err(|e| e.context(&context_label));
        tracing::debug!(
            action = "push",
            provider,
            delivery_id = request.delivery_id,
            attempt = request.attempt,
            ok = outcome.is_ok(),
            "push notification sent"
        );
        outcome
    }

    fn content(&self, context: &EventContext) -> Result<Content, ActionError> {
        let text = |template: &Option<Template>, key: &str| {
            template
                .as_ref()
                .map(|t| {
                    t.render_context(context).map_err(|e| {
                        ActionError::permanent(format!("{key} cannot render this event: {e}"))
                    })
                })
                .transpose()
        };
        let title = text(&self.title, "title_template")?;
        let body = text(&self.body, "body_template")?;
        let data = match &self.data {
            None => None,
            Some(template) => {
                let rendered = template.render_context(context).map_err(|e| {
                    ActionError::permanent(format!("data_template cannot render this event: {e}"))
                })?;
                match serde_json::from_str::<Value>(&rendered) {
                    Ok(Value::Object(map)) => Some(map),
                    _ => {
                        return Err(ActionError::permanent(
                            "data_template must render a JSON object",
                        ))
                    }
                }
            }
        };
        Ok(Content { title, body, data })
    }

    /// The device token (FCM, APNs).
    fn token(
        &self,
        request: &DeliveryRequest<'_>,
        context: &EventContext,
    ) -> Result<String, ActionError> {
        let token = match &self.recipient {
            Recipient::Field(field) => {
                let context = context_json(request.event);
                match field.lookup(&context) {
                    Some(Value::String(s)) => s.trim().to_string(),
                    Some(_) => {
                        return Err(ActionError::permanent(format!(
                            "{} is not a string",
                            field.source
                        )))
                    }
                    None => String::new(),
                }
            }
            Recipient::Template(t) => t
                .render_context(context)
                .map_err(|e| {
                    ActionError::permanent(format!("token_template cannot render this event: {e}"))
                })?
                .trim()
                .to_string(),
        };
        if token.is_empty() {
            let from = match &self.recipient {
                Recipient::Field(f) => f.source.clone(),
                Recipient::Template(_) => "token_template".into(),
            };
            return Err(ActionError::permanent(format!(
                "the event has no device token ({from} is empty or absent)"
            )));
        }
        Ok(token)
    }

    /// The Web Push subscription.
    fn subscription(
        &self,
        request: &DeliveryRequest<'_>,
        context: &EventContext,
    ) -> Result<Subscription, ActionError> {
        let (value, from) = match &self.recipient {
            Recipient::Field(field) => {
                let context = context_json(request.event);
                (field.lookup(&context).cloned(), field.source.clone())
            }
            Recipient::Template(t) => {
                let rendered = t.render_context(context).map_err(|e| {
                    ActionError::permanent(format!(
                        "subscription_template cannot render this event: {e}"
                    ))
                })?;
                (
                    serde_json::from_str::<Value>(&rendered)
                        .ok()
                        .filter(|v| !v.is_null()),
                    "subscription_template".to_string(),
                )
            }
        };
        let value = value.ok_or_else(|| {
            ActionError::permanent(format!(
                "the event has no push subscription ({from} is empty or absent)"
            ))
        })?;
        Subscription::from_json(&value).map_err(|e| ActionError::permanent(format!("{from}: {e}")))
    }
}

/// The last characters of a device token, to name it in messages without repeating it.
fn token_hint(token: &str) -> String {
    let chars: Vec<char> = token.chars().collect();
    let tail: String = chars[chars.len().saturating_sub(8)..].iter().collect();
    format!("...{tail}")
}

/// `header.claims.signature`, each part base64url without padding (RFC 7515 compact form).
fn jwt(
    header: &Value,
    claims: &Value,
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, String>,
) -> Result<String, String> {
    let signing_input = format!(
        "{}.{}",
        BASE64URL.encode(header.to_string()),
        BASE64URL.encode(claims.to_string())
    );
    let signature = sign(signing_input.as_bytes())?;
    Ok(format!("{signing_input}.{}", BASE64URL.encode(signature)))
}

/// Options for requests that read a JSON error body.
fn reading_body() -> SendOptions {
    SendOptions {
        body_limit: Some(64 * 1024),
        ..SendOptions::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `rand` 0.9 behind the `rand_core` 0.10 traits the `rsa` crate takes.
    struct TestRng;

    impl rsa::rand_core::TryRng for TestRng {
        type Error = std::convert::Infallible;
        fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
            Ok(rand::random())
        }
        fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
            Ok(rand::random())
        }
        fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
            rand::fill(dst);
            Ok(())
        }
    }

    impl rsa::rand_core::TryCryptoRng for TestRng {}

    fn pem(label: &str, der: &[u8]) -> String {
        use base64::engine::general_purpose::STANDARD;
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            STANDARD.encode(der)
        )
    }

    #[test]
    fn doc_examples_compile() {
        use p256::pkcs8::EncodePrivateKey;
        let file: toml::Table =
            toml::from_str(&crate::config::doc_toml(include_str!("mod.rs"))).unwrap();
        let actions = file["observers"]["order_paid"]["actions"]
            .as_array()
            .unwrap();
        assert_eq!(actions.len(), 3);

        let rsa_key = rsa::PrivateKey::new(&mut TestRng, 2048).unwrap();
        let account = serde_json::json!({
            "type": "service_account",
            "project_id": "shop-prod",
            "private_key_id": "k1",
            "private_key": pem("PRIVATE KEY", rsa_key.to_pkcs8_der().unwrap().as_bytes()),
            "client_email": "observers@shop-prod.iam.gserviceaccount.com",
            "token_uri": "https://oauth2.googleapis.com/token",
        })
        .to_string();
        let apns_key = p256::SecretKey::from_slice(&[7; 32])
            .unwrap()
            .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
            .unwrap()
            .to_string();
        let env = |name: &str| match name {
            "FCM_SERVICE_ACCOUNT" => Some(account.clone()),
            "APNS_KEY" => Some(apns_key.clone()),
            "VAPID_PRIVATE_KEY" => Some(BASE64URL.encode([9u8; 32])),
            _ => None,
        };
        for (i, action) in actions.iter().enumerate() {
            let path = format!("observers.order_paid.actions[{i}]");
            let config =
                match crate::actions::ActionConfig::parse(action.as_table().unwrap(), &path)
                    .unwrap()
                    .settings
                {
                    crate::actions::Settings::Push(c) => c,
                    other => panic!("{other:?}"),
                };
            let push = compile(&config, &path, &CompileContext::new(&env)).unwrap();
            let debug = format!("{push:?}");
            assert!(!debug.contains("PRIVATE KEY"), "{debug}");
            match (&push.provider, i) {
                (Provider::Fcm(fcm), 0) => assert!(format!("{fcm:?}").contains("shop-prod")),
                (Provider::Apns(_), 1) | (Provider::WebPush(_), 2) => {}
                (_, i) => panic!("example {i}: {debug}"),
            }
        }
    }

    #[test]
    fn field_paths() {
        let p = FieldPath::parse("after.device.token").unwrap();
        let ctx = serde_json::json!({"after": {"device": {"token": "abc"}}});
        assert_eq!(p.lookup(&ctx), Some(&serde_json::json!("abc")));
        assert_eq!(
            FieldPath::parse("after.nope").unwrap().lookup(&ctx),
            None,
            "absent"
        );
        assert!(FieldPath::parse("device_token").is_err());
        assert!(FieldPath::parse("after").is_err());
        assert!(FieldPath::parse("after..x").is_err());
        assert!(FieldPath::parse("row.x").is_err());
    }

    #[test]
    fn token_hint_shows_only_the_end() {
        assert_eq!(token_hint("0123456789abcdef"), "...89abcdef");
        assert_eq!(token_hint("abc"), "...abc");
    }

    #[test]
    fn jwt_has_three_base64url_parts() {
        let token = jwt(
            &serde_json::json!({"alg": "none"}),
            &serde_json::json!({"a": 1}),
            |input| Ok(input.to_vec()),
        )
        .unwrap();
        let parts: Vec<_> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(BASE64URL.decode(parts[1]).unwrap(), br#"{"a":1}"#);
        assert_eq!(
            BASE64URL.decode(parts[2]).unwrap(),
            format!("{}.{}", parts[0], parts[1]).as_bytes()
        );
    }

    #[test]
    fn compile_reports_every_error() {
        let config = PushConfig {
            provider: Some("fcm".into()),
            team_id: Some("T".into()),
            subscription_field: Some("after.sub".into()),
            ttl_secs: Some(1),
            ..Default::default()
        };
        let no_env = |_: &str| None;
        let ctx = CompileContext::new(&no_env);
        let errors = compile(&config, "p", &ctx).unwrap_err();
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "p.subscription_field",
                "p.ttl_secs",
                "p.team_id",
                "p.token_field",
                "p.body_template",
                "p.service_account_env"
            ],
            "{errors:#?}"
        );
        let errors = compile(
            &PushConfig {
                provider: Some("pigeon".into()),
                ..Default::default()
            },
            "p",
            &ctx,
        )
        .unwrap_err();
        assert_eq!(errors[0].path, "p.provider");
        assert!(
            errors[0].message.contains("fcm, apns, web_push"),
            "{errors:?}"
        );
        let errors = compile(&PushConfig::default(), "p", &ctx).unwrap_err();
        assert_eq!(errors[0].path, "p.provider");
    }
}
