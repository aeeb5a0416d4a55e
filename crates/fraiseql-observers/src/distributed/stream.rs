//! The work stream: one JetStream stream (file storage, work-queue retention), one subject and one
//! durable pull consumer per partition.
//!
//! Invariants:
//! * [`WorkStream::publish`] returns `Ok` only once the stream stored the message (PubAck), or
//!   reported it a duplicate of one it stored (same `Nats-Msg-Id` within the window).
//! * [`WorkStream::take_partition`] deletes and recreates the partition's consumer (deliver all,
//!   explicit ack): with work-queue retention the stream then hands out exactly the messages not
//!   acknowledged yet, in stream order, whatever the previous owner had in flight.
//! * A work stream serves one consumer: its description names it ([`owner_description`]), and
//!   a reader or worker of another consumer refuses it (their partitions' durable consumers
//!   would share names, and each would delete the other's).
//! * The description also records the partition count. A reader or worker with another
//!   `partitions` updates the record only while the stream is empty (no message stored, so none
//!   waiting for an ack either), and deletes the consumers of partitions that no longer exist;
//!   with messages stored it refuses to start: they are partitioned by the old count, and a new
//!   count would deliver one entity's changes from two partitions, out of order.

use super::{durable_name, DistributedConfig};
use crate::actions::nats::{is_refusal, NatsConnection};
use crate::error::{Error, Result};
use async_nats::jetstream::{self, consumer, stream};
use std::time::Duration;

/// How long a publish waits for its PubAck, and other stream calls for an answer.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to the work stream.
#[derive(Clone)]
pub struct WorkStream {
    js: jetstream::Context,
    config: DistributedConfig,
}

impl std::fmt::Debug for WorkStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkStream")
            .field("stream", &self.config.stream)
            .field("partitions", &self.config.partitions)
            .finish()
    }
}

fn broker(what: &str, e: impl std::fmt::Display) -> Error {
    Error::WorkStream(format!("{what}: {e}"))
}

/// The description a work stream carries: which consumer it serves, in how many partitions.
pub fn owner_description(consumer: &str, partitions: u32) -> String {
    format!("{} ({partitions} partitions)", owner_prefix(consumer))
}

fn owner_prefix(consumer: &str) -> String {
    format!("fraiseql-observers work stream of consumer '{consumer}'")
}

/// What a work stream's description says about its owner: `None` when it is not `consumer`'s;
/// `Some(None)` when it is but records no partition count (made by an earlier version).
fn recorded_partitions(description: &str, consumer: &str) -> Option<Option<u32>> {
    let rest = description.strip_prefix(&owner_prefix(consumer))?;
    if rest.is_empty() {
        return Some(None);
    }
    let count = rest.strip_prefix(" (")?.strip_suffix(" partitions)")?;
    count.parse().ok().map(Some)
}

/// Connect to the work stream's server, retrying while it cannot be reached; a refusal
/// (credentials, permissions, TLS) is an error at once, naming the server and the keys to check
/// (never a secret).
async fn connect_client(nats: &NatsConnection) -> Result<async_nats::Client> {
    let mut delay = Duration::from_millis(100);
    loop {
        let options = nats
            .options()
            .map_err(|e| Error::Invalid(format!("distributed: {e}")))?
            .name("fraiseql-observers-distributed")
            .connection_timeout(TIMEOUT);
        match options.connect(nats.url()).await {
            Ok(client) => return Ok(client),
            Err(e) if is_refusal(e.kind()) => {
                return Err(Error::Invalid(format!(
                    "distributed: the NATS server {} refused the connection ({}): check \
                     nats_url, token_env / creds_file / nkey_seed_env, and tls / ca_file",
                    nats.shown(),
                    e.kind()
                )))
            }
            Err(e) => {
                tracing::warn!(nats = %nats.shown(), error = %e.kind(),
                    "cannot reach the work stream's NATS server; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

impl WorkStream {
    /// Connect (retrying until the server answers; the client reconnects by itself afterwards)
    /// and create the stream when it is missing, for `consumer`; an error when the server
    /// refuses the credentials or the TLS setup, or when the stream exists for another
    /// consumer, or without work-queue retention or our subjects.
    pub async fn connect(config: &DistributedConfig, consumer: &str) -> Result<WorkStream> {
        let client = connect_client(&config.nats).await?;
        let mut js = jetstream::new(client);
        js.set_timeout(TIMEOUT);
        let stream = WorkStream {
            js,
            config: config.clone(),
        };
        stream.ensure_stream(consumer).await?;
        Ok(stream)
    }

    pub fn config(&self) -> &DistributedConfig {
        &self.config
    }

    async fn ensure_stream(&self, consumer: &str) -> Result<()> {
        let c = &self.config;
        let subjects = format!("{}.>", c.subject_prefix);
        let wanted = stream::Config {
            name: c.stream.clone(),
            description: Some(owner_description(consumer, c.partitions)),
            subjects: vec![subjects.clone()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            num_replicas: c.replicas,
            duplicate_window: c.duplicate_window,
            ..Default::default()
        };
        let mut delay = Duration::from_millis(100);
        loop {
            match self.js.get_or_create_stream(wanted.clone()).await {
                Ok(mut s) => {
                    let info = s.info().await.map_err(|e| broker("stream info", e))?;
                    if info.config.retention != stream::RetentionPolicy::WorkQueue {
                        return Err(Error::Invalid(format!(
                            "stream '{}' exists without work-queue retention: it cannot be a work stream",
                            c.stream
                        )));
                    }
                    let owner = info.config.description.clone().unwrap_or_default();
                    let Some(recorded) = recorded_partitions(&owner, consumer) else {
                        return Err(Error::Invalid(format!(
                            "stream '{}' is not the work stream of consumer '{consumer}' (its \
                             description: '{owner}'): give each consumer its own `stream` and \
                             `subject_prefix` in [distributed]",
                            c.stream
                        )));
                    };
                    if !info.config.subjects.contains(&subjects) {
                        return Err(Error::Invalid(format!(
                            "stream '{}' captures {:?}, not '{subjects}' (subject_prefix): \
                             change `subject_prefix` back, or give it a new `stream`",
                            c.stream, info.config.subjects
                        )));
                    }
                    if recorded != Some(c.partitions) {
                        self.record_partitions(info.clone(), recorded, consumer)
                            .await?;
                    }
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(stream = %c.stream, error = %e,
                        "cannot create or check the work stream; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// The stream records `recorded` partitions and the configuration says otherwise: record
    /// the new count if the stream is empty (and delete the consumers of partitions beyond it),
    /// refuse otherwise. A stream that records no count (an earlier version's) takes ours.
    async fn record_partitions(
        &self,
        info: stream::Info,
        recorded: Option<u32>,
        consumer: &str,
    ) -> Result<()> {
        let c = &self.config;
        let stored = info.state.messages;
        if let (Some(old), true) = (recorded, stored > 0) {
            return Err(Error::Invalid(format!(
                "stream '{}' holds {stored} messages split into {old} partitions, and \
                 [distributed] says `partitions = {}`: changing the count while messages wait \
                 would deliver an entity's changes out of order. Drain the stream first (stop \
                 the reader, let the workers empty it: `status` shows the lag), then start \
                 everything with the new count; or keep `partitions = {old}`",
                c.stream, c.partitions
            )));
        }
        let mut config = info.config;
        config.description = Some(owner_description(consumer, c.partitions));
        self.js
            .update_stream(config)
            .await
            .map_err(|e| broker("record the partition count", e))?;
        if let Some(old) = recorded {
            let stream = self
                .js
                .get_stream(&c.stream)
                .await
                .map_err(|e| broker("get stream", e))?;
            for p in c.partitions..old {
                match stream.delete_consumer(&durable_name(p)).await {
                    Ok(_) => {}
                    Err(e) if e.to_string().contains("not found") => {}
                    Err(e) => return Err(broker("delete consumer", e)),
                }
            }
        }
        tracing::info!(stream = %c.stream, from = ?recorded, to = c.partitions,
            "work stream empty: partition count recorded");
        Ok(())
    }

    /// Publish `body` to partition `partition` with `msg_id`, and wait for the PubAck.
    pub async fn publish(&self, partition: u32, msg_id: &str, body: Vec<u8>) -> Result<()> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        self.js
            .publish_with_headers(self.config.subject(partition), headers, body.into())
            .await
            .map_err(|e| broker("publish", e))?
            .await
            .map_err(|e| broker("publish acknowledgement", e))?;
        Ok(())
    }

    /// Take partition `p`: delete its consumer and create it again, delivering every message
    /// not acknowledged yet, in stream order.
    pub async fn take_partition(&self, p: u32) -> Result<consumer::PullConsumer> {
        let c = &self.config;
        let stream = self
            .js
            .get_stream(&c.stream)
            .await
            .map_err(|e| broker("get stream", e))?;
        let name = durable_name(p);
        match stream.delete_consumer(&name).await {
            Ok(_) => {}
            Err(e) if e.to_string().contains("not found") => {}
            Err(e) => return Err(broker("delete consumer", e)),
        }
        stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(name),
                deliver_policy: consumer::DeliverPolicy::All,
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: c.ack_wait,
                filter_subject: c.subject(p),
                max_ack_pending: c.max_ack_pending,
                num_replicas: c.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| broker("create consumer", e))
    }

    /// Messages of partition `p` not yet delivered to its consumer (the consumer's lag).
    pub async fn pending(&self, p: u32) -> Result<u64> {
        let stream = self
            .js
            .get_stream(&self.config.stream)
            .await
            .map_err(|e| broker("get stream", e))?;
        let mut consumer: consumer::PullConsumer = stream
            .get_consumer(&durable_name(p))
            .await
            .map_err(|e| broker("get consumer", e))?;
        let info = consumer
            .info()
            .await
            .map_err(|e| broker("consumer info", e))?;
        Ok(info.num_pending + info.num_ack_pending as u64)
    }

    /// Messages stored in the work stream (not acknowledged yet), all partitions.
    pub async fn stored(&self) -> Result<u64> {
        let mut stream = self
            .js
            .get_stream(&self.config.stream)
            .await
            .map_err(|e| broker("get stream", e))?;
        let info = stream.info().await.map_err(|e| broker("stream info", e))?;
        Ok(info.state.messages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_description_records_owner_and_partition_count() {
        let d = owner_description("orders", 64);
        assert_eq!(
            d,
            "fraiseql-observers work stream of consumer 'orders' (64 partitions)"
        );
        assert_eq!(recorded_partitions(&d, "orders"), Some(Some(64)));
        assert_eq!(recorded_partitions(&d, "other"), None);
        assert_eq!(
            recorded_partitions(&owner_prefix("orders"), "orders"),
            Some(None)
        );
        assert_eq!(recorded_partitions(&format!("{d}x"), "orders"), None);
        assert_eq!(recorded_partitions("", "orders"), None);
    }
}
