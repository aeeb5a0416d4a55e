//! The retry worker's step: attempt the due heads of the durable retry queue, and record each
//! outcome through the same failure policy as a first delivery (`Stage::Queued`: never waiting
//! in place).
//!
//! Invariants: only heads run (for an ordered observer, no earlier item of the same (observer,
//! entity) is queued); a claim is a lease, so a dead leader's items are taken over; an item
//! leaves the queue only by success, dead letter or drop, and then releases its entity; an item
//! is sent only if its observer, as configured now, still accepts its event
//! ([`policy::still_accepted`]: enabled, tenant scope, entity, event type, condition, the action
//! itself), else it is given up as `not_accepted`.

use super::executor::ObserverExecutor;
use crate::actions::DeliveryRequest;
use crate::delivery::log::Started;
use crate::delivery::policy::{self, Decision, Reason, Stage};
use crate::delivery::{bounded_attempt, retry_queue, RETRY_LEASE};
use crate::error::Result;
use crate::metrics as m;

impl ObserverExecutor {
    /// Attempt the due heads of the retry queue once. Returns how many items were attempted.
    pub async fn run_due_retries(&self, limit: usize) -> Result<usize> {
        let items = self
            .durably(|c| async move {
                retry_queue::claim_due(&c, &self.consumer, self.epoch, limit as i64, RETRY_LEASE)
                    .await
            })
            .await?;
        let n = items.len();
        let results =
            futures::future::join_all(items.into_iter().map(|item| self.retry_item(item))).await;
        for r in results {
            r?;
        }
        Ok(n)
    }

    async fn retry_item(&self, item: retry_queue::QueuedItem) -> Result<()> {
        let id = item.id;
        let accepted = policy::still_accepted(
            self.matcher(),
            &self.observers,
            &item.observer,
            item.action_index,
            &item.event,
        );
        let i = match accepted {
            Ok(i) => i,
            Err(why) => return self.refuse(item, &why).await,
        };
        let observer = &self.observers[i];
        let action = &observer.actions[item.action_index];
        let endpoint = &self.endpoints[i][item.action_index];
        let pass = match endpoint.admit().await {
            Ok(pass) => pass,
            Err((wait, why)) => {
                // Not attempted: later, with its attempts unchanged.
                self.meters[i].actions[item.action_index]
                    .throttled
                    .increment(1);
                let error = format!("endpoint {}: {}", endpoint.name(), why.describe());
                let error = &error;
                return self
                    .durably(|c| async move {
                        retry_queue::reschedule(
                            &c,
                            &self.consumer,
                            self.epoch,
                            id,
                            item.attempts,
                            wait,
                            error,
                        )
                        .await
                    })
                    .await;
            }
        };
        let attempt = item.attempts + 1;
        let request = DeliveryRequest {
            event: &item.event,
            delivery_id: &item.delivery_id,
            attempt,
        };
        let started = Started::now();
        let result = bounded_attempt(action.execute(&request)).await;
        endpoint.record(result.as_ref().is_err_and(|e| e.is_retryable()));
        drop(pass);
        let a = item.action_index;
        self.log_attempt(
            i,
            a,
            &item.event,
            &item.delivery_id,
            attempt,
            started,
            result.as_ref().err(),
        )
        .await;
        let (decision, error) = match result {
            Ok(()) => {
                self.delivered(i, item.action_index, &item.event);
                self.durably(|c| async move {
                    retry_queue::remove(&c, &self.consumer, self.epoch, id).await
                })
                .await?;
                (None, None)
            }
            Err(e) => {
                let decision = policy::after_failure(
                    &e,
                    attempt,
                    &observer.retry,
                    observer.on_failure,
                    Stage::Queued,
                    rand::random(),
                );
                (Some(decision), Some(e))
            }
        };
        let message = error.as_ref().map_or("", |e| e.message());
        let finished = match decision {
            None => true,
            Some(Decision::RetryNow(delay) | Decision::Queue(delay)) => {
                self.meters[i].actions[item.action_index]
                    .retried
                    .increment(1);
                self.durably(|c| async move {
                    retry_queue::reschedule(
                        &c,
                        &self.consumer,
                        self.epoch,
                        id,
                        attempt,
                        delay,
                        message,
                    )
                    .await
                })
                .await?;
                false
            }
            Some(decision @ (Decision::DeadLetter(reason) | Decision::Drop(reason))) => {
                let dropped = matches!(decision, Decision::Drop(_));
                self.durably(|c| async move {
                    if dropped {
                        retry_queue::remove(&c, &self.consumer, self.epoch, id).await
                    } else {
                        retry_queue::dead_letter(
                            &c,
                            &self.consumer,
                            self.epoch,
                            id,
                            attempt,
                            reason,
                            message,
                        )
                        .await
                    }
                })
                .await?;
                let a = item.action_index;
                self.given_up(i, a, &item.event, attempt, reason, message, dropped);
                true
            }
        };
        if finished && item.ordered {
            self.parking.release(i, &item.entity_key);
        }
        Ok(())
    }

    /// A queued item whose observer no longer accepts its event (`why`): not sent, given up as
    /// [`Reason::NotAccepted`] (dead-lettered, or dropped under `on_failure = "log"`), and its
    /// entity released.
    async fn refuse(&self, item: retry_queue::QueuedItem, why: &str) -> Result<()> {
        let id = item.id;
        let i = self.observers.iter().position(|o| o.name == item.observer);
        let on_failure = i.map(|i| self.observers[i].on_failure).unwrap_or_default();
        let decision = policy::give_up(Reason::NotAccepted, on_failure);
        let dropped = matches!(decision, Decision::Drop(_));
        self.durably(|c| async move {
            if dropped {
                retry_queue::remove(&c, &self.consumer, self.epoch, id).await
            } else {
                retry_queue::dead_letter(
                    &c,
                    &self.consumer,
                    self.epoch,
                    id,
                    item.attempts,
                    Reason::NotAccepted,
                    why,
                )
                .await
            }
        })
        .await?;
        let a = item.action_index;
        match i {
            Some(i) if a < self.observers[i].actions.len() => self.given_up(
                i,
                a,
                &item.event,
                item.attempts,
                Reason::NotAccepted,
                why,
                dropped,
            ),
            _ => {
                metrics::counter!(m::DEAD_LETTERED).increment(1);
                tracing::warn!(observer = %item.observer, action = a, sequence = item.event.sequence,
                    event_id = %item.event.id, attempts = item.attempts,
                    reason = Reason::NotAccepted.as_str(), error = why, "delivery dead-lettered");
            }
        }
        if let Some(i) = i.filter(|_| item.ordered) {
            self.parking.release(i, &item.entity_key);
        }
        Ok(())
    }
}
