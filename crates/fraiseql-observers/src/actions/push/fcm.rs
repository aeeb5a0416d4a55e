//! Firebase Cloud Messaging, HTTP v1 API.
//!
//! Invariants:
//!
//! * Authentication is OAuth2 with a service account: a JWT assertion signed RS256 with the
//!   account's key (`iss` = `client_email`, `scope` = firebase.messaging, `aud` = `token_uri`,
//!   `iat`, `exp` = `iat` + 1 h) is exchanged at the account's `token_uri`
//!   (`grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`) for an access token, which is
//!   cached until five minutes before it expires. One exchange at a time: concurrent sends wait
//!   for it rather than each asking for a token.
//! * A message is `POST {base_url}/v1/projects/{project_id}/messages:send` with
//!   `authorization: Bearer <access token>`.
//! * A 401 drops the cached token (if no other task replaced it already) and the message is sent
//!   once more with a new one; a second 401 is permanent.
//! * `UNREGISTERED` (404) and an `INVALID_ARGUMENT` (400) about the token are
//!   [`ActionError::Gone`]: the token will never work again.

use std::fmt;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{jwt, read_secret, reading_body, token_hint, Content, PushConfig, SecretSource};
use crate::actions::http::{classify, HttpClient, HttpRequest, HttpResponse, Target};
use crate::actions::{ActionError, CompileContext};
use crate::error::ConfigError;

pub(super) const DEFAULT_BASE_URL: &str = "https://fcm.googleapis.com";
const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// The OAuth2 scope FCM's send API requires.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`, form-encoded.
const GRANT_TYPE_FORM: &str = "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer";
/// How long a JWT assertion is valid (Google accepts at most one hour).
const ASSERTION_LIFETIME_SECS: i64 = 3600;
/// A cached access token is replaced this long before it expires.
const REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// The fields of a service-account key file that are used.
#[derive(Deserialize)]
struct ServiceAccount {
    #[serde(rename = "type")]
    kind: Option<String>,
    project_id: Option<String>,
    private_key_id: Option<String>,
    private_key: Option<String>,
    client_email: Option<String>,
    token_uri: Option<String>,
}

pub(super) struct Fcm {
    project_id: String,
    client_email: String,
    private_key_id: Option<String>,
    key: RsaKeyPair,
    /// `token_uri` exactly as the service account gives it: the assertion's audience.
    token_uri: String,
    token_target: Target,
    send_target: Target,
    token: tokio::sync::Mutex<Option<AccessToken>>,
}

struct AccessToken {
    value: String,
    refresh_at: Instant,
}

impl fmt::Debug for Fcm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fcm")
            .field("project_id", &self.project_id)
            .field("client_email", &self.client_email)
            .field("token_target", &self.token_target)
            .field("send_target", &self.send_target)
            .finish_non_exhaustive()
    }
}

pub(super) fn compile(
    config: &PushConfig,
    path: &str,
    ctx: &CompileContext<'_>,
    errors: &mut Vec<ConfigError>,
) -> Option<Fcm> {
    let (json, key_path) = read_secret(
        SecretSource {
            env_key: "service_account_env",
            env_value: config.service_account_env.as_deref(),
            file_key: "service_account_file",
            file_value: config.service_account_file.as_deref(),
        },
        path,
        ctx,
        errors,
    )?;
    let account: ServiceAccount = match serde_json::from_str(&json) {
        Ok(account) => account,
        Err(e) => {
            // serde_json's message names a line and column, never the content.
            errors.push(ConfigError::new(
                key_path,
                format!("the service account is not valid JSON ({e})"),
            ));
            return None;
        }
    };
    if let Some(kind) = account.kind.as_deref() {
        if kind != "service_account" {
            errors.push(ConfigError::new(
                &key_path,
                format!("the key is of type '{kind}', not 'service_account'"),
            ));
        }
    }
    let mut field = |name: &str, value: Option<String>| match value {
        Some(v) if !v.trim().is_empty() => Some(v),
        _ => {
            errors.push(ConfigError::new(
                &key_path,
                format!("the service account has no '{name}'"),
            ));
            None
        }
    };
    let client_email = field("client_email", account.client_email);
    let private_key = field("private_key", account.private_key);
    let key = private_key.and_then(|pem| {
        rsa_key(&pem)
            .map_err(|e| errors.push(ConfigError::new(&key_path, e)))
            .ok()
    });

    let project_id = match config.project_id.clone().or(account.project_id) {
        Some(id) if valid_project_id(&id) => Some(id),
        Some(id) => {
            errors.push(ConfigError::new(
                format!("{path}.project_id"),
                format!("'{id}' is not a valid Firebase project id"),
            ));
            None
        }
        None => {
            errors.push(ConfigError::new(
                format!("{path}.project_id"),
                "missing, and the service account has no 'project_id'",
            ));
            None
        }
    };

    let token_uri = account
        .token_uri
        .unwrap_or_else(|| DEFAULT_TOKEN_URI.to_string());
    let token_target = Target::parse(&token_uri, false, config.allow_private_networks)
        .map_err(|e| {
            errors.push(ConfigError::new(
                &key_path,
                format!("the service account's token_uri: {e}"),
            ))
        })
        .ok();

    let base = config.base_url.as_deref().unwrap_or(DEFAULT_BASE_URL);
    let send_target = project_id.as_ref().and_then(|project| {
        let url = format!(
            "{}/v1/projects/{project}/messages:send",
            base.trim().trim_end_matches('/')
        );
        Target::parse(&url, false, config.allow_private_networks)
            .map_err(|e| errors.push(ConfigError::new(format!("{path}.base_url"), e)))
            .ok()
    });

    Some(Fcm {
        project_id: project_id?,
        client_email: client_email?,
        private_key_id: account.private_key_id,
        key: key?,
        token_uri,
        token_target: token_target?,
        send_target: send_target?,
        token: tokio::sync::Mutex::new(None),
    })
}

/// Google project ids: letters, digits, hyphens (and the `domain:` prefix of old ones).
fn valid_project_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':'))
}

/// A PKCS#8 RSA private key from its PEM form (`-----BEGIN PRIVATE KEY-----`).
fn rsa_key(pem: &str) -> Result<RsaKeyPair, String> {
    let der = pem_body(pem, "PRIVATE KEY")
        .ok_or("the service account's private_key is not a PEM 'PRIVATE KEY' block")?;
    RsaKeyPair::from_pkcs8(&der)
        .map_err(|e| format!("the service account's private_key is not a usable RSA key ({e})"))
}

/// The decoded content of a PEM block with `label`.
pub(super) fn pem_body(pem: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin)? + begin.len();
    let stop = start + pem[start..].find(&end)?;
    let encoded: String = pem[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    BASE64.decode(encoded).ok()
}

impl Fcm {
    pub(super) async fn send(
        &self,
        http: &HttpClient,
        token: &str,
        content: &Content,
        timeout: Duration,
    ) -> Result<(), ActionError> {
        let body = serde_json::to_vec(&message(token, content))
            .map_err(|e| ActionError::permanent(e.to_string()))?;
        let mut stale: Option<String> = None;
        loop {
            let access = self.access_token(http, timeout, stale.as_deref()).await?;
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            headers.insert(AUTHORIZATION, bearer(&access)?);
            let response = http
                .send_with(
                    HttpRequest {
                        method: Method::POST,
                        target: &self.send_target,
                        headers,
                        body: body.clone(),
                        timeout,
                    },
                    reading_body(),
                )
                .await
                .map_err(|e| e.context(self.send_target.shown()))?;
            if response.status == StatusCode::UNAUTHORIZED && stale.is_none() {
                tracing::debug!(
                    provider = "fcm",
                    "FCM refused the access token; getting a new one"
                );
                stale = Some(access);
                continue;
            }
            return outcome(&response, token).map_err(|e| e.context(self.send_target.shown()));
        }
    }

    /// The cached access token, or a new one when there is none, it is about to expire, or it
    /// is `stale` (just refused).
    async fn access_token(
        &self,
        http: &HttpClient,
        timeout: Duration,
        stale: Option<&str>,
    ) -> Result<String, ActionError> {
        let mut cached = self.token.lock().await;
        if let Some(token) = cached.as_ref() {
            if Instant::now() < token.refresh_at && Some(token.value.as_str()) != stale {
                return Ok(token.value.clone());
            }
        }
        let fresh = self
            .fetch_token(http, timeout)
            .await
            .map_err(|e| e.context(&format!("token endpoint {}", self.token_target.shown())))?;
        let value = fresh.value.clone();
        *cached = Some(fresh);
        Ok(value)
    }

    async fn fetch_token(
        &self,
        http: &HttpClient,
        timeout: Duration,
    ) -> Result<AccessToken, ActionError> {
        let assertion = self.assertion().map_err(|message| {
            ActionError::permanent(format!("cannot sign the token request: {message}"))
        })?;
        let form = format!("grant_type={GRANT_TYPE_FORM}&assertion={assertion}");
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        let requested = Instant::now();
        let response = http
            .send_with(
                HttpRequest {
                    method: Method::POST,
                    target: &self.token_target,
                    headers,
                    body: form.into_bytes(),
                    timeout,
                },
                reading_body(),
            )
            .await?;
        if !response.status.is_success() {
            let detail = serde_json::from_slice::<Value>(&response.body)
                .ok()
                .map(|v| {
                    [&v["error"], &v["error_description"]]
                        .iter()
                        .filter_map(|p| p.as_str())
                        .collect::<Vec<_>>()
                        .join(": ")
                })
                .unwrap_or_default();
            let error = classify(response.status, &response.headers)
                .err()
                .unwrap_or_else(|| {
                    ActionError::permanent(format!("unexpected answer {}", response.status))
                });
            return Err(error.detail(&detail));
        }
        #[derive(Deserialize)]
        struct TokenResponse {
            access_token: String,
            expires_in: Option<u64>,
        }
        let answer: TokenResponse = serde_json::from_slice(&response.body).map_err(|e| {
            ActionError::transient(format!("the token endpoint's answer cannot be read ({e})"))
        })?;
        let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(3600));
        let margin = REFRESH_MARGIN.min(lifetime / 2);
        tracing::debug!(
            provider = "fcm",
            expires_in_s = lifetime.as_secs(),
            "FCM access token obtained"
        );
        Ok(AccessToken {
            value: answer.access_token,
            refresh_at: requested + lifetime - margin,
        })
    }

    /// The signed JWT assertion of the token request.
    fn assertion(&self) -> Result<String, String> {
        let now = chrono::Utc::now().timestamp();
        let mut header = json!({"alg": "RS256", "typ": "JWT"});
        if let Some(kid) = &self.private_key_id {
            header["kid"] = json!(kid);
        }
        let claims = json!({
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_SECS,
        });
        jwt(&header, &claims, |input| {
            let mut signature = vec![0; self.key.public().modulus_len()];
            self.key
                .sign(
                    &RSA_PKCS1_SHA256,
                    &SystemRandom::new(),
                    input,
                    &mut signature,
                )
                .map_err(|_| "RSA signing failed".to_string())?;
            Ok(signature)
        })
    }
}

fn bearer(token: &str) -> Result<HeaderValue, ActionError> {
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| ActionError::permanent("the access token is not a valid header value"))?;
    value.set_sensitive(true);
    Ok(value)
}

/// `{"message": {"token", "notification": {"title", "body"}, "data": {string: string}}}`.
fn message(token: &str, content: &Content) -> Value {
    let mut message = Map::new();
    message.insert("token".into(), json!(token));
    let mut notification = Map::new();
    if let Some(title) = &content.title {
        notification.insert("title".into(), json!(title));
    }
    if let Some(body) = &content.body {
        notification.insert("body".into(), json!(body));
    }
    if !notification.is_empty() {
        message.insert("notification".into(), Value::Object(notification));
    }
    if let Some(data) = &content.data {
        message.insert("data".into(), Value::Object(string_values(data)));
    }
    json!({ "message": message })
}

/// FCM data values are strings: strings as they are, other values as their JSON text, `null`
/// left out.
fn string_values(data: &Map<String, Value>) -> Map<String, Value> {
    data.iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| {
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), Value::String(text))
        })
        .collect()
}

/// FCM's answer to a send: its error `status`, the `errorCode` of its `FcmError` detail, and
/// whether a bad-request detail is about `message.token`.
fn outcome(response: &HttpResponse, token: &str) -> Result<(), ActionError> {
    if response.status.is_success() {
        return Ok(());
    }
    let body: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
    let error = &body["error"];
    let status_name = error["status"].as_str().unwrap_or_default();
    let details = error["details"].as_array().cloned().unwrap_or_default();
    let fcm_code = details
        .iter()
        .find_map(|d| d["errorCode"].as_str())
        .unwrap_or_default();
    let message: String = error["message"]
        .as_str()
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect();
    let about_token = details.iter().any(|d| {
        d["fieldViolations"]
            .as_array()
            .is_some_and(|v| v.iter().any(|f| f["field"] == "message.token"))
    }) || message.to_ascii_lowercase().contains("registration token");
    let code = if fcm_code.is_empty() {
        status_name
    } else {
        fcm_code
    };
    let detail = [code, message.as_str()]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(": ");
    let hint = token_hint(token);
    if fcm_code == "UNREGISTERED"
        || (response.status == StatusCode::NOT_FOUND && status_name == "NOT_FOUND")
    {
        return Err(ActionError::gone(format!(
            "the device token {hint} is no longer registered ({detail}); remove it"
        )));
    }
    if response.status == StatusCode::BAD_REQUEST
        && (code == "INVALID_ARGUMENT" || status_name == "INVALID_ARGUMENT")
        && about_token
    {
        return Err(ActionError::gone(format!(
            "the device token {hint} is not a valid FCM registration token ({detail}); remove it"
        )));
    }
    classify(response.status, &response.headers).map_err(|e| e.detail(&detail))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::FailureKind;

    fn answer(status: u16, body: Value) -> Result<(), ActionError> {
        outcome(
            &HttpResponse {
                status: StatusCode::from_u16(status).unwrap(),
                headers: HeaderMap::new(),
                body: serde_json::to_vec(&body).unwrap(),
            },
            "device-token-0123456789",
        )
    }

    fn fcm_error(code: u16, status: &str, fcm_code: &str, message: &str) -> Value {
        json!({"error": {"code": code, "message": message, "status": status, "details": [
            {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": fcm_code}
        ]}})
    }

    #[test]
    fn documented_errors_are_classified() {
        let gone = answer(
            404,
            fcm_error(
                404,
                "NOT_FOUND",
                "UNREGISTERED",
                "Requested entity was not found.",
            ),
        )
        .unwrap_err();
        assert!(gone.kind == FailureKind::Gone, "{gone:?}");
        assert!(gone.message().contains("...23456789"), "{gone:?}");
        assert!(!gone.message().contains("device-token-0"), "{gone:?}");

        let invalid = answer(
            400,
            fcm_error(
                400,
                "INVALID_ARGUMENT",
                "INVALID_ARGUMENT",
                "The registration token is not a valid FCM registration token",
            ),
        )
        .unwrap_err();
        assert!(invalid.kind == FailureKind::Gone, "{invalid:?}");

        let bad_payload = answer(
            400,
            fcm_error(
                400,
                "INVALID_ARGUMENT",
                "INVALID_ARGUMENT",
                "Invalid JSON payload received. Unknown name \"x\"",
            ),
        )
        .unwrap_err();
        assert!(
            bad_payload.kind == FailureKind::Permanent,
            "{bad_payload:?}"
        );
        assert!(bad_payload.message().contains("Invalid JSON payload"));

        let quota = answer(
            429,
            fcm_error(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED", "quota"),
        )
        .unwrap_err();
        assert!(quota.is_retryable(), "{quota:?}");
        let unavailable =
            answer(503, fcm_error(503, "UNAVAILABLE", "UNAVAILABLE", "x")).unwrap_err();
        assert!(unavailable.is_retryable());
        let mismatch = answer(
            403,
            fcm_error(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH", "x"),
        )
        .unwrap_err();
        assert!(mismatch.kind == FailureKind::Permanent);
        assert!(mismatch.message().contains("SENDER_ID_MISMATCH"));
        assert_eq!(
            answer(200, json!({"name": "projects/p/messages/1"})),
            Ok(())
        );
    }

    #[test]
    fn message_shape_and_string_data() {
        let content = Content {
            title: Some("T".into()),
            body: None,
            data: Some(
                json!({"n": 7, "s": "x", "b": true, "o": {"a": 1}, "z": null})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
        };
        assert_eq!(
            message("tok", &content),
            json!({"message": {"token": "tok", "notification": {"title": "T"},
                "data": {"n": "7", "s": "x", "b": "true", "o": "{\"a\":1}"}}})
        );
        assert_eq!(
            message("tok", &Content::default()),
            json!({"message": {"token": "tok"}})
        );
    }

    #[test]
    fn pem_bodies() {
        let pem = "-----BEGIN PRIVATE KEY-----\nAAEC\nAw==\n-----END PRIVATE KEY-----\n";
        assert_eq!(pem_body(pem, "PRIVATE KEY"), Some(vec![0, 1, 2, 3]));
        assert_eq!(pem_body(pem, "EC PRIVATE KEY"), None);
        assert!(rsa_key(pem).is_err());
    }
}
