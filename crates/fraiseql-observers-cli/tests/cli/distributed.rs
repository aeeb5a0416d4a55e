//! Distributed delivery with real processes: a reader (`run --role reader`, and a standby one)
//! and three workers (`run --role worker`) under a steady writer, against the real nats-server.
//! A worker SIGKILLed, the reader SIGKILLed, nats-server restarted, a worker and the reader
//! reloaded (SIGHUP): nothing committed is lost, first deliveries per entity ascend, a repeat
//! carries the first delivery's id.
//!
//! The machine's nats-server (127.0.0.1:4222) is never restarted: the restart test starts one of
//! its own, on a free port, with its own store directory. Streams have random names and are
//! deleted at the end.

use crate::harness::{
    check_at_least_once, cli, config, free_port, healthz, insert_change, wait_all_delivered,
    ConfigFile, Daemon, Setup, Writer,
};
use fraiseql_observers::testing::{eventually, TestDb, TestServer};
use std::time::{Duration, Instant};

const PARTITIONS: u32 = 12;

/// The harness configuration (observer `all` on `Item`) with a `[distributed]` section of its own
/// stream on `nats_url`, and `/healthz` on `port`.
fn distributed_config(
    consumer: &str,
    hook: &str,
    nats_url: &str,
    stream: &str,
    port: u16,
) -> String {
    let mut setup = Setup::new(consumer, hook);
    setup.metrics_port = Some(port);
    format!(
        r#"
[distributed]
nats_url = "{nats_url}"
stream = "{stream}"
subject_prefix = "{prefix}"
partitions = {PARTITIONS}
{base}"#,
        prefix = stream.to_lowercase().replace('_', "-"),
        base = config(&setup),
    )
}

/// One process: its configuration file, its `/healthz` port, the process.
struct Process {
    file: ConfigFile,
    port: u16,
    daemon: Daemon,
}

struct Cluster {
    db_url: String,
    hook: String,
    nats_url: String,
    stream: String,
    consumer: String,
}

impl Cluster {
    fn start(&self, args: &[&str]) -> Process {
        let port = free_port();
        let file = ConfigFile::new(&distributed_config(
            &self.consumer,
            &self.hook,
            &self.nats_url,
            &self.stream,
            port,
        ));
        let daemon = Daemon::start_with(&self.db_url, &file.path, args);
        Process { file, port, daemon }
    }

    fn worker(&self, name: &str) -> Process {
        self.start(&["--role", "worker", "--worker-id", name])
    }

    fn reader(&self) -> Process {
        self.start(&["--role", "reader"])
    }
}

/// The partitions a worker reports owning (`None` while it does not answer).
async fn partitions(port: u16) -> Option<Vec<u32>> {
    let (_, body) = healthz(port).await?;
    Some(
        body["partitions"]
            .as_array()?
            .iter()
            .filter_map(|p| p.as_u64().map(|p| p as u32))
            .collect(),
    )
}

/// Wait until `workers` together own every partition, each at least one.
async fn wait_spread(workers: &[&Process], within: Duration) {
    eventually(
        within,
        "every partition owned by the live workers",
        || async {
            let mut all = Vec::new();
            for w in workers {
                let owned = partitions(w.port).await?;
                if owned.is_empty() {
                    return None;
                }
                all.extend(owned);
            }
            all.sort();
            (all == (0..PARTITIONS).collect::<Vec<_>>()).then_some(())
        },
    )
    .await;
}

async fn delete_stream(nats_url: &str, stream: &str) {
    if let Ok(client) = async_nats::connect(nats_url).await {
        let _ = async_nats::jetstream::new(client)
            .delete_stream(stream)
            .await;
    }
}

impl Cluster {
    /// A cluster of `db`, delivering to `receiver`, over the NATS server at `nats_url`, with a
    /// stream and a consumer named after `tag` (random, so tests never share them).
    fn new(db: &TestDb, receiver: &TestServer, tag: &str, nats_url: String) -> Cluster {
        let n = rand::random::<u32>();
        Cluster {
            db_url: db.url.clone(),
            hook: receiver.url("/hook"),
            nats_url,
            stream: format!("FO_DIST_{tag}_{n}"),
            consumer: format!("dist-{tag}-{n}"),
        }
    }
}

/// Wait until the receiver accepted more than `n` deliveries.
async fn flowing(receiver: &TestServer, n: usize) {
    eventually(Duration::from_secs(30), "deliveries flowing", || {
        let accepted = receiver.accepted().len();
        async move { (accepted > n).then_some(()) }
    })
    .await;
}

/// Wait until every committed change arrived, then check: none lost, first deliveries in commit
/// order per entity, repeats only with the first delivery's id.
async fn all_delivered(receiver: &TestServer, committed: &[(i64, uuid::Uuid)], timeout: Duration) {
    wait_all_delivered(receiver, committed, timeout).await;
    let accepted = receiver.accepted();
    let report = check_at_least_once(committed, &accepted);
    eprintln!(
        "{} changes, {} deliveries, {} delivered more than once",
        committed.len(),
        accepted.len(),
        report.duplicated.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_loses_nothing_and_its_partitions_are_taken_over() {
    let db = TestDb::new().await;
    let receiver = TestServer::start().await;
    let cluster = Cluster::new(&db, &receiver, "KILLW", "nats://127.0.0.1:4222".into());
    let reader = cluster.reader();
    let mut workers: Vec<Process> = (0..3).map(|i| cluster.worker(&format!("w{i}"))).collect();
    wait_spread(&workers.iter().collect::<Vec<_>>(), Duration::from_secs(30)).await;

    let writer = Writer::start(&db.url, 40, 0xD157, Duration::from_millis(3)).await;
    flowing(&receiver, 100).await;
    let victim = workers.remove(1);
    let owned_by_victim = partitions(victim.port).await.unwrap_or_default();
    let mut victim = victim;
    victim.daemon.sigkill().await;
    let killed = Instant::now();
    let at_kill = receiver.accepted().len();
    wait_spread(&workers.iter().collect::<Vec<_>>(), Duration::from_secs(11)).await;
    let takeover = killed.elapsed();
    eprintln!(
        "worker w1 (partitions {owned_by_victim:?}) SIGKILLed: its partitions taken over in {takeover:?}"
    );
    // Deliveries go on after the takeover, the writer still writing.
    flowing(&receiver, at_kill + 100).await;
    let committed = writer.finish().await;
    all_delivered(&receiver, &committed, Duration::from_secs(60)).await;
    assert!(
        reader.daemon.log().contains("leading consumer"),
        "{}",
        reader.daemon.log()
    );
    drop(workers);
    drop(reader);
    delete_stream(&cluster.nats_url, &cluster.stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_reader_is_replaced_by_its_standby_and_nothing_is_lost() {
    let db = TestDb::new().await;
    let receiver = TestServer::start().await;
    let cluster = Cluster::new(&db, &receiver, "KILLR", "nats://127.0.0.1:4222".into());
    let mut first = cluster.reader();
    first
        .daemon
        .wait_for_log("leading consumer", Duration::from_secs(20))
        .await;
    let standby = cluster.reader();
    standby
        .daemon
        .wait_for_log("standby: another instance leads", Duration::from_secs(20))
        .await;
    let workers: Vec<Process> = (0..3).map(|i| cluster.worker(&format!("w{i}"))).collect();
    wait_spread(&workers.iter().collect::<Vec<_>>(), Duration::from_secs(30)).await;

    let writer = Writer::start(&db.url, 40, 0xD158, Duration::from_millis(3)).await;
    flowing(&receiver, 100).await;
    first.daemon.sigkill().await;
    standby
        .daemon
        .wait_for_log("leading consumer", Duration::from_secs(15))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let committed = writer.finish().await;
    all_delivered(&receiver, &committed, Duration::from_secs(60)).await;
    drop(workers);
    drop(standby);
    delete_stream(&cluster.nats_url, &cluster.stream).await;
}

/// A nats-server of this test's own: a free port, JetStream in its own store directory.
struct OwnNats {
    port: u16,
    store: std::path::PathBuf,
    child: Option<tokio::process::Child>,
}

impl OwnNats {
    fn start(port: u16, store: &std::path::Path) -> OwnNats {
        let mut nats = OwnNats {
            port,
            store: store.to_path_buf(),
            child: None,
        };
        nats.spawn();
        nats
    }

    fn spawn(&mut self) {
        let child = tokio::process::Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&self.store)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("nats-server on PATH");
        self.child = Some(child);
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().unwrap();
            child.wait().await.unwrap();
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_nats_server_loses_nothing() {
    let db = TestDb::new().await;
    let receiver = TestServer::start().await;
    let store = std::env::temp_dir().join(format!("fo-nats-{}", rand::random::<u64>()));
    let mut nats = OwnNats::start(free_port(), &store);
    let cluster = Cluster::new(&db, &receiver, "NATS", nats.url());
    let reader = cluster.reader();
    let workers: Vec<Process> = (0..3).map(|i| cluster.worker(&format!("w{i}"))).collect();
    wait_spread(&workers.iter().collect::<Vec<_>>(), Duration::from_secs(30)).await;

    let writer = Writer::start(&db.url, 40, 0xD159, Duration::from_millis(3)).await;
    flowing(&receiver, 100).await;
    nats.kill().await;
    let during = receiver.accepted().len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.spawn();
    flowing(&receiver, during + 100).await;
    let committed = writer.finish().await;
    all_delivered(&receiver, &committed, Duration::from_secs(90)).await;
    drop(workers);
    drop(reader);
    nats.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_worker_and_the_reader_and_nothing_is_lost() {
    let db = TestDb::new().await;
    let receiver = TestServer::start().await;
    let cluster = Cluster::new(&db, &receiver, "RELOAD", "nats://127.0.0.1:4222".into());
    let reader = cluster.reader();
    let worker = cluster.worker("w0");
    wait_spread(&[&worker], Duration::from_secs(30)).await;
    let writer = Writer::start(&db.url, 40, 0xD15A, Duration::from_millis(3)).await;
    flowing(&receiver, 100).await;

    // The worker's file now sends the observer to /new; SIGHUP.
    let on = |path: &str| {
        receiver
            .accepted()
            .into_iter()
            .filter(|r| r.path() == path)
            .collect::<Vec<_>>()
    };
    let new_text = distributed_config(
        &cluster.consumer,
        &receiver.url("/new"),
        &cluster.nats_url,
        &cluster.stream,
        worker.port,
    );
    std::fs::write(&worker.file.path, &new_text).unwrap();
    worker.daemon.signal("HUP");
    worker
        .daemon
        .wait_for_log(
            "partition drained and started again with the reloaded configuration",
            Duration::from_secs(30),
        )
        .await;
    eventually(Duration::from_secs(30), "deliveries at the new URL", || {
        let n = on("/new").len();
        async move { (n > 50).then_some(()) }
    })
    .await;

    // A bad file is refused; the worker keeps delivering with the reloaded configuration.
    std::fs::write(
        &worker.file.path,
        format!("{new_text}[observers.broken]\nentity = 1\n"),
    )
    .unwrap();
    worker.daemon.signal("HUP");
    worker
        .daemon
        .wait_for_log("configuration reload refused", Duration::from_secs(30))
        .await;
    let before = on("/new").len();
    eventually(
        Duration::from_secs(30),
        "deliveries after the refusal",
        || {
            let n = on("/new").len();
            async move { (n > before + 50).then_some(()) }
        },
    )
    .await;

    // An added observer, the workers first (they must know it before the reader publishes
    // for it), then the reader: the reader reloads too, and the workers deliver the new one.
    let added = super::control::added(&receiver);
    std::fs::write(&worker.file.path, format!("{new_text}{added}")).unwrap();
    worker.daemon.signal("HUP");
    eventually(
        Duration::from_secs(30),
        "the worker's second reload",
        || {
            let n = worker
                .daemon
                .log()
                .matches("partition drained and started again")
                .count();
            async move { (n >= 2 * PARTITIONS as usize).then_some(()) }
        },
    )
    .await;
    let reader_text = std::fs::read_to_string(&reader.file.path).unwrap();
    std::fs::write(&reader.file.path, format!("{reader_text}{added}")).unwrap();
    reader.daemon.signal("HUP");
    reader
        .daemon
        .wait_for_log("configuration reloaded", Duration::from_secs(30))
        .await;
    eventually(
        Duration::from_secs(30),
        "the added observer's deliveries",
        || {
            let n = on("/added").len();
            async move { (n > 50).then_some(()) }
        },
    )
    .await;

    // Nothing lost across the reloads (either URL, same ids, in order per entity), and the
    // changes after the first went to the new URL only.
    let committed = writer.finish().await;
    // The observer `all`'s deliveries, at either URL, in arrival order.
    let of_all = || {
        receiver
            .accepted()
            .into_iter()
            .filter(|r| r.path() != "/added")
            .collect::<Vec<_>>()
    };
    let wanted: std::collections::HashSet<i64> = committed.iter().map(|(s, _)| *s).collect();
    eventually(
        Duration::from_secs(60),
        "every change delivered to `all`",
        || {
            let got: std::collections::HashSet<i64> =
                of_all().iter().map(|r| r.sequence()).collect();
            let done = wanted.is_subset(&got);
            async move { done.then_some(()) }
        },
    )
    .await;
    check_at_least_once(&committed, &of_all());
    let last_old = on("/hook").iter().map(|r| r.sequence()).max().unwrap();
    let last = committed.last().unwrap().0;
    assert!(last_old < last, "the last change went to the old URL");
    let new: std::collections::HashSet<i64> = on("/new").iter().map(|r| r.sequence()).collect();
    let after: Vec<i64> = committed
        .iter()
        .map(|(s, _)| *s)
        .filter(|s| *s > last_old)
        .collect();
    assert!(after.len() > 50 && after.iter().all(|s| new.contains(s)));
    eprintln!(
        "{} changes, {} to the old URL, {} after the reload to the new one only",
        committed.len(),
        on("/hook").len(),
        after.len()
    );
    drop(worker);
    drop(reader);
    delete_stream(&cluster.nats_url, &cluster.stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dead_letters_an_observer_it_does_not_know_and_dlq_retry_sends_it() {
    let db = TestDb::new().await;
    let receiver = TestServer::start().await;
    let cluster = Cluster::new(&db, &receiver, "UNKNOWN", "nats://127.0.0.1:4222".into());
    let worker = cluster.worker("w0");
    wait_spread(&[&worker], Duration::from_secs(30)).await;
    // The reader has an observer the worker does not: `extra`.
    let port = free_port();
    let reader_file = ConfigFile::new(&format!(
        r#"{base}
[observers.extra]
entity = "Item"
event_type = ["INSERT", "UPDATE"]

[[observers.extra.actions]]
type = "webhook"
url = "{extra}"
allow_private_networks = true
"#,
        base = distributed_config(
            &cluster.consumer,
            &cluster.hook,
            &cluster.nats_url,
            &cluster.stream,
            port,
        ),
        extra = receiver.url("/extra"),
    ));
    let _reader = Daemon::start_with(&db.url, &reader_file.path, &["--role", "reader"]);
    let client = fraiseql_observers::testing::connect(&db.url).await;
    let n = 20;
    for i in 0..n {
        insert_change(
            &client,
            uuid::Uuid::new_v4(),
            "c",
            serde_json::json!({"n": i}),
        )
        .await;
    }

    // `all` is delivered; `extra` is dead-lettered under the partitions' consumers (`dlq list
    // --config` lists the consumer's items with its partitions'), and the partitions empty.
    eventually(Duration::from_secs(60), "`all` delivered", || {
        let got = receiver.accepted().len();
        async move { (got >= n).then_some(()) }
    })
    .await;
    let items: Vec<serde_json::Value> =
        eventually(Duration::from_secs(60), "`extra` dead-lettered", || async {
            let out = cli(
                Some(&db.url),
                &["dlq", "list", "--json", "--config", reader_file.arg()],
            )
            .await;
            let items: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).ok()?;
            (items.len() >= n).then_some(items)
        })
        .await;
    assert_eq!(items.len(), n);
    let prefix = format!("{}/", cluster.consumer);
    for item in &items {
        assert_eq!(item["observer"], "extra", "{item}");
        assert_eq!(item["reason"], "not_accepted", "{item}");
        assert!(
            item["consumer_id"].as_str().unwrap().starts_with(&prefix),
            "{item}"
        );
    }
    worker
        .daemon
        .wait_for_log(
            "delivery dead-lettered: observer unknown to this worker",
            Duration::from_secs(5),
        )
        .await;
    let js = async_nats::jetstream::new(async_nats::connect(&cluster.nats_url).await.unwrap());
    eventually(Duration::from_secs(30), "the work stream empty", || async {
        let mut stream = js.get_stream(&cluster.stream).await.ok()?;
        (stream.info().await.ok()?.state.messages == 0).then_some(())
    })
    .await;

    // The operator's retry, with the reader's file (which has `extra`), sends every item with
    // its delivery id.
    let out = cli(
        Some(&db.url),
        &["dlq", "retry", "--all", "--config", reader_file.arg()],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(
        out.stdout.contains(&format!("{n} delivered")),
        "{}",
        out.all()
    );
    let mut sent: Vec<String> = receiver
        .accepted()
        .iter()
        .filter(|r| r.path() == "/extra")
        .map(|r| r.id())
        .collect();
    sent.sort();
    let mut dead: Vec<String> = items
        .iter()
        .map(|i| i["delivery_id"].as_str().unwrap().to_string())
        .collect();
    dead.sort();
    assert_eq!(sent, dead);
    delete_stream(&cluster.nats_url, &cluster.stream).await;
}
