// Drives DBOS (TypeScript SDK) through W4 on the same PostgreSQL as `dray bench`, and prints
// one JSON line in the same shape. Usage:
//   node dbos.mjs W4 N DATABASE_URL
// W4: 2,000 runs of a workflow of three no-op steps, 10 in flight (DBOS_IN_FLIGHT; each loop starts a
// run, waits for its result, starts the next). N is ignored: W4 is always 2,000 runs, as in
// Dray's harness. DBOS's system tables go to a fresh schema, dropped afterwards.
import { DBOS } from "@dbos-inc/dbos-sdk";
import pg from "pg";

const [workload, , url] = process.argv.slice(2);
if (workload !== "W4") {
  console.error(`dbos.mjs runs W4 only, not ${workload}`);
  process.exit(2);
}
const RUNS = 2000;
const IN_FLIGHT = Number(process.env.DBOS_IN_FLIGHT || 10);
const schema = "dbos_bench_" + Math.random().toString(36).slice(2, 10);

DBOS.setConfig({
  name: "dray-bench",
  applicationVersion: "bench",
  systemDatabaseUrl: url,
  systemDatabaseSchemaName: schema,
  logLevel: "error",
});
const noop = async () => {};
const threeSteps = DBOS.registerWorkflow(
  async (i) => {
    await DBOS.runStep(noop, { name: "one" });
    await DBOS.runStep(noop, { name: "two" });
    await DBOS.runStep(noop, { name: "three" });
    return i;
  },
  { name: "three_steps" },
);

await DBOS.launch();
let value;
try {
  let next = 0;
  let done = 0;
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: IN_FLIGHT }, async () => {
      while (next < RUNS) {
        const i = next++;
        if ((await threeSteps(i)) === i) done++;
      }
    }),
  );
  value = RUNS / ((performance.now() - t0) / 1000);
  if (done !== RUNS) throw new Error(`only ${done} of ${RUNS} runs returned their input`);
} finally {
  await DBOS.shutdown();
  const pool = new pg.Pool({ connectionString: url, max: 1 });
  await pool.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
  await pool.end();
}
console.log(JSON.stringify({ system: "dbos", store: "postgres", workload, n: RUNS, value, unit: "runs/s", extra: { in_flight: IN_FLIGHT } }));
