//! One suite of guarantees over every HTTP action kind, against the kit's `TestServer`: a table
//! with one row per kind (its TOML, the environment it needs, the secrets that environment holds,
//! the engine's success answer), and the same cases run over every row:
//!
//! * success: the engine's success answer is `Ok`, and the request arrived;
//! * retryable: a 503 is transient; permanent: a 400 and a 422 are not;
//! * timeout: an answer that never comes, with `timeout_ms = 200`, is transient;
//! * `Retry-After: 7` on a 503 and on a 429 is a wait of 7 s;
//! * SSRF: without `allow_private_networks = true` the loopback target is refused and nothing
//!   reaches the server;
//! * no secret the environment supplies appears in any of those errors.
//!
//! Push runs with FCM (its token exchange is answered the same in every case). Not covered here:
//! APNs (HTTP/2 with an ES256 key) and Web Push (an encrypted payload to a per-event
//! subscription), whose own tests are in `push.rs`; email (SMTP) and cache (Redis) are not HTTP
//! and have none of these answers (`email.rs`, `cache.rs`).

use std::time::{Duration, Instant};

use fraiseql_observers::actions::{Action, ActionError, FailureKind};
use fraiseql_observers::testing::{Answer, Request, TestServer};
use fraiseql_observers::{EntityEvent, EventKind};
use serde_json::{json, Value};

use crate::sample::{compile, env_of, order_event, run};

const HOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const HOOK_PATH_TOKEN: &str = "hookPathToken4f9d";
const SLACK_PATH_TOKEN: &str = "slackPathTokenB7e2";
const TWILIO_SID: &str = "AC0123456789abcdef0123456789abcdef";
const TWILIO_TOKEN: &str = "twilio-auth-token-5c31";
const ES_KEY: &str = "VnVhQ2ZHY0JDZGJrUW0tZTVhT3g6dWkybHAyYXhUTm1zeWFrdzl0dk5udw==";
const OS_USER: &str = "conformance-user";
const OS_PASSWORD: &str = "correct horse battery 9";
const MEILI_KEY: &str = "meili-master-key-8a1c";
const TYPESENSE_KEY: &str = "typesense-key-27fd";
const FCM_ACCESS_TOKEN: &str = "ya29.conformance-access-token";

/// One action kind: how to configure it against a server at `{base}`, and how that server
/// answers when all goes well.
struct Kind {
    name: &'static str,
    /// The action's table, `{base}` standing for the server's base URL; without
    /// `allow_private_networks` and `timeout_ms`, which the cases add.
    toml: &'static str,
    /// The environment (`{base}` replaced as in `toml`).
    env: Vec<(&'static str, String)>,
    /// What must never appear in an error message.
    secrets: Vec<String>,
    /// The engine's answer to a delivery that succeeds.
    success: fn(&Request) -> Answer,
    /// Requests that are not the delivery itself (FCM's token exchange), answered the same in
    /// every case; `None` for the delivery.
    side: fn(&Request) -> Option<Answer>,
}

fn no_side(_: &Request) -> Option<Answer> {
    None
}

fn kinds() -> Vec<Kind> {
    let fcm_account = crate::push::service_account_json("{base}/token");
    let fcm_key: Value = serde_json::from_str(&fcm_account).unwrap();
    // One line of the PEM's base64: the key material itself.
    let fcm_key_line = fcm_key["private_key"].as_str().unwrap().lines().nth(2);
    let search_success = |request: &Request| match request.path() {
        "/_bulk" => Answer::json(
            200,
            &json!({"took": 1, "errors": false, "items": [{"index": {
                "_index": "orders", "_id": "0190f0a2-0000-7000-8000-0000000000aa",
                "_version": 1, "result": "created", "status": 201}}]}),
        ),
        p if p.starts_with("/indexes/") => Answer::json(
            202,
            &json!({"taskUid": 1, "indexUid": "orders", "status": "enqueued",
                    "type": "documentAdditionOrUpdate",
                    "enqueuedAt": "2024-05-01T12:30:00.000000Z"}),
        ),
        _ => Answer::status(201)
            .header("content-type", "application/json")
            .body(request.body.clone()),
    };
    vec![
        Kind {
            name: "webhook",
            toml: r#"type = "webhook"
                     url_env = "HOOK_URL"
                     signing_secret_env = "HOOK_SECRET""#,
            env: vec![
                ("HOOK_URL", format!("{{base}}/hooks/{HOOK_PATH_TOKEN}")),
                ("HOOK_SECRET", HOOK_SECRET.into()),
            ],
            secrets: vec![
                HOOK_PATH_TOKEN.into(),
                HOOK_SECRET.into(),
                HOOK_SECRET.trim_start_matches("whsec_").into(),
            ],
            success: |_| Answer::status(200),
            side: no_side,
        },
        Kind {
            name: "slack",
            toml: r#"type = "slack"
                     webhook_url_env = "SLACK_URL"
                     message_template = "Order {{ after.id }}: {{ after.total }} EUR""#,
            env: vec![(
                "SLACK_URL",
                format!("{{base}}/services/T0000/B0000/{SLACK_PATH_TOKEN}"),
            )],
            secrets: vec![SLACK_PATH_TOKEN.into()],
            success: |_| Answer::status(200).body("ok"),
            side: no_side,
        },
        Kind {
            name: "sms (twilio)",
            toml: r#"type = "sms"
                     account_sid_env = "TWILIO_ACCOUNT_SID"
                     auth_token_env = "TWILIO_AUTH_TOKEN"
                     base_url = "{base}"
                     from = "+15005550006"
                     to_template = "{{ after.phone }}"
                     message_template = "Order {{ after.id }} paid""#,
            env: vec![
                ("TWILIO_ACCOUNT_SID", TWILIO_SID.into()),
                ("TWILIO_AUTH_TOKEN", TWILIO_TOKEN.into()),
            ],
            secrets: vec![TWILIO_SID.into(), TWILIO_TOKEN.into()],
            success: |_| {
                Answer::json(
                    201,
                    &json!({"account_sid": TWILIO_SID, "api_version": "2010-04-01",
                            "sid": "SM0123456789abcdef0123456789abcdef", "status": "queued",
                            "to": "+33612345678", "from": "+15005550006", "num_segments": "1"}),
                )
            },
            side: no_side,
        },
        Kind {
            name: "search (elasticsearch)",
            toml: r#"type = "search"
                     engine = "elasticsearch"
                     base_url = "{base}"
                     index = "orders"
                     api_key_env = "ES_KEY"
                     fields = ["status", "total"]"#,
            env: vec![("ES_KEY", ES_KEY.into())],
            secrets: vec![ES_KEY.into()],
            success: search_success,
            side: no_side,
        },
        Kind {
            name: "search (opensearch)",
            toml: r#"type = "search"
                     engine = "opensearch"
                     base_url = "{base}"
                     index = "orders"
                     username_env = "OS_USER"
                     password_env = "OS_PASSWORD"
                     fields = ["status", "total"]"#,
            env: vec![
                ("OS_USER", OS_USER.into()),
                ("OS_PASSWORD", OS_PASSWORD.into()),
            ],
            secrets: vec![OS_PASSWORD.into()],
            success: search_success,
            side: no_side,
        },
        Kind {
            name: "search (meilisearch)",
            toml: r#"type = "search"
                     engine = "meilisearch"
                     base_url = "{base}"
                     index = "orders"
                     api_key_env = "MEILI_KEY"
                     fields = ["status", "total"]"#,
            env: vec![("MEILI_KEY", MEILI_KEY.into())],
            secrets: vec![MEILI_KEY.into()],
            success: search_success,
            side: no_side,
        },
        Kind {
            name: "search (typesense)",
            toml: r#"type = "search"
                     engine = "typesense"
                     base_url = "{base}"
                     index = "orders"
                     api_key_env = "TS_KEY"
                     fields = ["status", "total"]"#,
            env: vec![("TS_KEY", TYPESENSE_KEY.into())],
            secrets: vec![TYPESENSE_KEY.into()],
            success: search_success,
            side: no_side,
        },
        Kind {
            name: "push (fcm)",
            toml: r#"type = "push"
                     provider = "fcm"
                     service_account_env = "FCM_SERVICE_ACCOUNT"
                     base_url = "{base}"
                     token_field = "after.device_token"
                     title_template = "Order {{ after.id }} paid""#,
            env: vec![("FCM_SERVICE_ACCOUNT", fcm_account.clone())],
            secrets: [FCM_ACCESS_TOKEN.to_string()]
                .into_iter()
                .chain(fcm_key_line.map(str::to_string))
                .collect(),
            success: |_| Answer::json(200, &json!({"name": "projects/demo-project/messages/0:1"})),
            side: |request| {
                (request.path() == "/token").then(|| {
                    Answer::json(
                        200,
                        &json!({"access_token": FCM_ACCESS_TOKEN, "expires_in": 3599,
                                "token_type": "Bearer"}),
                    )
                })
            },
        },
    ]
}

fn event() -> EntityEvent {
    order_event(
        EventKind::Created,
        None,
        Some(
            json!({"id": 7, "status": "paid", "total": 42.5, "phone": "+33612345678",
                    "device_token": "device-token-0001"}),
        ),
    )
}

/// One kind's server and its action builder.
struct Bench<'k> {
    kind: &'k Kind,
    server: TestServer,
    errors: Vec<ActionError>,
}

impl<'k> Bench<'k> {
    async fn start(kind: &'k Kind) -> Bench<'k> {
        Bench {
            kind,
            server: TestServer::start().await,
            errors: Vec::new(),
        }
    }

    /// The kind's action, with `extra` settings appended to its table.
    fn action(&self, extra: &str) -> Action {
        let base = &self.server.base;
        let toml = format!("{}\n{extra}", self.kind.toml.replace("{base}", base));
        let env: Vec<(&str, String)> = self
            .kind
            .env
            .iter()
            .map(|(name, value)| (*name, value.replace("{base}", base)))
            .collect();
        let pairs: Vec<(&str, &str)> = env.iter().map(|(n, v)| (*n, v.as_str())).collect();
        compile(&toml, &env_of(&pairs), None, None)
            .unwrap_or_else(|e| panic!("{}: {e:?}", self.kind.name))
    }

    /// Answer deliveries with `answer` (side requests as the kind answers them).
    fn answer(&self, answer: impl Fn(&Request) -> Answer + Send + Sync + 'static) {
        let side = self.kind.side;
        self.server
            .respond(move |request: &Request| side(request).unwrap_or_else(|| answer(request)));
    }

    /// The delivery requests so far.
    fn deliveries(&self) -> Vec<Request> {
        let side = self.kind.side;
        self.server
            .requests()
            .into_iter()
            .filter(|r| side(r).is_none())
            .collect()
    }

    /// Run `action` once, expecting an error, which is kept for the secrets check.
    async fn fails(&mut self, action: &Action, case: &str) -> ActionError {
        let err = run(action, &event(), 1)
            .await
            .expect_err(&format!("{}: {case} is an error", self.kind.name));
        self.errors.push(err.clone());
        err
    }
}

async fn conforms(kind: Kind) {
    let kind = &kind;
    let name = kind.name;
    let mut bench = Bench::start(kind).await;
    let allowed = bench.action("allow_private_networks = true");

    // Success: Ok, and the request arrived (and was accepted).
    bench.answer(kind.success);
    run(&allowed, &event(), 1)
        .await
        .unwrap_or_else(|e| panic!("{name}: success: {e:?}"));
    let deliveries = bench.deliveries();
    assert_eq!(deliveries.len(), 1, "{name}: one request");
    assert!(deliveries[0].accepted(), "{name}: {:?}", deliveries[0]);

    // Retryable: a 503 is transient.
    bench.answer(|_| Answer::status(503));
    let err = bench.fails(&allowed, "503").await;
    assert!(err.kind == FailureKind::Transient, "{name}: 503: {err:?}");

    // Permanent: a 400 and a 422 are not transient.
    for status in [400, 422] {
        bench.answer(move |_| Answer::status(status));
        let err = bench.fails(&allowed, "a 4xx").await;
        assert!(
            err.kind != FailureKind::Transient,
            "{name}: {status}: {err:?}"
        );
    }
    assert_eq!(
        bench.deliveries().len(),
        4,
        "{name}: one request per attempt"
    );

    // Retry-After on a 503 and on a 429.
    for status in [503, 429] {
        bench.answer(move |_| Answer::status(status).retry_after("7"));
        let err = bench.fails(&allowed, "Retry-After").await;
        assert!(
            err.kind == FailureKind::Transient,
            "{name}: {status}: {err:?}"
        );
        assert_eq!(
            err.retry_after(),
            Some(Duration::from_secs(7)),
            "{name}: {status} with Retry-After: 7"
        );
    }

    // Timeout: an answer that never comes, with timeout_ms = 200.
    let quick = bench.action("allow_private_networks = true\ntimeout_ms = 200");
    bench.answer(|_| Answer::hang());
    let before = bench.deliveries().len();
    let started = Instant::now();
    let err = bench.fails(&quick, "a hang").await;
    assert!(err.kind == FailureKind::Transient, "{name}: hang: {err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{name}: timeout_ms was honoured ({:?})",
        started.elapsed()
    );
    assert_eq!(
        bench.deliveries().len(),
        before + 1,
        "{name}: the hung request arrived"
    );

    // SSRF: without allow_private_networks, nothing reaches the loopback server.
    let guarded_bench = Bench::start(kind).await;
    let guarded = guarded_bench.action("");
    guarded_bench.answer(kind.success);
    let err = run(&guarded, &event(), 1)
        .await
        .expect_err(&format!("{name}: a private target is refused"));
    assert!(
        err.message().contains("allow_private_networks"),
        "{name}: {err}"
    );
    assert!(
        guarded_bench.server.requests().is_empty(),
        "{name}: nothing sent: {:?}",
        guarded_bench.server.requests()
    );
    bench.errors.push(err);

    // No secret in any error.
    for err in &bench.errors {
        let shown = format!("{err} {err:?}");
        for secret in &kind.secrets {
            assert!(
                !shown.contains(secret.as_str()),
                "{name}: the secret {secret:?} is in {shown}"
            );
        }
    }
}

/// Every kind at once, each in its own task; the kinds that fail are named together (each
/// failure's own message is printed as it happens).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_http_action_conforms() {
    let runs: Vec<_> = kinds()
        .into_iter()
        .map(|kind| (kind.name, tokio::spawn(conforms(kind))))
        .collect();
    let mut failed = Vec::new();
    for (name, run) in runs {
        if run.await.is_err() {
            failed.push(name);
        }
    }
    assert!(failed.is_empty(), "not conforming: {failed:?}");
}
