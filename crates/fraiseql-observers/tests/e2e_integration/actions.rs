//! Actions against real local HTTP receivers (axum on 127.0.0.1:0): what arrives at the receiver
//! is asserted, not just what `execute` returns. Signatures are checked with the independent
//! `standardwebhooks` implementation.

use std::collections::BTreeSet;
use std::time::Duration;

use axum::http::{HeaderValue, Method};
use chrono::TimeZone;
use fraiseql_observers::actions::{
    Action, ActionConfig, ActionError, CompileContext, DeliveryRequest, FailureKind,
};
use fraiseql_observers::delivery::delivery_id;
use fraiseql_observers::testing::{Answer, Request, TestServer};
use fraiseql_observers::{ConfigError, EntityEvent, EventKind, Position};
use serde_json::json;
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// The test server answers according to the path: `/status/<code>` answers that code
// (`?retry_after=<v>` adds a Retry-After header, `?body=<s>` a body), `/sleep/<ms>` waits before
// answering 200, anything else answers 200 "ok".

async fn receiver() -> TestServer {
    TestServer::with(by_path).await
}

fn by_path(request: &Request) -> Answer {
    let query: Vec<(String, String)> = request
        .uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let segments: Vec<&str> = request.path().trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["status", code] => {
            let answer =
                Answer::status(code.parse().unwrap()).body(param("body").unwrap_or_default());
            match param("retry_after") {
                Some(v) => answer.retry_after(v.replace("%20", " ")),
                None => answer,
            }
        }
        ["sleep", ms] => Answer::status(200)
            .body("late")
            .after(Duration::from_millis(ms.parse().unwrap())),
        _ => Answer::status(200).body("ok"),
    }
}

// ---------------------------------------------------------------------------------------------

fn order_event(email: &str) -> EntityEvent {
    let before = json!({"id": 7, "email": "old@example.com", "status": "new"});
    let after = json!({"id": 7, "email": email, "status": "paid"});
    EntityEvent {
        id: Uuid::parse_str("0190f0a2-0000-7000-8000-000000000001").unwrap(),
        sequence: 101,
        kind: EventKind::Updated,
        entity_type: "Order".into(),
        entity_id: Uuid::parse_str("0190f0a2-0000-7000-8000-0000000000aa").unwrap(),
        tenant: Some(Uuid::parse_str("0190f0a2-0000-7000-8000-0000000000bb").unwrap()),
        author: Some("alice".into()),
        before: Some(before.into()),
        after: Some(after.into()),
        change_status: "updated".into(),
        extra_metadata: json!({"request_id": "r-1"}),
        source: Some(json!({"table": "tb_order"})),
        created_at: chrono::Utc.with_ymd_and_hms(2024, 5, 1, 12, 30, 0).unwrap(),
        source_ts: None,
        position: Position {
            batch: 1,
            sequence: 101,
        },
    }
}

/// Parse and compile one action from TOML, with `env` as the environment.
fn action(toml_src: &str, env: &[(&str, &str)]) -> Result<Action, Vec<ConfigError>> {
    let table: toml::Table = toml::from_str(toml_src).unwrap();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let lookup = move |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    ActionConfig::parse(&table, "observers.o.actions[0]")?
        .compile("observers.o.actions[0]", &CompileContext::new(&lookup))
}

async fn run(action: &Action, event: &EntityEvent, attempt: u32) -> Result<(), ActionError> {
    let id = delivery_id(event.id, "order_paid", 0);
    action
        .execute(&DeliveryRequest {
            event,
            delivery_id: &id,
            attempt,
        })
        .await
}

const SECRET_A: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SECRET_B: &str = "whsec_c2Vjb25kLXNlY3JldC1mb3Itcm90YXRpb24=";

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn webhook_is_delivered_with_exact_headers_body_and_a_verifiable_signature() {
    let rx = receiver().await;
    let hook = action(
        r#"type = "webhook"
           url_env = "HOOK_URL"
           headers = { x-team = "billing" }
           signing_secret_env = "HOOK_SECRET"
           allow_private_networks = true"#,
        &[
            ("HOOK_URL", &rx.url("/hook?token=abc")),
            ("HOOK_SECRET", SECRET_A),
        ],
    )
    .unwrap();
    let event = order_event("buyer@example.com");
    let before = chrono::Utc::now().timestamp();
    run(&hook, &event, 1).await.unwrap();
    run(&hook, &event, 2).await.unwrap();
    let after = chrono::Utc::now().timestamp();

    let got = rx.requests();
    assert_eq!(got.len(), 2, "two attempts, two requests");
    let first = &got[0];
    assert_eq!(first.method, Method::POST);
    assert_eq!(first.uri.path(), "/hook");
    assert_eq!(first.uri.query(), Some("token=abc"));
    assert_eq!(first.required_header("content-type"), "application/json");
    assert_eq!(
        first.required_header("user-agent"),
        concat!("fraiseql-observers/", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(first.required_header("x-team"), "billing");
    let id = delivery_id(event.id, "order_paid", 0);
    assert_eq!(first.required_header("webhook-id"), id);
    assert_eq!(first.required_header("idempotency-key"), id);
    let ts: i64 = first.required_header("webhook-timestamp").parse().unwrap();
    assert!(
        (before..=after).contains(&ts),
        "{ts} not in {before}..={after}"
    );
    assert_eq!(
        first.json(),
        json!({
            "type": "order.updated",
            "timestamp": "2024-05-01T12:30:00Z",
            "data": {
                "id": "0190f0a2-0000-7000-8000-000000000001",
                "sequence": 101,
                "kind": "UPDATE",
                "op": "u",
                "entity_type": "Order",
                "entity_id": "0190f0a2-0000-7000-8000-0000000000aa",
                "tenant": "0190f0a2-0000-7000-8000-0000000000bb",
                "author": "alice",
                "change_status": "updated",
                "created_at": "2024-05-01T12:30:00Z",
                "source_ts": null,
                "extra_metadata": {"request_id": "r-1"},
                "source": {"table": "tb_order"},
                "before": {"id": 7, "email": "old@example.com", "status": "new"},
                "after": {"id": 7, "email": "buyer@example.com", "status": "paid"},
                "changes": {
                    "email": {"old": "old@example.com", "new": "buyer@example.com"},
                    "status": {"old": "new", "new": "paid"}
                }
            }
        })
    );

    // Independent verification (the `standardwebhooks` crate, its own HMAC implementation).
    let verifier = standardwebhooks::Webhook::new(SECRET_A).unwrap();
    for request in &got {
        verifier
            .verify(&request.body, &request.headers)
            .expect("signature verifies");
    }
    // The retry is the same delivery: same id, same body.
    assert_eq!(got[1].required_header("webhook-id"), id);
    assert_eq!(got[1].required_header("idempotency-key"), id);
    assert_eq!(got[1].body, got[0].body);

    // A tampered body does not verify.
    let mut tampered = got[0].body.to_vec();
    tampered[0] = b' ';
    assert!(verifier.verify(&tampered, &got[0].headers).is_err());
}

#[tokio::test]
async fn rotated_secrets_send_one_signature_each() {
    let rx = receiver().await;
    let hook = action(
        &format!(
            r#"type = "webhook"
               url = "{}"
               signing_secret_env = "SECRETS"
               allow_private_networks = true"#,
            rx.url("/hook")
        ),
        &[("SECRETS", &format!("{SECRET_A} {SECRET_B}"))],
    )
    .unwrap();
    run(&hook, &order_event("x@example.com"), 1).await.unwrap();
    let got = rx.requests();
    assert_eq!(got.len(), 1);
    let signatures: Vec<&str> = got[0]
        .required_header("webhook-signature")
        .split(' ')
        .collect();
    assert_eq!(signatures.len(), 2, "{signatures:?}");
    for (signature, secret) in signatures.iter().zip([SECRET_A, SECRET_B]) {
        assert!(signature.starts_with("v1,"));
        let mut only_this = got[0].headers.clone();
        only_this.insert(
            "webhook-signature",
            HeaderValue::from_str(signature).unwrap(),
        );
        standardwebhooks::Webhook::new(secret)
            .unwrap()
            .verify(&got[0].body, &only_this)
            .unwrap_or_else(|e| panic!("{signature} must verify with its own secret: {e:?}"));
        let other = if secret == SECRET_A {
            SECRET_B
        } else {
            SECRET_A
        };
        assert!(
            standardwebhooks::Webhook::new(other)
                .unwrap()
                .verify(&got[0].body, &only_this)
                .is_err(),
            "a signature verifies only with its own secret"
        );
    }
}

#[tokio::test]
async fn raw_secret_without_prefix_signs_with_its_bytes() {
    let rx = receiver().await;
    let hook = action(
        &format!(
            r#"type = "webhook"
               url = "{}"
               signing_secret_env = "RAW"
               allow_private_networks = true"#,
            rx.url("/hook")
        ),
        &[("RAW", "not-base64-just-bytes")],
    )
    .unwrap();
    run(&hook, &order_event("x@example.com"), 1).await.unwrap();
    let got = rx.requests();
    standardwebhooks::Webhook::from_bytes(b"not-base64-just-bytes".to_vec())
        .unwrap()
        .verify(&got[0].body, &got[0].headers)
        .expect("verifies with the raw bytes as key");
}

#[tokio::test]
async fn body_template_values_are_escaped_by_construction() {
    let rx = receiver().await;
    let nasty = r#"a"b\c</script>{"forged": true}"#;
    let hook = action(
        &format!(
            r#"type = "webhook"
               url = "{}"
               method = "PUT"
               body_template = '{{"email": {{{{ after.email }}}}, "order": {{{{ after.id }}}}, "kind": {{{{ event.kind }}}}, "old": {{{{ changes.email.old }}}}}}'
               allow_private_networks = true"#,
            rx.url("/orders")
        ),
        &[],
    )
    .unwrap();
    run(&hook, &order_event(nasty), 1).await.unwrap();
    let got = rx.requests();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].method, Method::PUT);
    assert_eq!(
        got[0].json(),
        json!({"email": nasty, "order": 7, "kind": "UPDATE", "old": "old@example.com"})
    );
}

#[tokio::test]
async fn a_body_that_is_not_json_is_a_permanent_error_and_nothing_is_sent() {
    let rx = receiver().await;
    let hook = action(
        &format!(
            r#"type = "webhook"
               url = "{}"
               body_template = '{{"email": "{{{{ after.email }}}}"}}'
               allow_private_networks = true"#,
            rx.url("/hook")
        ),
        &[],
    )
    .unwrap();
    let err = run(&hook, &order_event(r#"a"b"#), 1).await.unwrap_err();
    assert!(err.kind == FailureKind::Permanent, "{err:?}");
    assert!(err.to_string().contains("not valid JSON"), "{err}");
    assert!(rx.requests().is_empty());
}

#[tokio::test]
async fn answers_are_classified_ok_transient_permanent_or_gone() {
    let rx = receiver().await;
    let event = order_event("x@example.com");
    let hook_for = |path: &str, timeout_ms: u64| {
        action(
            &format!(
                r#"type = "webhook"
                   url = "{}"
                   timeout_ms = {timeout_ms}
                   allow_private_networks = true"#,
                rx.url(path)
            ),
            &[],
        )
        .unwrap()
    };

    for code in [200, 204] {
        let path = format!("/status/{code}");
        run(&hook_for(&path, 5000), &event, 1)
            .await
            .unwrap_or_else(|e| panic!("{code}: {e:?}"));
        assert_eq!(rx.on(&path).len(), 1);
    }
    for (code, query, retry_after) in [
        (408, "", None),
        (429, "?retry_after=7", Some(Duration::from_secs(7))),
        (500, "", None),
        (503, "?retry_after=0", Some(Duration::from_secs(1))),
    ] {
        let path = format!("/status/{code}");
        let err = run(&hook_for(&format!("{path}{query}"), 5000), &event, 1)
            .await
            .unwrap_err();
        assert!(err.is_retryable(), "{code}: {err:?}");
        assert_eq!(err.retry_after(), retry_after, "{code}");
        assert!(err.to_string().contains(&code.to_string()), "{err}");
        assert_eq!(rx.on(&path).len(), 1, "{code} was sent once");
    }
    for code in [400, 401, 404] {
        let path = format!("/status/{code}");
        let err = run(&hook_for(&path, 5000), &event, 1).await.unwrap_err();
        assert!(err.kind == FailureKind::Permanent, "{code}: {err:?}");
        assert_eq!(rx.on(&path).len(), 1);
    }
    let err = run(&hook_for("/status/410", 5000), &event, 1)
        .await
        .unwrap_err();
    assert!(err.kind == FailureKind::Gone, "{err:?}");
    assert!(!err.is_retryable());

    // A receiver slower than timeout_ms: transient, and it did receive the request.
    let started = std::time::Instant::now();
    let err = run(&hook_for("/sleep/3000", 300), &event, 1)
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "timeout_ms was honoured"
    );
    assert!(err.kind == FailureKind::Transient, "timeout: {err:?}");
    assert!(err.to_string().contains("300 ms"), "{err}");
    assert_eq!(rx.on("/sleep/3000").len(), 1);
}

#[tokio::test]
async fn connection_refused_is_transient() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let hook = action(
        &format!(
            r#"type = "webhook"
               url = "http://127.0.0.1:{port}/hook?secret=s3cret"
               allow_private_networks = true"#
        ),
        &[],
    )
    .unwrap();
    let err = run(&hook, &order_event("x@example.com"), 1)
        .await
        .unwrap_err();
    assert!(err.kind == FailureKind::Transient, "refused: {err:?}");
    assert!(
        !err.to_string().contains("s3cret"),
        "no query in messages: {err}"
    );
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}/hook")),
        "{err}"
    );
}

#[tokio::test]
async fn private_targets_are_refused_unless_allowed() {
    let rx = receiver().await;
    let event = order_event("x@example.com");
    for host in ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]"] {
        let hook = action(
            &format!(
                r#"type = "webhook"
                   url = "http://{host}:{}/hook""#,
                rx.port()
            ),
            &[],
        )
        .unwrap();
        let err = run(&hook, &event, 1).await.unwrap_err();
        assert!(err.kind == FailureKind::Permanent, "{host}: {err:?}");
        let msg = err.to_string();
        assert!(msg.contains("refused"), "{msg}");
        assert!(msg.contains("allow_private_networks"), "{msg}");
        let named = host.trim_matches(['[', ']']);
        assert!(
            msg.contains(named) || msg.contains("127.0.0.1"),
            "names the host: {msg}"
        );
    }
    let slack = action(
        &format!(
            r#"type = "slack"
               webhook_url = "http://localhost:{}/slack""#,
            rx.port()
        ),
        &[],
    )
    .unwrap();
    let err = run(&slack, &event, 1).await.unwrap_err();
    assert!(err.kind == FailureKind::Permanent, "{err:?}");
    assert!(rx.requests().is_empty(), "the receiver got nothing");
}

#[tokio::test]
async fn slack_message_is_posted_with_channel_and_rendered_text() {
    let rx = receiver().await;
    let slack = action(
        r##"type = "slack"
           webhook_url_env = "SLACK_URL"
           channel = "#orders"
           username = "orders-bot"
           icon_emoji = ":moneybag:"
           message_template = "Order {{ after.id }} is {{ after.status }} ({{ changes.status.old }} -> {{ changes.status.new }}) for {{ after.email }}"
           allow_private_networks = true"##,
        &[("SLACK_URL", &rx.url("/services/T000/B000/XXXX"))],
    )
    .unwrap();
    run(&slack, &order_event(r#"q"uote@example.com"#), 1)
        .await
        .unwrap();
    let got = rx.requests();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].method, Method::POST);
    assert_eq!(got[0].uri.path(), "/services/T000/B000/XXXX");
    assert_eq!(got[0].required_header("content-type"), "application/json");
    assert_eq!(
        got[0].json(),
        json!({
            "text": r#"Order 7 is paid (new -> paid) for q"uote@example.com"#,
            "channel": "#orders",
            "username": "orders-bot",
            "icon_emoji": ":moneybag:"
        })
    );
}

/// Issue 9, 5g: a value from the event cannot mention the channel or add a link; the template's
/// own markup and values marked `safe` pass as they are.
#[tokio::test]
async fn slack_escapes_event_values_but_not_the_templates_markup_or_safe_values() {
    let rx = receiver().await;
    let slack = action(
        r##"type = "slack"
           webhook_url_env = "SLACK_URL"
           message_template = "<https://shop.example/o/{{ after.id }}|Order {{ after.id }}> for {{ after.email }} ({{ after.status | safe }})"
           allow_private_networks = true"##,
        &[("SLACK_URL", &rx.url("/services/T000/B000/XXXX"))],
    )
    .unwrap();
    let mut event = order_event("<!channel> <https://evil.example|invoice> & co");
    event.after.as_mut().unwrap()["status"] = json!("<@U123> paid");
    run(&slack, &event, 1).await.unwrap();
    let got = rx.requests();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].json()["text"],
        "<https://shop.example/o/7|Order 7> for &lt;!channel&gt; &lt;https://evil.example|invoice&gt; &amp; co (<@U123> paid)"
    );
}

#[tokio::test]
async fn slack_default_message_and_error_answers() {
    let rx = receiver().await;
    let slack_to = |path: &str| {
        action(
            &format!(
                r#"type = "slack"
                   webhook_url = "{}"
                   allow_private_networks = true"#,
                rx.url(path)
            ),
            &[],
        )
        .unwrap()
    };
    let event = order_event("x@example.com");
    run(&slack_to("/ok"), &event, 1).await.unwrap();
    assert_eq!(
        rx.requests()[0].json(),
        json!({"text": "Order 0190f0a2-0000-7000-8000-0000000000aa UPDATE"})
    );

    let err = run(&slack_to("/status/400?body=invalid_payload"), &event, 1)
        .await
        .unwrap_err();
    assert!(err.kind == FailureKind::Permanent, "{err:?}");
    assert!(err.to_string().contains("invalid_payload"), "{err}");
    assert!(
        !err.to_string().contains("/status"),
        "the secret URL path is not shown: {err}"
    );

    // A wrong channel is this message's problem; `no_service` means the webhook was removed.
    let err = run(&slack_to("/status/404?body=channel_not_found"), &event, 1)
        .await
        .unwrap_err();
    assert!(err.kind == FailureKind::Permanent, "{err:?}");
    assert!(err.to_string().contains("channel_not_found"), "{err}");
    let err = run(&slack_to("/status/404?body=no_service"), &event, 1)
        .await
        .unwrap_err();
    assert!(err.kind == FailureKind::Gone, "{err:?}");
    assert!(err.to_string().contains("no_service"), "{err}");
    let err = run(&slack_to("/status/410?body=channel_is_archived"), &event, 1)
        .await
        .unwrap_err();
    assert!(err.kind == FailureKind::Gone, "{err:?}");

    let err = run(&slack_to("/status/429?retry_after=30"), &event, 1)
        .await
        .unwrap_err();
    assert_eq!(err.retry_after(), Some(Duration::from_secs(30)));
    let err = run(&slack_to("/status/500"), &event, 1).await.unwrap_err();
    assert!(err.is_retryable());
}

#[test]
fn config_errors_are_all_reported_with_their_paths() {
    let file: toml::Table = toml::from_str(
        r##"
        [[observers.order_paid.actions]]
        type = "webhook"
        timeout_ms = 1000

        [[observers.order_paid.actions]]
        type = "webhook"
        url = "https://example.com/a"
        url_env = "HOOK_URL"

        [[observers.order_paid.actions]]
        type = "webhook"
        url = "https://example.com/b"
        signing_secret_env = "MISSING_SECRET"

        [[observers.order_paid.actions]]
        type = "webhook"
        url = "https://example.com/c"
        body_template = '{"a": {{ after.a }'

        [[observers.order_paid.actions]]
        type = "slack"
        webhook_url_env = "SLACK_URL"
        chanel = "#typo"

        [[observers.order_paid.actions]]
        type = "pager"

        [[observers.order_paid.actions]]
        type = "push"
        to = "ops@example.com"

        [[observers.order_paid.actions]]
        type = "webhook"
        body_template = '{"x": {{ evnt.id }}}'
        signing_secret_env = "MISSING_SECRET"
        "##,
    )
    .unwrap();
    let env = |name: &str| {
        (name == "HOOK_URL" || name == "SLACK_URL").then(|| "https://example.com/h".to_string())
    };
    let actions = file["observers"]["order_paid"]["actions"]
        .as_array()
        .unwrap();
    // What a configuration loader does: parse and compile every action, keep every error.
    let mut errors = Vec::new();
    for (i, value) in actions.iter().enumerate() {
        let path = format!("observers.order_paid.actions[{i}]");
        match ActionConfig::parse(value.as_table().unwrap(), &path) {
            Ok(config) => {
                if let Err(e) = config.compile(&path, &CompileContext::new(&env)) {
                    errors.extend(e);
                }
            }
            Err(e) => errors.extend(e),
        }
    }
    let by_path: BTreeSet<(String, String)> = errors
        .iter()
        .map(|e| (e.path.clone(), e.message.clone()))
        .collect();
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "observers.order_paid.actions[0].url",
            "observers.order_paid.actions[1].url",
            "observers.order_paid.actions[2].signing_secret_env",
            "observers.order_paid.actions[3].body_template",
            "observers.order_paid.actions[4].chanel",
            "observers.order_paid.actions[5].type",
            "observers.order_paid.actions[6].to",
            "observers.order_paid.actions[7].url",
            "observers.order_paid.actions[7].body_template",
            "observers.order_paid.actions[7].signing_secret_env",
        ],
        "{by_path:#?}"
    );
    let message = |i: usize| errors[i].message.as_str();
    assert!(message(0).contains("'url' or 'url_env'"), "{}", message(0));
    assert!(message(1).contains("not both"), "{}", message(1));
    assert!(
        message(2).contains("'MISSING_SECRET' is not set"),
        "{}",
        message(2)
    );
    assert!(message(3).contains("line 1"), "{}", message(3));
    assert!(message(4).contains("unknown key"), "{}", message(4));
    assert!(
        message(4).contains("channel"),
        "lists the known keys: {}",
        message(4)
    );
    assert!(
        message(5).contains("unknown action type 'pager'") && message(5).contains("webhook, slack"),
        "{}",
        message(5)
    );
    assert!(
        message(6).contains("unknown key") && message(6).contains("token_field"),
        "a key of another action type: {}",
        message(6)
    );
    assert!(message(8).contains("'evnt'"), "{}", message(8));
    // Display is "path: message".
    assert!(
        errors[5]
            .to_string()
            .starts_with("observers.order_paid.actions[5].type: unknown action type 'pager'"),
        "{}",
        errors[5]
    );
}
