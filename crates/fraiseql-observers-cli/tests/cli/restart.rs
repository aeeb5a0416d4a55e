//! PostgreSQL restarted under a writer while the daemon runs: a private throwaway cluster
//! (initdb + pg_ctl on a free port in a temp dir), restarted with `-m immediate` and then
//! `-m fast`. The same process keeps going (it contends for the lead again after each restart),
//! no committed change is lost, and first deliveries arrive in commit order per entity.

use crate::harness::{
    check_at_least_once, config, free_port, healthz, wait_all_delivered, ConfigFile, Daemon, Setup,
    TENANT,
};
use fraiseql_observers::testing::{eventually, Cluster, TestServer};
use serde_json::json;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Writes one change per transaction for a fixed set of entities, reconnecting whenever the
/// server goes away. What was committed is read back from the log afterwards (a commit whose
/// answer was lost may or may not have happened).
struct Writer {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<u64>,
}

impl Writer {
    fn start(url: String, entities: usize) -> Writer {
        let ids: Vec<Uuid> = (0..entities).map(|_| Uuid::new_v4()).collect();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut client: Option<tokio_postgres::Client> = None;
            let mut attempts = 0u64;
            while !*stopped.borrow() {
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    client = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                        Ok((c, connection)) => {
                            tokio::spawn(connection);
                            Some(c)
                        }
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    };
                }
                attempts += 1;
                let entity = ids[attempts as usize % ids.len()];
                let envelope = json!({"before": null, "after": {"n": attempts}, "op": "c",
                    "source": {"schema": "public", "table": "tb_item"}});
                let _ = client
                    .as_ref()
                    .unwrap()
                    .execute(
                        "INSERT INTO core.tb_entity_change_log
                             (fk_customer_org, object_type, object_id, modification_type, change_status, object_data)
                         VALUES ($1::text::uuid, 'Item', $2, 'INSERT', 'new', $3)",
                        &[&TENANT, &entity, &envelope],
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            attempts
        });
        Writer { stop, task }
    }

    async fn finish(self) -> u64 {
        self.stop.send_replace(true);
        self.task.await.unwrap()
    }
}

/// The consumer's fencing epoch (bumped by every new lead), when the server answers.
async fn epoch(url: &str) -> Option<i64> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT epoch FROM core.observer_checkpoints WHERE consumer_id = 'restarts'",
            &[],
        )
        .await
        .ok()?;
    Some(row.get(0))
}

async fn leads_healthily(port: u16) -> bool {
    matches!(healthz(port).await, Some((200, body)) if body["role"] == "leader")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_survives_postgresql_restarts_under_a_writer() {
    let started = Instant::now();
    let cluster = Cluster::start();
    let url = cluster.url("postgres");
    {
        let (mut client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        fraiseql_observers::migrate::run(&mut client).await.unwrap();
    }
    let receiver = TestServer::start().await;
    let hook = receiver.url("/hook");
    let port = free_port();
    let file = ConfigFile::new(&config(&Setup {
        metrics_port: Some(port),
        ..Setup::new("restarts", &hook)
    }));
    let mut daemon = Daemon::start(&url, &file.path);
    eventually(Duration::from_secs(10), "the daemon to lead", || async {
        leads_healthily(port).await.then_some(())
    })
    .await;

    let writer = Writer::start(url.clone(), 20);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut pauses = Vec::new();
    for mode in ["immediate", "fast"] {
        let before = epoch(&url).await.expect("the consumer's epoch");
        let restarted = Instant::now();
        cluster.restart(mode);
        // Leading again: a new lead (a new epoch), healthy.
        eventually(
            Duration::from_secs(20),
            "the daemon to lead again after the restart",
            || {
                let url = url.clone();
                async move {
                    let again = epoch(&url).await.is_some_and(|e| e > before);
                    (again && leads_healthily(port).await).then_some(())
                }
            },
        )
        .await;
        pauses.push((mode, restarted.elapsed()));
        assert!(
            daemon.try_exit().is_none(),
            "the daemon exited on a restart -m {mode}; log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let attempts = writer.finish().await;

    let client = fraiseql_observers::testing::connect(&url).await;
    let committed: Vec<(i64, Uuid)> = client
        .query(
            "SELECT id, object_id FROM core.tb_entity_change_log ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    wait_all_delivered(&receiver, &committed, Duration::from_secs(20)).await;
    let report = check_at_least_once(&committed, &receiver.accepted());
    assert!(daemon.try_exit().is_none(), "log:\n{}", daemon.log());
    assert!(
        daemon.log().contains("contending again"),
        "log:\n{}",
        daemon.log()
    );
    eprintln!(
        "{} changes committed ({attempts} attempted), all delivered, {} twice; \
         leading again after: {pauses:?}; test took {:?}",
        committed.len(),
        report.duplicated.len(),
        started.elapsed()
    );

    daemon.signal("TERM");
    assert_eq!(
        daemon.exit(Duration::from_secs(15)).await.code(),
        Some(0),
        "log:\n{}",
        daemon.log()
    );
}
