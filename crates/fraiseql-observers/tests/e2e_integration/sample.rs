//! Sample events, environments and action runs shared by the email, sms and cache tests.
#![allow(dead_code)]

use chrono::TimeZone;
use fraiseql_observers::actions::{
    Action, ActionConfig, ActionError, CompileContext, DeliveryRequest, EmailSettings,
    RedisSettings,
};
use fraiseql_observers::delivery::delivery_id;
use fraiseql_observers::event::diff_fields;
use fraiseql_observers::{ConfigError, EntityEvent, EventKind, Position};
use serde_json::Value;
use uuid::Uuid;

/// An `Order` event of `kind` with the given images (changes computed when both exist).
pub fn order_event(kind: EventKind, before: Option<Value>, after: Option<Value>) -> EntityEvent {
    EntityEvent {
        id: Uuid::parse_str("0190f0a2-0000-7000-8000-000000000001").unwrap(),
        sequence: 101,
        kind,
        entity_type: "Order".into(),
        entity_id: Uuid::parse_str("0190f0a2-0000-7000-8000-0000000000aa").unwrap(),
        tenant: Some(Uuid::parse_str("0190f0a2-0000-7000-8000-0000000000bb").unwrap()),
        author: Some("alice".into()),
        changes: match (&before, &after) {
            (Some(b), Some(a)) => Some(diff_fields(b, a)),
            _ => None,
        },
        before,
        after,
        change_status: "updated".into(),
        extra_metadata: serde_json::json!({}),
        source: None,
        created_at: chrono::Utc.with_ymd_and_hms(2024, 5, 1, 12, 30, 0).unwrap(),
        source_ts: None,
        position: Position {
            batch: 1,
            sequence: 101,
        },
    }
}

/// An environment lookup over fixed pairs.
pub fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let pairs: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
}

/// Parse and compile one action table (TOML) the way a configuration loader does.
pub fn compile(
    source: &str,
    env: &dyn Fn(&str) -> Option<String>,
    email: Option<&EmailSettings>,
    redis: Option<&RedisSettings>,
) -> Result<Action, Vec<ConfigError>> {
    compile_at("observers.order_paid.actions[0]", source, env, email, redis)
}

/// `compile`, with the action's table at `path`.
pub fn compile_at(
    path: &str,
    source: &str,
    env: &dyn Fn(&str) -> Option<String>,
    email: Option<&EmailSettings>,
    redis: Option<&RedisSettings>,
) -> Result<Action, Vec<ConfigError>> {
    let table: toml::Table = toml::from_str(source).unwrap();
    let read_file = |file: &str| std::fs::read_to_string(file);
    let ctx = CompileContext {
        read_file: &read_file,
        email,
        redis,
        ..CompileContext::new(env)
    };
    ActionConfig::parse(&table, path)?.compile(path, &ctx)
}

/// Run `action` once for `event` as delivery attempt `attempt`.
pub async fn run(action: &Action, event: &EntityEvent, attempt: u32) -> Result<(), ActionError> {
    let id = delivery_id(event.id, "order_paid", 0);
    action
        .execute(&DeliveryRequest {
            event,
            delivery_id: &id,
            attempt,
        })
        .await
}

/// The delivery id `run` uses for `event`.
pub fn run_delivery_id(event: &EntityEvent) -> String {
    delivery_id(event.id, "order_paid", 0)
}
