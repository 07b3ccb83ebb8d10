// Drives pg-boss through the same workloads as `dray bench`, on the same PostgreSQL, and prints
// one JSON line in the same shape. Usage: node pgboss.mjs WORKLOAD N DATABASE_URL
// W2: work() with batchSize 10 and burstWhenBatchFull (its plain default of one job per poll
// cannot drain a backlog); W2-tuned: batchSize 100 and burstWhenBatchFull; W3: LISTEN/NOTIFY
// on (useListenNotify + a notify queue), batchSize 1.
import { PgBoss } from "pg-boss";
import pg from "pg";
import { sleep, nowUs, w3 as runW3 } from "./common.mjs";

const [workload, nArg, url] = process.argv.slice(2);
const n = Number(nArg);
const schema = "pgb_bench_" + Math.random().toString(36).slice(2, 10);
const w3 = workload === "W3";
const boss = new PgBoss({ connectionString: url, schema, useListenNotify: w3, schedule: false, supervise: false });
boss.on("error", (e) => console.error(e));
await boss.start();
const pool = new pg.Pool({ connectionString: url, max: 2 });
const queue = w3 ? "lat" : "noop";
await boss.createQueue(queue, { notify: w3 });
// Whether any job of the queue is not completed yet. Polled only once every handler has run,
// as `dray bench` does: a count polled through the whole run would load the database the peer
// is being measured on.
const unfinished = async () =>
  (await pool.query(`SELECT EXISTS (SELECT 1 FROM "${schema}".job WHERE name = $1 AND state <> 'completed') AS any`, [queue])).rows[0].any;
const fill = async (count) => {
  for (let i = 0; i < count; i += 1000) {
    const size = Math.min(1000, count - i);
    await boss.insert(queue, Array.from({ length: size }, (_, k) => ({ data: { i: i + k } })));
  }
};

let value;
let unit = "jobs/s";
const extra = {};
let system = "pg-boss";
try {
  if (workload === "W1-single") {
    const t0 = performance.now();
    for (let i = 0; i < n; i++) await boss.send(queue, { i });
    value = n / ((performance.now() - t0) / 1000);
  } else if (workload === "W1-batch") {
    const t0 = performance.now();
    await fill(n);
    value = n / ((performance.now() - t0) / 1000);
  } else if (workload === "W2" || workload === "W2-tuned") {
    const batchSize = workload === "W2" ? 10 : 100;
    system = `pg-boss (batch ${batchSize})`;
    Object.assign(extra, { batchSize, burstWhenBatchFull: true });
    await fill(n);
    const t0 = performance.now();
    let ran = 0;
    await boss.work(queue, { batchSize, burstWhenBatchFull: true, pollingIntervalSeconds: 0.5 }, async (jobs) => {
      ran += jobs.length;
    });
    while (ran < n) await sleep(2);
    while (await unfinished()) await sleep(2);
    value = n / ((performance.now() - t0) / 1000);
  } else if (w3) {
    const samples = [];
    Object.assign(extra, { notify: true, batchSize: 1 });
    await boss.work(queue, { batchSize: 1, pollingIntervalSeconds: 0.5 }, async ([job]) => {
      samples.push(nowUs() - job.data.t);
    });
    const r = await runW3((t) => boss.send(queue, { t }), samples);
    value = r.p50;
    unit = "ms";
    extra.p99_ms = r.p99_ms;
    extra.samples = r.samples;
  } else {
    throw new Error(`unknown workload ${workload}`);
  }
} finally {
  await boss.stop({ graceful: false, wait: true });
  await pool.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
  await pool.end();
}
console.log(JSON.stringify({ system, store: "postgres", workload, n: w3 ? 1000 : n, value, unit, extra }));
