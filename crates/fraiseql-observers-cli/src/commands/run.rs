//! `run --config FILE`: the daemon.
//!
//! ```text
//! config -> tracing, Prometheus recorder, /metrics + /healthz -> lead (or stand by)
//!        -> Pipeline::start + Pipeline::run until SIGINT/SIGTERM
//! ```
//!
//! Invariants:
//! * It reads and delivers only while it leads its consumer (the advisory lock); it stands by
//!   otherwise, answering `/healthz` as a standby.
//! * The lead lost (lock connection gone) or fenced (another instance bumped the epoch): it stops
//!   at once, without draining or saving its checkpoint (the new leader owns both), and exits 1.
//! * The first SIGINT/SIGTERM stops reading, lets in-flight deliveries finish (up to the
//!   shutdown timeout), saves the checkpoint and exits 0; a second one exits at once (130).

use crate::server::{self, Health, Role};
use crate::Cli;
use anyhow::{anyhow, Context as _};
use fraiseql_observers::config::LogFormat;
use fraiseql_observers::leader::Leadership;
use fraiseql_observers::metrics as m;
use fraiseql_observers::{Error, Pipeline};
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
    let config = match super::config_path(cli).and_then(super::load_config) {
        Ok(config) => config,
        Err(e) => {
            super::init_tracing(LogFormat::Text, "info");
            return Err(e);
        }
    };
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

    let on_standby = {
        let health = health.clone();
        move || health.set_role(Role::Standby)
    };
    let leadership = tokio::select! {
        leadership = Leadership::acquire(&url, &consumer, on_standby) => leadership?,
        _ = shutdown.requested() => {
            tracing::info!(consumer = %consumer, "stopped before taking the lead");
            return Ok(ExitCode::SUCCESS);
        }
    };
    health.set_role(Role::Leader);

    let (pipeline, epoch) = tokio::select! {
        biased;
        _ = leadership.lost() => return Err(lost(&consumer)),
        started = Pipeline::start(&url, config) => {
            let pipeline = started.context("cannot start reading the change log")?;
            let epoch = pipeline.epoch();
            (pipeline, epoch)
        }
        _ = shutdown.requested() => {
            tracing::info!(consumer = %consumer, "stopped while starting");
            return Ok(ExitCode::SUCCESS);
        }
    };
    health.set_engine(pipeline.status());

    // Dropping `run` (the lead is lost) aborts every task it started: no draining, no checkpoint.
    let run = pipeline.run(shutdown.requested());
    tokio::select! {
        biased;
        _ = leadership.lost() => Err(lost(&consumer)),
        result = run => match result {
            Ok(()) => {
                tracing::info!(consumer = %consumer, "stopped");
                Ok(ExitCode::SUCCESS)
            }
            Err(Error::Fenced { .. }) => {
                tracing::error!(consumer = %consumer, epoch,
                    "fenced: another instance leads this consumer now; stopped at once");
                Err(anyhow!(
                    "consumer '{consumer}' is led by another instance now (this one held epoch {epoch}); stopped without saving the checkpoint"
                ))
            }
            Err(e) => Err(anyhow!(e).context("the daemon stopped on an error")),
        },
    }
}

fn lost(consumer: &str) -> anyhow::Error {
    anyhow!(
        "lost the lead of consumer '{consumer}' (the lock connection failed); stopped at once, without draining: another instance may lead now"
    )
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
