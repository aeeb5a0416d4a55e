//! Apple Push Notification service, token-based authentication, HTTP/2.
//!
//! Invariants:
//!
//! * Every request carries `authorization: bearer <JWT>`, the JWT signed ES256 with the team's
//!   `.p8` key (`{"alg": "ES256", "kid": key_id}`, `{"iss": team_id, "iat": ...}`), made once
//!   and reused for 50 minutes. `ExpiredProviderToken` (403) replaces it and sends once more.
//! * `POST {base_url}/3/device/{token}` over HTTP/2 only (APNs speaks nothing else; over plain
//!   `http`, for a local server, with prior knowledge), with `apns-topic`, `apns-push-type`,
//!   `apns-priority`, `apns-expiration` (send time + `ttl_secs`; `0` = deliver now or never) and
//!   `apns-id`: the delivery id as a UUID, the same on every retry, so APNs and the logs can
//!   tell a retry from a new notification.
//! * A token that is not hexadecimal never reaches a URL: it is [`ActionError::Gone`] like
//!   APNs's own `BadDeviceToken`.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::SecretKey;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::{jwt, read_secret, required, token_hint, Content, PushConfig, SecretSource};
use crate::actions::http::{classify, HttpClient, HttpRequest, HttpResponse, SendOptions, Target};
use crate::actions::{ActionError, CompileContext};
use crate::error::ConfigError;

pub(super) const DEFAULT_BASE_URL: &str = "https://api.push.apple.com";
/// How long a provider JWT is reused (Apple: valid for one hour, not renewed more often than
/// every 20 minutes).
const JWT_REUSE: Duration = Duration::from_secs(50 * 60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PushType {
    Alert,
    Background,
}

impl PushType {
    fn as_str(self) -> &'static str {
        match self {
            PushType::Alert => "alert",
            PushType::Background => "background",
        }
    }
}

pub(super) struct Apns {
    team_id: String,
    key_id: String,
    key: SigningKey,
    base_url: String,
    allow_private_networks: bool,
    topic: HeaderValue,
    push_type: PushType,
    priority: u8,
    ttl: Duration,
    provider_token: Mutex<Option<(String, Instant)>>,
}

impl fmt::Debug for Apns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Apns")
            .field("team_id", &self.team_id)
            .field("key_id", &self.key_id)
            .field("base_url", &self.base_url)
            .field("topic", &self.topic)
            .field("push_type", &self.push_type)
            .field("priority", &self.priority)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

pub(super) fn compile(
    config: &PushConfig,
    ttl: Duration,
    path: &str,
    ctx: &CompileContext<'_>,
    errors: &mut Vec<ConfigError>,
) -> Option<Apns> {
    let team_id = required(
        config.team_id.as_deref(),
        "team_id",
        "the 10-character Team ID of the Apple developer account",
        path,
        errors,
    );
    let key_id = required(
        config.key_id.as_deref(),
        "key_id",
        "the 10-character Key ID of the .p8 key",
        path,
        errors,
    );
    for (key, value) in [("team_id", team_id), ("key_id", key_id)] {
        if let Some(v) = value {
            if !v.chars().all(|c| c.is_ascii_alphanumeric()) {
                errors.push(ConfigError::new(
                    format!("{path}.{key}"),
                    format!("'{v}' must be letters and digits only"),
                ));
            }
        }
    }
    let key = read_secret(
        SecretSource {
            env_key: "private_key_env",
            env_value: config.private_key_env.as_deref(),
            file_key: "private_key_file",
            file_value: config.private_key_file.as_deref(),
        },
        path,
        ctx,
        errors,
    )
    .and_then(|(pem, key_path)| match SecretKey::from_pem(pem.trim()) {
        Ok(secret) => Some(SigningKey::from(&secret)),
        Err(_) => {
            errors.push(ConfigError::new(
                key_path,
                "the APNs key is not a P-256 private key in PEM form (the .p8 file)",
            ));
            None
        }
    });
    let topic = required(
        config.topic.as_deref(),
        "topic",
        "the app's bundle id (com.example.app)",
        path,
        errors,
    )
    .and_then(|t| {
        HeaderValue::from_str(t)
            .map_err(|_| {
                errors.push(ConfigError::new(
                    format!("{path}.topic"),
                    "not a valid header value",
                ))
            })
            .ok()
    });
    let push_type = match config.push_type.as_deref() {
        None | Some("alert") => PushType::Alert,
        Some("background") => PushType::Background,
        Some(other) => {
            errors.push(ConfigError::new(
                format!("{path}.push_type"),
                format!("must be 'alert' or 'background', not '{other}'"),
            ));
            PushType::Alert
        }
    };
    // (With no template at all, the push action reports "nothing to send" already.)
    if push_type == PushType::Alert
        && config.title_template.is_none()
        && config.body_template.is_none()
        && config.data_template.is_some()
    {
        errors.push(ConfigError::new(
            format!("{path}.body_template"),
            "an alert notification needs title_template or body_template \
             (or push_type = \"background\")",
        ));
    }
    if push_type == PushType::Background {
        for (key, set) in [
            ("title_template", config.title_template.is_some()),
            ("body_template", config.body_template.is_some()),
        ] {
            if set {
                errors.push(ConfigError::new(
                    format!("{path}.{key}"),
                    "a background notification has no alert; send the values in data_template",
                ));
            }
        }
    }
    let priority = match (config.priority, push_type) {
        (None, PushType::Alert) => 10,
        (None, PushType::Background) => 5,
        (Some(10), PushType::Background) => {
            errors.push(ConfigError::new(
                format!("{path}.priority"),
                "a background notification must have priority 5 or 1",
            ));
            5
        }
        (Some(p @ (1 | 5 | 10)), _) => p,
        (Some(p), _) => {
            errors.push(ConfigError::new(
                format!("{path}.priority"),
                format!("must be 10, 5 or 1, not {p}"),
            ));
            10
        }
    };
    let base_url = config
        .base_url
        .as_deref()
        .unwrap_or(DEFAULT_BASE_URL)
        .trim()
        .trim_end_matches('/')
        .to_string();
    if let Err(e) = Target::parse(&base_url, false, config.allow_private_networks) {
        errors.push(ConfigError::new(format!("{path}.base_url"), e));
    }
    Some(Apns {
        team_id: team_id?.to_string(),
        key_id: key_id?.to_string(),
        key: key?,
        base_url,
        allow_private_networks: config.allow_private_networks,
        topic: topic?,
        push_type,
        priority,
        ttl,
        provider_token: Mutex::new(None),
    })
}

impl Apns {
    pub(super) async fn send(
        &self,
        http: &HttpClient,
        token: &str,
        content: &Content,
        delivery_id: &str,
        timeout: Duration,
    ) -> Result<(), ActionError> {
        let hint = token_hint(token);
        if !(64..=200).contains(&token.len()) || !token.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(ActionError::gone(format!(
                "the device token {hint} is not an APNs device token (hexadecimal); remove it"
            )));
        }
        // The token is in the path: messages show the host only.
        let target = Target::parse(
            &format!("{}/3/device/{token}", self.base_url),
            true,
            self.allow_private_networks,
        )
        .map_err(ActionError::permanent)?;
        let body = serde_json::to_vec(&self.payload(content)?)
            .map_err(|e| ActionError::permanent(e.to_string()))?;
        let apns_id = apns_id(delivery_id);
        let mut stale: Option<String> = None;
        loop {
            let provider_token = self.provider_token(stale.as_deref())?;
            let headers = self.headers(&provider_token, apns_id)?;
            let response = http
                .send_with(
                    HttpRequest {
                        method: Method::POST,
                        target: &target,
                        headers,
                        body: body.clone(),
                        timeout,
                    },
                    SendOptions {
                        http2_only: true,
                        body_limit: Some(64 * 1024),
                    },
                )
                .await
                .map_err(|e| e.context(target.shown()))?;
            let reason = reason(&response);
            if response.status == StatusCode::FORBIDDEN
                && reason == "ExpiredProviderToken"
                && stale.is_none()
            {
                tracing::debug!(
                    provider = "apns",
                    "APNs refused the provider token as expired"
                );
                stale = Some(provider_token);
                continue;
            }
            return outcome(&response, &reason, &hint).map_err(|e| e.context(target.shown()));
        }
    }

    /// `{"aps": {"alert": {"title", "body"}}, ...data}`, or `{"aps": {"content-available": 1},
    /// ...data}` for a background notification.
    fn payload(&self, content: &Content) -> Result<Value, ActionError> {
        let aps = match self.push_type {
            PushType::Alert => {
                let mut alert = Map::new();
                if let Some(title) = &content.title {
                    alert.insert("title".into(), json!(title));
                }
                if let Some(body) = &content.body {
                    alert.insert("body".into(), json!(body));
                }
                json!({ "alert": alert })
            }
            PushType::Background => json!({"content-available": 1}),
        };
        let mut payload = Map::new();
        if let Some(data) = &content.data {
            if data.contains_key("aps") {
                return Err(ActionError::permanent(
                    "data_template must not set 'aps' (the action builds it)",
                ));
            }
            payload.extend(data.clone());
        }
        payload.insert("aps".into(), aps);
        Ok(Value::Object(payload))
    }

    fn headers(&self, provider_token: &str, apns_id: Uuid) -> Result<HeaderMap, ActionError> {
        let expiration = if self.ttl.is_zero() {
            0
        } else {
            chrono::Utc::now().timestamp() + self.ttl.as_secs() as i64
        };
        let mut authorization = HeaderValue::from_str(&format!("bearer {provider_token}"))
            .map_err(|_| {
                ActionError::permanent("the provider token is not a valid header value")
            })?;
        authorization.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, authorization);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert("apns-topic", self.topic.clone());
        headers.insert(
            "apns-push-type",
            HeaderValue::from_static(self.push_type.as_str()),
        );
        headers.insert("apns-priority", HeaderValue::from(u16::from(self.priority)));
        headers.insert("apns-expiration", HeaderValue::from(expiration));
        headers.insert(
            "apns-id",
            HeaderValue::from_str(&apns_id.hyphenated().to_string())
                .expect("a UUID is a valid header value"),
        );
        Ok(headers)
    }

    /// The cached provider JWT, or a new one when it is 50 minutes old or was just refused.
    fn provider_token(&self, stale: Option<&str>) -> Result<String, ActionError> {
        let mut cached = self
            .provider_token
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((token, made)) = cached.as_ref() {
            if made.elapsed() < JWT_REUSE && Some(token.as_str()) != stale {
                return Ok(token.clone());
            }
        }
        let token = jwt(
            &json!({"alg": "ES256", "kid": self.key_id}),
            &json!({"iss": self.team_id, "iat": chrono::Utc::now().timestamp()}),
            |input| {
                let signature: Signature = self.key.sign(input);
                Ok(signature.to_bytes().to_vec())
            },
        )
        .map_err(ActionError::permanent)?;
        *cached = Some((token.clone(), Instant::now()));
        Ok(token)
    }
}

/// The `apns-id` of a delivery: its delivery id (`msg_<uuid hex>`) as a UUID; any other id is
/// hashed into one (UUID v5), so that it is the same on every attempt.
pub fn apns_id(delivery_id: &str) -> Uuid {
    delivery_id
        .strip_prefix("msg_")
        .and_then(|hex| Uuid::try_parse(hex).ok())
        .unwrap_or_else(|| Uuid::new_v5(&Uuid::NAMESPACE_OID, delivery_id.as_bytes()))
}

/// APNs's error `reason` (`{"reason": "BadDeviceToken"}`), or "".
fn reason(response: &HttpResponse) -> String {
    serde_json::from_slice::<Value>(&response.body)
        .ok()
        .and_then(|v| v["reason"].as_str().map(str::to_string))
        .unwrap_or_default()
}

fn outcome(response: &HttpResponse, reason: &str, hint: &str) -> Result<(), ActionError> {
    if response.status.is_success() {
        return Ok(());
    }
    let gone = response.status == StatusCode::GONE
        || (response.status == StatusCode::BAD_REQUEST
            && matches!(reason, "BadDeviceToken" | "DeviceTokenNotForTopic"));
    if gone {
        return Err(ActionError::gone(format!(
            "the device token {hint} is no longer valid for this app ({} {reason}); remove it",
            response.status.as_u16()
        )));
    }
    classify(response.status, &response.headers).map_err(|e| e.detail(reason))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::FailureKind;

    fn answer(status: u16, reason: &str) -> Result<(), ActionError> {
        let response = HttpResponse {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: serde_json::to_vec(&json!({ "reason": reason })).unwrap(),
        };
        outcome(&response, reason, "...abcd")
    }

    #[test]
    fn documented_reasons_are_classified() {
        assert_eq!(
            answer(410, "Unregistered").unwrap_err().kind,
            FailureKind::Gone
        );
        assert_eq!(
            answer(400, "BadDeviceToken").unwrap_err().kind,
            FailureKind::Gone
        );
        assert_eq!(
            answer(400, "DeviceTokenNotForTopic").unwrap_err().kind,
            FailureKind::Gone
        );
        let bad_topic = answer(400, "BadTopic").unwrap_err();
        assert!(bad_topic.kind == FailureKind::Permanent);
        assert!(bad_topic.message().contains("BadTopic"));
        for reason in [
            "InvalidProviderToken",
            "MissingProviderToken",
            "BadCertificate",
        ] {
            assert!(
                answer(403, reason).is_err_and(|e| e.kind == FailureKind::Permanent),
                "{reason}"
            );
        }
        assert!(answer(429, "TooManyRequests").unwrap_err().is_retryable());
        assert!(answer(500, "InternalServerError")
            .unwrap_err()
            .is_retryable());
        assert!(answer(503, "ServiceUnavailable")
            .unwrap_err()
            .is_retryable());
        assert_eq!(answer(200, ""), Ok(()));
    }

    #[test]
    fn apns_id_is_the_delivery_uuid() {
        let id = crate::delivery::delivery_id(Uuid::from_u128(9), "o", 0);
        let uuid = apns_id(&id);
        assert_eq!(format!("msg_{}", uuid.simple()), id);
        assert_eq!(apns_id("custom"), apns_id("custom"));
        assert_ne!(apns_id("custom"), apns_id("other"));
    }
}
