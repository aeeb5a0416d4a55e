//! The leader's host vanishes without closing its connections, simulated by a TCP proxy between
//! the leader and PostgreSQL that black-holes them: it stops forwarding in both directions but
//! keeps every socket open (so no FIN, no RST, and the proxy's kernel still answers TCP
//! keepalives: only silence tells). The standby takes over within the documented bound
//! (`leader::TAKEOVER_BOUND`), nothing is lost, and the cut-off leader reports `reconnecting`.

use crate::harness::{
    check_at_least_once, config, free_port, healthz, wait_all_delivered, ConfigFile, Daemon, Setup,
    Writer,
};
use fraiseql_observers::leader::TAKEOVER_BOUND;
use fraiseql_observers::testing::{eventually, TestDb, TestServer};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP proxy to `upstream` that can be switched to black-holing.
struct Proxy {
    port: u16,
    blackholed: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let blackholed = Arc::new(AtomicBool::new(false));
        let flag = blackholed.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((client, _)) = listener.accept().await {
                if flag.load(Ordering::SeqCst) {
                    held.push(client); // accepted, never answered
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(forward(client_read, server_write, flag.clone()));
                tokio::spawn(forward(server_read, client_write, flag.clone()));
            }
        });
        Proxy {
            port,
            blackholed,
            task,
        }
    }

    fn blackhole(&self) {
        self.blackholed.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copy `from` to `to` until black-holed; then swallow everything and keep both ends open.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    blackholed: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if blackholed.load(Ordering::SeqCst) {
            // Hold both halves (the sockets stay open) and never forward again.
            let _held = (from, to);
            std::future::pending::<()>().await;
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

async fn role(port: u16) -> Option<(u16, String)> {
    let (status, body) = healthz(port).await?;
    Some((status, body["role"].as_str()?.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_takes_over_when_the_leaders_network_goes_silent() {
    let db = TestDb::new().await;
    let config_of_db: tokio_postgres::Config = db.url.parse().unwrap();
    let upstream = config_of_db.get_ports().first().copied().unwrap_or(5432);
    let proxy = Proxy::start(upstream).await;
    let behind_proxy = db
        .url
        .replacen(&format!(":{upstream}/"), &format!(":{}/", proxy.port), 1);
    assert_ne!(behind_proxy, db.url);

    let receiver = TestServer::start().await;
    let hook = receiver.url("/hook");
    let (port_a, port_b) = (free_port(), free_port());
    let file_a = ConfigFile::new(&config(&Setup {
        metrics_port: Some(port_a),
        instance: "a",
        ..Setup::new("silent", &hook)
    }));
    let file_b = ConfigFile::new(&config(&Setup {
        metrics_port: Some(port_b),
        instance: "b",
        ..Setup::new("silent", &hook)
    }));
    let _a = Daemon::start(&behind_proxy, &file_a.path);
    eventually(Duration::from_secs(10), "A to lead", || async {
        (role(port_a).await == Some((200, "leader".into()))).then_some(())
    })
    .await;
    let mut b = Daemon::start(&db.url, &file_b.path);
    eventually(Duration::from_secs(10), "B to stand by", || async {
        (role(port_b).await == Some((200, "standby".into()))).then_some(())
    })
    .await;

    let writer = Writer::start(&db.url, 20, 11, Duration::from_millis(5)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!receiver.accepted().is_empty(), "A delivered nothing");

    let cut = Instant::now();
    proxy.blackhole();
    eventually(
        TAKEOVER_BOUND + Duration::from_secs(5),
        "B to take over",
        || async { (role(port_b).await == Some((200, "leader".into()))).then_some(()) },
    )
    .await;
    let takeover = cut.elapsed();
    eventually(
        Duration::from_secs(5),
        "A to report reconnecting",
        || async { (role(port_a).await == Some((503, "reconnecting".into()))).then_some(()) },
    )
    .await;
    eprintln!("B took over {takeover:?} after A's network went silent");
    assert!(
        takeover <= TAKEOVER_BOUND,
        "takeover took {takeover:?}, over the documented {TAKEOVER_BOUND:?}"
    );

    tokio::time::sleep(Duration::from_secs(1)).await;
    let committed = writer.finish().await;
    wait_all_delivered(&receiver, &committed, Duration::from_secs(20)).await;
    check_at_least_once(&committed, &receiver.accepted());
    assert!(receiver
        .accepted()
        .iter()
        .any(|h| h.header("x-instance") == "b"));

    b.signal("TERM");
    assert_eq!(
        b.exit(Duration::from_secs(15)).await.code(),
        Some(0),
        "log:\n{}",
        b.log()
    );
}
