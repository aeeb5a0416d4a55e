//! Web Push: RFC 8030 delivery, RFC 8291 message encryption (`aes128gcm`, RFC 8188), RFC 8292
//! VAPID.
//!
//! Invariants:
//!
//! * The payload is encrypted for the subscription's keys (`p256dh`, `auth`) with a fresh
//!   ephemeral P-256 key and a fresh 16-byte salt per attempt, in one record of size 4096:
//!   `salt | rs | idlen = 65 | ephemeral public key | AES-128-GCM(payload | 0x02)`. The key
//!   derivation is RFC 8291 section 3.4, checked against the RFC's own example.
//! * Every request is signed with VAPID: `authorization: vapid t=<ES256 JWT>, k=<public key>`,
//!   the JWT's `aud` the origin of the endpoint, `exp` 12 hours ahead, `sub` the configured
//!   contact.
//! * `TTL` and `Urgency` headers are always sent; `content-encoding: aes128gcm`.
//! * The endpoint comes from event data: it goes through the SSRF guard like any target, must be
//!   `https` unless `allow_private_networks` is set, and is shown as its host only (the path
//!   is the subscription's capability).

use std::fmt;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64URL;
use base64::Engine;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::elliptic_curve::sec1::ToSec1Point;
use p256::{PublicKey, SecretKey};
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use ring::rand::{SecureRandom, SystemRandom};
use ring::{aead, hkdf};
use serde_json::{json, Map, Value};

use super::{jwt, reading_body, required, Content, PushConfig};
use crate::actions::http::{classify, HttpClient, HttpRequest, Target};
use crate::actions::{secret_from_env, ActionError};
use crate::error::ConfigError;

/// The record size: the whole message is one record of at most this many octets.
const RECORD_SIZE: u32 = 4096;
/// The largest payload one record holds: 4096 - 86 (header) - 16 (tag) - 1 (delimiter).
pub const MAX_PAYLOAD: usize = 3993;
/// How long a VAPID JWT is valid (RFC 8292: at most 24 hours).
const VAPID_LIFETIME_SECS: i64 = 12 * 3600;

const URGENCIES: &[&str] = &["very-low", "low", "normal", "high"];

pub(super) struct WebPush {
    key: SigningKey,
    /// The VAPID public key, uncompressed, base64url: the `k=` of the authorization header.
    public_key: String,
    subject: String,
    urgency: &'static str,
    ttl: Duration,
    allow_private_networks: bool,
}

impl fmt::Debug for WebPush {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebPush")
            .field("public_key", &self.public_key)
            .field("subject", &self.subject)
            .field("urgency", &self.urgency)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

pub(super) fn compile(
    config: &PushConfig,
    ttl: Duration,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<ConfigError>,
) -> Option<WebPush> {
    let key_path = format!("{path}.vapid_private_key_env");
    let key = match config.vapid_private_key_env.as_deref() {
        None => {
            errors.push(ConfigError::new(
                &key_path,
                "missing; the VAPID private key, base64url (the application server key pair's \
                 private half)",
            ));
            None
        }
        Some(var) => secret_from_env(var, &key_path, env, errors).and_then(|encoded| {
            vapid_key(&encoded)
                .map_err(|e| {
                    errors.push(ConfigError::new(
                        &key_path,
                        format!("environment variable '{var}': {e}"),
                    ))
                })
                .ok()
        }),
    };
    let subject = required(
        config.vapid_subject.as_deref(),
        "vapid_subject",
        "a contact for the push services: 'mailto:ops@example.com' or an https URL",
        path,
        errors,
    )
    .and_then(|s| {
        if s.starts_with("mailto:") || s.starts_with("https://") {
            Some(s.to_string())
        } else {
            errors.push(ConfigError::new(
                format!("{path}.vapid_subject"),
                format!("'{s}' must be a mailto: or https: URL"),
            ));
            None
        }
    });
    let urgency = match config.urgency.as_deref() {
        None => "normal",
        Some(u) => match URGENCIES.iter().find(|known| **known == u) {
            Some(known) => known,
            None => {
                errors.push(ConfigError::new(
                    format!("{path}.urgency"),
                    format!("must be one of {}, not '{u}'", URGENCIES.join(", ")),
                ));
                "normal"
            }
        },
    };
    let key = key?;
    let public_key = BASE64URL.encode(
        key.verifying_key()
            .as_affine()
            .to_sec1_point(false)
            .as_bytes(),
    );
    Some(WebPush {
        key,
        public_key,
        subject: subject?,
        urgency,
        ttl,
        allow_private_networks: config.allow_private_networks,
    })
}

/// A VAPID private key in its usual form: the 32-byte P-256 scalar, base64url.
fn vapid_key(encoded: &str) -> Result<SigningKey, String> {
    let bytes = decode_base64url(encoded.trim()).ok_or("the VAPID private key is not base64url")?;
    if bytes.len() != 32 {
        return Err(format!(
            "the VAPID private key must be 32 bytes (base64url), not {}",
            bytes.len()
        ));
    }
    SigningKey::from_slice(&bytes).map_err(|_| "the VAPID private key is not a P-256 key".into())
}

/// base64url, with or without padding.
fn decode_base64url(s: &str) -> Option<Vec<u8>> {
    BASE64URL.decode(s.trim_end_matches('=')).ok()
}

/// A push subscription, as `PushSubscription.toJSON()` gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Subscription {
    pub endpoint: String,
    /// The user agent's P-256 public key, uncompressed (65 bytes).
    pub p256dh: Vec<u8>,
    /// The authentication secret (16 bytes).
    pub auth: Vec<u8>,
}

impl Subscription {
    /// `{"endpoint", "keys": {"p256dh", "auth"}}`, or a string holding that JSON.
    pub(super) fn from_json(value: &Value) -> Result<Subscription, String> {
        let parsed;
        let value = match value {
            Value::String(s) => {
                parsed = serde_json::from_str::<Value>(s)
                    .map_err(|_| "the subscription is a string but not JSON".to_string())?;
                &parsed
            }
            other => other,
        };
        let text = |v: &Value, name: &str| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("the subscription has no '{name}'"))
        };
        let endpoint = text(&value["endpoint"], "endpoint")?;
        let p256dh = decode_base64url(&text(&value["keys"]["p256dh"], "keys.p256dh")?)
            .filter(|k| k.len() == 65 && k[0] == 4)
            .ok_or("keys.p256dh is not an uncompressed P-256 public key (base64url)")?;
        let auth = decode_base64url(&text(&value["keys"]["auth"], "keys.auth")?)
            .filter(|k| k.len() == 16)
            .ok_or("keys.auth is not a 16-byte secret (base64url)")?;
        Ok(Subscription {
            endpoint,
            p256dh,
            auth,
        })
    }
}

impl WebPush {
    pub(super) async fn send(
        &self,
        http: &HttpClient,
        subscription: &Subscription,
        content: &Content,
        timeout: Duration,
    ) -> Result<(), ActionError> {
        let target = Target::parse(&subscription.endpoint, true, self.allow_private_networks)
            .map_err(|e| ActionError::permanent(format!("the subscription's endpoint: {e}")))?;
        if target.url().scheme() != "https" && !self.allow_private_networks {
            return Err(ActionError::permanent(format!(
                "the subscription's endpoint {} is not https",
                target.shown()
            )));
        }
        let payload = serde_json::to_vec(&payload(content))
            .map_err(|e| ActionError::permanent(e.to_string()))?;
        if payload.len() > MAX_PAYLOAD {
            return Err(ActionError::permanent(format!(
                "the payload is {} bytes; Web Push carries at most {MAX_PAYLOAD}",
                payload.len()
            )));
        }
        let (ephemeral, salt) = fresh_key_and_salt()?;
        let body = encrypt(
            &payload,
            &subscription.p256dh,
            &subscription.auth,
            &ephemeral,
            &salt,
        )
        .map_err(ActionError::permanent)?;
        let headers = self.headers(&target)?;
        let response = http
            .send_with(
                HttpRequest {
                    method: Method::POST,
                    target: &target,
                    headers,
                    body,
                    timeout,
                },
                reading_body(),
            )
            .await
            .map_err(|e| e.context(target.shown()))?;
        if response.status.is_success() {
            return Ok(());
        }
        if response.status == StatusCode::NOT_FOUND || response.status == StatusCode::GONE {
            return Err(ActionError::gone(format!(
                "{}: the push subscription has expired or was unsubscribed ({}); remove it",
                target.shown(),
                response.status.as_u16()
            )));
        }
        classify(response.status, &response.headers).map_err(|e| {
            e.detail(&response.body_snippet(200))
                .context(target.shown())
        })
    }

    fn headers(&self, target: &Target) -> Result<HeaderMap, ActionError> {
        let now = chrono::Utc::now().timestamp();
        let claims = json!({
            "aud": target.url().origin().ascii_serialization(),
            "exp": now + VAPID_LIFETIME_SECS,
            "sub": self.subject,
        });
        let token = jwt(&json!({"typ": "JWT", "alg": "ES256"}), &claims, |input| {
            let signature: Signature = self.key.sign(input);
            Ok(signature.to_bytes().to_vec())
        })
        .map_err(ActionError::permanent)?;
        let mut authorization =
            HeaderValue::from_str(&format!("vapid t={token}, k={}", self.public_key))
                .expect("base64url is a valid header value");
        authorization.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, authorization);
        headers.insert(CONTENT_ENCODING, HeaderValue::from_static("aes128gcm"));
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        headers.insert("ttl", HeaderValue::from(self.ttl.as_secs()));
        headers.insert("urgency", HeaderValue::from_static(self.urgency));
        Ok(headers)
    }
}

/// `{"title", "body", "data"}`, absent parts left out.
fn payload(content: &Content) -> Value {
    let mut payload = Map::new();
    if let Some(title) = &content.title {
        payload.insert("title".into(), json!(title));
    }
    if let Some(body) = &content.body {
        payload.insert("body".into(), json!(body));
    }
    if let Some(data) = &content.data {
        payload.insert("data".into(), Value::Object(data.clone()));
    }
    Value::Object(payload)
}

/// A new ephemeral key and salt from the operating system's generator.
fn fresh_key_and_salt() -> Result<(SecretKey, [u8; 16]), ActionError> {
    let rng = SystemRandom::new();
    let failed = |_| ActionError::transient("the system random generator failed");
    let mut salt = [0u8; 16];
    rng.fill(&mut salt).map_err(failed)?;
    loop {
        let mut scalar = [0u8; 32];
        rng.fill(&mut scalar).map_err(failed)?;
        // Out of range (probability below 2^-32): draw again.
        if let Ok(key) = SecretKey::from_slice(&scalar) {
            return Ok((key, salt));
        }
    }
}

/// RFC 8291 section 3.4 and RFC 8188: `plaintext` encrypted for the user agent key `ua_public`
/// (uncompressed point) and `auth_secret`, with the application server's ephemeral key
/// `as_secret` and `salt`, as one `aes128gcm` record with its header.
fn encrypt(
    plaintext: &[u8],
    ua_public: &[u8],
    auth_secret: &[u8],
    as_secret: &SecretKey,
    salt: &[u8; 16],
) -> Result<Vec<u8>, String> {
    let ua_key = PublicKey::from_sec1_bytes(ua_public)
        .map_err(|_| "keys.p256dh is not a P-256 public key".to_string())?;
    let as_public = as_secret.public_key().to_sec1_point(false);
    let as_public = as_public.as_bytes();
    let shared = as_secret.diffie_hellman(&ua_key);

    // PRK_key = HKDF-Extract(auth_secret, ecdh_secret);
    // IKM = HKDF-Expand(PRK_key, "WebPush: info" || 0x00 || ua_public || as_public, 32)
    let ikm = hkdf_sha256(
        auth_secret,
        shared.raw_secret_bytes(),
        &[b"WebPush: info\0", ua_public, as_public],
        32,
    );
    // PRK = HKDF-Extract(salt, IKM); CEK and NONCE from it (RFC 8188 section 2.2, 2.3).
    let cek = hkdf_sha256(salt, &ikm, &[b"Content-Encoding: aes128gcm\0"], 16);
    let nonce = hkdf_sha256(salt, &ikm, &[b"Content-Encoding: nonce\0"], 12);

    let key = aead::UnboundKey::new(&aead::AES_128_GCM, &cek)
        .map(aead::LessSafeKey::new)
        .map_err(|_| "cannot build the content encryption key".to_string())?;
    let nonce: [u8; 12] = nonce.try_into().expect("12 bytes were asked for");
    let mut record = Vec::with_capacity(plaintext.len() + 17);
    record.extend_from_slice(plaintext);
    record.push(0x02); // the last (and only) record's delimiter, no padding
    key.seal_in_place_append_tag(
        aead::Nonce::assume_unique_for_key(nonce),
        aead::Aad::empty(),
        &mut record,
    )
    .map_err(|_| "encryption failed".to_string())?;
    if record.len() > RECORD_SIZE as usize {
        return Err(format!(
            "the payload does not fit one {RECORD_SIZE}-byte record"
        ));
    }

    let mut message = Vec::with_capacity(86 + record.len());
    message.extend_from_slice(salt);
    message.extend_from_slice(&RECORD_SIZE.to_be_bytes());
    message.push(as_public.len() as u8);
    message.extend_from_slice(as_public);
    message.extend_from_slice(&record);
    Ok(message)
}

/// HKDF-SHA256 (RFC 5869): extract with `salt`, expand `info` (concatenated) to `len` bytes.
fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[&[u8]], len: usize) -> Vec<u8> {
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    let mut out = vec![0u8; len];
    prk.expand(info, Len(len))
        .and_then(|okm| okm.fill(&mut out))
        .expect("a length of at most 32 bytes is valid for HKDF-SHA256");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 8291 Appendix A (public test vector).
    const PLAINTEXT: &str = "When I grow up, I want to be a watermelon";
    const AS_PRIVATE: &str = "yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw";
    const AS_PUBLIC: &str =
        "BP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A8";
    const UA_PUBLIC: &str =
        "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
    const SALT: &str = "DGv6ra1nlYgDCS1FRnbzlw";
    const AUTH: &str = "BTBZMqHH6r4Tts7J_aSIgg";
    const BODY: &str = "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN";

    fn b(s: &str) -> Vec<u8> {
        decode_base64url(s).unwrap()
    }

    #[test]
    fn encryption_reproduces_the_rfc_8291_example() {
        let as_secret = SecretKey::from_slice(&b(AS_PRIVATE)).unwrap();
        assert_eq!(
            as_secret.public_key().to_sec1_point(false).as_bytes(),
            b(AS_PUBLIC).as_slice()
        );
        let salt: [u8; 16] = b(SALT).try_into().unwrap();
        let body = encrypt(
            PLAINTEXT.as_bytes(),
            &b(UA_PUBLIC),
            &b(AUTH),
            &as_secret,
            &salt,
        )
        .unwrap();
        assert_eq!(BASE64URL.encode(&body), BODY);
    }

    #[test]
    fn subscriptions_are_read_as_browsers_give_them() {
        let json = json!({"endpoint": "https://push.example.net/p/abc", "expirationTime": null,
            "keys": {"p256dh": UA_PUBLIC, "auth": AUTH}});
        let s = Subscription::from_json(&json).unwrap();
        assert_eq!(s.endpoint, "https://push.example.net/p/abc");
        assert_eq!(s.p256dh, b(UA_PUBLIC));
        assert_eq!(
            Subscription::from_json(&Value::String(json.to_string())).unwrap(),
            s
        );
        let missing = Subscription::from_json(&json!({"endpoint": "x"})).unwrap_err();
        assert!(missing.contains("keys.p256dh"), "{missing}");
        let short = Subscription::from_json(
            &json!({"endpoint": "x", "keys": {"p256dh": UA_PUBLIC, "auth": "AAEC"}}),
        )
        .unwrap_err();
        assert!(short.contains("keys.auth"), "{short}");
    }

    #[test]
    fn vapid_keys_in_the_usual_form() {
        assert!(vapid_key(AS_PRIVATE).is_ok());
        assert!(vapid_key(&format!("{AS_PRIVATE}=")).is_ok());
        assert!(vapid_key("AAEC").unwrap_err().contains("32 bytes"));
        assert!(vapid_key("not base64!").is_err());
    }
}
