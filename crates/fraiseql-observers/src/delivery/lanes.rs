//! Lanes and the low watermark.
//!
//! Events are fed in stream order into lanes keyed by entity: one entity's events always go to
//! the same lane and run there one after another, while different lanes run concurrently. The
//! [`Watermark`] tracks which events are done; the checkpoint may only move to the position
//! below which every event is done.

use crate::event::{EntityEvent, Position};
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

    /// Positions held: dispatched (done or not) and passed, until the watermark moves past them.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
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

/// Changes of one entity for one coalescing observer, held for its window: delivered once, with
/// the latest of them.
#[derive(Debug)]
pub struct Group {
    pub observer: usize,
    /// The latest change: the state to deliver.
    pub event: EntityEvent,
    /// Every change the group stands for; they are done when the group is delivered.
    pub held: Vec<Position>,
    pub deadline: Instant,
}

/// One lane's coalescing state. Pure: the lane passes the clock in.
///
/// Invariants: an event joins at most one group per observer; a group is flushed at its deadline
/// (or when the lane closes) and a later change of the same entity starts a new group, so one
/// observer's deliveries of one entity stay in order and the last change is always delivered.
#[derive(Debug)]
pub struct Coalescer {
    groups: HashMap<(usize, String), Group>,
    /// Groups an event still waits for.
    pending: HashMap<Position, u32>,
    /// Deadlines fall on multiples of the window counted from here, so groups started close
    /// together are due together and can share one request.
    epoch: Instant,
}

impl Coalescer {
    pub fn new(epoch: Instant) -> Coalescer {
        Coalescer {
            groups: HashMap::new(),
            pending: HashMap::new(),
            epoch,
        }
    }

    /// The first multiple of `window` (from the epoch) at or after `now + window`.
    fn deadline(&self, now: Instant, window: Duration) -> Instant {
        let window_ns = window.as_nanos().max(1);
        let since = (now + window)
            .saturating_duration_since(self.epoch)
            .as_nanos();
        let aligned = since.div_ceil(window_ns) * window_ns;
        self.epoch + Duration::from_nanos(aligned.min(u64::MAX as u128) as u64)
    }

    /// Hold `event` for each `(observer, window)`; `key` is the event's entity key.
    pub fn hold(
        &mut self,
        event: &EntityEvent,
        key: &str,
        observers: &[(usize, Duration)],
        now: Instant,
    ) {
        if observers.is_empty() {
            return;
        }
        *self.pending.entry(event.position).or_default() += observers.len() as u32;
        for (observer, window) in observers {
            let deadline = self.deadline(now, *window);
            let group = self
                .groups
                .entry((*observer, key.to_string()))
                .or_insert_with(|| Group {
                    observer: *observer,
                    event: event.clone(),
                    held: Vec::new(),
                    deadline,
                });
            group.event = event.clone();
            group.held.push(event.position);
        }
    }

    /// When the next group is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.groups.values().map(|g| g.deadline).min()
    }

    /// The groups due at `now` (all of them when `now` is `None`), oldest deadline first.
    pub fn take_due(&mut self, now: Option<Instant>) -> Vec<Group> {
        let due: Vec<(usize, String)> = self
            .groups
            .iter()
            .filter(|(_, g)| now.is_none_or(|now| g.deadline <= now))
            .map(|(k, _)| k.clone())
            .collect();
        let mut groups: Vec<Group> = due.iter().filter_map(|k| self.groups.remove(k)).collect();
        groups.sort_by_key(|g| g.deadline);
        groups
    }

    /// A group was delivered: the positions that no longer wait for anything.
    pub fn release(&mut self, held: &[Position]) -> Vec<Position> {
        let mut done = Vec::new();
        for position in held {
            if let Some(n) = self.pending.get_mut(position) {
                *n -= 1;
                if *n == 0 {
                    self.pending.remove(position);
                    done.push(*position);
                }
            }
        }
        done
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }
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

#[cfg(test)]
mod coalescer_tests {
    use super::*;
    use crate::event::EventKind;

    fn event(sequence: i64, entity: u128) -> EntityEvent {
        EntityEvent {
            id: uuid::Uuid::from_u128(sequence as u128),
            sequence,
            kind: EventKind::Updated,
            entity_type: "Order".into(),
            entity_id: uuid::Uuid::from_u128(entity),
            tenant: None,
            author: None,
            before: None,
            after: Some(serde_json::json!({"n": sequence}).into()),
            change_status: "updated".into(),
            extra_metadata: serde_json::json!({}),
            source: None,
            created_at: chrono::Utc::now(),
            source_ts: None,
            position: Position { batch: 1, sequence },
        }
    }

    #[test]
    fn changes_in_a_window_become_one_delivery_of_the_latest() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(t0);
        let w = Duration::from_millis(100);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        for seq in 1..=3 {
            c.hold(&event(seq, 7), "Order/7", &[(0, w)], at(seq as u64));
        }
        c.hold(&event(4, 8), "Order/8", &[(0, w)], at(150));
        // Deadlines fall on multiples of the window: entity 7 at 200 ms, entity 8 at 300 ms.
        assert_eq!(c.next_deadline(), Some(at(200)));
        assert!(c.take_due(Some(at(199))).is_empty());
        let due = c.take_due(Some(at(200)));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].event.sequence, 3, "the latest state");
        let done = c.release(&due[0].held);
        assert_eq!(
            done.iter().map(|p| p.sequence).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        // A later change of entity 7 starts a new group.
        c.hold(&event(5, 7), "Order/7", &[(0, w)], at(220));
        let all = c.take_due(None);
        assert_eq!(
            all.iter().map(|g| g.event.sequence).collect::<Vec<_>>(),
            [4, 5]
        );
        assert!(c.is_empty());
    }

    #[test]
    fn groups_started_close_together_are_due_together() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(t0);
        let w = Duration::from_millis(100);
        c.hold(
            &event(1, 7),
            "Order/7",
            &[(0, w)],
            t0 + Duration::from_millis(101),
        );
        c.hold(
            &event(2, 8),
            "Order/8",
            &[(0, w)],
            t0 + Duration::from_millis(180),
        );
        assert_eq!(c.take_due(Some(t0 + Duration::from_millis(300))).len(), 2);
    }

    #[test]
    fn an_event_held_by_two_observers_is_done_after_both() {
        let now = Instant::now();
        let mut c = Coalescer::new(now);
        let w = Duration::from_millis(10);
        c.hold(&event(1, 7), "Order/7", &[(0, w), (1, w)], now);
        let groups = c.take_due(None);
        assert!(c.release(&groups[0].held).is_empty());
        assert_eq!(c.release(&groups[1].held).len(), 1);
    }
}
