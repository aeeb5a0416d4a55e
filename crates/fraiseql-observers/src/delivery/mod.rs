//! Delivery: what one delivery is (its id, its entity key), the failure policy and retry
//! schedule (pure), the watermark, lanes and coalescing (pure), parking behind failures, and the
//! durable retry queue and dead letter queue. The pipeline runs deliveries; these modules decide
//! what follows a failure, keep order and keep state durable.

pub mod dead_letter;
pub mod flow;
pub mod lanes;
pub mod parking;
pub mod policy;
pub mod retry_queue;
pub mod schedule;
pub mod stored;

use crate::event::EntityEvent;
use std::time::Duration;
use uuid::Uuid;

/// How long a claimed retry (or an operator's dead-letter retry) is reserved for the process
/// that claimed it.
pub const RETRY_LEASE: Duration = Duration::from_secs(300);

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
