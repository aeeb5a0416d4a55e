//! Figures: medians with min-max, latency percentiles, the machine, and the `## End to end`
//! tables written into BENCHMARKS.md (between the `e2e:begin` / `e2e:end` markers, so the rest of
//! the file, and the analysis written by hand around the tables, stay as they are).

use serde::Serialize;
use serde_json::Value;

/// Median, min and max of several runs.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: Vec<f64>,
}

impl Summary {
    pub fn of(runs: &[f64]) -> Summary {
        let mut sorted = runs.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n == 0 {
            0.0
        } else if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Summary {
            median,
            min: sorted.first().copied().unwrap_or(0.0),
            max: sorted.last().copied().unwrap_or(0.0),
            runs: runs.to_vec(),
        }
    }

    /// `12,345 (12,001-12,800)`
    pub fn show(&self) -> String {
        if self.runs.len() > 1 {
            format!(
                "{} ({}-{})",
                thousands(self.median),
                thousands(self.min),
                thousands(self.max)
            )
        } else {
            thousands(self.median)
        }
    }
}

/// Commit-to-arrival latency of one steady run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub rate: u64,
    pub secs: u64,
    pub written: u64,
    pub achieved_rate: f64,
    pub delivered: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Latency {
    /// Join the writer's commits with the receiver's arrivals by entity id.
    pub fn of(
        rate: u64,
        secs: u64,
        achieved_rate: f64,
        commits: &[(String, i64)],
        arrivals: &[(String, i64)],
        duplicates: u64,
    ) -> Latency {
        let arrived: std::collections::HashMap<&str, i64> =
            arrivals.iter().map(|(e, t)| (e.as_str(), *t)).collect();
        let mut ms: Vec<f64> = commits
            .iter()
            .filter_map(|(e, c)| arrived.get(e.as_str()).map(|a| (a - c) as f64 / 1e6))
            .collect();
        ms.sort_by(f64::total_cmp);
        let pct = |q: f64| -> f64 {
            if ms.is_empty() {
                return f64::NAN;
            }
            let rank = ((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len());
            ms[rank - 1]
        };
        Latency {
            rate,
            secs,
            written: commits.len() as u64,
            achieved_rate,
            delivered: ms.len() as u64,
            missing: (commits.len() - ms.len()) as u64,
            duplicates,
            p50_ms: pct(0.50),
            p95_ms: pct(0.95),
            p99_ms: pct(0.99),
            max_ms: pct(1.0),
            mean_ms: ms.iter().sum::<f64>() / ms.len().max(1) as f64,
        }
    }
}

pub fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let digits = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// The machine and the moment, for the record.
pub fn machine(server_version: &str) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    serde_json::json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "memory_gib": (mem_kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "postgresql": server_version,
        "rustc": option_env!("RUSTC_VERSION").unwrap_or(""),
    })
}

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn summary(v: &Value) -> String {
    let runs = v["runs"].as_array().map_or(0, Vec::len);
    if runs > 1 {
        format!(
            "{} ({}-{})",
            thousands(f(&v["median"])),
            thousands(f(&v["min"])),
            thousands(f(&v["max"]))
        )
    } else {
        thousands(f(&v["median"]))
    }
}

fn ms(v: &Value) -> String {
    let x = f(v);
    if x.is_nan() {
        "-".into()
    } else if x < 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.0}")
    }
}

fn ratio(v: &Value) -> String {
    let x = f(v);
    if x.is_nan() {
        "-".into()
    } else {
        format!("{x:.2}")
    }
}

/// `median (min-max)` of a summary, each number written by `show`.
fn range(v: &Value, show: impl Fn(f64) -> String) -> String {
    let runs = v["runs"].as_array().map_or(0, Vec::len);
    if !v.is_object() || v["median"].is_null() || runs == 0 {
        return "-".into();
    }
    if runs > 1 {
        format!(
            "{} ({}-{})",
            show(f(&v["median"])),
            show(f(&v["min"])),
            show(f(&v["max"]))
        )
    } else {
        show(f(&v["median"]))
    }
}

fn us(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else {
        format!("{x:.1}")
    }
}

fn times(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else {
        format!("{x:.2}x")
    }
}

fn met(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "**not met**",
        None => "not measured",
    }
}

/// The first count of the daemon's drain (2026-12-07, `69bb510`: 428,059 instructions per
/// event); issue 12's target is half of it.
pub const FIRST_INSTRUCTIONS_PER_EVENT: f64 = 428_059.0;

/// The generated part of the `## End to end` section.
pub fn markdown(results: &Value) -> String {
    let mut md = String::new();
    let m = &results["machine"];
    let settings = &results["settings"];
    let s = &results["scenarios"];
    let ratios = &results["ratios"];
    let dirty = if results["dirty"].as_bool() == Some(true) {
        " (with uncommitted changes)"
    } else {
        " (clean)"
    };
    md.push_str(&format!(
        "Measured {} on {} x {} ({} GiB), PostgreSQL {}; commit `{}`{dirty}; load average (1, 5, 15 min) {} at the start, {} at the end (the machine is shared with other agents' builds: expect noise in the times; the ratios and instruction counts move much less).\n\n",
        results["date"].as_str().unwrap_or(""),
        m["nproc"],
        m["cpu"].as_str().unwrap_or(""),
        m["memory_gib"],
        m["postgresql"].as_str().unwrap_or(""),
        results["commit"].as_str().unwrap_or(""),
        results["load_start"].as_str().unwrap_or(""),
        results["load_end"].as_str().unwrap_or(""),
    ));
    md.push_str(&format!(
        "```sh\ncargo build --release -p fraiseql-observers-cli\n{}\n```\n\n",
        results["command"].as_str().unwrap_or("")
    ));
    if let Some(loads) = results["load_by_scenario"].as_object() {
        let list: Vec<String> = loads
            .iter()
            .map(|(k, v)| format!("{k} {}", v.as_str().unwrap_or("")))
            .collect();
        md.push_str(&format!(
            "Load average as each scenario started: {}.\n\n",
            list.join("; ")
        ));
    }
    let (runs, soak_secs, latency_secs, events) = (
        settings["runs"].as_u64().unwrap_or(0),
        settings["soak_secs"].as_u64().unwrap_or(0),
        settings["latency_secs"].as_u64().unwrap_or(0),
        settings["events"].as_u64().unwrap_or(0),
    );
    md.push_str(&format!(
        "Settings: {runs} run(s) per throughput figure over a backlog of {} changes; latency {latency_secs} s per row; soak {soak_secs} s; the engine is the shipped daemon `{}` (`run --config FILE`, a process of its own, `/metrics` on) unless a row says otherwise.{}\n\n",
        thousands(events as f64),
        settings["binary"].as_str().unwrap_or(""),
        if runs != 3 || soak_secs != 600 || latency_secs != 60 || events != 100_000 {
            " **A reduced run** (the full one is 3 runs, 100,000 changes, 60 s latency rows, a 600 s soak)."
        } else {
            ""
        }
    ));

    // Ratios and instructions first: they travel from machine to machine.
    md.push_str("**Ratios from this run** (median (min-max) over the runs; CPU from `/proc/<pid>/stat` around each drain; events/s quotients run by run):\n\n| ratio | this run | target |\n|---|---:|---|\n");
    for (key, label, target) in [
        (
            "engine_over_postgres",
            "drain to a signed webhook: engine CPU per event / PostgreSQL's",
            "<= 2.0x",
        ),
        (
            "engine_over_receiver",
            "same: engine CPU per event / receiver's",
            "<= 1.5x",
        ),
        (
            "drain_over_graphile",
            "drain events/s / graphile-worker's",
            ">= 5x",
        ),
        (
            "match_only_over_drain",
            "match-only events/s / signed-webhook drain's",
            ">= 4x",
        ),
    ] {
        md.push_str(&format!(
            "| {label} | {} | {target} |\n",
            range(&ratios[key], times)
        ));
    }
    md.push('\n');

    let instructions = s.get("instructions");
    match instructions {
        Some(i) if i.get("skipped").is_some() => md.push_str(&format!(
            "**Instructions per event**: not counted in this run: {}.\n\n",
            i["skipped"].as_str().unwrap_or("")
        )),
        Some(i) => md.push_str(&format!(
            "**Instructions per event** (valgrind callgrind around the daemon, `/metrics` on: a drain of {} and of {} changes, (I(2N) - I(N)) / N, {} pair(s); they do not move with the machine's load or speed): **{}** per delivered event; {} outside the events (start-up, shutdown, idle polls). The first count (2026-12-07, `69bb510`) was {}.\n\n",
            i["events"][0],
            i["events"][1],
            i["instructions_per_event"]["runs"].as_array().map_or(0, Vec::len),
            summary(&i["instructions_per_event"]),
            summary(&i["instructions_outside_events"]),
            thousands(FIRST_INSTRUCTIONS_PER_EVENT),
        )),
        None => md.push_str("**Instructions per event**: the `instructions` scenario was not run.\n\n"),
    }

    md.push_str(&targets(results));

    // Throughput and CPU per event.
    let mut rows: Vec<(String, &Value, String, &Value)> = Vec::new();
    let none = &Value::Null;
    if let Some(d) = s.get("drain") {
        for (key, label) in [
            (
                "daemon",
                "drain, 1 observer, signed webhook: daemon, `/metrics` on",
            ),
            ("daemon_metrics_off", "drain: daemon, `/metrics` off"),
            ("in_process", "drain: engine in the bench process"),
        ] {
            let eps = &d[key]["events_per_s"];
            rows.push((label.to_string(), &d[key], summary(eps), eps));
        }
    }
    if let Some(d) = s.get("match_only") {
        rows.push((
            "match-only: condition false for all (daemon)".into(),
            &d["daemon"],
            "0".into(),
            none,
        ));
    }
    if let Some(d) = s.get("fan_out") {
        rows.push((
            format!(
                "fan-out: 10 observers, {:.2} deliveries per event (daemon)",
                f(&d["deliveries_per_event"])
            ),
            &d["daemon"],
            summary(&d["deliveries_per_s"]),
            none,
        ));
    }
    if let Some(d) = s.get("record_cost") {
        for (key, label) in [
            ("none", "drain, `record = \"none\"` (daemon)"),
            (
                "all",
                "drain, `record = \"all\"`: the delivery log (daemon)",
            ),
        ] {
            let eps = &d[key]["events_per_s"];
            rows.push((label.to_string(), &d[key], summary(eps), eps));
        }
    }
    if !rows.is_empty() || s.get("peer").is_some() {
        md.push_str(&format!(
            "**Throughput and CPU per event** (a backlog of {} committed changes: 10% user inserts, 60% order inserts, 30% order updates; from engine start until its checkpoint passes the last one; median (min-max) of the runs; CPU in microseconds per event, the engine's ratios to PostgreSQL's (the bench database's backends) and the receiver's, measured around the same run):\n\n",
            thousands(events as f64)
        ));
        md.push_str("| scenario | events/s | deliveries/s | engine / PostgreSQL | engine / receiver | engine us | PostgreSQL us | receiver us | peak RSS MiB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for (label, v, deliveries, _) in &rows {
            md.push_str(&format!(
                "| {label} | {} | {deliveries} | {} | {} | {} | {} | {} | {} |\n",
                summary(&v["events_per_s"]),
                range(&v["engine_over_postgres"], times),
                range(&v["engine_over_receiver"], times),
                range(&v["engine_us"], us),
                range(&v["postgres_us"], us),
                range(&v["receiver_us"], us),
                range(&v["peak_rss_mib"], |x| format!("{x:.0}")),
            ));
        }
        if let Some(p) = s.get("peer").and_then(|p| p.get("drain")) {
            md.push_str(&format!(
                "| graphile-worker {} drain (concurrency {}, local queue {}) | {} | {} | | | | | | |\n",
                s["peer"]["version"].as_str().unwrap_or(""),
                s["peer"]["concurrency"],
                s["peer"]["local_queue"],
                summary(&p["events_per_s"]),
                summary(&p["events_per_s"])
            ));
        }
        if let Some(r) = s.get("record_cost") {
            md.push_str(&format!(
                "\nThe delivery log (`record = \"all\"`) keeps {} of the drain's events/s without it (run by run).\n",
                range(&r["all_over_none"], |x| format!("{:.0}%", x * 100.0))
            ));
        }
        md.push('\n');
    }

    if let Some(rows) = s.get("latency").and_then(Value::as_array) {
        md.push_str(&format!("**Latency** from the writer's COMMIT returning to the receiver's arrival (one order per transaction, steady rate, one run of {} s per row; milliseconds; engine us: the daemon's CPU per event at that rate):\n\n", rows.first().map_or(Value::Null, |r| r["secs"].clone())));
        md.push_str("| system | rate/s asked | rate/s written | delivered | p50 | p95 | p99 | max | engine us | target |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
        let peer = s
            .get("peer")
            .and_then(|p| p.get("latency"))
            .and_then(Value::as_array);
        let mut rows: Vec<&Value> = rows.iter().collect();
        rows.sort_by_key(|r| (r["rate"].as_u64(), r["mode"] != "polling"));
        for row in rows {
            let polling = row["mode"] == "polling";
            let target = match (polling, row["rate"].as_u64()) {
                (true, Some(1000)) => "p50 <= 1, p99 <= 5, below graphile-worker",
                (true, _) => "below graphile-worker",
                _ => "",
            };
            let system = format!(
                "fraiseql-observers ({})",
                row["mode"].as_str().unwrap_or("")
            );
            md.push_str(&latency_row(&system, row, target));
            if !polling {
                if let Some(p) = peer.and_then(|p| p.iter().find(|p| p["rate"] == row["rate"])) {
                    md.push_str(&latency_row("graphile-worker (LISTEN/NOTIFY)", p, ""));
                }
            }
        }
        md.push('\n');
    }

    if let Some(p) = s.get("peer") {
        if let Some(reason) = p.get("skipped").and_then(Value::as_str) {
            md.push_str(&format!("**Peer** skipped: {reason}\n\n"));
        } else if let Some(ratios) = p.get("ratios").and_then(Value::as_object) {
            md.push_str("**Against graphile-worker, same run** (ours / theirs: above 1 is ahead for throughput, below 1 is ahead for latency; medians):\n\n| figure | ours / theirs |\n|---|---:|\n");
            for (k, v) in ratios {
                md.push_str(&format!("| {k} | {} |\n", ratio(v)));
            }
            md.push('\n');
        }
    }

    if let Some(soak) = s.get("soak") {
        md.push_str(&format!(
            "**Soak**: {} changes/s for {} s ({} delivered, {} missing, {} duplicates), p50 {} ms, p99 {} ms; the daemon's CPU {} us per event. Its resident memory (`VmRSS`, MiB) every 10 s:\n\n",
            soak["rate"],
            soak["secs"],
            soak["delivered"],
            soak["missing"],
            soak["duplicates"],
            ms(&soak["latency"]["p50_ms"]),
            ms(&soak["latency"]["p99_ms"]),
            us(f(&soak["engine_us_per_event"])),
        ));
        let samples: Vec<String> = soak["samples"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| format!("{:.1}", f(&x["rss_mib"])))
                    .collect()
            })
            .unwrap_or_default();
        md.push_str(&format!("`{}`\n\n", samples.join(" ")));
        md.push_str(&format!(
            "At the start {:.1} MiB, at 1 min {:.1} MiB, at the end {:.1} MiB ({:+.1}% over the 1-minute mark), highest sample {:.1} MiB, peak (`VmHWM`) {:.1} MiB.\n\n",
            f(&soak["rss_start_mib"]),
            f(&soak["rss_1min_mib"]),
            f(&soak["rss_end_mib"]),
            f(&soak["growth_pct"]),
            f(&soak["rss_max_mib"]),
            f(&soak["peak_rss_mib"])
        ));
    }

    if let Some(flow) = s.get("flow") {
        md.push_str("**Flow control** (the daemon): a healthy observer's latency at 500 changes/s beside a second observer whose endpoint accepts connections and never answers, against a control run where the second endpoint is healthy; and a `rate_limit` of 50/s with 100/s offered:\n\n| run | delivered | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|\n");
        for (key, label) in [
            ("control", "control (both endpoints healthy)"),
            ("hung_endpoint", "the other endpoint hung"),
        ] {
            let r = &flow[key];
            md.push_str(&format!(
                "| {label} | {}/{} | {} | {} | {} |\n",
                thousands(f(&r["delivered"])),
                thousands(f(&r["written"])),
                ms(&r["p50_ms"]),
                ms(&r["p99_ms"]),
                ms(&r["max_ms"]),
            ));
        }
        let r = &flow["rate_limit"];
        md.push_str(&format!(
            "\nRate limit {}/s: {:.1} deliveries/s on average over {} s (each second between {} and {}).\n\n",
            r["limit_per_s"],
            f(&r["average_per_s"]),
            r["window_s"],
            r["per_second_min"],
            r["per_second_max"],
        ));
    }

    if let Some(rows) = s.get("writer_cost").and_then(|w| w["rows"].as_array()) {
        let settings = &s["writer_cost"]["settings"];
        md.push_str(&format!(
            "**Writer cost**: single-row INSERTs into `tb_order` per second (pgbench `-M prepared`, one INSERT per transaction, {} s per run, the variants in turn within each of {} rounds; `synchronous_commit = {}`, `jit = {}`); median (min-max), and each run over the plain run of its round:\n\n",
            s["writer_cost"]["secs"],
            s["writer_cost"]["runs"],
            settings["synchronous_commit"].as_str().unwrap_or("?"),
            settings["jit"].as_str().unwrap_or("?"),
        ));
        md.push_str(
            "| writers | variant | inserts/s | vs plain, same round |\n|---:|---|---:|---:|\n",
        );
        for row in rows {
            md.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                row["clients"],
                row["variant"].as_str().unwrap_or(""),
                summary(&row["tps"]),
                kept(row).map_or("-".into(), |(m, lo, hi)| format!(
                    "{:.0}% ({:.0}-{:.0}%)",
                    m * 100.0,
                    lo * 100.0,
                    hi * 100.0
                )),
            ));
        }
        md.push('\n');
    }
    md
}

/// A writer-cost row's share of plain inserts/s: median, min, max over the rounds.
fn kept(row: &Value) -> Option<(f64, f64, f64)> {
    let rounds = &row["vs_plain_rounds"];
    match (
        rounds["median"].as_f64(),
        rounds["min"].as_f64(),
        rounds["max"].as_f64(),
    ) {
        (Some(m), Some(lo), Some(hi)) => Some((m, lo, hi)),
        _ => row["vs_plain"].as_f64().map(|x| (x, x, x)),
    }
}

/// Issue 12's targets against this run.
fn targets(results: &Value) -> String {
    let s = &results["scenarios"];
    let ratios = &results["ratios"];
    let mut md = String::from(
        "**Issue 12's targets** (medians of this run):\n\n| target | this run | |\n|---|---|---|\n",
    );
    let median = |v: &Value| v["median"].as_f64();
    for (key, label, bound, at_most) in [
        (
            "engine_over_postgres",
            "drain: engine CPU per event / PostgreSQL's <= 2.0x",
            2.0,
            true,
        ),
        (
            "engine_over_receiver",
            "drain: engine CPU per event / receiver's <= 1.5x",
            1.5,
            true,
        ),
        (
            "drain_over_graphile",
            "drain events/s / graphile-worker's >= 5x",
            5.0,
            false,
        ),
        (
            "match_only_over_drain",
            "match-only events/s / drain's >= 4x",
            4.0,
            false,
        ),
    ] {
        let value = median(&ratios[key]);
        let ok = value.map(|v| if at_most { v <= bound } else { v >= bound });
        md.push_str(&format!(
            "| {label} | {} | {} |\n",
            range(&ratios[key], times),
            met(ok)
        ));
    }
    let latency = s.get("latency").and_then(Value::as_array);
    let ours = |rate: u64| {
        latency.and_then(|rows| {
            rows.iter()
                .find(|r| r["rate"].as_u64() == Some(rate) && r["mode"] == "polling")
        })
    };
    match ours(1000) {
        Some(r) => {
            let (p50, p99) = (f(&r["p50_ms"]), f(&r["p99_ms"]));
            md.push_str(&format!(
                "| latency at 1,000/s, polling: p50 <= 1 ms, p99 <= 5 ms | p50 {} ms, p99 {} ms | {} |\n",
                ms(&r["p50_ms"]),
                ms(&r["p99_ms"]),
                met(Some(p50 <= 1.0 && p99 <= 5.0))
            ));
        }
        None => md.push_str(
            "| latency at 1,000/s, polling: p50 <= 1 ms, p99 <= 5 ms | - | not measured |\n",
        ),
    }
    let peer = s
        .get("peer")
        .and_then(|p| p.get("latency"))
        .and_then(Value::as_array);
    match peer {
        Some(theirs) if !theirs.is_empty() => {
            let mut parts = Vec::new();
            let mut all = true;
            let mut compared = false;
            for t in theirs {
                let rate = t["rate"].as_u64().unwrap_or(0);
                let sustained = f(&t["achieved_rate"]) >= 0.95 * rate as f64;
                let Some(o) = ours(rate) else { continue };
                if !sustained {
                    parts.push(format!(
                        "{}/s: graphile-worker's writer reached {}/s (not sustained)",
                        thousands(rate as f64),
                        thousands(f(&t["achieved_rate"]))
                    ));
                    continue;
                }
                let below = f(&o["p50_ms"]) < f(&t["p50_ms"]) && f(&o["p99_ms"]) < f(&t["p99_ms"]);
                all &= below;
                compared = true;
                parts.push(format!(
                    "{}/s: p50 {} vs {} ms, p99 {} vs {} ms",
                    thousands(rate as f64),
                    ms(&o["p50_ms"]),
                    ms(&t["p50_ms"]),
                    ms(&o["p99_ms"]),
                    ms(&t["p99_ms"])
                ));
            }
            md.push_str(&format!(
                "| latency, polling, below graphile-worker's (p50 and p99) at every rate it sustains | {} | {} |\n",
                parts.join("; "),
                if compared {
                    met(Some(all))
                } else {
                    "not comparable: graphile-worker sustained no rate"
                }
            ));
        }
        _ => md.push_str("| latency, polling, below graphile-worker's at every rate it sustains | - | not measured |\n"),
    }
    let writers = s.get("writer_cost").and_then(|w| w["rows"].as_array());
    let capture = |clients: u64| {
        writers.and_then(|rows| {
            rows.iter()
                .find(|r| r["clients"].as_u64() == Some(clients) && r["variant"] == "capture")
                .and_then(kept)
        })
    };
    match (capture(1), capture(16)) {
        (Some(one), Some(sixteen)) => md.push_str(&format!(
            "| writers kept with capture, 1 / 16 clients: >= 85% / >= 75% | {:.0}% ({:.0}-{:.0}%) / {:.0}% ({:.0}-{:.0}%) | {} |\n",
            one.0 * 100.0, one.1 * 100.0, one.2 * 100.0,
            sixteen.0 * 100.0, sixteen.1 * 100.0, sixteen.2 * 100.0,
            met(Some(one.0 >= 0.85 && sixteen.0 >= 0.75))
        )),
        _ => md.push_str("| writers kept with capture, 1 / 16 clients: >= 85% / >= 75% | - | not measured |\n"),
    }
    match s.get("soak") {
        Some(soak) => {
            let (max, growth) = (f(&soak["rss_max_mib"]), f(&soak["growth_pct"]));
            md.push_str(&format!(
                "| memory, soak at 2,000/s ({} s): < 60 MB, flat (end within 10% of the 1-minute mark) | highest {:.1} MiB, end {:.1} MiB ({:+.1}%) | {} |\n",
                soak["secs"],
                max,
                f(&soak["rss_end_mib"]),
                growth,
                met(Some(max * 1.048_576 < 60.0 && growth <= 10.0))
            ));
        }
        None => {
            md.push_str("| memory, 10-minute soak at 2,000/s: < 60 MB, flat | - | not measured |\n")
        }
    }
    match s.get("instructions").filter(|i| i.get("skipped").is_none()) {
        Some(i) => {
            let v = f(&i["instructions_per_event"]["median"]);
            md.push_str(&format!(
                "| instructions per event, drain path: half of the first count ({}), <= {} | {} | {} |\n",
                thousands(FIRST_INSTRUCTIONS_PER_EVENT),
                thousands(FIRST_INSTRUCTIONS_PER_EVENT / 2.0),
                summary(&i["instructions_per_event"]),
                met(Some(v <= FIRST_INSTRUCTIONS_PER_EVENT / 2.0))
            ));
        }
        None => md.push_str(
            "| instructions per event, drain path: half of the first count | - | not measured |\n",
        ),
    }
    md.push('\n');
    md
}

fn latency_row(system: &str, row: &Value, target: &str) -> String {
    format!(
        "| {system} | {} | {} | {}/{} | {} | {} | {} | {} | {} | {target} |\n",
        thousands(f(&row["rate"])),
        thousands(f(&row["achieved_rate"])),
        thousands(f(&row["delivered"])),
        thousands(f(&row["written"])),
        ms(&row["p50_ms"]),
        ms(&row["p95_ms"]),
        ms(&row["p99_ms"]),
        ms(&row["max_ms"]),
        us(f(&row["engine_us_per_event"])),
    )
}

/// Put `generated` between the markers of the `## End to end` section of `path`, creating the
/// file or the section when missing; every other part of the file is kept.
pub fn write_section(path: &std::path::Path, generated: &str) -> std::io::Result<()> {
    const BEGIN: &str = "<!-- e2e:begin (generated by the e2e bench; edit outside the markers) -->";
    const END: &str = "<!-- e2e:end -->";
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n".to_string());
    let block = format!("{BEGIN}\n{generated}{END}");
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if b < e => format!("{}{block}{}", &old[..b], &old[e + END.len()..]),
        _ => {
            let mut s = old.trim_end().to_string();
            if !s.contains("## End to end") {
                s.push_str("\n\n## End to end\n");
            }
            // Right after the section heading.
            let at = s.find("## End to end").expect("heading") + "## End to end".len();
            let line_end = s[at..].find('\n').map_or(s.len(), |i| at + i);
            let (head, tail) = s.split_at(line_end);
            format!("{head}\n\n{block}\n{tail}\n")
        }
    };
    std::fs::write(path, new)
}
