//! Reader benchmark (issue 2): how fast `ChangeLogListener` drains a large backlog, and what an
//! idle listener costs.
//!
//! `cargo bench -p fraiseql-observers --bench reader [-- --rows 100000 --runs 5 ...]`
//!
//! Options: `--rows N` (backlog size, default 1M), `--runs N`, `--batch-sizes a,b,c`,
//! `--id-page-size N` and `--max-chunk-bytes N` (the listener's bounds, defaults as
//! `ListenerConfig`), `--idle-secs N` (0 skips the idle part), `--no-breakdown` (skips the parts
//! measured alone, which hold the whole backlog's ids and 100 chunks: use it when measuring the
//! catch-up's peak RSS on a large backlog), `--reuse` (keep an already filled database).
//!
//! Invariants:
//! * It touches only its own database, `fo_bench_reader` (dropped and recreated on each run unless
//!   `--reuse` finds it already filled with the same number of rows), on the server named by
//!   `FRAISEQL_BENCH_ADMIN_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`).
//! * A catch-up run is timed from `ChangeLogListener::start` until the last event is handed out,
//!   with `mark_done` + `save_checkpoint` after every batch, as a consumer does. Every run reads
//!   the whole log as a new consumer, and must hand out exactly one event per row (else the bench
//!   fails rather than report a number).
//! * Each run reports the process's peak RSS during the run (`VmHWM`, reset before the run
//!   through `/proc/self/clear_refs`), the largest id page and chunk the listener held, and the
//!   rate of each tenth of the backlog (a steady rate has close minimum and maximum).
//! * Results are printed as markdown and written to `target/bench-results/reader.json` at the
//!   workspace root.
//! * The bench runs with mimalloc as its global allocator, as the daemon does
//!   (`fraiseql-observers-cli/src/allocator.rs`): it measures the reader as it is shipped.

use anyhow::{bail, ensure, Context, Result};
use fraiseql_observers::listener::change_log::{batch_ids_sql, chunk_range_sql, chunk_rows_sql};
use fraiseql_observers::listener::parser::{self, ChangeLogRowRef, TableShape};
use fraiseql_observers::{ChangeLogListener, ListenerConfig, Position, StartPosition};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

/// The daemon's allocator (the library chooses none).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DB_NAME: &str = "fo_bench_reader";
/// Rows written per transaction while filling: the backlog spans many transactions, as a real
/// one does.
const ROWS_PER_TRANSACTION: u64 = 1000;
/// The most a single catch-up run may take before the bench gives up.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

/// Command-line options (after `--`).
#[derive(Debug, Clone)]
struct Args {
    rows: u64,
    runs: usize,
    batch_sizes: Vec<usize>,
    idle_secs: u64,
    reuse: bool,
    id_page_size: usize,
    max_chunk_bytes: usize,
    breakdown: bool,
}

impl Args {
    fn parse() -> Result<Args> {
        let mut args = Args {
            rows: 1_000_000,
            runs: 5,
            batch_sizes: vec![1000, 5000, 10000],
            idle_secs: 15,
            reuse: false,
            id_page_size: ListenerConfig::default().id_page_size,
            max_chunk_bytes: ListenerConfig::default().max_chunk_bytes,
            breakdown: true,
        };
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
            match arg.as_str() {
                "--rows" => args.rows = value("--rows")?.replace('_', "").parse()?,
                "--runs" => args.runs = value("--runs")?.parse()?,
                "--batch-sizes" => {
                    args.batch_sizes = value("--batch-sizes")?
                        .split(',')
                        .map(|s| s.trim().parse())
                        .collect::<Result<_, _>>()?
                }
                "--idle-secs" => args.idle_secs = value("--idle-secs")?.parse()?,
                "--reuse" => args.reuse = true,
                "--no-breakdown" => args.breakdown = false,
                "--id-page-size" => {
                    args.id_page_size = value("--id-page-size")?.replace('_', "").parse()?
                }
                "--max-chunk-bytes" => {
                    args.max_chunk_bytes = value("--max-chunk-bytes")?.replace('_', "").parse()?
                }
                // `cargo bench` passes `--bench`; filters and other harness flags mean nothing here.
                _ => {}
            }
        }
        ensure!(args.rows > 0, "--rows must be at least 1");
        ensure!(args.runs > 0, "--runs must be at least 1");
        ensure!(
            !args.batch_sizes.is_empty() && !args.batch_sizes.contains(&0),
            "--batch-sizes must list sizes of at least 1"
        );
        Ok(args)
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse()?;
    let admin_url = std::env::var("FRAISEQL_BENCH_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
    let mut db_config: tokio_postgres::Config = admin_url.parse()?;
    db_config.dbname(DB_NAME);
    let db_url = to_url(&db_config);

    eprintln!("reader bench: {args:?}");
    let fill = prepare_database(&admin_url, &db_config, &args).await?;
    let client = connect_config(&db_config).await?;
    let data = describe_data(&client).await?;
    eprintln!("data: {data}");

    let breakdown = if args.breakdown {
        breakdown(&client, args.rows).await?
    } else {
        json!(null)
    };
    eprintln!("breakdown: {breakdown}");

    let mut groups = Vec::new();
    for &batch_size in &args.batch_sizes {
        let mut runs = Vec::new();
        for run in 0..args.runs {
            let result = catch_up_run(&client, &db_url, batch_size, run, &args).await?;
            eprintln!(
                "batch_size {batch_size} run {run}: {:.0} rows/s in {:.2} s (client cpu {:.2} s, server cpu {:.2} s, peak RSS {:.1} MB, largest id page {}, largest chunk {} rows / {} bytes, tenths {:.0}-{:.0} rows/s)",
                result.rows_per_sec(),
                result.elapsed.as_secs_f64(),
                result.client_cpu.as_secs_f64(),
                result.server_cpu.as_secs_f64(),
                result.peak_rss_mb,
                result.largest_id_page,
                result.largest_chunk_rows,
                result.largest_chunk_bytes,
                result.tenth_rates.iter().copied().fold(f64::INFINITY, f64::min),
                result.tenth_rates.iter().copied().fold(0.0, f64::max),
            );
            runs.push(result);
        }
        groups.push((batch_size, runs));
    }

    let poll = poll_round_trip(&db_config, 10_000).await?;
    eprintln!("poll round trip: {poll}");
    let mut idle = Vec::new();
    for interval_ms in [100, 10].into_iter().filter(|_| args.idle_secs > 0) {
        let result = idle_listener(&client, &db_url, interval_ms, args.idle_secs).await?;
        eprintln!("idle listener: {result}");
        idle.push(result);
    }

    let machine = machine().await?;
    let report = json!({
        "date": chrono::Utc::now().to_rfc3339(),
        "command": "cargo bench -p fraiseql-observers --bench reader",
        "allocator": "mimalloc",
        "args": {
            "rows": args.rows, "runs": args.runs, "batch_sizes": args.batch_sizes,
            "idle_secs": args.idle_secs, "reuse": args.reuse,
            "id_page_size": args.id_page_size, "max_chunk_bytes": args.max_chunk_bytes,
        },
        "machine": machine,
        "postgres": server_settings(&client).await?,
        "fill": fill,
        "data": data,
        "breakdown": breakdown,
        "catch_up": groups.iter().map(|(batch_size, runs)| summary_json(*batch_size, runs)).collect::<Vec<_>>(),
        "idle": { "poll_round_trip": poll, "listener": idle },
    });
    println!("{}", markdown(&report));
    let path = results_path();
    std::fs::create_dir_all(path.parent().expect("has a parent"))?;
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("written {}", path.display());
    Ok(())
}

/// `<workspace>/target/bench-results/reader.json`.
fn results_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/bench-results/reader.json")
        .components()
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The database and its backlog

/// Recreate the bench database and fill it (or, with `--reuse`, keep a filled one). Returns how
/// the fill went.
async fn prepare_database(
    admin_url: &str,
    db_config: &tokio_postgres::Config,
    args: &Args,
) -> Result<Value> {
    let admin = connect(admin_url).await?;
    if args.reuse {
        let exists = admin
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&DB_NAME])
            .await?
            .is_some();
        if exists {
            let client = connect_config(db_config).await?;
            let rows: Option<i64> = client
                .query_opt("SELECT count(*) FROM core.tb_entity_change_log", &[])
                .await
                .ok()
                .flatten()
                .map(|r| r.get(0));
            if rows == Some(args.rows as i64) {
                eprintln!("reusing {DB_NAME} with {} rows", args.rows);
                client
                    .batch_execute("DELETE FROM core.observer_checkpoints")
                    .await?;
                return Ok(json!({ "reused": true }));
            }
        }
    }
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)"))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {DB_NAME}"))
        .await?;
    let mut client = connect_config(db_config).await?;
    fraiseql_observers::migrate::run(&mut client).await?;

    let started = Instant::now();
    let insert = client.prepare(FILL_SQL).await?;
    let orders = (args.rows as i64 / 10).max(1);
    let mut first = 1_i64;
    while first as u64 <= args.rows {
        let last = (first + ROWS_PER_TRANSACTION as i64 - 1).min(args.rows as i64);
        client.execute(&insert, &[&first, &last, &orders]).await?;
        first = last + 1;
    }
    let fill_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    client
        .batch_execute("VACUUM (ANALYZE) core.tb_entity_change_log")
        .await?;
    let vacuum_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "filled {} rows in {fill_secs:.1} s, vacuum analyze {vacuum_secs:.1} s",
        args.rows
    );
    Ok(json!({
        "reused": false,
        "rows_per_transaction": ROWS_PER_TRANSACTION,
        "fill_secs": fill_secs,
        "vacuum_analyze_secs": vacuum_secs,
    }))
}

/// Rows `$1..=$2` of the backlog: changes of `tb_order` as a capture trigger logs them, in the
/// mission's envelope shape. `$3` orders (a tenth of the rows) across 50 tenants: a row creates its
/// order the first time the order appears, later rows update it (a status change with both
/// images), so 10% are creates and 90% updates.
const FILL_SQL: &str = r#"
INSERT INTO core.tb_entity_change_log
    (fk_customer_org, fk_contact, object_type, object_id, modification_type, change_status,
     object_data, extra_metadata)
SELECT o.tenant, o.contact, 'Order', o.order_id,
       CASE WHEN o.created THEN 'INSERT' ELSE 'UPDATE' END,
       CASE WHEN o.created THEN 'new' ELSE 'updated' END,
       jsonb_build_object(
           'op', CASE WHEN o.created THEN 'c' ELSE 'u' END,
           'before', CASE WHEN o.created THEN NULL
                          ELSE o.after || jsonb_build_object(
                                   'status', o.previous_status,
                                   'updated_at', o.at - interval '7 minutes',
                                   'version', o.version - 1) END,
           'after', o.after,
           'source', jsonb_build_object(
               'db', 'production', 'schema', 'public', 'table', 'tb_order',
               'organization', o.tenant,
               'ts_ms', (extract(epoch FROM o.at) * 1000)::bigint,
               'txId', 750000 + o.g / 1000)),
       jsonb_build_object(
           'request_id', md5('request' || o.g)::uuid,
           'actor_type', 'user',
           'client', 'fraiseql-graphql/1.9')
FROM (
    SELECT s.*,
           jsonb_build_object(
               'pk_order', s.order_no,
               'id', s.order_id,
               'identifier', 'ORD-2024-' || lpad(s.order_no::text, 6, '0'),
               'fk_customer', 1 + (s.g * 7919) % 25000,
               'status', s.status,
               'currency', 'EUR',
               'total_amount', round((20 + (s.order_no % 9973) / 7.0)::numeric, 2),
               'item_count', 1 + s.order_no % 9,
               'shipping_address', jsonb_build_object(
                   'line1', (s.order_no % 200) || ' rue de la Republique',
                   'city', (ARRAY['Lyon','Paris','Lille','Nantes','Bordeaux'])[1 + s.order_no % 5],
                   'postal_code', lpad((s.order_no % 95000)::text, 5, '0'),
                   'country', 'FR'),
               'notes', CASE WHEN s.order_no % 3 = 0 THEN 'Leave the parcel with the concierge' END,
               'is_gift', s.order_no % 11 = 0,
               'created_at', s.at - interval '1 hour',
               'updated_at', s.at,
               'version', s.version,
               'deleted_at', NULL) AS after
      FROM (
          SELECT g,
                 1 + (g - 1) % $3::bigint AS order_no,
                 md5('order' || (1 + (g - 1) % $3))::uuid AS order_id,
                 md5('tenant' || (1 + (g - 1) % $3) % 50)::uuid AS tenant,
                 md5('contact' || g % 1000)::uuid AS contact,
                 g <= $3 AS created,
                 1 + (g - 1) / $3 AS version,
                 (ARRAY['pending','paid','packed','shipped','delivered'])[1 + ((g - 1) / $3) % 5] AS status,
                 (ARRAY['delivered','pending','paid','packed','shipped'])[1 + ((g - 1) / $3) % 5] AS previous_status,
                 timestamptz '2024-03-01 08:00:00+00' + g * interval '37 milliseconds' AS at
            FROM generate_series($1::bigint, $2::bigint) AS g
      ) s
) o
"#;

/// What the backlog looks like.
async fn describe_data(client: &Client) -> Result<Value> {
    let row = client
        .query_one(
            "SELECT count(*),
                    avg(octet_length(object_data::text))::float8,
                    avg(pg_column_size(object_data))::float8,
                    avg(octet_length(object_data::text) + octet_length(coalesce(extra_metadata::text, '')))::float8,
                    count(DISTINCT txid),
                    pg_total_relation_size('core.tb_entity_change_log')
               FROM core.tb_entity_change_log",
            &[],
        )
        .await?;
    let (inserts, updates): (i64, i64) = {
        let r = client
            .query_one(
                "SELECT count(*) FILTER (WHERE modification_type = 'INSERT'),
                        count(*) FILTER (WHERE modification_type = 'UPDATE')
                   FROM core.tb_entity_change_log",
                &[],
            )
            .await?;
        (r.get(0), r.get(1))
    };
    Ok(json!({
        "rows": row.get::<_, i64>(0),
        "avg_object_data_text_bytes": row.get::<_, f64>(1),
        "avg_object_data_stored_bytes": row.get::<_, f64>(2),
        "avg_json_text_bytes_per_row": row.get::<_, f64>(3),
        "transactions": row.get::<_, i64>(4),
        "table_total_bytes": row.get::<_, i64>(5),
        "creates": inserts,
        "updates": updates,
    }))
}

/// The parts of a catch-up measured one by one, with the listener's own SQL: the ids-first query
/// over the whole backlog, fetching 1000-row chunks (no decoding), and decoding alone.
async fn breakdown(client: &Client, rows: u64) -> Result<Value> {
    let shape = table_shape(client).await?;
    let current: String = client
        .query_one("SELECT pg_current_snapshot()::text", &[])
        .await?
        .get(0);
    let upper: fraiseql_observers::listener::snapshot::Snapshot = current.parse()?;
    let ids_statement = client
        .prepare(&batch_ids_sql(shape.sequence_column()))
        .await?;
    let started = Instant::now();
    let id_rows = client
        .query(
            &ids_statement,
            &[
                &"1",
                &upper.xmax.to_string(),
                &Vec::<String>::new(),
                &current,
                &i64::MIN,
            ],
        )
        .await?;
    let ids_secs = started.elapsed().as_secs_f64();
    let ids: Vec<i64> = id_rows.iter().map(|r| r.get(0)).collect();
    drop(id_rows);
    ensure!(
        ids.len() as u64 == rows,
        "the ids query found {} rows, expected {rows}",
        ids.len()
    );

    // The two forms of the chunk query on the same chunks, after a pass that warms the cache.
    let list_statement = client.prepare(&chunk_rows_sql(&shape)).await?;
    let range_statement = client.prepare(&chunk_range_sql(&shape)).await?;
    let chunks: Vec<&[i64]> = ids.chunks(1000).take(100).collect();
    let by_range = |chunk: &[i64]| (chunk[0], chunk[chunk.len() - 1]);
    for chunk in &chunks {
        let (first, last) = by_range(chunk);
        client.query(&range_statement, &[&first, &last]).await?;
    }
    let started = Instant::now();
    let mut list_rows = 0;
    for chunk in &chunks {
        list_rows += client
            .query(&list_statement, &[&chunk.to_vec()])
            .await?
            .len();
    }
    let list_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut fetched = Vec::new();
    let mut range_rows = 0;
    for chunk in &chunks {
        let (first, last) = by_range(chunk);
        let rows = client.query(&range_statement, &[&first, &last]).await?;
        range_rows += rows.len();
        fetched.push(rows);
    }
    let range_secs = started.elapsed().as_secs_f64();

    // Decoding alone, as the reader does it (borrowing the rows' text), events then dropped.
    let started = Instant::now();
    let mut decoded = 0;
    for rows in &fetched {
        for row in rows {
            let raw = ChangeLogRowRef::from_row(row)?;
            let position = Position {
                batch: 1,
                sequence: raw.sequence,
            };
            let event = parser::decode(&shape, raw, position)?;
            std::hint::black_box(&event);
            decoded += 1;
        }
    }
    let decode_secs = started.elapsed().as_secs_f64();
    Ok(json!({
        "ids_query_secs": ids_secs,
        "ids_query_rows": ids.len(),
        "chunk_fetch_list_rows": list_rows,
        "chunk_fetch_list_rows_per_sec": list_rows as f64 / list_secs,
        "chunk_fetch_range_rows": range_rows,
        "chunk_fetch_range_rows_per_sec": range_rows as f64 / range_secs,
        "decode_rows": decoded,
        "decode_rows_per_sec": decoded as f64 / decode_secs,
    }))
}

async fn table_shape(client: &Client) -> Result<TableShape> {
    let columns: Vec<(String, String)> = client
        .query(TableShape::CATALOG_QUERY, &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(TableShape::from_columns(&columns)?)
}

// ---------------------------------------------------------------------------------------------
// Catch-up

struct RunResult {
    load_at_start: f64,
    rows: u64,
    elapsed: Duration,
    first_batch: Duration,
    batches: u64,
    client_cpu: Duration,
    server_cpu: Duration,
    server_wait: Duration,
    peak_rss_mb: f64,
    largest_id_page: u64,
    largest_chunk_rows: u64,
    largest_chunk_bytes: u64,
    /// Rows per second over each tenth of the backlog.
    tenth_rates: Vec<f64>,
}

impl RunResult {
    fn rows_per_sec(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64()
    }
}

/// One consumer reads the whole log from the beginning, checkpointing after every batch.
async fn catch_up_run(
    client: &Client,
    db_url: &str,
    batch_size: usize,
    run: usize,
    args: &Args,
) -> Result<RunResult> {
    let expected = args.rows;
    let consumer = format!("bench-{batch_size}-{run}-{}", std::process::id());
    let config = ListenerConfig {
        database_url: db_url.to_string(),
        consumer_id: consumer.clone(),
        batch_size,
        start: StartPosition::Beginning,
        id_page_size: args.id_page_size,
        max_chunk_bytes: args.max_chunk_bytes,
        ..ListenerConfig::default()
    };
    reset_peak_rss();
    let load_at_start = load_average();
    let cpu_before = self_cpu()?;
    let started = Instant::now();
    let mut listener = ChangeLogListener::start(config).await?;
    let stats = listener.stats();
    let mut rows = 0_u64;
    let mut batches = 0_u64;
    let mut first_batch = None;
    let mut tenths = Vec::new();
    let mut tenth_started = (Instant::now(), 0_u64);
    let mut last_sequence = i64::MIN;
    tokio::time::timeout(RUN_TIMEOUT, async {
        while rows < expected {
            let batch = listener
                .next_batch()
                .await?
                .context("the listener stopped")?;
            first_batch.get_or_insert_with(|| started.elapsed());
            ensure!(batch.quarantined == 0, "rows were quarantined");
            ensure!(
                batch.events.len() == batch.rows,
                "a batch has fewer events than rows"
            );
            for event in &batch.events {
                ensure!(event.sequence > last_sequence, "events out of order");
                last_sequence = event.sequence;
            }
            rows += batch.events.len() as u64;
            batches += 1;
            if rows * 10 >= (tenths.len() as u64 + 1) * expected {
                let (at, from) = tenth_started;
                tenths.push((rows - from) as f64 / at.elapsed().as_secs_f64());
                tenth_started = (Instant::now(), rows);
            }
            listener.mark_done(batch.end);
            listener.save_checkpoint().await?;
        }
        Ok(())
    })
    .await
    .context("the catch-up run timed out")??;
    let elapsed = started.elapsed();
    let client_cpu = self_cpu()?.saturating_sub(cpu_before);
    let peak_rss_mb = peak_rss_kb()? as f64 / 1024.0;

    ensure!(
        rows == expected,
        "handed out {rows} events, expected {expected}"
    );
    // Every row is done: the stored checkpoint has no batch in progress.
    let open_batch: Option<String> = client
        .query_one(
            "SELECT batch_snapshot::text FROM core.observer_checkpoints WHERE consumer_id = $1",
            &[&consumer],
        )
        .await?
        .get(0);
    ensure!(
        open_batch.is_none(),
        "the checkpoint still has a batch open"
    );
    // The listener's and the checkpointer's backends: all they ran, they ran for this run.
    let mut server_cpu = Duration::ZERO;
    let mut server_wait = Duration::ZERO;
    for pid in backend_pids(client, &consumer).await? {
        let (cpu, wait) = process_cpu(pid)?;
        server_cpu += cpu;
        server_wait += wait;
    }
    drop(listener);
    Ok(RunResult {
        load_at_start,
        rows,
        elapsed,
        first_batch: first_batch.unwrap_or_default(),
        batches,
        client_cpu,
        server_cpu,
        server_wait,
        peak_rss_mb,
        largest_id_page: stats.largest_id_page(),
        largest_chunk_rows: stats.largest_chunk_rows(),
        largest_chunk_bytes: stats.largest_chunk_bytes(),
        tenth_rates: tenths,
    })
}

/// Reset the process's peak RSS (`VmHWM`) to its current RSS (Linux 4.0+); best effort.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The process's peak RSS in KiB, from `/proc/self/status`.
fn peak_rss_kb() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM in /proc/self/status")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmHWM has no value")?
        .parse()?)
}

async fn backend_pids(client: &Client, consumer: &str) -> Result<Vec<i32>> {
    let pids: Vec<i32> = client
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = ANY ($1)",
            &[&vec![
                format!("fraiseql-observers-listener:{consumer}"),
                format!("fraiseql-observers-checkpoint:{consumer}"),
            ]],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    ensure!(!pids.is_empty(), "no backend found for consumer {consumer}");
    Ok(pids)
}

fn summary_json(batch_size: usize, runs: &[RunResult]) -> Value {
    let rates: Vec<f64> = runs.iter().map(RunResult::rows_per_sec).collect();
    let secs = |f: fn(&RunResult) -> Duration| {
        median(&runs.iter().map(|r| f(r).as_secs_f64()).collect::<Vec<_>>())
    };
    json!({
        "batch_size": batch_size,
        "runs": runs.len(),
        "rows": runs[0].rows,
        "batches": runs[0].batches,
        "rows_per_sec": {
            "median": median(&rates),
            "min": rates.iter().copied().fold(f64::INFINITY, f64::min),
            "max": rates.iter().copied().fold(0.0, f64::max),
            "all": rates,
        },
        "median_secs": secs(|r| r.elapsed),
        "median_first_batch_secs": secs(|r| r.first_batch),
        "median_client_cpu_secs": secs(|r| r.client_cpu),
        "median_server_cpu_secs": secs(|r| r.server_cpu),
        "median_server_runqueue_wait_secs": secs(|r| r.server_wait),
        "load_at_start": runs.iter().map(|r| r.load_at_start).collect::<Vec<_>>(),
        "client_cpu_secs": runs.iter().map(|r| r.client_cpu.as_secs_f64()).collect::<Vec<_>>(),
        "server_cpu_secs": runs.iter().map(|r| r.server_cpu.as_secs_f64()).collect::<Vec<_>>(),
        "peak_rss_mb": runs.iter().map(|r| r.peak_rss_mb).collect::<Vec<_>>(),
        "largest_id_page": runs.iter().map(|r| r.largest_id_page).max(),
        "largest_chunk_rows": runs.iter().map(|r| r.largest_chunk_rows).max(),
        "largest_chunk_bytes": runs.iter().map(|r| r.largest_chunk_bytes).max(),
        "tenth_rows_per_sec": runs.iter().map(|r| r.tenth_rates.clone()).collect::<Vec<_>>(),
        "tenth_rows_per_sec_min": runs.iter().flat_map(|r| r.tenth_rates.iter().copied()).fold(f64::INFINITY, f64::min),
        "tenth_rows_per_sec_max": runs.iter().flat_map(|r| r.tenth_rates.iter().copied()).fold(0.0, f64::max),
    })
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

// ---------------------------------------------------------------------------------------------
// Idle

/// The idle poll alone: `pg_current_snapshot()` back to back on one connection, with the
/// server's CPU per call.
async fn poll_round_trip(db_config: &tokio_postgres::Config, n: u32) -> Result<Value> {
    let client = connect_config(db_config).await?;
    let statement = client.prepare("SELECT pg_current_snapshot()::text").await?;
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0);
    for _ in 0..200 {
        client.query_one(&statement, &[]).await?;
    }
    let (server_before, _) = process_cpu(pid)?;
    let client_before = self_cpu()?;
    let started = Instant::now();
    for _ in 0..n {
        let text: String = client.query_one(&statement, &[]).await?.get(0);
        std::hint::black_box(text);
    }
    let elapsed = started.elapsed();
    let (server_after, _) = process_cpu(pid)?;
    let client_cpu = self_cpu()?.saturating_sub(client_before);
    let per = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(n);
    Ok(json!({
        "calls": n,
        "round_trip_us": per(elapsed),
        "server_cpu_us": per(server_after.saturating_sub(server_before)),
        "client_cpu_us": per(client_cpu),
    }))
}

/// A listener on an idle log for `secs` seconds with `poll_interval = interval_ms`: polls per
/// second, how many of them ran the batch query (the cluster's snapshot moved: other databases'
/// transactions count), and CPU of both sides.
async fn idle_listener(
    client: &Client,
    db_url: &str,
    interval_ms: u64,
    secs: u64,
) -> Result<Value> {
    let consumer = format!("bench-idle-{interval_ms}-{}", std::process::id());
    let config = ListenerConfig {
        database_url: db_url.to_string(),
        consumer_id: consumer.clone(),
        start: StartPosition::Now,
        poll_interval: Duration::from_millis(interval_ms),
        ..ListenerConfig::default()
    };
    let mut listener = ChangeLogListener::start(config).await?;
    let stats = listener.stats();
    let stop = listener.stop_handle();
    let task = tokio::spawn(async move {
        let mut unexpected = 0_usize;
        while let Some(batch) = listener.next_batch().await? {
            unexpected += batch.rows;
        }
        Ok::<_, fraiseql_observers::Error>(unexpected)
    });
    // Let the poll interval back off to its maximum.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = backend_pids(client, &consumer).await?[0];
    let polls_before = stats.polls();
    let batch_queries_before = stats.batch_queries();
    let (server_before, _) = process_cpu(pid)?;
    let client_before = self_cpu()?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let client_cpu = self_cpu()?.saturating_sub(client_before).as_secs_f64();
    let (server_after, _) = process_cpu(pid)?;
    let server_cpu = server_after.saturating_sub(server_before).as_secs_f64();
    let polls = (stats.polls() - polls_before) as f64;
    let batch_queries = (stats.batch_queries() - batch_queries_before) as f64;
    stop.stop();
    let unexpected = task.await??;
    if unexpected > 0 {
        bail!("the idle listener read {unexpected} rows from a log nobody writes");
    }
    ensure!(polls > 0.0, "the idle listener did not poll");
    Ok(json!({
        "poll_interval_ms": interval_ms,
        "secs": elapsed,
        "polls_per_sec": polls / elapsed,
        "batch_queries_per_sec": batch_queries / elapsed,
        "client_cpu_percent": client_cpu / elapsed * 100.0,
        "server_cpu_percent": server_cpu / elapsed * 100.0,
        "client_cpu_us_per_poll": client_cpu * 1e6 / polls,
        "server_cpu_us_per_poll": server_cpu * 1e6 / polls,
    }))
}

// ---------------------------------------------------------------------------------------------
// CPU accounting (Linux): `/proc/<pid>/task/*/schedstat` is on-CPU and run-queue time in ns.

/// On-CPU time of every thread of this process.
fn self_cpu() -> Result<Duration> {
    let mut total = Duration::ZERO;
    for task in std::fs::read_dir("/proc/self/task")? {
        let path = task?.path().join("schedstat");
        // A thread may end between listing and reading.
        if let Ok(text) = std::fs::read_to_string(path) {
            total += schedstat(&text)?.0;
        }
    }
    Ok(total)
}

/// On-CPU and run-queue time of a (single-threaded) process, e.g. a PostgreSQL backend.
fn process_cpu(pid: i32) -> Result<(Duration, Duration)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .with_context(|| format!("reading /proc/{pid}/schedstat"))?;
    schedstat(&text)
}

fn schedstat(text: &str) -> Result<(Duration, Duration)> {
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    let mut next = || -> Result<Duration> {
        Ok(Duration::from_nanos(
            fields.next().context("short schedstat")??,
        ))
    };
    Ok((next()?, next()?))
}

// ---------------------------------------------------------------------------------------------
// Machine and report

/// The 1-minute load average: how busy the (shared) machine was.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(0.0)
}

async fn machine() -> Result<Value> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    Ok(json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model,
        "mem_gib": mem_kb as f64 / 1024.0 / 1024.0,
        "loadavg_at_end": loadavg.trim(),
    }))
}

async fn server_settings(client: &Client) -> Result<Value> {
    let version: String = client.query_one("SHOW server_version", &[]).await?.get(0);
    let mut settings = serde_json::Map::new();
    settings.insert("version".into(), json!(version));
    for name in ["shared_buffers", "work_mem", "synchronous_commit", "jit"] {
        let value: String = client.query_one(&format!("SHOW {name}"), &[]).await?.get(0);
        settings.insert(name.into(), json!(value));
    }
    Ok(Value::Object(settings))
}

fn markdown(report: &Value) -> String {
    let mut out = String::new();
    out.push_str("| batch_size | runs | median rows/s | min rows/s | max rows/s | median s | first batch s | reader CPU us/row | backend CPU us/row | load avg (1 min) at start | peak RSS MB | largest id page | largest chunk bytes | rows/s per tenth (min-max) |\n");
    out.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---|\n");
    for group in report["catch_up"].as_array().into_iter().flatten() {
        let rate = &group["rows_per_sec"];
        let rows = group["rows"].as_f64().unwrap_or(1.0);
        let loads: Vec<String> = group["load_at_start"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| format!("{:.1}", l.as_f64().unwrap_or(0.0)))
            .collect();
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.1} | {:.1} | {} | {} | {} | {} | {:.0}-{:.0} |\n",
            group["batch_size"],
            group["runs"],
            rate["median"].as_f64().unwrap_or(0.0),
            rate["min"].as_f64().unwrap_or(0.0),
            rate["max"].as_f64().unwrap_or(0.0),
            group["median_secs"].as_f64().unwrap_or(0.0),
            group["median_first_batch_secs"].as_f64().unwrap_or(0.0),
            group["median_client_cpu_secs"].as_f64().unwrap_or(0.0) * 1e6 / rows,
            group["median_server_cpu_secs"].as_f64().unwrap_or(0.0) * 1e6 / rows,
            loads.join(", "),
            group["peak_rss_mb"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| format!("{:.0}", m.as_f64().unwrap_or(0.0)))
                .collect::<Vec<_>>()
                .join(", "),
            group["largest_id_page"],
            group["largest_chunk_bytes"],
            group["tenth_rows_per_sec_min"].as_f64().unwrap_or(0.0),
            group["tenth_rows_per_sec_max"].as_f64().unwrap_or(0.0),
        ));
    }
    let breakdown = &report["breakdown"];
    if !breakdown.is_null() {
        out.push_str(&format!(
        "\nParts measured alone: ids query over the whole backlog {:.2} s; fetching 1000-row chunks {:.0} rows/s by sequence list, {:.0} rows/s by range; decoding {:.0} rows/s (one thread)\n",
        breakdown["ids_query_secs"].as_f64().unwrap_or(0.0),
        breakdown["chunk_fetch_list_rows_per_sec"].as_f64().unwrap_or(0.0),
        breakdown["chunk_fetch_range_rows_per_sec"].as_f64().unwrap_or(0.0),
        breakdown["decode_rows_per_sec"].as_f64().unwrap_or(0.0),
    ));
    }
    let poll = &report["idle"]["poll_round_trip"];
    out.push_str(&format!(
        "\nIdle poll (`SELECT pg_current_snapshot()::text`, {} calls back to back): {:.1} us round trip, {:.1} us server CPU, {:.1} us client CPU per poll\n\n",
        poll["calls"],
        poll["round_trip_us"].as_f64().unwrap_or(0.0),
        poll["server_cpu_us"].as_f64().unwrap_or(0.0),
        poll["client_cpu_us"].as_f64().unwrap_or(0.0),
    ));
    out.push_str("| idle listener poll_interval | polls/s | of which batch queries/s | reader CPU % | backend CPU % | reader CPU us/poll | backend CPU us/poll |\n");
    out.push_str("|---:|---:|---:|---:|---:|---:|---:|\n");
    for idle in report["idle"]["listener"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "| {} ms | {:.1} | {:.1} | {:.3} | {:.3} | {:.0} | {:.0} |\n",
            idle["poll_interval_ms"],
            idle["polls_per_sec"].as_f64().unwrap_or(0.0),
            idle["batch_queries_per_sec"].as_f64().unwrap_or(0.0),
            idle["client_cpu_percent"].as_f64().unwrap_or(0.0),
            idle["server_cpu_percent"].as_f64().unwrap_or(0.0),
            idle["client_cpu_us_per_poll"].as_f64().unwrap_or(0.0),
            idle["server_cpu_us_per_poll"].as_f64().unwrap_or(0.0),
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Connections

async fn connect(url: &str) -> Result<Client> {
    connect_config(&url.parse()?).await
}

async fn connect_config(config: &tokio_postgres::Config) -> Result<Client> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("bench connection closed: {e}");
        }
    });
    Ok(client)
}

/// A `postgres://` URL for the listener (which takes a URL, not a `Config`).
fn to_url(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        _ => "127.0.0.1".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres");
    let password = config
        .get_password()
        .map(|p| format!(":{}", String::from_utf8_lossy(p)))
        .unwrap_or_default();
    let dbname = config.get_dbname().unwrap_or(DB_NAME);
    format!("postgres://{user}{password}@{host}:{port}/{dbname}")
}
