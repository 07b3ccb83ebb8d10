//! The worker: runs registered [`Job`] handlers from one or more queues with bounded
//! concurrency.
//!
//! * **Claims in batches, ahead of need**: each queue's fetcher leases its free slots plus what
//!   the queue finishes in [`WorkerConfig::prefetch`] (up to [`WorkerConfig::fetch_batch`]) in
//!   one statement, with the next claim in flight while those start, and long-polls when idle.
//!   Jobs claimed ahead and not started in time, or at shutdown, are given back uncounted.
//! * **Completes in batches**: finished attempts go to a completer that writes everything
//!   finished meanwhile in one statement — no added latency when idle, few round trips under load.
//! * **Leases stay alive** while handlers run: a heartbeat extends them all in one statement per
//!   queue every [`WorkerConfig::heartbeat`], and learns of cancel requests and lost leases.
//! * **Timeouts** drop the handler's future; **panics** are caught; both count as transient
//!   failures. Transient errors retry with the job's backoff; permanent ones are dead at once.
//! * **Fencing**: every write names the attempt; a worker whose lease was taken back changes
//!   nothing (its handler is told through [`JobContext::is_cancelled`]).
//! * **Maintenance** (rescuing expired leases, pruning finished jobs) runs on one worker at a
//!   time, chosen by a leadership lease in the database that fails over when its holder dies.
//! * **Graceful shutdown**: stop claiming, let running jobs finish up to
//!   [`WorkerConfig::shutdown_grace`], then stop them and release their leases so another
//!   worker takes them at once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::{Semaphore, broadcast, mpsc};
use tokio::task::JoinSet;
use tracing::Instrument;
use uuid::Uuid;

use crate::changes::JobChange;
use crate::duration::check_span;
use crate::error::{Error, Result};
use crate::job::{CancelToken, ContextInner, ContextOps, Job, JobContext, JobError, JobOptions};
use crate::queue::{Queue, QueueConfig, ReceiveOptions};
use crate::store::Store;
use crate::types::{
    Completion, FailTo, FailureKind, LeaseRef, LeaseWrite, Message, MessageState, QueueName,
};
use crate::workflow::Workflow;
use crate::workflow::WorkflowEngine;
use crate::workflow::engine::{EngineOps, ErasedWorkflow, TypedWorkflow, WorkflowHandler};

/// Default concurrency of a queue whose concurrency is not given (handlers are async: a
/// hundred waiting on I/O cost little).
pub const DEFAULT_CONCURRENCY: usize = 100;

/// Default of [`WorkerConfig::fetch_batch`].
pub const DEFAULT_FETCH_BATCH: u32 = 500;

/// Default of [`WorkerConfig::prefetch`].
pub const DEFAULT_PREFETCH: Duration = Duration::from_millis(100);

/// At most this many claim batches ([`WorkerConfig::fetch_batch`]) are held claimed ahead of
/// the free slots, whatever the prefetch horizon asks for (a bound on the buffer's memory and
/// on the leases one worker holds without running them).
const MAX_AHEAD_BATCHES: usize = 10;

/// When a busy fetcher that claims nothing ahead (its jobs finish too slowly, or
/// [`WorkerConfig::prefetch`] is zero) would claim for fewer than a quarter of its slots, it
/// waits this long for more to free up first, so that it claims in batches rather than one job
/// per round trip. An idle fetcher (all slots free) never waits. (Claiming as soon as a
/// quarter is free was measured too: no faster on PostgreSQL, slower on SQLite, whose single
/// writer gains most from larger batches.)
pub const FETCH_COOLDOWN: Duration = Duration::from_micros(500);

/// How long a job of a kind a worker has no handler for waits before it can be claimed again
/// (see [`WorkerEvent::Deferred`]).
pub const UNKNOWN_KIND_DEFER: Duration = Duration::from_secs(1);

/// Settings of a [`Worker`].
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// This worker's id, recorded as the lease holder (default `worker-<random>`).
    pub id: String,
    /// Lease of a claimed job (default 30 s; 100 ms to 100 years). A job whose worker dies runs
    /// again this long after its last heartbeat.
    pub lease: Duration,
    /// How often running jobs' leases are extended (default a third of the lease; at least
    /// 1 ms and shorter than the lease).
    pub heartbeat: Duration,
    /// Most jobs claimed in one statement (default 500).
    pub fetch_batch: u32,
    /// How far ahead a queue claims (default 100 ms): beyond its free slots, as many jobs as
    /// it has been finishing in this much time, so that a busy queue of short jobs claims in
    /// large batches instead of one small claim per freed handful of slots. A queue of slow
    /// jobs finishes few per 100 ms and so claims about only what it can start; jobs claimed
    /// ahead and not started within ten times this (at least a second) are given back, as they
    /// are at shutdown, without using up an attempt. Zero claims only for free slots.
    pub prefetch: Duration,
    /// How long running jobs may finish after shutdown begins (default 10 s); `Duration::MAX`
    /// waits for all of them.
    pub shutdown_grace: Duration,
    /// Take part in maintenance (rescue expired leases, prune finished jobs); default true.
    pub maintenance: bool,
    /// How often maintenance runs on the leader (default 1 s).
    pub maintenance_interval: Duration,
    /// How often the maintenance leader samples the gauges of [`crate::metrics`] (per-queue
    /// counts and oldest-job age, outbox counts): one query on the unfinished jobs per
    /// interval, however many workers run (default [`GAUGE_SAMPLE_EVERY`], 10 s; at least
    /// 1 ms).
    pub gauge_interval: Duration,
    /// Finished jobs older than this are pruned (default 24 h). On PostgreSQL, finished jobs
    /// live in a history partitioned by the hour, and pruning drops whole hours: a job is kept
    /// at least this long and at most an hour more (a retention under an hour is kept row by
    /// row).
    pub retention: Duration,
    /// No log line per successful job (failures are still logged at warn). Off by default:
    /// with the `info` level on, every job outcome is one structured line (target
    /// `dray::jobs`: id, kind, queue, attempt, duration, outcome).
    pub quiet: bool,
    /// Key that signs HTTP completion callbacks. A worker with a secret delivers callbacks
    /// (see [`crate::callback`]); without one it leaves them to workers that have one.
    pub callback_secret: Option<Secret>,
}

/// A secret that never shows in `Debug` output or logs.
#[derive(Clone)]
pub struct Secret(pub Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            id: format!("worker-{}", &Uuid::now_v7().simple().to_string()[20..]),
            lease: Duration::from_secs(30),
            heartbeat: Duration::from_secs(10),
            fetch_batch: DEFAULT_FETCH_BATCH,
            prefetch: DEFAULT_PREFETCH,
            shutdown_grace: Duration::from_secs(10),
            maintenance: true,
            maintenance_interval: Duration::from_secs(1),
            gauge_interval: GAUGE_SAMPLE_EVERY,
            retention: Duration::from_secs(24 * 3600),
            quiet: false,
            callback_secret: None,
        }
    }
}

/// Something a worker did; subscribe with [`WorkerHandle::events`] (tests wait on these
/// instead of sleeping).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkerEvent {
    /// An attempt started.
    Started {
        /// Job id.
        id: Uuid,
        /// Attempt number.
        attempt: i32,
    },
    /// An attempt ended and its outcome was written (or refused, for a lost lease).
    Finished {
        /// Job id.
        id: Uuid,
        /// Attempt number.
        attempt: i32,
        /// `None` on success, else why it failed.
        failure: Option<FailureKind>,
        /// False when the write was refused because the lease had been taken back.
        recorded: bool,
    },
    /// A job of a kind this worker has no handler for was given back without counting an
    /// attempt, deliverable again after [`UNKNOWN_KIND_DEFER`] (for a worker that has one).
    Deferred {
        /// Job id.
        id: Uuid,
        /// Its kind.
        kind: String,
    },
    /// Maintenance took back expired leases.
    Rescued {
        /// Made available again.
        requeued: u64,
        /// Dead (out of attempts).
        dead: u64,
    },
}

/// How a handler's attempt ended when it did not fail.
pub(crate) enum Handled {
    /// Completed with this output (serialized JSON), for the completer to write.
    Output(Option<String>),
    /// The handler wrote the job's fate itself (a workflow run that suspended or ended);
    /// `recorded` is false when its write was refused because the lease was lost.
    Settled { recorded: bool },
}

/// A type-erased handler.
pub(crate) trait Erased: Send + Sync {
    fn options(&self) -> &JobOptions;
    /// True when the handler acts on cancel requests itself (a workflow run compensates):
    /// the worker then neither cancels its job before it starts nor after it fails.
    fn handles_cancel(&self) -> bool {
        false
    }
    fn call(
        &self,
        ctx: JobContext,
        payload: serde_json::Value,
    ) -> BoxFuture<'static, std::result::Result<Handled, JobError>>;
}

struct Typed<J: Job> {
    job: Arc<J>,
    options: JobOptions,
}

impl<J: Job> Erased for Typed<J> {
    fn options(&self) -> &JobOptions {
        &self.options
    }

    fn call(
        &self,
        ctx: JobContext,
        payload: serde_json::Value,
    ) -> BoxFuture<'static, std::result::Result<Handled, JobError>> {
        let job = self.job.clone();
        async move {
            let input: J::Input = serde_json::from_value(payload).map_err(|e| {
                JobError::Permanent(format!("input does not fit job {}: {e}", J::NAME))
            })?;
            let out = job.run(&ctx, input).await?;
            let out = serde_json::to_string(&out).map_err(|e| {
                JobError::Permanent(format!("output of job {} does not serialize: {e}", J::NAME))
            })?;
            // No output (`()`, `None`) is stored as no result: a completed job without one
            // reads back as JSON null (see `JobOutcome::output`), and the row stays narrower.
            Ok(Handled::Output((out != "null").then_some(out)))
        }
        .boxed()
    }
}

struct Ops<S: Store> {
    store: S,
    lease: Duration,
}

impl<S: Store> ContextOps for Ops<S> {
    fn progress<'a>(
        &'a self,
        queue: &'a QueueName,
        lease: LeaseRef,
        percent: u8,
        message: Option<&'a str>,
    ) -> BoxFuture<'a, Result<LeaseWrite>> {
        async move {
            let message = message.map(Error::storable);
            let w = self
                .store
                .job_progress(lease, percent, message.as_deref())
                .await?;
            crate::changes::record_progress(self.store.wake().changes(), queue, lease, &w, percent);
            Ok(w)
        }
        .boxed()
    }
    fn extend<'a>(
        &'a self,
        queue: &'a QueueName,
        lease: LeaseRef,
    ) -> BoxFuture<'a, Result<LeaseWrite>> {
        async move {
            self.store
                .message_extend_many(queue, &[lease], self.lease)
                .await
        }
        .boxed()
    }
    fn store_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        &self.store
    }
}

/// A job being run, as the heartbeat and shutdown see it.
struct Running {
    /// Shared by every job of the queue's fetcher (one allocation per queue, not per job).
    queue: Arc<QueueName>,
    attempt: i32,
    cancel: CancelToken,
    cancel_requested: bool,
}

struct Shared<S: Store> {
    store: S,
    queue: Queue<S>,
    config: WorkerConfig,
    handlers: HashMap<String, Arc<dyn Erased>>,
    running: Mutex<HashMap<Uuid, Running>>,
    events: broadcast::Sender<WorkerEvent>,
    ops: Arc<Ops<S>>,
    /// Kinds without a handler already logged (once each).
    unknown_kinds: Mutex<std::collections::HashSet<String>>,
    /// The workflow engine, when workflows are registered (maintenance prunes ended runs).
    workflows: Option<Arc<dyn EngineOps>>,
    /// The cron scheduler, when this worker schedules (maintenance prunes old ticks).
    scheduler: Option<Arc<dyn crate::cron::SchedulerOps>>,
    /// Prunes published outbox events and old inbox marks, when this worker relays.
    outbox_prune: Option<PruneFn>,
    /// Gauge samplers the maintenance leader runs besides the queues' (one per relayed outbox).
    samplers: Vec<SampleFn>,
}

impl<S: Store> Shared<S> {
    fn emit(&self, e: WorkerEvent) {
        let _ = self.events.send(e); // no subscribers is fine
    }
    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Builds and starts a worker.
pub struct Worker<S: Store> {
    store: S,
    config: WorkerConfig,
    handlers: HashMap<String, Arc<dyn Erased>>,
    queues: Vec<(QueueName, usize)>,
    workflows: Workflows,
    crons: Crons,
    /// Outbox relays this worker runs, and the outbox/inbox pruning it does as the
    /// maintenance leader.
    relays: Vec<StartRelay>,
    outbox_prune: Option<PruneFn>,
    /// Gauge samplers the maintenance leader runs besides the queues' (one per relayed outbox).
    samplers: Vec<SampleFn>,
    /// A registration that failed (a bad cron expression): `start` reports it.
    invalid: Option<Error>,
}

/// Prunes what grows with time (given the worker's retention); answers how many rows went.
type PruneFn = Arc<dyn Fn(Duration) -> BoxFuture<'static, Result<u64>> + Send + Sync>;

/// Samples a gauge source (an outbox's counts by state) into the metrics recorder.
type SampleFn = Arc<dyn Fn() -> BoxFuture<'static, Result<()>> + Send + Sync>;

/// Starts a relay that stops with the token.
type StartRelay = Box<dyn FnOnce(CancelToken) -> tokio::task::JoinHandle<()> + Send>;

/// The cron schedules a worker declares, and its scheduler.
#[derive(Default)]
struct Crons {
    declared: Vec<crate::cron::ScheduleSpec>,
    scheduler: Option<Arc<dyn crate::cron::SchedulerOps>>,
}

/// The workflows a worker registered: per name, every version, and the engine they share.
#[derive(Default)]
struct Workflows {
    versions: HashMap<&'static str, std::collections::BTreeMap<i32, Arc<dyn ErasedWorkflow>>>,
    engine: Option<Arc<dyn EngineOps>>,
}

impl<S: Store> std::fmt::Debug for Worker<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("config", &self.config)
            .field("jobs", &self.handlers.keys().collect::<Vec<_>>())
            .field("queues", &self.queues)
            .field(
                "workflows",
                &self.workflows.versions.keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl<S: Store> Worker<S> {
    /// A worker on `store` with default settings and no jobs yet.
    pub fn new(store: S) -> Self {
        Worker {
            store,
            config: WorkerConfig::default(),
            handlers: HashMap::new(),
            queues: Vec::new(),
            workflows: Workflows::default(),
            crons: Crons::default(),
            relays: Vec::new(),
            outbox_prune: None,
            samplers: Vec::new(),
            invalid: None,
        }
    }

    /// Registers a job handler.
    pub fn register<J: Job>(mut self, job: J) -> Self {
        self.handlers.insert(
            J::NAME.to_owned(),
            Arc::new(Typed {
                job: Arc::new(job),
                options: J::options(),
            }),
        );
        self
    }

    /// Runs `queue` with up to `concurrency` jobs at once. Without any `queue` call, the worker
    /// runs the queues of its registered jobs with [`DEFAULT_CONCURRENCY`] each.
    pub fn queue(mut self, queue: &str, concurrency: usize) -> Result<Self> {
        let name = QueueName::new(queue)?;
        if concurrency == 0 {
            return Err(Error::invalid("concurrency", "must be at least 1"));
        }
        self.queues.retain(|(q, _)| q != &name);
        self.queues.push((name, concurrency));
        Ok(self)
    }

    /// Changes settings.
    pub fn configure(mut self, f: impl FnOnce(&mut WorkerConfig)) -> Self {
        f(&mut self.config);
        self
    }

    /// Starts the worker's tasks on the current Tokio runtime.
    pub fn start(mut self) -> Result<WorkerHandle> {
        if let Some(e) = self.invalid.take() {
            return Err(e);
        }
        if self.handlers.is_empty() && self.crons.scheduler.is_none() && self.relays.is_empty() {
            return Err(Error::invalid(
                "worker",
                "no jobs registered: call Worker::register first",
            ));
        }
        if self.queues.is_empty() {
            let mut names: Vec<String> = self
                .handlers
                .values()
                .map(|h| h.options().queue.clone())
                .collect();
            names.sort();
            names.dedup();
            for n in names {
                self.queues.push((QueueName::new(n)?, DEFAULT_CONCURRENCY));
            }
        }
        let c = &self.config;
        check_span("lease", c.lease, Duration::from_millis(100))?;
        check_span("heartbeat", c.heartbeat, Duration::from_millis(1))?;
        if c.heartbeat >= c.lease {
            return Err(Error::invalid(
                "heartbeat",
                format!(
                    "{:?} must be shorter than the lease ({:?}), or a lease ends between two heartbeats",
                    c.heartbeat, c.lease
                ),
            ));
        }
        check_span("prefetch", c.prefetch, Duration::ZERO)?;
        check_span(
            "maintenance_interval",
            c.maintenance_interval,
            Duration::from_millis(1),
        )?;
        check_span("retention", c.retention, Duration::ZERO)?;
        check_span("gauge_interval", c.gauge_interval, Duration::from_millis(1))?;
        if self.config.fetch_batch == 0 {
            return Err(Error::invalid("fetch_batch", "must be at least 1"));
        }
        let queue = Queue::with_config(
            self.store.clone(),
            QueueConfig {
                default_lease: self.config.lease,
                // The maintenance leader sweeps expired leases; fetchers need not.
                rescue_interval: Duration::MAX,
                receiver_id: Some(self.config.id.clone()),
                ..QueueConfig::default()
            },
        );
        let (events, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared {
            ops: Arc::new(Ops {
                store: self.store.clone(),
                lease: self.config.lease,
            }),
            store: self.store,
            queue,
            config: self.config,
            handlers: self.handlers,
            running: Mutex::new(HashMap::new()),
            unknown_kinds: Mutex::new(Default::default()),
            workflows: self.workflows.engine,
            scheduler: self.crons.scheduler.clone(),
            outbox_prune: self.outbox_prune.clone(),
            samplers: self.samplers.clone(),
            events,
        });
        let (shared_for_run, queues, stop_for_run) = (
            shared.clone(),
            std::mem::take(&mut self.queues),
            CancelToken::new(),
        );
        let stop = stop_for_run.clone();
        let declared = std::mem::take(&mut self.crons.declared);
        let relays: Vec<_> = self.relays.drain(..).map(|r| r(stop.clone())).collect();
        let task = tokio::spawn(async move {
            run(shared_for_run, queues, declared, stop_for_run).await;
            for r in relays {
                let _ = r.await;
            }
        });
        let held = shared.clone();
        Ok(WorkerHandle {
            id: shared.config.id.clone(),
            stop,
            task,
            events: shared.events.clone(),
            running: Arc::new(move || held.running().len()),
        })
    }
}

impl<S: crate::workflow::WorkflowStore> Worker<S> {
    /// Registers a workflow (one version of it: register each version whose runs may still
    /// be going). Its runs are driven by jobs of kind `workflow:<name>` on its queue.
    pub fn register_workflow<W: Workflow>(mut self, workflow: W) -> Self {
        let engine = self
            .workflows
            .engine
            .get_or_insert_with(|| Arc::new(WorkflowEngine::new(self.store.clone())))
            .clone();
        let versions = self.workflows.versions.entry(W::NAME).or_default();
        versions.insert(
            W::VERSION,
            Arc::new(TypedWorkflow(Arc::new(workflow))) as Arc<dyn ErasedWorkflow>,
        );
        // The newest version's options serve the name's jobs (queue, retries).
        let newest = *versions.keys().next_back().unwrap_or(&W::VERSION);
        let o = if newest == W::VERSION {
            W::options()
        } else {
            match self.handlers.get(&crate::workflow::job_kind(W::NAME)) {
                Some(h) => {
                    let o = h.options();
                    crate::workflow::WorkflowOptions {
                        queue: o.queue.clone(),
                        priority: o.priority,
                        timeout: None,
                        retry: o.retry,
                    }
                }
                None => W::options(),
            }
        };
        let handler = WorkflowHandler {
            name: W::NAME,
            versions: versions.clone(),
            options: JobOptions {
                queue: o.queue,
                priority: o.priority,
                timeout: None,
                retry: o.retry,
                unique: false,
            },
            engine,
        };
        self.handlers
            .insert(crate::workflow::job_kind(W::NAME), Arc::new(handler));
        self
    }
}

/// How long inbox marks are kept by default: a message redelivered later than this is
/// processed again.
pub const DEFAULT_INBOX_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

impl<S: crate::outbox::OutboxStore> Worker<S> {
    /// Runs an outbox relay in this worker (it stops with the worker). The maintenance leader
    /// also prunes published events after the worker's `retention`, and inbox marks after
    /// `inbox_retention` (default 7 days).
    pub fn relay_outbox(mut self, relay: crate::outbox::Relay<S>) -> Self {
        let store = self.store.clone();
        let outbox = relay.outbox.clone();
        self.samplers.push(Arc::new(move || {
            let (store, outbox) = (store.clone(), outbox.clone());
            async move {
                let stats = store.outbox_stats(&outbox).await?;
                for (state, n) in [("pending", stats.pending), ("failed", stats.failed)] {
                    metrics::gauge!(crate::metrics::OUTBOX_EVENTS, "outbox" => outbox.clone(), "state" => state)
                        .set(n as f64);
                }
                Ok(())
            }
            .boxed()
        }));
        self.relays.push(Box::new(move |stop: CancelToken| {
            tokio::spawn(async move { relay.run(stop).await })
        }));
        self.prune_outbox(DEFAULT_INBOX_RETENTION)
    }

    /// Has the maintenance leader prune published outbox events (after `retention`) and inbox
    /// marks older than `inbox_retention`.
    pub fn prune_outbox(mut self, inbox_retention: Duration) -> Self {
        let store = self.store.clone();
        self.outbox_prune = Some(Arc::new(move |retention: Duration| {
            let store = store.clone();
            async move {
                let events = store.outbox_prune(retention).await?;
                let marks = store.inbox_prune(inbox_retention).await?;
                Ok(events + marks)
            }
            .boxed()
        }));
        self
    }
}

impl<S: crate::cron::CronStore> Worker<S> {
    /// Registers a `#[dray::cron]` handler: its schedule is stored (created or updated) when
    /// the worker starts, and this worker schedules ticks (see [`Worker::schedule_crons`]) and
    /// runs them. A bad expression or zone makes [`Worker::start`] fail, naming it.
    pub fn register_cron<C: crate::cron::Cron>(mut self, cron: C) -> Self {
        match crate::cron::spec_of::<C>() {
            Ok(spec) => {
                let options = C::options().job;
                self.handlers.insert(
                    crate::cron::job_kind(C::NAME),
                    Arc::new(crate::cron::TypedCron {
                        cron: Arc::new(cron),
                        options,
                    }),
                );
                self.crons.declared.retain(|d| d.name != spec.name);
                self.crons.declared.push(spec);
            }
            Err(e) => {
                self.invalid.get_or_insert(e);
            }
        }
        self.schedule_crons()
    }

    /// Runs the cron scheduler in this worker: every schedule in the database (declared in
    /// code or made at run time) fires its ticks, each exactly once however many workers
    /// schedule. Workers that register a cron do this already.
    pub fn schedule_crons(mut self) -> Self {
        if self.crons.scheduler.is_none() {
            self.crons.scheduler = Some(Arc::new(crate::cron::Scheduler {
                store: self.store.clone(),
            }));
        }
        self
    }
}

/// A running worker.
pub struct WorkerHandle {
    id: String,
    stop: CancelToken,
    task: tokio::task::JoinHandle<()>,
    events: broadcast::Sender<WorkerEvent>,
    running: Arc<dyn Fn() -> usize + Send + Sync>,
}

impl std::fmt::Debug for WorkerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerHandle")
            .field("id", &self.id)
            .field("running", &self.running())
            .finish_non_exhaustive()
    }
}

impl WorkerHandle {
    /// The worker's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// How many jobs this worker holds now: running, or claimed and about to start. A
    /// workflow run that sleeps or waits is not among them.
    pub fn running(&self) -> usize {
        (self.running)()
    }

    /// A stream of what the worker does, from now on.
    pub fn events(&self) -> broadcast::Receiver<WorkerEvent> {
        self.events.subscribe()
    }

    /// Shuts down gracefully (see the module docs) and waits until it has.
    pub async fn shutdown(self) -> Result<()> {
        self.stop.cancel();
        self.task
            .await
            .map_err(|e| Error::invalid("worker", format!("worker task failed: {e}")))
    }

    /// Completes when the worker has stopped (after [`WorkerHandle::shutdown`] or on its own).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

async fn run<S: Store>(
    shared: Arc<Shared<S>>,
    queues: Vec<(QueueName, usize)>,
    declared: Vec<crate::cron::ScheduleSpec>,
    stop: CancelToken,
) {
    let (done_tx, done_rx) = mpsc::unbounded_channel::<Done>();
    let completer = tokio::spawn(completer(shared.clone(), done_rx));
    let beat_stop = CancelToken::new();
    let heartbeat = tokio::spawn(heartbeat(shared.clone(), beat_stop.clone()));
    let maintenance = shared
        .config
        .maintenance
        .then(|| tokio::spawn(maintenance(shared.clone(), stop.clone())));
    let callbacks = shared
        .config
        .callback_secret
        .clone()
        .map(|secret| tokio::spawn(callbacks(shared.clone(), secret, stop.clone())));
    let scheduler = shared.scheduler.clone().map(|sc| {
        let stop = stop.clone();
        tokio::spawn(async move { sc.run(declared, stop).await })
    });
    let mut fetchers = JoinSet::new();
    for (queue, concurrency) in queues {
        fetchers.spawn(fetch_loop(
            shared.clone(),
            Arc::new(queue),
            concurrency,
            stop.clone(),
            done_tx.clone(),
        ));
    }
    drop(done_tx);
    while fetchers.join_next().await.is_some() {}
    // Every attempt has handed in its outcome: the completer drains and ends.
    let _ = completer.await;
    beat_stop.cancel();
    let _ = heartbeat.await;
    if let Some(m) = maintenance {
        let _ = m.await;
    }
    if let Some(c) = callbacks {
        let _ = c.await;
    }
    if let Some(s) = scheduler {
        let _ = s.await;
    }
    if shared.config.maintenance
        && let Err(err) = shared
            .store
            .leader_release(MAINTENANCE, &shared.config.id)
            .await
    {
        tracing::warn!(%err, "dray: could not release maintenance leadership (it expires by itself)");
    }
}

/// A job claimed ahead of a free slot, waiting in the fetcher's buffer.
struct Buffered {
    message: Message,
    claimed: Instant,
}

/// Jobs finished per second on one queue (slots freed), over the last few tenths of a second
/// (an exponentially weighted mean of 50 ms windows). Once the slots are full, jobs start as
/// fast as they finish, so this sizes how far ahead the fetcher claims; a burst of starts into
/// empty slots does not count, and jobs that run long make it fall to zero.
struct FinishRate {
    window_start: Instant,
    count: u64,
    per_sec: f64,
}

impl FinishRate {
    const WINDOW: Duration = Duration::from_millis(50);

    fn new() -> Self {
        FinishRate {
            window_start: Instant::now(),
            count: 0,
            per_sec: 0.0,
        }
    }

    fn finished(&mut self, n: usize) {
        self.count += n as u64;
    }

    fn per_sec(&mut self) -> f64 {
        let elapsed = self.window_start.elapsed();
        if elapsed >= Self::WINDOW {
            let now_rate = self.count as f64 / elapsed.as_secs_f64();
            // A long quiet spell counts as one window: the mean falls at once, not in steps.
            self.per_sec = if elapsed >= Self::WINDOW * 8 {
                now_rate
            } else {
                0.5 * self.per_sec + 0.5 * now_rate
            };
            self.window_start = Instant::now();
            self.count = 0;
        }
        self.per_sec
    }
}

type Claim = BoxFuture<'static, Result<Vec<Message>>>;

/// One queue's fetcher: claims jobs, keeps a small buffer of jobs claimed ahead, and starts
/// them as slots free up.
///
/// How much it claims: every free slot, plus as many jobs as the queue has been finishing in
/// [`WorkerConfig::prefetch`] (so a busy queue of short jobs claims in large batches, while a
/// queue of slow jobs claims only for its free slots and leaves the rest to other workers),
/// never more than [`WorkerConfig::fetch_batch`] in one statement (and never more than ten such
/// batches held ahead: capped at one batch, a busy queue refilling at half its buffer claimed
/// ~280 jobs at a time instead of 500). The next claim is already in flight while the buffer
/// drains. Claimed jobs count as running for the heartbeat, which
/// keeps their leases; one that waits in the buffer longer than ten times the prefetch horizon
/// (at least a second) is given back, as is the whole buffer at shutdown, without counting an
/// attempt ([`crate::NackAction::Release`]).
async fn fetch_loop<S: Store>(
    shared: Arc<Shared<S>>,
    queue: Arc<QueueName>,
    concurrency: usize,
    stop: CancelToken,
    done: mpsc::UnboundedSender<Done>,
) {
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    let mut buffer: VecDeque<Buffered> = VecDeque::new();
    let mut rate = FinishRate::new();
    let mut claim: Option<Claim> = None;
    // Whether the claim in flight may wait for jobs (it claims for a free slot), and until when
    // a claim for jobs ahead only is not worth making (the last one found the queue empty).
    let mut claim_waits = false;
    let mut ahead_idle_until: Option<Instant> = None;
    let mut retry_at: Option<Instant> = None;
    let mut cooldown_until: Option<Instant> = None;
    let mut backoff = Duration::from_millis(100);
    let prefetch = shared.config.prefetch;
    let batch = shared.config.fetch_batch as usize;
    let max_hold = (prefetch * 10).max(Duration::from_secs(1));
    loop {
        let mut finished = 0;
        while tasks.try_join_next().is_some() {
            finished += 1;
        }
        rate.finished(finished);
        // Start what the buffer holds, as far as slots allow.
        while !buffer.is_empty() {
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                break;
            };
            if let Some(b) = buffer.pop_front() {
                tasks.spawn(run_one(
                    shared.clone(),
                    queue.clone(),
                    b.message,
                    done.clone(),
                    permit,
                ));
            }
        }
        // Give back what has waited too long (its slots are taken by slow jobs).
        let now = Instant::now();
        let stale = buffer
            .iter()
            .take_while(|b| now - b.claimed >= max_hold)
            .count();
        if stale > 0 {
            let stale: Vec<Message> = buffer.drain(..stale).map(|b| b.message).collect();
            release_claimed(&shared, &queue, &stale).await;
        }
        // Claim more?
        let mut wake_at = buffer.front().map(|b| b.claimed + max_hold);
        // A slot coming free ends a pause in claiming ahead: that claim is for the slot.
        let mut slot_ends_pause = false;
        if claim.is_none() && !stop.is_cancelled() {
            let free = slots.available_permits();
            let ahead =
                ((rate.per_sec() * prefetch.as_secs_f64()) as usize).min(MAX_AHEAD_BATCHES * batch);
            let room = (free + ahead).saturating_sub(buffer.len()).min(batch);
            let running = concurrency - free;
            // Refill once the buffer is down to half of what it should hold. Without a
            // prefetch (slow jobs), a claim for only a few slots while others run waits briefly
            // for more to free up, so that claims still come in batches.
            let low = buffer.len() <= ahead / 2;
            let small = ahead == 0 && running > 0 && room < (batch.min(concurrency) / 4).max(1);
            // A claim for jobs ahead only (no slot free) never waits on an empty queue: waiting,
            // it would take back, the moment they are given back, the jobs that this fetcher
            // releases for other workers (stale buffered ones, below).
            let waits = free > 0;
            let ahead_idle = !waits && ahead_idle_until.is_some_and(|t| now < t);
            if room > 0 && low && ahead_idle {
                if let Some(t) = ahead_idle_until {
                    wake_at = Some(wake_at.map_or(t, |w| w.min(t)));
                }
                slot_ends_pause = true;
            } else if room > 0 && low && retry_at.is_none_or(|t| now >= t) {
                if small && cooldown_until.is_none_or(|t| now < t) {
                    let until = *cooldown_until.get_or_insert(now + FETCH_COOLDOWN);
                    wake_at = Some(wake_at.map_or(until, |w| w.min(until)));
                } else {
                    cooldown_until = None;
                    retry_at = None;
                    claim_waits = waits;
                    claim = Some(start_claim(&shared, &queue, room, waits, &stop));
                }
            } else if let Some(t) = retry_at {
                wake_at = Some(wake_at.map_or(t, |w| w.min(t)));
            }
        }
        // Wait for a slot only when one is needed: for a buffered job, or for a claim that
        // found no free slot. (Not from a fresh count of free slots: one may have come free
        // since the decision above, and then this wait returns at once and the loop claims.)
        let want_slot =
            !buffer.is_empty() || (claim.is_none() && (wake_at.is_none() || slot_ends_pause));
        let sleep = async {
            match wake_at {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            got = async {
                match claim.as_mut() {
                    Some(c) => c.await,
                    None => std::future::pending().await,
                }
            }, if claim.is_some() => {
                claim = None;
                match got {
                    Ok(got) => {
                        backoff = Duration::from_millis(100);
                        ahead_idle_until = (got.is_empty() && !claim_waits)
                            .then(|| Instant::now() + prefetch.max(FETCH_COOLDOWN));
                        hold(&shared, &queue, &got);
                        let claimed = Instant::now();
                        buffer.extend(got.into_iter().map(|message| Buffered { message, claimed }));
                    }
                    Err(err) => {
                        tracing::warn!(%err, queue = %queue, "dray: cannot claim jobs; retrying");
                        retry_at = Some(Instant::now() + backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            // A slot came free: loop to start a buffered job or claim.
            p = slots.clone().acquire_owned(), if want_slot => drop(p),
            _ = sleep => {}
            _ = stop.cancelled(), if claim.is_none() => break,
        }
    }
    // Shutting down: no more claims; what was claimed but not started goes back at once.
    let left: Vec<Message> = buffer.drain(..).map(|b| b.message).collect();
    release_claimed(&shared, &queue, &left).await;
    // Let running attempts finish, up to the grace period.
    let grace = tokio::time::sleep(shared.config.shutdown_grace);
    tokio::pin!(grace);
    loop {
        tokio::select! {
            next = tasks.join_next() => if next.is_none() { break },
            _ = &mut grace => {
                release_running(&shared, &queue).await;
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                break;
            }
        }
    }
}

/// Starts a claim of up to `limit` jobs as a future of its own, so that buffered jobs keep
/// starting while it runs. One made for a free slot (`waits`) long-polls while the queue is
/// empty, which holds up nothing else; one made for jobs ahead only returns at once.
fn start_claim<S: Store>(
    shared: &Arc<Shared<S>>,
    queue: &QueueName,
    limit: usize,
    waits: bool,
    stop: &CancelToken,
) -> Claim {
    let (shared, queue, stop) = (shared.clone(), queue.clone(), stop.clone());
    async move {
        let options = ReceiveOptions {
            limit: limit as u32,
            wait: if waits {
                Duration::from_secs(30)
            } else {
                Duration::ZERO
            },
            lease: Some(shared.config.lease),
        };
        shared
            .queue
            .receive_until(queue.as_str(), &options, stop.cancelled())
            .await
    }
    .boxed()
}

/// Registers claimed jobs as running, so the heartbeat keeps their leases (and passes on cancel
/// requests and lost leases) while they wait in the buffer.
fn hold<S: Store>(shared: &Shared<S>, queue: &Arc<QueueName>, got: &[Message]) {
    let mut running = shared.running();
    for m in got {
        let cancel = CancelToken::new();
        if m.cancel_requested {
            cancel.cancel();
        }
        running.insert(
            m.id,
            Running {
                queue: queue.clone(),
                attempt: m.attempt,
                cancel,
                cancel_requested: m.cancel_requested,
            },
        );
    }
}

/// Gives back jobs that were claimed but never started, without counting an attempt.
async fn release_claimed<S: Store>(shared: &Shared<S>, queue: &QueueName, messages: &[Message]) {
    if messages.is_empty() {
        return;
    }
    {
        let mut running = shared.running();
        for m in messages {
            running.remove(&m.id);
        }
    }
    let leases: Vec<LeaseRef> = messages.iter().map(Message::lease).collect();
    give_back(shared, queue, &leases, crate::NackAction::Release).await;
}

/// After the grace period: stop this queue's handlers and give their jobs back at once.
async fn release_running<S: Store>(shared: &Shared<S>, queue: &QueueName) {
    let leases: Vec<LeaseRef> = {
        let mut running = shared.running();
        let mut leases = Vec::new();
        for (id, r) in running.iter_mut() {
            if *r.queue == *queue {
                leases.push(LeaseRef {
                    id: *id,
                    attempt: Some(r.attempt),
                });
            }
        }
        running.retain(|_, r| *r.queue != *queue);
        leases
    };
    if leases.is_empty() {
        return;
    }
    tracing::warn!(n = leases.len(), queue = %queue, "dray: shutdown grace over; releasing running jobs");
    let action = crate::NackAction::Requeue {
        delay: Duration::ZERO,
    };
    give_back(shared, queue, &leases, action).await;
}

/// Gives leases back as `action` says (a failure leaves them to expire by themselves) and
/// records the change.
async fn give_back<S: Store>(
    shared: &Shared<S>,
    queue: &QueueName,
    leases: &[LeaseRef],
    action: crate::NackAction,
) {
    if let Err(err) = crate::queue::give_back(&shared.store, queue, leases, action).await {
        tracing::warn!(%err, n = leases.len(), "dray: could not give back jobs; their leases expire by themselves");
    }
}

pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

/// Runs one claimed job of `queue` (the fetcher's queue, which claimed it) in its own task.
///
/// This future is moved into a task for every job, so what it holds is kept small: the
/// failure paths, which need a store write each, are boxed and cost nothing until taken.
async fn run_one<S: Store>(
    shared: Arc<Shared<S>>,
    queue: Arc<QueueName>,
    mut m: Message,
    done: mpsc::UnboundedSender<Done>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let lease = m.lease();
    let kind = m.kind.take().unwrap_or_default();
    let Some(handler) = shared.handlers.get(&kind).cloned() else {
        shared.running().remove(&m.id);
        Box::pin(defer_unknown(&shared, &queue, &m, kind)).await;
        drop(permit);
        return;
    };
    let options = handler.options();
    let jm = crate::metrics::job(&m.queue, &kind);
    // The entry `hold` made at claim time: the heartbeat may have seen a cancel request or a
    // lost lease while the job waited in the buffer.
    let (cancel, cancel_requested) = match shared.running().get(&m.id) {
        Some(r) => (r.cancel.clone(), r.cancel_requested),
        None => return, // given back meanwhile
    };
    if cancel.is_cancelled() && !cancel_requested {
        shared.running().remove(&m.id);
        tracing::warn!(id = %m.id, "dray: lease lost before the job started; not running it");
        return;
    }
    if cancel_requested && !handler.handles_cancel() {
        shared.running().remove(&m.id);
        Box::pin(fail(
            &shared,
            &m,
            &jm,
            FailureKind::Cancelled,
            "cancelled before it started",
            FailTo::Cancelled,
        ))
        .await;
        return;
    }
    let span = tracing::info_span!(target: "dray::jobs", "dray.job", id = %m.id, kind = %kind, attempt = m.attempt, queue = %m.queue);
    crate::trace::set_parent(
        &span,
        m.headers.get(crate::trace::TRACEPARENT).map(String::as_str),
        m.headers.get(crate::trace::TRACESTATE).map(String::as_str),
    );
    // The database clock minus this machine's, as of the claim (which set the lease from the
    // database's now()): workflows keep their times on the database clock with it. Never
    // ahead of the database, since the claim's answer took time to arrive.
    let db_offset = m
        .leased_until
        .and_then(|until| {
            let lease = chrono::TimeDelta::from_std(shared.config.lease).ok()?;
            Some(until - lease - chrono::Utc::now())
        })
        .unwrap_or_default();
    let ctx = JobContext {
        inner: Arc::new(ContextInner {
            id: m.id,
            kind,
            queue,
            attempt: m.attempt,
            max_attempts: m.max_attempts,
            cancel: cancel.clone(),
            ops: shared.ops.clone(),
            span: span.clone(),
            db_offset,
        }),
    };
    shared.emit(WorkerEvent::Started {
        id: m.id,
        attempt: m.attempt,
    });
    let started = Instant::now();
    jm.started.increment(1);
    jm.in_flight.increment(1.0);
    // Due since the later of its enqueue and its due time (a delay or a retry), on the
    // database clock.
    jm.pickup.record(crate::metrics::seconds(
        chrono::Utc::now() + db_offset - m.enqueued_at.max(m.run_at),
    ));
    let log_span = span.clone();
    // The handler runs inside this task (no task of its own per job): a panic is caught here,
    // a timeout drops it, and shutdown aborts this task after its grace period.
    let payload = std::mem::take(&mut m.payload);
    let run =
        std::panic::AssertUnwindSafe(handler.call(ctx, payload).instrument(span)).catch_unwind();
    let outcome = match options.timeout {
        Some(t) => tokio::time::timeout(t, run).await.ok(),
        None => Some(run.await),
    };
    jm.in_flight.decrement(1.0);
    jm.duration.record(started.elapsed().as_secs_f64());
    let cancel_requested = shared
        .running()
        .remove(&m.id)
        .map(|r| r.cancel_requested)
        .unwrap_or(false);
    let cancel_requested = cancel_requested && !handler.handles_cancel();
    let retry = |kind: FailureKind| {
        if cancel_requested {
            FailTo::Cancelled
        } else if kind == FailureKind::Permanent {
            FailTo::Dead
        } else {
            FailTo::Retry(options.retry.delay(m.attempt, m.id.as_u128() as u64))
        }
    };
    match outcome {
        Some(Ok(Ok(Handled::Output(result)))) => {
            if !shared.config.quiet {
                log_span.in_scope(|| {
                    tracing::info!(
                        target: "dray::jobs",
                        id = %m.id, queue = %m.queue, attempt = m.attempt,
                        duration_ms = started.elapsed().as_millis() as u64,
                        outcome = "completed",
                        "dray: job completed"
                    )
                });
            }
            // Handed to the completer; the slot is free as soon as it is queued there.
            let _ = done.send((Completion { lease, result }, jm));
            drop(permit);
        }
        Some(Ok(Ok(Handled::Settled { recorded }))) => {
            drop(permit);
            shared.emit(WorkerEvent::Finished {
                id: m.id,
                attempt: m.attempt,
                failure: None,
                recorded,
            });
        }
        Some(Ok(Err(JobError::Transient(msg)))) => {
            Box::pin(
                fail(
                    &shared,
                    &m,
                    &jm,
                    FailureKind::Error,
                    &msg,
                    retry(FailureKind::Error),
                )
                .instrument(log_span.clone()),
            )
            .await
        }
        Some(Ok(Err(JobError::Permanent(msg)))) => {
            Box::pin(
                fail(
                    &shared,
                    &m,
                    &jm,
                    FailureKind::Permanent,
                    &msg,
                    retry(FailureKind::Permanent),
                )
                .instrument(log_span.clone()),
            )
            .await
        }
        Some(Ok(Err(JobError::Cancelled))) => {
            Box::pin(
                fail(
                    &shared,
                    &m,
                    &jm,
                    FailureKind::Cancelled,
                    "the handler stopped on a cancel request",
                    FailTo::Cancelled,
                )
                .instrument(log_span.clone()),
            )
            .await
        }
        Some(Err(panic)) => {
            let msg = format!("handler panicked: {}", panic_message(&*panic));
            Box::pin(
                fail(
                    &shared,
                    &m,
                    &jm,
                    FailureKind::Panic,
                    &msg,
                    retry(FailureKind::Panic),
                )
                .instrument(log_span.clone()),
            )
            .await
        }
        None => {
            let msg = format!(
                "timed out after {}",
                crate::format_duration(options.timeout.unwrap_or_default())
            );
            Box::pin(
                fail(
                    &shared,
                    &m,
                    &jm,
                    FailureKind::Timeout,
                    &msg,
                    retry(FailureKind::Timeout),
                )
                .instrument(log_span.clone()),
            )
            .await
        }
    }
}

async fn fail<S: Store>(
    shared: &Shared<S>,
    m: &Message,
    jm: &crate::metrics::JobMetrics,
    kind: FailureKind,
    msg: &str,
    to: FailTo,
) {
    jm.failed(kind).increment(1);
    let next = match to {
        FailTo::Retry(_) if m.attempt >= m.max_attempts => "dead",
        FailTo::Retry(_) => "retry",
        FailTo::Dead => "dead",
        FailTo::Cancelled => "cancelled",
    };
    tracing::warn!(
        target: "dray::jobs",
        id = %m.id, queue = %m.queue, attempt = m.attempt, failure = kind.as_str(),
        outcome = next, error = %msg,
        "dray: job attempt failed"
    );
    let recorded = match shared
        .store
        .job_fail(m.lease(), kind, &Error::storable(msg), to)
        .await
    {
        Ok(w) => {
            shared
                .store
                .wake()
                .changes()
                .record_write(&m.queue, &[m.lease()], &w, to.next_state());
            w.applied.contains(&m.id)
        }
        Err(err) => {
            tracing::warn!(%err, id = %m.id, "dray: could not record a failed attempt; its lease will expire and it runs again");
            false
        }
    };
    if recorded {
        match next {
            "retry" => jm.retried.increment(1),
            "dead" => jm.dead.increment(1),
            _ => jm.cancelled.increment(1),
        }
    }
    if !recorded {
        tracing::warn!(id = %m.id, attempt = m.attempt, "dray: lease lost before the failure was recorded; the newer attempt is authoritative");
    } else if matches!(to, FailTo::Retry(_)) {
        // Our own fetcher may be mid-wait: let it re-read when the retry is due.
        shared.store.wake().wake(&m.queue);
    }
    shared.emit(WorkerEvent::Finished {
        id: m.id,
        attempt: m.attempt,
        failure: Some(kind),
        recorded,
    });
}

/// Gives back a job of a kind this worker has no handler for, without counting the attempt, so
/// that a worker that has one (on the same queue) takes it; logs each such kind once.
async fn defer_unknown<S: Store>(shared: &Shared<S>, queue: &QueueName, m: &Message, kind: String) {
    let first = shared
        .unknown_kinds
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(kind.clone());
    if first {
        let known: Vec<&str> = shared.handlers.keys().map(String::as_str).collect();
        tracing::warn!(
            worker = %shared.config.id,
            queue = %m.queue,
            kind = %kind,
            "dray: no handler for job kind {kind:?} (this worker runs {known:?}); its jobs are given back without using an attempt, for a worker that has one; register it here, or run such a worker"
        );
    }
    let action = crate::NackAction::Defer {
        delay: UNKNOWN_KIND_DEFER,
    };
    give_back(shared, queue, &[m.lease()], action).await;
    shared.emit(WorkerEvent::Deferred { id: m.id, kind });
}

/// A finished attempt on its way to the completer, with the counters its recording moves.
type Done = (Completion, Arc<crate::metrics::JobMetrics>);

/// Writes finished attempts in batches: everything that finished while the previous write
/// was in flight goes in the next one statement.
async fn completer<S: Store>(shared: Arc<Shared<S>>, mut rx: mpsc::UnboundedReceiver<Done>) {
    const MAX_BATCH: usize = 2000;
    let mut completions: Vec<Completion> = Vec::new();
    let mut counters: Vec<Arc<crate::metrics::JobMetrics>> = Vec::new();
    while let Some((first, jm)) = rx.recv().await {
        completions.push(first);
        counters.push(jm);
        while completions.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok((c, jm)) => {
                    completions.push(c);
                    counters.push(jm);
                }
                Err(_) => break,
            }
        }
        let mut backoff = Duration::from_millis(50);
        let applied = loop {
            match shared.store.job_complete_many(&completions).await {
                // Every id applied (the ids of a batch are distinct): no set to build.
                Ok(w) if w.applied.len() == completions.len() => break Some(None),
                Ok(w) => break Some(Some(w.applied.into_iter().collect::<HashSet<Uuid>>())),
                Err(err) if backoff < Duration::from_secs(10) => {
                    tracing::warn!(%err, n = completions.len(), "dray: cannot record completions; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(err) => {
                    tracing::error!(%err, n = completions.len(), "dray: giving up recording completions; their leases will expire and the jobs run again");
                    break None;
                }
            }
        };
        let recorded = |c: &Completion| match &applied {
            Some(None) => true,
            Some(Some(a)) => a.contains(&c.lease.id),
            None => false,
        };
        shared.store.wake().changes().record_with(|| {
            completions
                .iter()
                .zip(&counters)
                .filter(|(c, _)| recorded(c))
                .map(|(c, jm)| {
                    JobChange::new(
                        c.lease.id,
                        jm.queue(),
                        MessageState::Completed,
                        c.lease.attempt,
                    )
                })
                .collect::<Vec<_>>()
        });
        for (c, jm) in completions.drain(..).zip(counters.drain(..)) {
            let recorded = recorded(&c);
            if recorded {
                jm.completed.increment(1);
            } else {
                tracing::warn!(id = %c.lease.id, "dray: completion refused: the lease was taken back meanwhile");
            }
            shared.emit(WorkerEvent::Finished {
                id: c.lease.id,
                // A worker's completion always names its attempt (`Message::lease`).
                attempt: c.lease.attempt.unwrap_or_default(),
                failure: None,
                recorded,
            });
        }
    }
}

/// Extends the leases of running jobs, one statement per queue, and passes on cancel
/// requests and lost leases to their handlers.
async fn heartbeat<S: Store>(shared: Arc<Shared<S>>, stop: CancelToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(shared.config.heartbeat) => {}
            _ = stop.cancelled() => return,
        }
        beat(&shared).await;
    }
}

async fn beat<S: Store>(shared: &Shared<S>) {
    let mut by_queue: HashMap<Arc<QueueName>, Vec<LeaseRef>> = HashMap::new();
    for (id, r) in shared.running().iter() {
        by_queue.entry(r.queue.clone()).or_default().push(LeaseRef {
            id: *id,
            attempt: Some(r.attempt),
        });
    }
    for (queue, leases) in by_queue {
        match shared
            .store
            .message_extend_many(&queue, &leases, shared.config.lease)
            .await
        {
            Ok(w) => {
                let applied: HashSet<Uuid> = w.applied.into_iter().collect();
                let cancel_requested: HashSet<Uuid> = w.cancel_requested.into_iter().collect();
                let mut running = shared.running();
                for l in &leases {
                    let Some(r) = running.get_mut(&l.id) else {
                        continue;
                    };
                    if !applied.contains(&l.id) {
                        tracing::warn!(id = %l.id, "dray: lease lost while running; telling the handler to stop");
                        r.cancel.cancel();
                    } else if cancel_requested.contains(&l.id) {
                        r.cancel_requested = true;
                        r.cancel.cancel();
                    }
                }
            }
            Err(err) => tracing::warn!(%err, "dray: heartbeat failed; retrying at the next beat"),
        }
    }
}

const MAINTENANCE: &str = "maintenance";

/// On the leader only: rescue expired leases and prune old finished jobs.
async fn maintenance<S: Store>(shared: Arc<Shared<S>>, stop: CancelToken) {
    let every = shared.config.maintenance_interval;
    let mut gauges = crate::metrics::QueueGauges::new();
    let mut sampled: Option<Instant> = None;
    let mut compacted: Option<Instant> = None;
    let mut compacting: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let leader = match shared
            .store
            .leader_acquire(MAINTENANCE, &shared.config.id, every * 5)
            .await
        {
            Ok(l) => l,
            Err(err) => {
                tracing::warn!(%err, "dray: maintenance leadership check failed");
                false
            }
        };
        if leader && sampled.is_none_or(|at| at.elapsed() >= shared.config.gauge_interval) {
            sampled = Some(Instant::now());
            match shared.store.queue_gauges().await {
                Ok(now) => gauges.record(&now),
                Err(err) => tracing::warn!(%err, "dray: sampling the queue gauges failed"),
            }
            for sample in &shared.samplers {
                if let Err(err) = sample().await {
                    tracing::warn!(%err, "dray: sampling the outbox gauges failed");
                }
            }
        }
        if leader
            && compacted.is_none_or(|at| at.elapsed() >= COMPACT_EVERY)
            && compacting.as_ref().is_none_or(|t| t.is_finished())
        {
            // On a task of its own: a rebuild may wait for locks, and the sweep must not.
            compacted = Some(Instant::now());
            let store = shared.store.clone();
            compacting = Some(tokio::spawn(async move {
                match store.job_table_compact().await {
                    Ok(rebuilt) => {
                        for r in rebuilt {
                            tracing::info!(
                                index = %r.name, bytes_before = r.bytes_before, bytes_after = r.bytes_after,
                                "dray: rebuilt an index of the unfinished jobs to give back the space a burst left in it"
                            );
                        }
                    }
                    Err(err) => {
                        tracing::warn!(%err, "dray: rebuilding a bloated index failed; trying again later")
                    }
                }
            }));
        }
        if leader {
            match shared.store.message_rescue_expired(None).await {
                Ok(r) if r.requeued + r.dead > 0 => shared.emit(WorkerEvent::Rescued {
                    requeued: r.requeued,
                    dead: r.dead,
                }),
                Ok(_) => {}
                Err(err) => tracing::warn!(%err, "dray: rescuing expired leases failed"),
            }
            // Batches of PRUNE_BATCH, until one comes back short or PRUNE_ROUNDS have run: a
            // single batch per round could not keep up with more than PRUNE_BATCH jobs
            // finishing per maintenance interval, where a store prunes row by row.
            for _ in 0..PRUNE_ROUNDS {
                match shared
                    .store
                    .job_prune(shared.config.retention, PRUNE_BATCH)
                    .await
                {
                    Ok(n) if n >= u64::from(PRUNE_BATCH) => {}
                    Ok(_) => break,
                    Err(err) => {
                        tracing::warn!(%err, "dray: pruning finished jobs failed");
                        break;
                    }
                }
            }
            if let Some(sc) = &shared.scheduler
                && let Err(err) = sc.prune(shared.config.retention).await
            {
                tracing::warn!(%err, "dray: pruning old cron ticks failed");
            }
            if let Some(prune) = &shared.outbox_prune
                && let Err(err) = prune(shared.config.retention).await
            {
                tracing::warn!(%err, "dray: pruning published outbox events and old inbox marks failed");
            }
            if let Some(wf) = &shared.workflows {
                for _ in 0..PRUNE_ROUNDS {
                    match wf.prune(shared.config.retention, PRUNE_BATCH).await {
                        Ok(n) if n >= u64::from(PRUNE_BATCH) => {}
                        Ok(_) => break,
                        Err(err) => {
                            tracing::warn!(%err, "dray: pruning ended workflow runs failed");
                            break;
                        }
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => {
                if let Some(t) = compacting {
                    t.abort();
                }
                return;
            }
        }
    }
}

/// How often the maintenance leader looks for bloated indexes of the unfinished jobs (see
/// [`Store::job_table_compact`]): one catalog query, and a rebuild only where one is due.
pub const COMPACT_EVERY: Duration = Duration::from_secs(60);

/// How often the maintenance leader samples the per-queue (and outbox) gauges: one query on
/// the unfinished jobs per interval, whatever the number of workers.
pub const GAUGE_SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// Finished jobs pruned per statement where a store prunes row by row.
const PRUNE_BATCH: u32 = 1000;
/// Most prune statements per maintenance round (so at most `PRUNE_BATCH × PRUNE_ROUNDS` rows
/// per round: 10,000 per second at the default interval).
const PRUNE_ROUNDS: usize = 10;

/// Callback deliveries claimed per round, and how long a claimed delivery is ours.
const CALLBACK_BATCH: u32 = 16;
const CALLBACK_LEASE: Duration = Duration::from_secs(60);

/// Delivers HTTP completion callbacks: claims due deliveries, POSTs them concurrently, records
/// each outcome. Runs on every worker that has a secret; the claim keeps them from colliding.
async fn callbacks<S: Store>(shared: Arc<Shared<S>>, secret: Secret, stop: CancelToken) {
    let every = shared
        .config
        .maintenance_interval
        .min(Duration::from_millis(250));
    loop {
        match shared
            .store
            .callback_claim(CALLBACK_BATCH, CALLBACK_LEASE)
            .await
        {
            Ok(due) if !due.is_empty() => {
                let full = due.len() as u32 == CALLBACK_BATCH;
                let tries = due.iter().map(|job| async {
                    let outcome = crate::callback::deliver(&secret.0, job).await;
                    let attempt = job.callback.as_ref().map_or(0, |c| c.attempts);
                    if let crate::CallbackSettle::Retry { error, .. } = &outcome {
                        tracing::warn!(id = %job.id, attempt, %error, "dray: callback not delivered; will retry");
                    }
                    if let Err(err) = shared.store.callback_settle(job.id, attempt, &outcome).await {
                        tracing::warn!(%err, id = %job.id, "dray: could not record a callback try; it is retried after its lease");
                    }
                });
                futures_util::future::join_all(tries).await;
                if full {
                    continue; // more may be waiting
                }
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(%err, "dray: cannot claim callback deliveries"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
    }
}
