//! `fraiseql-observers demo`: watch database changes become signed webhooks, with nothing to set up.
//!
//! It uses `--database-url`/`DATABASE_URL` when given (creating, then dropping, a database of its
//! own on that server), else starts a throwaway PostgreSQL cluster in a temporary directory from
//! the local PostgreSQL binaries. Then: migrate, create FraiseQL-style `tb_user`/`tb_order` with
//! capture enabled, start a local webhook receiver, run the engine, write changes, print what
//! was delivered, stop gracefully and clean up.

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use fraiseql_observers::{capture, config, migrate, postgres_programs, Pipeline};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_postgres::NoTls;

const SECRET: &str = "whsec_ZGVtby1zZWNyZXQtZm9yLWZyYWlzZXFsLW9ic2VydmVycw==";
const TENANT: &str = "7d3c5e2a-1b4f-4c8e-9a6d-2f1e0b9c8a71";

pub async fn run(database_url: Option<String>) -> Result<()> {
    println!("fraiseql-observers demo: database changes -> observers -> signed webhooks\n");
    let (server, cluster) = match database_url {
        Some(url) => (url, None),
        None => {
            let cluster = Cluster::start().context("starting a throwaway PostgreSQL cluster")?;
            (cluster.url("postgres"), Some(cluster))
        }
    };
    let outcome = demo(&server).await;
    if let Some(cluster) = cluster {
        cluster.stop();
    }
    outcome
}

async fn demo(server_url: &str) -> Result<()> {
    // A database of our own on that server, dropped at the end.
    let admin = connect(server_url).await?;
    let name = format!("fraiseql_observers_demo_{}", std::process::id());
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .with_context(|| {
            format!("creating database {name} (the demo needs CREATEDB on that server)")
        })?;
    let mut config: tokio_postgres::Config = server_url.parse()?;
    config.dbname(&name);
    let url = url_of(&config);
    let result = scenario(&url).await;
    let _ = admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await;
    result
}

async fn scenario(url: &str) -> Result<()> {
    let mut client = connect(url).await?;
    let report = migrate::run(&mut client).await?;
    println!("1. migrated: {} migrations applied (change log, capture trigger, retry queue, dead letters)", report.applied.len());
    client
        .batch_execute(
            "CREATE TABLE tb_user (
                 pk_user INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 id UUID DEFAULT gen_random_uuid() UNIQUE NOT NULL,
                 identifier TEXT UNIQUE NOT NULL,
                 email TEXT NOT NULL,
                 password_hash TEXT NOT NULL,
                 fk_customer_org UUID NOT NULL,
                 created_at TIMESTAMPTZ DEFAULT now());
             CREATE TABLE tb_order (
                 pk_order INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 id UUID DEFAULT gen_random_uuid() UNIQUE NOT NULL,
                 fk_user INTEGER NOT NULL REFERENCES tb_user(pk_user),
                 fk_customer_org UUID NOT NULL,
                 status TEXT NOT NULL DEFAULT 'pending',
                 total NUMERIC(12, 2) NOT NULL);",
        )
        .await?;
    let mut user = capture::CaptureSpec::new("tb_user", "User");
    user.tenant_column = Some("fk_customer_org".into());
    user.exclude_columns = vec!["password_hash".into()];
    capture::enable(&client, &user).await?;
    let mut order = capture::CaptureSpec::new("tb_order", "Order");
    order.tenant_column = Some("fk_customer_org".into());
    capture::enable(&client, &order).await?;
    println!("2. created tb_user and tb_order, capture enabled (tb_user.password_hash excluded)");

    let receiver = Receiver::start().await?;
    println!("3. webhook receiver listening on {}", receiver.base);
    let config_text = format!(
        r#"[observers.runtime]
consumer_id = "demo"
poll_interval_ms = 50

[observers.user_signed_up]
entity = "User"
event_type = "INSERT"

[[observers.user_signed_up.actions]]
type = "webhook"
url = "{base}/hooks/users"
signing_secret_env = "DEMO_WEBHOOK_SECRET"
allow_private_networks = true

[observers.order_shipped]
entity = "Order"
event_type = "UPDATE"
condition = "field_changed_to('status', 'shipped') && total > 100"
retry = {{ max_attempts = 5, initial_delay_ms = 200, max_delay_ms = 1000 }}

[[observers.order_shipped.actions]]
type = "webhook"
url = "{base}/hooks/shipped"
signing_secret_env = "DEMO_WEBHOOK_SECRET"
allow_private_networks = true
body_template = '{{"order": {{{{ event.entity_id }}}}, "total": {{{{ after.total }}}}, "was": {{{{ before.status }}}}}}'
"#,
        base = receiver.base
    );
    println!("4. observers (config as the daemon would read it):\n");
    for line in config_text.lines() {
        println!("     {line}");
    }
    println!();
    let config = config::load(&config_text, &|name| {
        (name == "DEMO_WEBHOOK_SECRET").then(|| SECRET.to_string())
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let pipeline = Pipeline::start(url, config).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let engine = tokio::spawn(pipeline.run(async {
        let _ = stopped.await;
    }));
    println!("5. engine running; writing changes:");

    let ada: i32 = client
        .query_one(
            "INSERT INTO tb_user (identifier, email, password_hash, fk_customer_org)
             VALUES ('ada', 'ada@example.com', 'argon2:not-for-your-eyes', $1::text::uuid) RETURNING pk_user",
            &[&TENANT],
        )
        .await?
        .get(0);
    println!("     INSERT tb_user ada@example.com");
    client
        .execute(
            "INSERT INTO tb_user (identifier, email, password_hash, fk_customer_org)
             VALUES ('grace', 'grace@example.com', 'argon2:hidden', $1::text::uuid)",
            &[&TENANT],
        )
        .await?;
    println!("     INSERT tb_user grace@example.com");
    // The first shipped-order delivery fails once: watch it being retried.
    receiver.fail_next("/hooks/shipped", 1);
    for (total, label) in [(250.0, "big"), (40.0, "small")] {
        let id: uuid::Uuid = client
            .query_one(
                "INSERT INTO tb_order (fk_user, fk_customer_org, total) VALUES ($1, $2::text::uuid, $3::float8::numeric) RETURNING id",
                &[&ada, &TENANT, &total],
            )
            .await?
            .get(0);
        println!("     INSERT tb_order ({label}, total {total})");
        for status in ["paid", "shipped"] {
            client
                .execute(
                    "UPDATE tb_order SET status = $1 WHERE id = $2",
                    &[&status, &id],
                )
                .await?;
            println!("     UPDATE tb_order ({label}) status -> {status}");
        }
    }

    // Expected: 2 user sign-ups + 1 big shipped order (the small one fails the condition).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while receiver.accepted() < 3 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop.send(());
    engine.await??;
    println!("\n6. the receiver got:");
    for line in receiver.log.lock().unwrap().iter() {
        println!("     {line}");
    }
    let accepted = receiver.accepted();
    println!(
        "\n7. engine stopped gracefully, checkpoint saved. {accepted} deliveries accepted; \
         the small order was filtered out by its condition; the failed attempt was retried with the same webhook-id."
    );
    if accepted != 3 {
        bail!("expected 3 deliveries, got {accepted}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A webhook receiver that checks Standard Webhooks signatures and prints what it got.

struct Receiver {
    base: String,
    log: Arc<Mutex<Vec<String>>>,
    state: Arc<ReceiverState>,
}

struct ReceiverState {
    log: Arc<Mutex<Vec<String>>>,
    accepted: AtomicUsize,
    fail: Mutex<Option<(String, usize)>>,
}

impl Receiver {
    async fn start() -> Result<Receiver> {
        let log = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(ReceiverState {
            log: log.clone(),
            accepted: AtomicUsize::new(0),
            fail: Mutex::new(None),
        });
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Receiver { base, log, state })
    }

    fn fail_next(&self, path: &str, times: usize) {
        *self.state.fail.lock().unwrap() = Some((path.to_string(), times));
    }

    fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::Relaxed)
    }
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let id = header("webhook-id");
    let valid = verify(
        &id,
        &header("webhook-timestamp"),
        &body,
        &header("webhook-signature"),
    );
    let fail = {
        let mut fail = state.fail.lock().unwrap();
        match fail.as_mut() {
            Some((path, n)) if path == uri.path() && *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    };
    let status = if fail {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::NO_CONTENT
    };
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let summary = match json.get("type") {
        Some(t) => format!(
            "{} {} email={}",
            t.as_str().unwrap_or(""),
            json["data"]["entity_id"].as_str().unwrap_or(""),
            json["data"]["after"]["email"].as_str().unwrap_or("")
        ),
        None => json.to_string(),
    };
    state.log.lock().unwrap().push(format!(
        "{} {} -> {} | {id} signature {} | {summary}",
        uri.path(),
        if fail {
            "503 (simulated outage)"
        } else {
            "204"
        },
        if fail { "retry" } else { "ok" },
        if valid { "valid" } else { "INVALID" },
    ));
    if !fail {
        state.accepted.fetch_add(1, Ordering::Relaxed);
    }
    status
}

/// Standard Webhooks: `v1,` + base64(HMAC-SHA256(secret, "{id}.{timestamp}.{body}")).
fn verify(id: &str, timestamp: &str, body: &[u8], signatures: &str) -> bool {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let Ok(key) = b64.decode(SECRET.trim_start_matches("whsec_")) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("any key length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = format!("v1,{}", b64.encode(mac.finalize().into_bytes()));
    signatures.split(' ').any(|s| s == expected)
}

// ---------------------------------------------------------------------------------------------
// A throwaway PostgreSQL cluster from the local binaries.

struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl Cluster {
    fn start() -> Result<Cluster> {
        let bin = postgres_programs::bin_dir().ok_or_else(|| {
            anyhow::anyhow!(
                "no PostgreSQL server binaries found (initdb and pg_ctl on PATH or in /usr/lib/postgresql/*/bin).\n\
                 Install them (Debian/Ubuntu: apt-get install postgresql) or point the demo at a server:\n\
                 DATABASE_URL=postgres://user@localhost:5432/postgres fraiseql-observers demo"
            )
        })?;
        // initdb refuses to run as root: run the cluster as the postgres user then.
        let as_postgres = postgres_programs::is_root();
        let dir =
            std::env::temp_dir().join(format!("fraiseql-observers-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        if as_postgres {
            let status = Command::new("chown").arg("postgres").arg(&dir).status()?;
            if !status.success() {
                bail!(
                    "running as root, and cannot hand {} to the postgres user",
                    dir.display()
                );
            }
        }
        let port = free_port()?;
        let cluster = Cluster {
            dir,
            bin,
            port,
            as_postgres,
        };
        println!(
            "   (no DATABASE_URL: starting a throwaway PostgreSQL in {} on port {port})",
            cluster.dir.display()
        );
        let data = cluster.dir.join("data");
        cluster.run(
            "initdb",
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        let options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            cluster.dir.display()
        );
        cluster.run(
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-o",
                &options,
                "-l",
                &cluster.dir.join("log").to_string_lossy(),
                "-w",
                "start",
            ],
        )?;
        Ok(cluster)
    }

    fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<()> {
        let program = self.bin.join(tool);
        let output = if self.as_postgres {
            Command::new("runuser")
                .arg("-u")
                .arg("postgres")
                .arg("--")
                .arg(&program)
                .args(args)
                .output()
        } else {
            Command::new(&program).args(args).output()
        }
        .with_context(|| format!("running {}", program.display()))?;
        if !output.status.success() {
            bail!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    fn stop(self) {
        let data = self.dir.join("data");
        let _ = self.run(
            "pg_ctl",
            &["-D", &data.to_string_lossy(), "-m", "fast", "-w", "stop"],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
        println!("   (throwaway PostgreSQL stopped and removed)");
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connecting to {}", redact(url)))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn url_of(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres");
    let password = config
        .get_password()
        .map(|p| format!(":{}", String::from_utf8_lossy(p)))
        .unwrap_or_default();
    let db = config.get_dbname().unwrap_or("postgres");
    format!("postgres://{user}{password}@{host}:{port}/{db}")
}

fn redact(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(c) if c.get_password().is_some() => url_of(&c).replace(
            &format!(":{}@", String::from_utf8_lossy(c.get_password().unwrap())),
            ":***@",
        ),
        _ => url.to_string(),
    }
}
