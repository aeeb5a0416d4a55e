//! The SMS action against a local Twilio stand-in (axum on 127.0.0.1:0) that checks each request
//! as Twilio's Messages API documents it (path, Basic auth, form fields) and answers as Twilio
//! does, errors included (JSON `{"code", "message", "more_info", "status"}`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine;
use fraiseql_observers::actions::{Action, FailureKind};
use fraiseql_observers::{EntityEvent, EventKind};
use serde_json::json;

use crate::sample::{compile, env_of, order_event, run};

const SID: &str = "AC0123456789abcdef0123456789abcdef";
const TOKEN: &str = "auth-token-1234";

#[derive(Debug, Clone)]
struct Received {
    method: Method,
    path: String,
    headers: HeaderMap,
    form: Vec<(String, String)>,
}

struct Twilio {
    base: String,
    received: Arc<Mutex<Vec<Received>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Twilio {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Twilio {
    async fn start() -> Twilio {
        let received = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new()
            .fallback(messages)
            .with_state(received.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Twilio {
            base,
            received,
            server,
        }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

fn twilio_error(status: StatusCode, code: u32, message: &str) -> Response {
    let body = json!({
        "code": code,
        "message": message,
        "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
        "status": status.as_u16(),
    });
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `POST /2010-04-01/Accounts/{AccountSid}/Messages.json`, as Twilio answers it. The magic `To`
/// numbers follow Twilio's own test credentials where they exist.
async fn messages(
    State(received): State<Arc<Mutex<Vec<Received>>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    received.lock().unwrap().push(Received {
        method: method.clone(),
        path: uri.path().to_string(),
        headers: headers.clone(),
        form: form.clone(),
    });
    let expected_auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{SID}:{TOKEN}"))
    );
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(&expected_auth) {
        return twilio_error(StatusCode::UNAUTHORIZED, 20003, "Authenticate");
    }
    let Some(sid) = uri
        .path()
        .strip_prefix("/2010-04-01/Accounts/")
        .and_then(|rest| rest.strip_suffix("/Messages.json"))
    else {
        return twilio_error(
            StatusCode::NOT_FOUND,
            20404,
            "The requested resource was not found",
        );
    };
    if method != Method::POST
        || sid != SID
        || headers.get("content-type").and_then(|v| v.to_str().ok())
            != Some("application/x-www-form-urlencoded")
    {
        return twilio_error(StatusCode::BAD_REQUEST, 20001, "Bad request");
    }
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let Some(to) = field("To") else {
        return twilio_error(
            StatusCode::BAD_REQUEST,
            21604,
            "A 'To' phone number is required.",
        );
    };
    match to.as_str() {
        "+15005550001" => {
            return twilio_error(
                StatusCode::BAD_REQUEST,
                21211,
                "The 'To' number +15005550001 is not a valid phone number.",
            )
        }
        "+15005550009" => {
            return twilio_error(
                StatusCode::BAD_REQUEST,
                21614,
                "'To' number is not a valid mobile number",
            )
        }
        "+15005550004" => {
            return twilio_error(
                StatusCode::BAD_REQUEST,
                21610,
                "Attempt to send to unsubscribed recipient",
            )
        }
        "+15005550429" => {
            let mut response =
                twilio_error(StatusCode::TOO_MANY_REQUESTS, 20429, "Too Many Requests");
            response
                .headers_mut()
                .insert("retry-after", "7".parse().unwrap());
            return response;
        }
        "+15005550500" => {
            return twilio_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                20500,
                "Internal Server Error",
            )
        }
        _ => {}
    }
    let body = json!({
        "account_sid": SID,
        "api_version": "2010-04-01",
        "body": field("Body"),
        "direction": "outbound-api",
        "from": field("From"),
        "messaging_service_sid": field("MessagingServiceSid"),
        "num_segments": "1",
        "sid": "SM0123456789abcdef0123456789abcdef",
        "status": "queued",
        "to": to,
        "uri": format!("/2010-04-01/Accounts/{SID}/Messages/SM0123456789abcdef0123456789abcdef.json"),
    });
    (
        StatusCode::CREATED,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn env() -> impl Fn(&str) -> Option<String> {
    env_of(&[("TWILIO_ACCOUNT_SID", SID), ("TWILIO_AUTH_TOKEN", TOKEN)])
}

fn sms_action(base: &str, fields: &str) -> Action {
    compile(
        &format!(
            r#"type = "sms"
               account_sid_env = "TWILIO_ACCOUNT_SID"
               auth_token_env = "TWILIO_AUTH_TOKEN"
               base_url = "{base}"
               allow_private_networks = true
               {fields}"#
        ),
        &env(),
        None,
        None,
    )
    .unwrap()
}

fn order(phone: &str) -> EntityEvent {
    order_event(
        EventKind::Created,
        None,
        Some(json!({"id": 7, "phone": phone, "total": "12.50", "note": "crème & co = 100%"})),
    )
}

#[tokio::test]
async fn sms_is_posted_as_twilio_documents() {
    let twilio = Twilio::start().await;
    let action = sms_action(
        &twilio.base,
        r#"from = "+15005550006"
           to_template = " {{ after.phone }} "
           message_template = "Order {{ after.id }} paid: {{ after.total }} EUR ({{ after.note }})""#,
    );
    run(&action, &order("+33612345678"), 1)
        .await
        .expect("accepted with 201");

    let received = twilio.received();
    assert_eq!(received.len(), 1);
    let r = &received[0];
    assert_eq!(r.method, Method::POST);
    assert_eq!(r.path, format!("/2010-04-01/Accounts/{SID}/Messages.json"));
    assert_eq!(
        r.headers["content-type"],
        "application/x-www-form-urlencoded"
    );
    assert_eq!(
        r.headers["authorization"],
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{SID}:{TOKEN}"))
        )
        .as_str()
    );
    assert_eq!(
        r.form,
        [
            ("To".to_string(), "+33612345678".to_string()),
            ("From".to_string(), "+15005550006".to_string()),
            (
                "Body".to_string(),
                "Order 7 paid: 12.50 EUR (crème & co = 100%)".to_string()
            ),
        ]
    );
}

#[tokio::test]
async fn messaging_service_and_fixed_recipient() {
    let twilio = Twilio::start().await;
    let action = sms_action(
        &twilio.base,
        r#"messaging_service_sid = "MG0123456789abcdef0123456789abcdef"
           to = "+33700000000"
           message_template = "{{ event.entity_type }} {{ event.kind }}""#,
    );
    run(&action, &order("+1"), 1).await.unwrap();
    assert_eq!(
        twilio.received()[0].form,
        [
            ("To".to_string(), "+33700000000".to_string()),
            (
                "MessagingServiceSid".to_string(),
                "MG0123456789abcdef0123456789abcdef".to_string()
            ),
            ("Body".to_string(), "Order INSERT".to_string()),
        ]
    );
}

#[tokio::test]
async fn twilio_errors_are_classified() {
    let twilio = Twilio::start().await;
    let action = sms_action(
        &twilio.base,
        r#"from = "+15005550006"
           to_template = "{{ after.phone }}"
           message_template = "hello""#,
    );
    for (phone, code) in [
        ("+15005550001", "21211"),
        ("+15005550009", "21614"),
        ("+15005550004", "21610"),
    ] {
        let err = run(&action, &order(phone), 1).await.unwrap_err();
        assert!(err.kind == FailureKind::Permanent, "{phone}: {err:?}");
        assert!(err.message().contains(code), "{err}");
        assert!(
            err.message().starts_with("sms twilio http://127.0.0.1:"),
            "{err}"
        );
        assert!(
            !err.message().contains(SID),
            "no account SID in messages: {err}"
        );
    }
    let err = run(&action, &order("+15005550004"), 1).await.unwrap_err();
    assert!(err.message().contains("unsubscribed"), "{err}");

    let err = run(&action, &order("+15005550429"), 1).await.unwrap_err();
    assert!(err.kind == FailureKind::Transient, "{err:?}");
    assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
    let err = run(&action, &order("+15005550500"), 1).await.unwrap_err();
    assert!(err.kind == FailureKind::Transient, "{err:?}");
    assert_eq!(twilio.received().len(), 6);

    // A wrong token: Twilio's 20003, permanent.
    let wrong = compile(
        &format!(
            r#"type = "sms"
               account_sid_env = "TWILIO_ACCOUNT_SID"
               auth_token_env = "TWILIO_AUTH_TOKEN"
               base_url = "{}"
               allow_private_networks = true
               from = "+15005550006"
               to = "+33612345678"
               message_template = "hello""#,
            twilio.base
        ),
        &env_of(&[("TWILIO_ACCOUNT_SID", SID), ("TWILIO_AUTH_TOKEN", "wrong")]),
        None,
        None,
    )
    .unwrap();
    let err = run(&wrong, &order("+1"), 1).await.unwrap_err();
    assert!(err.kind == FailureKind::Permanent, "{err:?}");
    assert!(err.message().contains("20003"), "{err}");
    assert!(!err.message().contains("wrong"), "{err}");
}

#[tokio::test]
async fn bad_renders_and_private_targets_send_nothing() {
    let twilio = Twilio::start().await;
    let action = sms_action(
        &twilio.base,
        r#"from = "+15005550006"
           to_template = "{{ after.phone }}"
           message_template = "{{ after.missing }}""#,
    );
    let err = run(&action, &order("+33612345678"), 1).await.unwrap_err();
    assert!(err.message().contains("empty message"), "{err}");
    let action = sms_action(
        &twilio.base,
        r#"from = "+15005550006"
           to_template = "{{ after.phone }}"
           message_template = "hi""#,
    );
    let err = run(&action, &order("+33\r\n612345678"), 1)
        .await
        .unwrap_err();
    assert!(err.kind == FailureKind::Permanent, "{err:?}");
    let err = run(&action, &order(""), 1).await.unwrap_err();
    assert!(err.message().contains("is empty"), "{err}");

    // Without allow_private_networks, a loopback base URL is refused before sending.
    let guarded = compile(
        &format!(
            r#"type = "sms"
               account_sid_env = "TWILIO_ACCOUNT_SID"
               auth_token_env = "TWILIO_AUTH_TOKEN"
               base_url = "{}"
               from = "+15005550006"
               to = "+33612345678"
               message_template = "hi""#,
            twilio.base
        ),
        &env(),
        None,
        None,
    )
    .unwrap();
    let err = run(&guarded, &order("+1"), 1).await.unwrap_err();
    assert!(err.kind == FailureKind::Permanent, "{err:?}");
    assert!(err.message().contains("allow_private_networks"), "{err}");
    assert!(twilio.received().is_empty());
}

#[test]
fn config_errors_are_caught_at_load() {
    let errors = compile(
        r#"type = "sms"
           account_sid_env = "TWILIO_ACCOUNT_SID"
           auth_token_env = "MISSING_TOKEN"
           from = "+15005550006"
           to = "+33612345678"
           message_template = "hi""#,
        &env(),
        None,
        None,
    )
    .unwrap_err();
    assert_eq!(
        errors[0].to_string(),
        "observers.order_paid.actions[0].auth_token_env: environment variable 'MISSING_TOKEN' is not set"
    );
    let errors = compile(
        r#"type = "sms"
           provider = "nexmo"
           to = "+33612345678"
           message_template = "hi""#,
        &env(),
        None,
        None,
    )
    .unwrap_err();
    assert_eq!(
        errors[0].to_string(),
        "observers.order_paid.actions[0].provider: unknown SMS provider 'nexmo'; known providers: twilio"
    );
    let errors = compile(
        r#"type = "sms"
           account_sid_env = "TWILIO_ACCOUNT_SID"
           auth_token_env = "TWILIO_AUTH_TOKEN"
           from = "+15005550006""#,
        &env(),
        None,
        None,
    )
    .unwrap_err();
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "observers.order_paid.actions[0].to",
            "observers.order_paid.actions[0].message_template"
        ]
    );
}
