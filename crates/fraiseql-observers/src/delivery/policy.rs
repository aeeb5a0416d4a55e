//! The failure policy: what happens after an attempt fails. Pure: the one place that decides
//! between retrying in place, queueing durably, dead-lettering and dropping, used alike by fresh
//! deliveries (in a lane) and by queued retries (the retry worker).

use crate::actions::{ActionError, FailureKind};
use crate::delivery::schedule::RetryPolicy;
use crate::event::EntityEvent;
use crate::matcher::{EventMatcher, Verdict};
use crate::observer::Observer;
use serde::Deserialize;
use std::time::Duration;

/// A failure whose next attempt is due within this is retried in the lane; a longer wait goes
/// to the durable retry queue so it blocks neither the checkpoint nor other entities.
pub const INLINE_RETRY_LIMIT: Duration = Duration::from_millis(250);

/// What happens to a delivery that will not succeed (an observer's `on_failure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Keep it in the dead letter queue (`fraiseql-observers dlq`).
    #[default]
    Dlq,
    /// Log it and drop it.
    Log,
}

/// Why a delivery was given up (dead-lettered or dropped). One enum from the decision to the
/// dead letter row (`reason` column) and the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Every allowed attempt failed with a transient error.
    Exhausted,
    /// The receiver refused it in a way retrying cannot change (a 4xx, a bad address, a
    /// condition that cannot be evaluated, an action no longer configured, ...).
    Permanent,
    /// The receiver said the endpoint no longer exists (HTTP 410, an unregistered device).
    Gone,
    /// Not sent: the observer no longer accepts the event (a queued retry or an operator retry
    /// found it disabled, scoped to another tenant, its entity, event type or condition changed,
    /// or the observer or action removed from the configuration).
    NotAccepted,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Exhausted => "exhausted",
            Reason::Permanent => "permanent",
            Reason::Gone => "gone",
            Reason::NotAccepted => "not_accepted",
        }
    }

    /// Why an attempt that failed with `error` ends the delivery when no retry follows.
    pub fn of(error: &ActionError) -> Reason {
        match error.kind {
            FailureKind::Transient => Reason::Exhausted,
            FailureKind::Permanent => Reason::Permanent,
            FailureKind::Gone => Reason::Gone,
        }
    }
}

/// What to do with a delivery whose attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Attempt again in the lane after this (short) wait.
    RetryNow(Duration),
    /// Record it in the durable retry queue, due after this wait.
    Queue(Duration),
    /// Give up and keep it in the dead letter queue.
    DeadLetter(Reason),
    /// Give up and drop it with an error log (`on_failure = "log"`).
    Drop(Reason),
}

/// Where the attempt ran: a lane may wait a short while in place, the retry worker never does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// A first delivery (or an in-lane retry of it).
    Lane,
    /// A retry taken from the durable retry queue.
    Queued,
}

/// The decision after attempt number `attempt` (1 for the first) failed with `error`. `random`
/// is a number in `[0, 1)` drawn by the caller (for jitter), so this stays pure.
pub fn after_failure(
    error: &ActionError,
    attempt: u32,
    retry: &RetryPolicy,
    on_failure: OnFailure,
    stage: Stage,
    random: f64,
) -> Decision {
    if error.is_retryable() && retry.allows_another(attempt) {
        let delay = retry.delay(attempt, random, error.retry_after());
        return match stage {
            Stage::Lane if delay <= INLINE_RETRY_LIMIT => Decision::RetryNow(delay),
            _ => Decision::Queue(delay),
        };
    }
    give_up(Reason::of(error), on_failure)
}

/// The decision for a delivery that cannot be attempted at all (a condition that cannot be
/// evaluated, an action that left the configuration).
pub fn give_up(reason: Reason, on_failure: OnFailure) -> Decision {
    match on_failure {
        OnFailure::Dlq => Decision::DeadLetter(reason),
        OnFailure::Log => Decision::Drop(reason),
    }
}

/// Whether action `action_index` of observer `name` still accepts `event`, as configured now:
/// the observer's index when it does, else why not (it is then dead-lettered as
/// [`Reason::NotAccepted`] instead of sent). A queued retry and an operator retry ask this before
/// sending: a delivery decided under an older configuration is sent only if today's would be.
pub fn still_accepted(
    matcher: &EventMatcher,
    observers: &[Observer],
    name: &str,
    action_index: usize,
    event: &EntityEvent,
) -> Result<usize, String> {
    let Some(i) = observers.iter().position(|o| o.name == name) else {
        return Err(format!("observer '{name}' is no longer configured"));
    };
    if action_index >= observers[i].actions.len() {
        return Err(format!(
            "observer '{name}' has no action {action_index} any more"
        ));
    }
    if !matcher.candidates(event).contains(&i) {
        return Err(format!(
            "observer '{name}' no longer watches {} {}",
            event.entity_type,
            event.kind.as_str()
        ));
    }
    match crate::matcher::verdict(&observers[i], event) {
        Verdict::Matched => Ok(i),
        Verdict::Disabled => Err(format!("observer '{name}' is disabled (enabled = false)")),
        Verdict::OtherTenant => Err(format!(
            "observer '{name}' is scoped to another tenant than the event's"
        )),
        Verdict::ConditionFalse => Err(format!(
            "observer '{name}''s condition is false for this event"
        )),
        Verdict::ConditionError(e) => Err(format!(
            "observer '{name}''s condition could not be evaluated: {e}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::schedule::BackoffStrategy;

    fn transient(retry_after: Option<Duration>) -> ActionError {
        ActionError::transient_after("503", retry_after)
    }

    fn permanent() -> ActionError {
        ActionError::permanent("400")
    }

    fn policy(initial_ms: u64, max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial_delay: Duration::from_millis(initial_ms),
            max_delay: Duration::from_secs(60),
            strategy: BackoffStrategy::Fixed,
            jitter: false,
        }
    }

    #[test]
    fn a_short_wait_retries_in_the_lane_a_long_one_is_queued() {
        let short = policy(100, 3);
        assert_eq!(
            after_failure(
                &transient(None),
                1,
                &short,
                OnFailure::Dlq,
                Stage::Lane,
                0.0
            ),
            Decision::RetryNow(Duration::from_millis(100))
        );
        let long = policy(1_000, 3);
        assert_eq!(
            after_failure(&transient(None), 1, &long, OnFailure::Dlq, Stage::Lane, 0.0),
            Decision::Queue(Duration::from_secs(1))
        );
    }

    #[test]
    fn the_limit_itself_is_still_taken_in_place() {
        let at_limit = policy(INLINE_RETRY_LIMIT.as_millis() as u64, 3);
        assert_eq!(
            after_failure(
                &transient(None),
                1,
                &at_limit,
                OnFailure::Dlq,
                Stage::Lane,
                0.0
            ),
            Decision::RetryNow(INLINE_RETRY_LIMIT)
        );
    }

    #[test]
    fn queued_retries_never_wait_in_place() {
        let short = policy(10, 3);
        assert_eq!(
            after_failure(
                &transient(None),
                1,
                &short,
                OnFailure::Dlq,
                Stage::Queued,
                0.0
            ),
            Decision::Queue(Duration::from_millis(10))
        );
    }

    #[test]
    fn retry_after_is_honoured_and_sends_the_retry_to_the_queue() {
        let short = policy(10, 3);
        let asked = Some(Duration::from_secs(5));
        assert_eq!(
            after_failure(
                &transient(asked),
                1,
                &short,
                OnFailure::Dlq,
                Stage::Lane,
                0.0
            ),
            Decision::Queue(Duration::from_secs(5))
        );
    }

    #[test]
    fn the_last_attempt_gives_up_as_exhausted() {
        let p = policy(10, 3);
        assert_eq!(
            after_failure(&transient(None), 3, &p, OnFailure::Dlq, Stage::Queued, 0.0),
            Decision::DeadLetter(Reason::Exhausted)
        );
        assert_eq!(
            after_failure(&transient(None), 3, &p, OnFailure::Log, Stage::Lane, 0.0),
            Decision::Drop(Reason::Exhausted)
        );
        // One attempt in all: never retried.
        assert_eq!(
            after_failure(
                &transient(None),
                1,
                &policy(10, 1),
                OnFailure::Dlq,
                Stage::Lane,
                0.0
            ),
            Decision::DeadLetter(Reason::Exhausted)
        );
    }

    #[test]
    fn permanent_and_gone_are_never_retried() {
        let p = policy(10, 5);
        assert_eq!(
            after_failure(&permanent(), 1, &p, OnFailure::Dlq, Stage::Lane, 0.0),
            Decision::DeadLetter(Reason::Permanent)
        );
        let gone = ActionError::gone("410");
        assert_eq!(
            after_failure(&gone, 1, &p, OnFailure::Log, Stage::Queued, 0.0),
            Decision::Drop(Reason::Gone)
        );
    }

    #[test]
    fn giving_up_follows_on_failure() {
        assert_eq!(
            give_up(Reason::Permanent, OnFailure::Dlq),
            Decision::DeadLetter(Reason::Permanent)
        );
        assert_eq!(
            give_up(Reason::Permanent, OnFailure::Log),
            Decision::Drop(Reason::Permanent)
        );
        assert_eq!(Reason::Exhausted.as_str(), "exhausted");
    }

    fn order(kind: crate::event::EventKind, tenant: &str, status: &str) -> EntityEvent {
        EntityEvent {
            id: uuid::Uuid::nil(),
            sequence: 1,
            kind,
            entity_type: "Order".into(),
            entity_id: uuid::Uuid::nil(),
            tenant: Some(tenant.parse().unwrap()),
            author: None,
            before: None,
            after: Some(serde_json::json!({ "status": status }).into()),
            change_status: "new".into(),
            extra_metadata: serde_json::json!({}),
            source: None,
            created_at: chrono::Utc::now(),
            source_ts: None,
            position: crate::event::Position {
                batch: 1,
                sequence: 1,
            },
        }
    }

    #[test]
    fn a_retry_is_accepted_only_by_the_observer_as_configured_now() {
        use crate::event::EventKind::{Created, Updated};
        const T1: &str = "aaaaaaaa-0000-0000-0000-000000000001";
        const T2: &str = "aaaaaaaa-0000-0000-0000-000000000002";
        let observers = crate::config::load(
            &[
                ("open", "enabled = true"),
                ("off", "enabled = false"),
                ("scoped", &*format!("tenant = \"{T1}\"")),
                ("paid", "condition = \"status == 'paid'\""),
            ]
            .iter()
            .map(|(name, extra)| {
                format!(
                    "[observers.{name}]\nentity = \"Order\"\nevent_type = \"INSERT\"\n{extra}\n\
                     [[observers.{name}.actions]]\ntype = \"webhook\"\nurl = \"https://example.com/\"\n"
                )
            })
            .collect::<String>(),
            &|_| None,
        )
        .unwrap()
        .observers;
        let matcher = EventMatcher::new(&observers);
        let check = |name: &str, action: usize, event: &EntityEvent| {
            still_accepted(&matcher, &observers, name, action, event)
        };
        let paid = order(Created, T1, "paid");
        assert_eq!(check("open", 0, &paid), Ok(0));
        assert_eq!(check("scoped", 0, &paid), Ok(2));
        assert_eq!(check("paid", 0, &paid), Ok(3));
        let refused = |r: Result<usize, String>| r.unwrap_err();
        assert!(refused(check("gone", 0, &paid)).contains("no longer configured"));
        assert!(refused(check("open", 1, &paid)).contains("no action 1"));
        assert!(refused(check("off", 0, &paid)).contains("disabled"));
        assert!(refused(check("scoped", 0, &order(Created, T2, "paid"))).contains("tenant"));
        assert!(refused(check("paid", 0, &order(Created, T1, "new"))).contains("condition"));
        assert!(refused(check("open", 0, &order(Updated, T1, "paid"))).contains("Order UPDATE"));
        assert_eq!(Reason::NotAccepted.as_str(), "not_accepted");
    }
}
