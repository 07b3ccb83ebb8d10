// Drives graphile-worker through the same workloads as `dray bench`, on the same PostgreSQL,
// and prints one JSON line in the same shape. Usage:
//   node graphile.mjs WORKLOAD N DATABASE_URL
// WORKLOAD: W1-single, W1-batch, W2 (its defaults: concurrency 10, pool 12), W2-tuned (its
// documented high-throughput setup: concurrency 24, pool 25, localQueue.size 500,
// completeJobBatchDelay 0), W3 (1,000 jobs at 200/s, pick-up latency).
import { run, makeWorkerUtils, Logger } from "graphile-worker";
import pg from "pg";

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
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const nowUs = () => Math.round((performance.timeOrigin + performance.now()) * 1000);

const utils = await makeWorkerUtils({ preset, logger });
await utils.migrate();
const pool = new pg.Pool({ connectionString: url, max: 2 });
const remaining = async () =>
  (await pool.query(`SELECT count(*)::int AS c FROM "${schema}"._private_jobs`)).rows[0].c;
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
    const runner = await run({ preset, taskList: { noop: async () => {} }, noHandleSignals: true, logger });
    while ((await remaining()) > 0) await sleep(2);
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
    await utils.addJob("lat", { t: nowUs() });
    while (samples.length < 1) await sleep(5);
    samples.length = 0;
    const t0 = performance.now();
    for (let i = 0; i < 1000; i++) {
      const due = t0 + i * 5;
      const wait = due - performance.now();
      if (wait > 0) await sleep(wait);
      await utils.addJob("lat", { t: nowUs() });
    }
    const deadline = performance.now() + 30000;
    while (samples.length < 1000 && performance.now() < deadline) await sleep(5);
    await runner.stop();
    samples.sort((a, b) => a - b);
    const pct = (p) => samples[Math.min(samples.length - 1, Math.floor(samples.length * p))] / 1000;
    value = pct(0.5);
    unit = "ms";
    extra.p99_ms = pct(0.99);
    extra.samples = samples.length;
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
