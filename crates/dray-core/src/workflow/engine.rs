//! Driving runs on a worker: the handler a worker registers for each workflow name, the replay
//! driver, and the batchers that load runs and write their progress in one statement per batch
//! across every run in flight (as the completer does for jobs).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use chrono::{TimeDelta, Utc};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::error::Result;
use crate::job::{JobContext, JobError, JobOptions};
use crate::types::{LeaseRef, NackAction, QueueName};
use crate::worker::{Erased, Handled, UNKNOWN_KIND_DEFER, panic_message};
use crate::workflow::context::{Mode, RunOps, Suspend, WorkflowContext};
use crate::workflow::store::WorkflowStore;
use crate::workflow::types::{LoadedRun, RunOp, RunStarted, RunStatus, RunWrite};
use crate::workflow::{NewRunSpec, Workflow, WorkflowError};

/// Most requests one batch carries.
const MAX_BATCH: usize = 2000;

type Reply<R> = oneshot::Sender<std::result::Result<R, String>>;

/// Collects requests from many tasks and serves everything that arrived meanwhile with one
/// call, in arrival order.
struct Batcher<Req, Resp> {
    tx: mpsc::UnboundedSender<(Req, Reply<Resp>)>,
}

impl<Req: Send + 'static, Resp: Send + 'static> Batcher<Req, Resp> {
    fn spawn<F>(f: F) -> Self
    where
        F: Fn(Vec<Req>) -> BoxFuture<'static, Result<Vec<Resp>>> + Send + Sync + 'static,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Req, Reply<Resp>)>();
        tokio::spawn(async move {
            let mut reqs = Vec::new();
            let mut replies = Vec::new();
            while let Some((req, reply)) = rx.recv().await {
                reqs.push(req);
                replies.push(reply);
                while reqs.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok((req, reply)) => {
                            reqs.push(req);
                            replies.push(reply);
                        }
                        Err(_) => break,
                    }
                }
                match f(std::mem::take(&mut reqs)).await {
                    Ok(resps) => {
                        for (reply, resp) in replies.drain(..).zip(resps) {
                            let _ = reply.send(Ok(resp));
                        }
                        replies.clear();
                    }
                    Err(e) => {
                        let e = e.to_string();
                        for reply in replies.drain(..) {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                }
            }
        });
        Batcher { tx }
    }

    async fn call(&self, req: Req) -> std::result::Result<Resp, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((req, tx))
            .map_err(|_| "the worker is shutting down".to_owned())?;
        rx.await
            .map_err(|_| "the worker is shutting down".to_owned())?
    }
}

/// What the driver needs of the store, type-erased.
pub(crate) trait EngineOps: RunOps {
    fn load(&self, run: Uuid) -> BoxFuture<'_, std::result::Result<Option<LoadedRun>, String>>;
    fn note<'a>(&'a self, run: Uuid, note: Option<&'a str>) -> BoxFuture<'a, Result<()>>;
    fn defer<'a>(&'a self, queue: &'a QueueName, lease: LeaseRef) -> BoxFuture<'a, Result<()>>;
    fn prune(&self, older_than: std::time::Duration, limit: u32) -> BoxFuture<'_, Result<u64>>;
    fn wake(&self, queue: &str);
    /// The store's job change feed.
    fn changes(&self) -> &crate::changes::ChangeFeed;
}

/// A worker's workflow engine on store `S`: the batchers, started on first use.
pub(crate) struct WorkflowEngine<S: WorkflowStore> {
    store: S,
    batchers: std::sync::OnceLock<Batchers>,
}

struct Batchers {
    writes: Batcher<RunWrite, bool>,
    loads: Batcher<Uuid, Option<LoadedRun>>,
}

impl<S: WorkflowStore> WorkflowEngine<S> {
    pub(crate) fn new(store: S) -> Self {
        WorkflowEngine {
            store,
            batchers: std::sync::OnceLock::new(),
        }
    }

    fn batchers(&self) -> &Batchers {
        self.batchers.get_or_init(|| {
            let store = self.store.clone();
            let writes = Batcher::spawn(move |writes: Vec<RunWrite>| {
                let store = store.clone();
                async move {
                    let applied: HashSet<Uuid> = store
                        .workflow_write_many(&writes)
                        .await?
                        .into_iter()
                        .collect();
                    Ok(writes.iter().map(|w| applied.contains(&w.run)).collect())
                }
                .boxed()
            });
            let store = self.store.clone();
            let loads = Batcher::spawn(move |ids: Vec<Uuid>| {
                let store = store.clone();
                async move {
                    let mut by_id: HashMap<Uuid, LoadedRun> = store
                        .workflow_load_many(&ids)
                        .await?
                        .into_iter()
                        .map(|l| (l.run.id, l))
                        .collect();
                    Ok(ids.iter().map(|id| by_id.remove(id)).collect())
                }
                .boxed()
            });
            Batchers { writes, loads }
        })
    }
}

impl<S: WorkflowStore> RunOps for WorkflowEngine<S> {
    fn write(&self, run: Uuid, attempt: i32, op: RunOp) -> BoxFuture<'_, Result<bool>> {
        async move {
            self.batchers()
                .writes
                .call(RunWrite { run, attempt, op })
                .await
                .map_err(|e| crate::Error::invalid("workflow write", e))
        }
        .boxed()
    }

    fn start(&self, spec: NewRunSpec) -> BoxFuture<'_, Result<RunStarted>> {
        async move {
            let run = spec.build()?;
            let runs = std::slice::from_ref(&run);
            let started =
                crate::metrics::count_started(runs, self.store.workflow_start_many(runs).await)?;
            started
                .into_iter()
                .next()
                .ok_or_else(|| crate::Error::CorruptRow {
                    id: String::new(),
                    reason: "a start answered no run".to_owned(),
                })
        }
        .boxed()
    }

    fn store_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        &self.store
    }
}

impl<S: WorkflowStore> EngineOps for WorkflowEngine<S> {
    fn load(&self, run: Uuid) -> BoxFuture<'_, std::result::Result<Option<LoadedRun>, String>> {
        async move { self.batchers().loads.call(run).await }.boxed()
    }
    fn note<'a>(&'a self, run: Uuid, note: Option<&'a str>) -> BoxFuture<'a, Result<()>> {
        self.store.workflow_note(run, note).boxed()
    }
    fn defer<'a>(&'a self, queue: &'a QueueName, lease: LeaseRef) -> BoxFuture<'a, Result<()>> {
        async move {
            self.store
                .message_nack_many(
                    queue,
                    &[lease],
                    NackAction::Defer {
                        delay: UNKNOWN_KIND_DEFER,
                    },
                )
                .await
                .map(|_| ())
        }
        .boxed()
    }
    fn prune(&self, older_than: std::time::Duration, limit: u32) -> BoxFuture<'_, Result<u64>> {
        self.store.workflow_prune(older_than, limit).boxed()
    }
    fn wake(&self, queue: &str) {
        self.store.wake().wake(queue);
    }
    fn changes(&self) -> &crate::changes::ChangeFeed {
        self.store.wake().changes()
    }
}

/// One version of one workflow, type-erased.
pub(crate) trait ErasedWorkflow: Send + Sync {
    fn drive(&self, env: Drive, loaded: LoadedRun)
    -> BoxFuture<'static, Result<Handled, JobError>>;
}

pub(crate) struct TypedWorkflow<W: Workflow>(pub(crate) Arc<W>);

impl<W: Workflow> ErasedWorkflow for TypedWorkflow<W> {
    fn drive(
        &self,
        env: Drive,
        loaded: LoadedRun,
    ) -> BoxFuture<'static, Result<Handled, JobError>> {
        drive(self.0.clone(), env, loaded).boxed()
    }
}

/// What a drive of one run works with.
pub(crate) struct Drive {
    engine: Arc<dyn EngineOps>,
    job: JobContext,
    max_attempts: i32,
}

/// The handler a worker runs for the jobs of one workflow name: every registered version.
pub(crate) struct WorkflowHandler {
    pub(crate) name: &'static str,
    pub(crate) versions: BTreeMap<i32, Arc<dyn ErasedWorkflow>>,
    pub(crate) options: JobOptions,
    pub(crate) engine: Arc<dyn EngineOps>,
}

impl Erased for WorkflowHandler {
    fn options(&self) -> &JobOptions {
        &self.options
    }

    fn handles_cancel(&self) -> bool {
        true
    }

    fn call(
        &self,
        ctx: JobContext,
        _payload: serde_json::Value,
    ) -> BoxFuture<'static, std::result::Result<Handled, JobError>> {
        let engine = self.engine.clone();
        let versions = self.versions.clone();
        let name = self.name;
        async move {
            let id = ctx.id();
            let loaded = match engine.load(id).await {
                Ok(Some(l)) => l,
                Ok(None) => {
                    return Err(JobError::Permanent(format!(
                        "job {id} drives a run of workflow {name:?} but no such run is stored"
                    )));
                }
                Err(e) => return Err(JobError::Transient(format!("could not load run {id}: {e}"))),
            };
            if let Some(reason) = &loaded.run.unreadable {
                return Err(JobError::Permanent(format!(
                    "run {id} cannot be replayed: {reason}; fix the stored row, then re-drive job {id} (`dray jobs retry {id}`)"
                )));
            }
            let version = loaded.run.version;
            let Some(wf) = versions.get(&version).cloned() else {
                let known: Vec<i32> = versions.keys().copied().collect();
                let note = format!(
                    "waiting for a worker that runs version {version} of workflow {name:?} (a worker seen with versions {known:?} gave it back)"
                );
                if loaded.run.note.as_deref() != Some(note.as_str())
                    && let Err(err) = engine.note(id, Some(&note)).await
                {
                    tracing::warn!(%err, run = %id, "dray: could not note why a run waits");
                }
                tracing::warn!(run = %id, workflow = name, version, "dray: no handler for this workflow version here; giving the run back for a worker that has one");
                let queue = ctx.inner.queue.clone();
                let lease = LeaseRef {
                    id,
                    attempt: Some(ctx.attempt()),
                };
                if let Err(err) = engine.defer(&queue, lease).await {
                    tracing::warn!(%err, run = %id, "dray: could not give a run back; its lease expires by itself");
                }
                return Ok(Handled::Settled { recorded: true });
            };
            if loaded.run.note.is_some()
                && let Err(err) = engine.note(id, None).await
            {
                tracing::warn!(%err, run = %id, "dray: could not clear a run's note");
            }
            let max_attempts = ctx.max_attempts();
            wf.drive(
                Drive {
                    engine,
                    job: ctx,
                    max_attempts,
                },
                loaded,
            )
            .await
        }
        .boxed()
    }
}

fn settled(applied: Result<bool>) -> Result<Handled, JobError> {
    match applied {
        Ok(recorded) => Ok(Handled::Settled { recorded }),
        Err(e) => Err(JobError::Transient(format!(
            "could not record the run's progress: {e}"
        ))),
    }
}

impl Drive {
    fn run_ops(&self) -> Arc<dyn RunOps> {
        self.engine.clone()
    }

    async fn write(&self, op: RunOp) -> Result<bool> {
        self.engine
            .write(self.job.id(), self.job.attempt(), op)
            .await
    }

    async fn finish(
        &self,
        loaded: &LoadedRun,
        status: RunStatus,
        output: Option<String>,
        error: Option<String>,
    ) -> Result<Handled, JobError> {
        let written = self
            .write(RunOp::Finish {
                status,
                output,
                error,
                parent: loaded.run.parent_id,
            })
            .await;
        if matches!(written, Ok(true)) {
            crate::metrics::run_ended(&loaded.run.name, status);
            // The driving job completes, as any job does.
            self.record(crate::MessageState::Completed, Some(self.job.attempt()));
        }
        settled(written)
    }

    /// Records the driving job's change on the store's change feed.
    fn record(&self, state: crate::MessageState, attempt: Option<i32>) {
        self.engine.changes().record_with(|| {
            Some(crate::changes::JobChange::new(
                self.job.id(),
                self.job.queue(),
                state,
                attempt,
            ))
        });
    }

    /// A transient failure: the run retries from its last completed step, or fails once its
    /// attempts are used up.
    async fn transient(
        &self,
        ctx: &WorkflowContext,
        loaded: &LoadedRun,
        msg: String,
    ) -> Result<Handled, JobError> {
        if self.job.attempt() >= self.max_attempts {
            let msg = format!(
                "{msg} (attempt {} of {})",
                self.job.attempt(),
                self.max_attempts
            );
            return self.end(ctx, loaded, RunStatus::Failed, Some(msg)).await;
        }
        match self.write(RunOp::Retrying { error: msg.clone() }).await {
            Ok(true) => Err(JobError::Transient(msg)),
            Ok(false) => Ok(Handled::Settled { recorded: false }),
            Err(e) => Err(JobError::Transient(format!(
                "{msg}; and recording it failed: {e}"
            ))),
        }
    }

    /// Ends the run for `reason`: runs the compensations of its completed steps, newest first,
    /// each recorded once done, then finishes it.
    async fn end(
        &self,
        ctx: &WorkflowContext,
        loaded: &LoadedRun,
        reason: RunStatus,
        error: Option<String>,
    ) -> Result<Handled, JobError> {
        let comps = std::mem::take(&mut ctx.replay().compensations);
        if comps.is_empty() {
            return self.finish(loaded, reason, None, error).await;
        }
        if loaded.run.status != RunStatus::Compensating {
            match self
                .write(RunOp::Compensating {
                    reason,
                    error: error.clone(),
                })
                .await
            {
                Ok(true) => {}
                other => return settled(other),
            }
        }
        for c in comps.into_iter().rev() {
            if c.done {
                continue;
            }
            let (seq, name) = (c.seq, c.name.clone());
            let outcome = std::panic::AssertUnwindSafe((c.run)(c.output))
                .catch_unwind()
                .await;
            let failure = match outcome {
                Ok(Ok(())) => match self.write(RunOp::Compensated { seq }).await {
                    Ok(true) => continue,
                    other => return settled(other),
                },
                Ok(Err(WorkflowError::LeaseLost)) => {
                    return Ok(Handled::Settled { recorded: false });
                }
                Ok(Err(e)) if e.is_permanent() => {
                    let msg = format!("the compensation of step {name:?} failed: {e}");
                    return self
                        .finish(loaded, RunStatus::Failed, None, Some(msg))
                        .await;
                }
                Ok(Err(e)) => e.to_string(),
                Err(panic) => format!("panicked: {}", panic_message(&*panic)),
            };
            let msg = format!("the compensation of step {name:?} failed: {failure}");
            if self.job.attempt() >= self.max_attempts {
                return self
                    .finish(loaded, RunStatus::Failed, None, Some(msg))
                    .await;
            }
            return match self.write(RunOp::Retrying { error: msg.clone() }).await {
                Ok(true) => Err(JobError::Transient(msg)),
                other => settled(other),
            };
        }
        self.finish(loaded, RunStatus::Compensated, None, error)
            .await
    }

    async fn suspend(&self, s: Suspend) -> Result<Handled, JobError> {
        let queue = self.job.inner.queue.clone();
        let state = match s.wake_at {
            Some(t) if t <= Utc::now() => crate::MessageState::Available,
            _ if s.signal.is_none() && s.child.is_none() && s.wake_at.is_none() => {
                crate::MessageState::Available
            }
            _ => crate::MessageState::Scheduled,
        };
        let r = self
            .write(RunOp::Suspend {
                record: s.record,
                status: s.status,
                wake_at: s.wake_at,
                signal: s.signal,
                child: s.child,
            })
            .await;
        // This worker's fetcher may be waiting: let it look again for the next due time.
        self.engine.wake(queue.as_str());
        if matches!(r, Ok(true)) {
            // Suspending gives the attempt back uncounted.
            self.record(state, Some((self.job.attempt() - 1).max(0)));
        }
        settled(r)
    }

    async fn reload(&self, id: Uuid) -> Result<LoadedRun, JobError> {
        match self.engine.load(id).await {
            Ok(Some(l)) => Ok(l),
            Ok(None) => Err(JobError::Permanent(format!("run {id} is gone"))),
            Err(e) => Err(JobError::Transient(format!("could not load run {id}: {e}"))),
        }
    }
}

fn initial_mode(loaded: &LoadedRun, now: chrono::DateTime<Utc>) -> Mode {
    let run = &loaded.run;
    if run.status == RunStatus::Compensating {
        Mode::Ending(run.end_reason.unwrap_or(RunStatus::Failed))
    } else if run.cancel_requested_at.is_some() {
        Mode::Ending(RunStatus::Cancelled)
    } else if run.deadline.is_some_and(|d| now >= d) {
        Mode::Ending(RunStatus::TimedOut)
    } else {
        Mode::Normal
    }
}

async fn drive<W: Workflow>(
    wf: Arc<W>,
    env: Drive,
    mut loaded: LoadedRun,
) -> Result<Handled, JobError> {
    let id = loaded.run.id;
    let offset: TimeDelta = env.job.inner.db_offset;
    if loaded.run.status.is_terminal() {
        // Ended, yet its job still ran: finish the job the same way.
        let (status, output, error) = (
            loaded.run.status,
            loaded.run.output.as_ref().map(|o| o.to_string()),
            loaded.run.error.clone(),
        );
        return env.finish(&loaded, status, output, error).await;
    }
    let mut mode = initial_mode(&loaded, Utc::now() + offset);
    loop {
        let input: W::Input = match W::Input::deserialize(&loaded.run.input) {
            Ok(i) => i,
            Err(e) => {
                let msg = format!(
                    "the run's input does not fit workflow {:?} version {}: {e}",
                    W::NAME,
                    W::VERSION
                );
                return env
                    .finish(&loaded, RunStatus::Failed, None, Some(msg))
                    .await;
            }
        };
        let ctx = WorkflowContext::new(
            loaded.run.clone(),
            loaded.steps.clone(),
            loaded.signals.clone(),
            loaded.children.clone(),
            env.job.attempt(),
            offset,
            env.job.inner.cancel.clone(),
            mode,
            env.run_ops(),
        );
        let body = std::panic::AssertUnwindSafe(wf.run(&ctx, input)).catch_unwind();
        let deadline = match (mode, loaded.run.deadline) {
            (Mode::Normal, Some(d)) => Some((d - ctx.now()).to_std().unwrap_or_default()),
            _ => None,
        };
        let outcome = tokio::select! {
            o = body => Some(o),
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            } => None,
        };
        let suspend = ctx.replay().suspend.take();
        if let Some(s) = suspend {
            return env.suspend(s).await;
        }
        let ending = |mode: Mode| match mode {
            Mode::Ending(r) => Some(r),
            Mode::Normal => None,
        };
        match outcome {
            None => {
                // The whole-run timeout passed mid-body: replay towards the end.
                loaded = env.reload(id).await?;
                mode = Mode::Ending(RunStatus::TimedOut);
            }
            Some(Err(panic)) => {
                let msg = format!("the workflow body panicked: {}", panic_message(&*panic));
                return env.transient(&ctx, &loaded, msg).await;
            }
            Some(Ok(Ok(out))) => {
                if let Some(reason) = ending(mode) {
                    let error = loaded.run.error.clone();
                    return env.end(&ctx, &loaded, reason, error).await;
                }
                if let Some(rec) = ctx.unreplayed() {
                    let e = WorkflowError::NonDeterminism {
                        seq: rec.seq,
                        expected: "the end of the workflow".to_owned(),
                        found: format!("{} {:?}", rec.kind, rec.name),
                    };
                    return env
                        .finish(&loaded, RunStatus::Failed, None, Some(e.to_string()))
                        .await;
                }
                return match serde_json::to_string(&out) {
                    Ok(json) => {
                        env.finish(&loaded, RunStatus::Completed, Some(json), None)
                            .await
                    }
                    Err(e) => {
                        let msg = format!(
                            "the output of workflow {:?} does not serialize: {e}",
                            W::NAME
                        );
                        env.finish(&loaded, RunStatus::Failed, None, Some(msg))
                            .await
                    }
                };
            }
            Some(Ok(Err(e))) => match e {
                WorkflowError::LeaseLost => return Ok(Handled::Settled { recorded: false }),
                WorkflowError::NonDeterminism { .. } => {
                    return env
                        .finish(&loaded, RunStatus::Failed, None, Some(e.to_string()))
                        .await;
                }
                WorkflowError::Cancelled | WorkflowError::TimedOut => {
                    if let Some(reason) = ending(mode) {
                        let error = loaded.run.error.clone();
                        return env.end(&ctx, &loaded, reason, error).await;
                    }
                    let reloaded = env.reload(id).await?;
                    if matches!(e, WorkflowError::Cancelled)
                        && reloaded.run.cancel_requested_at.is_none()
                    {
                        // The token fired because the lease was lost, not for a cancel.
                        return Ok(Handled::Settled { recorded: false });
                    }
                    mode = Mode::Ending(if matches!(e, WorkflowError::Cancelled) {
                        RunStatus::Cancelled
                    } else {
                        RunStatus::TimedOut
                    });
                    loaded = reloaded;
                }
                WorkflowError::Transient(msg) => return env.transient(&ctx, &loaded, msg).await,
                WorkflowError::Suspended => {
                    let msg = "the body returned WorkflowError::Suspended without a sleep or a wait suspending it".to_owned();
                    return env.transient(&ctx, &loaded, msg).await;
                }
                other => {
                    let (reason, error) = match ending(mode) {
                        Some(r) => (r, loaded.run.error.clone()),
                        None => (RunStatus::Failed, Some(other.to_string())),
                    };
                    return env.end(&ctx, &loaded, reason, error).await;
                }
            },
        }
    }
}

use serde::Deserialize as _;
