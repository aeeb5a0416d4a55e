//! A local webhook receiver for end-to-end tests: records every request (headers, JSON body,
//! arrival time) and answers with a status chosen by a behaviour the test can change at any time.
#![allow(dead_code)]

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::Router;
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request as received.
#[derive(Debug, Clone)]
pub struct Hook {
    pub path: String,
    pub headers: HeaderMap,
    pub raw: Bytes,
    pub body: Value,
    pub at: Instant,
    /// The status the receiver answered.
    pub status: u16,
}

impl Hook {
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }

    /// `webhook-id`: the delivery id.
    pub fn id(&self) -> String {
        self.header("webhook-id")
    }

    /// `data.sequence` of the default webhook body.
    pub fn sequence(&self) -> i64 {
        self.body["data"]["sequence"]
            .as_i64()
            .expect("data.sequence")
    }

    /// `data.entity_id` of the default webhook body.
    pub fn entity(&self) -> String {
        self.body["data"]["entity_id"]
            .as_str()
            .expect("data.entity_id")
            .to_string()
    }
}

type Behaviour = Box<dyn Fn(&Hook) -> (u16, Duration) + Send + Sync>;

struct Shared {
    hooks: Mutex<Vec<Hook>>,
    behaviour: Mutex<Arc<Behaviour>>,
}

pub struct Receiver {
    pub base: String,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Receiver {
    /// A receiver answering 200 to everything.
    pub async fn start() -> Receiver {
        let shared = Arc::new(Shared {
            hooks: Mutex::new(Vec::new()),
            behaviour: Mutex::new(Arc::new(Box::new(|_: &Hook| (200, Duration::ZERO)))),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver {
            base: format!("http://127.0.0.1:{port}"),
            shared,
            server,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Answer with `f(hook)`: a status and a delay before answering.
    pub fn set(&self, f: impl Fn(&Hook) -> (u16, Duration) + Send + Sync + 'static) {
        *self.shared.behaviour.lock().unwrap() = Arc::new(Box::new(f));
    }

    /// Every request so far, in arrival order.
    pub fn hooks(&self) -> Vec<Hook> {
        self.shared.hooks.lock().unwrap().clone()
    }

    /// Requests answered with 2xx.
    pub fn accepted(&self) -> Vec<Hook> {
        self.hooks()
            .into_iter()
            .filter(|h| h.status < 300)
            .collect()
    }

    pub fn accepted_on(&self, path: &str) -> Vec<Hook> {
        self.accepted()
            .into_iter()
            .filter(|h| h.path == path)
            .collect()
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    raw: Bytes,
) -> StatusCode {
    let mut hook = Hook {
        path: uri.path().to_string(),
        headers,
        body: serde_json::from_slice(&raw).unwrap_or(Value::Null),
        raw,
        at: Instant::now(),
        status: 0,
    };
    let behaviour = shared.behaviour.lock().unwrap().clone();
    let (status, delay) = behaviour(&hook);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    hook.status = status;
    shared.hooks.lock().unwrap().push(hook);
    StatusCode::from_u16(status).unwrap()
}
