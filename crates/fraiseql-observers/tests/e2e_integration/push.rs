//! The push action against local servers that behave like FCM (OAuth2 token endpoint + HTTP v1
//! send), APNs (HTTP/2 only, token auth) and a Web Push service. The servers verify what a
//! provider verifies (JWT signatures with the test's public keys, claims, headers) and answer
//! as the provider does; the tests then check what arrived, byte for byte. The Web Push payload
//! is decrypted here, with the subscription's private key, by an implementation of RFC 8291
//! independent of the library's (RustCrypto `hkdf` + `aes-gcm` here, `ring` there). Keys are
//! generated at test time.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::Aes128Gcm;
use axum::http::{Method, Version};
use base64::engine::general_purpose::{STANDARD as BASE64, URL_SAFE_NO_PAD as BASE64URL};
use base64::Engine;
use chrono::TimeZone;
use fraiseql_observers::actions::{Action, ActionError, FailureKind};
use fraiseql_observers::delivery::delivery_id;
use fraiseql_observers::testing::{self, Request, TestServer};
use fraiseql_observers::{ConfigError, EntityEvent, EventKind, Position};
use hkdf::Hkdf;
use p256::ecdsa::signature::Verifier as _;
use p256::elliptic_curve::sec1::ToSec1Point;
use p256::pkcs8::EncodePrivateKey;
use rsa::sha2::Sha256;
use serde_json::{json, Value};
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// The kit's test server (HTTP/1.1 and h2c, records every request), answering with `answer`.

/// `(status, headers, body)`.
type Answer = (u16, Vec<(&'static str, String)>, String);

/// A test server answering with `handler`; a body is `text/plain` unless the answer names its
/// content type.
async fn serve(handler: impl Fn(&Request) -> Answer + Send + Sync + 'static) -> TestServer {
    TestServer::with(move |request: &Request| {
        let (status, headers, body) = handler(request);
        let typed = headers.iter().any(|(name, _)| *name == "content-type");
        let mut answer = testing::Answer::status(status).body(body);
        if !typed {
            answer = answer.header("content-type", "text/plain; charset=utf-8");
        }
        headers
            .into_iter()
            .fold(answer, |answer, (name, value)| answer.header(name, value))
    })
    .await
}

fn json_answer(status: u16, body: Value) -> Answer {
    (
        status,
        vec![("content-type", "application/json".to_string())],
        body.to_string(),
    )
}

// ---------------------------------------------------------------------------------------------
// Events, actions, keys.

const APNS_TOKEN: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";

fn order_event(after: Value) -> EntityEvent {
    EntityEvent {
        id: Uuid::parse_str("0190f0a2-0000-7000-8000-000000000001").unwrap(),
        sequence: 101,
        kind: EventKind::Updated,
        entity_type: "Order".into(),
        entity_id: Uuid::parse_str("0190f0a2-0000-7000-8000-0000000000aa").unwrap(),
        tenant: None,
        author: Some("alice".into()),
        before: None,
        after: Some(after.into()),
        change_status: "updated".into(),
        extra_metadata: json!({}),
        source: None,
        created_at: chrono::Utc.with_ymd_and_hms(2024, 5, 1, 12, 30, 0).unwrap(),
        source_ts: None,
        position: Position {
            batch: 1,
            sequence: 101,
        },
    }
}

fn order(token: &str) -> EntityEvent {
    order_event(json!({
        "id": 7, "email": "alice@example.com", "status": "paid", "total": 42.5,
        "device_token": token,
    }))
}

fn action(toml_src: &str, env: &[(&str, &str)]) -> Result<Action, Vec<ConfigError>> {
    crate::sample::compile_at(
        "observers.o.actions[0]",
        toml_src,
        &crate::sample::env_of(env),
        None,
        None,
    )
}

async fn run(action: &Action, event: &EntityEvent) -> Result<(), ActionError> {
    crate::sample::run(action, event, 1).await
}

/// The signing input and the decoded header, claims and signature of a compact JWS.
fn split_jwt(token: &str) -> (String, Value, Value, Vec<u8>) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT has three parts: {token}");
    let decode = |p: &str| -> Value {
        serde_json::from_slice(&BASE64URL.decode(p).expect("base64url")).expect("JSON")
    };
    (
        format!("{}.{}", parts[0], parts[1]),
        decode(parts[0]),
        decode(parts[1]),
        BASE64URL.decode(parts[2]).expect("base64url signature"),
    )
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// rand 0.9's generator behind the `rand_core` 0.10 traits the `rsa` crate takes.
struct TestRng;

impl rsa::rand_core::TryRng for TestRng {
    type Error = Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(rand::random())
    }
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(rand::random())
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        rand::fill(dst);
        Ok(())
    }
}

impl rsa::rand_core::TryCryptoRng for TestRng {}

/// One RSA key for the whole test binary (generating one is slow in a debug build).
pub(crate) static RSA_KEY: LazyLock<rsa::PrivateKey> =
    LazyLock::new(|| rsa::PrivateKey::new(&mut TestRng, 2048).expect("RSA key generation"));

/// A service-account JSON with the test RSA key, whose tokens come from `token_uri`.
pub(crate) fn service_account_json(token_uri: &str) -> String {
    json!({
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": "key-1",
        "private_key": pem("PRIVATE KEY", RSA_KEY.to_pkcs8_der().unwrap().as_bytes()),
        "client_email": CLIENT_EMAIL,
        "client_id": "1234567890",
        "token_uri": token_uri,
    })
    .to_string()
}

pub(crate) fn pem(label: &str, der: &[u8]) -> String {
    let body = BASE64.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

fn p256_key() -> p256::SecretKey {
    loop {
        if let Ok(key) = p256::SecretKey::from_slice(&rand::random::<[u8; 32]>()) {
            return key;
        }
    }
}

fn uncompressed(key: &p256::PublicKey) -> Vec<u8> {
    key.to_sec1_point(false).as_bytes().to_vec()
}

fn verify_es256(public: &p256::PublicKey, input: &str, signature: &[u8]) -> bool {
    let Ok(signature) = p256::ecdsa::Signature::from_slice(signature) else {
        return false;
    };
    p256::ecdsa::VerifyingKey::from(*public)
        .verify(input.as_bytes(), &signature)
        .is_ok()
}

// ---------------------------------------------------------------------------------------------
// FCM

pub(crate) const PROJECT: &str = "demo-project";
const CLIENT_EMAIL: &str = "observers@demo-project.iam.gserviceaccount.com";
pub(crate) const FCM_SEND: &str = "/v1/projects/demo-project/messages:send";

#[derive(Default)]
struct FcmState {
    issued: Vec<String>,
    token_answers: VecDeque<Answer>,
    send_answers: VecDeque<Answer>,
}

pub(crate) struct FakeFcm {
    pub(crate) server: TestServer,
    state: Arc<Mutex<FcmState>>,
}

fn form(body: &[u8]) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'%' => {
                    out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                    i += 3;
                }
                b'+' => {
                    out.push(b' ');
                    i += 1;
                }
                b => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        String::from_utf8(out).unwrap()
    }
    std::str::from_utf8(body)
        .unwrap()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

/// What Google's token endpoint checks: the grant type, the assertion's RS256 signature with
/// the service account's public key, its claims. Err is the `error_description`.
fn check_token_request(request: &Request, token_uri: &str) -> Result<(), String> {
    if request.required_header("content-type") != "application/x-www-form-urlencoded" {
        return Err(format!(
            "content-type {}",
            request.required_header("content-type")
        ));
    }
    let form = form(&request.body);
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .ok_or(format!("no {name}"))
    };
    if field("grant_type")? != "urn:ietf:params:oauth:grant-type:jwt-bearer" {
        return Err("grant_type".into());
    }
    let (input, header, claims, signature) = split_jwt(&field("assertion")?);
    if header["alg"] != "RS256" || header["typ"] != "JWT" || header["kid"] != "key-1" {
        return Err(format!("header {header}"));
    }
    let verifying = rsa::pkcs1v15::VerifyingKey::<Sha256>::new(RSA_KEY.to_public_key());
    let signature = rsa::pkcs1v15::Signature::try_from(signature.as_slice())
        .map_err(|e| format!("signature: {e}"))?;
    rsa::signature::Verifier::verify(&verifying, input.as_bytes(), &signature)
        .map_err(|_| "Invalid JWT Signature.".to_string())?;
    let iat = claims["iat"].as_i64().ok_or("iat")?;
    let exp = claims["exp"].as_i64().ok_or("exp")?;
    if claims["iss"] != CLIENT_EMAIL
        || claims["scope"] != "https://www.googleapis.com/auth/firebase.messaging"
        || claims["aud"] != token_uri
        || exp - iat != 3600
        || (now() - iat).abs() > 60
    {
        return Err(format!("claims {claims}"));
    }
    Ok(())
}

impl FakeFcm {
    pub(crate) async fn start() -> FakeFcm {
        let state = Arc::new(Mutex::new(FcmState::default()));
        let shared = state.clone();
        let token_uri = Arc::new(Mutex::new(String::new()));
        let uri = token_uri.clone();
        let server = serve(move |request| {
            let mut state = shared.lock().unwrap();
            match request.uri.path() {
                "/token" => {
                    if let Some(answer) = state.token_answers.pop_front() {
                        return answer;
                    }
                    if let Err(why) = check_token_request(request, &uri.lock().unwrap()) {
                        return json_answer(
                            400,
                            json!({"error": "invalid_grant", "error_description": why}),
                        );
                    }
                    let token = format!("ya29.test-token-{}", state.issued.len() + 1);
                    state.issued.push(token.clone());
                    json_answer(
                        200,
                        json!({"access_token": token, "expires_in": 3599, "token_type": "Bearer"}),
                    )
                }
                FCM_SEND => {
                    let expected = state.issued.last().map(|t| format!("Bearer {t}"));
                    let bearer = request
                        .headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok());
                    if expected.is_none() || bearer != expected.as_deref() {
                        return json_answer(
                            401,
                            json!({"error": {"code": 401, "status": "UNAUTHENTICATED",
                                "message": "Request had invalid authentication credentials."}}),
                        );
                    }
                    state.send_answers.pop_front().unwrap_or_else(|| {
                        json_answer(200, json!({"name": "projects/demo-project/messages/0:1"}))
                    })
                }
                _ => json_answer(404, json!({})),
            }
        })
        .await;
        *token_uri.lock().unwrap() = format!("{}/token", server.base);
        FakeFcm { server, state }
    }

    pub(crate) fn token_uri(&self) -> String {
        format!("{}/token", self.server.base)
    }

    pub(crate) fn service_account(&self) -> String {
        service_account_json(&self.token_uri())
    }

    fn action(&self) -> Action {
        action(
            &format!(
                r#"type = "push"
                   provider = "fcm"
                   token_field = "after.device_token"
                   title_template = "Order {{{{ after.id }}}} paid"
                   body_template = "{{{{ after.total }}}} EUR for {{{{ after.email }}}}"
                   data_template = '{{"order_id": {{{{ after.id }}}}, "status": {{{{ after.status }}}}, "none": null}}'
                   service_account_env = "FCM_SA"
                   base_url = "{}"
                   allow_private_networks = true"#,
                self.server.base
            ),
            &[("FCM_SA", &self.service_account())],
        )
        .unwrap()
    }

    fn issued(&self) -> Vec<String> {
        self.state.lock().unwrap().issued.clone()
    }

    fn answer_send(&self, answer: Answer) {
        self.state.lock().unwrap().send_answers.push_back(answer);
    }
}

fn fcm_error(code: u16, status: &str, fcm_code: &str, message: &str) -> Answer {
    json_answer(
        code,
        json!({"error": {"code": code, "message": message, "status": status, "details": [
            {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": fcm_code}
        ]}}),
    )
}

#[tokio::test]
async fn fcm_exchanges_a_signed_assertion_for_a_token_and_sends_the_exact_message() {
    let fcm = FakeFcm::start().await;
    let push = fcm.action();
    run(&push, &order("fcm-device-token-0001")).await.unwrap();
    run(&push, &order("fcm-device-token-0002")).await.unwrap();

    // One token exchange, verified by the server and again here; the token is reused.
    let exchanges = fcm.server.on("/token");
    assert_eq!(exchanges.len(), 1, "the access token is cached");
    check_token_request(&exchanges[0], &fcm.token_uri()).unwrap();
    assert_eq!(exchanges[0].method, Method::POST);

    let sends = fcm.server.on(FCM_SEND);
    assert_eq!(sends.len(), 2);
    for (send, token) in sends
        .iter()
        .zip(["fcm-device-token-0001", "fcm-device-token-0002"])
    {
        assert_eq!(send.method, Method::POST);
        assert_eq!(
            send.required_header("authorization"),
            "Bearer ya29.test-token-1"
        );
        assert_eq!(send.required_header("content-type"), "application/json");
        assert_eq!(
            send.json(),
            json!({"message": {
                "token": token,
                "notification": {"title": "Order 7 paid", "body": "42.5 EUR for alice@example.com"},
                "data": {"order_id": "7", "status": "paid"}
            }})
        );
    }
}

#[tokio::test]
async fn fcm_gets_a_new_token_once_when_the_cached_one_is_refused() {
    let fcm = FakeFcm::start().await;
    let push = fcm.action();
    run(&push, &order("fcm-device-token-0001")).await.unwrap();
    assert_eq!(fcm.issued().len(), 1);

    // The token was revoked: 401, a new token, the message goes through.
    fcm.answer_send(fcm_error(
        401,
        "UNAUTHENTICATED",
        "THIRD_PARTY_AUTH_ERROR",
        "revoked",
    ));
    run(&push, &order("fcm-device-token-0001")).await.unwrap();
    assert_eq!(fcm.issued().len(), 2);
    let sends = fcm.server.on(FCM_SEND);
    assert_eq!(sends.len(), 3);
    assert_eq!(
        sends[1].required_header("authorization"),
        "Bearer ya29.test-token-1"
    );
    assert_eq!(
        sends[2].required_header("authorization"),
        "Bearer ya29.test-token-2"
    );

    // Refused twice: permanent, and only one more token asked for.
    fcm.answer_send(fcm_error(
        401,
        "UNAUTHENTICATED",
        "THIRD_PARTY_AUTH_ERROR",
        "no",
    ));
    fcm.answer_send(fcm_error(
        401,
        "UNAUTHENTICATED",
        "THIRD_PARTY_AUTH_ERROR",
        "no",
    ));
    let err = run(&push, &order("fcm-device-token-0001"))
        .await
        .unwrap_err();
    assert!(err.kind == FailureKind::Permanent, "{err:?}");
    assert!(err.message().contains("401"), "{err}");
    assert_eq!(fcm.issued().len(), 3);
    assert_eq!(fcm.server.on(FCM_SEND).len(), 5);
}

#[tokio::test]
async fn fcm_answers_are_classified_and_dead_tokens_reported() {
    let fcm = FakeFcm::start().await;
    let push = fcm.action();

    fcm.answer_send(fcm_error(
        404,
        "NOT_FOUND",
        "UNREGISTERED",
        "Requested entity was not found.",
    ));
    let err = run(&push, &order("fcm-token-of-an-uninstalled-app-AB12CD34"))
        .await
        .unwrap_err();
    assert!(err.kind == FailureKind::Gone, "{err:?}");
    assert!(
        err.message().contains("...AB12CD34"),
        "names the token: {err}"
    );
    assert!(err.message().contains("UNREGISTERED"), "{err}");
    assert!(
        !err.message().contains("uninstalled"),
        "not the whole token: {err}"
    );

    fcm.answer_send(fcm_error(
        400,
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        "The registration token is not a valid FCM registration token",
    ));
    let err = run(&push, &order("garbage")).await.unwrap_err();
    assert!(err.kind == FailureKind::Gone, "{err:?}");

    fcm.answer_send(fcm_error(
        400,
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        "Invalid value at 'message.data[0].value'",
    ));
    let err = run(&push, &order("fcm-device-token-0001"))
        .await
        .unwrap_err();
    assert!(err.kind == FailureKind::Permanent, "{err:?}");

    let (status, mut headers, body) =
        fcm_error(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED", "quota");
    headers.push(("retry-after", "7".into()));
    fcm.answer_send((status, headers, body));
    let err = run(&push, &order("fcm-device-token-0001"))
        .await
        .unwrap_err();
    assert_eq!(err.retry_after(), Some(Duration::from_secs(7)), "{err:?}");

    fcm.answer_send(fcm_error(503, "UNAVAILABLE", "UNAVAILABLE", "try later"));
    let err = run(&push, &order("fcm-device-token-0001"))
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err:?}");

    // The token endpoint's own refusals, with a fresh action (no cached token).
    let push = fcm.action();
    fcm.state
        .lock()
        .unwrap()
        .token_answers
        .push_back(json_answer(
            400,
            json!({"error": "invalid_grant", "error_description": "Invalid JWT Signature."}),
        ));
    let err = run(&push, &order("fcm-device-token-0001"))
        .await
        .unwrap_err();
    assert!(err.kind == FailureKind::Permanent, "{err:?}");
    assert!(err.message().contains("invalid_grant"), "{err}");
    assert!(err.message().contains("token endpoint"), "{err}");
    fcm.state
        .lock()
        .unwrap()
        .token_answers
        .push_back(json_answer(503, json!({"error": "backend_error"})));
    let err = run(&push, &order("fcm-device-token-0001"))
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
}

#[tokio::test]
async fn fcm_service_account_from_a_file_and_the_ssrf_guard() {
    let fcm = FakeFcm::start().await;
    let file = std::env::temp_dir().join(format!("fo-sa-{}.json", rand::random::<u64>()));
    std::fs::write(&file, fcm.service_account()).unwrap();
    let config = |allow: bool| {
        format!(
            r#"type = "push"
               provider = "fcm"
               token_template = "{{{{ after.device_token }}}}"
               body_template = "hello"
               service_account_file = "{}"
               base_url = "{}"
               allow_private_networks = {allow}"#,
            file.display(),
            fcm.server.base
        )
    };
    let push = action(&config(true), &[]).unwrap();
    run(&push, &order("fcm-device-token-0001")).await.unwrap();
    assert_eq!(
        fcm.server.on(FCM_SEND)[0].json()["message"],
        json!({"token": "fcm-device-token-0001", "notification": {"body": "hello"}})
    );

    // Without allow_private_networks, the loopback token endpoint is refused before any request.
    let before = fcm.server.requests().len();
    let guarded = action(&config(false), &[]).unwrap();
    let err = run(&guarded, &order("fcm-device-token-0001"))
        .await
        .unwrap_err();
    assert!(err.kind == FailureKind::Permanent, "{err:?}");
    assert!(err.message().contains("allow_private_networks"), "{err}");
    assert_eq!(fcm.server.requests().len(), before);
    std::fs::remove_file(&file).unwrap();
}

// ---------------------------------------------------------------------------------------------
// APNs

const TEAM: &str = "TEAM123456";
const KEY_ID: &str = "KEY1234567";
const BUNDLE: &str = "com.example.shop";

/// What APNs checks: HTTP/2, the provider token (ES256 with the team's key, `kid`, `iss`,
/// recent `iat`), the topic. Answers by device token.
fn apns_answer(request: &Request, public: &p256::PublicKey, expired_once: &Mutex<bool>) -> Answer {
    let reason = |status: u16, reason: &str| json_answer(status, json!({ "reason": reason }));
    if request.version != Version::HTTP_2 {
        return reason(400, "BadRequest(HTTP/2 required)");
    }
    let Some(jwt) = request
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bearer "))
    else {
        return reason(403, "MissingProviderToken");
    };
    let (input, header, claims, signature) = split_jwt(jwt);
    let iat = claims["iat"].as_i64().unwrap_or(0);
    if header["alg"] != "ES256"
        || header["kid"] != KEY_ID
        || claims["iss"] != TEAM
        || (now() - iat).abs() > 60
        || !verify_es256(public, &input, &signature)
    {
        return reason(403, "InvalidProviderToken");
    }
    if request.headers.get("apns-topic").map(|v| v.as_bytes()) != Some(BUNDLE.as_bytes()) {
        return reason(400, "DeviceTokenNotForTopic");
    }
    let token = request.uri.path().trim_start_matches("/3/device/");
    match &token[..2] {
        "00" => reason(410, "Unregistered"),
        "11" => reason(400, "BadDeviceToken"),
        "22" => {
            let (s, mut h, b) = reason(429, "TooManyRequests");
            h.push(("retry-after", "9".into()));
            (s, h, b)
        }
        "33" => reason(500, "InternalServerError"),
        "44" => {
            let mut expired = expired_once.lock().unwrap();
            if !*expired {
                *expired = true;
                return reason(403, "ExpiredProviderToken");
            }
            (200, vec![], String::new())
        }
        _ => (
            200,
            vec![("apns-id", request.required_header("apns-id").to_string())],
            String::new(),
        ),
    }
}

async fn fake_apns(public: p256::PublicKey) -> TestServer {
    let expired_once = Mutex::new(false);
    serve(move |request| apns_answer(request, &public, &expired_once)).await
}

fn apns_config(base: &str, key_source: &str) -> String {
    format!(
        r#"type = "push"
           provider = "apns"
           token_field = "after.device_token"
           title_template = "Order {{{{ after.id }}}} paid"
           body_template = "{{{{ after.total }}}} EUR"
           data_template = '{{"order_id": {{{{ after.id }}}}}}'
           team_id = "{TEAM}"
           key_id = "{KEY_ID}"
           {key_source}
           topic = "{BUNDLE}"
           ttl_secs = 3600
           base_url = "{base}"
           allow_private_networks = true"#
    )
}

#[tokio::test]
async fn apns_sends_over_http2_with_a_verifiable_provider_token_and_exact_headers() {
    let key = p256_key();
    let server = fake_apns(key.public_key()).await;
    let p8 = key.to_pkcs8_pem(p256::pkcs8::LineEnding::LF).unwrap();
    let push = action(
        &apns_config(&server.base, r#"private_key_env = "APNS_KEY""#),
        &[("APNS_KEY", p8.as_str())],
    )
    .unwrap();
    let event = order(APNS_TOKEN);
    let sent_at = now();
    run(&push, &event).await.unwrap();
    run(&push, &event).await.unwrap();

    let got = server.requests();
    assert_eq!(got.len(), 2);
    let first = &got[0];
    assert_eq!(first.version, Version::HTTP_2);
    assert_eq!(first.method, Method::POST);
    assert_eq!(first.uri.path(), format!("/3/device/{APNS_TOKEN}"));
    assert_eq!(first.required_header("apns-topic"), BUNDLE);
    assert_eq!(first.required_header("apns-push-type"), "alert");
    assert_eq!(first.required_header("apns-priority"), "10");
    let expiration: i64 = first.required_header("apns-expiration").parse().unwrap();
    assert!(
        (sent_at + 3600..=now() + 3600).contains(&expiration),
        "{expiration}"
    );
    let id = delivery_id(event.id, "order_paid", 0);
    let expected_id = Uuid::parse_str(id.trim_start_matches("msg_")).unwrap();
    assert_eq!(
        first.required_header("apns-id"),
        expected_id.hyphenated().to_string()
    );
    assert_eq!(first.required_header("content-type"), "application/json");
    assert_eq!(
        first.json(),
        json!({"aps": {"alert": {"title": "Order 7 paid", "body": "42.5 EUR"}}, "order_id": 7})
    );
    // The provider token verifies with the team key, and is reused.
    let jwt = first
        .required_header("authorization")
        .strip_prefix("bearer ")
        .unwrap();
    let (input, header, claims, signature) = split_jwt(jwt);
    assert_eq!(header, json!({"alg": "ES256", "kid": KEY_ID}));
    assert_eq!(claims["iss"], TEAM);
    assert!(verify_es256(&key.public_key(), &input, &signature));
    assert!(!verify_es256(&p256_key().public_key(), &input, &signature));
    assert_eq!(
        got[1].required_header("authorization"),
        first.required_header("authorization")
    );
    assert_eq!(
        got[1].required_header("apns-id"),
        first.required_header("apns-id"),
        "same delivery, same id"
    );
}

#[tokio::test]
async fn apns_answers_are_classified_and_bad_tokens_reported() {
    let key = p256_key();
    let server = fake_apns(key.public_key()).await;
    let file = std::env::temp_dir().join(format!("fo-apns-{}.p8", rand::random::<u64>()));
    std::fs::write(
        &file,
        key.to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    let push = action(
        &apns_config(
            &server.base,
            &format!(r#"private_key_file = "{}""#, file.display()),
        ),
        &[],
    )
    .unwrap();
    let token = |prefix: &str| format!("{prefix}{}", &APNS_TOKEN[2..]);

    let err = run(&push, &order(&token("00"))).await.unwrap_err();
    assert!(err.kind == FailureKind::Gone, "{err:?}");
    assert!(err.message().contains("Unregistered"), "{err}");
    assert!(
        err.message().contains(&APNS_TOKEN[56..]),
        "names the token: {err}"
    );
    let err = run(&push, &order(&token("11"))).await.unwrap_err();
    assert!(err.kind == FailureKind::Gone, "{err:?}");
    let err = run(&push, &order(&token("22"))).await.unwrap_err();
    assert_eq!(err.retry_after(), Some(Duration::from_secs(9)), "{err:?}");
    let err = run(&push, &order(&token("33"))).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");

    // An expired provider token is replaced and the notification sent again, once.
    let before = server.requests().len();
    run(&push, &order(&token("44"))).await.unwrap();
    assert_eq!(server.requests().len(), before + 2);

    // A token that is not hexadecimal never reaches the server.
    let before = server.requests().len();
    let err = run(&push, &order("not/a/token")).await.unwrap_err();
    assert!(err.kind == FailureKind::Gone, "{err:?}");
    assert_eq!(server.requests().len(), before);

    // A key the server does not know: permanent.
    let stranger = p256_key()
        .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
        .unwrap();
    let wrong = action(
        &apns_config(&server.base, r#"private_key_env = "K""#),
        &[("K", stranger.as_str())],
    )
    .unwrap();
    let err = run(&wrong, &order(APNS_TOKEN)).await.unwrap_err();
    assert!(err.kind == FailureKind::Permanent, "{err:?}");
    assert!(err.message().contains("InvalidProviderToken"), "{err}");
    std::fs::remove_file(&file).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Web Push

/// The browser's side: a subscription key pair and auth secret.
struct Browser {
    key: p256::SecretKey,
    auth: [u8; 16],
}

impl Browser {
    fn new() -> Browser {
        Browser {
            key: p256_key(),
            auth: rand::random(),
        }
    }

    fn subscription(&self, endpoint: &str) -> Value {
        json!({
            "endpoint": endpoint,
            "expirationTime": null,
            "keys": {
                "p256dh": BASE64URL.encode(uncompressed(&self.key.public_key())),
                "auth": BASE64URL.encode(self.auth),
            }
        })
    }

    /// RFC 8291 section 3.4 and RFC 8188 from the receiving end. `None` when the record does
    /// not authenticate with this subscription's keys.
    fn open(&self, body: &[u8]) -> Option<Vec<u8>> {
        let salt = &body[..16];
        assert_eq!(
            u32::from_be_bytes(body[16..20].try_into().unwrap()),
            4096,
            "rs"
        );
        let id_len = body[20] as usize;
        assert_eq!(id_len, 65, "keyid is the sender's uncompressed public key");
        let sender = p256::PublicKey::from_sec1_bytes(&body[21..21 + id_len]).unwrap();
        let ciphertext = &body[21 + id_len..];

        let shared = p256::ecdh::diffie_hellman(self.key.to_nonzero_scalar(), sender.as_affine());
        let mut key_info = b"WebPush: info\0".to_vec();
        key_info.extend(uncompressed(&self.key.public_key()));
        key_info.extend(uncompressed(&sender));
        let mut ikm = [0u8; 32];
        Hkdf::<Sha256>::new(Some(&self.auth), shared.raw_secret_bytes())
            .expand(&key_info, &mut ikm)
            .unwrap();
        let prk = Hkdf::<Sha256>::new(Some(salt), &ikm);
        let mut cek = [0u8; 16];
        prk.expand(b"Content-Encoding: aes128gcm\0", &mut cek)
            .unwrap();
        let mut nonce = [0u8; 12];
        prk.expand(b"Content-Encoding: nonce\0", &mut nonce)
            .unwrap();
        let record = Aes128Gcm::new_from_slice(&cek)
            .unwrap()
            .decrypt(&aes_gcm::aead::Nonce::<Aes128Gcm>::from(nonce), ciphertext)
            .ok()?;
        let end = record.iter().rposition(|b| *b != 0).expect("a delimiter");
        assert_eq!(record[end], 2, "the last record ends with 0x02");
        Some(record[..end].to_vec())
    }

    fn decrypt(&self, body: &[u8]) -> Vec<u8> {
        self.open(body)
            .expect("the record decrypts and authenticates")
    }
}

fn push_service_answer(request: &Request) -> Answer {
    match request.uri.path() {
        "/push/gone" => (
            410,
            vec![],
            "push subscription has unsubscribed or expired.".into(),
        ),
        "/push/missing" => (404, vec![], String::new()),
        "/push/busy" => (429, vec![("retry-after", "7".into())], String::new()),
        "/push/big" => (413, vec![], "payload too large".into()),
        _ => (201, vec![("location", "/m/1".into())], String::new()),
    }
}

const VAPID_SUBJECT: &str = "mailto:ops@example.com";

fn web_push_action(vapid: &p256::SecretKey, recipient: &str, allow: bool) -> Action {
    action(
        &format!(
            r#"type = "push"
               provider = "web_push"
               {recipient}
               title_template = "Order {{{{ after.id }}}} paid"
               body_template = "{{{{ after.total }}}} EUR"
               data_template = '{{"order_id": {{{{ after.id }}}}, "url": "/orders/7"}}'
               vapid_private_key_env = "VAPID_KEY"
               vapid_subject = "{VAPID_SUBJECT}"
               urgency = "high"
               ttl_secs = 3600
               allow_private_networks = {allow}"#
        ),
        &[("VAPID_KEY", &BASE64URL.encode(vapid.to_bytes()))],
    )
    .unwrap()
}

fn subscriber(subscription: Value) -> EntityEvent {
    order_event(json!({"id": 7, "total": 42.5, "push_subscription": subscription}))
}

#[tokio::test]
async fn web_push_payload_decrypts_with_the_subscription_key_and_vapid_verifies() {
    let server = serve(push_service_answer).await;
    let vapid = p256_key();
    let browser = Browser::new();
    let push = web_push_action(
        &vapid,
        r#"subscription_field = "after.push_subscription""#,
        true,
    );
    let event = subscriber(browser.subscription(&format!("{}/push/sub-1", server.base)));
    run(&push, &event).await.unwrap();
    run(&push, &event).await.unwrap();

    let got = server.requests();
    assert_eq!(got.len(), 2);
    let first = &got[0];
    assert_eq!(first.method, Method::POST);
    assert_eq!(first.uri.path(), "/push/sub-1");
    assert_eq!(first.required_header("content-encoding"), "aes128gcm");
    assert_eq!(
        first.required_header("content-type"),
        "application/octet-stream"
    );
    assert_eq!(first.required_header("ttl"), "3600");
    assert_eq!(first.required_header("urgency"), "high");
    for request in &got {
        let payload: Value = serde_json::from_slice(&browser.decrypt(&request.body)).unwrap();
        assert_eq!(
            payload,
            json!({"title": "Order 7 paid", "body": "42.5 EUR",
                   "data": {"order_id": 7, "url": "/orders/7"}})
        );
    }
    assert_ne!(
        got[0].body[..16],
        got[1].body[..16],
        "a fresh salt for every message"
    );
    assert_ne!(
        got[0].body[21..86],
        got[1].body[21..86],
        "a fresh sender key"
    );
    // Another subscriber's key does not decrypt it.
    let stranger = Browser::new();
    assert_eq!(stranger.open(&first.body), None);

    // VAPID: `vapid t=<jwt>, k=<public key>`, the JWT signed by that key, for this origin.
    let authorization = first.required_header("authorization");
    let (t, k) = authorization
        .strip_prefix("vapid t=")
        .and_then(|rest| rest.split_once(", k="))
        .unwrap_or_else(|| panic!("{authorization}"));
    assert_eq!(
        BASE64URL.decode(k).unwrap(),
        uncompressed(&vapid.public_key())
    );
    let (input, header, claims, signature) = split_jwt(t);
    assert_eq!(header, json!({"typ": "JWT", "alg": "ES256"}));
    assert_eq!(claims["aud"], server.base);
    assert_eq!(claims["sub"], VAPID_SUBJECT);
    let exp = claims["exp"].as_i64().unwrap();
    assert!(exp > now() && exp <= now() + 24 * 3600, "{exp}");
    let public = p256::PublicKey::from_sec1_bytes(&BASE64URL.decode(k).unwrap()).unwrap();
    assert!(verify_es256(&public, &input, &signature));
}

#[tokio::test]
async fn web_push_subscription_from_a_template_and_answers_classified() {
    let server = serve(push_service_answer).await;
    let vapid = p256_key();
    let browser = Browser::new();
    let push = web_push_action(
        &vapid,
        r#"subscription_template = '{"endpoint": {{ after.endpoint }}, "keys": {"p256dh": {{ after.p256dh }}, "auth": {{ after.auth }}}}'"#,
        true,
    );
    let event_for = |path: &str| {
        let subscription = browser.subscription(&format!("{}{path}", server.base));
        order_event(json!({
            "id": 7, "total": 1,
            "endpoint": subscription["endpoint"],
            "p256dh": subscription["keys"]["p256dh"],
            "auth": subscription["keys"]["auth"],
        }))
    };
    run(&push, &event_for("/push/ok")).await.unwrap();
    let payload: Value =
        serde_json::from_slice(&browser.decrypt(&server.on("/push/ok")[0].body)).unwrap();
    assert_eq!(payload["body"], "1 EUR");

    for gone in ["/push/gone", "/push/missing"] {
        let err = run(&push, &event_for(gone)).await.unwrap_err();
        assert!(err.kind == FailureKind::Gone, "{gone}: {err:?}");
        assert!(err.message().contains("remove it"), "{err}");
    }
    let err = run(&push, &event_for("/push/busy")).await.unwrap_err();
    assert_eq!(err.retry_after(), Some(Duration::from_secs(7)), "{err:?}");
    let err = run(&push, &event_for("/push/big")).await.unwrap_err();
    assert!(err.kind == FailureKind::Permanent, "{err:?}");

    // A subscription without keys: permanent, nothing sent.
    let before = server.requests().len();
    let err = run(
        &push,
        &order_event(json!({"endpoint": format!("{}/push/ok", server.base)})),
    )
    .await
    .unwrap_err();
    assert!(err.kind == FailureKind::Permanent, "{err:?}");
    assert_eq!(server.requests().len(), before);
}

#[tokio::test]
async fn web_push_endpoints_from_data_are_guarded() {
    let server = serve(push_service_answer).await;
    let vapid = p256_key();
    let browser = Browser::new();
    let push = web_push_action(
        &vapid,
        r#"subscription_field = "after.push_subscription""#,
        false,
    );

    // Plain http is refused without allow_private_networks.
    let err = run(
        &push,
        &subscriber(browser.subscription(&format!("{}/push/ok", server.base))),
    )
    .await
    .unwrap_err();
    assert!(err.kind == FailureKind::Permanent, "{err:?}");
    assert!(err.message().contains("not https"), "{err}");
    // An https endpoint on a private address is refused by the SSRF guard.
    let err = run(
        &push,
        &subscriber(browser.subscription("https://127.0.0.1:9/push/ok")),
    )
    .await
    .unwrap_err();
    assert!(err.kind == FailureKind::Permanent, "{err:?}");
    assert!(err.message().contains("loopback"), "{err}");
    assert!(server.requests().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Configuration errors

#[test]
fn push_config_errors_are_reported_with_their_paths() {
    let errors = |toml_src: &str, env: &[(&str, &str)]| -> Vec<(String, String)> {
        action(toml_src, env)
            .unwrap_err()
            .into_iter()
            .map(|e| (e.path.replace("observers.o.actions[0].", ""), e.message))
            .collect()
    };
    let paths = |errors: &[(String, String)]| -> Vec<String> {
        errors.iter().map(|(p, _)| p.clone()).collect()
    };

    let e = errors(r#"type = "push""#, &[]);
    assert_eq!(paths(&e), ["provider", "body_template"], "{e:?}");
    let e = errors(
        r#"type = "push"
           provider = "pigeon"
           body_template = "x""#,
        &[],
    );
    assert_eq!(paths(&e), ["provider"]);
    assert!(e[0].1.contains("unknown provider 'pigeon'"), "{e:?}");

    // FCM: the secret's variable is not set; then set but not JSON; then a file that is absent.
    let fcm = |source: &str| {
        format!(
            r#"type = "push"
               provider = "fcm"
               token_field = "after.device_token"
               body_template = "x"
               {source}"#
        )
    };
    let e = errors(&fcm(r#"service_account_env = "FCM_SA""#), &[]);
    assert_eq!(paths(&e), ["service_account_env"]);
    assert!(e[0].1.contains("'FCM_SA' is not set"), "{e:?}");
    let e = errors(
        &fcm(r#"service_account_env = "FCM_SA""#),
        &[("FCM_SA", "{not json s3cr3t")],
    );
    assert!(e[0].1.contains("not valid JSON"), "{e:?}");
    assert!(!e[0].1.contains("s3cr3t"), "{e:?}");
    let e = errors(
        &fcm(r#"service_account_env = "FCM_SA""#),
        &[(
            "FCM_SA",
            r#"{"type": "service_account", "project_id": "p"}"#,
        )],
    );
    assert_eq!(
        e.iter().map(|(_, m)| m.as_str()).collect::<Vec<_>>(),
        [
            "the service account has no 'client_email'",
            "the service account has no 'private_key'"
        ]
    );
    let e = errors(
        &fcm(r#"service_account_file = "/nonexistent/fo-sa.json""#),
        &[],
    );
    assert_eq!(paths(&e), ["service_account_file"]);
    assert!(
        e[0].1.contains("cannot read '/nonexistent/fo-sa.json'"),
        "{e:?}"
    );
    let e = errors(&fcm(""), &[]);
    assert!(e[0]
        .1
        .contains("'service_account_env' or 'service_account_file'"));

    // APNs: every missing setting at once; keys of another provider are refused.
    let e = errors(
        r#"type = "push"
           provider = "apns"
           token_field = "device_token"
           title_template = "x"
           priority = 7
           vapid_subject = "mailto:x@example.com"
           private_key_env = "APNS_KEY""#,
        &[(
            "APNS_KEY",
            "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----",
        )],
    );
    assert_eq!(
        paths(&e),
        [
            "vapid_subject",
            "token_field",
            "team_id",
            "key_id",
            "private_key_env",
            "topic",
            "priority"
        ],
        "{e:?}"
    );
    assert!(
        e[0].1.contains("does not apply to provider 'apns'"),
        "{e:?}"
    );

    // Web Push.
    let e = errors(
        r#"type = "push"
           provider = "web_push"
           subscription_field = "after.sub"
           body_template = "x"
           vapid_private_key_env = "VAPID"
           vapid_subject = "ops@example.com"
           urgency = "asap""#,
        &[("VAPID", "AAEC")],
    );
    assert_eq!(
        paths(&e),
        ["vapid_private_key_env", "vapid_subject", "urgency"],
        "{e:?}"
    );
    assert!(e[0].1.contains("32 bytes"), "{e:?}");
}
