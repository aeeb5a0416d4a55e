//! Runtime control of the real binary under a steady writer: SIGHUP and `reload` apply an added
//! observer at once and refuse a bad file (the running configuration keeps delivering);
//! `pause`/`resume`/`status` hold one observer's deliveries and send them, in order, on resume.

use crate::harness::{
    check_at_least_once, cli, config, free_port, http_get, wait_all_delivered, ConfigFile, Daemon,
    Setup, Writer,
};
use fraiseql_observers::testing::{eventually, Request, TestDb, TestServer};
use std::collections::HashMap;
use std::time::Duration;

/// An observer `added` (Item inserts and updates) to `server`'s `/added`.
pub(crate) fn added(server: &TestServer) -> String {
    format!(
        r#"
[observers.added]
entity = "Item"
event_type = ["INSERT", "UPDATE"]

[[observers.added.actions]]
type = "webhook"
url = "{}"
allow_private_networks = true
"#,
        server.url("/added")
    )
}

fn on(server: &TestServer, path: &str) -> Vec<Request> {
    server
        .accepted()
        .into_iter()
        .filter(|r| r.path() == path)
        .collect()
}

async fn grows(server: &TestServer, path: &str, what: &str) {
    let before = on(server, path).len();
    eventually(Duration::from_secs(30), what, || {
        let n = on(server, path).len();
        async move { (n > before + 5).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_reload_apply_an_added_observer_and_refuse_a_bad_file_under_a_writer() {
    let db = TestDb::new().await;
    let url = db.url.as_str();
    let server = TestServer::start().await;
    let port = free_port();
    let hook = server.url("/all");
    let base = config(&Setup {
        metrics_port: Some(port),
        ..Setup::new("control", &hook)
    });
    let file = ConfigFile::new(&base);
    let daemon = Daemon::start(url, &file.path);
    let writer = Writer::start(url, 20, 7, Duration::from_millis(5)).await;
    grows(&server, "/all", "deliveries before the reload").await;

    // SIGHUP with an added observer: applied at once, in the same process.
    std::fs::write(&file.path, format!("{base}{}", added(&server))).unwrap();
    let signalled = std::time::Instant::now();
    daemon.signal("HUP");
    daemon
        .wait_for_log("configuration reloaded", Duration::from_secs(30))
        .await;
    eprintln!(
        "measured: SIGHUP to the new pipeline running in {:?}",
        signalled.elapsed()
    );
    grows(&server, "/added", "the added observer's deliveries").await;

    // A bad file is refused with every error logged; the running configuration keeps going.
    std::fs::write(
        &file.path,
        format!("{base}{}[observers.broken]\nentity = 1\n", added(&server)),
    )
    .unwrap();
    daemon.signal("HUP");
    daemon
        .wait_for_log("configuration reload refused", Duration::from_secs(30))
        .await;
    assert!(
        daemon.log().contains("observers.broken"),
        "{}",
        daemon.log()
    );
    grows(&server, "/all", "deliveries after the refused SIGHUP").await;
    grows(
        &server,
        "/added",
        "the added observer after the refused SIGHUP",
    )
    .await;

    // `reload` asks the daemon through the database and prints its answer.
    let refused = cli(Some(url), &["reload", "--config", file.arg()]).await;
    assert_eq!(refused.code, Some(1), "{}", refused.all());
    assert!(refused.stderr.contains("refused"), "{}", refused.all());
    assert!(
        refused.stderr.contains("observers.broken"),
        "{}",
        refused.all()
    );
    std::fs::write(&file.path, format!("{base}{}", added(&server))).unwrap();
    let applied = cli(Some(url), &["reload", "--config", file.arg()]).await;
    assert_eq!(applied.code, Some(0), "{}", applied.all());
    assert!(applied.stdout.contains("reloaded"), "{}", applied.all());
    let (_, metrics) = http_get(port, "/metrics").await.expect("/metrics");
    assert!(
        metrics.contains("fraiseql_observers_config_reloads_total{result=\"error\"} 2"),
        "{metrics}"
    );

    // Nothing lost at the first observer across three reloads; the added one got every change
    // from the first it saw, in order per entity.
    let committed = writer.finish().await;
    wait_all_delivered(&server, &committed, Duration::from_secs(60)).await;
    check_at_least_once(&committed, &on(&server, "/all"));
    let first_added = on(&server, "/added")
        .iter()
        .map(Request::sequence)
        .min()
        .unwrap();
    let since: Vec<_> = committed
        .iter()
        .filter(|(s, _)| *s >= first_added)
        .copied()
        .collect();
    eventually(
        Duration::from_secs(60),
        "every later change at /added",
        || {
            let got: std::collections::HashSet<i64> = on(&server, "/added")
                .iter()
                .map(Request::sequence)
                .collect();
            let done = since.iter().all(|(s, _)| got.contains(s));
            async move { done.then_some(()) }
        },
    )
    .await;
    check_at_least_once(&since, &on(&server, "/added"));
    daemon.signal("TERM");
    let mut daemon = daemon;
    assert!(daemon.exit(Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_an_observer_in_order_and_resume_sends_what_it_held() {
    let db = TestDb::new().await;
    let url = db.url.as_str();
    let server = TestServer::start().await;
    let hook = server.url("/all");
    let text = format!("{}{}", config(&Setup::new("paused", &hook)), added(&server));
    let file = ConfigFile::new(&text);
    let mut daemon = Daemon::start(url, &file.path);
    let writer = Writer::start(url, 10, 11, Duration::from_millis(5)).await;
    grows(&server, "/added", "deliveries before the pause").await;

    let typo = cli(
        Some(url),
        &["pause", "--observer", "nope", "--config", file.arg()],
    )
    .await;
    assert_eq!(typo.code, Some(1), "{}", typo.all());
    let out = cli(
        Some(url),
        &["pause", "--observer", "added", "--config", file.arg()],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stdout.contains("paused"), "{}", out.all());

    // Held while paused: `status` counts them, the other observer keeps receiving.
    let status = eventually(Duration::from_secs(30), "events held", || async {
        let out = cli(Some(url), &["status", "--config", file.arg()]).await;
        let held = out
            .stdout
            .lines()
            .find(|l| l.starts_with("added "))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|n| n.parse::<i64>().ok());
        held.filter(|n| *n > 5).map(|_| out.stdout)
    })
    .await;
    assert!(status.contains("consumer:     paused"), "{status}");
    grows(&server, "/all", "the other observer while paused").await;
    let sent_while_paused = on(&server, "/added").len();
    grows(&server, "/all", "more of the other observer").await;
    assert_eq!(on(&server, "/added").len(), sent_while_paused);

    let out = cli(
        Some(url),
        &["resume", "--observer", "added", "--config", file.arg()],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stdout.contains("resumed"), "{}", out.all());
    let committed = writer.finish().await;
    wait_all_delivered(&server, &committed, Duration::from_secs(60)).await;
    eventually(Duration::from_secs(60), "everything at /added", || {
        let got: std::collections::HashSet<i64> = on(&server, "/added")
            .iter()
            .map(Request::sequence)
            .collect();
        let done = committed.iter().all(|(s, _)| got.contains(s));
        async move { done.then_some(()) }
    })
    .await;
    check_at_least_once(&committed, &on(&server, "/all"));
    check_at_least_once(&committed, &on(&server, "/added"));
    let per_entity: HashMap<String, usize> =
        on(&server, "/added")
            .iter()
            .fold(HashMap::new(), |mut m, r| {
                *m.entry(r.entity()).or_default() += 1;
                m
            });
    assert_eq!(per_entity.len(), 10);
    let out = cli(Some(url), &["status", "--config", file.arg()]).await;
    assert!(out.stdout.contains("paused:       none"), "{}", out.all());
    daemon.signal("TERM");
    assert!(daemon.exit(Duration::from_secs(30)).await.success());
}
