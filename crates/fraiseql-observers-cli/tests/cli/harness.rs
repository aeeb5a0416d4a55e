//! Driving the real binary: spawn it (`CARGO_BIN_EXE_fraiseql-observers`), signal it, read its
//! output; write configuration files; write change-log rows as FraiseQL would.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_postgres::Client;
use uuid::Uuid;

pub const BIN: &str = env!("CARGO_BIN_EXE_fraiseql-observers");
pub const TENANT: &str = "6f9619ff-8b86-d011-b42d-00c04fc964ff";

/// The output of one finished command.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Run the binary to completion (bounded) with `args`, against `database_url` (when given).
pub async fn cli(database_url: Option<&str>, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(BIN);
    command
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG")
        .kill_on_drop(true);
    if let Some(url) = database_url {
        command.arg("--database-url").arg(url);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .unwrap_or_else(|_| panic!("fraiseql-observers {args:?} did not finish within 30 s"))
        .expect("run the binary");
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A configuration file in the temp directory, removed when dropped.
pub struct ConfigFile {
    pub path: PathBuf,
}

impl ConfigFile {
    pub fn new(text: &str) -> ConfigFile {
        let path = std::env::temp_dir().join(format!(
            "fraiseql-observers-test-{}-{}.toml",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::write(&path, text).expect("write the configuration");
        ConfigFile { path }
    }

    pub fn arg(&self) -> &str {
        self.path.to_str().expect("utf-8 temp path")
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A fresh port on 127.0.0.1 for a daemon's `metrics_address`.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Settings of [`config`].
pub struct Setup<'a> {
    pub consumer: &'a str,
    pub hook_url: &'a str,
    pub metrics_port: Option<u16>,
    /// Sent as the `x-instance` header, to tell daemons apart at the receiver.
    pub instance: &'a str,
    pub concurrency: usize,
    pub shutdown_timeout_ms: u64,
}

impl<'a> Setup<'a> {
    pub fn new(consumer: &'a str, hook_url: &'a str) -> Setup<'a> {
        Setup {
            consumer,
            hook_url,
            metrics_port: None,
            instance: "a",
            concurrency: 8,
            shutdown_timeout_ms: 10_000,
        }
    }
}

/// A daemon configuration: one observer `all` on every `Item` insert and update, delivering the
/// default webhook body to `hook_url`; quick polls, checkpoints and retries.
pub fn config(s: &Setup<'_>) -> String {
    let metrics = s
        .metrics_port
        .map(|p| format!("metrics_address = \"127.0.0.1:{p}\""))
        .unwrap_or_default();
    format!(
        r#"
[observers.runtime]
consumer_id = "{consumer}"
start_position = "beginning"
poll_interval_ms = 20
checkpoint_interval_ms = 50
retry_poll_interval_ms = 50
shutdown_timeout_ms = {shutdown}
concurrency = {concurrency}
{metrics}

[observers.all]
entity = "Item"
event_type = ["INSERT", "UPDATE"]
retry = {{ max_attempts = 20, initial_delay_ms = 20, max_delay_ms = 200, jitter = false }}

[[observers.all.actions]]
type = "webhook"
url = "{hook}"
headers = {{ "x-instance" = "{instance}" }}
allow_private_networks = true
"#,
        consumer = s.consumer,
        shutdown = s.shutdown_timeout_ms,
        concurrency = s.concurrency,
        hook = s.hook_url,
        instance = s.instance,
    )
}

/// A running `fraiseql-observers run`. Killed (SIGKILL) if still running when dropped.
pub struct Daemon {
    child: tokio::process::Child,
    log: Arc<Mutex<String>>,
}

impl Daemon {
    pub fn start(database_url: &str, config: &Path) -> Daemon {
        Daemon::start_with(database_url, config, &[])
    }

    /// [`start`](Self::start) with more arguments to `run` (`--role worker`).
    pub fn start_with(database_url: &str, config: &Path, args: &[&str]) -> Daemon {
        let mut child = tokio::process::Command::new(BIN)
            .arg("run")
            .args(args)
            .arg("--config")
            .arg(config)
            .arg("--database-url")
            .arg(database_url)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the daemon");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Daemon { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the daemon is running")
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub async fn wait_for_log(&self, needle: &str, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while !self.log().contains(needle) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the daemon did not log {needle:?} within {within:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    pub async fn sigkill(&mut self) {
        self.child.start_kill().expect("SIGKILL");
        self.child.wait().await.expect("reap the daemon");
    }

    /// Wait (bounded) for the daemon to exit.
    pub async fn exit(&mut self, within: Duration) -> ExitStatus {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.expect("wait for the daemon"),
            Err(_) => panic!(
                "the daemon did not exit within {within:?}; log:\n{}",
                self.log()
            ),
        }
    }

    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("poll the daemon")
    }
}

/// Write one change-log row for `entity` as a FraiseQL mutation would (Debezium envelope).
/// Returns its sequence.
pub async fn insert_change(client: &Client, entity: Uuid, op: &str, after: Value) -> i64 {
    let (modification, status) = match op {
        "c" => ("INSERT", "new"),
        "u" => ("UPDATE", "updated"),
        "d" => ("DELETE", "deleted"),
        _ => ("NOOP", "noop:unchanged"),
    };
    let envelope = json!({"before": null, "after": after, "op": op,
        "source": {"schema": "public", "table": "tb_item"}});
    client
        .query_one(
            "INSERT INTO core.tb_entity_change_log
                 (fk_customer_org, object_type, object_id, modification_type, change_status, object_data)
             VALUES ($1::text::uuid, 'Item', $2, $3, $4, $5) RETURNING id",
            &[&TENANT, &entity, &modification, &status, &envelope],
        )
        .await
        .expect("insert change")
        .get(0)
}

/// GET `http://127.0.0.1:{port}{path}`: (status, body). `None` while nothing listens.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let response = reqwest::Client::builder()
        .no_proxy()
        .build()
        .ok()?
        .get(format!("http://127.0.0.1:{port}{path}"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// `/healthz` as JSON with its status code.
pub async fn healthz(port: u16) -> Option<(u16, Value)> {
    let (status, body) = http_get(port, "/healthz").await?;
    Some((
        status,
        serde_json::from_str(&body).expect("/healthz answers JSON"),
    ))
}

/// Writes change-log rows continuously, one transaction each, for a fixed set of entities picked
/// by a seeded generator, and records what was committed.
pub struct Writer {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<(i64, Uuid)>>,
}

impl Writer {
    pub async fn start(database_url: &str, entities: usize, seed: u64, every: Duration) -> Writer {
        use rand::{Rng, SeedableRng};
        let client = fraiseql_observers::testing::connect(database_url).await;
        let ids: Vec<Uuid> = (0..entities).map(|_| Uuid::new_v4()).collect();
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut committed = Vec::new();
            let mut n = 0u64;
            while !*stopped.borrow() {
                let entity = ids[rng.random_range(0..ids.len())];
                n += 1;
                let op = if n.is_multiple_of(3) { "u" } else { "c" };
                let sequence = insert_change(&client, entity, op, json!({"n": n})).await;
                committed.push((sequence, entity));
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stopped.changed() => {}
                }
            }
            committed
        });
        Writer { stop, task }
    }

    /// Stop writing; every (sequence, entity) committed, in commit order.
    pub async fn finish(self) -> Vec<(i64, Uuid)> {
        self.stop.send_replace(true);
        self.task.await.expect("the writer task")
    }
}

/// What [`check_at_least_once`] found.
#[derive(Debug)]
pub struct Deliveries {
    /// Sequences delivered more than once.
    pub duplicated: Vec<i64>,
}

/// Wait up to `within` until every row in `committed` has been accepted by `receiver`.
pub async fn wait_all_delivered(
    receiver: &fraiseql_observers::testing::TestServer,
    committed: &[(i64, Uuid)],
    within: Duration,
) {
    let wanted: std::collections::HashSet<i64> = committed.iter().map(|(s, _)| *s).collect();
    fraiseql_observers::testing::eventually(within, "every committed change delivered", || {
        let got: std::collections::HashSet<i64> =
            receiver.accepted().iter().map(|h| h.sequence()).collect();
        let done = wanted.is_subset(&got);
        async move { done.then_some(()) }
    })
    .await;
}

/// Assert the delivery guarantees over `accepted` (the receiver's 2xx answers, in arrival
/// order) for every row in `committed`: each delivered at least once; every delivery of one
/// event carries the same `webhook-id`, and different events different ids; per entity, first
/// deliveries arrive in ascending sequence.
pub fn check_at_least_once(
    committed: &[(i64, Uuid)],
    accepted: &[fraiseql_observers::testing::Request],
) -> Deliveries {
    use std::collections::{BTreeMap, HashMap, HashSet};
    let mut ids: BTreeMap<i64, HashSet<String>> = BTreeMap::new();
    let mut first: HashMap<String, Vec<i64>> = HashMap::new();
    let mut seen = HashSet::new();
    let mut count: HashMap<i64, usize> = HashMap::new();
    for hook in accepted {
        let sequence = hook.sequence();
        ids.entry(sequence).or_default().insert(hook.id());
        *count.entry(sequence).or_default() += 1;
        if seen.insert(sequence) {
            first.entry(hook.entity()).or_default().push(sequence);
        }
    }
    let missing: Vec<i64> = committed
        .iter()
        .map(|(s, _)| *s)
        .filter(|s| !ids.contains_key(s))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} committed changes never delivered: {missing:?}",
        missing.len(),
        committed.len()
    );
    for (sequence, set) in &ids {
        assert_eq!(
            set.len(),
            1,
            "sequence {sequence} was delivered with different ids: {set:?}"
        );
    }
    let distinct: HashSet<&String> = ids.values().flatten().collect();
    assert_eq!(distinct.len(), ids.len(), "two events share a delivery id");
    for (sequence, entity) in committed {
        let hook_entity = accepted
            .iter()
            .find(|h| h.sequence() == *sequence)
            .map(|h| h.entity())
            .unwrap();
        assert_eq!(hook_entity, entity.to_string(), "sequence {sequence}");
    }
    for (entity, sequences) in &first {
        assert!(
            sequences.windows(2).all(|w| w[0] < w[1]),
            "first deliveries of entity {entity} out of order: {sequences:?}"
        );
    }
    let mut duplicated: Vec<i64> = count
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(s, _)| s)
        .collect();
    duplicated.sort();
    Deliveries { duplicated }
}
