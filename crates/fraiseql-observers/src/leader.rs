//! Leader election: one active instance per consumer (`correctness.md` section 5, phase 1), and
//! [`lead`], the daemon's loop: contend, run while leading, contend again when the lead is lost.
//!
//! An instance leads consumer `C` while it holds the session advisory lock [`lock_key`]`(C)` on a
//! connection of its own. Others wait as standbys, trying again every [`RETRY_INTERVAL`], and
//! take over within [`TAKEOVER_BOUND`] once the leader's session ends (its process died, its
//! backend was terminated, its host or network went away without closing its sockets).
//!
//! Invariants:
//! * [`Leadership`] exists only while the lock was granted on its connection; dropping it closes
//!   that connection, which releases the lock.
//! * The lock connection is a session of its own: right after the lock is granted, and then at
//!   every probe, the session its statements run on must hold the lock ([`holds_lock`]); a
//!   transaction-pooling proxy is refused.
//! * The lock connection is probed every [`HEARTBEAT_INTERVAL`]; when a probe fails or times out,
//!   [`Leadership::lost`] resolves and never un-resolves. The holder must stop at once: another
//!   instance may lead already. (The lock alone cannot rule out two leaders for a moment, e.g. a
//!   terminated backend; the fencing epoch on the checkpoint row stops a deposed leader at its next
//!   write.)
//! * The server ends a lock session whose client went silent within [`LOCK_SESSION_SILENCE`]:
//!   the session is never idle longer than a heartbeat while its holder lives
//!   (`idle_session_timeout`), and server-side TCP keepalives and `tcp_user_timeout` close it
//!   when the peer's host is gone.
//! * [`lead`] stops dispatching at once when the lead is lost (the run is dropped: no draining,
//!   no checkpoint), then contends again with capped, jittered backoff; a new lead is a new epoch
//!   that resumes from the saved checkpoint.

use crate::config::Config;
use crate::db;
use crate::error::{ConfigErrors, Error, Result};
use crate::metrics as m;
use crate::pipeline::{EngineStatus, Pipeline};
use futures::FutureExt as _;
use sha2::{Digest, Sha256};
use std::future::Future;
use std::sync::Arc;
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

/// The server ends a lock session whose client has been silent this long (no heartbeat: the
/// leader's host vanished, its network is cut, its process is frozen), which releases the lock.
/// Longer than [`HEARTBEAT_INTERVAL`] + [`HEARTBEAT_TIMEOUT`], so that a live leader whose
/// connection stalls notices the loss itself before the server hands the lock on.
pub const LOCK_SESSION_SILENCE: Duration = Duration::from_secs(8);

/// The longest a standby waits to take the lock after the leader's host vanished without
/// closing its connections: the silence bound, plus a standby retry, plus a margin.
pub const TAKEOVER_BOUND: Duration = Duration::from_secs(10);

/// The lock connection's settings, sent once it is open (its statement and idle-transaction
/// bounds are `db::session_timeouts`): server-side keepalives and `tcp_user_timeout` notice a
/// vanished peer (its kernel no longer answers).
fn lock_session_settings(server_version: i32) -> String {
    let silence_ms = LOCK_SESSION_SILENCE.as_millis();
    let mut sql = format!(
        "SET tcp_keepalives_idle = 4; SET tcp_keepalives_interval = 1; \
         SET tcp_keepalives_count = 4; SET tcp_user_timeout = {silence_ms};"
    );
    // A peer whose kernel still answers (a proxy, a frozen process) is caught by silence alone.
    if server_version >= 140000 {
        sql.push_str(&format!(" SET idle_session_timeout = {silence_ms};"));
    }
    sql
}

/// Open the lock connection, with [`lock_session_settings`].
pub(crate) async fn connect_lock(
    config: &tokio_postgres::Config,
    application: &str,
) -> Result<Client> {
    let client = db::connect(config, application).await?;
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .get(0);
    client
        .batch_execute(&lock_session_settings(version))
        .await?;
    Ok(client)
}

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

/// Whether the session that `client`'s next statement runs on holds `consumer`'s leader lock.
/// False on the lock connection means its statements do not all run on one session: it goes
/// through a transaction-pooling proxy (PgBouncer `pool_mode = transaction`), where a session
/// lock guards nothing.
pub async fn holds_lock(client: &Client, consumer: &str) -> Result<bool> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_locks
                             WHERE locktype = 'advisory' AND granted AND objsubid = 1
                               AND pid = pg_backend_pid()
                               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                               AND ((classid::bigint << 32) | objid::bigint) = $1)",
            &[&lock_key(consumer)],
        )
        .await?
        .get(0))
}

/// Why a lead cannot be trusted on this connection (see [`holds_lock`]).
const NOT_A_SESSION: &str = "the leader lock is not held by the session the lock connection's \
    statements run on: is the daemon connected through a transaction-pooling proxy (PgBouncer \
    pool_mode = transaction)? The leader lock needs a session of its own: connect directly or \
    through session pooling";

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
                    None => connect_lock(&config, &application).await?,
                };
                let granted = try_lock(&c, consumer_id).await?;
                Ok::<_, crate::Error>((c, granted))
            };
            // A connection that stopped answering (its network went away) is dropped and
            // opened again, like one that failed.
            let attempt = match tokio::time::timeout(HEARTBEAT_TIMEOUT, attempt).await {
                Ok(attempt) => attempt,
                Err(_) => Err(Error::Reconnect(format!(
                    "no answer within {HEARTBEAT_TIMEOUT:?}"
                ))),
            };
            match attempt {
                Ok((c, true)) => {
                    // Two more transactions on the lock connection must run on the session
                    // holding the lock: a transaction pooler is refused at once.
                    for _ in 0..2 {
                        if !holds_lock(&c, consumer_id).await? {
                            return Err(Error::Invalid(NOT_A_SESSION.into()));
                        }
                    }
                    break c;
                }
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

/// Probe the lock connection until a probe fails or finds the lock not held by the session it
/// ran on ([`holds_lock`]); then report the loss and end (dropping the connection).
async fn heartbeat(client: Client, consumer: String, lost: watch::Sender<bool>) {
    loop {
        tokio::time::sleep(HEARTBEAT_INTERVAL).await;
        let probe = holds_lock(&client, &consumer);
        let failure = match tokio::time::timeout(HEARTBEAT_TIMEOUT, probe).await {
            Ok(Ok(true)) => continue,
            Ok(Ok(false)) => NOT_A_SESSION.to_string(),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {HEARTBEAT_TIMEOUT:?}"),
        };
        tracing::error!(consumer = %consumer, error = %failure,
            "leadership lost: the lock connection failed; another instance may lead now");
        lost.send_replace(true);
        return;
    }
}

/// What [`lead`] is doing, reported to its caller as it changes.
#[derive(Debug, Clone)]
pub enum LeadState {
    /// Another instance leads the consumer: waiting for the lock.
    Standby,
    /// Leading: the engine runs, with these live figures.
    Leading(Arc<EngineStatus>),
    /// The lead was lost (or could not be used): reconnecting to contend again.
    Reconnecting,
}

/// What to do after a lead ended on `error`.
#[derive(Debug, PartialEq, Eq)]
enum AfterLoss {
    /// Contend again in this process.
    Recontend,
    /// Stop the process: trying again would fail the same way (a configuration or schema
    /// mistake, a checkpoint ahead of the database) and needs an operator.
    Exit,
}

/// Whether a lead that ended on `error` is contended again: a database that went away or
/// restarted, a deposed lead (fenced), a failed engine task, and a database found read-only
/// (a failover in progress), and a reader that reached another server than its lead started on
/// are passing states; anything else fails the same way every time.
fn after_loss(error: &Error) -> AfterLoss {
    match error {
        e if e.is_transient() => AfterLoss::Recontend,
        Error::Fenced { .. }
        | Error::TaskFailed(_)
        | Error::LostLead { .. }
        | Error::ReadOnlyStandby
        | Error::ServerChanged { .. } => AfterLoss::Recontend,
        _ => AfterLoss::Exit,
    }
}

/// Capped, jittered exponential backoff between two contentions.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(200);
    const CAP: Duration = Duration::from_secs(5);

    fn new() -> Backoff {
        Backoff { next: Self::FIRST }
    }

    /// The next delay: between half and all of the current step, which then doubles (capped).
    fn delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(Self::CAP);
        step.mul_f64(rand::random_range(0.5..=1.0))
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Lead `config.runtime.consumer_id` until `shutdown` resolves: take the lock (standing by while
/// another instance holds it), start the pipeline (a new epoch, from the saved checkpoint) and
/// run it. When the lead is lost (the lock connection failed, the run was fenced, an engine task
/// failed, the database restarted) dispatching stops at once and the consumer is contended again
/// after a capped, jittered backoff; `recompile` builds the observers again for the new run.
/// Each change of `reloads` applies the configuration `recompile` builds then, at once
/// ([`Pipeline::run_reloading`]: drain, then run the new observers in the same lead); a
/// change while standing by applies when the lead is taken.
///
/// Returns `Ok` after a shutdown (a graceful one saves the checkpoint). Returns an error for a
/// mistake that contending again would repeat (see [`after_loss`]), and for any lost lead when
/// `runtime.exit_on_lost_lead` is set. `report` hears every change of state.
pub async fn lead(
    database_url: &str,
    config: Config,
    recompile: impl Fn() -> Result<Config, ConfigErrors>,
    report: impl Fn(LeadState),
    shutdown: impl Future<Output = ()>,
    mut reloads: watch::Receiver<u64>,
) -> Result<()> {
    let consumer = config.runtime.consumer_id.clone();
    let exit_on_lost_lead = config.runtime.exit_on_lost_lead;
    let shutdown = shutdown.shared();
    let mut next = Some(config);
    let mut backoff = Backoff::new();
    loop {
        // A reload accepted while standing by or reconnecting applies to the next lead.
        let reloaded = reloads.has_changed().unwrap_or(false);
        reloads.borrow_and_update();
        let config = match next.take() {
            Some(config) if !reloaded => config,
            _ => recompile().map_err(|e| Error::Invalid(e.to_string()))?,
        };
        let ended = lead_once(
            database_url,
            config,
            &report,
            shutdown.clone(),
            &mut backoff,
            (&mut reloads, &recompile),
        );
        let error = match ended.await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if exit_on_lost_lead || after_loss(&error) == AfterLoss::Exit {
            return Err(error);
        }
        metrics::counter!(m::LOST_LEADS).increment(1);
        report(LeadState::Reconnecting);
        let delay = backoff.delay();
        tracing::warn!(consumer = %consumer, error = %error, retry_in_ms = delay.as_millis() as u64,
            "lost the lead of consumer {consumer}: stopped at once; contending again");
        tokio::select! {
            _ = shutdown.clone() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// One lead: take the lock, start, run until shutdown (`Ok`) or until the lead ends (the error
/// that ended it). A shutdown before the run started returns at once; during the run, the run
/// handles it (draining, saving the checkpoint).
async fn lead_once(
    database_url: &str,
    config: Config,
    report: &impl Fn(LeadState),
    shutdown: impl Future<Output = ()> + Clone,
    backoff: &mut Backoff,
    (reloads, recompile): (
        &mut watch::Receiver<u64>,
        &impl Fn() -> Result<Config, ConfigErrors>,
    ),
) -> Result<()> {
    let consumer = config.runtime.consumer_id.clone();
    let leadership = tokio::select! {
        biased;
        _ = shutdown.clone() => {
            tracing::info!(consumer = %consumer, "stopped before taking the lead");
            return Ok(());
        }
        taken = Leadership::acquire(database_url, &consumer, || report(LeadState::Standby)) => taken?,
    };
    let lost = || async {
        leadership.lost().await;
        Error::LostLead {
            consumer: consumer.clone(),
        }
    };
    let pipeline = tokio::select! {
        biased;
        e = lost() => return Err(e),
        _ = shutdown.clone() => {
            tracing::info!(consumer = %consumer, "stopped while starting");
            return Ok(());
        }
        started = Pipeline::start(database_url, config) => started?,
    };
    let epoch = pipeline.epoch();
    backoff.reset();
    report(LeadState::Leading(pipeline.status()));
    // Dropping `run` (the lead is lost) aborts every task it started: no draining, no checkpoint.
    let result = tokio::select! {
        biased;
        e = lost() => Err(e),
        result = pipeline.run_reloading(shutdown, reloads, recompile) => result,
    };
    if let Err(Error::Fenced { .. }) = &result {
        tracing::error!(consumer = %consumer, epoch,
            "fenced: another instance leads this consumer now; stopped at once");
    }
    result
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

    #[test]
    fn a_lost_lead_is_contended_again_unless_the_mistake_would_repeat() {
        let fenced = Error::Fenced {
            consumer: "c".into(),
            epoch: 1,
        };
        assert_eq!(after_loss(&fenced), AfterLoss::Recontend);
        assert_eq!(
            after_loss(&Error::TaskFailed("retry worker panicked".into())),
            AfterLoss::Recontend
        );
        assert_eq!(
            after_loss(&Error::Reconnect("refused".into())),
            AfterLoss::Recontend
        );
        assert_eq!(after_loss(&Error::ReadOnlyStandby), AfterLoss::Recontend);
        let changed = Error::ServerChanged {
            consumer: "c".into(),
            before: "cluster 1, timeline 1".into(),
            after: "cluster 1, timeline 2".into(),
        };
        assert_eq!(after_loss(&changed), AfterLoss::Recontend);
        assert_eq!(
            after_loss(&Error::ChangeLogShape("no txid".into())),
            AfterLoss::Exit
        );
        assert_eq!(
            after_loss(&Error::CheckpointAhead {
                consumer: "c".into(),
                stored: "2:2:".into(),
                current: "1:1:".into()
            }),
            AfterLoss::Exit
        );
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let mut backoff = Backoff::new();
        let delays: Vec<Duration> = (0..20).map(|_| backoff.delay()).collect();
        assert!(delays[0] >= Backoff::FIRST / 2 && delays[0] <= Backoff::FIRST);
        assert!(delays.iter().all(|d| *d <= Backoff::CAP));
        assert!(delays[19] >= Backoff::CAP / 2);
        backoff.reset();
        assert!(backoff.delay() <= Backoff::FIRST);
    }

    #[test]
    fn the_lock_session_is_bounded() {
        let sql = lock_session_settings(150000);
        assert!(sql.contains("tcp_keepalives_idle = 4"));
        assert!(sql.contains("tcp_user_timeout = 8000"));
        assert!(sql.contains("idle_session_timeout = 8000"));
        assert!(!lock_session_settings(130000).contains("idle_session_timeout"));
        // Keepalives: idle + interval * count, within the silence bound.
        assert!(Duration::from_secs(4 + 4) <= LOCK_SESSION_SILENCE);
        assert!(LOCK_SESSION_SILENCE > HEARTBEAT_INTERVAL + HEARTBEAT_TIMEOUT);
        assert!(LOCK_SESSION_SILENCE + RETRY_INTERVAL <= TAKEOVER_BOUND);
    }
}
