//! `EventMatcher`: which observers an event concerns. Pure.
//!
//! An index by (entity type, event kind) plus the wildcard observers of each kind narrows the
//! candidates; then each candidate's tenant scope and condition decide. Candidates come out in
//! configuration order, so the same event always matches in the same order.

use crate::config::Observer;
use crate::event::{EntityEvent, EventKind};
use std::collections::HashMap;

/// Why an observer did or did not fire for an event (for logs, metrics and `explain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Matched,
    Paused,
    OtherTenant,
    ConditionFalse,
    /// The condition could not be evaluated (e.g. `field_changed` on an update without a
    /// before-image): recorded as a failure of this observer for this event, never a silent no.
    ConditionError(String),
}

pub struct EventMatcher {
    by_entity: HashMap<(String, EventKind), Vec<usize>>,
    wildcard: HashMap<EventKind, Vec<usize>>,
}

impl EventMatcher {
    pub fn new(observers: &[Observer]) -> EventMatcher {
        let mut by_entity: HashMap<(String, EventKind), Vec<usize>> = HashMap::new();
        let mut wildcard: HashMap<EventKind, Vec<usize>> = HashMap::new();
        for (i, o) in observers.iter().enumerate() {
            for kind in &o.event_types {
                match &o.entity {
                    Some(entity) => by_entity
                        .entry((entity.clone(), *kind))
                        .or_default()
                        .push(i),
                    None => wildcard.entry(*kind).or_default().push(i),
                }
            }
        }
        EventMatcher {
            by_entity,
            wildcard,
        }
    }

    /// Observers whose entity and event type fit, in configuration order.
    pub fn candidates(&self, event: &EntityEvent) -> Vec<usize> {
        let specific = self
            .by_entity
            .get(&(event.entity_type.clone(), event.kind))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let any = self
            .wildcard
            .get(&event.kind)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if any.is_empty() {
            return specific.to_vec();
        }
        let mut all: Vec<usize> = specific.iter().chain(any).copied().collect();
        all.sort_unstable();
        all
    }

    /// Every candidate with its verdict, in configuration order.
    pub fn evaluate(&self, observers: &[Observer], event: &EntityEvent) -> Vec<(usize, Verdict)> {
        self.candidates(event)
            .into_iter()
            .map(|i| (i, verdict(&observers[i], event)))
            .collect()
    }
}

/// Whether `observer` fires for `event` (entity and kind already fit).
pub fn verdict(observer: &Observer, event: &EntityEvent) -> Verdict {
    if !observer.enabled {
        return Verdict::Paused;
    }
    if let Some(tenant) = observer.tenant {
        if event.tenant != Some(tenant) {
            return Verdict::OtherTenant;
        }
    }
    match &observer.condition {
        None => Verdict::Matched,
        Some(c) => match c.evaluate(event) {
            Ok(true) => Verdict::Matched,
            Ok(false) => Verdict::ConditionFalse,
            Err(e) => Verdict::ConditionError(e.to_string()),
        },
    }
}
