//! Flow control per endpoint: a receiver that hangs does not hold back another observer's
//! deliveries; its circuit breaker opens; its deliveries wait durably and arrive, in order, once
//! it answers again. A rate limit spaces requests out. A delivery waits in memory at most
//! `MAX_WAIT` for an in-flight permit, so requests that run to a long timeout never fill the
//! events in flight.

use crate::items::{count, first_deliveries, schema, write};
use fraiseql_observers::delivery::retry_queue;
use fraiseql_observers::testing::{eventually, Answer, Request, TestDb, TestServer};
use fraiseql_observers::{config, Pipeline};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn env(name: &str) -> Option<String> {
    (name == "HOOK_SECRET").then(|| SECRET.to_string())
}

fn webhook(name: &str, server: &TestServer, extra: &str) -> String {
    format!(
        r#"
[observers.{name}]
entity = "Item"
event_type = ["INSERT", "UPDATE"]
retry = {{ max_attempts = 50, initial_delay_ms = 100, max_delay_ms = 200 }}

[[observers.{name}.actions]]
type = "webhook"
url = "{url}"
signing_secret_env = "HOOK_SECRET"
allow_private_networks = true
{extra}
"#,
        url = server.url(&format!("/{name}"))
    )
}

async fn run(
    db: &TestDb,
    toml: &str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<fraiseql_observers::Result<()>>,
) {
    let config = config::load(toml, &env).unwrap_or_else(|e| panic!("{e}"));
    let pipeline = Pipeline::start(&db.url, config).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let engine = tokio::spawn(pipeline.run(async {
        let _ = stopped.await;
    }));
    (stop, engine)
}

/// Items and versions of each that [`write_all_and_wait_for`] writes.
const ITEMS: i32 = 30;
const VERSIONS: i32 = 10;

/// Write [`VERSIONS`] versions of [`ITEMS`] items and wait (at most `within`) until `healthy` has the first
/// delivery of each change; their number.
async fn write_all_and_wait_for(
    client: &tokio_postgres::Client,
    healthy: &TestServer,
    within: Duration,
) -> usize {
    for version in 1..=VERSIONS {
        for item in 1..=ITEMS {
            write(client, item, version).await;
        }
    }
    let total = (ITEMS * VERSIONS) as usize;
    eventually(within, "every healthy delivery", || {
        let n = count(&first_deliveries(&healthy.accepted()));
        async move { (n == total).then_some(()) }
    })
    .await;
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_receiver_does_not_hold_back_another_observer() {
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let healthy = TestServer::start().await;
    let hanging = Arc::new(AtomicBool::new(true));
    let stuck = {
        let hanging = hanging.clone();
        TestServer::with(move |_: &Request| {
            if hanging.load(Ordering::Relaxed) {
                Answer::hang()
            } else {
                Answer::status(200)
            }
        })
        .await
    };
    // Four lanes, a 300 ms timeout: before, each hung request held a lane (and every entity
    // hashed to it) for 300 ms, so 300 changes took over 20 s to reach the healthy receiver.
    let toml = format!(
        r#"
[observers.runtime]
consumer_id = "flow"
start_position = "beginning"
poll_interval_ms = 20
checkpoint_interval_ms = 50
retry_poll_interval_ms = 50
concurrency = 4
circuit_breaker = {{ failures = 3, cool_down_ms = 300 }}
{}
{}"#,
        webhook("healthy", &healthy, ""),
        webhook("stuck", &stuck, "timeout_ms = 300"),
    );
    let (stop, engine) = run(&db, &toml).await;

    // Every healthy delivery arrives while the other receiver still hangs.
    let total = write_all_and_wait_for(&client, &healthy, Duration::from_secs(20)).await;
    assert!(hanging.load(Ordering::Relaxed));
    let sent_while_hung = stuck.requests().len();
    assert!(
        sent_while_hung < total / 2,
        "the breaker stops sending to the hung receiver: {sent_while_hung} requests for {total} changes"
    );
    for versions in first_deliveries(&healthy.accepted()).values() {
        assert!(
            versions.windows(2).all(|w| w[0] < w[1]),
            "in order: {versions:?}"
        );
    }

    // It answers again: every change it missed arrives, in order per item.
    hanging.store(false, Ordering::Relaxed);
    eventually(
        Duration::from_secs(60),
        "the hung receiver's deliveries",
        || {
            let n = count(&first_deliveries(&stuck.accepted()));
            async move { (n == total).then_some(()) }
        },
    )
    .await;
    for versions in first_deliveries(&stuck.accepted()).values() {
        assert_eq!(
            versions,
            &(1..=i64::from(versions.len() as i32)).collect::<Vec<_>>(),
            "every version, in order"
        );
    }
    let _ = stop.send(());
    engine.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_hung_until_a_long_timeout_do_not_fill_the_events_in_flight() {
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let healthy = TestServer::start().await;
    let stuck = TestServer::with(|_: &Request| Answer::hang()).await;
    // Two lanes (32 events in flight), a 60 s timeout, two requests at once: before, the
    // deliveries waiting for one of the two permits held their events in flight until the hung
    // requests timed out, so the healthy observer's events were not dispatched for a minute.
    let toml = format!(
        r#"
[observers.runtime]
consumer_id = "saturated"
start_position = "beginning"
poll_interval_ms = 20
checkpoint_interval_ms = 50
retry_poll_interval_ms = 50
shutdown_timeout_ms = 500
concurrency = 2
{}
{}"#,
        webhook("healthy", &healthy, ""),
        webhook("stuck", &stuck, "timeout_ms = 60000\nmax_in_flight = 2"),
    );
    let (stop, engine) = run(&db, &toml).await;

    // Well before the hung requests' 60 s timeout.
    let total = write_all_and_wait_for(&client, &healthy, Duration::from_secs(40)).await;
    // The hung receiver still holds its first two requests: none timed out, none more was sent.
    assert_eq!(stuck.requests().len(), 2, "only the first two requests");
    assert!(stuck.answered().is_empty());
    for versions in first_deliveries(&healthy.accepted()).values() {
        assert!(
            versions.windows(2).all(|w| w[0] < w[1]),
            "in order: {versions:?}"
        );
    }
    // None of the hung receiver's deliveries is lost: the two hung entities' (one request hung,
    // their later versions behind it, in order) are in flight, every other one waits in the
    // retry queue.
    eventually(Duration::from_secs(20), "the deferred deliveries", || {
        let client = &client;
        async move {
            let queued = retry_queue::len(client, "saturated").await.unwrap();
            (queued == i64::from(total as i32 - 2 * VERSIONS)).then_some(())
        }
    })
    .await;
    let _ = stop.send(());
    engine.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_rate_limit_spaces_requests_out() {
    let db = TestDb::new().await;
    let client = schema(&db).await;
    let server = TestServer::start().await;
    let toml = format!(
        r#"
[observers.runtime]
consumer_id = "rate"
start_position = "beginning"
poll_interval_ms = 20
retry_poll_interval_ms = 20
{}"#,
        webhook(
            "limited",
            &server,
            "rate_limit = { per_second = 20, burst = 1 }"
        ),
    );
    let (stop, engine) = run(&db, &toml).await;
    let n = 30;
    for item in 1..=n {
        write(&client, item, 1).await;
    }
    let accepted = server
        .wait_for_accepted(n as usize, Duration::from_secs(30))
        .await;
    // A lower bound only (a slow machine can only stretch it): 30 requests at 20/s with a burst
    // of 1 span at least 29/20 s.
    let span = accepted.last().unwrap().at - accepted.first().unwrap().at;
    assert!(
        span >= Duration::from_secs_f64(29.0 / 20.0 * 0.95),
        "30 requests within {span:?}"
    );
    let _ = stop.send(());
    engine.await.unwrap().unwrap();
}
