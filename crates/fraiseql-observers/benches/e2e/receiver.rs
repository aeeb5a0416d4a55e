//! The benchmark's webhook receiver: a separate process (the bench binary re-run with
//! `--role receiver`), so it never shares a scheduler or an allocator with the engine.
//!
//! It answers every request with 204 on keep-alive HTTP/1.1 connections, and records for each one
//! its arrival time (unix nanoseconds: comparable with the writer's commit times, which come from
//! another process on the same machine), its delivery id (`webhook-id`) and the entity it is about
//! (the `"entity_id":"<uuid>"` of the body, found with a byte search: no JSON parsing). A delivery
//! id seen before counts as a duplicate.
//!
//! A path starting with `/slow/` is answered after a delay (a slow receiver): `/slow/<ms>/...`
//! waits `<ms>` milliseconds, any other `/slow/...` 20 ms.
//!
//! Control endpoints (paths starting with `/_`): `GET /_stats` (counts as JSON), `POST /_reset`
//! (forget everything), `GET /_arrivals` (one `entity arrival_ns` line per first delivery).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::Router;
use std::collections::HashSet;
use std::io::Write;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

use super::unix_nanos;

#[derive(Default)]
struct Recorded {
    received: u64,
    duplicates: u64,
    first_ns: i64,
    last_ns: i64,
    ids: HashSet<Box<str>>,
    /// (entity id, arrival) of first deliveries; at most one per delivery id.
    arrivals: Vec<(Box<str>, i64)>,
}

type Shared = Arc<Mutex<Recorded>>;

/// Serve until killed. Prints `PORT <n>` on stdout once listening.
pub fn serve() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("receiver runtime");
    runtime.block_on(async {
        let shared: Shared = Arc::default();
        let app = Router::new().fallback(handle).with_state(shared);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let port = listener.local_addr().expect("local address").port();
        let mut out = std::io::stdout();
        writeln!(out, "PORT {port}").expect("stdout");
        out.flush().expect("stdout");
        axum::serve(listener, app).await.expect("receiver");
    });
}

async fn handle(
    State(shared): State<Shared>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let path = uri.path();
    if let Some(control) = path.strip_prefix("/_") {
        return control_request(&shared, control);
    }
    if let Some(rest) = path.strip_prefix("/slow/") {
        // A receiver that takes `<ms>` (default 20) per request (the distributed scenario).
        let ms = rest
            .split('/')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(20);
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let now = unix_nanos();
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let entity = entity_of(&body);
    let mut r = shared.lock().expect("receiver lock");
    r.received += 1;
    if r.first_ns == 0 {
        r.first_ns = now;
    }
    r.last_ns = now;
    if r.ids.insert(id.into()) {
        if let Some(entity) = entity {
            r.arrivals.push((entity.into(), now));
        }
    } else {
        r.duplicates += 1;
    }
    StatusCode::NO_CONTENT.into_response()
}

fn control_request(shared: &Shared, what: &str) -> axum::response::Response {
    let mut r = shared.lock().expect("receiver lock");
    match what {
        "stats" => format!(
            r#"{{"received":{},"unique":{},"duplicates":{},"first_ns":{},"last_ns":{}}}"#,
            r.received,
            r.ids.len(),
            r.duplicates,
            r.first_ns,
            r.last_ns
        )
        .into_response(),
        "reset" => {
            *r = Recorded::default();
            StatusCode::NO_CONTENT.into_response()
        }
        "arrivals" => {
            let mut text = String::with_capacity(r.arrivals.len() * 58);
            for (entity, at) in &r.arrivals {
                text.push_str(entity);
                text.push(' ');
                text.push_str(&at.to_string());
                text.push('\n');
            }
            text.into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// The 36 characters after the first `"entity_id":"` of a JSON body.
fn entity_of(body: &[u8]) -> Option<&str> {
    const KEY: &[u8] = br#""entity_id":""#;
    let at = body.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    std::str::from_utf8(body.get(at..at + 36)?).ok()
}

/// Counts the receiver reports (the whole answer of `/_stats`, printed when a check fails).
#[allow(dead_code)]
#[derive(Debug, Clone, Copy, Default, serde::Deserialize)]
pub struct Stats {
    pub received: u64,
    pub unique: u64,
    pub duplicates: u64,
    pub first_ns: i64,
    pub last_ns: i64,
}

/// The receiver process, seen from the harness.
pub struct ReceiverProcess {
    child: Child,
    _stdout: ChildStdout,
    pub base: String,
    http: reqwest::Client,
}

impl ReceiverProcess {
    pub fn start() -> ReceiverProcess {
        let mut child = Command::new(std::env::current_exe().expect("current exe"))
            .args(["--role", "receiver"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the receiver process");
        let mut stdout = child.stdout.take().expect("receiver stdout");
        let line = super::read_line(&mut stdout);
        let port: u16 = line
            .strip_prefix("PORT ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("receiver said {line:?}"));
        ReceiverProcess {
            child,
            _stdout: stdout,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn stats(&self) -> Stats {
        self.http
            .get(self.url("/_stats"))
            .send()
            .await
            .expect("receiver stats")
            .json()
            .await
            .expect("receiver stats JSON")
    }

    pub async fn reset(&self) {
        self.http
            .post(self.url("/_reset"))
            .send()
            .await
            .expect("receiver reset");
    }

    /// (entity id, arrival unix ns) of every first delivery since the last reset.
    pub async fn arrivals(&self) -> Vec<(String, i64)> {
        let text = self
            .http
            .get(self.url("/_arrivals"))
            .send()
            .await
            .expect("receiver arrivals")
            .text()
            .await
            .expect("receiver arrivals text");
        text.lines()
            .filter_map(|l| {
                let (entity, at) = l.split_once(' ')?;
                Some((entity.to_string(), at.parse().ok()?))
            })
            .collect()
    }
}

impl Drop for ReceiverProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
