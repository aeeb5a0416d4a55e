//! The dead letter queue through the CLI: an item dead-lettered by the daemon (receiver answering
//! 400) is listed and shown; `dlq retry` delivers it once, even when two retries race;
//! `dlq discard` keeps it from ever being sent; `dlq retry --all` takes only pending items; a
//! paused observer's items stay pending (and `replay` through it is refused); with a
//! configuration, `list` and `retry` touch only its consumer's dead letters.

use crate::harness::{cli, config, insert_change, ConfigFile, Daemon, Setup};
use fraiseql_observers::testing::TestServer;
use fraiseql_observers::testing::{eventually, TestDb};
use serde_json::{json, Value};
use std::time::Duration;
use uuid::Uuid;

async fn status(client: &tokio_postgres::Client, id: i64) -> String {
    client
        .query_one(
            "SELECT status FROM core.observer_dlq_items WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_shown_retried_once_and_discarded() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = TestServer::start().await;
    receiver.respond(|_| (400, Duration::ZERO));
    let hook = receiver.url("/hook");
    let file = ConfigFile::new(&config(&Setup::new("dlq", &hook)));
    let url = db.url.as_str();

    // Three events the receiver refuses: three dead letters.
    let mut daemon = Daemon::start(url, &file.path);
    let entities: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let mut sequences = Vec::new();
    for (n, e) in entities.iter().enumerate() {
        sequences.push(insert_change(&client, *e, "c", json!({"n": n})).await);
    }
    let ids: Vec<i64> = eventually(Duration::from_secs(15), "three dead letters", || async {
        let rows = client
            .query(
                "SELECT id FROM core.observer_dlq_items ORDER BY event_sequence",
                &[],
            )
            .await
            .unwrap();
        (rows.len() == 3).then(|| rows.iter().map(|r| r.get(0)).collect())
    })
    .await;
    daemon.signal("TERM");
    assert_eq!(daemon.exit(Duration::from_secs(15)).await.code(), Some(0));
    assert_eq!(
        receiver.answered().len(),
        3,
        "each refused once (400 is permanent)"
    );
    let (retried, discarded, remaining) = (ids[0], ids[1], ids[2]);

    // list (table and JSON) and show come from the table.
    let list = cli(Some(url), &["dlq", "list"]).await;
    assert_eq!(list.code, Some(0), "{}", list.all());
    for id in &ids {
        let line = list
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!("{id} ")))
            .unwrap_or_else(|| panic!("dead letter {id} not listed:\n{}", list.stdout));
        for field in ["all", "webhook[0]", "permanent", "pending", "answered 400"] {
            assert!(line.contains(field), "{field:?} not in {line:?}");
        }
    }
    let listed: Value = serde_json::from_str(
        &cli(Some(url), &["dlq", "list", "--json", "--status", "pending"])
            .await
            .stdout,
    )
    .unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 3);
    let listed_ids: Vec<i64> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_i64().unwrap())
        .collect();
    let mut newest_first = ids.clone();
    newest_first.sort_by(|a, b| b.cmp(a));
    assert_eq!(listed_ids, newest_first);
    let show = cli(Some(url), &["dlq", "show", &retried.to_string()]).await;
    assert_eq!(show.code, Some(0), "{}", show.all());
    assert!(show.stdout.contains(&entities[0].to_string()));
    assert!(show
        .stdout
        .contains(&format!("\"sequence\": {}", sequences[0])));
    assert!(show.stdout.contains("history:"));
    let shown: Value = serde_json::from_str(
        &cli(Some(url), &["dlq", "show", &retried.to_string(), "--json"])
            .await
            .stdout,
    )
    .unwrap();
    assert_eq!(shown["event"]["entity_id"], json!(entities[0]));
    assert_eq!(shown["attempts"], json!(1));

    // Two concurrent retries of one item: the receiver gets exactly one request.
    receiver.respond(|_| (200, Duration::from_millis(500)));
    let id = retried.to_string();
    let retry_args = ["dlq", "retry", id.as_str(), "--config", file.arg()];
    let (one, two) = tokio::join!(cli(Some(url), &retry_args), cli(Some(url), &retry_args));
    let outputs = [one.all(), two.all()];
    assert_eq!(
        outputs.iter().filter(|o| o.contains("delivered")).count(),
        1,
        "{outputs:?}"
    );
    assert_eq!(
        outputs.iter().filter(|o| o.contains("not pending")).count(),
        1,
        "{outputs:?}"
    );
    let mut codes = [one.code, two.code];
    codes.sort();
    assert_eq!(codes, [Some(0), Some(1)]);
    let sent: Vec<_> = receiver.answered()[3..].to_vec();
    assert_eq!(sent.len(), 1, "a double retry fired twice");
    assert_eq!(sent[0].sequence(), sequences[0]);
    let refused = receiver.answered()[..3]
        .iter()
        .find(|h| h.sequence() == sequences[0])
        .unwrap()
        .id();
    assert_eq!(sent[0].id(), refused, "a retry keeps the delivery id");
    assert_eq!(status(&client, retried).await, "delivered");

    // Discard: kept, marked, never sent.
    let out = cli(Some(url), &["dlq", "discard", &discarded.to_string()]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert_eq!(status(&client, discarded).await, "discarded");
    let again = cli(Some(url), &["dlq", "discard", &discarded.to_string()]).await;
    assert_eq!(again.code, Some(1));
    assert!(again.stderr.contains("not pending"));
    let listed = cli(Some(url), &["dlq", "list", "--status", "discarded"]).await;
    assert!(listed
        .stdout
        .lines()
        .any(|l| l.starts_with(&format!("{discarded} "))));
    assert!(!listed
        .stdout
        .lines()
        .any(|l| l.starts_with(&format!("{retried} "))));

    // A paused observer sends nothing, operators' retries and replays included: the item stays
    // pending, the receiver hears nothing.
    receiver.respond(|_| (200, Duration::ZERO));
    let before = receiver.answered().len();
    let pause = cli(
        Some(url),
        &["pause", "--observer", "all", "--config", file.arg()],
    )
    .await;
    assert_eq!(pause.code, Some(0), "{}", pause.all());
    let held = cli(
        Some(url),
        &["dlq", "retry", "--all", "--config", file.arg()],
    )
    .await;
    assert_eq!(held.code, Some(1), "{}", held.all());
    assert!(
        held.stdout
            .contains("0 delivered, 0 failed again, 0 not pending, 1 held"),
        "{}",
        held.all()
    );
    let from = sequences[2].to_string();
    let replay = cli(
        Some(url),
        &[
            "replay",
            "--observer",
            "all",
            "--from",
            &from,
            "--to",
            &from,
            "--config",
            file.arg(),
        ],
    )
    .await;
    assert_eq!(replay.code, Some(1), "{}", replay.all());
    assert!(
        replay.stderr.contains("is paused: nothing sent"),
        "{}",
        replay.all()
    );
    let explained = cli(
        Some(url),
        &["explain", "--sequence", &from, "--config", file.arg()],
    )
    .await;
    assert!(
        explained
            .stdout
            .contains("all: FIRES (paused by an operator: held until `resume`)"),
        "{}",
        explained.all()
    );
    assert_eq!(receiver.answered().len(), before, "sent while paused");
    assert_eq!(status(&client, remaining).await, "pending");
    let resume = cli(
        Some(url),
        &["resume", "--observer", "all", "--config", file.arg()],
    )
    .await;
    assert_eq!(resume.code, Some(0), "{}", resume.all());

    // --all retries only what is pending: the third item.
    let all = cli(
        Some(url),
        &["dlq", "retry", "--all", "--config", file.arg()],
    )
    .await;
    assert_eq!(all.code, Some(0), "{}", all.all());
    assert!(all
        .stdout
        .contains("1 delivered, 0 failed again, 0 not pending"));
    let sent: Vec<i64> = receiver.answered()[4..]
        .iter()
        .map(|h| h.sequence())
        .collect();
    assert_eq!(sent, vec![sequences[2]]);
    assert_eq!(status(&client, remaining).await, "delivered");
    assert_eq!(status(&client, discarded).await, "discarded");

    // A retry that fails again goes back to pending with the error in its history.
    let file_down = ConfigFile::new(&config(&Setup::new("dlq", "http://127.0.0.1:9/down")));
    client
        .execute(
            "UPDATE core.observer_dlq_items SET status = 'pending' WHERE id = $1",
            &[&remaining],
        )
        .await
        .unwrap();
    let failed = cli(
        Some(url),
        &[
            "dlq",
            "retry",
            &remaining.to_string(),
            "--config",
            file_down.arg(),
        ],
    )
    .await;
    assert_eq!(failed.code, Some(1), "{}", failed.all());
    assert!(failed.stdout.contains("failed again"), "{}", failed.all());
    assert_eq!(status(&client, remaining).await, "pending");
    let history: Value = client
        .query_one(
            "SELECT history FROM core.observer_dlq_items WHERE id = $1",
            &[&remaining],
        )
        .await
        .unwrap()
        .get(0);
    assert!(history
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h.get("retry_failed").is_some()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_commands_with_a_configuration_touch_only_its_consumers_dead_letters() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = TestServer::start().await;
    receiver.respond(|_| (400, Duration::ZERO));
    let hook = receiver.url("/hook");
    let file = ConfigFile::new(&config(&Setup::new("ours", &hook)));
    let url = db.url.as_str();

    // One dead letter of ours; a copy of it belongs to consumer `theirs`, whose observer is
    // also named `all`.
    let mut daemon = Daemon::start(url, &file.path);
    insert_change(&client, Uuid::new_v4(), "c", json!({"n": 1})).await;
    let ours: i64 = eventually(Duration::from_secs(15), "a dead letter", || async {
        client
            .query_opt("SELECT id FROM core.observer_dlq_items", &[])
            .await
            .unwrap()
            .map(|r| r.get(0))
    })
    .await;
    daemon.signal("TERM");
    assert_eq!(daemon.exit(Duration::from_secs(15)).await.code(), Some(0));
    let theirs: i64 = client
        .query_one(
            "INSERT INTO core.observer_dlq_items
                 (consumer_id, observer, action_index, action_type, entity_key, event_id,
                  event_sequence, event, delivery_id, attempts, reason, last_error, history)
             SELECT 'theirs', observer, action_index, action_type, entity_key, event_id,
                    event_sequence, event, delivery_id, attempts, reason, last_error, history
               FROM core.observer_dlq_items WHERE id = $1
          RETURNING id",
            &[&ours],
        )
        .await
        .unwrap()
        .get(0);
    let answered = receiver.answered().len();

    let listed = |out: &str| -> Vec<i64> {
        let all: Value = serde_json::from_str(out).unwrap();
        all.as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_i64().unwrap())
            .collect()
    };
    let scoped = cli(
        Some(url),
        &["dlq", "list", "--json", "--config", file.arg()],
    )
    .await;
    assert_eq!(scoped.code, Some(0), "{}", scoped.all());
    assert_eq!(listed(&scoped.stdout), [ours]);
    let every = cli(Some(url), &["dlq", "list", "--json"]).await;
    assert_eq!(listed(&every.stdout), [theirs, ours]);

    receiver.respond(|_| (200, Duration::ZERO));
    let refused = cli(
        Some(url),
        &["dlq", "retry", &theirs.to_string(), "--config", file.arg()],
    )
    .await;
    assert_eq!(refused.code, Some(1), "{}", refused.all());
    assert!(
        refused.stderr.contains("consumer 'theirs'"),
        "{}",
        refused.all()
    );
    let all = cli(
        Some(url),
        &["dlq", "retry", "--all", "--config", file.arg()],
    )
    .await;
    assert_eq!(all.code, Some(0), "{}", all.all());
    assert!(
        all.stdout
            .contains("1 delivered, 0 failed again, 0 not pending"),
        "{}",
        all.all()
    );
    assert_eq!(receiver.answered().len(), answered + 1, "only ours sent");
    assert_eq!(status(&client, ours).await, "delivered");
    assert_eq!(status(&client, theirs).await, "pending");
}
