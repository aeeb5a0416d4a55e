//! What operator commands read and do: where each consumer stands and who leads it, resetting a
//! checkpoint, an event's pending retries and dead letters, and an [`Operator`] handle that
//! explains, replays and retries dead letters with the observers as configured now.
//!
//! The tables are read by their own modules (`listener::checkpoint`, `leader`,
//! `delivery::retry_queue`, `delivery::dead_letter`, `listener::quarantine`, `migrate`); this
//! module gathers what one command needs.
//!
//! Invariants:
//! * Nothing here leads a consumer: no epoch, no retry-queue lease, no checkpoint write while
//!   a daemon runs. A checkpoint is reset only while this session holds the consumer's leader
//!   lock itself.
//! * An operator retry of a dead letter is claimed atomically before it is sent
//!   ([`dead_letter::claim_for_retry`]): two operators retrying one item send it once.
//! * A replay sends with the same delivery ids as the daemon, so receivers can deduplicate.

use crate::actions::{ActionError, DeliveryRequest};
use crate::control;
use crate::db;
use crate::delivery::dead_letter::{self, DlqItem};
use crate::delivery::log::{self, Attempt, Started};
use crate::delivery::policy::{self, Reason};
use crate::delivery::retry_queue::{self, PendingRetry};
use crate::delivery::{bounded_attempt, RETRY_LEASE};
use crate::delivery::{delivery_id, entity_key, DeliveryItem};
use crate::distributed;
use crate::error::{Error, Result};
use crate::event::EntityEvent;
use crate::leader;
use crate::listener::checkpoint::{self, Checkpoint, ConsumerCheckpoint};
use crate::listener::StartPosition;
use crate::matcher::{EventMatcher, Verdict};
use crate::observer::Observer;
use std::collections::HashMap;
use tokio_postgres::Client;
use uuid::Uuid;

/// A consumer's checkpoint and the backend leading it now, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerStatus {
    pub checkpoint: ConsumerCheckpoint,
    /// The backend pid holding the consumer's leader lock (a running daemon).
    pub leader: Option<i32>,
}

/// The checkpoint of `consumer` (every consumer when `None`) with its current leader.
pub async fn consumers(client: &Client, consumer: Option<&str>) -> Result<Vec<ConsumerStatus>> {
    let mut all = Vec::new();
    for checkpoint in checkpoint::list(client, consumer).await? {
        let leader = leader::holder(client, &checkpoint.consumer).await?;
        all.push(ConsumerStatus { checkpoint, leader });
    }
    Ok(all)
}

/// What [`reset_checkpoint`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reset {
    /// The checkpoint was replaced (`existed`) or created; it is now `checkpoint`.
    Done {
        existed: bool,
        checkpoint: Checkpoint,
    },
    /// A daemon leads the consumer (its backend pid, when it could be seen): nothing changed.
    Leading { pid: Option<i32> },
}

/// Forget where `consumer` stands and start again from `start`, only while no daemon leads it:
/// the consumer's leader lock is held on `client`'s session for the reset.
pub async fn reset_checkpoint(
    client: &Client,
    consumer: &str,
    start: StartPosition,
) -> Result<Reset> {
    if !leader::try_lock(client, consumer).await? {
        let pid = leader::holder(client, consumer).await?;
        return Ok(Reset::Leading { pid });
    }
    let existed = checkpoint::reset(client, consumer, start).await;
    leader::unlock(client, consumer).await?;
    let existed = existed?;
    let (checkpoint, _) = checkpoint::load(client, consumer).await?.ok_or_else(|| {
        Error::Invalid(format!(
            "the checkpoint of '{consumer}' vanished after the reset"
        ))
    })?;
    Ok(Reset::Done {
        existed,
        checkpoint,
    })
}

/// An event's deliveries that are not done: queued for a retry, or dead-lettered.
#[derive(Debug, Clone)]
pub struct EventDeliveries {
    pub retries: Vec<PendingRetry>,
    pub dead_letters: Vec<DlqItem>,
}

/// The pending retries and dead letters of event `event_id` (every consumer).
pub async fn deliveries_of(client: &Client, event_id: Uuid) -> Result<EventDeliveries> {
    Ok(EventDeliveries {
        retries: retry_queue::for_event(client, event_id).await?,
        dead_letters: dead_letter::for_event(client, event_id).await?,
    })
}

/// The observers as configured now, for explaining, replaying and retrying dead letters. Needs
/// no epoch: it never leads a consumer (see the module's invariants).
pub struct Operator {
    /// The consumer whose dead letters this operator retries (the configuration's
    /// `consumer_id`): another consumer's observers may share a name with ours.
    consumer: String,
    observers: Vec<Observer>,
    matcher: EventMatcher,
    client: Client,
}

impl Operator {
    /// Connect to `database_url` (named `fraiseql-observers-operator` in `pg_stat_activity`) for
    /// the observers of `consumer`.
    pub async fn new(
        database_url: &str,
        consumer: &str,
        observers: Vec<Observer>,
    ) -> Result<Operator> {
        let client =
            db::connect(&db::parse_url(database_url)?, "fraiseql-observers-operator").await?;
        Ok(Operator {
            consumer: consumer.to_string(),
            matcher: EventMatcher::new(&observers),
            observers,
            client,
        })
    }

    /// The consumer whose dead letters [`Operator::retry_dead_letter`] retries.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    pub fn observers(&self) -> &[Observer] {
        &self.observers
    }

    /// The operator's connection, for the read functions (`listener::range`, `dead_letter`, ...).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Why each observer does or does not fire for `event` (every observer, configuration
    /// order): `None` when its entity or event type does not fit.
    pub fn explain(&self, event: &EntityEvent) -> Vec<(&str, Option<Verdict>)> {
        let verdicts: HashMap<usize, Verdict> = self
            .matcher
            .evaluate(&self.observers, event)
            .into_iter()
            .collect();
        self.observers
            .iter()
            .enumerate()
            .map(|(i, o)| (o.name.as_str(), verdicts.get(&i).cloned()))
            .collect()
    }

    /// Whether an operator paused observer `name` of this consumer (`control::pause`).
    pub async fn is_paused(&self, name: &str) -> Result<bool> {
        Ok(control::paused(&self.client, &self.consumer)
            .await?
            .contains(name))
    }

    /// An error when observer `name` is paused: an operator's send would break the promise that
    /// a paused observer sends nothing.
    async fn refuse_if_paused(&self, name: &str) -> Result<()> {
        if self.is_paused(name).await? {
            return Err(Error::Invalid(format!(
                "observer '{name}' of consumer '{}' is paused: nothing sent (resume it first: \
                 `fraiseql-observers resume --observer {name}`)",
                self.consumer
            )));
        }
        Ok(())
    }

    /// Send `event` again through every action of observer `name`, once each, when it matches
    /// (same delivery ids as the daemon; failures are returned, not queued). `Ok(None)` when the
    /// observer does not fire for this event. An error, with nothing sent, when the observer is
    /// paused.
    pub async fn replay(
        &self,
        name: &str,
        event: &EntityEvent,
    ) -> Result<Option<Vec<std::result::Result<(), ActionError>>>> {
        self.refuse_if_paused(name).await?;
        let i = self
            .observers
            .iter()
            .position(|o| o.name == name)
            .ok_or_else(|| {
                Error::Invalid(format!("no observer named '{name}' in this configuration"))
            })?;
        let fires = self
            .matcher
            .evaluate(&self.observers, event)
            .into_iter()
            .any(|(j, v)| j == i && v == Verdict::Matched);
        if !fires {
            return Ok(None);
        }
        let observer = &self.observers[i];
        let mut results = Vec::with_capacity(observer.actions.len());
        for (a, action) in observer.actions.iter().enumerate() {
            let delivery_id = delivery_id(event.id, &observer.name, a);
            let request = DeliveryRequest {
                event,
                delivery_id: &delivery_id,
                attempt: 1,
            };
            let started = Started::now();
            let result = action.execute(&request).await;
            self.log(i, a, event, &delivery_id, 1, started, &result)
                .await?;
            results.push(result);
        }
        Ok(Some(results))
    }

    /// Record an operator's attempt in the delivery log, when observer `i` records it.
    #[allow(clippy::too_many_arguments)]
    async fn log(
        &self,
        i: usize,
        a: usize,
        event: &EntityEvent,
        delivery_id: &str,
        attempt: u32,
        started: Started,
        result: &std::result::Result<(), ActionError>,
    ) -> Result<()> {
        let observer = &self.observers[i];
        if !observer.record.wants(result.is_ok()) {
            return Ok(());
        }
        let delivery = DeliveryItem {
            observer: &observer.name,
            action_index: a,
            action_type: observer.actions[a].kind(),
            entity_key: &entity_key(event),
            ordered: observer.ordered,
            event,
            delivery_id,
        };
        let attempt = Attempt::new(delivery, attempt, started, result.as_ref().map(|_| ()));
        log::insert(&self.client, &self.consumer, &[attempt]).await
    }

    /// Retry dead letter `id` of this operator's consumer once: claimed atomically, so two
    /// concurrent retries of one item deliver once. Sent only when the observer, as configured
    /// now, still accepts the event ([`policy::still_accepted`]); otherwise it stays a dead
    /// letter, now with reason `not_accepted`, and the error says why. `Ok(None)` when it is not pending or is
    /// another consumer's (whose observers this configuration does not hold; a distributed
    /// worker's partition `C/p` is `C`'s). An error, with
    /// the item left pending and nothing sent, when its observer is paused.
    pub async fn retry_dead_letter(
        &self,
        id: i64,
    ) -> Result<Option<std::result::Result<(), ActionError>>> {
        let Some(found) = dead_letter::get(&self.client, id).await? else {
            return Ok(None);
        };
        self.refuse_if_paused(&found.observer).await?;
        // A distributed worker's partition p dead-letters as `C/p`: those items are C's too.
        if !distributed::is_consumer_or_partition(&found.consumer_id, &self.consumer) {
            return Ok(None);
        }
        let Some(item) =
            dead_letter::claim_for_retry(&self.client, &found.consumer_id, id, RETRY_LEASE).await?
        else {
            return Ok(None);
        };
        let Some(token) = item.claim_token else {
            return Err(Error::Invalid(format!(
                "dead letter {id}: claimed without a token"
            )));
        };
        let accepted = policy::still_accepted(
            &self.matcher,
            &self.observers,
            &item.observer,
            item.action_index,
            &item.event,
        );
        let i = match accepted {
            Ok(i) => i,
            Err(why) => {
                // Not sent: today's configuration would not deliver it.
                dead_letter::refuse_retry(&self.client, id, token, Reason::NotAccepted, &why)
                    .await?;
                return Ok(Some(Err(ActionError::permanent(format!(
                    "not sent: {why}"
                )))));
            }
        };
        let attempt = item.attempts + 1;
        let request = DeliveryRequest {
            event: &item.event,
            delivery_id: &item.delivery_id,
            attempt,
        };
        let started = Started::now();
        let a = item.action_index;
        let result = bounded_attempt(self.observers[i].actions[a].execute(&request)).await;
        self.log(
            i,
            a,
            &item.event,
            &item.delivery_id,
            attempt,
            started,
            &result,
        )
        .await?;
        let error = result.as_ref().err().map(|e| e.message());
        if !dead_letter::finish_retry(&self.client, id, token, error).await? {
            tracing::warn!(
                dead_letter = id,
                "the retry outlived its claim and another retry holds the item now; this \
                 outcome is not recorded"
            );
        }
        Ok(Some(result))
    }
}
