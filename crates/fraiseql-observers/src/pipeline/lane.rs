//! Lanes: the dispatcher hands each event to the lane of its entity; a lane routes its events
//! one after another ([`ObserverExecutor::route`]: match, conditions) and hands each firing
//! observer's deliveries to that (observer, entity)'s chain (`chains.rs`), so a lane never
//! waits for a receiver. It holds the coalescing observers' changes until their window ends.
//!
//! Invariants:
//! * One entity's events are routed in one lane, in stream order (which for one entity is
//!   commit order), so each (observer, entity) chain receives them in that order.
//! * An event is marked done in the watermark only when every delivery it caused is done or
//!   handed over durably; a coalesced change when its group is delivered. Nothing held is lost
//!   when a lane closes: it delivers what it holds first.
//! * An event that no observer can match passes the watermark without entering a lane.

use super::chains::{Chains, Done, Job};
use super::executor::ObserverExecutor;
use crate::actions::DeliveryRequest;
use crate::delivery::delivery_id;
use crate::delivery::entity_key;
use crate::delivery::lanes::{lane_of, Coalescer, Group, Watermark};
use crate::delivery::log::Started;
use crate::error::Result;
use crate::event::{EntityEvent, Position};
use crate::listener::Batch;
use crate::metrics as m;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// What the dispatcher hands a lane: an event, and its place among the events in flight.
pub(super) type Dispatched = (EntityEvent, OwnedSemaphorePermit);

/// Hand a batch to the lanes, waiting for a permit per event (at most that many events in
/// flight: backpressure on the reader).
pub(super) async fn dispatch(
    executor: &ObserverExecutor,
    batch: Batch,
    lanes: &[mpsc::Sender<Dispatched>],
    outstanding: &Arc<Semaphore>,
    held_limit: usize,
    watermark: &Watermark,
) {
    let n = batch.events.len() as u64;
    executor.status.events_read.fetch_add(n, Ordering::Relaxed);
    metrics::counter!(m::EVENTS_READ).increment(n);
    for event in batch.events {
        // Everything after an event still in flight stays in the watermark until it is done:
        // bounded too, so one stuck delivery backpressures the reader instead of growing it.
        while watermark.len() >= held_limit {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if executor.matcher().candidates(&event).is_empty() {
            watermark.passed(event.position);
            continue;
        }
        let Ok(permit) = outstanding.clone().acquire_owned().await else {
            return; // closed: shutting down
        };
        watermark.dispatched(event.position);
        let lane = &lanes[lane_of(&event, lanes.len())];
        if lane.send((event, permit)).await.is_err() {
            return; // shutting down: the event is not done and will be read again
        }
    }
    watermark.passed(batch.end);
}

/// One lane: its events one after another, routed (matched) and handed to the delivery chains
/// of their observers; coalescing observers' changes held in groups and delivered at the end of
/// their window (or when the lane closes: nothing held is lost).
pub(super) async fn run(
    executor: &ObserverExecutor,
    chains: &Arc<Chains>,
    rx: &mut mpsc::Receiver<Dispatched>,
    watermark: &Arc<Watermark>,
) -> Result<()> {
    let mut coalescer = Coalescer::new(Instant::now());
    let mut held: HashMap<Position, Arc<Done>> = HashMap::new();
    loop {
        let deadline = coalescer.next_deadline();
        let next = tokio::select! {
            event = rx.recv() => event,
            _ = sleep_until(deadline), if deadline.is_some() => {
                flush(executor, &mut coalescer, &mut held, Some(Instant::now())).await?;
                continue;
            }
        };
        let Some((event, permit)) = next else {
            return flush(executor, &mut coalescer, &mut held, None).await;
        };
        let routed = executor.route(&event).await?;
        let parts = routed.fired.len() + usize::from(!routed.held.is_empty());
        let done = Done::new(event.position, parts, watermark.clone(), permit);
        let key = entity_key(&event);
        if !routed.held.is_empty() {
            coalescer.hold(&event, &key, &routed.held, Instant::now());
            held.insert(event.position, done.clone());
        }
        if !routed.fired.is_empty() {
            let event = Arc::new(event);
            for observer in routed.fired {
                let job = Job {
                    observer,
                    event: event.clone(),
                    done: done.clone(),
                };
                chains.submit(key.clone(), job);
            }
        }
    }
}

/// Deliver the coalesced groups that are due (all of them with `now = None`).
async fn flush(
    executor: &ObserverExecutor,
    coalescer: &mut Coalescer,
    held: &mut HashMap<Position, Arc<Done>>,
    now: Option<Instant>,
) -> Result<()> {
    let groups = coalescer.take_due(now);
    let publishing = executor.is_publishing();
    let delivered = if publishing {
        HashSet::new()
    } else {
        deliver_batches(executor, &groups).await
    };
    for (g, group) in groups.iter().enumerate() {
        if publishing {
            // A distributed reader: the group's latest change goes to the work stream.
            executor
                .deliver_observer(group.observer, &group.event)
                .await?;
        }
        for a in 0..executor.observers()[group.observer].actions.len() {
            if !publishing && !delivered.contains(&(g, a)) {
                executor.deliver(group.observer, a, &group.event).await?;
            }
        }
        for position in coalescer.release(&group.held) {
            if let Some(done) = held.remove(&position) {
                done.part_done();
            }
        }
    }
    Ok(())
}

/// Actions that take several events in one request (`Action::execute_batch`: search) take
/// every due group of their observer at once: the groups are distinct entities, so no entity's
/// order is at stake. Returns the (group, action) pairs delivered; the others go through
/// `deliver` (retries, parking, dead letters) as usual.
async fn deliver_batches(executor: &ObserverExecutor, groups: &[Group]) -> HashSet<(usize, usize)> {
    let mut delivered = HashSet::new();
    let mut by_observer: HashMap<usize, Vec<usize>> = HashMap::new();
    for (g, group) in groups.iter().enumerate() {
        if !executor.is_parked(group.observer, &entity_key(&group.event))
            && !executor.is_paused(group.observer)
        {
            by_observer.entry(group.observer).or_default().push(g);
        }
    }
    for (i, members) in by_observer {
        if members.len() < 2 {
            continue;
        }
        let observer = &executor.observers()[i];
        for (a, action) in observer.actions.iter().enumerate() {
            let ids: Vec<String> = members
                .iter()
                .map(|g| delivery_id(groups[*g].event.id, &observer.name, a))
                .collect();
            let requests: Vec<DeliveryRequest<'_>> = members
                .iter()
                .zip(&ids)
                .map(|(g, id)| DeliveryRequest {
                    event: &groups[*g].event,
                    delivery_id: id,
                    attempt: 1,
                })
                .collect();
            let started = Started::now();
            let Some(results) = action.execute_batch(&requests).await else {
                continue;
            };
            for ((g, result), id) in members.iter().zip(results).zip(&ids) {
                let event = &groups[*g].event;
                executor
                    .log_attempt(i, a, event, id, 1, started, result.as_ref().err())
                    .await;
                if result.is_ok() {
                    executor.delivered(i, a, &groups[*g].event);
                    delivered.insert((*g, a));
                }
            }
        }
    }
    delivered
}

/// Sleep until `deadline` (forever when there is none).
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
