//! Delivery: what one delivery is (its id, its entity key), the failure policy and retry
//! schedule (pure), the watermark, lanes and coalescing (pure), parking behind failures, and the
//! durable retry queue and dead letter queue, and the log of every attempt. The pipeline runs deliveries; these modules decide
//! what follows a failure, keep order and keep state durable.

pub mod dead_letter;
pub mod flow;
pub mod lanes;
pub mod log;
pub mod parking;
pub mod policy;
pub mod retry_queue;
pub mod schedule;
pub mod stored;

use crate::actions::ActionError;
use crate::event::EntityEvent;
use std::time::Duration;
use uuid::Uuid;

/// The longest one attempt made under a lease (a queued retry, an operator's dead-letter retry)
/// may take: it is abandoned after that ([`bounded_attempt`]) and counts as a retryable failure.
/// Above any attempt a valid configuration allows: action timeouts are at most 5 minutes
/// (`timeout_ms`, checked when the configuration loads), and a cache action may spend that on
/// connecting and again on its command.
pub const ATTEMPT_BOUND: Duration = Duration::from_secs(11 * 60);

/// How long a claimed retry (or an operator's dead-letter retry) is reserved for the process
/// that claimed it: longer than any attempt ([`ATTEMPT_BOUND`]), so a live attempt never loses
/// its claim to a second one.
pub const RETRY_LEASE: Duration = Duration::from_secs(15 * 60);

/// Run one attempt made under a lease, abandoning it after [`ATTEMPT_BOUND`] (a retryable
/// failure), so it ends before its lease does.
pub async fn bounded_attempt(
    attempt: impl std::future::Future<Output = Result<(), ActionError>>,
) -> Result<(), ActionError> {
    attempt_within(ATTEMPT_BOUND, attempt).await
}

async fn attempt_within(
    bound: Duration,
    attempt: impl std::future::Future<Output = Result<(), ActionError>>,
) -> Result<(), ActionError> {
    tokio::time::timeout(bound, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(ActionError::transient(format!(
                "the attempt did not end within {} ms",
                bound.as_millis()
            )))
        })
}

/// One delivery: one event through one action of one observer.
#[derive(Debug, Clone, Copy)]
pub struct DeliveryItem<'a> {
    pub observer: &'a str,
    pub action_index: usize,
    pub action_type: &'a str,
    /// [`entity_key`] of the event.
    pub entity_key: &'a str,
    pub ordered: bool,
    pub event: &'a EntityEvent,
    /// [`delivery_id`]`(event.id, observer, action_index)`.
    pub delivery_id: &'a str,
}

/// The key that orders deliveries: one entity of one type.
pub fn entity_key(event: &EntityEvent) -> String {
    format!("{}/{}", event.entity_type, event.entity_id)
}

/// Namespace of the UUID v5 delivery ids (fixed forever: changing it changes every id).
const DELIVERY_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_2a4e_8b3d_5c7a_9e0f_1a2b_3c4d_5e6f);

/// The id of delivering event `event_id` through action `action_index` of observer `observer`:
/// `msg_` and a UUID v5 of the three, in hex. Deterministic: the same on every retry, crash
/// replay and restart, so receivers can deduplicate on it (`webhook-id`, `idempotency-key`).
pub fn delivery_id(event_id: Uuid, observer: &str, action_index: usize) -> String {
    let name = format!("{event_id}\u{1f}{observer}\u{1f}{action_index}");
    format!(
        "msg_{}",
        Uuid::new_v5(&DELIVERY_NAMESPACE, name.as_bytes()).simple()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_outlasts_any_attempt() {
        // The longest a valid configuration allows: a cache action's connect and command
        // timeouts, 5 minutes each.
        let longest_configured = Duration::from_secs(2 * 300);
        assert!(ATTEMPT_BOUND > longest_configured);
        assert!(RETRY_LEASE > ATTEMPT_BOUND + Duration::from_secs(60));
    }

    #[tokio::test]
    async fn an_attempt_past_its_bound_is_abandoned_as_a_retryable_failure() {
        let bound = Duration::from_millis(20);
        let e = attempt_within(bound, std::future::pending())
            .await
            .unwrap_err();
        assert!(e.is_retryable(), "{e:?}");
        assert!(e.message().contains("did not end within 20 ms"), "{e:?}");
        assert!(attempt_within(bound, async { Ok(()) }).await.is_ok());
        let permanent = attempt_within(bound, async { Err(ActionError::permanent("HTTP 400")) });
        assert!(!permanent.await.unwrap_err().is_retryable());
    }

    #[test]
    fn delivery_id_is_deterministic_and_distinct() {
        let e = Uuid::from_u128(7);
        let a = delivery_id(e, "order_paid", 0);
        assert_eq!(a, delivery_id(e, "order_paid", 0));
        assert!(a.starts_with("msg_") && a.len() == 36, "{a}");
        assert_ne!(a, delivery_id(e, "order_paid", 1));
        assert_ne!(a, delivery_id(e, "order_shipped", 0));
        assert_ne!(a, delivery_id(Uuid::from_u128(8), "order_paid", 0));
        // The separator keeps ("a1", 0) and ("a", 10) apart.
        assert_ne!(delivery_id(e, "a1", 0), delivery_id(e, "a", 10));
    }
}
