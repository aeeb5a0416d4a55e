//! The Slack action: a message posted to an incoming webhook.
//!
//! ```toml
//! [[observers.order_paid.actions]]
//! type = "slack"
//! webhook_url_env = "SLACK_ORDERS_URL"       # the incoming-webhook URL is a secret
//! channel = "#orders"                        # optional override
//! message_template = "Order {{ after.id }} paid: {{ after.total }} EUR"   # values escaped
//! username = "orders-bot"                    # optional
//! icon_emoji = ":moneybag:"                  # optional
//! timeout_ms = 10000                         # default 10 s
//! allow_private_networks = false
//! ```
//!
//! Invariants:
//!
//! * The URL comes from `webhook_url_env` (preferred: it is a secret) or `webhook_url` (for
//!   local receivers and tests; it then sits in the configuration file, so protect the file).
//!   Exactly one of them. Either way it is treated as a secret: messages and logs show only its
//!   scheme and host.
//! * The request is `POST` of `{"text", "channel"?, "username"?, "icon_emoji"?}` as JSON; the
//!   text is the rendered `message_template` (default: `"<entity_type> <entity_id> <kind>"`).
//! * Event data cannot format the message: every value `message_template` prints has `&`, `<`
//!   and `>` escaped as Slack's docs ask (`&amp;`, `&lt;`, `&gt;`), so a value such as
//!   `<!channel>` or `<https://evil|invoice>` is shown as text, never a mention or a link. The
//!   template's own literal text is Slack markup (`<{{ after.url }}|open>` is a link whose target
//!   is escaped); `{{ value | safe }}` prints a value known to be Slack markup as it is.
//! * Outcomes: 2xx ok; 404 `no_service`/`no_team` (the webhook was removed) and any 410 gone;
//!   other 4xx (`invalid_payload`, 404 `channel_not_found`, 403 `action_prohibited`...)
//!   permanent; 429 and 5xx transient (see [`super::http::classify`]). Slack's short error code
//!   is kept in the message.

use std::fmt;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Map};

use super::http::{classify, HttpClient, HttpRequest, HttpResponse, Target};
use super::{
    resolve_url, timeout_setting, ActionError, CompileContext, DeliveryRequest, UrlSetting,
};
use crate::error::ConfigError;
use crate::template::{Template, TemplateMode};

/// Slack's 404 answers that mean the incoming webhook itself no longer exists.
const GONE_CODES: &[&str] = &["no_service", "no_team", ""];

const DEFAULT_MESSAGE: &str = "{{ event.entity_type }} {{ event.entity_id }} {{ event.kind }}";

/// The Slack action as written in the configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackConfig {
    pub webhook_url: Option<String>,
    pub webhook_url_env: Option<String>,
    pub channel: Option<String>,
    pub message_template: Option<String>,
    pub username: Option<String>,
    pub icon_emoji: Option<String>,
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub allow_private_networks: bool,
}

/// A compiled Slack action.
pub struct Slack {
    http: HttpClient,
    target: Target,
    message: Template,
    /// The fixed part of the payload (`channel`, `username`, `icon_emoji`).
    fixed: Map<String, serde_json::Value>,
    timeout: Duration,
}

impl fmt::Debug for Slack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slack")
            .field("target", &self.target)
            .field("fixed", &self.fixed)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Compile a Slack configuration. Pure; reports every error with its path.
pub fn compile(
    config: &SlackConfig,
    path: &str,
    ctx: &CompileContext<'_>,
) -> Result<Slack, Vec<ConfigError>> {
    let mut errors = Vec::new();

    // Checked here rather than in `resolve_url` so that a missing URL is reported under the
    // preferred key, `webhook_url_env`.
    let target = match (&config.webhook_url, &config.webhook_url_env) {
        (None, None) => {
            errors.push(ConfigError::new(
                format!("{path}.webhook_url_env"),
                "missing; set 'webhook_url_env' (or 'webhook_url' for a local receiver)",
            ));
            None
        }
        _ => resolve_url(
            UrlSetting {
                key: "webhook_url",
                value: config.webhook_url.as_deref(),
                env_key: "webhook_url_env",
                env_value: config.webhook_url_env.as_deref(),
            },
            true,
            path,
            ctx.env,
            &mut errors,
        ),
    }
    .and_then(|(url, _)| {
        let key = if config.webhook_url.is_some() {
            "webhook_url"
        } else {
            "webhook_url_env"
        };
        Target::parse(&url, true, config.allow_private_networks)
            .map_err(|e| errors.push(ConfigError::new(format!("{path}.{key}"), e)))
            .ok()
    });

    let source = config
        .message_template
        .as_deref()
        .unwrap_or(DEFAULT_MESSAGE);
    let message = Template::compile(source, TemplateMode::Slack)
        .map_err(|e| {
            errors.push(ConfigError::new(
                format!("{path}.message_template"),
                e.to_string(),
            ))
        })
        .ok();

    let mut fixed = Map::new();
    for (key, value) in [
        ("channel", &config.channel),
        ("username", &config.username),
        ("icon_emoji", &config.icon_emoji),
    ] {
        match value.as_deref().map(str::trim) {
            None => {}
            Some("") => errors.push(ConfigError::new(
                format!("{path}.{key}"),
                "must not be empty (leave it out instead)",
            )),
            Some(v) => {
                fixed.insert(key.to_string(), json!(v));
            }
        }
    }

    let timeout = timeout_setting(config.timeout_ms, path, &mut errors);

    match (errors.is_empty(), target, message) {
        (true, Some(target), Some(message)) => Ok(Slack {
            http: ctx.http.clone(),
            target,
            message,
            fixed,
            timeout,
        }),
        _ => Err(errors),
    }
}

impl Slack {
    pub(crate) fn endpoint(&self) -> String {
        self.target.endpoint()
    }

    /// Post the message once. `Ok` only on a 2xx answer.
    pub async fn execute(&self, request: &DeliveryRequest<'_>) -> Result<(), ActionError> {
        let context = format!("slack {}", self.target.shown());
        let text = self.message.render(request.event).map_err(|e| {
            ActionError::permanent(format!(
                "{context}: the message template cannot render this event: {e}"
            ))
        })?;
        let mut payload = self.fixed.clone();
        payload.insert("text".into(), json!(text));
        let body = serde_json::to_vec(&payload)
            .map_err(|e| ActionError::permanent(format!("{context}: {e}")))?;
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let response = self
            .http
            .send(HttpRequest {
                method: Method::POST,
                target: &self.target,
                headers,
                body,
                timeout: self.timeout,
            })
            .await
            .map_err(|e| e.context(&context))?;
        let outcome = outcome(&response).map_err(|e| e.context(&context));
        tracing::debug!(
            action = "slack",
            delivery_id = request.delivery_id,
            attempt = request.attempt,
            target_url = %self.target.shown(),
            status = response.status.as_u16(),
            ok = outcome.is_ok(),
            "slack message posted"
        );
        outcome
    }
}

/// Slack's answers: the general rules, except that 404 means the webhook is gone, and that the
/// body (a short error code such as `channel_not_found`) is worth keeping in the message.
fn outcome(response: &HttpResponse) -> Result<(), ActionError> {
    let code = response.body_snippet(100);
    let with_code = |e: ActionError| e.detail(&code);
    // `no_service` (or `no_team`, or no body at all): the webhook itself was removed. Other 404
    // codes (`channel_not_found`, `user_not_found`) are about this message's channel: permanent.
    if response.status == StatusCode::NOT_FOUND && GONE_CODES.contains(&code.as_str()) {
        return Err(with_code(ActionError::gone(
            "the receiver answered 404 Not Found: the incoming webhook no longer exists",
        )));
    }
    classify(response.status, &response.headers).map_err(with_code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doc_example_compiles() {
        let table = crate::actions::tests::doc_example(include_str!("slack.rs"));
        let config = match crate::actions::ActionConfig::parse(&table, "p")
            .unwrap()
            .settings
        {
            crate::actions::Settings::Slack(c) => c,
            other => panic!("{other:?}"),
        };
        let env = |k: &str| {
            (k == "SLACK_ORDERS_URL").then(|| "https://hooks.slack.com/services/T/B/X".to_string())
        };
        let slack = compile(&config, "p", &CompileContext::new(&env)).unwrap();
        assert_eq!(slack.fixed["channel"], "#orders");
        assert_eq!(slack.fixed["username"], "orders-bot");
        assert_eq!(slack.target.shown(), "https://hooks.slack.com");
    }

    #[test]
    fn missing_url_is_reported_under_the_env_key() {
        let no_env = |_: &str| None;
        let ctx = CompileContext::new(&no_env);
        let errors = compile(&SlackConfig::default(), "p", &ctx).unwrap_err();
        assert_eq!(errors[0].path, "p.webhook_url_env");
        let errors = compile(
            &SlackConfig {
                webhook_url_env: Some("NOPE".into()),
                channel: Some(" ".into()),
                message_template: Some("{{ after.x".into()),
                ..Default::default()
            },
            "p",
            &ctx,
        )
        .unwrap_err();
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["p.webhook_url_env", "p.message_template", "p.channel"]
        );
    }
}
