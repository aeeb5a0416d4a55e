//! Two daemons on one consumer: one leads, the other stands by (and says so at /healthz); the
//! leader is SIGKILLed mid-stream and the standby takes over within a few seconds; nothing is
//! lost, and only events in flight at the kill are delivered again, with the same ids.

use crate::harness::{
    check_at_least_once, config, free_port, healthz, wait_all_delivered, ConfigFile, Daemon, Setup,
    Writer,
};
use fraiseql_observers::testing::TestServer;
use fraiseql_observers::testing::{eventually, TestDb};
use std::time::{Duration, Instant};

async fn role(port: u16) -> Option<(u16, String)> {
    let (status, body) = healthz(port).await?;
    Some((status, body["role"].as_str()?.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_takes_over_when_the_leader_is_killed() {
    let db = TestDb::new().await;
    let receiver = TestServer::start().await;
    let hook = receiver.url("/hook");
    let (port_a, port_b) = (free_port(), free_port());
    let file_a = ConfigFile::new(&config(&Setup {
        metrics_port: Some(port_a),
        instance: "a",
        ..Setup::new("shared", &hook)
    }));
    let file_b = ConfigFile::new(&config(&Setup {
        metrics_port: Some(port_b),
        instance: "b",
        ..Setup::new("shared", &hook)
    }));

    let mut a = Daemon::start(&db.url, &file_a.path);
    eventually(Duration::from_secs(10), "A to lead", || async {
        (role(port_a).await == Some((200, "leader".into()))).then_some(())
    })
    .await;
    let mut b = Daemon::start(&db.url, &file_b.path);
    eventually(Duration::from_secs(10), "B to stand by", || async {
        (role(port_b).await == Some((200, "standby".into()))).then_some(())
    })
    .await;
    b.wait_for_log(
        "standby: another instance leads consumer shared",
        Duration::from_secs(5),
    )
    .await;

    let writer = Writer::start(&db.url, 20, 7, Duration::from_millis(5)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before_kill = receiver.accepted();
    assert!(!before_kill.is_empty(), "A delivered nothing");
    assert!(
        before_kill.iter().all(|h| h.header("x-instance") == "a"),
        "the standby delivered while A led"
    );

    let killed_at = Instant::now();
    a.sigkill().await;
    eventually(Duration::from_secs(5), "B to take over", || async {
        (role(port_b).await == Some((200, "leader".into()))).then_some(())
    })
    .await;
    let takeover = killed_at.elapsed();
    eprintln!("B took over {takeover:?} after the kill");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let committed = writer.finish().await;

    wait_all_delivered(&receiver, &committed, Duration::from_secs(20)).await;
    let accepted = receiver.accepted();
    let report = check_at_least_once(&committed, &accepted);
    assert!(accepted.iter().any(|h| h.header("x-instance") == "b"));
    // Only what A had in flight is sent twice: first by A just before the kill, then by B.
    for sequence in &report.duplicated {
        let copies: Vec<_> = accepted
            .iter()
            .filter(|h| h.sequence() == *sequence)
            .collect();
        assert_eq!(copies[0].header("x-instance"), "a", "sequence {sequence}");
        assert!(
            killed_at.duration_since(copies[0].at) < Duration::from_secs(1),
            "sequence {sequence} was delivered {:?} before the kill and again after it",
            killed_at.duration_since(copies[0].at)
        );
        assert!(copies[1..].iter().all(|h| h.header("x-instance") == "b"));
    }
    eprintln!(
        "{} changes, {} delivered twice (in flight at the kill)",
        committed.len(),
        report.duplicated.len()
    );

    b.signal("TERM");
    assert_eq!(
        b.exit(Duration::from_secs(15)).await.code(),
        Some(0),
        "log:\n{}",
        b.log()
    );
}

/// How a daemon under test loses its lead.
#[derive(Clone, Copy)]
enum Loss {
    /// Its lock connection is terminated.
    LockConnection,
    /// Another instance claims the consumer (the epoch moves on); noticed at its next write.
    Fenced,
}

async fn lose_the_lead(client: &tokio_postgres::Client, consumer: &str, loss: Loss) {
    match loss {
        Loss::LockConnection => {
            let terminated: i64 = client
                .query_one(
                    "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                      WHERE application_name = 'fraiseql-observers-leader:' || $1
                        AND datname = current_database()) t",
                    &[&consumer],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(terminated, 1);
        }
        Loss::Fenced => {
            client
                .execute(
                    "UPDATE core.observer_checkpoints SET epoch = epoch + 1 WHERE consumer_id = $1",
                    &[&consumer],
                )
                .await
                .unwrap();
            crate::harness::insert_change(client, uuid::Uuid::new_v4(), "c", serde_json::json!({}))
                .await;
        }
    }
}

/// With `exit_on_lost_lead = true`, a lost lead stops the daemon at once with exit code 1.
async fn exits_on(loss: Loss, consumer: &str, message: &str) {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = TestServer::start().await;
    let hook = receiver.url("/hook");
    let file = ConfigFile::new(&config(&Setup::new(consumer, &hook)).replace(
        "[observers.runtime]\n",
        "[observers.runtime]\nexit_on_lost_lead = true\n",
    ));
    let mut daemon = Daemon::start(&db.url, &file.path);
    daemon
        .wait_for_log("change-log listener started", Duration::from_secs(10))
        .await;
    lose_the_lead(&client, consumer, loss).await;
    let status = daemon.exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(1), "log:\n{}", daemon.log());
    assert!(daemon.log().contains(message), "log:\n{}", daemon.log());
}

/// By default a lost lead is contended again in the same process: /healthz says
/// `reconnecting` (503) meanwhile, the lead comes back with a new epoch, and delivery resumes.
async fn recontends_after(loss: Loss, consumer: &str) {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = TestServer::start().await;
    let hook = receiver.url("/hook");
    let port = free_port();
    let file = ConfigFile::new(&config(&Setup {
        metrics_port: Some(port),
        ..Setup::new(consumer, &hook)
    }));
    let mut daemon = Daemon::start(&db.url, &file.path);
    eventually(Duration::from_secs(10), "the daemon to lead", || async {
        (role(port).await == Some((200, "leader".into()))).then_some(())
    })
    .await;
    let before: i64 = client
        .query_one(
            "SELECT epoch FROM core.observer_checkpoints WHERE consumer_id = $1",
            &[&consumer],
        )
        .await
        .unwrap()
        .get(0);
    lose_the_lead(&client, consumer, loss).await;
    daemon
        .wait_for_log(
            &format!("lost the lead of consumer {consumer}: stopped at once; contending again"),
            Duration::from_secs(10),
        )
        .await;
    eventually(
        Duration::from_secs(10),
        "the daemon to lead again",
        || async { (role(port).await == Some((200, "leader".into()))).then_some(()) },
    )
    .await;
    assert!(daemon.try_exit().is_none(), "log:\n{}", daemon.log());
    let after: i64 = client
        .query_one(
            "SELECT epoch FROM core.observer_checkpoints WHERE consumer_id = $1",
            &[&consumer],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        after > before + (matches!(loss, Loss::Fenced) as i64),
        "epoch {before} -> {after}"
    );
    let sequence =
        crate::harness::insert_change(&client, uuid::Uuid::new_v4(), "c", serde_json::json!({}))
            .await;
    eventually(
        Duration::from_secs(10),
        "delivery after the new lead",
        || {
            let got = receiver.accepted().iter().any(|h| h.sequence() == sequence);
            async move { got.then_some(()) }
        },
    )
    .await;
    let (_, metrics) = crate::harness::http_get(port, "/metrics").await.unwrap();
    assert!(
        metrics.contains("fraiseql_observers_lost_leads_total 1"),
        "{metrics}"
    );
    daemon.signal("TERM");
    assert_eq!(
        daemon.exit(Duration::from_secs(15)).await.code(),
        Some(0),
        "log:\n{}",
        daemon.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_loses_its_lock_connection_stops_at_once_and_contends_again() {
    recontends_after(Loss::LockConnection, "lost").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_daemon_stops_at_its_next_write_and_contends_again() {
    recontends_after(Loss::Fenced, "fenced").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_exit_on_lost_lead_a_daemon_that_loses_its_lock_connection_exits_non_zero() {
    exits_on(
        Loss::LockConnection,
        "lost",
        "lost the lead of consumer 'lost'",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_exit_on_lost_lead_a_fenced_daemon_exits_non_zero() {
    exits_on(
        Loss::Fenced,
        "fenced",
        "consumer 'fenced' is led by another instance now",
    )
    .await;
}
