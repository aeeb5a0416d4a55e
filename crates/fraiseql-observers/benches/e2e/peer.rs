//! The peer: graphile-worker 0.17 doing the same job. A row trigger on `tb_order` and `tb_user`
//! calls `graphile_worker.add_job('deliver', payload)` with an event shaped like our default
//! webhook body; the task (`benches/peer/tasks/deliver.js`) POSTs it, signed, to the same
//! receiver. graphile-worker is installed at run time with `npm install` into
//! `<target>/bench-peer/` (never committed).

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use tokio_postgres::Client;

/// Where the peer's files are copied and its packages installed.
pub fn dir() -> PathBuf {
    super::target_dir().join("bench-peer")
}

/// Copy the peer's files and `npm install` them. `Err` (with the reason) when npm fails, e.g.
/// without access to the npm registry.
pub fn install() -> Result<String, String> {
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/peer");
    let dir = dir();
    std::fs::create_dir_all(dir.join("tasks")).map_err(|e| e.to_string())?;
    for file in ["package.json", "run.js", "tasks/deliver.js"] {
        std::fs::copy(source.join(file), dir.join(file)).map_err(|e| format!("{file}: {e}"))?;
    }
    let output = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&dir)
        .output()
        .map_err(|e| format!("cannot run npm: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "npm install failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let version = std::fs::read_to_string(dir.join("node_modules/graphile-worker/package.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["version"].as_str().map(str::to_string))
        .ok_or("graphile-worker is not installed")?;
    Ok(version)
}

/// Install graphile-worker's schema and the enqueueing triggers on the bench tables.
pub async fn prepare(url: &str, client: &Client) {
    let status = Command::new("node")
        .args(["run.js", "migrate"])
        .current_dir(dir())
        .env("DATABASE_URL", url)
        .status()
        .expect("run node");
    assert!(status.success(), "graphile-worker migrations failed");
    client
        .batch_execute(
            "CREATE FUNCTION bench_peer_enqueue() RETURNS trigger LANGUAGE plpgsql AS $$
             DECLARE
                 v_before jsonb;
                 v_after jsonb;
                 v_entity_id uuid;
                 v_tenant uuid;
             BEGIN
                 IF TG_OP <> 'INSERT' THEN
                     v_before := to_jsonb(OLD) - 'password_hash';
                     v_entity_id := OLD.id;
                     v_tenant := OLD.fk_customer_org;
                 END IF;
                 IF TG_OP <> 'DELETE' THEN
                     v_after := to_jsonb(NEW) - 'password_hash';
                     v_entity_id := NEW.id;
                     v_tenant := NEW.fk_customer_org;
                 END IF;
                 PERFORM graphile_worker.add_job('deliver', json_build_object(
                     'type', lower(TG_ARGV[0]) || '.' || CASE TG_OP WHEN 'INSERT' THEN 'created'
                                                         WHEN 'UPDATE' THEN 'updated' ELSE 'deleted' END,
                     'timestamp', now(),
                     'data', json_build_object(
                         'id', gen_random_uuid(), 'kind', TG_OP, 'entity_type', TG_ARGV[0],
                         'entity_id', v_entity_id, 'tenant', v_tenant,
                         'before', v_before, 'after', v_after)));
                 RETURN NULL;
             END $$;
             CREATE TRIGGER bench_peer AFTER INSERT OR UPDATE OR DELETE ON tb_order
                 FOR EACH ROW EXECUTE FUNCTION bench_peer_enqueue('Order');
             CREATE TRIGGER bench_peer AFTER INSERT OR UPDATE OR DELETE ON tb_user
                 FOR EACH ROW EXECUTE FUNCTION bench_peer_enqueue('User');",
        )
        .await
        .expect("peer triggers");
}

/// Jobs not yet done (waiting, running or failed and waiting for a retry).
pub async fn jobs_left(client: &Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM graphile_worker.jobs", &[])
        .await
        .expect("count jobs")
        .get(0)
}

/// A running graphile-worker.
pub struct PeerProcess {
    child: Child,
}

impl PeerProcess {
    /// Start the worker and wait until it is listening for jobs.
    pub fn start(
        url: &str,
        receiver_url: &str,
        concurrency: usize,
        local_queue: usize,
    ) -> PeerProcess {
        let mut child = Command::new("node")
            .arg("run.js")
            .current_dir(dir())
            .env("DATABASE_URL", url)
            .env("BENCH_RECEIVER_URL", receiver_url)
            .env("BENCH_SECRET", super::engine::SECRET)
            .env("BENCH_CONCURRENCY", concurrency.to_string())
            .env("BENCH_LOCAL_QUEUE", local_queue.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start graphile-worker");
        let stdout = child.stdout.take().expect("peer stdout");
        let mut lines = std::io::BufReader::new(stdout).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.trim() == "READY" => break,
                Some(Ok(_)) => continue,
                _ => panic!("graphile-worker exited before it was ready"),
            }
        }
        // Keep draining its stdout so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        PeerProcess { child }
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
