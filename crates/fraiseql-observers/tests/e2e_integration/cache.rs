//! The cache action against the real Redis on 127.0.0.1:6379: keys removed, written (with TTL)
//! and messages published are checked in Redis itself. Each test works under a random key
//! prefix and removes what it created.

use std::time::Duration;

use fraiseql_observers::actions::{Action, FailureKind, RedisSettings};
use fraiseql_observers::{EntityEvent, EventKind};
use futures::StreamExt;
use redis::aio::MultiplexedConnection;
use serde_json::{json, Value};

use crate::sample::{compile, env_of, order_event, run};

const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// A random key prefix for one test; it holds glob metacharacters on purpose (`[`, `]`), which
/// the action must escape in patterns.
fn test_prefix() -> String {
    format!("fo-test[{}]:", rand::random::<u32>())
}

fn settings(prefix: &str) -> RedisSettings {
    let table: toml::Table =
        toml::from_str(&format!("url = \"{REDIS_URL}\"\nkey_prefix = '{prefix}'")).unwrap();
    RedisSettings::parse(&table, "observers.runtime.redis", &env_of(&[])).unwrap()
}

fn cache_action(settings: &RedisSettings, fields: &str) -> Action {
    compile(
        &format!("type = \"cache\"\n{fields}"),
        &env_of(&[]),
        None,
        Some(settings),
    )
    .unwrap()
}

async fn redis() -> MultiplexedConnection {
    redis::Client::open(REDIS_URL)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis on 127.0.0.1:6379")
}

async fn set(conn: &mut MultiplexedConnection, key: &str) {
    redis::cmd("SET")
        .arg(key)
        .arg("cached")
        .query_async::<()>(conn)
        .await
        .unwrap();
}

/// Every key under `prefix`, sorted (the prefix itself matched literally).
async fn keys_under(conn: &mut MultiplexedConnection, prefix: &str) -> Vec<String> {
    let pattern = format!("{}*", fraiseql_observers::template::escape_glob(prefix));
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query_async(conn)
        .await
        .unwrap();
    keys.sort();
    keys
}

async fn clean(conn: &mut MultiplexedConnection, prefix: &str) {
    let keys = keys_under(conn, prefix).await;
    if !keys.is_empty() {
        redis::cmd("DEL")
            .arg(keys)
            .query_async::<()>(conn)
            .await
            .unwrap();
    }
}

fn order(customer: &str) -> EntityEvent {
    order_event(
        EventKind::Updated,
        Some(json!({"id": 7, "customer_id": customer, "status": "new"})),
        Some(json!({"id": 7, "customer_id": customer, "status": "paid"})),
    )
}

#[tokio::test]
async fn invalidate_unlinks_exact_keys_and_pattern_matches() {
    let prefix = test_prefix();
    let mut conn = redis().await;
    for key in [
        "order:7",
        "order:8",
        "orders:customer:42:page:1",
        "orders:customer:42:page:2",
        "orders:customer:420:page:1",
    ] {
        set(&mut conn, &format!("{prefix}{key}")).await;
    }
    let action = cache_action(
        &settings(&prefix),
        r#"operation = "invalidate"
           keys = ["order:{{ after.id }}", "orders:customer:{{ after.customer_id }}:*"]"#,
    );
    run(&action, &order("42"), 1).await.unwrap();
    assert_eq!(
        keys_under(&mut conn, &prefix).await,
        [
            format!("{prefix}order:8"),
            format!("{prefix}orders:customer:420:page:1"),
        ]
    );
    // Idempotent: a retry finds nothing left and succeeds.
    run(&action, &order("42"), 2).await.unwrap();
    clean(&mut conn, &prefix).await;
}

#[tokio::test]
async fn event_values_cannot_widen_a_pattern() {
    let prefix = test_prefix();
    let mut conn = redis().await;
    let tricky = r"4*?[0-9]\x";
    let literal = format!("{prefix}orders:customer:{tricky}:page:1");
    let survivors = [
        // Each would match if the value's metacharacters were wildcards.
        format!("{prefix}orders:customer:42:page:1"),
        format!("{prefix}orders:customer:4ab5x:page:1"),
        format!("{prefix}orders:customer:4zz7x:page:1"),
        format!("{prefix}orders:customer:4*?[0-9]x:page:1"),
    ];
    set(&mut conn, &literal).await;
    for key in &survivors {
        set(&mut conn, key).await;
    }
    let action = cache_action(
        &settings(&prefix),
        r#"operation = "invalidate"
           keys = ["orders:customer:{{ after.customer_id }}:*"]"#,
    );
    run(&action, &order(tricky), 1).await.unwrap();
    let mut expected = survivors.to_vec();
    expected.sort();
    assert_eq!(keys_under(&mut conn, &prefix).await, expected);

    // `pattern = true` without a literal `*`: an exact match through SCAN, still escaped.
    let star = format!("{prefix}orders:customer:4*:page:1");
    set(&mut conn, &star).await;
    let action = cache_action(
        &settings(&prefix),
        r#"operation = "invalidate"
           pattern = true
           keys = ["orders:customer:{{ after.customer_id }}:page:1"]"#,
    );
    run(&action, &order("4*"), 1).await.unwrap();
    assert_eq!(
        keys_under(&mut conn, &prefix).await,
        expected,
        "'4*' removed only the key '4*' itself, not '42'"
    );
    clean(&mut conn, &prefix).await;
}

#[tokio::test]
async fn refresh_sets_the_value_with_a_ttl_and_a_delete_unlinks() {
    let prefix = test_prefix();
    let mut conn = redis().await;
    let settings = settings(&prefix);
    let json_action = cache_action(
        &settings,
        r#"operation = "refresh"
           keys = ["order:{{ data.id }}", "order-by-customer:{{ data.customer_id }}"]
           ttl_seconds = 300"#,
    );
    let event = order("42");
    run(&json_action, &event, 1).await.unwrap();
    for key in ["order:7", "order-by-customer:42"] {
        let key = format!("{prefix}{key}");
        let value: String = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let value: Value = serde_json::from_str(&value).unwrap();
        assert_eq!(&value, event.after.as_ref().unwrap());
        let ttl: i64 = redis::cmd("TTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!((1..=300).contains(&ttl), "ttl {ttl}");
    }

    let text_action = cache_action(
        &settings,
        r#"operation = "refresh"
           keys = ["order-status:{{ after.id }}"]
           format = "text"
           value_template = "{{ after.status }}""#,
    );
    run(&text_action, &event, 1).await.unwrap();
    let key = format!("{prefix}order-status:7");
    let value: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(value, "paid");
    let ttl: i64 = redis::cmd("TTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(ttl, -1, "no ttl_seconds, no expiry");

    // A delete has no state to cache: the keys go away.
    let deleted = order_event(
        EventKind::Deleted,
        Some(json!({"id": 7, "customer_id": "42", "status": "paid"})),
        None,
    );
    run(&json_action, &deleted, 1).await.unwrap();
    assert_eq!(
        keys_under(&mut conn, &prefix).await,
        [format!("{prefix}order-status:7")]
    );
    // A key built from `after` has no value on a delete: refused, not cut short to "order-status:".
    set(&mut conn, &format!("{prefix}order-status:")).await;
    let err = run(&text_action, &deleted, 1).await.unwrap_err();
    assert!(err.kind == FailureKind::Permanent, "{err:?}");
    assert!(err.message().contains("keys[0]"), "{err}");
    assert_eq!(
        keys_under(&mut conn, &prefix).await,
        [
            format!("{prefix}order-status:"),
            format!("{prefix}order-status:7")
        ]
    );
    clean(&mut conn, &prefix).await;
}

#[tokio::test]
async fn publish_sends_the_default_and_the_templated_message() {
    let channel = format!("fo-test-invalidations-{}", rand::random::<u32>());
    let client = redis::Client::open(REDIS_URL).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe(&channel).await.unwrap();
    let mut messages = pubsub.into_on_message();

    let settings = settings(&test_prefix());
    let default = cache_action(
        &settings,
        &format!("operation = \"publish\"\nchannel = \"{channel}\""),
    );
    let templated = cache_action(
        &settings,
        &format!(
            "operation = \"publish\"\nchannel = \"{channel}\"\nmessage_template = '{{\"order\": {{{{ after.id }}}}, \"customer\": {{{{ after.customer_id }}}}}}'"
        ),
    );
    let event = order("42");
    run(&default, &event, 1).await.unwrap();
    run(&templated, &event, 1).await.unwrap();

    assert_eq!(
        next_message(&mut messages, &channel).await,
        json!({
            "entity_type": "Order",
            "entity_id": event.entity_id.to_string(),
            "kind": "UPDATE",
            "event_id": event.id.to_string(),
        })
    );
    assert_eq!(
        next_message(&mut messages, &channel).await,
        json!({"order": 7, "customer": "42"})
    );
}

async fn next_message(
    messages: &mut (impl futures::Stream<Item = redis::Msg> + Unpin),
    channel: &str,
) -> Value {
    let msg = tokio::time::timeout(Duration::from_secs(5), messages.next())
        .await
        .expect("a message within 5 s")
        .expect("the subscription is open");
    assert_eq!(msg.get_channel_name(), channel);
    serde_json::from_str(&msg.get_payload::<String>().unwrap()).unwrap()
}

#[tokio::test]
async fn a_server_that_cannot_be_reached_is_transient_and_bad_renders_are_permanent() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let table: toml::Table = toml::from_str(&format!(
        "url = \"redis://127.0.0.1:{port}\"\nconnect_timeout_ms = 1000"
    ))
    .unwrap();
    let unreachable = RedisSettings::parse(&table, "r", &env_of(&[])).unwrap();
    let action = cache_action(
        &unreachable,
        r#"operation = "invalidate"
           keys = ["order:{{ after.id }}"]"#,
    );
    let err = run(&action, &order("42"), 1).await.unwrap_err();
    assert!(err.kind == FailureKind::Transient, "{err:?}");
    assert!(
        err.message().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );

    // A key that renders empty, or prints an absent value, is refused before anything is sent.
    let prefix = test_prefix();
    let action = cache_action(
        &settings(&prefix),
        r#"operation = "invalidate"
           keys = ["{{ after.customer_id }}"]"#,
    );
    let err = run(&action, &order(""), 1).await.unwrap_err();
    assert!(err.kind == FailureKind::Permanent, "{err:?}");
    assert!(err.message().contains("keys[0] rendered empty"), "{err}");
    let action = cache_action(
        &settings(&prefix),
        r#"operation = "invalidate"
           keys = ["order:{{ after.missing }}:*"]"#,
    );
    let err = run(&action, &order("42"), 1).await.unwrap_err();
    assert!(err.kind == FailureKind::Permanent, "{err:?}");
    assert!(err.message().contains("absent"), "{err}");
}

#[test]
fn config_errors_are_caught_at_load() {
    let errors = compile(
        r#"type = "cache"
           operation = "invalidate"
           keys = ["a"]"#,
        &env_of(&[]),
        None,
        None,
    )
    .unwrap_err();
    assert_eq!(
        errors[0].to_string(),
        "observers.order_paid.actions[0].type: a cache action needs [observers.runtime.redis] (url or url_env)"
    );
    let settings = settings("p:");
    let errors = compile(
        r#"type = "cache"
           keys = ["a"]"#,
        &env_of(&[]),
        None,
        Some(&settings),
    )
    .unwrap_err();
    assert_eq!(errors[0].path, "observers.order_paid.actions[0].operation");
    let errors = RedisSettings::parse(
        &toml::from_str("url_env = 'REDIS_URL'").unwrap(),
        "observers.runtime.redis",
        &env_of(&[]),
    )
    .unwrap_err();
    assert_eq!(
        errors[0].to_string(),
        "observers.runtime.redis.url_env: environment variable 'REDIS_URL' is not set"
    );
}
