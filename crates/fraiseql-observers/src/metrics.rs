//! Metric names, in one place, recorded through the `metrics` facade. The library installs no
//! recorder: the daemon does (Prometheus at `/metrics`); without one, recording is a no-op.

pub const ROWS_READ: &str = "fraiseql_observers_rows_read_total";
pub const ROWS_QUARANTINED: &str = "fraiseql_observers_rows_quarantined_total";
pub const EVENTS_READ: &str = "fraiseql_observers_events_read_total";
pub const EVENTS_MATCHED: &str = "fraiseql_observers_events_matched_total";
pub const CONDITION_ERRORS: &str = "fraiseql_observers_condition_errors_total";
/// Labelled `observer`, `action` and `outcome` = ok | failed | retried | parked | throttled | paused | dead_lettered | dropped.
pub const ACTIONS: &str = "fraiseql_observers_actions_total";
pub const DEAD_LETTERED: &str = "fraiseql_observers_dead_lettered_total";
/// Seconds from the change's commit (its `created_at`) to a successful delivery, per observer.
pub const DELIVERY_LATENCY: &str = "fraiseql_observers_delivery_latency_seconds";
/// Age in seconds of the oldest committed change not yet processed (0 when caught up).
pub const LAG_SECONDS: &str = "fraiseql_observers_lag_seconds";
/// Committed changes not yet covered by the checkpoint.
pub const BACKLOG: &str = "fraiseql_observers_backlog";
pub const RETRY_QUEUE: &str = "fraiseql_observers_retry_queue";
pub const DLQ_PENDING: &str = "fraiseql_observers_dlq_pending";
pub const IN_FLIGHT: &str = "fraiseql_observers_in_flight";
/// Requests in flight to one endpoint (labelled `endpoint`: `host:port`).
pub const ENDPOINT_IN_FLIGHT: &str = "fraiseql_observers_endpoint_in_flight";
/// Deliveries not sent at once because of their endpoint's flow control (labelled `endpoint`
/// and `reason` = breaker_open | rate_limited | saturated); they wait in the retry queue.
pub const ENDPOINT_THROTTLED: &str = "fraiseql_observers_endpoint_throttled_total";
/// 1 while an endpoint's circuit breaker is open or half-open, else 0.
pub const ENDPOINT_BREAKER_OPEN: &str = "fraiseql_observers_endpoint_breaker_open";
pub const LISTENER_HEALTHY: &str = "fraiseql_observers_listener_healthy";
pub const LEADER: &str = "fraiseql_observers_leader";
/// Leads lost (lock connection gone, fenced, an engine task failed, the database restarting)
/// and contended again in the same process.
pub const LOST_LEADS: &str = "fraiseql_observers_lost_leads_total";
/// Delivery-log rows that could not be written (the database refused them for a reason that is
/// not transient, or stayed unreachable for a minute). The deliveries themselves are unaffected.
pub const DELIVERY_LOG_LOST: &str = "fraiseql_observers_delivery_log_lost_total";

/// Distributed reader: deliveries (one per event and observer) published to the work stream and
/// acknowledged by it.
pub const WORK_PUBLISHED: &str = "fraiseql_observers_work_published_total";
/// Distributed worker: partitions of the work stream this worker owns.
pub const PARTITIONS_OWNED: &str = "fraiseql_observers_partitions_owned";
/// Distributed worker: messages of its partitions not yet acknowledged (JetStream `num_pending`
/// plus those in flight), the consumer lag.
pub const PARTITION_LAG: &str = "fraiseql_observers_partition_lag";

/// 1 while an operator has paused the observer (labelled `observer`), else 0.
pub const OBSERVER_PAUSED: &str = "fraiseql_observers_observer_paused";
/// Configuration reloads (SIGHUP or `reload`), labelled `result` = ok | error.
pub const CONFIG_RELOADS: &str = "fraiseql_observers_config_reloads_total";

/// One action's metric handles, resolved once when the pipeline starts (so recording costs no
/// label lookup per event; the recorder must be installed before).
#[derive(Clone)]
pub struct ActionMeters {
    pub ok: metrics::Counter,
    pub retried: metrics::Counter,
    pub parked: metrics::Counter,
    pub throttled: metrics::Counter,
    /// Held in the retry queue because the observer is paused.
    pub paused: metrics::Counter,
    pub dead_lettered: metrics::Counter,
    pub dropped: metrics::Counter,
    /// [`DELIVERY_LATENCY`] of the observer.
    pub latency: metrics::Histogram,
}

impl ActionMeters {
    pub fn new(observer: &str, action: &'static str) -> ActionMeters {
        let outcome = |outcome: &'static str| metrics::counter!(ACTIONS, "observer" => observer.to_string(), "action" => action, "outcome" => outcome);
        ActionMeters {
            ok: outcome("ok"),
            retried: outcome("retried"),
            parked: outcome("parked"),
            throttled: outcome("throttled"),
            paused: outcome("paused"),
            dead_lettered: outcome("dead_lettered"),
            dropped: outcome("dropped"),
            latency: metrics::histogram!(DELIVERY_LATENCY, "observer" => observer.to_string()),
        }
    }
}

/// One observer's metric handles, resolved once.
#[derive(Clone)]
pub struct ObserverMeters {
    pub matched: metrics::Counter,
    pub condition_errors: metrics::Counter,
    /// One per action, in configuration order.
    pub actions: Vec<ActionMeters>,
}

impl ObserverMeters {
    pub fn new(observer: &str, actions: impl Iterator<Item = &'static str>) -> ObserverMeters {
        ObserverMeters {
            matched: metrics::counter!(EVENTS_MATCHED, "observer" => observer.to_string()),
            condition_errors: metrics::counter!(CONDITION_ERRORS, "observer" => observer.to_string()),
            actions: actions
                .map(|kind| ActionMeters::new(observer, kind))
                .collect(),
        }
    }
}
