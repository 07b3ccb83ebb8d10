// Drives graphile-worker through the same workloads as `dray bench`, on the same PostgreSQL,
// and prints one JSON line in the same shape. Usage:
//   node graphile.mjs WORKLOAD N DATABASE_URL
// WORKLOAD: W1-single, W1-batch, W2 (its defaults: concurrency 10, pool 12), W2-tuned (its
// documented high-throughput setup: concurrency 24, pool 25, localQueue.size 500,
// completeJobBatchDelay 0), W3 (1,000 jobs at 200/s, pick-up latency).
import { run, makeWorkerUtils, Logger } from "graphile-worker";
import pg from "pg";
import { sleep, nowUs, w3 as runW3 } from "./common.mjs";

const [workload, nArg, url] = process.argv.slice(2);
const n = Number(nArg);
const schema = "gw_bench_" + Math.random().toString(36).slice(2, 10);
const tuned = workload === "W2-tuned";
const worker = {
  connectionString: url,
  schema,
  concurrentJobs: tuned ? 24 : 10,
  maxPoolSize: tuned ? 25 : 12,
  pollInterval: 2000,
  ...(tuned ? { localQueue: { size: 500 }, completeJobBatchDelay: 0, failJobBatchDelay: 0 } : {}),
};
const preset = { worker };
// Its log lines would mix with the JSON on stdout: errors go to stderr, the rest nowhere.
const logger = new Logger(() => (level, message) => { if (level === "error") console.error(message); });

const utils = await makeWorkerUtils({ preset, logger });
await utils.migrate();
const pool = new pg.Pool({ connectionString: url, max: 2 });
// Whether any job is left (graphile-worker deletes a job once it has completed). Polled only
// once every handler has run, as `dray bench` does: a count polled through the whole run would
// load the database the peer is being measured on.
const remaining = async () =>
  (await pool.query(`SELECT EXISTS (SELECT 1 FROM "${schema}"._private_jobs) AS any`)).rows[0].any;
const fill = async (count) => {
  for (let i = 0; i < count; i += 1000) {
    const size = Math.min(1000, count - i);
    await utils.addJobs(Array.from({ length: size }, (_, k) => ({ identifier: "noop", payload: { i: i + k } })));
  }
};

let value;
let unit = "jobs/s";
const extra = { concurrency: worker.concurrentJobs, pool: worker.maxPoolSize };
if (tuned) Object.assign(extra, { localQueue: 500, completeJobBatchDelay: 0 });
try {
  if (workload === "W1-single") {
    const t0 = performance.now();
    for (let i = 0; i < n; i++) await utils.addJob("noop", { i });
    value = n / ((performance.now() - t0) / 1000);
  } else if (workload === "W1-batch") {
    const t0 = performance.now();
    await fill(n);
    value = n / ((performance.now() - t0) / 1000);
  } else if (workload === "W2" || workload === "W2-tuned") {
    await fill(n);
    const t0 = performance.now();
    let ran = 0;
    const runner = await run({ preset, taskList: { noop: async () => { ran++; } }, noHandleSignals: true, logger });
    while (ran < n) await sleep(2);
    while (await remaining()) await sleep(2);
    value = n / ((performance.now() - t0) / 1000);
    await runner.stop();
  } else if (workload === "W3") {
    const samples = [];
    const runner = await run({
      preset,
      taskList: { lat: async (p) => { samples.push(nowUs() - p.t); } },
      noHandleSignals: true,
      logger,
    });
    const r = await runW3((t) => utils.addJob("lat", { t }), samples);
    await runner.stop();
    value = r.p50;
    unit = "ms";
    extra.p99_ms = r.p99_ms;
    extra.samples = r.samples;
  } else {
    throw new Error(`unknown workload ${workload}`);
  }
} finally {
  await utils.release();
  await pool.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
  await pool.end();
}
const system = tuned ? "graphile-worker (tuned)" : "graphile-worker";
console.log(JSON.stringify({ system, store: "postgres", workload, n: workload === "W3" ? 1000 : n, value, unit, extra }));
