//! Sample environments and action runs shared by the email, sms and cache tests (the sample
//! event is the kit's).
#![allow(dead_code)]

use fraiseql_observers::actions::{
    Action, ActionConfig, ActionError, CompileContext, DeliveryRequest, EmailSettings, HttpClient,
    RedisSettings,
};
use fraiseql_observers::delivery::delivery_id;
use fraiseql_observers::{ConfigError, EntityEvent};

pub use fraiseql_observers::testing::order_event;

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
    ActionConfig::parse(&table, path)?.compile(path, &CompileContext { env, email, redis })
}

/// Run `action` once for `event` as delivery attempt `attempt`.
pub async fn run(action: &Action, event: &EntityEvent, attempt: u32) -> Result<(), ActionError> {
    let http = HttpClient::new().unwrap();
    let id = delivery_id(event.id, "order_paid", 0);
    action
        .execute(
            &http,
            &DeliveryRequest {
                event,
                delivery_id: &id,
                attempt,
            },
        )
        .await
}

/// The delivery id `run` uses for `event`.
pub fn run_delivery_id(event: &EntityEvent) -> String {
    delivery_id(event.id, "order_paid", 0)
}
