//! Runtime control without a restart: paused observers (`core.observer_paused`) and reload
//! requests (`core.observer_reload_requests`), both per consumer, both durable.
//!
//! Invariants:
//! * A paused observer's deliveries are held, never skipped: the leader queues them in the
//!   retry queue with their attempts unchanged (parked in order behind the entity's first), and
//!   [`crate::delivery::retry_queue::claim_due`] does not claim items of a paused observer. On
//!   resume they are due at once, heads first, so each entity's order is kept.
//! * The leader reads the paused set at least every [`PAUSE_POLL`]: a pause or a resume is
//!   honoured within a second, across restarts and failovers (the row is the truth).
//! * A reload request is a generation number: a daemon reloads once per generation it has not
//!   handled, and records the outcome for the `reload` command to print.

use crate::error::{Error, Result};
use std::collections::HashSet;
use std::sync::RwLock;
use std::time::Duration;
use tokio_postgres::Client;

/// How often the leader reads the paused observers (a pause is honoured within this, plus one
/// delivery in progress).
pub const PAUSE_POLL: Duration = Duration::from_millis(250);

/// A database without migration 0009 gets the hint to migrate, not a bare "relation does not
/// exist".
fn unmigrated(e: tokio_postgres::Error) -> Error {
    if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) {
        Error::Invalid(
            "the runtime-control tables are missing (core.observer_paused): run `fraiseql-observers migrate`"
                .to_string(),
        )
    } else {
        Error::Database(e)
    }
}

/// Pause `observer` of `consumer`. Returns false when it was paused already.
pub async fn pause(client: &Client, consumer: &str, observer: &str) -> Result<bool> {
    Ok(client
        .execute(
            "INSERT INTO core.observer_paused (consumer_id, observer) VALUES ($1, $2)
             ON CONFLICT DO NOTHING",
            &[&consumer, &observer],
        )
        .await
        .map_err(unmigrated)?
        > 0)
}

/// Resume `observer` of `consumer`. Returns false when it was not paused.
pub async fn resume(client: &Client, consumer: &str, observer: &str) -> Result<bool> {
    Ok(client
        .execute(
            "DELETE FROM core.observer_paused WHERE consumer_id = $1 AND observer = $2",
            &[&consumer, &observer],
        )
        .await
        .map_err(unmigrated)?
        > 0)
}

/// The paused observers of `consumer`, by name.
pub async fn paused(client: &Client, consumer: &str) -> Result<HashSet<String>> {
    Ok(client
        .query(
            "SELECT observer FROM core.observer_paused WHERE consumer_id = $1",
            &[&consumer],
        )
        .await
        .map_err(unmigrated)?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// A paused observer as an operator sees it (`status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PausedObserver {
    pub observer: String,
    pub paused_at: chrono::DateTime<chrono::Utc>,
    /// Distinct events waiting in the retry queue for this observer.
    pub held_events: i64,
}

/// The paused observers of `consumer` with how many events each holds, by name.
pub async fn paused_with_holds(client: &Client, consumer: &str) -> Result<Vec<PausedObserver>> {
    Ok(client
        .query(
            "SELECT p.observer, p.paused_at,
                    (SELECT count(DISTINCT q.event_id) FROM core.observer_retry_queue q
                      WHERE q.consumer_id = p.consumer_id AND q.observer = p.observer)
               FROM core.observer_paused p
              WHERE p.consumer_id = $1
              ORDER BY p.observer",
            &[&consumer],
        )
        .await
        .map_err(unmigrated)?
        .iter()
        .map(|r| PausedObserver {
            observer: r.get(0),
            paused_at: r.get(1),
            held_events: r.get(2),
        })
        .collect())
}

/// The paused observers as the running pipeline sees them: read by the leader's pause watcher,
/// consulted before every attempt. Shared across reloads.
#[derive(Debug, Default)]
pub struct Paused {
    names: RwLock<HashSet<String>>,
}

impl Paused {
    /// Whether observer `name` is paused.
    pub fn contains(&self, name: &str) -> bool {
        let names = self.names.read().expect("paused lock poisoned");
        !names.is_empty() && names.contains(name)
    }

    /// Replace the set; returns the observers paused and resumed by the change.
    pub fn replace(&self, now: HashSet<String>) -> (Vec<String>, Vec<String>) {
        let mut names = self.names.write().expect("paused lock poisoned");
        let mut paused: Vec<String> = now.difference(&names).cloned().collect();
        let mut resumed: Vec<String> = names.difference(&now).cloned().collect();
        paused.sort();
        resumed.sort();
        *names = now;
        (paused, resumed)
    }
}

/// Ask every daemon of `consumer` to reload its configuration. Returns the request's generation.
pub async fn request_reload(client: &Client, consumer: &str) -> Result<i64> {
    Ok(client
        .query_one(
            "INSERT INTO core.observer_reload_requests (consumer_id, requested) VALUES ($1, 1)
             ON CONFLICT (consumer_id) DO UPDATE
                SET requested = core.observer_reload_requests.requested + 1, requested_at = now()
             RETURNING requested",
            &[&consumer],
        )
        .await
        .map_err(unmigrated)?
        .get(0))
}

/// The latest reload generation requested for `consumer` (0 when none ever was).
pub async fn reload_requested(client: &Client, consumer: &str) -> Result<i64> {
    Ok(client
        .query_opt(
            "SELECT requested FROM core.observer_reload_requests WHERE consumer_id = $1",
            &[&consumer],
        )
        .await
        .map_err(unmigrated)?
        .map_or(0, |r| r.get(0)))
}

/// How a daemon answered a reload request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadAnswer {
    /// The generation answered.
    pub generation: i64,
    /// `Ok` when the new configuration runs; else every error, one per line.
    pub result: std::result::Result<(), String>,
}

/// Record that generation `generation` of `consumer`'s reload requests was handled. Never moves
/// the answered generation back. The leader's answer (`leading`) replaces a standby's for the
/// same generation; a standby answers only a generation nobody answered yet.
pub async fn answer_reload(
    client: &Client,
    consumer: &str,
    generation: i64,
    leading: bool,
    result: std::result::Result<(), &str>,
) -> Result<()> {
    let (outcome, errors) = match result {
        Ok(()) => ("ok", None),
        Err(e) => ("error", Some(e)),
    };
    client
        .execute(
            "UPDATE core.observer_reload_requests
                SET answered = $2, answered_at = now(), result = $3, errors = $4
              WHERE consumer_id = $1 AND (answered < $2 OR ($5 AND answered = $2))",
            &[&consumer, &generation, &outcome, &errors, &leading],
        )
        .await?;
    Ok(())
}

/// The latest answer to `consumer`'s reload requests, if any.
pub async fn reload_answer(client: &Client, consumer: &str) -> Result<Option<ReloadAnswer>> {
    Ok(client
        .query_opt(
            "SELECT answered, result, coalesce(errors, '') FROM core.observer_reload_requests
              WHERE consumer_id = $1 AND result IS NOT NULL",
            &[&consumer],
        )
        .await
        .map_err(unmigrated)?
        .map(|r| ReloadAnswer {
            generation: r.get(0),
            result: match r.get::<_, String>(1).as_str() {
                "ok" => Ok(()),
                _ => Err(r.get(2)),
            },
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_paused_set_reports_what_changed() {
        let p = Paused::default();
        assert!(!p.contains("a"));
        let (paused, resumed) = p.replace(HashSet::from(["a".to_string(), "b".to_string()]));
        assert_eq!(paused, ["a", "b"]);
        assert!(resumed.is_empty());
        assert!(p.contains("a") && p.contains("b") && !p.contains("c"));
        let (paused, resumed) = p.replace(HashSet::from(["b".to_string(), "c".to_string()]));
        assert_eq!(
            (paused, resumed),
            (vec!["c".to_string()], vec!["a".to_string()])
        );
        assert!(!p.contains("a"));
    }
}
