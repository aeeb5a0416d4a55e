//! The shipped daemon, `fraiseql-observers run --config FILE`, as a separate process: the engine
//! as users run it (its own allocator, its own runtime, `/metrics` on or off), measured from
//! outside (`/proc/<pid>/stat` for CPU, `/proc/<pid>/status` for memory).
//!
//! Optionally started under a wrapper command (`valgrind --tool=callgrind ...`) to count the
//! instructions it executes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct BinaryEngine {
    child: Child,
    /// The daemon's stdout and stderr (its logs).
    pub log: PathBuf,
    /// `host:port` of `/metrics`, when on.
    pub metrics: Option<String>,
}

/// A free local port for `/metrics` (bound, then released for the daemon to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local address")
        .port()
}

impl BinaryEngine {
    /// Write the configuration (database, consumer `consumer` starting from the beginning of the
    /// log unless `runtime_extra` sets `start_position`, `/metrics` when `metrics`, the
    /// documented defaults plus `runtime_extra` and `FRAISEQL_BENCH_RUNTIME` (TOML lines of
    /// `[observers.runtime]`), and `observers`) next to the results and start
    /// `wrapper... binary run --config FILE`.
    pub fn start(
        binary: &Path,
        wrapper: &[String],
        url: &str,
        consumer: &str,
        runtime_extra: &str,
        observers: &str,
        metrics: bool,
    ) -> BinaryEngine {
        let dir = super::target_dir().join("bench-results/binary");
        std::fs::create_dir_all(&dir).expect("results dir");
        let metrics = metrics.then(|| format!("127.0.0.1:{}", free_port()));
        let metrics_line = metrics
            .as_ref()
            .map_or(String::new(), |a| format!("metrics_address = \"{a}\"\n"));
        let tuning = std::env::var("FRAISEQL_BENCH_RUNTIME")
            .unwrap_or_default()
            .replace("\\n", "\n");
        let start = if runtime_extra.contains("start_position") {
            ""
        } else {
            "start_position = \"beginning\"\n"
        };
        let config = format!(
            "[database]\nurl = \"{url}\"\n\n[observers.runtime]\nconsumer_id = \"{consumer}\"\n\
             {start}{runtime_extra}\n{metrics_line}{tuning}\n\n{observers}"
        );
        let config_path = dir.join(format!("{consumer}.toml"));
        std::fs::write(&config_path, config).expect("write the daemon's config");
        let log = dir.join(format!("{consumer}.log"));
        let out = std::fs::File::create(&log).expect("daemon log");
        let (program, args) = match wrapper.split_first() {
            Some((first, rest)) => (PathBuf::from(first), rest.to_vec()),
            None => (binary.to_path_buf(), Vec::new()),
        };
        let mut command = Command::new(program);
        command.args(args);
        if !wrapper.is_empty() {
            command.arg(binary);
        }
        let child = command
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("BENCH_SECRET", super::engine::SECRET)
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        BinaryEngine {
            child,
            log,
            metrics,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the daemon exited on its own (an error: see its log).
    pub fn failed(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    /// Peak resident memory so far, in KiB (`VmHWM`).
    pub fn peak_rss_kib(&self) -> u64 {
        status_kib(self.pid(), "VmHWM:")
    }

    /// Resident memory now, in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        status_kib(self.pid(), "VmRSS:")
    }

    /// CPU seconds (user + system) the daemon used so far.
    pub fn cpu_seconds(&self) -> f64 {
        super::cpu_seconds(&self.pid().to_string())
    }

    /// Wait until the daemon has claimed `consumer` (its checkpoint row exists: from then on a
    /// consumer starting "now" delivers every later commit), then `settle` more.
    pub async fn wait_claimed(
        &mut self,
        client: &tokio_postgres::Client,
        consumer: &str,
        settle: Duration,
    ) {
        let started = Instant::now();
        loop {
            let claimed = client
                .query_opt(
                    "SELECT 1 FROM core.observer_checkpoints WHERE consumer_id = $1",
                    &[&consumer],
                )
                .await
                .expect("checkpoint row")
                .is_some();
            if claimed {
                break;
            }
            assert!(
                !self.failed(),
                "the daemon stopped before it claimed {consumer}; see {}",
                self.log.display()
            );
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the daemon did not claim {consumer} in 60 s; see {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(settle).await;
    }

    /// The `/metrics` page (when on): checked to hold the engine's metrics, so a "metrics on"
    /// figure is one with the exporter really serving.
    pub async fn scrape(&self) -> Option<String> {
        let address = self.metrics.as_ref()?;
        let text = reqwest::get(format!("http://{address}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        Some(text)
    }

    /// SIGTERM, then wait (up to 5 minutes: under valgrind the shutdown is slow) for the exit.
    pub async fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(
                    status.success(),
                    "the daemon exited with {status}; see {}",
                    self.log.display()
                );
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "the daemon did not stop; see {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for BinaryEngine {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The instructions a callgrind run collected (`Collected : N` in its log).
pub fn callgrind_collected(log: &Path) -> u64 {
    let text = std::fs::read_to_string(log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    text.lines()
        .find_map(|l| {
            l.split_once("Collected :")
                .and_then(|(_, n)| n.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no 'Collected' line in {}", log.display()))
}
