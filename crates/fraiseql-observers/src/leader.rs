//! Leader election: one active instance per consumer (`correctness.md` section 5, phase 1).
//!
//! An instance leads consumer `C` while it holds the session advisory lock [`lock_key`]`(C)` on a
//! connection of its own (TCP keepalives on). Others wait as standbys, trying again every
//! [`RETRY_INTERVAL`], and take over within about that long once the leader's session ends (its
//! process died, its backend was terminated, its network went away).
//!
//! Invariants:
//! * [`Leadership`] exists only while the lock was granted on its connection; dropping it closes
//!   that connection, which releases the lock.
//! * The lock connection is probed every [`HEARTBEAT_INTERVAL`]; when a probe fails or times out,
//!   [`Leadership::lost`] resolves and never un-resolves. The holder must stop at once: another
//!   instance may lead already. (The lock alone cannot rule out two leaders for a moment, e.g. a
//!   terminated backend; the fencing epoch on the checkpoint row stops a deposed leader at its next
//!   write.)

use crate::db;
use crate::error::Result;
use sha2::{Digest, Sha256};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

/// How often a standby tries to take the lock.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// How often the leader probes its lock connection.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// A probe that takes longer than this counts as a lost connection.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);

/// The advisory lock key of `consumer`: the first 8 bytes of
/// `SHA-256("fraiseql-observers:" + consumer)`, big-endian. Stable across builds and platforms.
pub fn lock_key(consumer: &str) -> i64 {
    let digest = Sha256::digest(format!("fraiseql-observers:{consumer}").as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

/// Take `consumer`'s leader lock on `client`'s session without waiting: false when another
/// session holds it. Held until [`unlock`] or the end of the session.
pub async fn try_lock(client: &Client, consumer: &str) -> Result<bool> {
    Ok(client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&lock_key(consumer)])
        .await?
        .get(0))
}

/// Release `consumer`'s leader lock taken with [`try_lock`] on this session.
pub async fn unlock(client: &Client, consumer: &str) -> Result<()> {
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&lock_key(consumer)])
        .await?;
    Ok(())
}

/// The backend (pid) holding `consumer`'s leader lock in `client`'s database, other than
/// `client`'s own session: the running leader, if any.
pub async fn holder(client: &Client, consumer: &str) -> Result<Option<i32>> {
    Ok(client
        .query_opt(
            "SELECT pid FROM pg_locks
              WHERE locktype = 'advisory' AND granted AND objsubid = 1
                AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND ((classid::bigint << 32) | objid::bigint) = $1
                AND pid <> pg_backend_pid()
              LIMIT 1",
            &[&lock_key(consumer)],
        )
        .await?
        .map(|r| r.get(0)))
}

/// The lead of one consumer, held until this value is dropped or [`Leadership::lost`] resolves.
#[derive(Debug)]
pub struct Leadership {
    consumer: String,
    lost: watch::Receiver<bool>,
    heartbeat: JoinHandle<()>,
}

impl Leadership {
    /// Take the lead of `consumer_id`, waiting as a standby while another instance holds it.
    /// `on_standby` is called once, the first time the lock is found taken. Connection failures
    /// are retried (with capped backoff) for as long as it takes; other errors (a bad URL, a
    /// refused login) are returned.
    pub async fn acquire(
        database_url: &str,
        consumer_id: &str,
        on_standby: impl Fn(),
    ) -> Result<Leadership> {
        let config = db::parse_url(database_url)?;
        let application = format!("fraiseql-observers-leader:{consumer_id}");
        let mut client: Option<Client> = None;
        let mut standby = false;
        let mut failure_delay = Duration::from_millis(100);
        let client = loop {
            let attempt = async {
                let c = match client.take().filter(|c| !c.is_closed()) {
                    Some(c) => c,
                    None => db::connect(&config, &application).await?,
                };
                let granted = try_lock(&c, consumer_id).await?;
                Ok::<_, crate::Error>((c, granted))
            }
            .await;
            match attempt {
                Ok((c, true)) => break c,
                Ok((c, false)) => {
                    client = Some(c);
                    failure_delay = Duration::from_millis(100);
                    if !standby {
                        standby = true;
                        tracing::info!(
                            consumer = consumer_id,
                            "standby: another instance leads consumer {consumer_id}"
                        );
                        on_standby();
                    }
                    tokio::time::sleep(RETRY_INTERVAL).await;
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!(consumer = consumer_id, error = %e,
                        retry_in_ms = failure_delay.as_millis() as u64,
                        "cannot reach the database to take the lead; retrying");
                    tokio::time::sleep(failure_delay).await;
                    failure_delay = (failure_delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        };
        tracing::info!(consumer = consumer_id, "leading consumer {consumer_id}");
        let (tx, lost) = watch::channel(false);
        let consumer = consumer_id.to_string();
        let heartbeat = tokio::spawn(heartbeat(client, consumer.clone(), tx));
        Ok(Leadership {
            consumer,
            lost,
            heartbeat,
        })
    }

    /// The consumer this instance leads.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Resolves when the lead is lost: the lock connection failed or closed. Stop at once then.
    pub async fn lost(&self) {
        let mut lost = self.lost.clone();
        // An error means the heartbeat task is gone, which it only is after reporting a loss.
        let _ = lost.wait_for(|lost| *lost).await;
    }

    /// Whether the lead has been lost.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow() || self.heartbeat.is_finished()
    }
}

impl Drop for Leadership {
    /// Stops the heartbeat, which drops the lock connection and so releases the lock.
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

/// Probe the lock connection until a probe fails; then report the loss and end (dropping the
/// connection).
async fn heartbeat(client: Client, consumer: String, lost: watch::Sender<bool>) {
    loop {
        tokio::time::sleep(HEARTBEAT_INTERVAL).await;
        let failure =
            match tokio::time::timeout(HEARTBEAT_TIMEOUT, client.simple_query("SELECT 1")).await {
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {HEARTBEAT_TIMEOUT:?}"),
            };
        tracing::error!(consumer = %consumer, error = %failure,
            "leadership lost: the lock connection failed; another instance may lead now");
        lost.send_replace(true);
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_are_stable_and_distinct() {
        // Pinned: changing the derivation would let an old and a new build lead at once.
        assert_eq!(lock_key("orders"), lock_key("orders"));
        assert_ne!(lock_key("orders"), lock_key("users"));
        let digest = Sha256::digest(b"fraiseql-observers:orders");
        assert_eq!(
            lock_key("orders").to_be_bytes(),
            <[u8; 8]>::try_from(&digest[..8]).unwrap()
        );
    }
}
