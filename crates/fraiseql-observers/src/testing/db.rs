//! A fresh PostgreSQL database per test, dropped when the test ends.
//!
//! The server is taken from `FRAISEQL_TEST_ADMIN_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`), which must be allowed to create databases.

use std::sync::atomic::{AtomicU32, Ordering};

use tokio_postgres::{Client, NoTls};

/// The server's administrative URL.
pub fn admin_url() -> String {
    std::env::var("FRAISEQL_TEST_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A database created for one test. Dropped (with its connections) when this value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl TestDb {
    /// A fresh database with every migration applied.
    pub async fn new() -> TestDb {
        let db = TestDb::empty().await;
        let mut client = db.client().await;
        crate::migrate::run(&mut client)
            .await
            .expect("migrations apply to a fresh database");
        db
    }

    /// A fresh database with nothing in it.
    pub async fn empty() -> TestDb {
        init_logs();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "fo_test_{}_{}_{}",
            std::process::id(),
            n,
            rand::random::<u32>()
        );
        let admin = connect(&admin_url()).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let mut config: tokio_postgres::Config = admin_url().parse().unwrap();
        config.dbname(&name);
        let url = to_url(&config);
        TestDb { name, url }
    }

    pub fn config(&self) -> tokio_postgres::Config {
        self.url.parse().unwrap()
    }

    /// A new connection to this database.
    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime: do the async work on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok((client, conn)) = tokio_postgres::connect(&admin_url(), NoTls).await {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// A connection to `url`, its driver spawned; panics naming the URL when it cannot connect.
pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

fn to_url(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres");
    let db = config.get_dbname().unwrap_or("postgres");
    format!("postgres://{user}@{host}:{port}/{db}")
}

/// Logs to the test's captured output, filtered by `RUST_LOG` (nothing when unset).
pub fn init_logs() {
    if let Ok(filter) = std::env::var("RUST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}
