//! PostgreSQL restarted under a writer while the daemon runs: a private throwaway cluster
//! (initdb + pg_ctl on a free port in a temp dir), restarted with `-m immediate` and then
//! `-m fast`. The same process keeps going (it contends for the lead again after each restart),
//! no committed change is lost, and first deliveries arrive in commit order per entity.

use crate::harness::{
    check_at_least_once, config, free_port, healthz, wait_all_delivered, ConfigFile, Daemon, Setup,
    TENANT,
};
use fraiseql_observers::testing::{eventually, TestServer};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// A throwaway cluster, stopped and removed when dropped.
pub struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
}

impl Cluster {
    pub fn start() -> Cluster {
        let bin = postgres_bin().expect(
            "PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin",
        );
        let dir = std::env::temp_dir().join(format!(
            "fraiseql-observers-restart-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            // initdb refuses to run as root: the cluster belongs to the postgres user.
            assert!(Command::new("chown")
                .arg("postgres")
                .arg(&dir)
                .status()
                .unwrap()
                .success());
        }
        let cluster = Cluster {
            dir,
            bin,
            port: free_port(),
        };
        let data = cluster.data();
        cluster.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            cluster.port,
            cluster.dir.display()
        );
        let log = cluster.dir.join("log").to_string_lossy().into_owned();
        cluster.run(
            "pg_ctl",
            &["-D", &data, "-o", &options, "-l", &log, "-w", "start"],
        );
        cluster
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl restart -m <mode>`, waiting until the server accepts connections again.
    pub fn restart(&self, mode: &str) {
        let data = self.data();
        // The log again: the new server would otherwise write to (and hold open) our pipe.
        let log = self.dir.join("log").to_string_lossy().into_owned();
        self.run(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-m", mode, "-w", "restart"],
        );
    }

    fn data(&self) -> String {
        self.dir.join("data").to_string_lossy().into_owned()
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let program = self.bin.join(tool);
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        let output = command.args(args).output().expect("run a PostgreSQL tool");
        assert!(
            output.status.success(),
            "{tool} {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.data();
        let program = self.bin.join("pg_ctl");
        let args = ["-D", &data, "-m", "immediate", "-w", "stop"];
        let _ = if is_root() {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&program)
                .args(args)
                .output()
        } else {
            Command::new(&program).args(args).output()
        };
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn postgres_bin() -> Option<PathBuf> {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev());
    }
    // Debian's /usr/bin/pg_ctl* are wrappers; prefer the real binaries when both exist.
    candidates
        .into_iter()
        .filter(|d| has_tools(d))
        .max_by_key(|d| d.starts_with("/usr/lib/postgresql"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

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
    let url = cluster.url();
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
