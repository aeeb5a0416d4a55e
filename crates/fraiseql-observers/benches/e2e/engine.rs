//! Our engine, in-process, started exactly as the daemon starts it (`Pipeline::start`, `run`),
//! and the observers each scenario configures.

use fraiseql_observers::pipeline::EngineStatus;
use fraiseql_observers::{config, Pipeline};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::Client;

pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn env(name: &str) -> Option<String> {
    (name == "BENCH_SECRET").then(|| SECRET.to_string())
}

pub struct Engine {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<fraiseql_observers::Result<()>>,
    pub status: Arc<EngineStatus>,
}

impl Engine {
    /// Start consumer `consumer` with `observers` (TOML) and the documented runtime defaults
    /// plus `runtime_extra` (TOML lines of `[observers.runtime]`); a new consumer starts from the
    /// beginning of the log unless `runtime_extra` sets `start_position`.
    pub async fn start(url: &str, consumer: &str, runtime_extra: &str, observers: &str) -> Engine {
        let start = if runtime_extra.contains("start_position") {
            ""
        } else {
            "start_position = \"beginning\"\n"
        };
        // FRAISEQL_BENCH_RUNTIME: extra `[observers.runtime]` lines for every engine (to try
        // other settings than the defaults, e.g. "concurrency = 16").
        let tuning = std::env::var("FRAISEQL_BENCH_RUNTIME")
            .unwrap_or_default()
            .replace("\\n", "\n");
        let text = format!(
            "[observers.runtime]\nconsumer_id = \"{consumer}\"\n{start}{runtime_extra}\n{tuning}\n{observers}"
        );
        let config = config::load(&text, &env).unwrap_or_else(|e| panic!("{e}"));
        let pipeline = Pipeline::start(url, config)
            .await
            .expect("the pipeline starts");
        let status = pipeline.status();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(pipeline.run(async {
            let _ = stopped.await;
        }));
        Engine {
            stop: Some(stop),
            handle,
            status,
        }
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().expect("running").send(());
        tokio::time::timeout(Duration::from_secs(60), &mut self.handle)
            .await
            .expect("the engine stops")
            .expect("engine task")
            .expect("the engine ran without error");
    }

    /// Whether the engine stopped on its own (an error).
    pub fn failed(&self) -> bool {
        self.handle.is_finished()
    }
}

/// The highest writing transaction in the change log (everything waiting was committed by then).
pub async fn last_txid(client: &Client) -> String {
    client
        .query_one("SELECT max(txid)::text FROM core.tb_entity_change_log", &[])
        .await
        .expect("last txid")
        .get::<_, Option<String>>(0)
        .expect("the change log is not empty")
}

/// Whether `consumer` is done with everything up to transaction `txid`: its checkpoint covers
/// it and none of its deliveries waits in the retry queue (a delivery whose endpoint stays
/// saturated for `flow::MAX_WAIT` is deferred there, and the checkpoint moves past it).
pub async fn drained(client: &Client, consumer: &str, txid: &str) -> bool {
    client
        .query_opt(
            "SELECT pg_visible_in_snapshot($2::text::xid8, snapshot)
                    AND NOT EXISTS (SELECT 1 FROM core.observer_retry_queue q
                                     WHERE q.consumer_id = $1)
               FROM core.observer_checkpoints WHERE consumer_id = $1",
            &[&consumer, &txid],
        )
        .await
        .expect("checkpoint")
        .is_some_and(|r| r.get::<_, bool>(0))
}

/// One webhook observer (signed, to the local receiver).
pub fn webhook_observer(
    name: &str,
    entity: &str,
    kinds: &str,
    condition: &str,
    url: &str,
) -> String {
    let condition = if condition.is_empty() {
        String::new()
    } else {
        format!("condition = \"{condition}\"\n")
    };
    format!(
        "[observers.{name}]\nentity = \"{entity}\"\nevent_type = {kinds}\n{condition}\n\
         [[observers.{name}.actions]]\ntype = \"webhook\"\nurl = \"{url}\"\n\
         signing_secret_env = \"BENCH_SECRET\"\nallow_private_networks = true\n\n"
    )
}

pub const ALL_KINDS: &str = r#"["INSERT", "UPDATE", "DELETE"]"#;
pub const ORDER_KINDS: &str = r#"["INSERT", "UPDATE"]"#;

/// The fan-out scenario's ten observers: (name, entity, kinds, CEL condition, SQL twin of the
/// condition over a change-log row `l` with `d` its current image), about three per event.
pub const FAN_OUT: &[(&str, &str, &str, &str, &str)] = &[
    ("big_orders", "Order", ORDER_KINDS, "total > 500",
     "(d->>'total')::numeric > 500"),
    ("small_orders", "Order", ORDER_KINDS, "total <= 500",
     "(d->>'total')::numeric <= 500"),
    ("eu_orders", "Order", ORDER_KINDS, "region == 'eu'", "d->>'region' = 'eu'"),
    ("us_orders", "Order", ORDER_KINDS, "region == 'us'", "d->>'region' = 'us'"),
    ("other_regions", "Order", ORDER_KINDS, "region in ['apac', 'latam']",
     "d->>'region' IN ('apac', 'latam')"),
    ("urgent", "Order", ORDER_KINDS, "priority == 'high' && status != 'cancelled'",
     "d->>'priority' = 'high' AND d->>'status' <> 'cancelled'"),
    ("status_changed", "Order", r#""UPDATE""#, "field_changed('status')",
     "l.modification_type = 'UPDATE' AND l.object_data->'before'->'status' IS DISTINCT FROM l.object_data->'after'->'status'"),
    ("example_customers", "Order", ORDER_KINDS, "lower(customer_email).endsWith('@example.com')",
     "lower(d->>'customer_email') LIKE '%@example.com'"),
    ("coupons", "Order", ORDER_KINDS, "coupon_code != null && size(items) >= 3",
     "d->>'coupon_code' IS NOT NULL AND jsonb_array_length(d->'items') >= 3"),
    ("active_signups", "User", r#""INSERT""#, "is_active && (email_verified || role == 'admin')",
     "(d->>'is_active')::bool AND ((d->>'email_verified')::bool OR d->>'role' = 'admin')"),
];

/// The deliveries the fan-out observers must make for the whole change log, by their SQL twins.
pub async fn fan_out_expected(client: &Client) -> i64 {
    let mut sum = 0;
    for (_, entity, kinds, _, twin) in FAN_OUT {
        let kinds = kinds
            .trim_matches(|c| c == '[' || c == ']')
            .replace('"', "'");
        let n: i64 = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM core.tb_entity_change_log l,
                        LATERAL (SELECT coalesce(l.object_data->'after', l.object_data->'before') AS d) x
                      WHERE l.object_type = '{entity}' AND l.modification_type IN ({kinds}) AND {twin}"
                ),
                &[],
            )
            .await
            .expect("expected fan-out count")
            .get(0);
        sum += n;
    }
    sum
}

/// Resident memory of this process in KiB (`VmRSS`).
pub fn rss_kib() -> u64 {
    status_kib("VmRSS:")
}

/// Peak resident memory of this process in KiB (`VmHWM`; reset by writing 5 to
/// `/proc/self/clear_refs`).
pub fn peak_rss_kib() -> u64 {
    status_kib("VmHWM:")
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
