//! `run --config FILE`: the daemon.
//!
//! ```text
//! config -> tracing, Prometheus recorder, /metrics + /healthz
//!        -> leader::lead (stand by, lead, run; contend again when the lead is lost) until SIGINT/SIGTERM
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
//! * The first SIGINT/SIGTERM stops reading, lets in-flight deliveries finish (up to the
//!   shutdown timeout), saves the checkpoint and exits 0; a second one exits at once (130).

use crate::server::{self, Health, Role};
use crate::Cli;
use anyhow::{anyhow, Context as _};
use fraiseql_observers::config::{self, LogFormat};
use fraiseql_observers::leader::{self, LeadState};
use fraiseql_observers::metrics as m;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

pub async fn execute(cli: &Cli) -> anyhow::Result<ExitCode> {
    // Signals first: one arriving while the daemon starts must stop it cleanly, not kill it.
    let shutdown = Shutdown::install()?;
    let path = super::config_path(cli)?;
    let text = super::read_file(path);
    let compile = |text: &str| {
        config::load(text, &super::env_lookup)
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
    tracing::info!(consumer = %consumer, observers = config.observers.len(), "starting");

    let report = |state: LeadState| match state {
        LeadState::Standby => health.set_role(Role::Standby),
        LeadState::Leading(status) => health.lead(status),
        LeadState::Reconnecting => health.set_role(Role::Reconnecting),
    };
    // The observers are compiled again for each new lead (from the text read at start).
    let recompile = || config::load(&text, &super::env_lookup);
    match leader::lead(&url, config, recompile, report, shutdown.requested()).await {
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
