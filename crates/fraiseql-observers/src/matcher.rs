//! `EventMatcher`: which observers an event concerns. Pure.
//!
//! An index by (entity type, event kind) plus the wildcard observers of each kind narrows the
//! candidates; then each candidate's tenant scope and condition decide. Candidates come out in
//! configuration order, so the same event always matches in the same order. Snapshot events
//! (`SNAPSHOT`, written by `backfill`) reach only observers that list that event type, and only
//! those named by the backfill when it named any (`source.observers`).

use crate::event::{EntityEvent, EventKind};
use crate::observer::Observer;
use std::collections::HashMap;

/// Why an observer did or did not fire for an event (for logs, metrics and `explain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Matched,
    /// The observer is switched off in the configuration (`enabled = false`).
    Disabled,
    OtherTenant,
    ConditionFalse,
    /// The condition could not be evaluated (e.g. `field_changed` on an update without a
    /// before-image): recorded as a failure of this observer for this event, never a silent no.
    ConditionError(String),
}

pub struct EventMatcher {
    /// entity type -> event kind -> observers (looked up by `&str`: no allocation per event).
    by_entity: HashMap<String, HashMap<EventKind, Vec<usize>>>,
    wildcard: HashMap<EventKind, Vec<usize>>,
    /// Observer names by index: a snapshot event naming its observers (`backfill --observer`)
    /// has only those as candidates.
    names: Vec<String>,
}

impl EventMatcher {
    pub fn new(observers: &[Observer]) -> EventMatcher {
        let mut by_entity: HashMap<String, HashMap<EventKind, Vec<usize>>> = HashMap::new();
        let mut wildcard: HashMap<EventKind, Vec<usize>> = HashMap::new();
        for (i, o) in observers.iter().enumerate() {
            for kind in &o.event_types {
                match &o.entity {
                    Some(entity) => by_entity
                        .entry(entity.clone())
                        .or_default()
                        .entry(*kind)
                        .or_default()
                        .push(i),
                    None => wildcard.entry(*kind).or_default().push(i),
                }
            }
        }
        EventMatcher {
            by_entity,
            wildcard,
            names: observers.iter().map(|o| o.name.clone()).collect(),
        }
    }

    /// Observers whose entity and event type fit, in configuration order. A snapshot event that
    /// names its observers (`source.observers`) has only those.
    pub fn candidates(&self, event: &EntityEvent) -> Vec<usize> {
        let mut all = self.fitting(event);
        if let Some(targets) = event.snapshot_targets() {
            let targets: Vec<&str> = targets.collect();
            all.retain(|&i| targets.contains(&self.names[i].as_str()));
        }
        all
    }

    fn fitting(&self, event: &EntityEvent) -> Vec<usize> {
        let specific = self
            .by_entity
            .get(event.entity_type.as_str())
            .and_then(|kinds| kinds.get(&event.kind))
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
        return Verdict::Disabled;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Position;
    use serde_json::json;
    use uuid::Uuid;

    const TENANT: &str = "aaaaaaaa-0000-0000-0000-000000000001";

    fn observers() -> Vec<Observer> {
        let mut toml = String::new();
        for (name, entity, types, extra) in [
            ("orders", "Order", "[\"INSERT\", \"UPDATE\"]", ""),
            ("every_delete", "*", "\"DELETE\"", ""),
            (
                "shipped",
                "Order",
                "\"UPDATE\"",
                "condition = \"status == 'shipped'\"",
            ),
            (
                "tenant_only",
                "Order",
                "\"INSERT\"",
                &*format!("tenant = \"{TENANT}\""),
            ),
            ("paused", "Order", "\"INSERT\"", "enabled = false"),
            (
                "changed",
                "Order",
                "\"UPDATE\"",
                "condition = \"field_changed('status')\"",
            ),
            ("every_insert", "*", "\"INSERT\"", ""),
        ] {
            toml.push_str(&format!(
                "[observers.{name}]\nentity = \"{entity}\"\nevent_type = {types}\n{extra}\n\
                 [[observers.{name}.actions]]\ntype = \"webhook\"\nurl = \"https://example.com/{name}\"\n\n"
            ));
        }
        crate::config::load(&toml, &|_| None).unwrap().observers
    }

    fn event(
        kind: EventKind,
        tenant: Option<&str>,
        after: serde_json::Value,
        with_before: bool,
    ) -> EntityEvent {
        let before = with_before.then(|| json!({"status": "new"}));
        EntityEvent {
            id: Uuid::nil(),
            sequence: 1,
            kind,
            entity_type: "Order".into(),
            entity_id: Uuid::nil(),
            tenant: tenant.map(|t| t.parse().unwrap()),
            author: None,
            before: before.map(Into::into),
            after: Some(after.into()),
            change_status: "updated".into(),
            extra_metadata: json!({}),
            source: None,
            created_at: chrono::Utc::now(),
            source_ts: None,
            position: Position {
                batch: 1,
                sequence: 1,
            },
        }
    }

    fn names(observers: &[Observer], verdicts: &[(usize, Verdict)]) -> Vec<(String, Verdict)> {
        verdicts
            .iter()
            .map(|(i, v)| (observers[*i].name.clone(), v.clone()))
            .collect()
    }

    #[test]
    fn snapshots_reach_only_observers_asking_and_those_a_backfill_names() {
        let mut toml = String::new();
        for (name, entity, types) in [
            ("sync", "Order", "[\"UPDATE\", \"SNAPSHOT\"]"),
            ("any_snapshot", "*", "\"SNAPSHOT\""),
            ("inserts", "Order", "\"INSERT\""),
        ] {
            toml.push_str(&format!(
                "[observers.{name}]\nentity = \"{entity}\"\nevent_type = {types}\n\
                 [[observers.{name}.actions]]\ntype = \"webhook\"\nurl = \"https://example.com/{name}\"\n\n"
            ));
        }
        let observers = crate::config::load(&toml, &|_| None).unwrap().observers;
        let matcher = EventMatcher::new(&observers);
        let mut snapshot = event(EventKind::Snapshot, None, json!({"status": "new"}), false);
        assert_eq!(matcher.candidates(&snapshot), [0, 1]);
        snapshot.source = Some(json!({"snapshot": "incremental", "observers": ["any_snapshot"]}));
        assert_eq!(matcher.candidates(&snapshot), [1]);
        snapshot.source = Some(json!({"snapshot": "incremental", "observers": ["inserts"]}));
        assert!(matcher.candidates(&snapshot).is_empty());
        // Only snapshots are narrowed by `source.observers`.
        let mut update = event(EventKind::Updated, None, json!({"status": "paid"}), true);
        update.source = Some(json!({"observers": ["any_snapshot"]}));
        assert_eq!(matcher.candidates(&update), [0]);
    }

    #[test]
    fn candidates_follow_entity_kind_and_wildcards_in_configuration_order() {
        let observers = observers();
        let matcher = EventMatcher::new(&observers);
        let insert = event(
            EventKind::Created,
            Some(TENANT),
            json!({"status": "new"}),
            false,
        );
        let verdicts = names(&observers, &matcher.evaluate(&observers, &insert));
        assert_eq!(
            verdicts,
            [
                ("orders".to_string(), Verdict::Matched),
                ("tenant_only".to_string(), Verdict::Matched),
                ("paused".to_string(), Verdict::Disabled),
                ("every_insert".to_string(), Verdict::Matched),
            ]
        );
        let mut delete = insert.clone();
        delete.kind = EventKind::Deleted;
        assert_eq!(matcher.candidates(&delete), [1]);
        let mut other = insert.clone();
        other.entity_type = "User".into();
        assert_eq!(matcher.candidates(&other), [6], "only the wildcard");
    }

    #[test]
    fn tenant_scope_and_conditions_decide_among_candidates() {
        let observers = observers();
        let matcher = EventMatcher::new(&observers);
        let insert = event(EventKind::Created, None, json!({"status": "new"}), false);
        let tenant_only = matcher
            .evaluate(&observers, &insert)
            .into_iter()
            .find(|(i, _)| observers[*i].name == "tenant_only")
            .unwrap();
        assert_eq!(tenant_only.1, Verdict::OtherTenant);

        let update = event(EventKind::Updated, None, json!({"status": "shipped"}), true);
        let verdicts = names(&observers, &matcher.evaluate(&observers, &update));
        assert_eq!(verdicts[1], ("shipped".to_string(), Verdict::Matched));
        assert_eq!(verdicts[2], ("changed".to_string(), Verdict::Matched));

        // No before-image: "did status change" is an error, never a silent false.
        let blind = event(EventKind::Updated, None, json!({"status": "new"}), false);
        let verdicts = names(&observers, &matcher.evaluate(&observers, &blind));
        assert_eq!(
            verdicts[1],
            ("shipped".to_string(), Verdict::ConditionFalse)
        );
        assert!(
            matches!(verdicts[2].1, Verdict::ConditionError(_)),
            "{verdicts:?}"
        );
    }
}
