//! The delivery log: every attempt, successes included, with its outcome, status code and an
//! excerpt of the answer; `record = "failures" | "none"`; filters; pruning by age.

use crate::items::{schema, write};
use fraiseql_observers::delivery::log::{self, Filter};
use fraiseql_observers::testing::{eventually, Answer, TestDb, TestServer};
use fraiseql_observers::{config, Pipeline};
use std::time::Duration;

fn observer(name: &str, server: &TestServer, extra: &str) -> String {
    format!(
        r#"
[observers.{name}]
entity = "Item"
event_type = ["INSERT", "UPDATE"]
retry = {{ max_attempts = 3, initial_delay_ms = 10, max_delay_ms = 20 }}
{extra}

[[observers.{name}.actions]]
type = "webhook"
url = "{url}"
allow_private_networks = true
"#,
        url = server.url(&format!("/{name}"))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attempt_is_recorded_with_its_outcome() {
    let db = TestDb::new().await;
    let client = schema(&db).await;
    // `flaky` fails twice with a 503 and a body, then accepts; `broken` refuses for good (400);
    // `quiet` records failures only; `silent` records nothing.
    let flaky = TestServer::start().await;
    flaky.script([
        Answer::status(503).body("upstream is down"),
        Answer::status(503).body("upstream is down"),
    ]);
    let broken = TestServer::with(|_: &_| Answer::status(400).body("bad signature")).await;
    let quiet = TestServer::start().await;
    let silent = TestServer::start().await;
    let toml = format!(
        r#"
[observers.runtime]
consumer_id = "logged"
start_position = "beginning"
poll_interval_ms = 20
retry_poll_interval_ms = 20
{}{}{}{}"#,
        observer("flaky", &flaky, ""),
        observer("broken", &broken, ""),
        observer("quiet", &quiet, r#"record = "failures""#),
        observer("silent", &silent, r#"record = "none""#),
    );
    let config = config::load(&toml, &|_| None).unwrap_or_else(|e| panic!("{e}"));
    let pipeline = Pipeline::start(&db.url, config).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let engine = tokio::spawn(pipeline.run(async {
        let _ = stopped.await;
    }));

    write(&client, 1, 1).await;
    eventually(Duration::from_secs(20), "the deliveries", || {
        let done = flaky.accepted().len() == 1
            && broken.requests().len() == 1
            && quiet.accepted().len() == 1
            && silent.accepted().len() == 1;
        async move { done.then_some(()) }
    })
    .await;
    // A graceful stop writes what the log holds.
    stop.send(()).unwrap();
    engine.await.unwrap().unwrap();
    let sequence = flaky.accepted()[0].sequence();

    let all = |observer: &str| Filter {
        consumer: Some("logged".into()),
        observer: Some(observer.into()),
        limit: 100,
        ..Filter::default()
    };
    let flaky_log = log::list(&client, &all("flaky")).await.unwrap();
    let outcomes: Vec<_> = flaky_log
        .iter()
        .rev()
        .map(|a| (a.attempt, a.outcome, a.status_code))
        .collect();
    assert_eq!(
        outcomes,
        [
            (1, "transient", Some(503)),
            (2, "transient", Some(503)),
            (3, "ok", None)
        ],
        "{flaky_log:#?}"
    );
    let first = flaky_log.last().unwrap();
    assert_eq!(first.response_excerpt.as_deref(), Some("upstream is down"));
    assert!(first.error.as_deref().unwrap().contains("503"), "{first:?}");
    assert_eq!(first.event_sequence, sequence);
    assert_eq!(first.entity_type, "Item");
    assert!(flaky_log.iter().all(|a| a.delivery_id == first.delivery_id));
    assert_eq!(
        first.delivery_id,
        flaky.accepted()[0].header("webhook-id"),
        "the id the receiver saw"
    );

    let broken_log = log::list(&client, &all("broken")).await.unwrap();
    assert_eq!(broken_log.len(), 1, "{broken_log:#?}");
    assert_eq!(broken_log[0].outcome, "permanent");
    assert_eq!(broken_log[0].status_code, Some(400));
    assert_eq!(
        broken_log[0].response_excerpt.as_deref(),
        Some("bad signature")
    );
    // Only failures for `quiet` (it succeeded), nothing for `silent`.
    assert!(log::list(&client, &all("quiet")).await.unwrap().is_empty());
    assert!(log::list(&client, &all("silent")).await.unwrap().is_empty());

    // Filters: failures only; one change; an entity; another consumer sees nothing.
    let failed = log::list(
        &client,
        &Filter {
            ok: Some(false),
            ..all("flaky")
        },
    )
    .await
    .unwrap();
    assert_eq!(failed.len(), 2);
    let of_change = Filter {
        consumer: Some("logged".into()),
        sequence: Some(sequence),
        limit: 100,
        ..Filter::default()
    };
    assert_eq!(log::list(&client, &of_change).await.unwrap().len(), 4);
    let entity = first.entity_key.split('/').nth(1).unwrap().to_string();
    let by_entity = Filter {
        entity: Some(entity),
        sequence: None,
        ..of_change.clone()
    };
    assert_eq!(log::list(&client, &by_entity).await.unwrap().len(), 4);
    let other = Filter {
        consumer: Some("other".into()),
        ..of_change.clone()
    };
    assert!(log::list(&client, &other).await.unwrap().is_empty());
    let recent = Filter {
        since: Some(Duration::from_secs(3600)),
        ..of_change.clone()
    };
    assert_eq!(log::list(&client, &recent).await.unwrap().len(), 4);

    // Pruning by age: an hour keeps everything, zero removes everything.
    assert_eq!(
        log::prune(&client, Duration::from_secs(3600), 2)
            .await
            .unwrap(),
        0
    );
    assert_eq!(log::prune(&client, Duration::ZERO, 2).await.unwrap(), 4);
    assert!(log::list(&client, &of_change).await.unwrap().is_empty());
}

#[test]
fn record_must_be_a_known_level() {
    let toml = r#"
[observers.o]
entity = "Item"
record = "everything"

[[observers.o.actions]]
type = "webhook"
url = "https://example.com/hook"
"#;
    let errors = config::load(toml, &|_| None).unwrap_err().to_string();
    assert!(
        errors.contains("observers.o.record") && errors.contains("\"failures\""),
        "{errors}"
    );
}
