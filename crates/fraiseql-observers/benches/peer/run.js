// Runs graphile-worker for the benchmark: `node run.js migrate` installs its schema;
// `node run.js` runs the worker until killed and prints READY once it is listening for jobs.
//
// Settings (environment): DATABASE_URL; BENCH_CONCURRENCY (jobs at once, default 32; the pool
// gets two connections more); BENCH_LOCAL_QUEUE (0 = off, the default; N = fetch jobs in
// batches of N, graphile-worker 0.17's batched mode). Per-job "Completed task" lines are not
// printed (a production deployment would not log every job to a console either); warnings and
// errors are.
"use strict";
const { run, runMigrations, Logger } = require("graphile-worker");

const connectionString = process.env.DATABASE_URL;
const concurrency = Number(process.env.BENCH_CONCURRENCY || "32");
const localQueue = Number(process.env.BENCH_LOCAL_QUEUE || "0");

const logger = new Logger(() => (level, message) => {
  if (level === "error" || level === "warning") {
    console.error(`[graphile-worker ${level}] ${message}`);
  }
});

async function main() {
  if (process.argv[2] === "migrate") {
    await runMigrations({ connectionString, logger });
    return;
  }
  const runner = await run({
    connectionString,
    concurrency,
    maxPoolSize: concurrency + 2,
    pollInterval: 1000,
    logger,
    preset: localQueue > 0 ? { worker: { localQueue: { size: localQueue } } } : undefined,
    taskList: { deliver: require("./tasks/deliver") },
  });
  console.log("READY");
  await runner.promise;
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
