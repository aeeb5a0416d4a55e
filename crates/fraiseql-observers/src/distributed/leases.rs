//! Partition leases and the workers' registry (`0012_distributed.sql`).
//!
//! Invariants:
//! * A worker owns partition `p` of consumer `C` while it holds the advisory lock of consumer
//!   `C/p` ([`crate::leader::lock_key`]) on its one lock connection; losing that connection
//!   loses every partition at once, and the server ends a silent lock session within
//!   [`crate::leader::LOCK_SESSION_SILENCE`] (the same session settings as a leader's).
//! * Taking a partition bumps `C/p`'s fencing epoch ([`claim_partition`]): every retry-queue and
//!   dead-letter write of a deposed owner is refused.

use crate::db;
use crate::error::{Error, Result};
use crate::leader::{self, HEARTBEAT_TIMEOUT};
use std::time::Duration;
use tokio_postgres::Client;

/// A worker whose heartbeat is older than this is not counted among the live ones.
pub const WORKER_EXPIRY: Duration = Duration::from_secs(5);

/// One worker's lock connection: the advisory locks of the partitions it owns.
pub struct PartitionLocks {
    client: Client,
    consumer: String,
}

impl PartitionLocks {
    /// Open the lock connection of a worker of `consumer`.
    pub async fn open(database_url: &str, consumer: &str) -> Result<PartitionLocks> {
        let config = db::parse_url(database_url)?;
        let client =
            leader::connect_lock(&config, &format!("fraiseql-observers-worker:{consumer}")).await?;
        Ok(PartitionLocks {
            client,
            consumer: consumer.to_string(),
        })
    }

    /// Take partition `p`'s lease without waiting: false when another worker holds it.
    pub async fn try_take(&self, p: u32) -> Result<bool> {
        let consumer = super::partition_consumer(&self.consumer, p);
        bounded(leader::try_lock(&self.client, &consumer)).await
    }

    /// Give partition `p`'s lease back.
    pub async fn release(&self, p: u32) -> Result<()> {
        let consumer = super::partition_consumer(&self.consumer, p);
        bounded(leader::unlock(&self.client, &consumer)).await
    }

    /// The heartbeat: record this worker and the partitions it owns, and return how many
    /// workers are alive (this one included). Fails when the lock connection is lost, or when
    /// it does not hold `owned.len()` advisory locks: then every lease is lost.
    pub async fn heartbeat(&self, worker: &str, owned: &[u32]) -> Result<usize> {
        let parts: Vec<i32> = owned.iter().map(|p| *p as i32).collect();
        let beat = async {
            let held: i64 = self
                .client
                .query_one(
                    "SELECT count(*) FROM pg_locks
                      WHERE locktype = 'advisory' AND granted AND objsubid = 1
                        AND pid = pg_backend_pid()",
                    &[],
                )
                .await?
                .get(0);
            if (held as usize) < owned.len() {
                return Err(Error::Invalid(format!(
                    "the lock connection holds {held} partition locks, not {}: a transaction \
                     pooler between the worker and the database?",
                    owned.len()
                )));
            }
            register_worker(&self.client, &self.consumer, worker, &parts).await?;
            let live = live_workers(&self.client, &self.consumer).await?;
            Ok(live.len().max(1))
        };
        bounded(beat).await
    }
}

/// `operation`, or a transient error when it takes longer than a heartbeat's timeout.
async fn bounded<T>(operation: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    match tokio::time::timeout(HEARTBEAT_TIMEOUT, operation).await {
        Ok(result) => result,
        Err(_) => Err(Error::Reconnect(format!(
            "no answer within {HEARTBEAT_TIMEOUT:?}"
        ))),
    }
}

/// Claim partition `p` of `consumer` (the caller holds its lease): create its row if needed and
/// bump its epoch. Returns the new epoch.
pub async fn claim_partition(client: &Client, consumer: &str, p: u32) -> Result<i64> {
    let id = super::partition_consumer(consumer, p);
    let row = client
        .query_one(
            "INSERT INTO core.observer_checkpoints (consumer_id, snapshot, partition_of)
             VALUES ($1, pg_current_snapshot(), $2)
             ON CONFLICT (consumer_id) DO UPDATE
                SET epoch = core.observer_checkpoints.epoch + 1, updated_at = now()
          RETURNING epoch",
            &[&id, &consumer],
        )
        .await?;
    Ok(row.get(0))
}

/// A worker as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRow {
    pub worker: String,
    pub partitions: Vec<u32>,
    pub heartbeat_age: Duration,
}

/// Record `worker`'s heartbeat and the partitions it owns; run on its lock connection, which
/// it names as the worker's session (a worker whose session ended is not alive).
pub async fn register_worker(
    client: &Client,
    consumer: &str,
    worker: &str,
    partitions: &[i32],
) -> Result<()> {
    client
        .execute(
            "INSERT INTO core.observer_workers (consumer_id, worker_id, partitions, backend_pid)
             VALUES ($1, $2, $3, pg_backend_pid())
             ON CONFLICT (consumer_id, worker_id) DO UPDATE
                SET heartbeat_at = now(), partitions = EXCLUDED.partitions,
                    backend_pid = EXCLUDED.backend_pid",
            &[&consumer, &worker, &partitions],
        )
        .await?;
    Ok(())
}

/// Forget `worker` (a graceful stop).
pub async fn remove_worker(client: &Client, consumer: &str, worker: &str) -> Result<()> {
    client
        .execute(
            "DELETE FROM core.observer_workers WHERE consumer_id = $1 AND worker_id = $2",
            &[&consumer, &worker],
        )
        .await?;
    Ok(())
}

/// The workers of `consumer` alive now (heartbeat within [`WORKER_EXPIRY`] and its lock session
/// still open: a killed worker stops counting at once), by id.
pub async fn live_workers(client: &Client, consumer: &str) -> Result<Vec<WorkerRow>> {
    workers(client, consumer, Some(WORKER_EXPIRY)).await
}

/// The workers of `consumer` the registry holds (within `expiry` when given), by id.
pub async fn workers(
    client: &Client,
    consumer: &str,
    expiry: Option<Duration>,
) -> Result<Vec<WorkerRow>> {
    let expiry = expiry.map(|d| d.as_secs_f64());
    let rows = client
        .query(
            "SELECT worker_id, partitions,
                    extract(epoch FROM now() - heartbeat_at)::float8
               FROM core.observer_workers
              WHERE consumer_id = $1
                AND ($2::float8 IS NULL OR (heartbeat_at > now() - make_interval(secs => $2)
                     AND EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = backend_pid)))
              ORDER BY worker_id",
            &[&consumer, &expiry],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let parts: Vec<i32> = r.get(1);
            let age: f64 = r.get(2);
            WorkerRow {
                worker: r.get(0),
                partitions: parts.into_iter().map(|p| p as u32).collect(),
                heartbeat_age: Duration::from_secs_f64(age.max(0.0)),
            }
        })
        .collect())
}
