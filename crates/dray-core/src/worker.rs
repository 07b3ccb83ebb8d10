//! The worker: runs registered [`Job`] handlers from one or more queues with bounded
//! concurrency.
//!
//! * **Claims in batches**: each queue's fetcher leases as many jobs as it has free slots (up
//!   to [`WorkerConfig::fetch_batch`]) in one statement, and long-polls when idle.
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

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::{Semaphore, broadcast, mpsc};
use tokio::task::{AbortHandle, JoinSet};
use tracing::Instrument;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::job::{CancelToken, ContextInner, ContextOps, Job, JobContext, JobError, JobOptions};
use crate::queue::{Queue, QueueConfig, ReceiveOptions};
use crate::store::Store;
use crate::types::{Completion, FailTo, FailureKind, LeaseRef, LeaseWrite, Message, QueueName};

/// Default concurrency of a queue whose concurrency is not given (handlers are async: a
/// hundred waiting on I/O cost little).
pub const DEFAULT_CONCURRENCY: usize = 100;

/// When a busy fetcher has fewer than a quarter of its slots free, it waits this long for more
/// to free up before claiming, so that it claims in batches rather than one job per round
/// trip. An idle fetcher (all slots free) never waits. (Claiming as soon as a quarter is free
/// was measured too: no faster on PostgreSQL, slower on SQLite, whose single writer gains
/// most from larger batches.)
pub const FETCH_COOLDOWN: Duration = Duration::from_micros(500);

/// Settings of a [`Worker`].
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// This worker's id, recorded as the lease holder (default `worker-<random>`).
    pub id: String,
    /// Lease of a claimed job (default 30 s). A job whose worker dies runs again this long
    /// after its last heartbeat.
    pub lease: Duration,
    /// How often running jobs' leases are extended (default a third of the lease).
    pub heartbeat: Duration,
    /// Most jobs claimed in one statement (default 100).
    pub fetch_batch: u32,
    /// How long running jobs may finish after shutdown begins (default 10 s).
    pub shutdown_grace: Duration,
    /// Take part in maintenance (rescue expired leases, prune finished jobs); default true.
    pub maintenance: bool,
    /// How often maintenance runs on the leader (default 1 s).
    pub maintenance_interval: Duration,
    /// Finished jobs older than this are pruned (default 24 h).
    pub retention: Duration,
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
            fetch_batch: 100,
            shutdown_grace: Duration::from_secs(10),
            maintenance: true,
            maintenance_interval: Duration::from_secs(1),
            retention: Duration::from_secs(24 * 3600),
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
    /// Maintenance took back expired leases.
    Rescued {
        /// Made available again.
        requeued: u64,
        /// Dead (out of attempts).
        dead: u64,
    },
}

/// A type-erased handler.
trait Erased: Send + Sync {
    fn options(&self) -> &JobOptions;
    fn call(
        &self,
        ctx: JobContext,
        payload: serde_json::Value,
    ) -> BoxFuture<'static, std::result::Result<Option<String>, JobError>>;
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
    ) -> BoxFuture<'static, std::result::Result<Option<String>, JobError>> {
        let job = self.job.clone();
        async move {
            let input: J::Input = serde_json::from_value(payload).map_err(|e| {
                JobError::Permanent(format!("input does not fit job {}: {e}", J::NAME))
            })?;
            let out = job.run(&ctx, input).await?;
            serde_json::to_string(&out).map(Some).map_err(|e| {
                JobError::Permanent(format!("output of job {} does not serialize: {e}", J::NAME))
            })
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
        lease: LeaseRef,
        percent: u8,
        message: Option<&'a str>,
    ) -> BoxFuture<'a, Result<LeaseWrite>> {
        self.store.job_progress(lease, percent, message).boxed()
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
    queue: QueueName,
    attempt: i32,
    cancel: CancelToken,
    cancel_requested: bool,
    abort: Option<AbortHandle>,
}

struct Shared<S: Store> {
    store: S,
    queue: Queue<S>,
    config: WorkerConfig,
    handlers: HashMap<String, Arc<dyn Erased>>,
    running: Mutex<HashMap<Uuid, Running>>,
    events: broadcast::Sender<WorkerEvent>,
    ops: Arc<Ops<S>>,
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
}

impl<S: Store> std::fmt::Debug for Worker<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("config", &self.config)
            .field("jobs", &self.handlers.keys().collect::<Vec<_>>())
            .field("queues", &self.queues)
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
        if self.handlers.is_empty() {
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
        if self.config.lease < Duration::from_millis(100) {
            return Err(Error::invalid("lease", "must be at least 100ms"));
        }
        if self.config.heartbeat.is_zero() || self.config.heartbeat >= self.config.lease {
            return Err(Error::invalid(
                "heartbeat",
                "must be positive and shorter than the lease",
            ));
        }
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
            events,
        });
        let stop = CancelToken::new();
        let task = tokio::spawn(run(shared.clone(), self.queues, stop.clone()));
        Ok(WorkerHandle {
            id: shared.config.id.clone(),
            stop,
            task,
            events: shared.events.clone(),
        })
    }
}

/// A running worker.
#[derive(Debug)]
pub struct WorkerHandle {
    id: String,
    stop: CancelToken,
    task: tokio::task::JoinHandle<()>,
    events: broadcast::Sender<WorkerEvent>,
}

impl WorkerHandle {
    /// The worker's id.
    pub fn id(&self) -> &str {
        &self.id
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

async fn run<S: Store>(shared: Arc<Shared<S>>, queues: Vec<(QueueName, usize)>, stop: CancelToken) {
    let (done_tx, done_rx) = mpsc::unbounded_channel::<(Completion, i32)>();
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
    let mut fetchers = JoinSet::new();
    for (queue, concurrency) in queues {
        fetchers.spawn(fetch_loop(
            shared.clone(),
            queue,
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
    if shared.config.maintenance
        && let Err(err) = shared
            .store
            .leader_release(MAINTENANCE, &shared.config.id)
            .await
    {
        tracing::warn!(%err, "dray: could not release maintenance leadership (it expires by itself)");
    }
}

async fn fetch_loop<S: Store>(
    shared: Arc<Shared<S>>,
    queue: QueueName,
    concurrency: usize,
    stop: CancelToken,
    done: mpsc::UnboundedSender<(Completion, i32)>,
) {
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    let mut backoff = Duration::from_millis(100);
    loop {
        while tasks.try_join_next().is_some() {}
        let first = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = stop.cancelled() => break,
        };
        let want = (shared.config.fetch_batch as usize).min(concurrency);
        let mut permits = vec![first];
        let take = |permits: &mut Vec<_>| {
            while permits.len() < want {
                match slots.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
        };
        take(&mut permits);
        if permits.len() < (want / 4).max(1) {
            tokio::time::sleep(FETCH_COOLDOWN).await;
            take(&mut permits);
        }
        let options = ReceiveOptions {
            limit: permits.len() as u32,
            wait: Duration::from_secs(30),
            lease: Some(shared.config.lease),
        };
        let got = match shared
            .queue
            .receive_until(queue.as_str(), &options, stop.cancelled())
            .await
        {
            Ok(got) => {
                backoff = Duration::from_millis(100);
                got
            }
            Err(err) => {
                tracing::warn!(%err, queue = %queue, "dray: cannot claim jobs; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        for m in got {
            let permit = permits.pop();
            tasks.spawn(run_one(shared.clone(), m, done.clone(), permit));
        }
    }
    // Shutting down: no more claims. Let running attempts finish, up to the grace period.
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

/// After the grace period: stop this queue's handlers and give their jobs back at once.
async fn release_running<S: Store>(shared: &Shared<S>, queue: &QueueName) {
    let leases: Vec<LeaseRef> = {
        let mut running = shared.running();
        let mut leases = Vec::new();
        for (id, r) in running.iter_mut() {
            if &r.queue == queue {
                if let Some(a) = r.abort.take() {
                    a.abort();
                }
                leases.push(LeaseRef {
                    id: *id,
                    attempt: Some(r.attempt),
                });
            }
        }
        running.retain(|_, r| &r.queue != queue);
        leases
    };
    if leases.is_empty() {
        return;
    }
    tracing::warn!(n = leases.len(), queue = %queue, "dray: shutdown grace over; releasing running jobs");
    let action = crate::NackAction::Requeue {
        delay: Duration::ZERO,
    };
    if let Err(err) = shared.store.message_nack_many(queue, &leases, action).await {
        tracing::warn!(%err, "dray: could not release leases; they expire by themselves");
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

async fn run_one<S: Store>(
    shared: Arc<Shared<S>>,
    m: Message,
    done: mpsc::UnboundedSender<(Completion, i32)>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let lease = m.lease();
    let queue = match QueueName::new(m.queue.as_str()) {
        Ok(q) => q,
        Err(_) => return, // stored rows are validated on the way in; nothing to do here
    };
    let kind = m.kind.clone().unwrap_or_default();
    let Some(handler) = shared.handlers.get(&kind).cloned() else {
        let known: Vec<&str> = shared.handlers.keys().map(String::as_str).collect();
        let msg = format!(
            "worker {} has no handler for job kind {kind:?} on queue {} (it runs {known:?}); register it, or route the job to a queue whose workers do",
            shared.config.id, m.queue
        );
        let delay = crate::job::RetryPolicy::default().delay(m.attempt, m.id.as_u128() as u64);
        fail(&shared, &m, FailureKind::Error, &msg, FailTo::Retry(delay)).await;
        return;
    };
    let options = handler.options().clone();
    let cancel = CancelToken::new();
    if m.cancel_requested {
        cancel.cancel();
    }
    let span = tracing::info_span!("dray.job", id = %m.id, kind = %kind, attempt = m.attempt, queue = %m.queue);
    let ctx = JobContext {
        inner: Arc::new(ContextInner {
            id: m.id,
            kind: kind.clone(),
            queue: queue.clone(),
            attempt: m.attempt,
            max_attempts: m.max_attempts,
            cancel: cancel.clone(),
            ops: shared.ops.clone(),
            span: span.clone(),
        }),
    };
    let handle = tokio::spawn(handler.call(ctx, m.payload.clone()).instrument(span));
    shared.running().insert(
        m.id,
        Running {
            queue: queue.clone(),
            attempt: m.attempt,
            cancel: cancel.clone(),
            cancel_requested: m.cancel_requested,
            abort: Some(handle.abort_handle()),
        },
    );
    shared.emit(WorkerEvent::Started {
        id: m.id,
        attempt: m.attempt,
    });
    let abort = handle.abort_handle();
    let outcome = match options.timeout {
        Some(t) => match tokio::time::timeout(t, handle).await {
            Ok(r) => Some(r),
            Err(_) => {
                abort.abort();
                None
            }
        },
        None => Some(handle.await),
    };
    let cancel_requested = shared
        .running()
        .remove(&m.id)
        .map(|r| r.cancel_requested)
        .unwrap_or(false);
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
        Some(Ok(Ok(result))) => {
            // Handed to the completer; the slot is free as soon as it is queued there.
            let _ = done.send((Completion { lease, result }, m.attempt));
            drop(permit);
        }
        Some(Ok(Err(JobError::Transient(msg)))) => {
            fail(
                &shared,
                &m,
                FailureKind::Error,
                &msg,
                retry(FailureKind::Error),
            )
            .await
        }
        Some(Ok(Err(JobError::Permanent(msg)))) => {
            fail(
                &shared,
                &m,
                FailureKind::Permanent,
                &msg,
                retry(FailureKind::Permanent),
            )
            .await
        }
        Some(Ok(Err(JobError::Cancelled))) => {
            fail(
                &shared,
                &m,
                FailureKind::Cancelled,
                "the handler stopped on a cancel request",
                FailTo::Cancelled,
            )
            .await
        }
        Some(Err(join)) if join.is_panic() => {
            let msg = format!("handler panicked: {}", panic_message(&*join.into_panic()));
            fail(
                &shared,
                &m,
                FailureKind::Panic,
                &msg,
                retry(FailureKind::Panic),
            )
            .await
        }
        // Aborted by shutdown: its lease was released there.
        Some(Err(_)) => {}
        None => {
            let msg = format!(
                "timed out after {}",
                crate::format_duration(options.timeout.unwrap_or_default())
            );
            fail(
                &shared,
                &m,
                FailureKind::Timeout,
                &msg,
                retry(FailureKind::Timeout),
            )
            .await
        }
    }
}

async fn fail<S: Store>(shared: &Shared<S>, m: &Message, kind: FailureKind, msg: &str, to: FailTo) {
    let recorded = match shared.store.job_fail(m.lease(), kind, msg, to).await {
        Ok(w) => w.applied.contains(&m.id),
        Err(err) => {
            tracing::warn!(%err, id = %m.id, "dray: could not record a failed attempt; its lease will expire and it runs again");
            false
        }
    };
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

/// Writes finished attempts in batches: everything that finished while the previous write
/// was in flight goes in the next one statement.
async fn completer<S: Store>(
    shared: Arc<Shared<S>>,
    mut rx: mpsc::UnboundedReceiver<(Completion, i32)>,
) {
    const MAX_BATCH: usize = 2000;
    let mut batch: Vec<(Completion, i32)> = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let completions: Vec<Completion> = batch.iter().map(|(c, _)| c.clone()).collect();
        let mut backoff = Duration::from_millis(50);
        let applied = loop {
            match shared.store.job_complete_many(&completions).await {
                Ok(w) => break Some(w.applied.into_iter().collect::<HashSet<Uuid>>()),
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
        for (c, attempt) in batch.drain(..) {
            let recorded = applied.as_ref().is_some_and(|a| a.contains(&c.lease.id));
            if !recorded {
                tracing::warn!(id = %c.lease.id, "dray: completion refused: the lease was taken back meanwhile");
            }
            shared.emit(WorkerEvent::Finished {
                id: c.lease.id,
                attempt,
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
    let mut by_queue: HashMap<QueueName, Vec<LeaseRef>> = HashMap::new();
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
        if leader {
            match shared.store.message_rescue_expired(None).await {
                Ok(r) if r.requeued + r.dead > 0 => shared.emit(WorkerEvent::Rescued {
                    requeued: r.requeued,
                    dead: r.dead,
                }),
                Ok(_) => {}
                Err(err) => tracing::warn!(%err, "dray: rescuing expired leases failed"),
            }
            if let Err(err) = shared.store.job_prune(shared.config.retention, 1000).await {
                tracing::warn!(%err, "dray: pruning finished jobs failed");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
    }
}

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
