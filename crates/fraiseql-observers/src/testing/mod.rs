//! The test kit (cargo feature `testing`, never in a normal build): what the library's, the
//! CLI's and the benches' tests share instead of each writing its own.
//!
//! * [`TestServer`]: one local HTTP server (HTTP/1.1 and h2c on 127.0.0.1) that records every
//!   request and answers as scripted: a responder, a queue of answers taken first, delays, hangs,
//!   any header (`Retry-After`).
//! * [`TestDb`]: a fresh PostgreSQL database per test, migrated, dropped with the value.
//! * [`Cluster`]: a private PostgreSQL cluster to restart or to reach as a second server.
//! * [`order_event`]: a sample event; [`eventually`]: poll until a check holds.
//!
//! Unlike the library, this module reads environment variables (`FRAISEQL_TEST_ADMIN_URL`,
//! `RUST_LOG`) and may install a logger: it only ever runs in tests.

mod cluster;
mod db;
mod events;
mod server;

pub use cluster::Cluster;
pub use db::{admin_url, connect, init_logs, TestDb};
pub use events::order_event;
pub use server::{Answer, Request, TestServer};

use std::time::Duration;

/// Poll `check` until it returns `Some`, or panic after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
