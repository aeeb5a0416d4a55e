//! One local HTTP server for every test that needs a receiver: webhook and Slack endpoints,
//! Twilio, FCM, APNs, Web Push and search-engine stand-ins.
//!
//! It serves HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on `127.0.0.1`, records every
//! request when it arrives (method, URI, version, headers, body, arrival time) and the status it
//! answered once it has, and answers with, in order of precedence: the next scripted answer
//! ([`TestServer::script`]), else the responder ([`TestServer::respond`]; 200 with an empty body
//! until one is set). An [`Answer`] has a status, headers (`Retry-After`...), a body, a delay, or
//! hangs: accepts the request and never answers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, Version};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::Value;

/// One request as received.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When it arrived.
    pub at: Instant,
    /// The status it was answered with; `None` while unanswered (delayed, hanging, or dropped by
    /// the client before the answer).
    pub status: Option<u16>,
}

impl Request {
    /// The URI's path.
    pub fn path(&self) -> &str {
        self.uri.path()
    }

    /// `METHOD /path?query`.
    pub fn target(&self) -> String {
        match self.uri.query() {
            Some(q) => format!("{} {}?{q}", self.method, self.uri.path()),
            None => format!("{} {}", self.method, self.uri.path()),
        }
    }

    /// The header's value; `""` when it is absent (or not text).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    /// The header's value; panics, listing the headers, when it is absent.
    #[track_caller]
    pub fn required_header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("header {name} missing: {:?}", self.headers))
            .to_str()
            .unwrap()
    }

    /// The body as JSON; panics when it is not JSON.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the body is valid JSON")
    }

    /// The body as `application/x-www-form-urlencoded` pairs.
    pub fn form(&self) -> Vec<(String, String)> {
        form_urlencoded::parse(&self.body).into_owned().collect()
    }

    /// Whether it was answered with a 2xx status.
    pub fn accepted(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }

    /// `webhook-id`: the delivery id of a webhook.
    pub fn id(&self) -> String {
        self.header("webhook-id").to_string()
    }

    /// `data.sequence` of the default webhook body.
    #[track_caller]
    pub fn sequence(&self) -> i64 {
        self.json()["data"]["sequence"]
            .as_i64()
            .expect("data.sequence")
    }

    /// `data.entity_id` of the default webhook body.
    #[track_caller]
    pub fn entity(&self) -> String {
        self.json()["data"]["entity_id"]
            .as_str()
            .expect("data.entity_id")
            .to_string()
    }
}

/// How the server answers one request.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// Waited before answering.
    pub delay: Duration,
    /// Never answer (the request is recorded, the connection stays open).
    pub hang: bool,
}

impl Answer {
    /// `status` with an empty body.
    pub fn status(status: u16) -> Answer {
        Answer {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
            delay: Duration::ZERO,
            hang: false,
        }
    }

    /// `status` with a JSON body (and `content-type: application/json`).
    pub fn json(status: u16, body: &Value) -> Answer {
        Answer::status(status)
            .header("content-type", "application/json")
            .body(body.to_string())
    }

    /// Accept the request and never answer.
    pub fn hang() -> Answer {
        Answer {
            hang: true,
            ..Answer::status(200)
        }
    }

    /// With a header.
    pub fn header(mut self, name: &str, value: impl Into<String>) -> Answer {
        self.headers.push((name.to_owned(), value.into()));
        self
    }

    /// With a `Retry-After` header.
    pub fn retry_after(self, value: impl Into<String>) -> Answer {
        self.header("retry-after", value)
    }

    /// With a body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Answer {
        self.body = body.into();
        self
    }

    /// Answered after `delay`.
    pub fn after(mut self, delay: Duration) -> Answer {
        self.delay = delay;
        self
    }
}

impl From<u16> for Answer {
    fn from(status: u16) -> Answer {
        Answer::status(status)
    }
}

/// `(status, delay)`.
impl From<(u16, Duration)> for Answer {
    fn from((status, delay): (u16, Duration)) -> Answer {
        Answer::status(status).after(delay)
    }
}

type Responder = Arc<dyn Fn(&Request) -> Answer + Send + Sync>;

struct Shared {
    requests: Mutex<Vec<Request>>,
    script: Mutex<VecDeque<Answer>>,
    responder: Mutex<Responder>,
}

/// A local HTTP server; stops when dropped.
pub struct TestServer {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    port: u16,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    /// A server answering 200 with an empty body to everything.
    pub async fn start() -> TestServer {
        TestServer::with(|_: &Request| Answer::status(200)).await
    }

    /// A server answering with `responder`.
    pub async fn with<A: Into<Answer>>(
        responder: impl Fn(&Request) -> A + Send + Sync + 'static,
    ) -> TestServer {
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            script: Mutex::new(VecDeque::new()),
            responder: Mutex::new(Arc::new(move |r: &Request| responder(r).into())),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the test server");
        let port = listener.local_addr().expect("local address").port();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("test server");
        });
        TestServer {
            base: format!("http://127.0.0.1:{port}"),
            port,
            shared,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `base` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Answer from now on with `responder` (after any scripted answers).
    pub fn respond<A: Into<Answer>>(
        &self,
        responder: impl Fn(&Request) -> A + Send + Sync + 'static,
    ) {
        *self.shared.responder.lock().unwrap() = Arc::new(move |r: &Request| responder(r).into());
    }

    /// Answer the next requests with `answers`, in order, before the responder.
    pub fn script(&self, answers: impl IntoIterator<Item = impl Into<Answer>>) {
        self.shared
            .script
            .lock()
            .unwrap()
            .extend(answers.into_iter().map(Into::into));
    }

    /// Every request so far, in arrival order, answered or not.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The requests on `path`, in arrival order.
    pub fn on(&self, path: &str) -> Vec<Request> {
        self.filtered(|r| r.path() == path)
    }

    /// The requests answered so far, in arrival order.
    pub fn answered(&self) -> Vec<Request> {
        self.filtered(|r| r.status.is_some())
    }

    /// The requests answered with 2xx, in arrival order.
    pub fn accepted(&self) -> Vec<Request> {
        self.filtered(Request::accepted)
    }

    /// The requests on `path` answered with 2xx.
    pub fn accepted_on(&self, path: &str) -> Vec<Request> {
        self.filtered(|r| r.accepted() && r.path() == path)
    }

    fn filtered(&self, keep: impl Fn(&Request) -> bool) -> Vec<Request> {
        let requests = self.shared.requests.lock().unwrap();
        requests.iter().filter(|r| keep(r)).cloned().collect()
    }

    /// Waits until `n` requests have arrived and returns them all; panics after `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Request> {
        self.wait_until(n, timeout, "requests", TestServer::requests)
            .await
    }

    /// Waits until `n` requests have been accepted and returns them; panics after `timeout`.
    pub async fn wait_for_accepted(&self, n: usize, timeout: Duration) -> Vec<Request> {
        self.wait_until(n, timeout, "accepted requests", TestServer::accepted)
            .await
    }

    async fn wait_until(
        &self,
        n: usize,
        timeout: Duration,
        what: &str,
        list: fn(&TestServer) -> Vec<Request>,
    ) -> Vec<Request> {
        super::eventually(timeout, &format!("{n} {what} at {}", self.base), || {
            let found = list(self);
            std::future::ready((found.len() >= n).then_some(found))
        })
        .await
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = Request {
        method,
        uri,
        version,
        headers,
        body,
        at: Instant::now(),
        status: None,
    };
    let index = {
        let mut requests = shared.requests.lock().unwrap();
        requests.push(request.clone());
        requests.len() - 1
    };
    let scripted = shared.script.lock().unwrap().pop_front();
    let answer = match scripted {
        Some(answer) => answer,
        None => {
            let responder = shared.responder.lock().unwrap().clone();
            responder(&request)
        }
    };
    if answer.hang {
        std::future::pending::<()>().await;
    }
    if !answer.delay.is_zero() {
        tokio::time::sleep(answer.delay).await;
    }
    if let Some(r) = shared.requests.lock().unwrap().get_mut(index) {
        r.status = Some(answer.status);
    }
    let status = StatusCode::from_u16(answer.status).expect("a valid status code");
    // As axum answers a bare status (no body, no content type) or a status with a `String` body
    // (text/plain), unless the answer names its content type.
    let text = !answer.body.is_empty()
        && !answer
            .headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("content-type"));
    let mut response = (status, Body::from(answer.body)).into_response();
    if text {
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    }
    for (name, value) in answer.headers {
        let name = HeaderName::from_bytes(name.as_bytes()).expect("a header name");
        let value = HeaderValue::from_str(&value).expect("a header value");
        response.headers_mut().append(name, value);
    }
    response
}
