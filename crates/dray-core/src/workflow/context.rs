//! What a workflow body sees: [`WorkflowContext`], its steps, durable sleeps, signals, query
//! state and child runs, and the [`WorkflowError`] it returns.
//!
//! A body is replayed from the top on every resume. Each step call is matched against the
//! run's history by position: a completed record returns its stored output without running the
//! closure, a record of another name is a non-determinism error, and past the end of the
//! history the step runs and its record is written before the body goes on.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::{Future, IntoFuture};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde::Deserialize as _;
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::job::{CancelToken, RetryPolicy};
use crate::workflow::types::{
    ChildOutcome, PendingSignal, RunOp, RunRow, RunStarted, RunStatus, StepKind, StepRecord,
    StepStatus, StepWrite,
};
use crate::workflow::{NewRunSpec, Workflow};

/// How a workflow body (or a step) says it failed, and how Dray stops a body.
///
/// Any error converts into [`WorkflowError::Transient`] with `?`: the run is retried from its
/// last completed step after the workflow's backoff. Say [`WorkflowError::permanent`] for an
/// error a retry cannot fix: the run fails at once (and compensates). The other variants come
/// from the context; propagate them with `?`.
#[derive(Debug)]
pub enum WorkflowError {
    /// Worth retrying: the run resumes from its last completed step after a backoff.
    Transient(String),
    /// Not worth retrying: the run fails (compensating its completed steps).
    Permanent(String),
    /// The run suspended (a sleep, or a wait for a signal or a child): a worker resumes it when
    /// it is due. Propagate it with `?`; it is not a failure.
    Suspended,
    /// The run was cancelled; it stops at this step boundary and compensates.
    Cancelled,
    /// The run's whole-run timeout passed; it stops here and compensates.
    TimedOut,
    /// The body reached a step that does not match the run's history at that position (a
    /// step renamed, reordered or removed since the run started): the run fails.
    NonDeterminism {
        /// Position in the history.
        seq: i32,
        /// What the code asked for there.
        expected: String,
        /// What the history holds there.
        found: String,
    },
    /// A signal's payload does not deserialize into the type the wait asked for.
    SignalPayload {
        /// The signal.
        name: String,
        /// Why it does not fit.
        reason: String,
    },
    /// A child run ended without an output.
    ChildFailed {
        /// The child run.
        run: Uuid,
        /// How it ended.
        status: RunStatus,
        /// Its error.
        message: String,
    },
    /// This worker no longer holds the run (its lease was taken back): it stops, writing
    /// nothing more.
    LeaseLost,
}

impl WorkflowError {
    /// A permanent failure: the run fails (and compensates) without a retry.
    pub fn permanent(e: impl fmt::Display) -> WorkflowError {
        WorkflowError::Permanent(e.to_string())
    }
    /// A transient failure: the run is retried from its last completed step.
    pub fn transient(e: impl fmt::Display) -> WorkflowError {
        WorkflowError::Transient(e.to_string())
    }
    /// True for errors that end the run at once rather than retrying it.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            WorkflowError::Permanent(_)
                | WorkflowError::NonDeterminism { .. }
                | WorkflowError::SignalPayload { .. }
                | WorkflowError::ChildFailed { .. }
        )
    }
}

impl fmt::Display for WorkflowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkflowError::Transient(m) | WorkflowError::Permanent(m) => f.write_str(m),
            WorkflowError::Suspended => f.write_str("suspended"),
            WorkflowError::Cancelled => f.write_str("cancelled"),
            WorkflowError::TimedOut => f.write_str("the run's timeout passed"),
            WorkflowError::NonDeterminism {
                seq,
                expected,
                found,
            } => write!(
                f,
                "non-determinism at history position {seq}: the code asks for {expected} where the run's history has {found}; the workflow's code changed under a running run: register the old code as its own version for such runs"
            ),
            WorkflowError::SignalPayload { name, reason } => {
                write!(
                    f,
                    "signal {name:?} has a payload that does not fit: {reason}"
                )
            }
            WorkflowError::ChildFailed {
                run,
                status,
                message,
            } => write!(f, "child run {run} ended {status}: {message}"),
            WorkflowError::LeaseLost => f.write_str("lease lost: another worker holds the run"),
        }
    }
}

impl<E: std::error::Error> From<E> for WorkflowError {
    /// Any error is transient by default.
    fn from(e: E) -> Self {
        WorkflowError::Transient(e.to_string())
    }
}

/// Options of one step ([`WorkflowContext::step_with`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct StepOptions {
    /// Tries of the step within one replay, with backoff between them. `None` (the default):
    /// one try; a transient failure then retries the whole run from this step, after the
    /// workflow's backoff.
    pub retry: Option<RetryPolicy>,
    /// Longest one try may run; a try that runs longer counts as a transient failure.
    pub timeout: Option<Duration>,
}

/// A step running longer than this is recorded as `running`, so `describe` shows it.
pub const RUNNING_MARK: Duration = Duration::from_millis(200);

/// How the context reaches the store (type-erased, so the context is not generic).
pub(crate) trait RunOps: Send + Sync {
    /// Writes one op about the held run (batched with other runs'); true when applied.
    fn write(&self, run: Uuid, attempt: i32, op: RunOp) -> BoxFuture<'_, crate::Result<bool>>;
    /// Starts a child run (idempotent on its workflow id).
    fn start(&self, spec: NewRunSpec) -> BoxFuture<'_, crate::Result<RunStarted>>;
    /// The store, for [`WorkflowContext::store`].
    fn store_any(&self) -> &(dyn std::any::Any + Send + Sync);
}

/// Whether a replay runs the body forward, or towards its end after a failure, a timeout or a
/// cancel (every step not yet completed then fails with that reason without running).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Normal,
    Ending(RunStatus),
}

/// Why the body stopped to wait: what the driver writes.
#[derive(Clone, Debug)]
pub(crate) struct Suspend {
    pub(crate) record: StepWrite,
    pub(crate) status: RunStatus,
    pub(crate) wake_at: Option<DateTime<Utc>>,
    pub(crate) signal: Option<String>,
    pub(crate) child: Option<Uuid>,
}

type CompensateFn =
    Box<dyn FnOnce(serde_json::Value) -> BoxFuture<'static, Result<(), WorkflowError>> + Send>;

pub(crate) struct Compensation {
    pub(crate) seq: i32,
    pub(crate) name: String,
    pub(crate) output: serde_json::Value,
    pub(crate) done: bool,
    pub(crate) run: CompensateFn,
}

pub(crate) struct Replay {
    pub(crate) steps: Vec<StepRecord>,
    cursor: usize,
    names: HashMap<String, u32>,
    signals: VecDeque<PendingSignal>,
    children: HashMap<Uuid, ChildOutcome>,
    pub(crate) compensations: Vec<Compensation>,
    pub(crate) suspend: Option<Suspend>,
}

pub(crate) struct ContextInner {
    pub(crate) run: RunRow,
    pub(crate) attempt: i32,
    pub(crate) db_offset: TimeDelta,
    pub(crate) cancel: CancelToken,
    pub(crate) mode: Mode,
    pub(crate) ops: Arc<dyn RunOps>,
    pub(crate) replay: Mutex<Replay>,
    pub(crate) resumed: bool,
}

/// What a workflow body knows and does: ids, attempt, steps, durable sleeps, signals, query
/// state and child runs. Cheap to clone.
#[derive(Clone)]
pub struct WorkflowContext {
    pub(crate) inner: Arc<ContextInner>,
}

impl fmt::Debug for WorkflowContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkflowContext")
            .field("run_id", &self.inner.run.id)
            .field("workflow", &self.inner.run.name)
            .field("attempt", &self.inner.attempt)
            .finish()
    }
}

impl WorkflowContext {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        run: RunRow,
        steps: Vec<StepRecord>,
        signals: Vec<PendingSignal>,
        children: Vec<ChildOutcome>,
        attempt: i32,
        db_offset: TimeDelta,
        cancel: CancelToken,
        mode: Mode,
        ops: Arc<dyn RunOps>,
    ) -> Self {
        let resumed = attempt > 1 || !steps.is_empty();
        WorkflowContext {
            inner: Arc::new(ContextInner {
                run,
                attempt,
                db_offset,
                cancel,
                mode,
                ops,
                resumed,
                replay: Mutex::new(Replay {
                    steps,
                    cursor: 0,
                    names: HashMap::new(),
                    signals: signals.into(),
                    children: children.into_iter().map(|c| (c.id, c)).collect(),
                    compensations: Vec::new(),
                    suspend: None,
                }),
            }),
        }
    }

    pub(crate) fn replay(&self) -> std::sync::MutexGuard<'_, Replay> {
        self.inner.replay.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The run's id.
    pub fn run_id(&self) -> Uuid {
        self.inner.run.id
    }
    /// The run's stable workflow id (the caller's, or the run id when none was given).
    pub fn workflow_id(&self) -> &str {
        &self.inner.run.workflow_id
    }
    /// The workflow's name.
    pub fn workflow_name(&self) -> &str {
        &self.inner.run.name
    }
    /// The version the run was started with.
    pub fn version(&self) -> i32 {
        self.inner.run.version
    }
    /// True when this replay is not the run's first (it has history, or an earlier attempt
    /// failed).
    pub fn is_resumed(&self) -> bool {
        self.inner.resumed
    }
    /// The driving job's attempt: 1, plus one for every transient failure of the run.
    pub fn attempt(&self) -> i32 {
        self.inner.attempt
    }
    /// The parent run, for a child.
    pub fn parent_id(&self) -> Option<Uuid> {
        self.inner.run.parent_id
    }
    /// The store this worker runs on, if it is an `S` (e.g. `ctx.store::<PgStore>()` to reach
    /// its pool for a step's own queries; Forge's `ctx.db()`).
    pub fn store<S: crate::Store>(&self) -> Option<&S> {
        self.inner.ops.store_any().downcast_ref::<S>()
    }

    /// True once a cancel of the run was asked for (seen at the worker's latest heartbeat) or
    /// this worker lost the run. A long step may check it and stop early; the run itself stops
    /// at its next step boundary either way.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancel.is_cancelled()
    }

    /// Completes when [`WorkflowContext::is_cancelled`] becomes true; `select!` on it in a long
    /// step.
    pub async fn cancelled(&self) {
        self.inner.cancel.cancelled().await
    }

    /// The database clock now, as this worker estimates it (from its last claim).
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.inner.db_offset
    }

    fn write(&self, op: RunOp) -> impl Future<Output = Result<(), WorkflowError>> + Send + '_ {
        let run = self.inner.run.id;
        let attempt = self.inner.attempt;
        async move {
            match self.inner.ops.write(run, attempt, op).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(WorkflowError::LeaseLost),
                Err(e) => Err(WorkflowError::Transient(format!(
                    "could not record the run's progress: {e}"
                ))),
            }
        }
    }

    /// Takes the next history position for a record of `kind` and `name`: the name with its
    /// ordinal, and the record already there. A record of another kind or name there is a
    /// non-determinism error.
    fn next(
        &self,
        kind: StepKind,
        name: &str,
    ) -> Result<(i32, String, Option<StepRecord>), WorkflowError> {
        let mut r = self.replay();
        let n = {
            let n = r.names.entry(name.to_owned()).or_insert(0);
            *n += 1;
            *n
        };
        let full = if n == 1 {
            name.to_owned()
        } else {
            format!("{name}#{n}")
        };
        let seq = r.cursor as i32;
        r.cursor += 1;
        match r.steps.get(seq as usize) {
            Some(rec) if rec.kind != kind || rec.name != full => {
                Err(WorkflowError::NonDeterminism {
                    seq,
                    expected: format!("{kind} {full:?}"),
                    found: format!("{} {:?}", rec.kind, rec.name),
                })
            }
            Some(rec) => Ok((seq, full, Some(rec.clone()))),
            None => Ok((seq, full, None)),
        }
    }

    /// Records `rec` in the in-memory history, as the store now has it.
    fn remember(&self, w: &StepWrite) {
        let rec = StepRecord {
            seq: w.seq,
            kind: w.kind,
            name: w.name.clone(),
            status: w.status,
            output: w
                .output
                .as_deref()
                .and_then(|o| serde_json::from_str(o).ok()),
            error: w.error.clone(),
            attempts: w.attempts,
            started_at: w.started_at,
            finished_at: w.finished_at,
            wake_at: w.wake_at,
            compensated_at: None,
        };
        let mut r = self.replay();
        let i = w.seq as usize;
        if i < r.steps.len() {
            r.steps[i] = rec;
        } else {
            r.steps.push(rec);
        }
    }

    async fn record(&self, w: StepWrite) -> Result<(), WorkflowError> {
        self.write(RunOp::Step(w.clone())).await?;
        self.remember(&w);
        Ok(())
    }

    /// Where a step that has not completed may not run: the run is ending, cancelled, or past
    /// its timeout.
    fn boundary(&self) -> Result<(), WorkflowError> {
        if let Mode::Ending(reason) = self.inner.mode {
            return Err(match reason {
                RunStatus::Cancelled => WorkflowError::Cancelled,
                RunStatus::TimedOut => WorkflowError::TimedOut,
                _ => WorkflowError::Permanent(
                    self.inner
                        .run
                        .error
                        .clone()
                        .unwrap_or_else(|| "the run failed".to_owned()),
                ),
            });
        }
        if self.inner.cancel.is_cancelled() {
            return Err(WorkflowError::Cancelled);
        }
        if self.inner.run.deadline.is_some_and(|d| self.now() >= d) {
            return Err(WorkflowError::TimedOut);
        }
        Ok(())
    }

    fn step_write(&self, seq: i32, kind: StepKind, name: &str, status: StepStatus) -> StepWrite {
        let now = self.now();
        StepWrite {
            seq,
            kind,
            name: name.to_owned(),
            status,
            output: None,
            error: None,
            attempts: 0,
            started_at: Some(now),
            finished_at: matches!(status, StepStatus::Completed | StepStatus::Failed)
                .then_some(now),
            wake_at: None,
            consumes: None,
        }
    }

    /// Runs `f` once as the step `name` and stores its JSON output; every later replay returns
    /// the stored output without running it (pgqrs `ctx.step`). Chain
    /// [`Step::compensate_with`] to register a compensation, [`Step::options`] for retries and a
    /// timeout, then `.await` it.
    ///
    /// ```ignore
    /// let user: User = ctx.step("create_user", || async { create(&input).await }).await?;
    /// ```
    pub fn step<T, F, Fut>(&self, name: &str, f: F) -> Step<'_, T, F>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = Result<T, WorkflowError>> + Send,
    {
        Step {
            ctx: self,
            name: name.to_owned(),
            f,
            options: StepOptions::default(),
            compensate: None,
            _t: std::marker::PhantomData,
        }
    }

    /// [`WorkflowContext::step`] with options (retries with backoff, a timeout per try).
    pub async fn step_with<T, F, Fut>(
        &self,
        name: &str,
        options: StepOptions,
        f: F,
    ) -> Result<T, WorkflowError>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = Result<T, WorkflowError>> + Send,
    {
        self.step(name, f).options(options).await
    }

    async fn run_step<T, F, Fut>(
        &self,
        name: String,
        options: StepOptions,
        mut f: F,
        compensate: Option<CompensateFn>,
    ) -> Result<T, WorkflowError>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = Result<T, WorkflowError>> + Send,
    {
        let (seq, full, existing) = self.next(StepKind::Step, &name)?;
        if let Some(rec) = &existing {
            match rec.status {
                StepStatus::Completed => {
                    let value = rec.output.clone().unwrap_or(serde_json::Value::Null);
                    let out = T::deserialize(&value).map_err(|e| {
                        WorkflowError::Permanent(format!(
                            "the stored output of step {full:?} does not fit the step's type: {e}"
                        ))
                    })?;
                    if let Some(c) = compensate {
                        self.register(seq, &full, value, rec.compensated_at.is_some(), c);
                    }
                    return Ok(out);
                }
                StepStatus::Failed => {
                    return Err(WorkflowError::Permanent(
                        rec.error
                            .clone()
                            .unwrap_or_else(|| format!("step {full:?} failed")),
                    ));
                }
                StepStatus::Pending | StepStatus::Running => {}
            }
        }
        self.boundary()?;
        let prior = existing.as_ref().map_or(0, |r| r.attempts);
        let mut base = self.step_write(seq, StepKind::Step, &full, StepStatus::Running);
        if let Some(started) = existing.as_ref().and_then(|r| r.started_at) {
            base.started_at = Some(started);
        }
        let policy = options.retry;
        let tries_allowed = policy.map_or(1, |p| p.max_attempts.max(1));
        let mut tries = 0;
        loop {
            tries += 1;
            // Each attempt of a step runs in a span of its own, a child of the run's job span.
            let step_span = tracing::info_span!(target: "dray::jobs", "dray.step", step = %full, attempt = prior + tries);
            let attempt_fut =
                std::panic::AssertUnwindSafe(tracing::Instrument::instrument(f(), step_span))
                    .catch_unwind();
            let began = std::time::Instant::now();
            let timed = async {
                match options.timeout {
                    Some(t) => tokio::time::timeout(t, attempt_fut).await.ok(),
                    None => Some(attempt_fut.await),
                }
            };
            // A step that runs longer than a moment is recorded as running, so that describe
            // shows it; a quick one costs no such write.
            let mark = {
                let mut w = base.clone();
                w.attempts = prior + tries;
                async move {
                    tokio::time::sleep(RUNNING_MARK).await;
                    let _ = self.write(RunOp::Step(w)).await;
                    std::future::pending::<()>().await;
                }
            };
            let outcome = tokio::select! {
                o = timed => o,
                _ = mark => unreachable!("the mark never completes"),
            };
            crate::metrics::step_ran(self.workflow_name(), began.elapsed());
            let err = match outcome {
                Some(Ok(Ok(out))) => {
                    let json = serde_json::to_string(&out).map_err(|e| {
                        WorkflowError::Permanent(format!(
                            "the output of step {full:?} does not serialize: {e}"
                        ))
                    })?;
                    let mut w = base.clone();
                    w.status = StepStatus::Completed;
                    w.attempts = prior + tries;
                    w.finished_at = Some(self.now());
                    w.output = Some(json.clone());
                    self.record(w).await?;
                    if let Some(c) = compensate {
                        let value = serde_json::from_str(&json).unwrap_or(serde_json::Value::Null);
                        self.register(seq, &full, value, false, c);
                    }
                    return Ok(out);
                }
                Some(Ok(Err(e))) => e,
                Some(Err(panic)) => WorkflowError::Transient(format!(
                    "step {full:?} panicked: {}",
                    crate::worker::panic_message(&*panic)
                )),
                None => WorkflowError::Transient(format!(
                    "step {full:?} timed out after {}",
                    crate::format_duration(options.timeout.unwrap_or_default())
                )),
            };
            match err {
                WorkflowError::Permanent(msg) => {
                    let mut w = base.clone();
                    w.status = StepStatus::Failed;
                    w.attempts = prior + tries;
                    w.finished_at = Some(self.now());
                    w.error = Some(msg.clone());
                    self.record(w).await?;
                    return Err(WorkflowError::Permanent(msg));
                }
                WorkflowError::Transient(msg) => {
                    let mut w = base.clone();
                    w.attempts = prior + tries;
                    w.error = Some(msg.clone());
                    if tries >= tries_allowed {
                        self.record(w).await?;
                        return Err(WorkflowError::Transient(msg));
                    }
                    // Kept quiet: a failed try is recorded with the final outcome.
                    let delay = policy.map_or(Duration::ZERO, |p| {
                        p.delay(tries, self.inner.run.id.as_u128() as u64 ^ seq as u64)
                    });
                    tokio::time::sleep(delay).await;
                    self.boundary()?;
                }
                other => return Err(other),
            }
        }
    }

    fn register(
        &self,
        seq: i32,
        name: &str,
        output: serde_json::Value,
        done: bool,
        run: CompensateFn,
    ) {
        self.replay().compensations.push(Compensation {
            seq,
            name: name.to_owned(),
            output,
            done,
            run,
        });
    }

    /// Sleeps durably for `d` (the wake time is stored, on the database clock): the run holds
    /// no worker slot meanwhile, survives restarts of every process, and resumes when due.
    pub async fn sleep(&self, d: Duration) -> Result<(), WorkflowError> {
        let until = self.now()
            + TimeDelta::from_std(d.min(crate::duration::MAX_SPAN)).unwrap_or(TimeDelta::MAX);
        self.sleep_until(until).await
    }

    /// Sleeps durably until `t` (database clock); see [`WorkflowContext::sleep`].
    pub async fn sleep_until(&self, t: DateTime<Utc>) -> Result<(), WorkflowError> {
        let (seq, full, existing) = self.next(StepKind::Sleep, "sleep")?;
        if existing
            .as_ref()
            .is_some_and(|r| r.status == StepStatus::Completed)
        {
            return Ok(());
        }
        self.boundary()?;
        let wake = existing.as_ref().and_then(|r| r.wake_at).unwrap_or(t);
        let mut w = self.step_write(seq, StepKind::Sleep, &full, StepStatus::Pending);
        if let Some(s) = existing.as_ref().and_then(|r| r.started_at) {
            w.started_at = Some(s);
        }
        w.wake_at = Some(wake);
        if self.now() >= wake {
            w.status = StepStatus::Completed;
            w.finished_at = Some(self.now());
            w.attempts = 1;
            return self.record(w).await;
        }
        self.suspend(Suspend {
            record: w,
            status: RunStatus::Sleeping,
            wake_at: Some(wake),
            signal: None,
            child: None,
        })
    }

    fn suspend(&self, s: Suspend) -> Result<(), WorkflowError> {
        let wake_at = match (s.wake_at, self.inner.run.deadline) {
            (Some(w), Some(d)) => Some(w.min(d)),
            (w, d) => w.or(d),
        };
        self.replay().suspend = Some(Suspend { wake_at, ..s });
        Err(WorkflowError::Suspended)
    }

    /// Waits for the signal `name` (sent with `Client::signal`), up to `timeout` (`None`:
    /// without a limit). The run is `waiting` meanwhile and holds no worker slot. Signals sent
    /// before the wait are kept and consumed by waits of their name, oldest first. Returns
    /// `None` when the timeout passed first; a payload that does not deserialize into `T` is
    /// [`WorkflowError::SignalPayload`].
    pub async fn wait_for_signal<T: DeserializeOwned>(
        &self,
        name: &str,
        timeout: Option<Duration>,
    ) -> Result<Option<T>, WorkflowError> {
        let (seq, full, existing) = self.next(StepKind::Signal, name)?;
        let decode = |v: &serde_json::Value| -> Result<Option<T>, WorkflowError> {
            if v.get("timed_out").and_then(|t| t.as_bool()) == Some(true) {
                return Ok(None);
            }
            let payload = v.get("payload").cloned().unwrap_or(serde_json::Value::Null);
            T::deserialize(&payload)
                .map(Some)
                .map_err(|e| WorkflowError::SignalPayload {
                    name: name.to_owned(),
                    reason: format!(
                        "{e} (the payload: {})",
                        crate::error::excerpt(&payload.to_string())
                    ),
                })
        };
        if let Some(rec) = existing
            .as_ref()
            .filter(|r| r.status == StepStatus::Completed)
        {
            return decode(rec.output.as_ref().unwrap_or(&serde_json::Value::Null));
        }
        self.boundary()?;
        let deadline = existing.as_ref().and_then(|r| r.wake_at).or_else(|| {
            timeout.map(|t| {
                self.now()
                    + TimeDelta::from_std(t.min(crate::duration::MAX_SPAN))
                        .unwrap_or(TimeDelta::MAX)
            })
        });
        let mut w = self.step_write(seq, StepKind::Signal, &full, StepStatus::Pending);
        if let Some(s) = existing.as_ref().and_then(|r| r.started_at) {
            w.started_at = Some(s);
        }
        w.wake_at = deadline;
        let arrived = {
            let mut r = self.replay();
            let pos = r.signals.iter().position(|s| s.name == name);
            pos.and_then(|p| r.signals.remove(p))
        };
        if let Some(sig) = arrived {
            let out = serde_json::json!({ "payload": sig.payload });
            w.status = StepStatus::Completed;
            w.finished_at = Some(self.now());
            w.attempts = 1;
            w.output = Some(out.to_string());
            w.consumes = Some(sig.id);
            self.record(w).await?;
            return decode(&out);
        }
        if deadline.is_some_and(|d| self.now() >= d) {
            w.status = StepStatus::Completed;
            w.finished_at = Some(self.now());
            w.attempts = 1;
            w.output = Some(r#"{"timed_out":true}"#.to_owned());
            self.record(w).await?;
            return Ok(None);
        }
        self.suspend(Suspend {
            record: w,
            status: RunStatus::Waiting,
            wake_at: deadline,
            signal: Some(name.to_owned()),
            child: None,
        })?;
        Ok(None)
    }

    /// Stores in-flight state under `key`, which `Client::query` reads while the run goes on
    /// (Forze `query`).
    pub async fn set_state(&self, key: &str, value: &impl Serialize) -> Result<(), WorkflowError> {
        let value = serde_json::to_string(value).map_err(|e| {
            WorkflowError::Permanent(format!("state {key:?} does not serialize: {e}"))
        })?;
        self.write(RunOp::State {
            key: key.to_owned(),
            value,
        })
        .await
    }

    /// Starts workflow `W` as a child of this run (once: a replay finds the same child). Await
    /// its output with [`WorkflowContext::wait_child`]; cancelling this run cancels it.
    pub async fn start_child<W: Workflow>(
        &self,
        input: &W::Input,
    ) -> Result<ChildRun<W>, WorkflowError> {
        let (seq, full, existing) = self.next(StepKind::Child, W::NAME)?;
        if let Some(rec) = existing
            .as_ref()
            .filter(|r| r.status == StepStatus::Completed)
        {
            let id = rec
                .output
                .as_ref()
                .and_then(|v| v.as_str())
                .and_then(|s| Uuid::parse_str(s).ok())
                .ok_or_else(|| {
                    WorkflowError::Permanent(format!(
                        "the history's record of child {full:?} holds no run id"
                    ))
                })?;
            return Ok(ChildRun::new(id));
        }
        self.boundary()?;
        let input = serde_json::to_string(input).map_err(|e| {
            WorkflowError::Permanent(format!("child input does not serialize: {e}"))
        })?;
        let spec = NewRunSpec::of::<W>(
            input,
            format!("{}/{seq}", self.inner.run.id),
            Some(self.inner.run.id),
        );
        let started = self.inner.ops.start(spec).await.map_err(|e| {
            WorkflowError::Transient(format!("could not start child {full:?}: {e}"))
        })?;
        let mut w = self.step_write(seq, StepKind::Child, &full, StepStatus::Completed);
        w.attempts = 1;
        w.output = Some(serde_json::to_string(&started.id.to_string()).unwrap_or_default());
        self.record(w).await?;
        Ok(ChildRun::new(started.id))
    }

    /// Waits durably for a child's output (this run is `waiting` meanwhile and holds no worker
    /// slot). A child that failed, timed out or was cancelled is
    /// [`WorkflowError::ChildFailed`].
    pub async fn wait_child<W: Workflow>(
        &self,
        child: &ChildRun<W>,
    ) -> Result<W::Output, WorkflowError> {
        let (seq, full, existing) = self.next(StepKind::ChildResult, W::NAME)?;
        let decode = |rec: &StepRecord| -> Result<W::Output, WorkflowError> {
            if rec.status == StepStatus::Failed {
                let v = rec.output.clone().unwrap_or_default();
                return Err(WorkflowError::ChildFailed {
                    run: child.id,
                    status: v
                        .get("status")
                        .and_then(|s| s.as_str())
                        .and_then(|s| RunStatus::parse(s).ok())
                        .unwrap_or(RunStatus::Failed),
                    message: rec.error.clone().unwrap_or_default(),
                });
            }
            W::Output::deserialize(rec.output.as_ref().unwrap_or(&serde_json::Value::Null)).map_err(
                |e| {
                    WorkflowError::Permanent(format!(
                        "the output of child {} does not fit {}'s output type: {e}",
                        child.id,
                        W::NAME
                    ))
                },
            )
        };
        if let Some(rec) = existing
            .as_ref()
            .filter(|r| matches!(r.status, StepStatus::Completed | StepStatus::Failed))
        {
            return decode(rec);
        }
        self.boundary()?;
        let mut w = self.step_write(seq, StepKind::ChildResult, &full, StepStatus::Pending);
        if let Some(s) = existing.as_ref().and_then(|r| r.started_at) {
            w.started_at = Some(s);
        }
        let ended = self.replay().children.get(&child.id).cloned();
        if let Some(c) = ended {
            w.finished_at = Some(self.now());
            w.attempts = 1;
            if c.status == RunStatus::Completed {
                w.status = StepStatus::Completed;
                w.output = Some(c.output.unwrap_or(serde_json::Value::Null).to_string());
            } else {
                w.status = StepStatus::Failed;
                w.output = Some(serde_json::json!({ "status": c.status }).to_string());
                w.error = Some(
                    c.error
                        .unwrap_or_else(|| format!("the child ended {}", c.status)),
                );
            }
            self.record(w.clone()).await?;
            let rec = self.replay().steps[seq as usize].clone();
            return decode(&rec);
        }
        self.suspend(Suspend {
            record: w,
            status: RunStatus::Waiting,
            wake_at: None,
            signal: None,
            child: Some(child.id),
        })?;
        Err(WorkflowError::Suspended)
    }

    // Forge's explicit step API, on the same records.

    /// True when a step of this name (with its ordinal, `name#2`, for a repeat) has completed
    /// in this run. When it is the record at the replay's position, the replay moves past it,
    /// so code that skips a completed step's start and complete calls stays in step.
    pub fn is_step_completed(&self, name: &str) -> bool {
        let mut r = self.replay();
        let done = r
            .steps
            .iter()
            .any(|s| s.name == name && s.status == StepStatus::Completed);
        let cursor = r.cursor;
        if done && r.steps.get(cursor).is_some_and(|s| s.name == name) {
            r.cursor += 1;
            let base = name.split('#').next().unwrap_or(name).to_owned();
            *r.names.entry(base).or_insert(0) += 1;
        }
        done
    }

    /// Records that the step `name` started (Forge `record_step_start`): a `running` record at
    /// the next history position (nothing new on a replay that finds it).
    pub async fn record_step_start(&self, name: &str) -> Result<(), WorkflowError> {
        let (seq, full, existing) = self.next(StepKind::Step, name)?;
        if existing.is_some() {
            return Ok(());
        }
        self.boundary()?;
        let mut w = self.step_write(seq, StepKind::Step, &full, StepStatus::Running);
        w.attempts = 1;
        self.record(w).await
    }

    /// Records the step `name` completed with `output` (Forge `record_step_complete`); the
    /// step must have been started with [`WorkflowContext::record_step_start`].
    pub async fn record_step_complete(
        &self,
        name: &str,
        output: &impl Serialize,
    ) -> Result<(), WorkflowError> {
        let rec = {
            let r = self.replay();
            r.steps.iter().rev().find(|s| s.name == name).cloned()
        };
        let Some(rec) = rec else {
            return Err(WorkflowError::Permanent(format!(
                "record_step_complete({name:?}) without record_step_start({name:?}) first"
            )));
        };
        if rec.status == StepStatus::Completed {
            return Ok(());
        }
        let json = serde_json::to_string(output).map_err(|e| {
            WorkflowError::Permanent(format!("output of step {name:?} does not serialize: {e}"))
        })?;
        let mut w = self.step_write(rec.seq, StepKind::Step, &rec.name, StepStatus::Completed);
        w.started_at = rec.started_at;
        w.attempts = rec.attempts.max(1);
        w.output = Some(json);
        self.record(w).await
    }

    /// The stored output of the completed step `name` (Forge `get_step_result`), `None` when
    /// it has not completed.
    pub fn get_step_result<T: DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<T>, WorkflowError> {
        let r = self.replay();
        match r
            .steps
            .iter()
            .find(|s| s.name == name && s.status == StepStatus::Completed)
        {
            None => Ok(None),
            Some(s) => T::deserialize(s.output.as_ref().unwrap_or(&serde_json::Value::Null))
                .map(Some)
                .map_err(|e| {
                    WorkflowError::Permanent(format!(
                        "the stored output of step {name:?} does not fit the type asked for: {e}"
                    ))
                }),
        }
    }

    /// The run's history as this replay sees it.
    pub fn history(&self) -> Vec<StepRecord> {
        self.replay().steps.clone()
    }

    /// Records left in the history past where the body ended (steps removed from the code).
    pub(crate) fn unreplayed(&self) -> Option<StepRecord> {
        let r = self.replay();
        r.steps.get(r.cursor).cloned()
    }
}

/// A step call being built: `.compensate_with(…)`, `.options(…)`, then `.await`.
#[must_use = "a step does nothing until it is awaited"]
pub struct Step<'a, T, F> {
    ctx: &'a WorkflowContext,
    name: String,
    f: F,
    options: StepOptions,
    compensate: Option<CompensateFn>,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<'a, T, F> Step<'a, T, F>
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    /// Registers a compensation: when the run fails permanently, times out or is cancelled
    /// after this step completed, `c` runs with the step's output, after the compensations of
    /// later steps and before those of earlier ones, durably and once.
    pub fn compensate_with<C, CFut>(mut self, c: C) -> Self
    where
        C: FnOnce(T) -> CFut + Send + 'static,
        CFut: Future<Output = Result<(), WorkflowError>> + Send + 'static,
    {
        self.compensate = Some(Box::new(move |value: serde_json::Value| {
            async move {
                let out = T::deserialize(&value).map_err(|e| {
                    WorkflowError::Permanent(format!(
                        "the stored output does not fit the compensation's type: {e}"
                    ))
                })?;
                c(out).await
            }
            .boxed()
        }));
        self
    }

    /// Sets retries and a timeout per try.
    pub fn options(mut self, options: StepOptions) -> Self {
        self.options = options;
        self
    }
}

impl<'a, T, F, Fut> IntoFuture for Step<'a, T, F>
where
    T: Serialize + DeserializeOwned + Send + 'static,
    F: FnMut() -> Fut + Send + 'a,
    Fut: Future<Output = Result<T, WorkflowError>> + Send + 'a,
{
    type Output = Result<T, WorkflowError>;
    type IntoFuture = BoxFuture<'a, Result<T, WorkflowError>>;

    fn into_future(self) -> Self::IntoFuture {
        let Step {
            ctx,
            name,
            f,
            options,
            compensate,
            ..
        } = self;
        ctx.run_step(name, options, f, compensate).boxed()
    }
}

/// A child run started by [`WorkflowContext::start_child`].
pub struct ChildRun<W> {
    /// The child's run id.
    pub id: Uuid,
    _w: std::marker::PhantomData<fn() -> W>,
}

impl<W> ChildRun<W> {
    fn new(id: Uuid) -> Self {
        ChildRun {
            id,
            _w: std::marker::PhantomData,
        }
    }
}

impl<W> fmt::Debug for ChildRun<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildRun").field("id", &self.id).finish()
    }
}
