//! Lanes and the low watermark.
//!
//! Events are fed in stream order into lanes keyed by entity: one entity's events always go to
//! the same lane and run there one after another, while different lanes run concurrently. The
//! [`Watermark`] tracks which events are done; the checkpoint may only move to the position
//! below which every event is done.

use crate::event::{EntityEvent, Position};
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

/// Positions handed to lanes and whether each is done.
#[derive(Debug, Default)]
pub struct Watermark {
    pending: Mutex<BTreeMap<Position, bool>>,
}

impl Watermark {
    /// An event was handed out for processing.
    pub fn dispatched(&self, position: Position) {
        self.lock().insert(position, false);
    }

    /// A position with nothing to do (the end of a chunk, whose last row may have been
    /// quarantined): done as soon as everything before it is.
    pub fn passed(&self, position: Position) {
        self.lock().entry(position).or_insert(true);
    }

    /// The event at `position` is done.
    pub fn completed(&self, position: Position) {
        if let Some(done) = self.lock().get_mut(&position) {
            *done = true;
        }
    }

    /// The highest position at or below which everything is done, if it moved since last asked.
    pub fn advance(&self) -> Option<Position> {
        let mut pending = self.lock();
        let mut last = None;
        while let Some(entry) = pending.first_entry() {
            if !*entry.get() {
                break;
            }
            last = Some(*entry.key());
            entry.remove();
        }
        last
    }

    /// Events dispatched and not yet done.
    pub fn in_flight(&self) -> usize {
        self.lock().values().filter(|done| !**done).count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Position, bool>> {
        self.pending.lock().expect("watermark lock poisoned")
    }
}

/// The lane of an event among `lanes`: a hash of its entity type and id.
pub fn lane_of(event: &EntityEvent, lanes: usize) -> usize {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    event.entity_type.hash(&mut hasher);
    event.entity_id.hash(&mut hasher);
    (hasher.finish() % lanes.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(batch: u64, sequence: i64) -> Position {
        Position { batch, sequence }
    }

    #[test]
    fn the_watermark_waits_for_the_oldest_unfinished_event() {
        let w = Watermark::default();
        w.dispatched(p(1, 10));
        w.dispatched(p(1, 11));
        w.dispatched(p(2, 3));
        w.passed(p(2, 5));
        w.completed(p(1, 11));
        assert_eq!(w.advance(), None, "10 is still running");
        w.completed(p(1, 10));
        assert_eq!(w.advance(), Some(p(1, 11)));
        assert_eq!(w.in_flight(), 1);
        w.completed(p(2, 3));
        assert_eq!(w.advance(), Some(p(2, 5)), "the chunk end passes with it");
        assert_eq!(w.advance(), None);
    }

    #[test]
    fn a_chunk_end_that_is_an_event_waits_for_that_event() {
        let w = Watermark::default();
        w.dispatched(p(1, 7));
        w.passed(p(1, 7));
        assert_eq!(w.advance(), None);
        w.completed(p(1, 7));
        assert_eq!(w.advance(), Some(p(1, 7)));
    }
}
