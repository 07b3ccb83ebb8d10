//! Dray's benchmark harness. `dray bench` runs these workloads on either store and prints one
//! JSON line per result; `bench/compare.sh` runs the peers beside it. See `bench/README.md`
//! for what each number means and what it does not.
//!
//! Every repetition runs on a fresh schema (PostgreSQL) or a fresh file (SQLite), so tables
//! are empty at the start of each; the reported value is the median of the repetitions, with
//! their min and max.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dray::{
    Client, EnqueueOptions, Job, JobContext, JobError, PgStore, Queue, SchemaMode, SqliteStore,
    Store, Worker, WorkerConfig, Workflow, WorkflowContext, WorkflowError,
};
use serde::Serialize;

mod raw;

pub use raw::RawStore;

/// The workloads, by the names the issue and `bench/README.md` use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Enqueue `n` jobs one at a time, each its own transaction.
    W1Single,
    /// Enqueue `n` jobs with `enqueue_many` in chunks of 1,000.
    W1Batch,
    /// `n` jobs queued; a worker with the default configuration drains them.
    W2,
    /// W2 with the tuned configuration ([`tuned`]).
    W2Tuned,
    /// A running worker; 1,000 jobs enqueued at 200/s; pick-up latency percentiles.
    W3,
    /// W3 with the jobs enqueued through a second store handle, as another process would:
    /// no direct hand-off; a NOTIFY (PostgreSQL) or a poll (SQLite) wakes the worker.
    W3Remote,
    /// A running worker; 200 jobs scheduled 0.5–2 s ahead (half by delay, half by
    /// an absolute time), alternately through this handle and a second one; percentiles of
    /// (handler start − due time) in ms.
    W3Scheduled,
    /// 2,000 runs of a 3-step workflow.
    W4,
    /// 20,000 outbox events staged in transactions of 100, relayed to a Dray queue by one
    /// relay with default settings; events/s from the first stage to the last published.
    W5,
    /// A steady 800 jobs/s (one enqueue per job, from a second handle) into a worker running 32
    /// at a time, in three phases: clean ([`BenchConfig::phase`]), then twice as long while
    /// another connection holds a transaction open (`BEGIN; SELECT txid_current();`, which
    /// holds back the xmin horizon, so VACUUM can remove nothing), then recovery. Pick-up
    /// latency p50/p99 per phase, and table sizes and dead rows at the end of each.
    W6,
    /// `dray serve` in process on loopback with token auth: `n` jobs enqueued by
    /// `POST /api/v1/jobs` from [`H1_CONNECTIONS`] concurrent keep-alive connections; jobs/s,
    /// with the p50 and p99 of a request.
    H1,
    /// W2 (`n` jobs drained by a default worker) while [`H2_SUBSCRIBERS`] server-sent-event
    /// streams follow as many of those jobs to their end; jobs/s, with the database's
    /// transactions per second during the drain and the live-event hub's reads.
    H2,
    /// The raw-SQL floor: claim 500 with SKIP LOCKED then complete them, 2 connections.
    Floor,
    /// A plain one-row autocommit INSERT through the same driver.
    PlainInsert,
    /// The same plain INSERT, 1,000 of them at W3's steady 200/s; p50 and p99 of the call in
    /// ms: what one durable commit costs a producer that is not writing back to back, the part
    /// of every W3 sample that is the enqueue's own commit.
    PacedInsert,
}

impl Workload {
    /// Every workload, in report order.
    pub const ALL: [Workload; 15] = [
        Workload::PlainInsert,
        Workload::W1Single,
        Workload::W1Batch,
        Workload::Floor,
        Workload::W2,
        Workload::W2Tuned,
        Workload::PacedInsert,
        Workload::W3,
        Workload::W3Remote,
        Workload::W3Scheduled,
        Workload::W4,
        Workload::W5,
        Workload::W6,
        Workload::H1,
        Workload::H2,
    ];

    /// The name printed and accepted on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Workload::W1Single => "W1-single",
            Workload::W1Batch => "W1-batch",
            Workload::W2 => "W2",
            Workload::W2Tuned => "W2-tuned",
            Workload::W3 => "W3",
            Workload::W3Remote => "W3-remote",
            Workload::W3Scheduled => "W3-scheduled",
            Workload::W4 => "W4",
            Workload::W5 => "W5",
            Workload::W6 => "W6",
            Workload::H1 => "H1",
            Workload::H2 => "H2",
            Workload::Floor => "floor",
            Workload::PlainInsert => "plain-insert",
            Workload::PacedInsert => "paced-insert",
        }
    }

    /// Parses a workload name (case-insensitive).
    pub fn parse(s: &str) -> Result<Workload, String> {
        Workload::ALL
            .into_iter()
            .find(|w| w.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let names: Vec<&str> = Workload::ALL.iter().map(|w| w.name()).collect();
                format!("unknown workload {s:?}; one of {}", names.join(", "))
            })
    }
}

/// One reported figure.
#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    /// `"dray"`, or the raw floor / plain insert baselines (`"raw-sql"`).
    pub system: String,
    /// `"postgres"` or `"sqlite"`.
    pub store: String,
    /// Workload name.
    pub workload: String,
    /// Jobs (or rows) per repetition.
    pub n: usize,
    /// The median over repetitions.
    pub value: f64,
    /// Unit of `value` (`jobs/s`, `ms`).
    pub unit: String,
    /// Smallest repetition.
    pub min: f64,
    /// Largest repetition.
    pub max: f64,
    /// Repetitions.
    pub reps: usize,
    /// Other figures (p99, WAL bytes per job, peak RSS, configuration).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// What a run needs to know.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// `postgres://…` or `sqlite://…` (SQLite runs use fresh files in a temp dir).
    pub url: String,
    /// Jobs per repetition for W1/W2/floor (default 20,000).
    pub n: usize,
    /// Repetitions (default 3).
    pub reps: usize,
    /// W6's unit of time (default 60 s): the clean and recovery phases last one, the phase with
    /// the held transaction two.
    pub phase: Duration,
}

/// The tuned worker configuration for W2-tuned (documented in `bench/README.md`): claim and
/// run up to a thousand at a time, which amortizes each round trip over a thousand jobs.
pub fn tuned(c: &mut WorkerConfig) {
    c.fetch_batch = TUNED_FETCH_BATCH;
}

/// Concurrency of the tuned W2 worker.
pub const TUNED_CONCURRENCY: usize = 1000;
/// Claim batch of the tuned W2 worker.
pub const TUNED_FETCH_BATCH: u32 = 1000;

/// The no-op job of W1/W2.
pub struct Noop;

impl Job for Noop {
    const NAME: &'static str = "bench_noop";
    type Input = serde_json::Value;
    type Output = ();
    async fn run(&self, _ctx: &JobContext, _input: serde_json::Value) -> Result<(), JobError> {
        Ok(())
    }
}

/// Counts handler runs (W2 waits for `n`, then for the database to agree).
struct Counted {
    runs: Arc<AtomicUsize>,
}

impl Job for Counted {
    const NAME: &'static str = "bench_noop";
    type Input = serde_json::Value;
    type Output = ();
    async fn run(&self, _ctx: &JobContext, _input: serde_json::Value) -> Result<(), JobError> {
        self.runs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The latency workloads' job: records (enqueue time, handler start − enqueue time) in µs, the
/// enqueue time travelling in the payload (W6 puts each sample in the phase it was enqueued in).
struct Latency {
    samples: Arc<Mutex<Vec<(i64, u64)>>>,
}

impl Job for Latency {
    const NAME: &'static str = "bench_latency";
    type Input = i64;
    type Output = ();
    async fn run(&self, _ctx: &JobContext, sent_us: i64) -> Result<(), JobError> {
        let now = chrono::Utc::now().timestamp_micros();
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((sent_us, (now - sent_us).max(0) as u64));
        Ok(())
    }
}

const QUEUE: &str = "default";

/// W4's workflow: three no-op steps, counting the bodies that reach their end.
struct ThreeSteps {
    done: Arc<AtomicUsize>,
}

impl Workflow for ThreeSteps {
    const NAME: &'static str = "bench_three_steps";
    type Input = u32;
    type Output = u32;
    async fn run(&self, ctx: &WorkflowContext, i: u32) -> Result<u32, WorkflowError> {
        ctx.step("one", || async { Ok(()) }).await?;
        ctx.step("two", || async { Ok(()) }).await?;
        ctx.step("three", || async { Ok(()) }).await?;
        self.done.fetch_add(1, Ordering::Relaxed);
        Ok(i)
    }
}

/// W4's runs.
const W4_RUNS: usize = 2000;

/// W5's events, and how many each staging transaction holds.
const W5_EVENTS: usize = 20_000;
const W5_PER_TX: usize = 100;

/// W5's sink: a Dray queue, counting what it delivered.
struct CountingSink<S: Store> {
    inner: dray::outbox::QueueSink<S>,
    delivered: Arc<AtomicUsize>,
}

impl<S: Store> dray::outbox::Sink for CountingSink<S> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn publish<'a>(
        &'a self,
        events: &'a [dray::outbox::OutboxRow],
    ) -> futures_util::future::BoxFuture<'a, Vec<Result<(), dray::outbox::PublishError>>> {
        Box::pin(async move {
            let out = self.inner.publish(events).await;
            self.delivered
                .fetch_add(out.iter().filter(|r| r.is_ok()).count(), Ordering::Relaxed);
            out
        })
    }
}
/// Runs one W4 worker drives at once: a run waits on its step records most of the time, so a
/// worker keeps many in flight, and their records are written together.
pub const W4_CONCURRENCY: usize = 1000;

/// Errors of a bench run.
pub type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = if v.is_empty() { 0.0 } else { v[v.len() / 2] };
    (mid, *v.first().unwrap_or(&0.0), *v.last().unwrap_or(&0.0))
}

/// Starts a new peak-RSS window (Linux: writing `5` to `/proc/self/clear_refs` resets
/// `VmHWM` to the current RSS), so that W2's figure is the worker's peak, not the prefill's or
/// an earlier workload's. Best effort: elsewhere the figure is the process's lifetime peak.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident memory of this process so far, in MiB (Linux; `None` elsewhere).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// One repetition's figures.
struct Rep {
    value: f64,
    extra: serde_json::Map<String, serde_json::Value>,
}

async fn fresh_pg(url: &str) -> BenchResult<PgStore> {
    let schema = format!(
        "dray_bench_{}",
        &dray::uuid::Uuid::now_v7().simple().to_string()[16..]
    );
    Ok(PgStore::builder(url)
        .schema(schema)
        .max_connections(20)
        .schema_mode(SchemaMode::Migrate)
        .connect()
        .await?)
}

async fn fresh_sqlite() -> BenchResult<(SqliteStore, std::path::PathBuf)> {
    let dir = std::env::temp_dir().join(format!(
        "dray-bench-{}",
        dray::uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&dir)?;
    let store = SqliteStore::open(dir.join("bench.db").to_str().unwrap_or("bench.db")).await?;
    Ok((store, dir))
}

/// Runs the workloads and calls `emit` with each result as soon as it is known.
pub async fn run(
    cfg: &BenchConfig,
    workloads: &[Workload],
    mut emit: impl FnMut(&Measurement),
) -> BenchResult<Vec<Measurement>> {
    let pg = cfg.url.starts_with("postgres");
    let mut out = Vec::new();
    for &w in workloads {
        let mut reps = Vec::new();
        let mut skipped = None;
        for _ in 0..cfg.reps.max(1) {
            let rep = if pg {
                let store = fresh_pg(&cfg.url).await?;
                let r = one(&store, cfg, w).await;
                if std::env::var_os("DRAY_BENCH_KEEP").is_none() {
                    store.drop_schema().await?;
                }
                store.close().await;
                r
            } else {
                let (store, dir) = fresh_sqlite().await?;
                let r = one(&store, cfg, w).await;
                store.close().await;
                let _ = std::fs::remove_dir_all(dir);
                r
            };
            match rep? {
                Some(r) => reps.push(r),
                None => {
                    skipped = Some(());
                    break;
                }
            }
        }
        let (value, min, max) = median(reps.iter().map(|r| r.value).collect());
        let mut extra = reps
            .get(reps.len() / 2)
            .map(|r| r.extra.clone())
            .unwrap_or_default();
        if skipped.is_some() {
            extra.insert("note".into(), "not available in this build".into());
        }
        let (unit, n) = match w {
            Workload::W3 | Workload::W3Remote | Workload::PacedInsert => ("ms", PACED),
            Workload::W3Scheduled => ("ms", SCHEDULED),
            Workload::W4 => ("runs/s", 2000),
            Workload::W5 => ("events/s", W5_EVENTS),
            Workload::W6 => (
                "ms",
                (W6_RATE as f64 * 4.0 * cfg.phase.as_secs_f64()) as usize,
            ),
            _ => ("jobs/s", cfg.n),
        };
        let m = Measurement {
            system: match w {
                Workload::Floor | Workload::PlainInsert | Workload::PacedInsert => "raw-sql".into(),
                _ => "dray".into(),
            },
            store: if pg {
                "postgres".into()
            } else {
                "sqlite".into()
            },
            workload: w.name().into(),
            n,
            value,
            unit: if w == Workload::PlainInsert {
                "rows/s".into()
            } else {
                unit.into()
            },
            min,
            max,
            reps: reps.len(),
            extra,
        };
        emit(&m);
        out.push(m);
    }
    Ok(out)
}

async fn one<S: RawStore>(store: &S, cfg: &BenchConfig, w: Workload) -> BenchResult<Option<Rep>> {
    let (url, n) = (cfg.url.as_str(), cfg.n);
    let mut extra = serde_json::Map::new();
    let wal0 = store.wal_position().await?;
    let value = match w {
        Workload::PlainInsert => {
            store.create_plain().await?;
            let start = Instant::now();
            for i in 0..n {
                store.insert_plain(i).await?;
            }
            n as f64 / start.elapsed().as_secs_f64()
        }
        Workload::PacedInsert => {
            store.create_plain().await?;
            let mut calls = paced(|i| store.insert_plain(i)).await?;
            extra.insert("p99_ms".into(), percentile_ms(&mut calls, 0.99).into());
            percentile_ms(&mut calls, 0.50)
        }
        Workload::Floor => {
            prefill_analyzed(store, n).await?;
            store.floor(n).await?
        }
        Workload::W1Single => {
            let q = Queue::new(store.clone());
            let opts = EnqueueOptions::new().kind(Noop::NAME);
            let start = Instant::now();
            for i in 0..n {
                q.enqueue(QUEUE, &serde_json::json!({ "i": i }), &opts)
                    .await?;
            }
            n as f64 / start.elapsed().as_secs_f64()
        }
        Workload::W1Batch => {
            let start = Instant::now();
            prefill(store, n).await?;
            n as f64 / start.elapsed().as_secs_f64()
        }
        Workload::W2 | Workload::W2Tuned => {
            // An experiment knob: W2 beside this many finished jobs (a day's history).
            let history: usize = std::env::var("DRAY_BENCH_HISTORY")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if history > 0 {
                store.fill_history(history).await?;
                extra.insert("history_rows".into(), history.into());
            }
            prefill_analyzed(store, n).await?;
            let runs = Arc::new(AtomicUsize::new(0));
            let mut worker = Worker::new(store.clone()).register(Counted { runs: runs.clone() });
            if w == Workload::W2Tuned {
                worker = worker.queue(QUEUE, TUNED_CONCURRENCY)?.configure(tuned);
                extra.insert("concurrency".into(), TUNED_CONCURRENCY.into());
                extra.insert("fetch_batch".into(), TUNED_FETCH_BATCH.into());
            }
            let wal_start = store.wal_position().await?;
            reset_peak_rss();
            let start = Instant::now();
            let handle = worker.start()?;
            wait_for_count(
                w.name(),
                "ran",
                n,
                (Duration::from_millis(2), STALL),
                || runs.load(Ordering::Relaxed),
            )
            .await?;
            // Handlers are done; wait until the database has no unfinished job left.
            let deadline = Instant::now() + STALL;
            while store.any_unfinished(QUEUE).await? {
                if Instant::now() > deadline {
                    return Err(format!(
                        "{}: every handler ran, but jobs were still unfinished in the database \
                         {} s later (completions lost or stuck; run with DRAY_LOG=debug)",
                        w.name(),
                        STALL.as_secs()
                    )
                    .into());
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let secs = start.elapsed().as_secs_f64();
            // Untimed: every one of them completed (not dead, not lost).
            let completed = Queue::new(store.clone()).stats(QUEUE).await?.completed;
            if completed as usize != n + history {
                return Err(format!(
                    "{}: {} of {n} jobs completed",
                    w.name(),
                    completed as usize - history.min(completed as usize)
                )
                .into());
            }
            if let (Some(a), Some(b)) = (wal_start, store.wal_position().await?) {
                let bytes = store.wal_diff(&b, &a).await?;
                extra.insert(
                    "wal_bytes_per_job".into(),
                    (bytes / n as f64).round().into(),
                );
            }
            handle.shutdown().await?;
            if let Some(rss) = peak_rss_mib() {
                extra.insert("peak_rss_mib".into(), rss.round().into());
            }
            if let Some(sizes) = store.table_sizes().await? {
                extra.insert("tables_after".into(), sizes);
                if w == Workload::W2 {
                    // Untimed: what the hot table comes back to once VACUUM (autovacuum, after
                    // a burst) and the maintenance leader's index rebuild have run.
                    store.vacuum_hot().await?;
                    store.job_table_compact().await?;
                    if let Some(sizes) = store.table_sizes().await? {
                        extra.insert("tables_after_vacuum_and_compact".into(), sizes);
                    }
                }
            }
            n as f64 / secs
        }
        Workload::W3 => pickup_latency(store, store, &mut extra).await?,
        Workload::W3Remote => {
            let producer = store.reopen(url).await?;
            let p50 = pickup_latency(store, &producer, &mut extra).await;
            producer.close_handle().await;
            p50?
        }
        Workload::W3Scheduled => {
            let other = store.reopen(url).await?;
            let p50 = scheduled_latency(store, &other, &mut extra).await;
            other.close_handle().await;
            p50?
        }
        Workload::W4 => {
            let done = Arc::new(AtomicUsize::new(0));
            let handle = Worker::new(store.clone())
                .register_workflow(ThreeSteps { done: done.clone() })
                .queue(dray::workflow::DEFAULT_WORKFLOW_QUEUE, W4_CONCURRENCY)?
                .start()?;
            extra.insert("concurrency".into(), W4_CONCURRENCY.into());
            let client = Client::new(store.clone());
            let inputs: Vec<u32> = (0..W4_RUNS as u32).collect();
            let start = Instant::now();
            client
                .start_workflows::<ThreeSteps>(inputs.iter().map(|i| (i, None)))
                .await?;
            wait_for_count(
                w.name(),
                "ran to their end",
                W4_RUNS,
                (Duration::from_millis(2), STALL),
                || done.load(Ordering::Relaxed),
            )
            .await?;
            let deadline = Instant::now() + STALL;
            while store
                .any_unfinished(dray::workflow::DEFAULT_WORKFLOW_QUEUE)
                .await?
            {
                if Instant::now() > deadline {
                    return Err(
                        "W4: every run ended, but runs were still unfinished in the \
                                database 30 s later"
                            .into(),
                    );
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let secs = start.elapsed().as_secs_f64();
            handle.shutdown().await?;
            // Untimed: every run completed, with three completed steps.
            let runs = client
                .list_workflows(&dray::workflow::RunFilter {
                    name: Some(ThreeSteps::NAME.into()),
                    limit: 10_000,
                    ..Default::default()
                })
                .await?;
            let completed = runs
                .iter()
                .filter(|r| r.status == dray::RunStatus::Completed)
                .count();
            if completed != W4_RUNS {
                return Err(format!("W4: {completed} of {W4_RUNS} runs completed").into());
            }
            W4_RUNS as f64 / secs
        }
        Workload::W5 => {
            let delivered = Arc::new(AtomicUsize::new(0));
            let sink = CountingSink {
                inner: dray::outbox::QueueSink::new(store.clone(), "events")?,
                delivered: delivered.clone(),
            };
            let relay = dray::Relay::new(store.clone(), "bench", sink)?.spawn();
            let start = Instant::now();
            let mut outbox = dray::Outbox::new("bench")?;
            for chunk in 0..W5_EVENTS / W5_PER_TX {
                let mut tx = store
                    .pool()
                    .begin()
                    .await
                    .map_err(|e| format!("W5: begin: {e}"))?;
                for i in 0..W5_PER_TX {
                    outbox.stage("bench.event", &(chunk * W5_PER_TX + i))?;
                }
                outbox.flush(store, &mut *tx).await?;
                tx.commit().await.map_err(|e| format!("W5: commit: {e}"))?;
            }
            let staged = start.elapsed();
            wait_for_count(
                w.name(),
                "published",
                W5_EVENTS,
                (Duration::from_millis(2), STALL),
                || delivered.load(Ordering::Relaxed),
            )
            .await?;
            // The relay marks them after the sink answered: wait for the last marks.
            let deadline = Instant::now() + STALL;
            loop {
                let open = store
                    .outbox_list("bench", Some(dray::outbox::OutboxStatus::Processing), 1)
                    .await?
                    .len()
                    + store
                        .outbox_list("bench", Some(dray::outbox::OutboxStatus::Pending), 1)
                        .await?
                        .len();
                if open == 0 {
                    break;
                }
                if Instant::now() > deadline {
                    return Err("W5: every event was delivered but some were never marked".into());
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let secs = start.elapsed().as_secs_f64();
            relay.shutdown().await;
            let stats = store.outbox_stats("bench").await?;
            if stats.published as usize != W5_EVENTS {
                return Err(
                    format!("W5: {} of {W5_EVENTS} events published", stats.published).into(),
                );
            }
            extra.insert("staging_secs".into(), staged.as_secs_f64().into());
            W5_EVENTS as f64 / secs
        }
        Workload::H1 => http_enqueue(store, n, &mut extra).await?,
        Workload::H2 => http_followed_drain(store, n, &mut extra).await?,
        Workload::W6 => {
            let producer = store.reopen(url).await?;
            let p99 = held_xmin_latency(store, &producer, cfg.phase, &mut extra).await;
            producer.close_handle().await;
            p99?
        }
    };
    let n = match w {
        Workload::W4 => W4_RUNS,
        Workload::W5 => W5_EVENTS,
        _ => n,
    };
    if !matches!(
        w,
        Workload::W2
            | Workload::W2Tuned
            | Workload::W3
            | Workload::W3Remote
            | Workload::W3Scheduled
            | Workload::W6
            | Workload::PacedInsert
    ) && let (Some(a), Some(b)) = (wal0, store.wal_position().await?)
    {
        let bytes = store.wal_diff(&b, &a).await?;
        let key = match w {
            Workload::W4 => "wal_bytes_per_run",
            Workload::W5 => "wal_bytes_per_event",
            _ => "wal_bytes_per_job",
        };
        extra.insert(key.into(), (bytes / n as f64).round().into());
    }
    Ok(Some(Rep { value, extra }))
}

/// Queues `n` no-op jobs in chunks of 1,000 (W1-batch, and the setup of W2 and the floor).
async fn prefill<S: Store>(store: &S, n: usize) -> BenchResult<()> {
    let client = Client::new(store.clone());
    for start in (0..n).step_by(1000) {
        let chunk: Vec<serde_json::Value> = (start..(start + 1000).min(n))
            .map(|i| serde_json::json!({ "i": i }))
            .collect();
        client.enqueue_many::<Noop>(chunk.iter()).await?;
    }
    Ok(())
}

/// [`prefill`], then table statistics where a live database has them: PostgreSQL's
/// autovacuum always gathers them, so the planner sees a table of `n` rows, as in production,
/// rather than an empty one (which can hide a plan that scans the table). Dray never runs
/// `ANALYZE` on SQLite, so a SQLite file has none unless its owner adds them; the SQLite runs
/// leave them out. `DRAY_BENCH_ANALYZE=1` or `=0` (an experiment knob) overrides that choice
/// for either store.
async fn prefill_analyzed<S: RawStore>(store: &S, n: usize) -> BenchResult<()> {
    prefill(store, n).await?;
    let analyze = match std::env::var("DRAY_BENCH_ANALYZE").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => store.backend() == "postgres",
    };
    if analyze {
        store.analyze().await?;
    }
    Ok(())
}

/// What a run was measured on: versions of everything and the machine, as one JSON object.
pub async fn meta(url: &str) -> serde_json::Value {
    let cmd = |c: &str, args: &[&str]| {
        std::process::Command::new(c)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo.lines().next().unwrap_or_default().to_owned();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned());
    let database = if url.starts_with("postgres") {
        match dray::sqlx::PgPool::connect(url).await {
            Ok(pool) => dray::sqlx::query_scalar::<_, String>("SELECT version()")
                .fetch_one(&pool)
                .await
                .ok(),
            Err(_) => None,
        }
    } else {
        match dray::sqlx::SqlitePool::connect("sqlite::memory:").await {
            Ok(pool) => {
                dray::sqlx::query_scalar::<_, String>("SELECT 'SQLite ' || sqlite_version()")
                    .fetch_one(&pool)
                    .await
                    .ok()
            }
            Err(_) => None,
        }
    };
    serde_json::json!({
        "system": "meta",
        "dray": env!("CARGO_PKG_VERSION"),
        "git": cmd("git", &["rev-parse", "--short", "HEAD"]),
        "rustc": cmd("rustc", &["--version"]),
        "database": database,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu": cpu,
        "memory": mem,
        "kernel": cmd("uname", &["-sr"]),
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "at": chrono::Utc::now().to_rfc3339(),
    })
}

/// Dray's share of the baselines measured in the same run: W1-single over the plain INSERT,
/// W2 and W2-tuned over the raw-SQL floor, and W3's p50 over the paced INSERT's (a latency:
/// there 1.0 would mean that the pick-up adds nothing to the enqueue's commit), per store.
/// Pairs whose halves were not both run are left out.
pub fn ratios(results: &[Measurement]) -> Vec<(String, f64)> {
    let find = |store: &str, w: &str| {
        results
            .iter()
            .find(|m| m.store == store && m.workload == w && m.value > 0.0)
            .map(|m| m.value)
    };
    let mut out = Vec::new();
    for store in ["postgres", "sqlite"] {
        for (num, den) in [
            ("W1-single", "plain-insert"),
            ("W2", "floor"),
            ("W2-tuned", "floor"),
            ("W3", "paced-insert"),
        ] {
            if let (Some(a), Some(b)) = (find(store, num), find(store, den)) {
                out.push((format!("{store} {num} / {den}"), a / b));
            }
        }
    }
    out
}

/// W3 and W3-remote: a worker on `worker_store`; 1,000 jobs enqueued through `producer` at a
/// steady 200/s; returns the p50 of (handler start − enqueue time) in ms, with the p99 and the
/// enqueue call's own p50 and p99 in `extra`.
async fn pickup_latency<S: RawStore>(
    worker_store: &S,
    producer: &S,
    extra: &mut serde_json::Map<String, serde_json::Value>,
) -> BenchResult<f64> {
    let samples = Arc::new(Mutex::new(Vec::with_capacity(1000)));
    let handle = Worker::new(worker_store.clone())
        .register(Latency {
            samples: samples.clone(),
        })
        .start()?;
    let client = Client::new(producer.clone());
    // Let the worker reach its idle long-poll before measuring.
    client
        .enqueue::<Latency>(&chrono::Utc::now().timestamp_micros())
        .await?;
    let picked = || samples.lock().map(|s| s.len()).unwrap_or(0);
    wait_for_count(
        "W3 warm-up",
        "picked up",
        1,
        (Duration::from_millis(5), STALL),
        picked,
    )
    .await?;
    samples.lock().map(|mut s| s.clear()).ok();
    // How long the enqueue itself takes (its INSERT and commit): part of every sample.
    let mut enqueue_us = paced(|_| async {
        client
            .enqueue::<Latency>(&chrono::Utc::now().timestamp_micros())
            .await
            .map(drop)
            .map_err(Into::into)
    })
    .await?;
    extra.insert(
        "enqueue_p50_ms".into(),
        percentile_ms(&mut enqueue_us, 0.50).into(),
    );
    extra.insert(
        "enqueue_p99_ms".into(),
        percentile_ms(&mut enqueue_us, 0.99).into(),
    );
    latency_percentiles("W3", "picked up", PACED, handle, &samples, extra).await
}

/// The end of a latency workload: waits until all `n` jobs have reported a sample (the
/// percentiles of only those that did would hide the lost ones), stops the worker, and returns
/// the p50 in ms, with the p99, the largest and the sample count in `extra`.
async fn latency_percentiles(
    workload: &str,
    what: &str,
    n: usize,
    handle: dray::WorkerHandle,
    samples: &Mutex<Vec<(i64, u64)>>,
    extra: &mut serde_json::Map<String, serde_json::Value>,
) -> BenchResult<f64> {
    let picked = || samples.lock().map(|s| s.len()).unwrap_or(0);
    let all = wait_for_count(workload, what, n, (Duration::from_millis(5), STALL), picked).await;
    handle.shutdown().await?;
    all?;
    let mut s: Vec<u64> = samples
        .lock()
        .map(|s| s.iter().map(|(_, l)| *l).collect())
        .unwrap_or_default();
    extra.insert("p99_ms".into(), percentile_ms(&mut s, 0.99).into());
    extra.insert("max_ms".into(), percentile_ms(&mut s, 1.0).into());
    extra.insert("samples".into(), s.len().into());
    Ok(percentile_ms(&mut s, 0.50))
}

/// Jobs of W3-scheduled.
const SCHEDULED: usize = 200;

/// W3-scheduled: a worker on `store`; [`SCHEDULED`] jobs, one every 50 ms, each due 0.5–2 s
/// after it is enqueued, the even ones through `store` and the odd ones through `other` (as
/// another process), half of each by `delay` and half by `not_before`; returns the p50 of
/// (handler start − due time) in ms, with the p99 and the largest in `extra`.
async fn scheduled_latency<S: RawStore>(
    store: &S,
    other: &S,
    extra: &mut serde_json::Map<String, serde_json::Value>,
) -> BenchResult<f64> {
    let samples = Arc::new(Mutex::new(Vec::with_capacity(SCHEDULED)));
    let handle = Worker::new(store.clone())
        .register(Latency {
            samples: samples.clone(),
        })
        .start()?;
    let clients = [Client::new(store.clone()), Client::new(other.clone())];
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    for i in 0..SCHEDULED {
        tick.tick().await;
        // 0.5 to 2 s ahead, spread over the range.
        let ahead = Duration::from_millis(500 + (i as u64 * 7919) % 1500);
        let due = chrono::Utc::now() + ahead;
        let client = &clients[i % 2];
        let input = due.timestamp_micros();
        if (i / 2) % 2 == 0 {
            client
                .enqueue_with::<Latency>(&input, |o| o.not_before(due))
                .await?;
        } else {
            // Due `ahead` after the database's now() at the insert, a little after `due`: the
            // sample is then a little larger than the true lateness, never smaller.
            client
                .enqueue_with::<Latency>(&input, |o| o.delay(ahead))
                .await?;
        }
    }
    latency_percentiles(
        "W3-scheduled",
        "started",
        SCHEDULED,
        handle,
        &samples,
        extra,
    )
    .await
}

/// W6's steady rate, jobs per second.
pub const W6_RATE: usize = 800;
/// W6's worker concurrency.
pub const W6_CONCURRENCY: usize = 32;

/// W6: a worker on `store` running [`W6_CONCURRENCY`] at a time; [`W6_RATE`] jobs/s enqueued
/// one per call through `producer` for four `phase`s: one clean, two while a transaction of
/// another connection stays open, one after it ends. Returns the held phase's p99 in ms; the
/// p50 and p99 of every phase, their ratio to the clean phase's, and the tables' sizes and
/// dead rows at the end of each phase go in `extra`.
async fn held_xmin_latency<S: RawStore>(
    store: &S,
    producer: &S,
    phase: Duration,
    extra: &mut serde_json::Map<String, serde_json::Value>,
) -> BenchResult<f64> {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let handle = Worker::new(store.clone())
        .register(Latency {
            samples: samples.clone(),
        })
        .queue(QUEUE, W6_CONCURRENCY)?
        .start()?;
    let client = Client::new(producer.clone());
    // 8 jobs every 10 ms, each its own enqueue (its own transaction), as requests would.
    let per_tick = W6_RATE / 100;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0usize;
    let mut bounds = Vec::new();
    let mut sizes = serde_json::Map::new();
    let mut hold = None;
    for (name, length) in [("clean", 1), ("held", 2), ("recovery", 1)] {
        if name == "held" {
            hold = Some(store.hold_xmin().await?);
        }
        if name == "recovery" {
            drop(hold.take());
        }
        let start_us = chrono::Utc::now().timestamp_micros();
        let end = Instant::now() + phase * length;
        while Instant::now() < end {
            tick.tick().await;
            for _ in 0..per_tick {
                client
                    .enqueue::<Latency>(&chrono::Utc::now().timestamp_micros())
                    .await?;
                sent += 1;
            }
        }
        bounds.push((name, start_us, chrono::Utc::now().timestamp_micros()));
        if let Some(s) = store.table_sizes().await? {
            sizes.insert(name.into(), s);
        }
    }
    let picked = || samples.lock().map(|s| s.len()).unwrap_or(0);
    let all = wait_for_count(
        "W6",
        "picked up",
        sent,
        (Duration::from_millis(5), STALL),
        picked,
    )
    .await;
    handle.shutdown().await?;
    all?;
    let all = samples.lock().map(|s| s.clone()).unwrap_or_default();
    let mut phases = serde_json::Map::new();
    let mut p99s = Vec::new();
    for (name, from, to) in bounds {
        let mut lat: Vec<u64> = all
            .iter()
            .filter(|(sent, _)| (from..to).contains(sent))
            .map(|(_, l)| *l)
            .collect();
        let (p50, p99) = (percentile_ms(&mut lat, 0.50), percentile_ms(&mut lat, 0.99));
        p99s.push(p99);
        phases.insert(
            name.into(),
            serde_json::json!({ "p50_ms": p50, "p99_ms": p99, "samples": lat.len() }),
        );
    }
    extra.insert("phases".into(), phases.into());
    extra.insert("tables".into(), sizes.into());
    extra.insert("phase_secs".into(), phase.as_secs_f64().into());
    extra.insert("rate".into(), W6_RATE.into());
    extra.insert("concurrency".into(), W6_CONCURRENCY.into());
    if p99s[0] > 0.0 {
        extra.insert("held_p99_over_clean".into(), (p99s[1] / p99s[0]).into());
    }
    Ok(p99s[1])
}

/// How long a wait of the harness may see no progress before the run fails instead of
/// hanging (a job lost, a worker stuck): far beyond any healthy pause.
const STALL: Duration = Duration::from_secs(30);

/// Polls `count` every `every` until it reaches `target`; fails when it has not moved for
/// `stall` ([`STALL`] in the workloads), naming the workload and how far it got.
async fn wait_for_count(
    workload: &str,
    what: &str,
    target: usize,
    (every, stall): (Duration, Duration),
    count: impl Fn() -> usize,
) -> BenchResult<()> {
    let mut last = count();
    let mut moved = Instant::now();
    while last < target {
        if moved.elapsed() > stall {
            return Err(format!(
                "{workload}: {last} of {target} jobs {what}, none more in {} ms (a job lost or \
                 the worker stuck; run with DRAY_LOG=debug)",
                stall.as_millis()
            )
            .into());
        }
        tokio::time::sleep(every).await;
        let now = count();
        if now != last {
            last = now;
            moved = Instant::now();
        }
    }
    Ok(())
}

/// Calls of W3 and of the paced INSERT: this many, at [`PACE`].
const PACED: usize = 1000;

/// W3's steady rate: one call every 5 ms (200/s).
const PACE: Duration = Duration::from_millis(5);

/// Makes [`PACED`] calls `call(0)`, `call(1)`, … one per [`PACE`] (a late call delays the
/// schedule rather than bunching the next ones); returns how long each took, in µs.
async fn paced<F, Fut>(mut call: F) -> BenchResult<Vec<u64>>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = BenchResult<()>>,
{
    let mut tick = tokio::time::interval(PACE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut took = Vec::with_capacity(PACED);
    for i in 0..PACED {
        tick.tick().await;
        let t = Instant::now();
        call(i).await?;
        took.push(t.elapsed().as_micros() as u64);
    }
    Ok(took)
}

/// The `p` quantile (0–1) of samples in µs, in ms (0 for no samples).
fn percentile_ms(samples: &mut [u64], p: f64) -> f64 {
    samples.sort_unstable();
    let at = ((samples.len() as f64 * p) as usize).min(samples.len().saturating_sub(1));
    samples.get(at).copied().unwrap_or(0) as f64 / 1000.0
}

/// Concurrent connections of [`Workload::H1`].
pub const H1_CONNECTIONS: usize = 32;
/// Live-event subscribers of [`Workload::H2`].
pub const H2_SUBSCRIBERS: usize = 1000;

/// A `dray serve` in this process on a loopback port, with an admin token.
async fn local_server<S: RawStore>(store: &S) -> BenchResult<(String, String, ServerHandle<S>)> {
    use dray::api::{NewToken, Scope, generate_token};
    let (token, hash) = generate_token()?;
    store
        .token_insert(&NewToken {
            id: dray::uuid::Uuid::now_v7(),
            name: format!("bench-{}", dray::uuid::Uuid::now_v7().simple()),
            scopes: vec![Scope::Admin],
            hash,
            ttl: None,
        })
        .await?;
    let config = dray_server::ServerConfig {
        addr: "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?,
        ..dray_server::ServerConfig::default()
    };
    let listener = dray_server::bind(&config).await?;
    let base = format!("http://{}", listener.local_addr()?);
    let app = dray_server::App::new(store.clone(), config, dray_server::Catalog::new());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(dray_server::serve_on(listener, app.clone(), async move {
        let _ = stopped.await;
    }));
    Ok((base, token, ServerHandle { app, stop, task }))
}

struct ServerHandle<S: RawStore> {
    app: dray_server::App<S>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl<S: RawStore> ServerHandle<S> {
    async fn stop(self) -> BenchResult<()> {
        let _ = self.stop.send(());
        self.task.await.map_err(|e| format!("server task: {e}"))??;
        Ok(())
    }
}

async fn http_enqueue<S: RawStore>(
    store: &S,
    n: usize,
    extra: &mut serde_json::Map<String, serde_json::Value>,
) -> BenchResult<f64> {
    let (base, token, server) = local_server(store).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(H1_CONNECTIONS)
        .build()?;
    let url = format!("{base}/api/v1/jobs");
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..H1_CONNECTIONS)
        .map(|_| {
            let (http, url, token, next) = (http.clone(), url.clone(), token.clone(), next.clone());
            tokio::spawn(async move {
                let mut samples = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return Ok::<_, String>(samples);
                    }
                    let t = Instant::now();
                    let r = http
                        .post(&url)
                        .bearer_auth(&token)
                        .json(&serde_json::json!({"kind": Noop::NAME, "queue": QUEUE, "input": {"i": i}}))
                        .send()
                        .await
                        .map_err(|e| format!("H1: POST: {e}"))?;
                    if r.status() != reqwest::StatusCode::CREATED {
                        return Err(format!("H1: POST answered {}", r.status()));
                    }
                    let _ = r.bytes().await;
                    samples.push(t.elapsed().as_micros() as u64);
                }
            })
        })
        .collect();
    let mut samples = Vec::with_capacity(n);
    for t in tasks {
        samples.extend(t.await.map_err(|e| format!("H1: {e}"))??);
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let queued = Queue::new(store.clone()).stats(QUEUE).await?.available as usize;
    if queued != n {
        return Err(format!("H1: {queued} of {n} jobs are queued").into());
    }
    extra.insert("connections".into(), H1_CONNECTIONS.into());
    extra.insert("p50_ms".into(), percentile_ms(&mut samples, 0.50).into());
    extra.insert("p99_ms".into(), percentile_ms(&mut samples, 0.99).into());
    server.stop().await?;
    Ok(rate)
}

async fn http_followed_drain<S: RawStore>(
    store: &S,
    n: usize,
    extra: &mut serde_json::Map<String, serde_json::Value>,
) -> BenchResult<f64> {
    let (base, token, server) = local_server(store).await?;
    // The same drain three times on one server: without subscribers, with 1,000 following
    // jobs, and with one dashboard taking every job change from `/events`.
    let alone = followed_drain(store, n, &base, &token, &server, 0, false).await?;
    let followed = followed_drain(store, n, &base, &token, &server, H2_SUBSCRIBERS, false).await?;
    let watched = followed_drain(store, n, &base, &token, &server, 0, true).await?;
    server.stop().await?;
    extra.insert(
        "jobs_per_s_with_dashboard".into(),
        watched.rate.round().into(),
    );
    extra.insert("dashboard_job_events".into(), watched.job_events.into());
    if let Some(t) = watched.tx_per_job {
        extra.insert(
            "db_tx_per_job_with_dashboard".into(),
            ((t * 1000.0).round() / 1000.0).into(),
        );
    }
    extra.insert("subscribers".into(), H2_SUBSCRIBERS.into());
    extra.insert("subscribers_ended".into(), followed.ended.into());
    extra.insert(
        "hub_reads_per_s".into(),
        followed.hub_reads_per_s.round().into(),
    );
    extra.insert(
        "jobs_per_s_without_subscribers".into(),
        alone.rate.round().into(),
    );
    if let (Some(a), Some(b)) = (alone.tx_per_job, followed.tx_per_job) {
        extra.insert(
            "db_tx_per_job_without".into(),
            ((a * 1000.0).round() / 1000.0).into(),
        );
        extra.insert(
            "db_tx_per_job_with".into(),
            ((b * 1000.0).round() / 1000.0).into(),
        );
    }
    Ok(followed.rate)
}

/// What one drain of [`Workload::H2`] measured.
struct Drained {
    rate: f64,
    /// Database transactions per job during the drain (PostgreSQL).
    tx_per_job: Option<f64>,
    hub_reads_per_s: f64,
    ended: usize,
    /// `job` events the dashboard stream delivered (0 without one).
    job_events: usize,
}

/// PostgreSQL's backends report their transaction counts when idle, at most every
/// `PGSTAT_IDLE_INTERVAL` (10 s): a count read sooner misses the last second of work.
const STATS_SETTLE: Duration = Duration::from_millis(10_500);

async fn followed_drain<S: RawStore>(
    store: &S,
    n: usize,
    base: &str,
    token: &str,
    server: &ServerHandle<S>,
    subscribers: usize,
    dashboard: bool,
) -> BenchResult<Drained> {
    use futures_util::StreamExt;
    prefill_analyzed(store, n).await?;
    let http = reqwest::Client::new();
    let job_events = Arc::new(AtomicUsize::new(0));
    let dashboard = if dashboard {
        let r = http
            .get(format!("{base}/api/v1/events?queue={QUEUE}"))
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| format!("H2: dashboard: {e}"))?;
        let job_events = job_events.clone();
        Some(tokio::spawn(async move {
            let mut body = r.bytes_stream();
            let mut buf = String::new();
            while let Some(Ok(chunk)) = body.next().await {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buf.find("\n\n") {
                    if buf[..end].starts_with("event: job\n") {
                        job_events.fetch_add(1, Ordering::Relaxed);
                    }
                    buf.drain(..end + 2);
                }
            }
        }))
    } else {
        None
    };
    let followed: Vec<dray::uuid::Uuid> = if subscribers == 0 {
        Vec::new()
    } else {
        Client::new(store.clone())
            .list(&dray::JobFilter {
                queue: Some(dray::QueueName::new(QUEUE)?),
                state: Some(dray::MessageState::Available),
                limit: subscribers.min(n) as u32,
                ..dray::JobFilter::default()
            })
            .await?
            .into_iter()
            .map(|m| m.id)
            .collect()
    };
    let ended = Arc::new(AtomicUsize::new(0));
    let mut streams = Vec::new();
    for id in &followed {
        let r = http
            .get(format!("{base}/api/v1/jobs/{id}/events"))
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| format!("H2: subscribe: {e}"))?;
        let ended = ended.clone();
        streams.push(tokio::spawn(async move {
            let mut body = r.bytes_stream();
            let mut seen = String::new();
            while let Some(chunk) = body.next().await {
                let Ok(chunk) = chunk else { break };
                seen.push_str(&String::from_utf8_lossy(&chunk));
                if seen.contains("event: end") {
                    ended.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                if seen.len() > 4096 {
                    seen.drain(..seen.len() - 64);
                }
            }
        }));
    }
    // Every subscriber is attached before the drain starts.
    let deadline = Instant::now() + STALL;
    while server.app.live_job_followers() < followed.len() {
        if Instant::now() > deadline {
            return Err("H2: the subscribers did not attach".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(STATS_SETTLE).await;
    let tx_start = store.transactions().await?;
    let runs = Arc::new(AtomicUsize::new(0));
    let worker = Worker::new(store.clone()).register(Counted { runs: runs.clone() });
    let reads0 = server.app.live_event_reads();
    let start = Instant::now();
    let handle = worker.start()?;
    wait_for_count("H2", "ran", n, (Duration::from_millis(2), STALL), || {
        runs.load(Ordering::Relaxed)
    })
    .await?;
    let deadline = Instant::now() + STALL;
    while store.any_unfinished(QUEUE).await? {
        if Instant::now() > deadline {
            return Err("H2: jobs were still unfinished".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let reads = server.app.live_event_reads() - reads0;
    handle.shutdown().await?;
    // Untimed: every subscriber saw its job's end.
    let deadline = Instant::now() + STALL;
    while ended.load(Ordering::Relaxed) < followed.len() {
        if Instant::now() > deadline {
            return Err(format!(
                "H2: {} of {} subscribers saw their job end",
                ended.load(Ordering::Relaxed),
                followed.len()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for s in streams {
        let _ = s.await;
    }
    if let Some(d) = dashboard {
        // Untimed: a claim and a completion of every job reach the dashboard.
        let deadline = Instant::now() + STALL;
        while job_events.load(Ordering::Relaxed) < 2 * n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        d.abort();
    }
    tokio::time::sleep(STATS_SETTLE).await;
    let tx_per_job = match (tx_start, store.transactions().await?) {
        (Some(a), Some(b)) => Some((b - a) as f64 / n as f64),
        _ => None,
    };
    Ok(Drained {
        rate: n as f64 / secs,
        tx_per_job,
        hub_reads_per_s: reads as f64 / secs,
        ended: ended.load(Ordering::Relaxed),
        job_events: job_events.load(Ordering::Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(50));

    #[tokio::test]
    async fn a_wait_ends_when_the_count_is_reached() {
        let n = AtomicUsize::new(0);
        // Each poll moves the count, so it never stalls.
        let count = || n.fetch_add(1, Ordering::Relaxed);
        wait_for_count("W2", "ran", 20, FAST, count).await.unwrap();
        assert!(n.load(Ordering::Relaxed) > 20);
    }

    #[tokio::test]
    async fn a_wait_that_stops_moving_fails_and_says_how_far_it_got() {
        let err = wait_for_count("W3", "picked up", 1000, FAST, || 997)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("W3: 997 of 1000 jobs picked up, none more in 50 ms"),
            "{err}"
        );
    }

    #[test]
    fn percentiles_of_samples() {
        let mut s: Vec<u64> = (1..=100).rev().map(|x| x * 1000).collect();
        assert_eq!(percentile_ms(&mut s, 0.50), 51.0);
        assert_eq!(percentile_ms(&mut s, 0.99), 100.0);
        assert_eq!(percentile_ms(&mut [], 0.5), 0.0);
    }
}
