//! Parking: which (observer, entity) pairs wait behind a failed delivery in the retry queue.
//! For an ordered observer, while such a pair has items queued, its new deliveries are queued
//! behind them (durably) instead of running. In memory, rebuilt from the queue by a new leader.

use std::collections::HashMap;
use std::sync::Mutex;

/// Counts of queued items per (observer index, entity key).
#[derive(Debug, Default)]
pub struct Parking {
    queued: Mutex<HashMap<(usize, String), u32>>,
}

impl Parking {
    /// From the queue's own counts (a new leader), with observers already resolved to indexes.
    pub fn from_counts(counts: impl IntoIterator<Item = ((usize, String), u32)>) -> Parking {
        Parking {
            queued: Mutex::new(counts.into_iter().collect()),
        }
    }

    /// Whether deliveries of `key` through observer `observer` must wait in the queue.
    pub fn is_parked(&self, observer: usize, key: &str) -> bool {
        let queued = self.lock();
        !queued.is_empty() && queued.contains_key(&(observer, key.to_string()))
    }

    /// One more item of the pair is (about to be) in the queue.
    pub fn park(&self, observer: usize, key: &str) {
        *self.lock().entry((observer, key.to_string())).or_default() += 1;
    }

    /// One item of the pair left the queue; the pair runs freely again when none is left.
    pub fn release(&self, observer: usize, key: &str) {
        let mut queued = self.lock();
        let k = (observer, key.to_string());
        if let Some(n) = queued.get_mut(&k) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                queued.remove(&k);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(usize, String), u32>> {
        self.queued.lock().expect("parking lock poisoned")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_is_parked_while_it_has_queued_items() {
        let p = Parking::default();
        assert!(!p.is_parked(0, "Order/1"));
        p.park(0, "Order/1");
        p.park(0, "Order/1");
        assert!(p.is_parked(0, "Order/1"));
        assert!(!p.is_parked(1, "Order/1"), "per observer");
        assert!(!p.is_parked(0, "Order/2"), "per entity");
        p.release(0, "Order/1");
        assert!(p.is_parked(0, "Order/1"));
        p.release(0, "Order/1");
        assert!(!p.is_parked(0, "Order/1"));
        p.release(0, "Order/1"); // never below zero
        assert!(!p.is_parked(0, "Order/1"));
    }

    #[test]
    fn a_new_leader_starts_from_the_queue_counts() {
        let p = Parking::from_counts([((2, "User/7".to_string()), 1)]);
        assert!(p.is_parked(2, "User/7"));
        p.release(2, "User/7");
        assert!(!p.is_parked(2, "User/7"));
    }
}
