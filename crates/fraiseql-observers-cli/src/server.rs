//! The daemon's HTTP endpoints: `GET /metrics` (Prometheus text) and `GET /healthz` (JSON).
//!
//! Invariant: read-only. There is no write endpoint (nothing here changes state), so it needs no
//! authentication; it answers in every role, standby included.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use fraiseql_observers::distributed::Role as DistributedRole;
use fraiseql_observers::pipeline::worker::WorkerStatus;
use fraiseql_observers::pipeline::EngineStatus;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

/// What this instance is doing for its consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// Not yet known whether it leads.
    Starting = 0,
    /// Waiting: another instance leads the consumer.
    Standby = 1,
    Leader = 2,
    /// The lead was lost: reconnecting to contend again.
    Reconnecting = 3,
    /// A distributed worker (`run --role worker`): delivers the partitions it owns.
    Worker = 4,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Starting => "starting",
            Role::Standby => "standby",
            Role::Leader => "leader",
            Role::Reconnecting => "reconnecting",
            Role::Worker => "worker",
        }
    }
}

/// The daemon's state as `/healthz` reports it.
#[derive(Debug)]
pub struct Health {
    consumer: String,
    role: AtomicU8,
    /// The running engine's figures; replaced on every new lead.
    engine: Mutex<Option<Arc<EngineStatus>>>,
    /// `run --role`: single, reader or worker.
    mode: Mutex<DistributedRole>,
    /// A worker's partitions, live workers and lag.
    worker: Mutex<Option<(String, Arc<WorkerStatus>)>>,
}

impl Health {
    pub fn new(consumer: &str) -> Health {
        Health {
            consumer: consumer.to_string(),
            role: AtomicU8::new(Role::Starting as u8),
            engine: Mutex::new(None),
            mode: Mutex::new(DistributedRole::Single),
            worker: Mutex::new(None),
        }
    }

    /// What `run --role` asked for (reported as `mode`).
    pub fn set_mode(&self, mode: DistributedRole) {
        *self.mode.lock().expect("health lock poisoned") = mode;
    }

    /// A distributed worker named `id`, reporting `status`.
    pub fn work(&self, id: &str, status: Arc<WorkerStatus>) {
        self.set_mode(DistributedRole::Worker);
        *self.worker.lock().expect("health lock poisoned") = Some((id.to_string(), status));
        self.set_role(Role::Worker);
    }

    pub fn set_role(&self, role: Role) {
        self.role.store(role as u8, Ordering::Relaxed);
        metrics::gauge!(fraiseql_observers::metrics::LEADER).set(if role == Role::Leader {
            1.0
        } else {
            0.0
        });
    }

    pub fn role(&self) -> Role {
        match self.role.load(Ordering::Relaxed) {
            1 => Role::Standby,
            2 => Role::Leader,
            3 => Role::Reconnecting,
            4 => Role::Worker,
            _ => Role::Starting,
        }
    }

    /// The engine is running (a new lead): report its figures from now on.
    pub fn set_engine(&self, status: Arc<EngineStatus>) {
        *self.engine.lock().expect("health lock poisoned") = Some(status);
    }

    /// A new lead: its engine's figures, and the leader role.
    pub fn lead(&self, status: Arc<EngineStatus>) {
        self.set_engine(status);
        self.set_role(Role::Leader);
    }

    /// 200 when leading with a healthy listener, or standing by; 503 while starting, while
    /// reconnecting after a lost lead, or when the listener cannot reach the database.
    pub fn report(&self) -> (StatusCode, serde_json::Value) {
        let role = self.role();
        let engine = self
            .engine
            .lock()
            .expect("health lock poisoned")
            .clone()
            .filter(|_| role == Role::Leader);
        let engine = engine.as_deref();
        let (code, status) = match (role, engine) {
            (Role::Standby | Role::Worker, _) => (StatusCode::OK, "ok"),
            (Role::Leader, Some(e)) if e.listener_healthy.load(Ordering::Relaxed) => {
                (StatusCode::OK, "ok")
            }
            (Role::Leader, Some(_)) => (StatusCode::SERVICE_UNAVAILABLE, "unhealthy"),
            (Role::Reconnecting, _) => (StatusCode::SERVICE_UNAVAILABLE, "reconnecting"),
            _ => (StatusCode::SERVICE_UNAVAILABLE, "starting"),
        };
        let figure = |f: &dyn Fn(&EngineStatus) -> serde_json::Value| {
            engine.map_or(serde_json::Value::Null, f)
        };
        let mode = *self.mode.lock().expect("health lock poisoned");
        let mut body = json!({
            "status": status,
            "role": role.as_str(),
            "mode": mode.as_str(),
            "consumer": self.consumer,
            "listener_healthy": figure(&|e| json!(e.listener_healthy.load(Ordering::Relaxed))),
            "backlog": figure(&|e| json!(e.backlog.load(Ordering::Relaxed))),
            "backlog_alert": figure(&|e| json!(e.backlog_alert.load(Ordering::Relaxed))),
            "lag_ms": figure(&|e| json!(e.lag_ms.load(Ordering::Relaxed))),
            "in_flight": figure(&|e| json!(e.in_flight.load(Ordering::Relaxed))),
            "events_read": figure(&|e| json!(e.events_read.load(Ordering::Relaxed))),
            "events_matched": figure(&|e| json!(e.events_matched.load(Ordering::Relaxed))),
        });
        if let Some((id, w)) = self.worker.lock().expect("health lock poisoned").as_ref() {
            body["worker"] = json!(id);
            body["partitions"] = json!(*w.partitions.lock().expect("status lock poisoned"));
            body["live_workers"] = json!(w.live_workers.load(Ordering::Relaxed));
            body["partition_lag"] = json!(w.lag.load(Ordering::Relaxed));
            body["partitions_taken"] = json!(w.taken.load(Ordering::Relaxed));
        }
        (code, body)
    }
}

#[derive(Clone)]
struct Endpoints {
    health: Arc<Health>,
    prometheus: PrometheusHandle,
}

/// Bind `address` (failing at once when it cannot) and serve the endpoints in the background.
pub async fn start(
    address: &str,
    health: Arc<Health>,
    prometheus: PrometheusHandle,
) -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {address} (metrics_address): {e}"))?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(Endpoints { health, prometheus });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the /metrics and /healthz endpoint stopped");
        }
    });
    tracing::info!(address = %bound, "serving /metrics and /healthz");
    Ok(bound)
}

async fn metrics(State(s): State<Endpoints>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.prometheus.render(),
    )
        .into_response()
}

async fn healthz(State(s): State<Endpoints>) -> Response {
    let (code, body) = s.health.report();
    (code, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_answers_by_role_and_listener_state() {
        let health = Health::new("orders");
        let (code, body) = health.report();
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["role"], "starting");

        health.set_role(Role::Standby);
        let (code, body) = health.report();
        assert_eq!(code, StatusCode::OK);
        assert_eq!(body["role"], "standby");
        assert_eq!(body["consumer"], "orders");
        assert!(body["backlog"].is_null(), "a standby reports no figures");

        health.set_role(Role::Leader);
        assert_eq!(health.report().0, StatusCode::SERVICE_UNAVAILABLE);
        let status = Arc::new(EngineStatus::default());
        health.set_engine(status.clone());
        let (code, body) = health.report();
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["status"], "unhealthy");
        assert_eq!(body["listener_healthy"], false);

        status.listener_healthy.store(true, Ordering::Relaxed);
        status.backlog.store(7, Ordering::Relaxed);
        status.events_read.store(3, Ordering::Relaxed);
        let (code, body) = health.report();
        assert_eq!(code, StatusCode::OK);
        assert_eq!(body["status"], "ok");
        assert_eq!(body["backlog"], 7);
        assert_eq!(body["events_read"], 3);

        // The lead lost: 503 reconnecting, no figures of the dead engine; a new lead, new ones.
        health.set_role(Role::Reconnecting);
        let (code, body) = health.report();
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["status"], "reconnecting");
        assert_eq!(body["role"], "reconnecting");
        assert!(body["backlog"].is_null());
        let next = Arc::new(EngineStatus::default());
        next.listener_healthy.store(true, Ordering::Relaxed);
        health.lead(next);
        let (code, body) = health.report();
        assert_eq!(code, StatusCode::OK);
        assert_eq!(body["role"], "leader");
        assert_eq!(body["backlog"], 0);
        assert_eq!(body["mode"], "single");

        // A worker: 200, its partitions and lag.
        let status = Arc::new(WorkerStatus::default());
        *status.partitions.lock().unwrap() = vec![1, 5];
        status.lag.store(9, Ordering::Relaxed);
        health.work("w1", status);
        let (code, body) = health.report();
        assert_eq!(code, StatusCode::OK);
        assert_eq!(body["role"], "worker");
        assert_eq!(body["mode"], "worker");
        assert_eq!(body["partitions"], json!([1, 5]));
        assert_eq!(body["partition_lag"], 9);
    }
}
