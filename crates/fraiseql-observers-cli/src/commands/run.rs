//! `run --config FILE`: the daemon.
//!
//! ```text
//! config -> tracing, Prometheus recorder, /metrics + /healthz
//!        -> leader::lead (stand by, lead, run; contend again when the lead is lost) until SIGINT/SIGTERM
//!        <- Reloader (SIGHUP, `reload` requests): validated configurations, applied at once
//! ```
//!
//! Invariants:
//! * It reads and delivers only while it leads its consumer (the advisory lock); it stands by
//!   otherwise, answering `/healthz` as a standby.
//! * The lead lost (lock connection gone, fenced, an engine task failed, the database
//!   restarted): it stops at once, without draining or saving its checkpoint (the next leader
//!   owns both), answers `/healthz` 503 `reconnecting`, and contends again in the same process;
//!   with `exit_on_lost_lead = true` it exits 1 instead.
//! * It exits 1 on a mistake that contending again would repeat (configuration, schema, a
//!   checkpoint ahead of the database).
//! * SIGHUP, or a `reload` request, re-reads the file: a valid one is applied at once (the
//!   running pipeline drains and the new observers run from its checkpoint, in the same lead;
//!   a worker drains each partition it owns and starts it again, keeping its lease),
//!   an invalid one is refused with every error logged and the running configuration stays.
//!   The restart-only settings (`config::keep_restart_only`, and `[distributed]`) keep their
//!   running values.
//! * The first SIGINT/SIGTERM stops reading, lets in-flight deliveries finish (up to the
//!   shutdown timeout), saves the checkpoint and exits 0; a second one exits at once (130).

use crate::server::{self, Health, Role};
use crate::{Cli, RunRole};
use anyhow::{anyhow, Context as _};
use fraiseql_observers::config::{self, Config, DatabaseConfig, LogFormat, RuntimeConfig};
use fraiseql_observers::control;
use fraiseql_observers::db::Reconnecting;
use fraiseql_observers::distributed::{DistributedConfig, Role as DistributedRole};
use fraiseql_observers::leader::{self, LeadState};
use fraiseql_observers::metrics as m;
use fraiseql_observers::pipeline::worker::{self, WorkerStatus};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

pub async fn execute(
    cli: &Cli,
    role: RunRole,
    worker_id: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let role = match role {
        RunRole::Single => DistributedRole::Single,
        RunRole::Reader => DistributedRole::Reader,
        RunRole::Worker => DistributedRole::Worker,
    };
    // Signals first: one arriving while the daemon starts must stop it cleanly, not kill it.
    let shutdown = Shutdown::install()?;
    let path = super::config_path(cli)?;
    let text = super::read_file(path);
    let compile = |text: &str| {
        config::load(text, &super::env_lookup)
            .and_then(|c| c.with_role(role))
            .map_err(|errors| anyhow!("{}: {errors}", path.display()))
    };
    let config = match text
        .as_deref()
        .map_err(|e| anyhow!("{e:#}"))
        .and_then(compile)
    {
        Ok(config) => config,
        Err(e) => {
            super::init_tracing(LogFormat::Text, "info");
            return Err(e);
        }
    };
    let text = text?;
    super::init_tracing(config.runtime.log_format, "info");
    for w in &config.warnings {
        tracing::warn!(path = %w.path, "deprecated configuration key: {}", w.message);
    }
    let url = super::database_url(cli, Some(&config))?;
    let runtime = config.runtime.clone();
    let consumer = runtime.consumer_id.clone();

    let prometheus = install_recorder()?;
    let health = Arc::new(Health::new(&consumer));
    if let Some(address) = &runtime.metrics_address {
        server::start(address, health.clone(), prometheus).await?;
    }
    health.set_mode(role);
    tracing::info!(consumer = %consumer, observers = config.observers.len(), role = role.as_str(), "starting");

    // The observers are compiled again for each new lead (each partition a worker takes) and on
    // each reload, from the last text accepted (the file as read at start, or at the last
    // reload that validated).
    let reloader = Arc::new(Reloader::new(
        path,
        text,
        &config,
        &url,
        health.clone(),
        role,
    ));
    let reloads = reloader.subscribe();
    reloader.listen_for_sighup()?;
    reloader.clone().watch_requests();

    if role == DistributedRole::Worker {
        let worker_id = worker_id.map_or_else(default_worker_id, str::to_string);
        let status = Arc::new(WorkerStatus::default());
        health.work(&worker_id, status.clone());
        let compile: worker::Compile = {
            let reloader = reloader.clone();
            Arc::new(move || reloader.compile())
        };
        return match worker::run(
            &url,
            compile,
            &worker_id,
            status,
            shutdown.requested(),
            reloads,
        )
        .await
        {
            Ok(()) => {
                tracing::info!(consumer = %consumer, worker = %worker_id, "stopped");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => Err(anyhow!(e).context("the worker stopped on an error")),
        };
    }

    let report = |state: LeadState| match state {
        LeadState::Standby => health.set_role(Role::Standby),
        LeadState::Leading(status) => health.lead(status),
        LeadState::Reconnecting => health.set_role(Role::Reconnecting),
    };
    let recompile = || reloader.compile();
    match leader::lead(
        &url,
        config,
        recompile,
        report,
        shutdown.requested(),
        reloads,
    )
    .await
    {
        Ok(()) => {
            tracing::info!(consumer = %consumer, "stopped");
            Ok(ExitCode::SUCCESS)
        }
        Err(e @ fraiseql_observers::Error::Fenced { .. }) => Err(anyhow!(
            "{e}; stopped at once, without saving the checkpoint (exit_on_lost_lead = true)"
        )),
        Err(e @ fraiseql_observers::Error::LostLead { .. }) => Err(anyhow!(e)),
        Err(e) => Err(anyhow!(e).context("the daemon stopped on an error")),
    }
}

/// Reloading the configuration (SIGHUP, or a `reload` request in the database): re-read the
/// file, validate it, and hand it to the running lead, or refuse it with every error logged
/// (the running configuration stays).
struct Reloader {
    path: PathBuf,
    url: String,
    consumer: String,
    /// The settings that need a restart, as running.
    database: DatabaseConfig,
    runtime: RuntimeConfig,
    distributed: Option<DistributedConfig>,
    /// The last text accepted.
    accepted: Mutex<String>,
    /// Bumped for each configuration accepted; the lead applies it.
    generation: watch::Sender<u64>,
    /// One reload at a time.
    busy: tokio::sync::Mutex<()>,
    /// Whether this instance leads (its answer to a `reload` request is the one printed).
    health: Arc<Health>,
    /// `run --role`: every configuration is compiled for it.
    role: DistributedRole,
}

impl Reloader {
    fn new(
        path: &Path,
        text: String,
        config: &Config,
        url: &str,
        health: Arc<Health>,
        role: DistributedRole,
    ) -> Reloader {
        Reloader {
            path: path.to_path_buf(),
            url: url.to_string(),
            consumer: config.runtime.consumer_id.clone(),
            database: config.database.clone(),
            runtime: config.runtime.clone(),
            distributed: config.distributed.clone(),
            accepted: Mutex::new(text),
            generation: watch::channel(0).0,
            busy: tokio::sync::Mutex::new(()),
            health,
            role,
        }
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The last accepted configuration, compiled, with the running restart-only settings.
    fn compile(&self) -> Result<Config, fraiseql_observers::ConfigErrors> {
        let text = self.accepted.lock().expect("reload lock poisoned").clone();
        let mut config = config::load(&text, &super::env_lookup)?.with_role(self.role)?;
        self.keep_restart_only(&mut config);
        Ok(config)
    }

    /// Put the running values of the settings that need a restart back into `new`; the keys
    /// changed. `[distributed]` is one: the work stream and its partitions are set up at start.
    fn keep_restart_only(&self, new: &mut Config) -> Vec<&'static str> {
        let mut kept = config::keep_restart_only(&self.database, &self.runtime, new);
        if new.distributed != self.distributed {
            kept.push("distributed");
            new.distributed = self.distributed.clone();
        }
        kept
    }

    /// Re-read and validate the file; accept it (the lead applies it at once) or refuse it.
    /// `Err` holds every error, one per line.
    async fn reload(&self, trigger: &'static str) -> Result<(), String> {
        let _one = self.busy.lock().await;
        let path = self.path.display().to_string();
        tracing::info!(trigger, path = %path, "reloading the configuration");
        let refused = |errors: Vec<String>| {
            for error in &errors {
                tracing::error!(trigger, path = %path, error = %error,
                    "configuration reload refused; the running configuration stays");
            }
            metrics::counter!(m::CONFIG_RELOADS, "result" => "error").increment(1);
            Err(errors.join("\n"))
        };
        let text = match super::read_file(&self.path) {
            Ok(text) => text,
            Err(e) => return refused(vec![format!("{e:#}")]),
        };
        let mut new =
            match config::load(&text, &super::env_lookup).and_then(|c| c.with_role(self.role)) {
                Ok(config) => config,
                Err(errors) => return refused(errors.0.iter().map(|e| e.to_string()).collect()),
            };
        for key in self.keep_restart_only(&mut new) {
            tracing::warn!(
                key,
                "this setting cannot change without a restart; keeping the running value"
            );
        }
        for w in &new.warnings {
            tracing::warn!(path = %w.path, "deprecated configuration key: {}", w.message);
        }
        *self.accepted.lock().expect("reload lock poisoned") = text;
        self.generation.send_modify(|g| *g += 1);
        metrics::counter!(m::CONFIG_RELOADS, "result" => "ok").increment(1);
        tracing::info!(
            trigger,
            observers = new.observers.len(),
            "configuration accepted; applying it now"
        );
        Ok(())
    }

    fn listen_for_sighup(self: &Arc<Self>) -> anyhow::Result<()> {
        let mut hangup =
            signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
        let reloader = self.clone();
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                let _ = reloader.reload("SIGHUP").await;
            }
        });
        Ok(())
    }

    /// Answer `fraiseql-observers reload` requests (rows in the database) made after start.
    fn watch_requests(self: Arc<Self>) {
        tokio::spawn(async move {
            let Ok(db) = fraiseql_observers::db::parse_url(&self.url) else {
                return;
            };
            let db = Reconnecting::new(db, "fraiseql-observers-reload");
            let mut handled: Option<i64> = None;
            let mut failing = false;
            loop {
                let step = async {
                    let client = db.client().await?;
                    let requested = control::reload_requested(&client, &self.consumer).await?;
                    let Some(done) = handled else {
                        handled = Some(requested);
                        return Ok(());
                    };
                    if requested > done {
                        handled = Some(requested);
                        let result = self.reload("reload command").await;
                        let leading = self.health.role() == Role::Leader;
                        control::answer_reload(
                            &client,
                            &self.consumer,
                            requested,
                            leading,
                            result.as_ref().map(|_| ()).map_err(|e| e.as_str()),
                        )
                        .await?;
                    }
                    Ok::<(), fraiseql_observers::Error>(())
                };
                match step.await {
                    Ok(()) => failing = false,
                    Err(e) => {
                        if !failing {
                            tracing::warn!(error = %e, "cannot read reload requests; retrying");
                        }
                        failing = true;
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }
}

/// A worker's default name: the host name and the process id.
fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "worker".to_string());
    format!("{host}-{}", std::process::id())
}

/// SIGINT / SIGTERM, as a future any part of the daemon can wait for.
struct Shutdown {
    requested: watch::Receiver<bool>,
}

impl Shutdown {
    fn install() -> anyhow::Result<Shutdown> {
        let mut terminate =
            signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
        let mut interrupt =
            signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
        let (tx, requested) = watch::channel(false);
        tokio::spawn(async move {
            let mut received = 0;
            loop {
                let name = tokio::select! {
                    _ = terminate.recv() => "SIGTERM",
                    _ = interrupt.recv() => "SIGINT",
                };
                received += 1;
                if received == 1 {
                    tracing::info!(signal = name,
                        "shutdown requested: no new reads; finishing in-flight deliveries, then saving the checkpoint");
                    tx.send_replace(true);
                } else {
                    tracing::warn!(signal = name,
                        "second signal: exiting now; unfinished events are delivered again after a restart");
                    std::process::exit(130);
                }
            }
        });
        Ok(Shutdown { requested })
    }

    fn requested(&self) -> impl Future<Output = ()> + 'static {
        let mut requested = self.requested.clone();
        async move {
            let _ = requested.wait_for(|r| *r).await;
        }
    }
}

/// Install the Prometheus recorder (no HTTP listener of its own: `/metrics` is ours).
fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(m::DELIVERY_LATENCY.to_string()),
            &[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ],
        )?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|_| anyhow!("a metrics recorder is already installed"))?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}
