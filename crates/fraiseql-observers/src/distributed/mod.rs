//! Distributed delivery: a reader publishes each matched (event, observer) to a JetStream work
//! stream split into partitions; workers on any machine deliver the partitions they own.
//!
//! ```toml
//! [distributed]
//! nats_url = "tls://127.0.0.1:4222"   # or nats_url_env = "NATS_URL"; nats:// without TLS
//! token_env = "NATS_TOKEN"             # or creds_file = "...", or nkey_seed_env = "..."
//! ca_file = "/etc/nats/ca.pem"         # the CA that signed the server's certificate
//! stream = "FRAISEQL_WORK"          # created when missing: file storage, work-queue retention
//! subject_prefix = "fraiseql.work"  # partition p is subject "fraiseql.work.<p>"
//! partitions = 64
//! replicas = 1                      # for a NATS cluster: 3
//! duplicate_window = "2m"
//! ack_wait = "10m"                  # above every action's timeout
//! max_ack_pending = 256             # messages in flight per partition
//! ```
//!
//! The connection keys (`nats_url` / `nats_url_env`, `creds_file`, `nkey_seed_env`,
//! `token_env`, `tls`, `ca_file`) are the `nats` action's, read by the same code
//! ([`crate::actions::nats::NatsConnection`]).
//!
//! * `mod.rs` (pure): the `[distributed]` settings, which partition a delivery goes to
//!   ([`partition_of`]), the message id ([`work_msg_id`]), the message body ([`WorkItem`]).
//! * `stream.rs`: the work stream (create, publish with PubAck, a partition's pull consumer).
//! * `leases.rs`: partitions as consumers of their own (`C/p`), their leases (advisory locks on
//!   one connection per worker) and the workers' registry (`core.observer_workers`).
//!
//! Invariants:
//! * A partition is a consumer: partition `p` of consumer `C` is led as `C/p` ([`partition_consumer`])
//!   with its own fencing epoch; its retry queue, dead letters and delivery log are the
//!   single-process ones under that id.
//! * One (observer, entity) always maps to the same partition for a given partition count
//!   ([`partition_of`]: SHA-256, stable across builds and platforms), so its deliveries stay in
//!   stream order. Changing `partitions` needs an empty work stream: the stream records its
//!   count, and a reader or worker with another count refuses to start while it holds messages.
//! * The message id is a function of (event id, observer): a republish after a reader crash is
//!   dropped by the stream's duplicate window.

mod leases;
mod stream;

pub use leases::{
    claim_partition, live_workers, register_worker, remove_worker, workers, PartitionLocks,
    WorkerRow, WORKER_EXPIRY,
};
pub use stream::WorkStream;

use crate::actions::nats::{NatsConnection, NatsConnectionKeys};
use crate::actions::CompileContext;
use crate::delivery::stored;
use crate::error::ConfigError;
use crate::event::EntityEvent;
use crate::fields::parse_fields;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::time::Duration;

/// What a daemon does: everything (the default), or one side of distributed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Read, match and deliver in one process (a standby may wait).
    #[default]
    Single,
    /// Read and match, and publish each matched delivery to the work stream.
    Reader,
    /// Deliver the work stream's partitions it owns.
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Single => "single",
            Role::Reader => "reader",
            Role::Worker => "worker",
        }
    }
}

/// `[distributed]`, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistributedConfig {
    /// The NATS server: URL, credentials, TLS.
    pub nats: NatsConnection,
    pub stream: String,
    pub subject_prefix: String,
    pub partitions: u32,
    pub replicas: usize,
    pub duplicate_window: Duration,
    pub ack_wait: Duration,
    pub max_ack_pending: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDistributed {
    nats_url: Option<String>,
    nats_url_env: Option<String>,
    creds_file: Option<String>,
    nkey_seed_env: Option<String>,
    token_env: Option<String>,
    tls: Option<bool>,
    ca_file: Option<String>,
    stream: Option<String>,
    subject_prefix: Option<String>,
    partitions: Option<u32>,
    replicas: Option<usize>,
    duplicate_window: Option<String>,
    ack_wait: Option<String>,
    max_ack_pending: Option<i64>,
}

/// The most partitions a work stream may have.
pub const MAX_PARTITIONS: u32 = 4096;

impl DistributedConfig {
    /// Read `[distributed]` (at `path`), reporting every mistake. Secrets and files (credentials,
    /// the CA) are read through `ctx`, as the `nats` action's.
    pub fn parse(
        table: &toml::Table,
        path: &str,
        ctx: &CompileContext<'_>,
    ) -> Result<DistributedConfig, Vec<ConfigError>> {
        let raw: RawDistributed = parse_fields(table, path)?;
        let mut errors = Vec::new();
        let nats = NatsConnection::compile(
            &NatsConnectionKeys {
                url_key: "nats_url",
                url: raw.nats_url.as_deref(),
                url_env_key: "nats_url_env",
                url_env: raw.nats_url_env.as_deref(),
                creds_file: raw.creds_file.as_deref(),
                nkey_seed_env: raw.nkey_seed_env.as_deref(),
                token_env: raw.token_env.as_deref(),
                tls: raw.tls,
                ca_file: raw.ca_file.as_deref(),
            },
            path,
            ctx,
            &mut errors,
        );
        let stream = raw.stream.unwrap_or_else(|| "FRAISEQL_WORK".to_string());
        if stream.is_empty()
            || stream
                .chars()
                .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
        {
            errors.push(ConfigError::new(
                format!("{path}.stream"),
                "not a valid stream name (no spaces, '.', '*', '>', '/' or '\\')",
            ));
        }
        let subject_prefix = raw
            .subject_prefix
            .unwrap_or_else(|| "fraiseql.work".to_string());
        if subject_prefix.is_empty()
            || subject_prefix.split('.').any(|t| {
                t.is_empty() || t.contains(['*', '>']) || t.chars().any(char::is_whitespace)
            })
        {
            errors.push(ConfigError::new(
                format!("{path}.subject_prefix"),
                "not a valid subject prefix (dot-separated tokens, no wildcards or spaces)",
            ));
        }
        let partitions = raw.partitions.unwrap_or(64);
        if partitions == 0 || partitions > MAX_PARTITIONS {
            errors.push(ConfigError::new(
                format!("{path}.partitions"),
                format!("must be from 1 to {MAX_PARTITIONS}"),
            ));
        }
        let replicas = raw.replicas.unwrap_or(1);
        if !(1..=5).contains(&replicas) {
            errors.push(ConfigError::new(
                format!("{path}.replicas"),
                "must be from 1 to 5",
            ));
        }
        let mut duration = |key: &str, value: Option<String>, default: Duration| match value {
            None => default,
            Some(text) => match crate::retention::parse_duration(&text) {
                Ok(d) if !d.is_zero() => d,
                _ => {
                    errors.push(ConfigError::new(
                        format!("{path}.{key}"),
                        format!("'{text}' is not a duration like \"90s\", \"2m\", \"1h\""),
                    ));
                    default
                }
            },
        };
        let duplicate_window = duration(
            "duplicate_window",
            raw.duplicate_window,
            Duration::from_secs(120),
        );
        let ack_wait = duration("ack_wait", raw.ack_wait, Duration::from_secs(600));
        let max_ack_pending = raw.max_ack_pending.unwrap_or(256);
        if max_ack_pending < 1 {
            errors.push(ConfigError::new(
                format!("{path}.max_ack_pending"),
                "must be at least 1",
            ));
        }
        match (errors.is_empty(), nats) {
            (true, Some(nats)) => Ok(DistributedConfig {
                nats,
                stream,
                subject_prefix,
                partitions,
                replicas,
                duplicate_window,
                ack_wait,
                max_ack_pending,
            }),
            _ => Err(errors),
        }
    }

    /// The keys `[distributed]` accepts.
    pub fn keys() -> &'static [&'static str] {
        crate::fields::field_names::<RawDistributed>()
    }

    /// The subject of partition `p`.
    pub fn subject(&self, p: u32) -> String {
        format!("{}.{p}", self.subject_prefix)
    }
}

/// The partition of (observer, entity) among `partitions`: the first 8 bytes of
/// `SHA-256(observer "\n" entity key)`, big-endian, modulo `partitions`. Pure and stable.
pub fn partition_of(observer: &str, entity_key: &str, partitions: u32) -> u32 {
    let mut hasher = Sha256::new();
    hasher.update(observer.as_bytes());
    hasher.update(b"\n");
    hasher.update(entity_key.as_bytes());
    let digest = hasher.finalize();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(bytes) % u64::from(partitions.max(1))) as u32
}

/// The `Nats-Msg-Id` of the work message of (event, observer): the same on every republish.
pub fn work_msg_id(event_id: uuid::Uuid, observer: &str) -> String {
    format!("{event_id}:{observer}")
}

/// The consumer id partition `p` of `consumer` is led as.
pub fn partition_consumer(consumer: &str, p: u32) -> String {
    format!("{consumer}/{p}")
}

/// Whether `id` is `consumer` or one of its partitions (`consumer/p`, [`partition_consumer`]):
/// the dead letters an operator of `consumer` may retry.
pub fn is_consumer_or_partition(id: &str, consumer: &str) -> bool {
    id == consumer
        || id
            .strip_prefix(consumer)
            .and_then(|rest| rest.strip_prefix('/'))
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// The durable JetStream consumer of partition `p`.
pub fn durable_name(p: u32) -> String {
    format!("partition-{p}")
}

/// A work message: one observer's deliveries of one event.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WorkItem {
    pub observer: String,
    /// The observer's action types, in order, as the reader knows them: a worker that does not
    /// know the observer dead-letters one item per action with them. Empty in a message from a
    /// reader older than this field.
    #[serde(default)]
    pub actions: Vec<String>,
    pub event: EntityEvent,
}

#[derive(Serialize)]
struct WorkItemRef<'a, A: Serialize> {
    observer: &'a str,
    actions: A,
    event: &'a EntityEvent,
}

impl WorkItem {
    /// The message body of `observer`'s deliveries of `event` (the event as the retry queue
    /// stores it), naming the observer's action types (`actions`, in order).
    pub fn encode<'a>(
        observer: &str,
        actions: impl IntoIterator<Item = &'a str>,
        event: &EntityEvent,
    ) -> Vec<u8> {
        let actions: Vec<&str> = actions.into_iter().collect();
        serde_json::to_vec(&WorkItemRef {
            observer,
            actions,
            event,
        })
        .expect("an event always serialises to JSON")
    }

    /// Read a message body back (as the retry queue reads its events back).
    pub fn decode(body: &[u8]) -> Result<WorkItem, String> {
        let text = std::str::from_utf8(body).map_err(|e| e.to_string())?;
        stored::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::order_event;

    #[test]
    fn partitions_are_stable_and_spread() {
        // Pinned: changing the hash would reorder a running deployment's deliveries.
        assert_eq!(
            partition_of("order_paid", "Order:1", 64),
            partition_of("order_paid", "Order:1", 64)
        );
        let pinned: Vec<u32> = (0..4)
            .map(|i| partition_of("o", &format!("E:{i}"), 64))
            .collect();
        let digest = Sha256::digest(b"o\nE:0");
        let expected = u64::from_be_bytes(digest[..8].try_into().unwrap()) % 64;
        assert_eq!(pinned[0] as u64, expected);
        let mut counts = vec![0u32; 8];
        for i in 0..8000 {
            counts[partition_of("o", &format!("Order:{i}"), 8) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
        assert_eq!(partition_of("o", "x", 1), 0);
    }

    #[test]
    fn a_consumers_partitions_are_its_own() {
        assert!(is_consumer_or_partition("dist", "dist"));
        assert!(is_consumer_or_partition(
            &partition_consumer("dist", 3),
            "dist"
        ));
        assert!(!is_consumer_or_partition("dist/", "dist"));
        assert!(!is_consumer_or_partition("dist/x", "dist"));
        assert!(!is_consumer_or_partition("distant/3", "dist"));
        assert!(!is_consumer_or_partition("other/3", "dist"));
    }

    #[test]
    fn work_items_round_trip() {
        let event = order_event(
            crate::EventKind::Updated,
            Some(serde_json::json!({"id": 7, "status": "new"})),
            Some(serde_json::json!({"id": 7, "status": "paid"})),
        );
        let body = WorkItem::encode("order_paid", ["webhook", "nats"], &event);
        let item = WorkItem::decode(&body).unwrap();
        assert_eq!(item.observer, "order_paid");
        assert_eq!(item.actions, ["webhook", "nats"]);
        assert_eq!(item.event, event);
        // A message from a reader that did not name the actions still reads.
        let old = serde_json::json!({"observer": "order_paid", "event": event});
        let item = WorkItem::decode(old.to_string().as_bytes()).unwrap();
        assert!(item.actions.is_empty());
        assert_eq!(item.event, event);
        assert!(WorkItem::decode(b"{").is_err());
        assert_eq!(work_msg_id(event.id, "a"), work_msg_id(event.id, "a"));
        assert_ne!(work_msg_id(event.id, "a"), work_msg_id(event.id, "b"));
    }

    fn env(name: &str) -> Option<String> {
        match name {
            "NATS_TOKEN" => Some("t0ken-s3cret".into()),
            "NATS_URL" => Some("nats://u:pa55@10.0.0.1:4333".into()),
            "BAD_SEED" => Some("SUnot-a-seed".into()),
            _ => None,
        }
    }

    fn files(path: &str) -> std::io::Result<String> {
        match path {
            "/etc/nats/ca.pem" => {
                Ok("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into())
            }
            "/etc/nats/not-a-cert" => Ok("hello".into()),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "No such file or directory",
            )),
        }
    }

    fn parse(source: &str) -> Result<DistributedConfig, Vec<ConfigError>> {
        let table: toml::Table = toml::from_str(source).unwrap();
        let ctx = CompileContext {
            read_file: &files,
            ..CompileContext::new(&env)
        };
        DistributedConfig::parse(&table, "distributed", &ctx)
    }

    fn paths(errors: &[ConfigError]) -> Vec<&str> {
        errors.iter().map(|e| e.path.as_str()).collect()
    }

    #[test]
    fn settings_are_checked() {
        let source = r#"nats_url = "http://x"
               stream = "a.b"
               subject_prefix = "w.*"
               partitions = 0
               replicas = 9
               ack_wait = "soon"
               max_ack_pending = 0"#;
        let errors = parse(&format!("{source}\nextra = 1")).unwrap_err();
        assert_eq!(paths(&errors), ["distributed.extra"]);
        let errors = parse(source).unwrap_err();
        assert_eq!(
            paths(&errors),
            [
                "distributed.nats_url",
                "distributed.stream",
                "distributed.subject_prefix",
                "distributed.partitions",
                "distributed.replicas",
                "distributed.ack_wait",
                "distributed.max_ack_pending"
            ]
        );
        let config = parse(r#"nats_url = "nats://127.0.0.1:4222""#).unwrap();
        assert_eq!(config.partitions, 64);
        assert_eq!(config.subject(3), "fraiseql.work.3");
        assert!(!config.nats.tls());
    }

    #[test]
    fn doc_example_parses() {
        let file: toml::Table =
            toml::from_str(&crate::config::doc_toml(include_str!("mod.rs"))).unwrap();
        let table = file["distributed"].as_table().unwrap();
        let ctx = CompileContext {
            read_file: &files,
            ..CompileContext::new(&env)
        };
        let config = DistributedConfig::parse(table, "distributed", &ctx).unwrap();
        assert_eq!(config.partitions, 64);
        assert_eq!(config.nats.shown(), "127.0.0.1:4222");
        assert!(config.nats.tls());
    }

    #[test]
    fn credentials_and_tls_are_checked_at_load_without_showing_secrets() {
        // At most one credential; each one's source checked.
        let errors = parse(
            r#"nats_url = "nats://h:4222"
               token_env = "NATS_TOKEN"
               creds_file = "/nope.creds""#,
        )
        .unwrap_err();
        assert_eq!(
            paths(&errors),
            ["distributed.token_env", "distributed.creds_file"],
            "{errors:?}"
        );
        assert!(errors[1].message.contains("cannot read '/nope.creds'"));
        let errors = parse(
            r#"nats_url = "nats://h:4222"
               token_env = "MISSING""#,
        )
        .unwrap_err();
        assert_eq!(
            errors[0].to_string(),
            "distributed.token_env: environment variable 'MISSING' is not set"
        );
        let errors = parse(
            r#"nats_url = "nats://h:4222"
               nkey_seed_env = "BAD_SEED""#,
        )
        .unwrap_err();
        assert_eq!(paths(&errors), ["distributed.nkey_seed_env"]);
        assert!(!errors[0].message.contains("SUnot"), "{errors:?}");
        let errors = parse(
            r#"nats_url = "tls://h:4222"
               ca_file = "/etc/nats/not-a-cert""#,
        )
        .unwrap_err();
        assert_eq!(paths(&errors), ["distributed.ca_file"]);
        let errors = parse(
            r#"nats_url = "nats://h:4222"
               nats_url_env = "NATS_URL""#,
        )
        .unwrap_err();
        assert_eq!(paths(&errors), ["distributed.nats_url"]);
        let errors = parse(r#"stream = "S""#).unwrap_err();
        assert_eq!(paths(&errors), ["distributed.nats_url"]);

        let config = parse(
            r#"nats_url_env = "NATS_URL"
               token_env = "NATS_TOKEN"
               tls = true"#,
        )
        .unwrap();
        assert_eq!(config.nats.shown(), "10.0.0.1:4333");
        assert!(config.nats.tls());
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("pa55") && !debug.contains("t0ken"),
            "{debug}"
        );
        assert!(config.nats.options().is_ok());
    }
}
