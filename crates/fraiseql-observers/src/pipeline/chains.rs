//! Delivery chains: the deliveries of one (observer, entity) run one after another, on a task
//! of their own, off the lanes. A lane only matches and hands out, so a slow or hung receiver
//! holds its own chain (and its endpoint's permits), never a lane that other entities need.
//!
//! Invariants:
//! * For one (observer, entity), deliveries start in the order they were submitted (stream
//!   order), each after the previous one is done or handed over durably.
//! * An event is done (watermark) when every part of it is: each chain it was submitted to,
//!   and its coalesced groups.
//! * Events in flight are bounded (`Outstanding`): the dispatcher waits for a permit, which is
//!   released when the event is done.

use super::executor::ObserverExecutor;
use crate::delivery::lanes::Watermark;
use crate::error::Error;
use crate::event::{EntityEvent, Position};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::task::JoinSet;

/// The parts of one event still to do; the event is done when none is left: in the watermark
/// (its dispatch permit released with it), or, for a distributed worker, by its own hook (the
/// work message is acknowledged).
pub(super) struct Done {
    parts: AtomicUsize,
    finish: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Done {
    pub fn new(
        position: Position,
        parts: usize,
        watermark: Arc<Watermark>,
        permit: OwnedSemaphorePermit,
    ) -> Arc<Done> {
        Done::then(
            parts,
            Box::new(move || {
                watermark.completed(position);
                drop(permit);
            }),
        )
    }

    /// `parts` parts, then `finish` once they are all done.
    pub fn then(parts: usize, finish: Box<dyn FnOnce() + Send>) -> Arc<Done> {
        let done = Arc::new(Done {
            parts: AtomicUsize::new(parts),
            finish: Mutex::new(Some(finish)),
        });
        if parts == 0 {
            done.finish();
        }
        done
    }

    fn finish(&self) {
        let finish = self.finish.lock().expect("done lock poisoned").take();
        if let Some(finish) = finish {
            finish();
        }
    }

    /// One part is done.
    pub fn part_done(&self) {
        if self.parts.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finish();
        }
    }
}

/// One observer's deliveries of one event.
pub(super) struct Job {
    pub observer: usize,
    pub event: Arc<EntityEvent>,
    pub done: Arc<Done>,
}

type Key = (usize, String);

pub(super) struct Chains {
    executor: Arc<ObserverExecutor>,
    /// Chains running, with the jobs waiting behind the one in progress.
    running: Mutex<HashMap<Key, VecDeque<Job>>>,
    tasks: Mutex<JoinSet<()>>,
    fatal: mpsc::UnboundedSender<Error>,
}

impl Chains {
    pub fn new(executor: Arc<ObserverExecutor>, fatal: mpsc::UnboundedSender<Error>) -> Chains {
        Chains {
            executor,
            running: Mutex::new(HashMap::new()),
            tasks: Mutex::new(JoinSet::new()),
            fatal,
        }
    }

    /// Queue `job` behind the chain of (observer, `entity_key`), starting the chain if idle.
    pub fn submit(self: &Arc<Self>, entity_key: String, job: Job) {
        let key = (job.observer, entity_key);
        {
            let mut running = self.running.lock().expect("chains lock poisoned");
            if let Some(waiting) = running.get_mut(&key) {
                waiting.push_back(job);
                return;
            }
            running.insert(key.clone(), VecDeque::new());
        }
        let chains = self.clone();
        let mut tasks = self.tasks.lock().expect("chains lock poisoned");
        while let Some(finished) = tasks.try_join_next() {
            if let Err(e) = finished {
                if e.is_panic() {
                    let _ = self
                        .fatal
                        .send(Error::TaskFailed(format!("a delivery chain panicked: {e}")));
                }
            }
        }
        tasks.spawn(async move { chains.drive(key, job).await });
    }

    /// Whether no chain is running.
    pub fn is_idle(&self) -> bool {
        self.running
            .lock()
            .expect("chains lock poisoned")
            .is_empty()
    }

    /// Stop every chain now (a lost lead, or the end of a shutdown).
    pub fn abort(&self) {
        self.tasks.lock().expect("chains lock poisoned").abort_all();
    }

    async fn drive(&self, key: Key, mut job: Job) {
        loop {
            if let Err(e) = self
                .executor
                .deliver_observer(job.observer, &job.event)
                .await
            {
                let _ = self.fatal.send(e);
                return;
            }
            job.done.part_done();
            let next = {
                let mut running = self.running.lock().expect("chains lock poisoned");
                match running.get_mut(&key).and_then(VecDeque::pop_front) {
                    Some(next) => next,
                    None => {
                        running.remove(&key);
                        return;
                    }
                }
            };
            job = next;
        }
    }
}
