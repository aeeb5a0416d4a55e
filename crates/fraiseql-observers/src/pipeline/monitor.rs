//! The monitor: live figures for `/healthz` and `/metrics` (listener health, events in flight,
//! backlog and lag, retry-queue and dead-letter sizes), measured on a connection of its own so
//! that counting never delays a bookkeeping write.

use crate::db;
use crate::delivery::lanes::Watermark;
use crate::delivery::{dead_letter, retry_queue};
use crate::error::Result;
use crate::listener::{backlog, ListenerStats};
use crate::metrics as m;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Live figures the daemon shows at `/healthz` and that tests read.
#[derive(Debug, Default)]
pub struct EngineStatus {
    pub events_read: AtomicU64,
    pub events_matched: AtomicU64,
    pub backlog: AtomicU64,
    pub lag_ms: AtomicI64,
    pub backlog_alert: AtomicBool,
    pub listener_healthy: AtomicBool,
    pub in_flight: AtomicU64,
}

/// What the monitor watches.
pub(super) struct Monitor {
    pub status: Arc<EngineStatus>,
    pub stats: Arc<ListenerStats>,
    pub watermark: Arc<Watermark>,
    pub connection: db::Reconnecting,
    pub consumer: String,
    pub sequence_column: &'static str,
    pub backlog_alert_threshold: u64,
}

impl Monitor {
    /// Measure forever, spending at most a tenth of the time on counting (a huge backlog is
    /// not free to count), at least once a second.
    pub async fn run(self) {
        loop {
            let healthy = self.stats.is_healthy();
            self.status
                .listener_healthy
                .store(healthy, Ordering::Relaxed);
            metrics::gauge!(m::LISTENER_HEALTHY).set(if healthy { 1.0 } else { 0.0 });
            let in_flight = self.watermark.in_flight();
            self.status
                .in_flight
                .store(in_flight as u64, Ordering::Relaxed);
            metrics::gauge!(m::IN_FLIGHT).set(in_flight as f64);
            let started = tokio::time::Instant::now();
            if let Err(e) = self.measure().await {
                tracing::debug!(error = %e, "backlog measurement failed");
            }
            let pause = (started.elapsed() * 10).max(Duration::from_secs(1));
            tokio::time::sleep(pause).await;
        }
    }

    async fn measure(&self) -> Result<()> {
        let client = self.connection.client().await?;
        let Some(measured) =
            backlog::measure(&client, &self.consumer, self.sequence_column).await?
        else {
            return Ok(());
        };
        let (rows, lag) = (measured.rows, measured.lag_seconds);
        self.status.backlog.store(rows, Ordering::Relaxed);
        self.status
            .lag_ms
            .store((lag * 1000.0) as i64, Ordering::Relaxed);
        metrics::gauge!(m::BACKLOG).set(rows as f64);
        metrics::gauge!(m::LAG_SECONDS).set(lag);
        let threshold = self.backlog_alert_threshold;
        let alert = rows > threshold;
        let was = self.status.backlog_alert.swap(alert, Ordering::Relaxed);
        if alert && !was {
            tracing::warn!(consumer = %self.consumer, backlog = rows, threshold, lag_seconds = lag,
                "backlog alert: committed changes are waiting faster than they are processed");
        } else if !alert && was {
            tracing::info!(consumer = %self.consumer, backlog = rows, threshold,
                "backlog back under the threshold");
        }
        let queued = retry_queue::len(&client, &self.consumer).await?;
        metrics::gauge!(m::RETRY_QUEUE).set(queued as f64);
        let dlq = dead_letter::pending_count(&client, &self.consumer).await?;
        metrics::gauge!(m::DLQ_PENDING).set(dlq as f64);
        Ok(())
    }
}
