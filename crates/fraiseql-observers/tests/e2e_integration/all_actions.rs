//! One database change fires all seven action types through the whole engine (capture trigger,
//! listener, executor), and each receiver gets exactly what it should: a webhook receiver, a Slack
//! stand-in, an SMTP server, a Twilio stand-in, an FCM stand-in (token exchange + send), a
//! Meilisearch stand-in, and the real Redis.

use crate::push::{FakeFcm, FCM_SEND};
use crate::receiver::Receiver;
use crate::smtp_server::SmtpServer;
use crate::support::{eventually, TestDb};
use fraiseql_observers::config;
use fraiseql_observers::Pipeline;
use serde_json::json;
use std::time::Duration;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SID: &str = "AC0123456789abcdef0123456789abcdef";
const TENANT: &str = "aaaaaaaa-0000-0000-0000-000000000001";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_change_fires_all_seven_action_types() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE tb_order (
                 pk_order INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 id UUID DEFAULT gen_random_uuid() UNIQUE NOT NULL,
                 status TEXT NOT NULL, total NUMERIC(12,2) NOT NULL,
                 customer_email TEXT NOT NULL, customer_phone TEXT NOT NULL, device_token TEXT NOT NULL,
                 fk_customer_org UUID NOT NULL);
             SELECT core.observer_enable_capture('tb_order', 'Order', 'fk_customer_org');",
        )
        .await
        .unwrap();

    let http = Receiver::start().await;
    let twilio_path = format!("/2010-04-01/Accounts/{SID}/Messages.json");
    {
        let twilio_path = twilio_path.clone();
        http.set(move |h| match h.path.as_str() {
            p if p == twilio_path => (201, Duration::ZERO),
            "/indexes/orders/documents" => (202, Duration::ZERO),
            _ => (200, Duration::ZERO),
        });
    }
    let smtp = SmtpServer::start().await;
    let fcm = FakeFcm::start().await;
    let prefix = format!("all-actions-{}:", uuid::Uuid::new_v4().simple());
    let service_account = fcm.service_account();

    let toml = format!(
        r##"
[observers.runtime]
consumer_id = "all"
start_position = "beginning"
poll_interval_ms = 20

[observers.runtime.email]
host = "127.0.0.1"
port = {smtp_port}
tls = "none"
from = "Shop <shop@example.com>"

[observers.runtime.redis]
url = "redis://127.0.0.1:6379/0"
key_prefix = "{prefix}"

[observers.everything]
entity = "Order"
event_type = "INSERT"

[[observers.everything.actions]]
type = "webhook"
url = "{base}/hook"
signing_secret_env = "HOOK_SECRET"
allow_private_networks = true

[[observers.everything.actions]]
type = "slack"
webhook_url = "{base}/slack"
channel = "#orders"
message_template = "Order {{{{ after.status }}}}: {{{{ after.total }}}} EUR"
allow_private_networks = true

[[observers.everything.actions]]
type = "email"
to_template = "{{{{ after.customer_email }}}}"
subject_template = "Order {{{{ after.status }}}}"
body_template = "Total {{{{ after.total }}}} EUR"

[[observers.everything.actions]]
type = "sms"
account_sid_env = "TWILIO_ACCOUNT_SID"
auth_token_env = "TWILIO_AUTH_TOKEN"
from = "+15005550006"
to_template = "{{{{ after.customer_phone }}}}"
message_template = "Order {{{{ after.status }}}}"
base_url = "{base}"
allow_private_networks = true

[[observers.everything.actions]]
type = "push"
provider = "fcm"
service_account_env = "FCM_SERVICE_ACCOUNT"
base_url = "{fcm_base}"
token_field = "after.device_token"
title_template = "Order {{{{ after.status }}}}"
body_template = "{{{{ after.total }}}} EUR"
allow_private_networks = true

[[observers.everything.actions]]
type = "search"
engine = "meilisearch"
base_url = "{base}"
index = "orders"
api_key_env = "SEARCH_API_KEY"
fields = ["status", "total"]
allow_private_networks = true

[[observers.everything.actions]]
type = "cache"
operation = "refresh"
keys = ["order:{{{{ data.id }}}}"]
ttl_seconds = 60
"##,
        smtp_port = smtp.port,
        base = http.base,
        fcm_base = fcm.server.base,
    );
    let env = move |name: &str| -> Option<String> {
        Some(match name {
            "HOOK_SECRET" => SECRET.to_string(),
            "TWILIO_ACCOUNT_SID" => SID.to_string(),
            "TWILIO_AUTH_TOKEN" => "twilio-token".to_string(),
            "FCM_SERVICE_ACCOUNT" => service_account.clone(),
            "SEARCH_API_KEY" => "search-key".to_string(),
            _ => return None,
        })
    };
    let config = config::load(&toml, &env).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.observers[0].actions.len(), 7);
    let pipeline = Pipeline::start(&db.url, config).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let engine = tokio::spawn(pipeline.run(async {
        let _ = stopped.await;
    }));

    // The one change.
    let order: uuid::Uuid = client
        .query_one(
            "INSERT INTO tb_order (status, total, customer_email, customer_phone, device_token, fk_customer_org)
             VALUES ('new', 42.50, 'ada@example.com', '+33612345678', 'device-token-0001', $1::text::uuid)
             RETURNING id",
            &[&TENANT],
        )
        .await
        .unwrap()
        .get(0);

    let mut redis = redis::Client::open("redis://127.0.0.1:6379/0")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!("{prefix}order:{order}");
    let cached: String = eventually(Duration::from_secs(20), "all seven deliveries", || {
        let (http, smtp, fcm, key, mut redis) = (&http, &smtp, &fcm, key.clone(), redis.clone());
        async move {
            let done = http.accepted().len() == 4
                && smtp.accepted().len() == 1
                && fcm.server.on(FCM_SEND).len() == 1;
            let cached: Option<String> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut redis)
                .await
                .unwrap();
            if done {
                cached
            } else {
                None
            }
        }
    })
    .await;
    let _ = stop.send(());
    engine.await.unwrap().unwrap();

    // Webhook: the default body, signed.
    let hook = &http.accepted_on("/hook")[0];
    standardwebhooks::Webhook::new(SECRET)
        .unwrap()
        .verify(&hook.raw, &hook.headers)
        .expect("signature verifies");
    assert_eq!(hook.body["type"], "order.created");
    assert_eq!(hook.body["data"]["entity_id"], order.to_string());
    assert_eq!(
        hook.body["data"]["after"]["customer_email"],
        "ada@example.com"
    );
    // Slack.
    assert_eq!(
        http.accepted_on("/slack")[0].body,
        json!({"text": "Order new: 42.5 EUR", "channel": "#orders"})
    );
    // Email, as the SMTP server received it.
    let mail = &smtp.accepted()[0];
    assert_eq!(mail.rcpt_to, ["ada@example.com"]);
    let raw = String::from_utf8_lossy(&mail.data);
    assert!(raw.contains("Subject: Order new"), "{raw}");
    assert!(raw.contains("Total 42.5 EUR"), "{raw}");
    // SMS: Twilio's form, with Basic auth.
    let sms = &http.accepted_on(&twilio_path)[0];
    let form: Vec<(String, String)> = form_urlencoded::parse(&sms.raw).into_owned().collect();
    assert!(
        form.contains(&("To".into(), "+33612345678".into())),
        "{form:?}"
    );
    assert!(
        form.contains(&("Body".into(), "Order new".into())),
        "{form:?}"
    );
    assert!(sms.header("authorization").starts_with("Basic "));
    // Push: the FCM message, sent with the exchanged token.
    let push = &fcm.server.on(FCM_SEND)[0];
    assert_eq!(
        push.json(),
        json!({"message": {"token": "device-token-0001",
            "notification": {"title": "Order new", "body": "42.5 EUR"}}})
    );
    // Search: the selected fields, with the entity id as the document id.
    let search = &http.accepted_on("/indexes/orders/documents")[0];
    assert_eq!(search.header("authorization"), "Bearer search-key");
    assert_eq!(
        search.body,
        json!([{"id": order.to_string(), "status": "new", "total": 42.5}])
    );
    // Cache: the entity's data, with its TTL.
    let cached: serde_json::Value = serde_json::from_str(&cached).unwrap();
    assert_eq!(cached["customer_email"], "ada@example.com");
    let ttl: i64 = redis::cmd("TTL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!((1..=60).contains(&ttl), "ttl {ttl}");
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
}
