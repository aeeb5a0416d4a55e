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

/// A summary of small numbers: `5.12 (4.98-5.40)`.
fn ratios(v: &Value) -> String {
    let runs = v["runs"].as_array().map_or(0, Vec::len);
    if runs > 1 {
        format!(
            "{} ({}-{})",
            ratio(&v["median"]),
            ratio(&v["min"]),
            ratio(&v["max"])
        )
    } else {
        ratio(&v["median"])
    }
}

/// The generated part of the `## End to end` section.
pub fn markdown(results: &Value) -> String {
    let mut md = String::new();
    let m = &results["machine"];
    md.push_str(&format!(
        "Measured {} on {} x {} ({} GiB), PostgreSQL {}, commit `{}`; load average {} at the start, {} at the end (the machine is shared with other agents' builds: expect noise).\n\n",
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
        "```sh\n{}\n```\n\n",
        results["command"].as_str().unwrap_or("")
    ));

    let s = &results["scenarios"];
    if s.get("drain").is_some() || s.get("fan_out").is_some() || s.get("peer").is_some() {
        md.push_str("**Throughput** (a backlog of committed changes, from engine start until the checkpoint passes the last one; median (min-max) of the runs):\n\n");
        md.push_str(
            "| scenario | events | events/s | deliveries/s | target |\n|---|---:|---:|---:|---|\n",
        );
        if let Some(d) = s.get("drain") {
            md.push_str(&format!(
                "| drain: 1 observer, signed webhook | {} | {} | {} | >= 20,000 |\n",
                thousands(f(&d["events"])),
                summary(&d["events_per_s"]),
                summary(&d["events_per_s"])
            ));
        }
        if let Some(d) = s.get("match_only") {
            md.push_str(&format!(
                "| match-only: condition false for all | {} | {} | 0 | >= 50,000 |\n",
                thousands(f(&d["events"])),
                summary(&d["events_per_s"])
            ));
        }
        if let Some(d) = s.get("fan_out") {
            md.push_str(&format!(
                "| fan-out: 10 observers, {:.2} deliveries per event | {} | {} | {} | |\n",
                f(&d["deliveries_per_event"]),
                thousands(f(&d["events"])),
                summary(&d["events_per_s"]),
                summary(&d["deliveries_per_s"])
            ));
        }
        if let Some(p) = s.get("peer").and_then(|p| p.get("drain")) {
            md.push_str(&format!(
                "| graphile-worker {} drain (concurrency {}, local queue {}) | {} | {} | {} | |\n",
                s["peer"]["version"].as_str().unwrap_or(""),
                s["peer"]["concurrency"],
                s["peer"]["local_queue"],
                thousands(f(&p["events"])),
                summary(&p["events_per_s"]),
                summary(&p["events_per_s"])
            ));
        }
        md.push('\n');
    }

    if let Some(i) = s.get("instructions") {
        md.push_str(&format!(
            "**Instructions per event** (valgrind callgrind around the daemon `{}`, `/metrics` on: a drain of {} and of {} events, (I(2N) - I(N)) / N; they do not move with the machine's load or speed): **{}** per event; {} outside the events (start-up, shutdown, idle polls).\n\n",
            i["binary"].as_str().unwrap_or(""),
            i["events"][0],
            i["events"][1],
            summary(&i["instructions_per_event"]),
            summary(&i["instructions_outside_events"]),
        ));
    }

    let mut cpu_rows: Vec<(&str, &Value)> = Vec::new();
    if let Some(d) = s.get("drain") {
        cpu_rows.push(("drain (engine in the bench process)", &d["cpu_per_event"]));
    }
    if let Some(d) = s.get("drain_binary") {
        cpu_rows.push((
            "drain (daemon, `/metrics` on)",
            &d["metrics_on"]["cpu_per_event"],
        ));
        cpu_rows.push((
            "drain (daemon, `/metrics` off)",
            &d["metrics_off"]["cpu_per_event"],
        ));
    }
    for (label, key) in [("match-only", "match_only"), ("fan-out", "fan_out")] {
        if let Some(d) = s.get(key) {
            cpu_rows.push((label, &d["cpu_per_event"]));
        }
    }
    cpu_rows.retain(|(_, v)| v.is_object());
    if !cpu_rows.is_empty() {
        md.push_str("**CPU per event** (median run by engine CPU; the ratios are of work measured in the same run and travel from machine to machine better than the microseconds; the engine is the bench process or the daemon, PostgreSQL the backends of the bench database):\n\n| scenario | engine / PostgreSQL | engine / receiver | engine us | PostgreSQL us | receiver us |\n|---|---:|---:|---:|---:|---:|\n");
        for (label, v) in cpu_rows {
            md.push_str(&format!(
                "| {label} | {} | {} | {:.1} | {:.1} | {:.1} |\n",
                ratio(&v["engine_over_postgres"]),
                ratio(&v["engine_over_receiver"]),
                f(&v["engine_us"]),
                f(&v["postgres_us"]),
                f(&v["receiver_us"])
            ));
        }
        md.push('\n');
    }
    if let Some(d) = s.get("drain_binary") {
        md.push_str(&format!(
            "**The daemon** (`{}`, a process of its own), drain of {} events, `/metrics` on and off in alternating runs:\n\n| `/metrics` | events/s | engine / PostgreSQL | engine / receiver | peak RSS MiB |\n|---|---:|---:|---:|---:|\n",
            d["binary"].as_str().unwrap_or(""),
            thousands(f(&d["events"]))
        ));
        for (label, key) in [("on", "metrics_on"), ("off", "metrics_off")] {
            let m = &d[key];
            md.push_str(&format!(
                "| {label} | {} | {} | {} | {} |\n",
                summary(&m["events_per_s"]),
                ratios(&m["engine_over_postgres"]),
                ratios(&m["engine_over_receiver"]),
                summary(&m["peak_rss_mib"]),
            ));
        }
        md.push('\n');
    }

    if let Some(rows) = s.get("latency").and_then(Value::as_array) {
        md.push_str(&format!("**Latency** from the writer's COMMIT to the receiver's arrival (one row per transaction, steady rate, {} s per row of the table; milliseconds):\n\n", rows.first().map_or(Value::Null, |r| r["secs"].clone())));
        md.push_str("| system | rate/s asked | rate/s written | delivered | p50 | p95 | p99 | max | target |\n|---|---:|---:|---:|---:|---:|---:|---:|---|\n");
        let peer = s
            .get("peer")
            .and_then(|p| p.get("latency"))
            .and_then(Value::as_array);
        let mut rows: Vec<&Value> = rows.iter().collect();
        rows.sort_by_key(|r| (r["rate"].as_u64(), r["mode"] != "polling"));
        for row in rows {
            let target = if row["rate"].as_u64() == Some(1000) {
                "p50 <= 5, p99 <= 25"
            } else {
                "p99 <= 100"
            };
            let polling = row["mode"] == "polling";
            let system = format!(
                "fraiseql-observers ({})",
                row["mode"].as_str().unwrap_or("")
            );
            md.push_str(&latency_row(
                &system,
                row,
                if polling { target } else { "" },
            ));
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
            md.push_str("**Against graphile-worker, same run** (ours / theirs: above 1 is ahead for throughput, below 1 is ahead for latency):\n\n| figure | ours / theirs |\n|---|---:|\n");
            for (k, v) in ratios {
                md.push_str(&format!("| {k} | {} |\n", ratio(v)));
            }
            md.push('\n');
        }
    }

    if let Some(soak) = s.get("soak") {
        md.push_str(&format!(
            "**Soak**: {} changes/s for {} s ({} delivered, {} missing, {} duplicates). Engine resident memory (MiB) every 10 s:\n\n",
            soak["rate"], soak["secs"], soak["delivered"], soak["missing"], soak["duplicates"]
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
            "At 1 min {:.1} MiB, at the end {:.1} MiB ({:+.1}%), highest {:.1} MiB; target < 100 MiB and the end within 10% of the 1-minute mark.\n\n",
            f(&soak["rss_1min_mib"]),
            f(&soak["rss_end_mib"]),
            f(&soak["growth_pct"]),
            f(&soak["rss_max_mib"])
        ));
    }

    if let Some(rows) = s.get("writer_cost").and_then(|w| w["rows"].as_array()) {
        let settings = &s["writer_cost"]["settings"];
        md.push_str(&format!(
            "**Writer cost**: single-row INSERTs into `tb_order` per second (pgbench `-M prepared`, one INSERT per transaction, {} s per run, the variants in turn within each of {} rounds; `synchronous_commit = {}`, `jit = {}`); median (min-max), and each run over the plain run of its round. Target: capture keeps >= 85% of plain with 1 writer, >= 75% with 16:\n\n",
            s["writer_cost"]["secs"],
            s["writer_cost"]["runs"],
            settings["synchronous_commit"].as_str().unwrap_or("?"),
            settings["jit"].as_str().unwrap_or("?"),
        ));
        md.push_str(
            "| writers | variant | inserts/s | vs plain, same round |\n|---:|---|---:|---:|\n",
        );
        for row in rows {
            let rounds = &row["vs_plain_rounds"];
            md.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                row["clients"],
                row["variant"].as_str().unwrap_or(""),
                summary(&row["tps"]),
                match (
                    rounds["median"].as_f64(),
                    rounds["min"].as_f64(),
                    rounds["max"].as_f64()
                ) {
                    (Some(m), Some(lo), Some(hi)) =>
                        format!("{:.0}% ({:.0}-{:.0}%)", m * 100.0, lo * 100.0, hi * 100.0),
                    _ => row["vs_plain"]
                        .as_f64()
                        .map_or("-".into(), |x| format!("{:.0}%", x * 100.0)),
                }
            ));
        }
        md.push('\n');
    }
    md
}

fn latency_row(system: &str, row: &Value, target: &str) -> String {
    format!(
        "| {system} | {} | {} | {}/{} | {} | {} | {} | {} | {target} |\n",
        thousands(f(&row["rate"])),
        thousands(f(&row["achieved_rate"])),
        thousands(f(&row["delivered"])),
        thousands(f(&row["written"])),
        ms(&row["p50_ms"]),
        ms(&row["p95_ms"]),
        ms(&row["p99_ms"]),
        ms(&row["max_ms"]),
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
