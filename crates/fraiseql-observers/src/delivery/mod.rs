//! Delivery bookkeeping: lanes per entity, the retry schedule, the durable retry queue and the
//! dead letter queue. The executor decides; these modules keep order and keep state durable.

pub mod dead_letter;
pub mod lanes;
pub mod retry_queue;
pub mod schedule;

use crate::event::EntityEvent;

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
    /// `actions::delivery_id(event.id, observer, action_index)`.
    pub delivery_id: &'a str,
}

/// The key that orders deliveries: one entity of one type.
pub fn entity_key(event: &EntityEvent) -> String {
    format!("{}/{}", event.entity_type, event.entity_id)
}
