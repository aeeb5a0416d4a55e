//! Operator commands against a real database: migrate (idempotent), checkpoint show/reset (never
//! under a running leader), quarantine list, capture enable/disable/list and notify, and the
//! database URL's sources.

use crate::harness::{cli, config, ConfigFile, Daemon, Setup, TENANT};
use fraiseql_observers::leader::Leadership;
use fraiseql_observers::testing::TestServer;
use fraiseql_observers::testing::{eventually, TestDb};
use std::time::Duration;

#[tokio::test]
async fn migrate_applies_everything_once_and_is_idempotent() {
    let db = TestDb::empty().await;
    let client = db.client().await;
    let first = cli(Some(&db.url), &["migrate"]).await;
    assert_eq!(first.code, Some(0), "{}", first.all());
    let all = fraiseql_observers::migrate::MIGRATIONS;
    for m in all {
        assert!(
            first
                .stdout
                .contains(&format!("applied  {:>4}  {}", m.version, m.name)),
            "{}",
            first.stdout
        );
    }
    assert_eq!(applied(&client).await, all.len() as i64);

    let second = cli(Some(&db.url), &["migrate"]).await;
    assert_eq!(second.code, Some(0), "{}", second.all());
    assert!(second.stdout.contains("up to date"), "{}", second.stdout);
    assert!(!second.stdout.contains("applied  "));
    assert_eq!(applied(&client).await, all.len() as i64);
}

async fn applied(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM core.observer_schema_migrations", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn commands_say_where_the_database_url_comes_from() {
    let none = cli(None, &["dlq", "list"]).await;
    assert_eq!(none.code, Some(1));
    assert!(
        none.stderr
            .contains("pass --database-url, set DATABASE_URL"),
        "{}",
        none.all()
    );
    // From the configuration's [database] url, when no option or variable is given.
    let db = TestDb::new().await;
    let file = ConfigFile::new(&format!(
        "[database]\nurl = \"{}\"\n[observers.runtime]\nconsumer_id = \"x\"\n",
        db.url
    ));
    let listed = cli(None, &["dlq", "list", "--config", file.arg()]).await;
    assert_eq!(listed.code, Some(0), "{}", listed.all());
    assert!(listed.stdout.contains("no dead letters"));
    // An unmigrated database gets the hint to migrate.
    let empty = TestDb::empty().await;
    let out = cli(Some(&empty.url), &["checkpoint", "show"]).await;
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("fraiseql-observers migrate"),
        "{}",
        out.all()
    );
}

#[tokio::test]
async fn checkpoints_are_shown_and_reset_only_without_a_running_leader() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let url = db.url.as_str();
    let out = cli(Some(url), &["checkpoint", "show"]).await;
    assert!(out.stdout.contains("no checkpoints"), "{}", out.all());
    let out = cli(Some(url), &["checkpoint", "show", "--consumer", "orders"]).await;
    assert_eq!(out.code, Some(1));

    let out = cli(
        Some(url),
        &[
            "checkpoint",
            "reset",
            "--consumer",
            "orders",
            "--from",
            "beginning",
        ],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let snapshot: String = client
        .query_one(
            "SELECT snapshot::text FROM core.observer_checkpoints WHERE consumer_id = 'orders'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(snapshot, "1:1:");
    let out = cli(Some(url), &["checkpoint", "show", "--consumer", "orders"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let line = out.stdout.lines().nth(1).unwrap();
    assert!(line.starts_with("orders "), "{line}");
    assert!(line.contains("1:1:") && line.contains("none"), "{line}");

    // While an instance leads the consumer, reset refuses and show names the leader.
    let leader = Leadership::acquire(url, "orders", || {}).await.unwrap();
    let out = cli(Some(url), &["checkpoint", "show"]).await;
    assert!(out.stdout.contains("running (backend pid"), "{}", out.all());
    let out = cli(Some(url), &["checkpoint", "reset", "--consumer", "orders"]).await;
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("a daemon is running"), "{}", out.all());
    let unchanged: String = client
        .query_one(
            "SELECT snapshot::text FROM core.observer_checkpoints WHERE consumer_id = 'orders'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(unchanged, "1:1:");
    drop(leader);

    // Without it, reset to now moves the checkpoint to the current snapshot.
    let out = eventually(
        Duration::from_secs(5),
        "the lock to be released",
        || async {
            let out = cli(Some(url), &["checkpoint", "reset", "--consumer", "orders"]).await;
            (out.code == Some(0)).then_some(out)
        },
    )
    .await;
    assert!(out.stdout.contains("checkpoint reset"), "{}", out.all());
    let moved: String = client
        .query_one(
            "SELECT snapshot::text FROM core.observer_checkpoints WHERE consumer_id = 'orders'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_ne!(moved, "1:1:");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantined_rows_are_listed_with_their_reasons() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let sequence: i64 = client
        .query_one(
            &format!(
                "INSERT INTO core.tb_entity_change_log
                     (fk_customer_org, object_type, object_id, modification_type, change_status, object_data)
                 VALUES ('{TENANT}', 'Item', gen_random_uuid(), 'INSERT', 'new', '\"just a string\"')
                 RETURNING id"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let receiver = TestServer::start().await;
    let hook = receiver.url("/hook");
    let file = ConfigFile::new(&config(&Setup::new("quarantine", &hook)));
    let mut daemon = Daemon::start(&db.url, &file.path);
    eventually(Duration::from_secs(10), "the row quarantined", || async {
        let n: i64 = client
            .query_one("SELECT count(*) FROM core.observer_quarantine", &[])
            .await
            .unwrap()
            .get(0);
        (n == 1).then_some(())
    })
    .await;
    daemon.signal("TERM");
    assert_eq!(daemon.exit(Duration::from_secs(15)).await.code(), Some(0));

    let out = cli(Some(&db.url), &["quarantine", "list"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let line = out.stdout.lines().nth(1).expect("one row");
    assert!(
        line.starts_with(&format!("quarantine  {sequence} ")),
        "{line}"
    );
    let json: serde_json::Value = serde_json::from_str(
        &cli(Some(&db.url), &["quarantine", "list", "--json"])
            .await
            .stdout,
    )
    .unwrap();
    assert_eq!(json[0]["sequence"], sequence);
    assert_eq!(json[0]["row"]["object_data"], "just a string");
    assert!(!json[0]["reason"].as_str().unwrap().is_empty());
    assert!(receiver.answered().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_table_delivers_its_inserts() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let url = db.url.as_str();
    client
        .batch_execute(
            "CREATE TABLE tb_user (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
                                   tenant_id uuid NOT NULL, email text, password_hash text)",
        )
        .await
        .unwrap();
    let out = cli(
        Some(url),
        &[
            "capture",
            "enable",
            "--table",
            "tb_user",
            "--entity",
            "User",
            "--tenant-column",
            "tenant_id",
            "--exclude-column",
            "password_hash",
        ],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let listed = cli(Some(url), &["capture", "list"]).await;
    let line = listed.stdout.lines().nth(1).expect("one captured table");
    for field in ["public.tb_user", "User", "id", "tenant_id", "password_hash"] {
        assert!(line.contains(field), "{field} not in {line:?}");
    }
    let out = cli(Some(url), &["notify", "enable"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(fraiseql_observers::capture::notify_enabled(&client)
        .await
        .unwrap());

    let receiver = TestServer::start().await;
    let hook = receiver.url("/users");
    let file = ConfigFile::new(&format!(
        r#"
[observers.runtime]
consumer_id = "capture"
notify = true
poll_interval_ms = 5000

[observers.new_user]
entity = "User"
event_type = "INSERT"

[[observers.new_user.actions]]
type = "webhook"
url = "{hook}"
allow_private_networks = true
"#
    ));
    let mut daemon = Daemon::start(url, &file.path);
    daemon
        .wait_for_log("change-log listener started", Duration::from_secs(10))
        .await;
    client
        .execute(
            &format!(
                "INSERT INTO tb_user (tenant_id, email, password_hash) VALUES ('{TENANT}', 'ada@example.com', 'secret')"
            ),
            &[],
        )
        .await
        .unwrap();
    // Polling is 5 s apart: an arrival well before that comes from the NOTIFY hint.
    let delivered = eventually(Duration::from_secs(3), "the insert delivered", || {
        let hooks = receiver.accepted();
        async move { hooks.into_iter().next() }
    })
    .await;
    assert_eq!(delivered.json()["type"], "user.created");
    assert_eq!(
        delivered.json()["data"]["after"]["email"],
        "ada@example.com"
    );
    assert_eq!(delivered.json()["data"]["tenant"], TENANT);
    assert!(delivered.json()["data"]["after"]
        .get("password_hash")
        .is_none());
    daemon.signal("TERM");
    assert_eq!(daemon.exit(Duration::from_secs(15)).await.code(), Some(0));

    let out = cli(Some(url), &["capture", "disable", "--table", "tb_user"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(cli(Some(url), &["capture", "list"])
        .await
        .stdout
        .contains("no captured tables"));
    let before: i64 = client
        .query_one("SELECT count(*) FROM core.tb_entity_change_log", &[])
        .await
        .unwrap()
        .get(0);
    client
        .execute(
            &format!("INSERT INTO tb_user (tenant_id, email) VALUES ('{TENANT}', 'b@example.com')"),
            &[],
        )
        .await
        .unwrap();
    let after: i64 = client
        .query_one("SELECT count(*) FROM core.tb_entity_change_log", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(before, after, "a disabled table still writes changes");
    let out = cli(Some(url), &["notify", "disable"]).await;
    assert_eq!(out.code, Some(0));
    assert!(!fraiseql_observers::capture::notify_enabled(&client)
        .await
        .unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_logs_json_lines_when_asked() {
    let db = TestDb::new().await;
    let receiver = TestServer::start().await;
    let hook = receiver.url("/hook");
    let text = config(&Setup::new("json-logs", &hook)).replace(
        "[observers.runtime]\n",
        "[observers.runtime]\nlog_format = \"json\"\n",
    );
    let file = ConfigFile::new(&text);
    let mut daemon = Daemon::start(&db.url, &file.path);
    daemon
        .wait_for_log("change-log listener started", Duration::from_secs(10))
        .await;
    daemon.signal("TERM");
    assert_eq!(daemon.exit(Duration::from_secs(15)).await.code(), Some(0));
    let log = daemon.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let started = lines
        .iter()
        .find(|l| l["fields"]["message"] == "change-log listener started")
        .expect("the start is logged");
    assert_eq!(started["level"], "INFO");
    assert_eq!(started["fields"]["consumer"], "json-logs");
}

#[tokio::test]
async fn prune_deletes_only_processed_old_rows_and_refuses_without_consumers() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(&format!(
            "INSERT INTO core.tb_entity_change_log
                 (fk_customer_org, object_type, object_id, modification_type, change_status, object_data, created_at)
             SELECT '{TENANT}', 'Item', gen_random_uuid(), 'INSERT', 'new', '{{\"op\":\"c\",\"after\":{{}}}}',
                    now() - interval '30 days'
               FROM generate_series(1, 5)"
        ))
        .await
        .unwrap();
    let refused = cli(Some(&db.url), &["prune", "--older-than", "7d"]).await;
    assert_eq!(refused.code, Some(1), "{}", refused.all());
    assert!(
        refused.stderr.contains("no consumer has a checkpoint"),
        "{}",
        refused.all()
    );

    // A consumer created now, from "now": every existing row counts as processed by it.
    fraiseql_observers::listener::checkpoint::claim(
        &client,
        "pruner",
        fraiseql_observers::StartPosition::Now,
    )
    .await
    .unwrap();
    let young = cli(Some(&db.url), &["prune", "--older-than", "60d"]).await;
    assert_eq!(young.code, Some(0), "{}", young.all());
    assert!(
        young.stdout.contains("deleted 0 processed"),
        "{}",
        young.stdout
    );
    let pruned = cli(
        Some(&db.url),
        &["prune", "--older-than", "7d", "--batch-size", "2"],
    )
    .await;
    assert_eq!(pruned.code, Some(0), "{}", pruned.all());
    assert!(
        pruned.stdout.contains("deleted 5 processed"),
        "{}",
        pruned.stdout
    );
    let left: i64 = client
        .query_one("SELECT count(*) FROM core.tb_entity_change_log", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

#[tokio::test]
async fn explain_and_replay_a_range_for_one_observer() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = TestServer::start().await;
    let hook = receiver.url("/hook");
    let text = format!(
        "{}\n[observers.big]\nentity = \"Item\"\nevent_type = \"INSERT\"\ncondition = \"n > 1\"\n\
         [[observers.big.actions]]\ntype = \"webhook\"\nurl = \"{hook}\"\nallow_private_networks = true\n",
        config(&Setup::new("replay", &hook))
    );
    let file = ConfigFile::new(&text);
    let mut sequences = Vec::new();
    for n in 0..4 {
        sequences.push(
            crate::harness::insert_change(
                &client,
                uuid::Uuid::new_v4(),
                "c",
                serde_json::json!({"n": n}),
            )
            .await,
        );
    }
    let explained = cli(
        Some(&db.url),
        &[
            "--config",
            file.arg(),
            "explain",
            "--sequence",
            &sequences[0].to_string(),
        ],
    )
    .await;
    assert_eq!(explained.code, Some(0), "{}", explained.all());
    assert!(
        explained.stdout.contains("all: FIRES"),
        "{}",
        explained.stdout
    );
    assert!(
        explained.stdout.contains("big: condition is false"),
        "{}",
        explained.stdout
    );

    let (from, to) = (sequences[0].to_string(), sequences[3].to_string());
    let dry = cli(
        Some(&db.url),
        &[
            "--config",
            file.arg(),
            "replay",
            "--observer",
            "big",
            "--from",
            &from,
            "--to",
            &to,
            "--dry-run",
        ],
    )
    .await;
    assert_eq!(dry.code, Some(0), "{}", dry.all());
    assert!(
        dry.stdout.contains("would send 2, failed 0, skipped 2"),
        "{}",
        dry.stdout
    );
    assert!(receiver.answered().is_empty(), "a dry run sends nothing");

    let real = cli(
        Some(&db.url),
        &[
            "--config",
            file.arg(),
            "replay",
            "--observer",
            "big",
            "--from",
            &from,
            "--to",
            &to,
        ],
    )
    .await;
    assert_eq!(real.code, Some(0), "{}", real.all());
    let hooks = receiver.answered();
    let ns: Vec<i64> = hooks
        .iter()
        .map(|h| h.json()["data"]["after"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(ns, [2, 3], "in sequence order, only what matches");

    // The replay's attempts are in the delivery log: listed, filtered, and explained.
    let listed = cli(
        Some(&db.url),
        &[
            "--config",
            file.arg(),
            "deliveries",
            "list",
            "--observer",
            "big",
            "--json",
        ],
    )
    .await;
    assert_eq!(listed.code, Some(0), "{}", listed.all());
    let attempts: serde_json::Value = serde_json::from_str(&listed.stdout).unwrap();
    let attempts = attempts.as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{}", listed.stdout);
    assert!(attempts.iter().all(|a| a["outcome"] == "ok"));
    let mut ids: Vec<&str> = attempts
        .iter()
        .map(|a| a["delivery_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    let mut seen: Vec<String> = hooks.iter().map(|h| h.id()).collect();
    seen.sort_unstable();
    assert_eq!(ids, seen, "the ids the receiver saw");
    let failed = cli(
        Some(&db.url),
        &[
            "--config",
            file.arg(),
            "deliveries",
            "list",
            "--status",
            "failed",
            "--since",
            "1h",
        ],
    )
    .await;
    assert_eq!(failed.code, Some(0), "{}", failed.all());
    assert!(
        failed.stdout.contains("no attempts recorded"),
        "{}",
        failed.stdout
    );
    let explained = cli(
        Some(&db.url),
        &[
            "--config",
            file.arg(),
            "explain",
            "--sequence",
            &sequences[2].to_string(),
        ],
    )
    .await;
    assert_eq!(explained.code, Some(0), "{}", explained.all());
    let attempt_line = explained
        .stdout
        .lines()
        .find(|l| l.contains("webhook[0]"))
        .unwrap_or_else(|| panic!("{}", explained.stdout));
    assert!(
        attempt_line.contains("big") && attempt_line.contains(" ok "),
        "{}",
        explained.stdout
    );
    assert!(
        explained.stdout.contains("big: FIRES"),
        "{}",
        explained.stdout
    );

    // Pruned by age: a day keeps them, zero seconds removes them.
    fraiseql_observers::listener::checkpoint::claim(
        &client,
        "replay",
        fraiseql_observers::StartPosition::Now,
    )
    .await
    .unwrap();
    let kept = cli(
        Some(&db.url),
        &[
            "prune",
            "--older-than",
            "7d",
            "--deliveries-older-than",
            "1d",
        ],
    )
    .await;
    assert_eq!(kept.code, Some(0), "{}", kept.all());
    assert!(
        kept.stdout.contains("deleted 0 delivery-log rows"),
        "{}",
        kept.stdout
    );
    let pruned = cli(
        Some(&db.url),
        &[
            "prune",
            "--older-than",
            "7d",
            "--deliveries-older-than",
            "0s",
        ],
    )
    .await;
    assert_eq!(pruned.code, Some(0), "{}", pruned.all());
    assert!(
        pruned.stdout.contains("deleted 2 delivery-log rows"),
        "{}",
        pruned.stdout
    );
}

/// The README's main command: the demo, against this server (it creates and drops a database of
/// its own), shows changes becoming signed webhooks.
#[tokio::test]
async fn the_demo_delivers_signed_webhooks_and_cleans_up() {
    let admin = fraiseql_observers::testing::admin_url();
    let out = cli(Some(&admin), &["demo"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(
        out.stdout.contains("3 deliveries accepted"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("signature valid"), "{}", out.stdout);
    assert!(!out.stdout.contains("INVALID"), "{}", out.stdout);
    let client = fraiseql_observers::testing::connect(&admin).await;
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'fraiseql_observers_demo%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the demo database is dropped");
}
