//! `[observers.runtime]`: how the daemon reads and delivers.

use std::time::Duration;

use serde::Deserialize;

use crate::actions::{limits, RateLimit};
use crate::delivery::flow::BreakerSettings;
use crate::error::ConfigError;
use crate::fields::parse_fields;
use crate::listener::StartPosition;

/// `[observers.runtime]`: how the daemon reads and delivers.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeConfig {
    /// Names the checkpoint; instances sharing it share the work (one leads, the others wait).
    pub consumer_id: String,
    /// Longest sleep between polls of an idle change log.
    pub poll_interval: Duration,
    /// Events read per batch.
    pub batch_size: usize,
    /// Deliveries in flight at once (lanes: one entity's events run in order in one lane).
    pub concurrency: usize,
    /// Log an alert when this many committed changes wait to be processed.
    pub backlog_alert_threshold: u64,
    /// How long a shutdown waits for in-flight deliveries before giving up on them.
    pub shutdown_timeout: Duration,
    /// Where a consumer with no checkpoint starts.
    pub start_position: StartPosition,
    /// Also wake up on the NOTIFY hint (`fraiseql-observers notify enable`).
    pub notify: bool,
    /// How often the checkpoint is written.
    pub checkpoint_interval: Duration,
    /// How often the retry worker looks for due retries.
    pub retry_poll_interval: Duration,
    /// Address of the `/metrics` and `/healthz` endpoint (e.g. `127.0.0.1:9464`); none when unset.
    pub metrics_address: Option<String>,
    /// `text` or `json` logs (used by the binary).
    pub log_format: LogFormat,
    /// Exit (non-zero) when the lead is lost or fenced, instead of reconnecting and contending
    /// again in the same process: for supervisors that prefer restarts.
    pub exit_on_lost_lead: bool,
    /// Requests in flight at once per endpoint, for actions that set none (`None`: as many as
    /// `concurrency`).
    pub max_in_flight: Option<usize>,
    /// Rate limit per endpoint, for actions that set none.
    pub rate_limit: Option<RateLimit>,
    /// When an endpoint's circuit breaker opens, and for how long.
    pub circuit_breaker: BreakerSettings,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            consumer_id: "fraiseql-observers".to_string(),
            poll_interval: Duration::from_millis(100),
            batch_size: 1000,
            concurrency: 64,
            backlog_alert_threshold: 1000,
            shutdown_timeout: Duration::from_secs(30),
            start_position: StartPosition::Now,
            notify: false,
            checkpoint_interval: Duration::from_millis(100),
            retry_poll_interval: Duration::from_millis(250),
            metrics_address: None,
            log_format: LogFormat::Text,
            exit_on_lost_lead: false,
            max_in_flight: None,
            rate_limit: None,
            circuit_breaker: BreakerSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRuntime {
    consumer_id: Option<String>,
    poll_interval_ms: Option<u64>,
    batch_size: Option<usize>,
    concurrency: Option<usize>,
    backlog_alert_threshold: Option<u64>,
    shutdown_timeout_ms: Option<u64>,
    start_position: Option<StartPosition>,
    notify: Option<bool>,
    checkpoint_interval_ms: Option<u64>,
    retry_poll_interval_ms: Option<u64>,
    metrics_address: Option<String>,
    log_format: Option<LogFormat>,
    exit_on_lost_lead: Option<bool>,
    max_in_flight: Option<toml::Value>,
    rate_limit: Option<toml::Value>,
    circuit_breaker: Option<toml::Table>,
    /// `[observers.runtime.email]`: the SMTP server email actions use.
    pub(super) email: Option<toml::Table>,
    /// `[observers.runtime.redis]`: the Redis server cache actions use.
    pub(super) redis: Option<toml::Table>,
}

impl RawRuntime {
    pub(super) fn apply(self, r: &mut RuntimeConfig, path: &str, errors: &mut Vec<ConfigError>) {
        let mut positive = |key: &str, value: u64| {
            if value == 0 {
                errors.push(ConfigError::new(
                    format!("{path}.{key}"),
                    "must be at least 1",
                ));
            }
            value
        };
        if let Some(v) = self.consumer_id {
            r.consumer_id = v;
        }
        if let Some(v) = self.poll_interval_ms {
            r.poll_interval = Duration::from_millis(positive("poll_interval_ms", v));
        }
        if let Some(v) = self.batch_size {
            r.batch_size = positive("batch_size", v as u64) as usize;
        }
        if let Some(v) = self.concurrency {
            r.concurrency = positive("concurrency", v as u64) as usize;
        }
        if let Some(v) = self.backlog_alert_threshold {
            r.backlog_alert_threshold = v;
        }
        if let Some(v) = self.shutdown_timeout_ms {
            r.shutdown_timeout = Duration::from_millis(v);
        }
        if let Some(v) = self.checkpoint_interval_ms {
            r.checkpoint_interval = Duration::from_millis(positive("checkpoint_interval_ms", v));
        }
        if let Some(v) = self.retry_poll_interval_ms {
            r.retry_poll_interval = Duration::from_millis(positive("retry_poll_interval_ms", v));
        }
        if let Some(v) = self.start_position {
            r.start_position = v;
        }
        if let Some(v) = self.notify {
            r.notify = v;
        }
        if let Some(v) = self.log_format {
            r.log_format = v;
        }
        if let Some(v) = self.exit_on_lost_lead {
            r.exit_on_lost_lead = v;
        }
        if let Some(v) = self.metrics_address {
            if v.parse::<std::net::SocketAddr>().is_err() {
                errors.push(ConfigError::new(
                    format!("{path}.metrics_address"),
                    format!("'{v}' is not an address like 127.0.0.1:9464"),
                ));
            }
            r.metrics_address = Some(v);
        }
        if let Some(v) = &self.max_in_flight {
            r.max_in_flight = limits::max_in_flight(v, &format!("{path}.max_in_flight"), errors);
        }
        if let Some(v) = &self.rate_limit {
            r.rate_limit = limits::rate_limit(v, &format!("{path}.rate_limit"), errors);
        }
        if let Some(t) = &self.circuit_breaker {
            let at = format!("{path}.circuit_breaker");
            match parse_fields::<RawBreaker, ConfigError>(t, &at) {
                Ok(raw) => {
                    if let Some(n) = raw.failures {
                        r.circuit_breaker.failures = n;
                    }
                    if let Some(ms) = raw.cool_down_ms {
                        if ms == 0 || ms > 3_600_000 {
                            errors.push(ConfigError::new(
                                format!("{at}.cool_down_ms"),
                                "must be from 1 to 3600000",
                            ));
                        }
                        r.circuit_breaker.cool_down = Duration::from_millis(ms);
                    }
                }
                Err(e) => errors.extend(e),
            }
        }
        if r.consumer_id.is_empty() {
            errors.push(ConfigError::new(
                format!("{path}.consumer_id"),
                "must not be empty",
            ));
        }
    }
}

/// `circuit_breaker = { failures = 5, cool_down_ms = 10000 }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBreaker {
    failures: Option<u32>,
    cool_down_ms: Option<u64>,
}
