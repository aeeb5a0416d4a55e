//! One `[observers.NAME]` table compiled into an [`Observer`].

use std::time::Duration;

use serde::Deserialize;
use uuid::Uuid;

use super::aliases::{self, Scope};
use super::ConfigWarning;
use crate::actions::{ActionConfig, CompileContext, KINDS};
use crate::condition::Condition;
use crate::delivery::schedule::{BackoffStrategy, RetryPolicy};
use crate::error::ConfigError;
use crate::event::EventKind;
use crate::fields::parse_fields;
use crate::observer::{Observer, OnFailure, Record};

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawObserver {
    entity: Option<String>,
    event_type: Option<OneOrMany>,
    condition: Option<String>,
    tenant: Option<String>,
    actions: Option<Vec<toml::Value>>,
    retry: Option<toml::Table>,
    on_failure: Option<String>,
    ordered: Option<bool>,
    enabled: Option<bool>,
    coalesce_ms: Option<u64>,
    record: Option<String>,
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetry {
    max_attempts: Option<u32>,
    initial_delay_ms: Option<u64>,
    max_delay_ms: Option<u64>,
    backoff_strategy: Option<BackoffStrategy>,
    jitter: Option<bool>,
}

pub(super) fn compile_observer(
    name: &str,
    table: &toml::Table,
    path: &str,
    context: &CompileContext<'_>,
    warnings: &mut Vec<ConfigWarning>,
) -> Result<Observer, Vec<ConfigError>> {
    let raw: RawObserver = parse_fields::<_, ConfigError>(table, path)?;
    let mut errors = Vec::new();
    if name.is_empty()
        || name.len() > 100
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
    {
        errors.push(ConfigError::new(
            path,
            "observer names use letters, digits, '_', '-' and '.' (at most 100)",
        ));
    }
    let entity = match raw.entity.as_deref() {
        None | Some("") => {
            errors.push(ConfigError::new(
                format!("{path}.entity"),
                "missing; the entity type (object_type) to observe, or \"*\" for every entity",
            ));
            None
        }
        Some("*") => None,
        Some(e) => Some(e.to_string()),
    };
    let event_types = match raw.event_type {
        None => {
            errors.push(ConfigError::new(
                format!("{path}.event_type"),
                "missing; one or a list of INSERT, UPDATE, DELETE, CUSTOM, SNAPSHOT",
            ));
            Vec::new()
        }
        Some(types) => {
            let names = match types {
                OneOrMany::One(n) => vec![n],
                OneOrMany::Many(ns) => ns,
            };
            if names.is_empty() {
                errors.push(ConfigError::new(
                    format!("{path}.event_type"),
                    "must not be empty",
                ));
            }
            let mut kinds = Vec::new();
            for n in names {
                match parse_kind(&n) {
                    Some(k) if !kinds.contains(&k) => kinds.push(k),
                    Some(_) => {}
                    None => errors.push(ConfigError::new(
                        format!("{path}.event_type"),
                        format!("unknown event type '{n}'; one of INSERT, UPDATE, DELETE, CUSTOM, SNAPSHOT"),
                    )),
                }
            }
            kinds
        }
    };
    let condition = raw.condition.as_deref().and_then(|source| {
        Condition::compile(source)
            .map_err(|e| errors.push(ConfigError::new(format!("{path}.condition"), e.to_string())))
            .ok()
    });
    let tenant = raw.tenant.as_deref().and_then(|t| {
        Uuid::parse_str(t)
            .map_err(|_| {
                errors.push(ConfigError::new(
                    format!("{path}.tenant"),
                    format!("'{t}' is not a UUID (the tenant is the change log's fk_customer_org)"),
                ))
            })
            .ok()
    });
    let on_failure = match raw.on_failure.as_deref() {
        None | Some("dlq") => OnFailure::Dlq,
        Some("log") => OnFailure::Log,
        Some("alert") => {
            errors.push(ConfigError::new(
                format!("{path}.on_failure"),
                format!(
                    "\"alert\" is not supported: use on_failure = \"dlq\" and alert on the {} metric (per observer: {}{{outcome=\"dead_lettered\"}})",
                    crate::metrics::DEAD_LETTERED,
                    crate::metrics::ACTIONS
                ),
            ));
            OnFailure::Dlq
        }
        Some(other) => {
            errors.push(ConfigError::new(
                format!("{path}.on_failure"),
                format!("must be \"dlq\" or \"log\", not '{other}'"),
            ));
            OnFailure::Dlq
        }
    };
    let retry = match &raw.retry {
        None => RetryPolicy::default(),
        Some(t) => compile_retry(t, &format!("{path}.retry"), &mut errors),
    };
    let mut actions = Vec::new();
    match raw.actions {
        None => errors.push(ConfigError::new(
            format!("{path}.actions"),
            "missing; at least one [[observers.NAME.actions]] table",
        )),
        Some(list) if list.is_empty() => errors.push(ConfigError::new(
            format!("{path}.actions"),
            "must hold at least one action",
        )),
        Some(list) => {
            for (i, value) in list.iter().enumerate() {
                let action_path = format!("{path}.actions[{i}]");
                let Some(t) = value.as_table() else {
                    errors.push(ConfigError::new(action_path, "must be a table"));
                    continue;
                };
                let mut t = t.clone();
                let kind = t.get("type").and_then(|v| v.as_str()).map(str::to_string);
                if let Some(kind) = KINDS.iter().find(|k| Some(k.name) == kind.as_deref()) {
                    aliases::rewrite(
                        &mut t,
                        Scope::Action(kind.name),
                        &action_path,
                        &mut errors,
                        warnings,
                    );
                }
                match ActionConfig::parse(&t, &action_path)
                    .and_then(|c| c.compile(&action_path, context))
                {
                    Ok(a) => actions.push(a),
                    Err(e) => errors.extend(e),
                }
            }
        }
    }
    let coalesce = match raw.coalesce_ms {
        None | Some(0) => None,
        Some(ms) => {
            if let Some(a) = actions.iter().find(|a| !a.coalesces()) {
                let coalescing: Vec<&str> = KINDS
                    .iter()
                    .filter(|k| k.coalesces)
                    .map(|k| k.name)
                    .collect();
                errors.push(ConfigError::new(
                    format!("{path}.coalesce_ms"),
                    format!(
                        "coalescing keeps only the latest state of an entity: it applies to {} actions, and this observer has a {} action (put it in an observer of its own)",
                        coalescing.join(" and "),
                        a.kind()
                    ),
                ));
            }
            if ms > 60_000 {
                errors.push(ConfigError::new(
                    format!("{path}.coalesce_ms"),
                    "at most 60000 (the checkpoint waits for coalesced changes)",
                ));
            }
            Some(Duration::from_millis(ms))
        }
    };
    let record = match raw.record.as_deref() {
        None => Record::All,
        Some(text) => Record::parse(text).unwrap_or_else(|| {
            errors.push(ConfigError::new(
                format!("{path}.record"),
                format!("'{text}' is not one of \"all\", \"failures\", \"none\""),
            ));
            Record::All
        }),
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Observer {
        coalesce,
        record,
        name: name.to_string(),
        entity,
        event_types,
        condition,
        tenant,
        actions,
        retry,
        on_failure,
        ordered: raw.ordered.unwrap_or(true),
        enabled: raw.enabled.unwrap_or(true),
        description: raw.description,
    })
}

fn parse_kind(name: &str) -> Option<EventKind> {
    match name.to_ascii_uppercase().as_str() {
        "INSERT" => Some(EventKind::Created),
        "UPDATE" => Some(EventKind::Updated),
        "DELETE" => Some(EventKind::Deleted),
        "CUSTOM" => Some(EventKind::Custom),
        "SNAPSHOT" => Some(EventKind::Snapshot),
        _ => None,
    }
}

fn compile_retry(table: &toml::Table, path: &str, errors: &mut Vec<ConfigError>) -> RetryPolicy {
    let mut policy = RetryPolicy::default();
    let raw: RawRetry = match parse_fields::<_, ConfigError>(table, path) {
        Ok(raw) => raw,
        Err(e) => {
            errors.extend(e);
            return policy;
        }
    };
    if let Some(v) = raw.max_attempts {
        if v == 0 {
            errors.push(ConfigError::new(
                format!("{path}.max_attempts"),
                "must be at least 1",
            ));
        }
        policy.max_attempts = v;
    }
    if let Some(v) = raw.initial_delay_ms {
        policy.initial_delay = Duration::from_millis(v);
    }
    if let Some(v) = raw.max_delay_ms {
        policy.max_delay = Duration::from_millis(v);
    }
    if let Some(v) = raw.backoff_strategy {
        policy.strategy = v;
    }
    if let Some(v) = raw.jitter {
        policy.jitter = v;
    }
    if policy.initial_delay > policy.max_delay {
        errors.push(ConfigError::new(
            format!("{path}.initial_delay_ms"),
            "must not exceed max_delay_ms",
        ));
    }
    policy
}
