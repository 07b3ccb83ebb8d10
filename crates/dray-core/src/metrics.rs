//! Metrics through the [`metrics`] facade: Dray records, the application picks the exporter
//! (`dray-server` renders Prometheus text at `/metrics`; any `metrics` recorder works).
//!
//! Every name follows Prometheus conventions (`_total` counters, base units in seconds) and
//! every label value is bounded: queue, kind, workflow and schedule names, never ids. Past
//! [`MAX_LABEL_SETS`] distinct (queue, kind) pairs, further pairs are counted under
//! `queue="_other", kind="_other"` so that a stream of made-up kinds (say, from the HTTP API)
//! cannot grow a scrape without bound.
//!
//! The hot path allocates nothing per job: the handles of a (queue, kind) pair are made once
//! and cached. A consequence, as with any cached `metrics` handle: **install the recorder before
//! the first job is enqueued or run** in the process; handles made before it record nothing.
//!
//! The list of every metric, with its type, labels and meaning, is in the observability guide
//! (`dray::guide::observability`).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Unit};

use crate::types::{FailureKind, NewMessage};

/// Jobs stored by an enqueue (duplicates of a unique key not counted), by queue and kind.
pub const JOBS_ENQUEUED: &str = "dray_jobs_enqueued_total";
/// Attempts started by a worker, by queue and kind.
pub const JOBS_STARTED: &str = "dray_jobs_started_total";
/// Attempts completed (the completion was recorded), by queue and kind.
pub const JOBS_COMPLETED: &str = "dray_jobs_completed_total";
/// Attempts that failed, by queue, kind and failure (`error`, `permanent`, `panic`,
/// `timeout`, `cancelled`).
pub const JOBS_FAILED: &str = "dray_jobs_failed_total";
/// Failed attempts scheduled to run again, by queue and kind.
pub const JOBS_RETRIED: &str = "dray_jobs_retried_total";
/// Jobs that ended dead (out of attempts, or a permanent error), by queue and kind.
pub const JOBS_DEAD: &str = "dray_jobs_dead_total";
/// Jobs that ended cancelled while running, by queue and kind.
pub const JOBS_CANCELLED: &str = "dray_jobs_cancelled_total";
/// Handler run time of an attempt in seconds, by queue and kind.
pub const JOB_DURATION: &str = "dray_job_duration_seconds";
/// Seconds from the time a job became due (enqueue, delay or retry time) to its start, by
/// queue and kind, on the database clock.
pub const JOB_PICKUP_LATENCY: &str = "dray_job_pickup_latency_seconds";
/// Handlers running now in this process, by queue.
pub const JOBS_IN_FLIGHT: &str = "dray_jobs_in_flight";
/// Unfinished jobs by queue and state (`available`, `scheduled`, `running`), sampled by the
/// maintenance leader.
pub const QUEUE_JOBS: &str = "dray_queue_jobs";
/// Seconds the oldest available job of a queue has been due, sampled by the maintenance
/// leader (0 when none is waiting).
pub const QUEUE_OLDEST_AVAILABLE_AGE: &str = "dray_queue_oldest_available_age_seconds";
/// Workflow runs started, by workflow.
pub const WORKFLOW_RUNS_STARTED: &str = "dray_workflow_runs_started_total";
/// Workflow runs ended, by workflow and status (`completed`, `failed`, `cancelled`).
pub const WORKFLOW_RUNS_ENDED: &str = "dray_workflow_runs_ended_total";
/// Seconds a workflow step's body ran (steps replayed from their record are not counted), by
/// workflow.
pub const WORKFLOW_STEP_DURATION: &str = "dray_workflow_step_duration_seconds";
/// Cron ticks by schedule and outcome (`run`: its job or run was enqueued; `skipped`: the
/// previous one was still running and the schedule does not overlap).
pub const CRON_TICKS: &str = "dray_cron_ticks_total";
/// Cron ticks handled more than [`CRON_LATE_AFTER`] after their time (catch-up after an
/// outage, or a scheduler that fell behind), by schedule.
pub const CRON_TICKS_LATE: &str = "dray_cron_ticks_late_total";
/// Seconds from a cron tick's time to its handling, by schedule.
pub const CRON_TICK_DELAY: &str = "dray_cron_tick_delay_seconds";
/// Outbox events by outbox and state (`pending`, `failed`), sampled by the maintenance leader
/// of a worker that relays.
pub const OUTBOX_EVENTS: &str = "dray_outbox_events";
/// Outbox events published by a relay, by outbox.
pub const OUTBOX_PUBLISHED: &str = "dray_outbox_published_total";
/// Outbox publish attempts that failed (to be retried, or failed for good), by outbox.
pub const OUTBOX_PUBLISH_FAILURES: &str = "dray_outbox_publish_failures_total";
/// Seconds from an outbox event's creation (the time in its UUIDv7 id) to its publication, by
/// outbox.
pub const OUTBOX_PUBLISH_LATENCY: &str = "dray_outbox_publish_latency_seconds";

/// Every metric Dray records.
pub const ALL: &[&str] = &[
    JOBS_ENQUEUED,
    JOBS_STARTED,
    JOBS_COMPLETED,
    JOBS_FAILED,
    JOBS_RETRIED,
    JOBS_DEAD,
    JOBS_CANCELLED,
    JOB_DURATION,
    JOB_PICKUP_LATENCY,
    JOBS_IN_FLIGHT,
    QUEUE_JOBS,
    QUEUE_OLDEST_AVAILABLE_AGE,
    WORKFLOW_RUNS_STARTED,
    WORKFLOW_RUNS_ENDED,
    WORKFLOW_STEP_DURATION,
    CRON_TICKS,
    CRON_TICKS_LATE,
    CRON_TICK_DELAY,
    OUTBOX_EVENTS,
    OUTBOX_PUBLISHED,
    OUTBOX_PUBLISH_FAILURES,
    OUTBOX_PUBLISH_LATENCY,
];

/// A cron tick handled later than this after its time counts in [`CRON_TICKS_LATE`].
pub const CRON_LATE_AFTER: Duration = Duration::from_secs(1);

/// Most distinct (queue, kind) label pairs; later pairs are counted as `_other`.
pub const MAX_LABEL_SETS: usize = 1000;

/// The label value standing for pairs past [`MAX_LABEL_SETS`].
pub const OTHER: &str = "_other";

/// Histogram buckets for every `_seconds` histogram: 1 ms to 10 min.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 600.0,
];

/// Gives every Dray metric its unit and help text in the installed recorder. Exporters that
/// print help (Prometheus) call it once after installing; calling it again is harmless.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        JOBS_ENQUEUED,
        Unit::Count,
        "Jobs stored by an enqueue, by queue and kind."
    );
    describe_counter!(
        JOBS_STARTED,
        Unit::Count,
        "Job attempts started, by queue and kind."
    );
    describe_counter!(
        JOBS_COMPLETED,
        Unit::Count,
        "Job attempts completed, by queue and kind."
    );
    describe_counter!(
        JOBS_FAILED,
        Unit::Count,
        "Job attempts failed, by queue, kind and failure."
    );
    describe_counter!(
        JOBS_RETRIED,
        Unit::Count,
        "Failed attempts scheduled to run again."
    );
    describe_counter!(JOBS_DEAD, Unit::Count, "Jobs that ended dead.");
    describe_counter!(
        JOBS_CANCELLED,
        Unit::Count,
        "Jobs that ended cancelled while running."
    );
    describe_histogram!(
        JOB_DURATION,
        Unit::Seconds,
        "Handler run time of an attempt."
    );
    describe_histogram!(
        JOB_PICKUP_LATENCY,
        Unit::Seconds,
        "Time from a job's due time to its start (database clock)."
    );
    describe_gauge!(
        JOBS_IN_FLIGHT,
        Unit::Count,
        "Handlers running now in this process."
    );
    describe_gauge!(
        QUEUE_JOBS,
        Unit::Count,
        "Unfinished jobs by queue and state (sampled)."
    );
    describe_gauge!(
        QUEUE_OLDEST_AVAILABLE_AGE,
        Unit::Seconds,
        "How long the oldest available job of a queue has been due (sampled)."
    );
    describe_counter!(WORKFLOW_RUNS_STARTED, Unit::Count, "Workflow runs started.");
    describe_counter!(
        WORKFLOW_RUNS_ENDED,
        Unit::Count,
        "Workflow runs ended, by status."
    );
    describe_histogram!(
        WORKFLOW_STEP_DURATION,
        Unit::Seconds,
        "Run time of a workflow step."
    );
    describe_counter!(
        CRON_TICKS,
        Unit::Count,
        "Cron ticks by schedule and outcome."
    );
    describe_counter!(
        CRON_TICKS_LATE,
        Unit::Count,
        "Cron ticks handled over 1 s late."
    );
    describe_histogram!(
        CRON_TICK_DELAY,
        Unit::Seconds,
        "Time from a cron tick to its handling."
    );
    describe_gauge!(
        OUTBOX_EVENTS,
        Unit::Count,
        "Outbox events by state (sampled)."
    );
    describe_counter!(OUTBOX_PUBLISHED, Unit::Count, "Outbox events published.");
    describe_counter!(
        OUTBOX_PUBLISH_FAILURES,
        Unit::Count,
        "Outbox publish attempts that failed."
    );
    describe_histogram!(
        OUTBOX_PUBLISH_LATENCY,
        Unit::Seconds,
        "Time from an outbox event's creation to its publication."
    );
}

/// The handles of one (queue, kind) pair, made once.
pub(crate) struct JobMetrics {
    queue: String,
    kind: String,
    pub(crate) enqueued: Counter,
    pub(crate) started: Counter,
    pub(crate) completed: Counter,
    pub(crate) retried: Counter,
    pub(crate) dead: Counter,
    pub(crate) cancelled: Counter,
    pub(crate) duration: Histogram,
    pub(crate) pickup: Histogram,
    /// The queue's in-flight gauge (the same series for every kind of the queue).
    pub(crate) in_flight: Gauge,
    /// One per [`FailureKind`], made on its first use (most pairs never see most kinds).
    failed: [OnceLock<Counter>; FAILURE_KINDS],
}

const FAILURE_KINDS: usize = 7;

fn failure_index(kind: FailureKind) -> usize {
    match kind {
        FailureKind::Error => 0,
        FailureKind::Permanent => 1,
        FailureKind::Panic => 2,
        FailureKind::Timeout => 3,
        FailureKind::Cancelled => 4,
        FailureKind::LeaseExpired => 5,
        FailureKind::Unreadable => 6,
    }
}

impl JobMetrics {
    /// The queue these handles count.
    pub(crate) fn queue(&self) -> &str {
        &self.queue
    }

    fn new(queue: &str, kind: &str) -> Self {
        let labels = [("queue", queue.to_owned()), ("kind", kind.to_owned())];
        Self {
            queue: queue.to_owned(),
            kind: kind.to_owned(),
            enqueued: metrics::counter!(JOBS_ENQUEUED, &labels),
            started: metrics::counter!(JOBS_STARTED, &labels),
            completed: metrics::counter!(JOBS_COMPLETED, &labels),
            retried: metrics::counter!(JOBS_RETRIED, &labels),
            dead: metrics::counter!(JOBS_DEAD, &labels),
            cancelled: metrics::counter!(JOBS_CANCELLED, &labels),
            duration: metrics::histogram!(JOB_DURATION, &labels),
            pickup: metrics::histogram!(JOB_PICKUP_LATENCY, &labels),
            in_flight: metrics::gauge!(JOBS_IN_FLIGHT, "queue" => queue.to_owned()),
            failed: Default::default(),
        }
    }

    /// The failed-attempts counter of this failure kind.
    pub(crate) fn failed(&self, kind: FailureKind) -> &Counter {
        self.failed[failure_index(kind)].get_or_init(|| {
            metrics::counter!(
                JOBS_FAILED,
                "queue" => self.queue.clone(),
                "kind" => self.kind.clone(),
                "failure" => kind.as_str()
            )
        })
    }
}

type ByKind = HashMap<String, Arc<JobMetrics>>;

struct Cache {
    by_queue: HashMap<String, ByKind>,
    pairs: usize,
    other: Option<Arc<JobMetrics>>,
}

fn cache() -> &'static RwLock<Cache> {
    static CACHE: OnceLock<RwLock<Cache>> = OnceLock::new();
    CACHE.get_or_init(|| {
        RwLock::new(Cache {
            by_queue: HashMap::new(),
            pairs: 0,
            other: None,
        })
    })
}

/// The cached handles of `(queue, kind)`: a read lock and two hash lookups once the pair has
/// been seen.
pub(crate) fn job(queue: &str, kind: &str) -> Arc<JobMetrics> {
    {
        let c = cache().read().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = c.by_queue.get(queue).and_then(|k| k.get(kind)) {
            return m.clone();
        }
    }
    let mut c = cache().write().unwrap_or_else(|p| p.into_inner());
    if let Some(m) = c.by_queue.get(queue).and_then(|k| k.get(kind)) {
        return m.clone();
    }
    if c.pairs >= MAX_LABEL_SETS {
        return c
            .other
            .get_or_insert_with(|| Arc::new(JobMetrics::new(OTHER, OTHER)))
            .clone();
    }
    let m = Arc::new(JobMetrics::new(queue, kind));
    c.pairs += 1;
    c.by_queue
        .entry(queue.to_owned())
        .or_default()
        .insert(kind.to_owned(), m.clone());
    m
}

/// Counts what an enqueue of `messages` stored (its answer `out`, one per message) and passes
/// the answer on.
pub(crate) fn count_enqueued(
    messages: &[NewMessage],
    out: crate::Result<Vec<crate::types::Enqueued>>,
) -> crate::Result<Vec<crate::types::Enqueued>> {
    if let Ok(out) = &out {
        enqueued(messages, out.iter().map(|e| !e.duplicate));
    }
    out
}

/// Counts the messages an enqueue stored: `stored[i]` says whether `messages[i]` was stored
/// (false for a duplicate of a unique key). Runs of one (queue, kind) cost one lookup.
pub(crate) fn enqueued(messages: &[NewMessage], stored: impl Iterator<Item = bool>) {
    let mut run: Option<(&NewMessage, u64)> = None;
    for (m, stored) in messages.iter().zip(stored) {
        if !stored {
            continue;
        }
        match &mut run {
            Some((first, n)) if same_pair(first, m) => *n += 1,
            _ => {
                if let Some((first, n)) = run.take() {
                    add_enqueued(first, n);
                }
                run = Some((m, 1));
            }
        }
    }
    if let Some((first, n)) = run {
        add_enqueued(first, n);
    }
}

fn same_pair(a: &NewMessage, b: &NewMessage) -> bool {
    a.queue.as_str() == b.queue.as_str() && a.kind == b.kind
}

fn add_enqueued(m: &NewMessage, n: u64) {
    job(m.queue.as_str(), m.kind.as_deref().unwrap_or(""))
        .enqueued
        .increment(n);
}

/// Counts the runs a start stored (not those it found started already) and passes the answer
/// on.
pub(crate) fn count_started(
    runs: &[crate::workflow::NewRun],
    out: crate::Result<Vec<crate::workflow::RunStarted>>,
) -> crate::Result<Vec<crate::workflow::RunStarted>> {
    if let Ok(out) = &out {
        for (run, s) in runs.iter().zip(out) {
            if !s.existing {
                run_started(&run.name);
                enqueued(std::slice::from_ref(&run.job), std::iter::once(true));
            }
        }
    }
    out
}

/// Counts a started run of `workflow`.
pub(crate) fn run_started(workflow: &str) {
    metrics::counter!(WORKFLOW_RUNS_STARTED, "workflow" => workflow.to_owned()).increment(1);
}

/// Counts an ended run of `workflow`.
pub(crate) fn run_ended(workflow: &str, status: crate::workflow::RunStatus) {
    metrics::counter!(
        WORKFLOW_RUNS_ENDED,
        "workflow" => workflow.to_owned(),
        "status" => status.as_str()
    )
    .increment(1);
}

/// Records the run time of one attempt of a step of `workflow`.
pub(crate) fn step_ran(workflow: &str, took: Duration) {
    metrics::histogram!(WORKFLOW_STEP_DURATION, "workflow" => workflow.to_owned())
        .record(took.as_secs_f64());
}

/// The creation time in a UUIDv7 id.
pub(crate) fn uuid_time(id: uuid::Uuid) -> Option<chrono::DateTime<chrono::Utc>> {
    let (secs, nanos) = id.get_timestamp()?.to_unix();
    chrono::DateTime::from_timestamp(secs as i64, nanos)
}

/// Seconds as a histogram value (negative spans, from clock rounding, are 0).
pub(crate) fn seconds(d: chrono::TimeDelta) -> f64 {
    d.to_std().map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Sets the sampled per-queue gauges from the unfinished jobs' counts, zeroing the queues
/// that were reported before and have no unfinished job now.
pub(crate) struct QueueGauges {
    reported: std::collections::HashSet<String>,
}

impl QueueGauges {
    pub(crate) fn new() -> Self {
        Self {
            reported: Default::default(),
        }
    }

    pub(crate) fn record(&mut self, now: &[crate::types::QueueGauge]) {
        let mut seen = std::collections::HashSet::with_capacity(now.len());
        for g in now {
            set_queue(
                &g.queue,
                g.available,
                g.scheduled,
                g.running,
                g.oldest_available_age,
            );
            seen.insert(g.queue.clone());
        }
        for q in self.reported.difference(&seen) {
            set_queue(q, 0, 0, 0, Duration::ZERO);
        }
        self.reported = seen;
    }
}

fn set_queue(queue: &str, available: i64, scheduled: i64, running: i64, oldest: Duration) {
    for (state, n) in [
        ("available", available),
        ("scheduled", scheduled),
        ("running", running),
    ] {
        metrics::gauge!(QUEUE_JOBS, "queue" => queue.to_owned(), "state" => state).set(n as f64);
    }
    metrics::gauge!(QUEUE_OLDEST_AVAILABLE_AGE, "queue" => queue.to_owned())
        .set(oldest.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_past_the_bound_share_one_label_set() {
        let first = job("metrics-bound-q", "k0");
        assert_eq!(first.kind, "k0");
        assert!(Arc::ptr_eq(&first, &job("metrics-bound-q", "k0")));
        for i in 1..=MAX_LABEL_SETS + 5 {
            let _ = job("metrics-bound-q", &format!("k{i}"));
        }
        let late = job("metrics-bound-q", "one-more");
        assert_eq!((late.queue.as_str(), late.kind.as_str()), (OTHER, OTHER));
        assert!(Arc::ptr_eq(&late, &job("another-queue", "another-kind")));
        // Pairs seen before the bound keep their own handles.
        assert!(Arc::ptr_eq(&first, &job("metrics-bound-q", "k0")));
    }
}
