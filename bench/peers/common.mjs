// What both peer drivers share: timing helpers and the W3 workload (steady enqueue, latency
// percentiles), so that every system is measured by the same loop.
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
export const nowUs = () => Math.round((performance.timeOrigin + performance.now()) * 1000);

/// Enqueues 1,000 jobs at a steady 200/s with `enqueue(t)` (t = now in µs), after one warm-up
/// job, and waits for `samples` (µs latencies pushed by the handler) to fill; returns p50 (ms)
/// and extra figures.
export async function w3(enqueue, samples) {
  await enqueue(nowUs());
  while (samples.length < 1) await sleep(5);
  samples.length = 0;
  const t0 = performance.now();
  for (let i = 0; i < 1000; i++) {
    const wait = t0 + i * 5 - performance.now();
    if (wait > 0) await sleep(wait);
    await enqueue(nowUs());
  }
  const deadline = performance.now() + 30000;
  while (samples.length < 1000 && performance.now() < deadline) await sleep(5);
  samples.sort((a, b) => a - b);
  const pct = (p) => samples[Math.min(samples.length - 1, Math.floor(samples.length * p))] / 1000;
  return { p50: pct(0.5), p99_ms: pct(0.99), samples: samples.length };
}
