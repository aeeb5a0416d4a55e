//! The SMS action: a text message sent through a provider's HTTP API (Twilio).
//!
//! ```toml
//! [[observers.order_paid.actions]]
//! type = "sms"
//! provider = "twilio"                        # the default, and the only provider so far
//! account_sid_env = "TWILIO_ACCOUNT_SID"
//! auth_token_env = "TWILIO_AUTH_TOKEN"
//! from = "+15005550006"                      # or messaging_service_sid = "MG..."
//! to_template = "{{ after.phone }}"          # or to = "+33612345678"
//! message_template = "Order {{ after.id }} is paid: {{ after.total }} EUR"
//! base_url = "https://api.twilio.com"        # the default; for tests and regional edges
//! timeout_ms = 10000                         # default 10 s
//! allow_private_networks = false
//! ```
//!
//! Invariants:
//!
//! * Twilio: `POST {base_url}/2010-04-01/Accounts/{AccountSid}/Messages.json`, HTTP Basic auth
//!   `AccountSid:AuthToken` (both from the environment, never from the file), form-encoded
//!   `To`, `From` or `MessagingServiceSid` (exactly one), `Body`. Nothing else is sent.
//! * One recipient per action and event: `to` (fixed) or `to_template` (rendered; surrounding
//!   whitespace trimmed). A rendered recipient that is empty or holds control characters, and a
//!   message that renders empty, are permanent errors; nothing is sent.
//! * Outcomes (Twilio's documented error codes, in the JSON body `{"code", "message",
//!   "status"}`): 2xx ok; 429, 5xx and code 20429 (too many requests) transient, honouring
//!   `Retry-After`; 21211 and 21614 (invalid or non-mobile `To`), 21610 (the recipient replied
//!   STOP) and 20003 (authentication) permanent. 21610 is permanent, not gone: "gone" stops the
//!   whole action, while an unsubscribed number concerns one recipient only. Other answers follow
//!   [`super::http::classify`]. Twilio's code and message are kept in the error message.
//! * Messages show the provider and the base URL's host, never the account SID, the token, the
//!   recipient or the text. Retrying after a lost answer may send the SMS twice (Twilio's
//!   Messages API takes no idempotency key).
//! * Twilio is the only provider (`provider` accepts `"twilio"` and nothing else): a second one
//!   would make [`Twilio`] one of a choice, with its settings, its request and its error mapping.

use std::fmt;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::Method;
use serde::Deserialize;

use super::http::{classify, HttpClient, HttpRequest, HttpResponse, Target};
use super::{secret_from_env, timeout_setting, ActionError, CompileContext, DeliveryRequest};
use crate::error::ConfigError;
use crate::template::{EventContext, Template, TemplateMode};

/// Twilio's production API.
pub const TWILIO_BASE_URL: &str = "https://api.twilio.com";

/// The providers this version can send through.
const PROVIDERS: &[&str] = &["twilio"];

/// The SMS action as written in the configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmsConfig {
    pub provider: Option<String>,
    pub account_sid_env: Option<String>,
    pub auth_token_env: Option<String>,
    pub from: Option<String>,
    pub messaging_service_sid: Option<String>,
    pub to: Option<String>,
    pub to_template: Option<String>,
    pub message_template: Option<String>,
    pub base_url: Option<String>,
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub allow_private_networks: bool,
}

/// Twilio's Messages API.
pub struct Twilio {
    target: Target,
    /// `Basic base64(AccountSid:AuthToken)`.
    authorization: HeaderValue,
    sender: TwilioSender,
}

#[derive(Debug)]
enum TwilioSender {
    From(String),
    MessagingService(String),
}

impl fmt::Debug for Twilio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Twilio")
            .field("target", &self.target)
            .field("sender", &self.sender)
            .finish_non_exhaustive()
    }
}

enum Recipient {
    Fixed(String),
    Template(Template),
}

/// A compiled SMS action.
pub struct Sms {
    http: HttpClient,
    twilio: Twilio,
    to: Recipient,
    message: Template,
    timeout: Duration,
}

impl fmt::Debug for Sms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sms")
            .field("twilio", &self.twilio)
            .field("to_template", &matches!(self.to, Recipient::Template(_)))
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Compile an SMS configuration. Pure; reports every error with its path.
pub fn compile(
    config: &SmsConfig,
    path: &str,
    ctx: &CompileContext<'_>,
) -> Result<Sms, Vec<ConfigError>> {
    let mut errors = Vec::new();

    let twilio = match config.provider.as_deref() {
        None | Some("twilio") => compile_twilio(config, path, ctx.env, &mut errors),
        Some(other) => {
            errors.push(ConfigError::new(
                format!("{path}.provider"),
                format!(
                    "unknown SMS provider '{other}'; known providers: {}",
                    PROVIDERS.join(", ")
                ),
            ));
            None
        }
    };

    let to = match (&config.to, &config.to_template) {
        (None, None) => {
            errors.push(ConfigError::new(
                format!("{path}.to"),
                "missing; set 'to' (a fixed number) or 'to_template' (the number from the event)",
            ));
            None
        }
        (Some(_), Some(_)) => {
            errors.push(ConfigError::new(
                format!("{path}.to"),
                "set either 'to' or 'to_template', not both",
            ));
            None
        }
        (Some(to), None) => match check_recipient(to) {
            Ok(to) => Some(Recipient::Fixed(to)),
            Err(e) => {
                errors.push(ConfigError::new(format!("{path}.to"), e));
                None
            }
        },
        (None, Some(source)) => Template::compile(source, TemplateMode::Text)
            .map_err(|e| {
                errors.push(ConfigError::new(
                    format!("{path}.to_template"),
                    e.to_string(),
                ))
            })
            .ok()
            .map(Recipient::Template),
    };

    let message = match &config.message_template {
        None => {
            errors.push(ConfigError::new(
                format!("{path}.message_template"),
                "missing; the text of the message",
            ));
            None
        }
        Some(source) => Template::compile(source, TemplateMode::Text)
            .map_err(|e| {
                errors.push(ConfigError::new(
                    format!("{path}.message_template"),
                    e.to_string(),
                ))
            })
            .ok(),
    };

    let timeout = timeout_setting(config.timeout_ms, path, &mut errors);

    match (errors.is_empty(), twilio, to, message) {
        (true, Some(twilio), Some(to), Some(message)) => Ok(Sms {
            http: ctx.http.clone(),
            twilio,
            to,
            message,
            timeout,
        }),
        _ => Err(errors),
    }
}

fn compile_twilio(
    config: &SmsConfig,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<ConfigError>,
) -> Option<Twilio> {
    let secret =
        |key: &str, var: &Option<String>, what: &str, errors: &mut Vec<ConfigError>| match var {
            None => {
                errors.push(ConfigError::new(
                    format!("{path}.{key}"),
                    format!("missing; the environment variable that holds the Twilio {what}"),
                ));
                None
            }
            Some(var) => secret_from_env(var, &format!("{path}.{key}"), env, errors),
        };
    let account_sid = secret(
        "account_sid_env",
        &config.account_sid_env,
        "Account SID",
        errors,
    )
    .and_then(|sid| {
        let sid = sid.trim().to_string();
        if sid.chars().all(|c| c.is_ascii_alphanumeric()) {
            Some(sid)
        } else {
            errors.push(ConfigError::new(
                format!("{path}.account_sid_env"),
                "the Account SID must be letters and digits only (AC...)",
            ));
            None
        }
    });
    let auth_token = secret(
        "auth_token_env",
        &config.auth_token_env,
        "Auth Token",
        errors,
    );

    let sender = match (&config.from, &config.messaging_service_sid) {
        (None, None) => {
            errors.push(ConfigError::new(
                format!("{path}.from"),
                "missing; set 'from' (a Twilio number) or 'messaging_service_sid'",
            ));
            None
        }
        (Some(_), Some(_)) => {
            errors.push(ConfigError::new(
                format!("{path}.from"),
                "set either 'from' or 'messaging_service_sid', not both",
            ));
            None
        }
        (Some(from), None) => match check_recipient(from) {
            Ok(from) => Some(TwilioSender::From(from)),
            Err(e) => {
                errors.push(ConfigError::new(format!("{path}.from"), e));
                None
            }
        },
        (None, Some(sid)) => {
            let sid = sid.trim();
            if !sid.is_empty() && sid.chars().all(|c| c.is_ascii_alphanumeric()) {
                Some(TwilioSender::MessagingService(sid.to_string()))
            } else {
                errors.push(ConfigError::new(
                    format!("{path}.messaging_service_sid"),
                    "must be letters and digits only (MG...)",
                ));
                None
            }
        }
    };

    let base = config
        .base_url
        .as_deref()
        .unwrap_or(TWILIO_BASE_URL)
        .trim_end_matches('/');
    let target = account_sid.as_ref().and_then(|sid| {
        let url = format!("{base}/2010-04-01/Accounts/{sid}/Messages.json");
        // Secret form: messages show scheme and host only, never the account SID in the path.
        Target::parse(&url, true, config.allow_private_networks)
            .map_err(|e| errors.push(ConfigError::new(format!("{path}.base_url"), e)))
            .ok()
    });
    if account_sid.is_none() && config.base_url.is_some() {
        // Still check the base URL on its own so that its mistakes are reported too.
        if let Err(e) = Target::parse(base, true, config.allow_private_networks) {
            errors.push(ConfigError::new(format!("{path}.base_url"), e));
        }
    }

    let authorization = match (&account_sid, &auth_token) {
        (Some(sid), Some(token)) => {
            let mut value = HeaderValue::from_str(&format!(
                "Basic {}",
                BASE64.encode(format!("{sid}:{token}"))
            ))
            .expect("base64 is a valid header value");
            value.set_sensitive(true);
            Some(value)
        }
        _ => None,
    };

    Some(Twilio {
        target: target?,
        authorization: authorization?,
        sender: sender?,
    })
}

/// A phone number or channel address (`+33612345678`, `whatsapp:+33612345678`), trimmed.
fn check_recipient(raw: &str) -> Result<String, String> {
    let value = raw.trim();
    if value.is_empty() {
        return Err("is empty".into());
    }
    if value.chars().any(char::is_control) {
        return Err("contains a line break or another control character".into());
    }
    Ok(value.to_string())
}

impl Sms {
    pub(crate) fn endpoint(&self) -> String {
        self.twilio.target.endpoint()
    }

    /// Send the message once. `Ok` only when the provider accepted it.
    pub async fn execute(&self, request: &DeliveryRequest<'_>) -> Result<(), ActionError> {
        let context = format!("sms twilio {}", self.twilio.target.shown());
        let ctx = EventContext::new(request.event);
        let to = match &self.to {
            Recipient::Fixed(to) => to.clone(),
            Recipient::Template(t) => {
                let rendered = t.render_context(&ctx).map_err(|e| {
                    ActionError::permanent(format!(
                        "{context}: to_template cannot render this event: {e}"
                    ))
                })?;
                check_recipient(&rendered).map_err(|e| {
                    ActionError::permanent(format!(
                        "{context}: the recipient rendered by to_template {e}"
                    ))
                })?
            }
        };
        let body = self.message.render_context(&ctx).map_err(|e| {
            ActionError::permanent(format!(
                "{context}: message_template cannot render this event: {e}"
            ))
        })?;
        if body.trim().is_empty() {
            return Err(ActionError::permanent(format!(
                "{context}: message_template rendered an empty message"
            )));
        }
        let outcome = self
            .twilio
            .send(&self.http, &to, &body, self.timeout)
            .await
            .map_err(|e| e.context(&context));
        tracing::debug!(
            action = "sms",
            provider = "twilio",
            delivery_id = request.delivery_id,
            attempt = request.attempt,
            ok = outcome.is_ok(),
            "sms sent"
        );
        outcome
    }
}

impl Twilio {
    /// The form body: `To`, `From` or `MessagingServiceSid`, `Body`.
    fn form(&self, to: &str, body: &str) -> String {
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("To", to);
        match &self.sender {
            TwilioSender::From(from) => form.append_pair("From", from),
            TwilioSender::MessagingService(sid) => form.append_pair("MessagingServiceSid", sid),
        };
        form.append_pair("Body", body);
        form.finish()
    }

    async fn send(
        &self,
        http: &HttpClient,
        to: &str,
        body: &str,
        timeout: Duration,
    ) -> Result<(), ActionError> {
        let form = self.form(to, body);
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        headers.insert(AUTHORIZATION, self.authorization.clone());
        headers.insert("accept", HeaderValue::from_static("application/json"));
        let response = http
            .send(HttpRequest {
                method: Method::POST,
                target: &self.target,
                headers,
                body: form.into_bytes(),
                timeout,
            })
            .await?;
        twilio_outcome(&response)
    }
}

/// Twilio's error body: `{"code": 21211, "message": "...", "more_info": "...", "status": 400}`.
#[derive(Debug, Deserialize)]
struct TwilioError {
    code: Option<u32>,
    message: Option<String>,
}

/// Twilio's answers: 2xx ok; its documented error codes first, then the HTTP status.
fn twilio_outcome(response: &HttpResponse) -> Result<(), ActionError> {
    if response.status.is_success() {
        return Ok(());
    }
    let error: Option<TwilioError> = serde_json::from_slice(&response.body).ok();
    let code = error.as_ref().and_then(|e| e.code);
    let detail = match &error {
        Some(TwilioError {
            code: Some(code),
            message,
        }) => format!(
            " (Twilio error {code}: {})",
            message.as_deref().unwrap_or("no message")
        ),
        _ => String::new(),
    };
    let answered = format!("the provider answered {}{detail}", response.status.as_u16());
    match code {
        // Too many requests: slow down and retry.
        Some(20429) => Err(ActionError::transient_after(
            answered,
            classify(response.status, &response.headers)
                .err()
                .and_then(|e| e.retry_after()),
        )),
        Some(21211) | Some(21614) => Err(ActionError::permanent(format!(
            "{answered}: the 'To' number is not valid or cannot receive SMS"
        ))),
        Some(21610) => Err(ActionError::permanent(format!(
            "{answered}: the recipient unsubscribed (replied STOP)"
        ))),
        Some(20003) => Err(ActionError::permanent(format!(
            "{answered}: authentication failed; check the Account SID and Auth Token"
        ))),
        _ => classify(response.status, &response.headers).map_err(|e| e.with_message(answered)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::FailureKind;
    use reqwest::StatusCode;

    fn env(k: &str) -> Option<String> {
        match k {
            "TWILIO_ACCOUNT_SID" => Some("AC0123456789abcdef0123456789abcdef".into()),
            "TWILIO_AUTH_TOKEN" => Some("tok3n".into()),
            _ => None,
        }
    }

    fn answer(status: u16, body: &str) -> Result<(), ActionError> {
        twilio_outcome(&HttpResponse {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: body.as_bytes().to_vec(),
        })
    }

    fn twilio(code: u32, status: u16) -> String {
        format!(
            r#"{{"code": {code}, "message": "m", "more_info": "https://www.twilio.com/docs/errors/{code}", "status": {status}}}"#
        )
    }

    #[test]
    fn doc_example_compiles() {
        let table = crate::actions::tests::doc_example(include_str!("sms.rs"));
        let config = match crate::actions::ActionConfig::parse(&table, "p")
            .unwrap()
            .settings
        {
            crate::actions::Settings::Sms(c) => c,
            other => panic!("{other:?}"),
        };
        let sms = compile(&config, "p", &CompileContext::new(&env)).unwrap();
        let t = &sms.twilio;
        assert_eq!(
            t.target.url().as_str(),
            "https://api.twilio.com/2010-04-01/Accounts/AC0123456789abcdef0123456789abcdef/Messages.json"
        );
        assert_eq!(t.target.shown(), "https://api.twilio.com");
        let debug = format!("{sms:?}");
        assert!(
            !debug.contains("tok3n") && !debug.contains("AC0123"),
            "{debug}"
        );
    }

    #[test]
    fn error_codes_are_mapped() {
        assert_eq!(answer(201, r#"{"sid": "SM1"}"#), Ok(()));
        for (code, status) in [(21211, 400), (21614, 400), (21610, 400), (20003, 401)] {
            let err = answer(status, &twilio(code, status)).unwrap_err();
            assert!(err.kind == FailureKind::Permanent, "{code}: {err:?}");
            assert!(err.message().contains(&code.to_string()), "{err}");
        }
        let err = answer(429, &twilio(20429, 429)).unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
        // 20429 is transient whatever status it comes with.
        assert!(answer(400, &twilio(20429, 400)).unwrap_err().is_retryable());
        assert!(answer(503, "upstream down").unwrap_err().is_retryable());
        assert!(answer(500, &twilio(20500, 500)).unwrap_err().is_retryable());
        let other = answer(400, &twilio(21602, 400)).unwrap_err();
        assert!(other.kind == FailureKind::Permanent, "{other:?}");
        assert_eq!(answer(410, "").unwrap_err().kind, FailureKind::Gone);
    }

    #[test]
    fn config_errors_are_all_reported() {
        let config = SmsConfig {
            account_sid_env: Some("NOPE".into()),
            from: Some("+1".into()),
            messaging_service_sid: Some("MG1".into()),
            message_template: Some("{{ after.x".into()),
            base_url: Some("ftp://x".into()),
            ..Default::default()
        };
        let ctx = CompileContext::new(&env);
        let errors = compile(&config, "p", &ctx).unwrap_err();
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "p.account_sid_env",
                "p.auth_token_env",
                "p.from",
                "p.base_url",
                "p.to",
                "p.message_template"
            ],
            "{errors:#?}"
        );
        let errors = compile(
            &SmsConfig {
                provider: Some("nexmo".into()),
                to: Some("+1".into()),
                message_template: Some("x".into()),
                ..Default::default()
            },
            "p",
            &ctx,
        )
        .unwrap_err();
        assert_eq!(errors[0].path, "p.provider");
        assert!(errors[0].message.contains("known providers: twilio"));
    }
}
