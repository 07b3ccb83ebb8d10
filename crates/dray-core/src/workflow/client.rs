//! Starting and observing runs (Forze's start / describe / result / query, pgqrs's trigger /
//! get / result): methods on [`Client`] for stores that keep workflows, and [`WorkflowHandle`].

use std::time::Duration;

use futures_core::Stream;
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::store::StoreConnection;
use crate::workflow::store::WorkflowStore;
use crate::workflow::types::{
    NewRun, RunCancel, RunFilter, RunInfo, RunStarted, RunStatus, StepStatus,
};
use crate::workflow::{NewRunSpec, Workflow, WorkflowOptions};

/// How often waits re-read a run, at first and at most (the interval doubles in between).
const POLL_MIN: Duration = Duration::from_millis(5);
const POLL_MAX: Duration = Duration::from_millis(200);

/// Options of one start.
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    /// A stable id (unique per workflow name): a second start with it returns the first run
    /// instead of starting another. Default: the run id.
    pub workflow_id: Option<String>,
    /// Fail with [`Error::AlreadyStarted`] instead of returning the existing run (Forze's
    /// `raise_on_already_started`).
    pub raise_on_already_started: bool,
}

impl StartOptions {
    /// No workflow id (the run id serves), existing runs returned.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets the workflow id.
    pub fn workflow_id(mut self, id: impl Into<String>) -> Self {
        self.workflow_id = Some(id.into());
        self
    }
    /// Fail when the workflow id is taken.
    pub fn raise_on_already_started(mut self) -> Self {
        self.raise_on_already_started = true;
        self
    }
}

/// A started run: its ids, and the calls that observe and steer it.
pub struct WorkflowHandle<S: WorkflowStore, W> {
    client: Client<S>,
    run_id: Uuid,
    existing: bool,
    _w: std::marker::PhantomData<fn() -> W>,
}

impl<S: WorkflowStore, W> std::fmt::Debug for WorkflowHandle<S, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkflowHandle")
            .field("run_id", &self.run_id)
            .field("existing", &self.existing)
            .finish()
    }
}

impl<S: WorkflowStore, W> Clone for WorkflowHandle<S, W> {
    fn clone(&self) -> Self {
        WorkflowHandle {
            client: self.client.clone(),
            run_id: self.run_id,
            existing: self.existing,
            _w: std::marker::PhantomData,
        }
    }
}

impl<S: WorkflowStore, W: Workflow> WorkflowHandle<S, W> {
    /// The run's id.
    pub fn run_id(&self) -> Uuid {
        self.run_id
    }
    /// True when the start found a run already started with this workflow id.
    pub fn is_existing(&self) -> bool {
        self.existing
    }
    /// The run with its steps.
    pub async fn describe(&self) -> Result<RunInfo> {
        self.client.describe(self.run_id).await
    }
    /// The output if the run has completed, `None` while it goes on; a run that ended without
    /// one is [`Error::WorkflowFailed`] (pgqrs `get`).
    pub async fn get(&self) -> Result<Option<W::Output>> {
        self.client.workflow_output::<W::Output>(self.run_id).await
    }
    /// Waits for the output, up to `timeout` (pgqrs `result`, Forze `result`).
    pub async fn result(&self, timeout: Duration) -> Result<W::Output> {
        self.client
            .workflow_result::<W::Output>(self.run_id, timeout)
            .await
    }
    /// Sends a signal.
    pub async fn signal(&self, name: &str, payload: &impl Serialize) -> Result<Uuid> {
        self.client.signal(self.run_id, name, payload).await
    }
    /// Reads query state.
    pub async fn query<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        self.client.query(self.run_id, key).await
    }
    /// Asks the run to stop at its next step boundary, then compensate.
    pub async fn cancel(&self) -> Result<RunCancel> {
        self.client.cancel_workflow(self.run_id).await
    }
}

/// The status and step summary a watch yields on every change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RunSnapshot {
    /// The run.
    pub run_id: Uuid,
    /// Its status.
    pub status: RunStatus,
    /// Each step's name and status, in history order.
    pub steps: Vec<(String, StepStatus)>,
}

impl<S: WorkflowStore> Client<S> {
    fn spec<W: Workflow>(&self, input: &W::Input, workflow_id: Option<String>) -> Result<NewRun> {
        let input = serde_json::to_string(input)?;
        NewRunSpec::of::<W>(input, workflow_id.unwrap_or_default(), None).build()
    }

    fn started<W: Workflow>(
        &self,
        run: &NewRun,
        s: RunStarted,
        options: &StartOptions,
    ) -> Result<WorkflowHandle<S, W>> {
        if s.existing && options.raise_on_already_started {
            return Err(Error::AlreadyStarted {
                name: W::NAME.to_owned(),
                workflow_id: run.workflow_id.clone(),
                run: s.id,
            });
        }
        Ok(WorkflowHandle {
            client: self.clone(),
            run_id: s.id,
            existing: s.existing,
            _w: std::marker::PhantomData,
        })
    }

    /// Starts a run of `W` with a stable `workflow_id` and returns at once: a second start
    /// with the same id returns the first run (Forze `start(…, workflow_id)`).
    pub async fn start_workflow<W: Workflow>(
        &self,
        input: &W::Input,
        workflow_id: &str,
    ) -> Result<WorkflowHandle<S, W>> {
        self.start_workflow_with::<W>(input, StartOptions::new().workflow_id(workflow_id))
            .await
    }

    /// Starts a run of `W` with options.
    pub async fn start_workflow_with<W: Workflow>(
        &self,
        input: &W::Input,
        options: StartOptions,
    ) -> Result<WorkflowHandle<S, W>> {
        let run = self.spec::<W>(input, options.workflow_id.clone())?;
        let one = std::slice::from_ref(&run);
        let s = crate::metrics::count_started(one, self.store().workflow_start_many(one).await)?
            .into_iter()
            .next()
            .ok_or_else(no_answer)?;
        self.started::<W>(&run, s, &options)
    }

    /// Starts a run of `W` inside your transaction: it exists if and only if the transaction
    /// commits.
    pub async fn start_workflow_in<W: Workflow>(
        &self,
        conn: &mut StoreConnection<S>,
        input: &W::Input,
        options: StartOptions,
    ) -> Result<WorkflowHandle<S, W>> {
        let run = self.spec::<W>(input, options.workflow_id.clone())?;
        let one = std::slice::from_ref(&run);
        let s = crate::metrics::count_started(
            one,
            self.store().workflow_start_many_in(conn, one).await,
        )?
        .into_iter()
        .next()
        .ok_or_else(no_answer)?;
        self.started::<W>(&run, s, &options)
    }

    /// Starts many runs of `W` in one transaction (each with its optional workflow id);
    /// answers in input order.
    pub async fn start_workflows<'a, W: Workflow>(
        &self,
        runs: impl IntoIterator<Item = (&'a W::Input, Option<String>)>,
    ) -> Result<Vec<RunStarted>> {
        let runs = runs
            .into_iter()
            .map(|(input, id)| self.spec::<W>(input, id))
            .collect::<Result<Vec<_>>>()?;
        crate::metrics::count_started(&runs, self.store().workflow_start_many(&runs).await)
    }

    /// A handle on run `run_id` of `W`.
    pub fn workflow_handle<W: Workflow>(&self, run_id: Uuid) -> WorkflowHandle<S, W> {
        WorkflowHandle {
            client: self.clone(),
            run_id,
            existing: true,
            _w: std::marker::PhantomData,
        }
    }

    /// The current run of workflow `name` with `workflow_id`.
    pub async fn find_workflow(&self, name: &str, workflow_id: &str) -> Result<Uuid> {
        self.store()
            .workflow_find(name, workflow_id)
            .await?
            .ok_or_else(|| Error::RunNotFound {
                run: format!("{name}/{workflow_id}"),
            })
    }

    /// A run with its status, version and steps (Forze `describe`).
    pub async fn describe(&self, run: Uuid) -> Result<RunInfo> {
        self.store()
            .workflow_get(run)
            .await?
            .ok_or_else(|| Error::RunNotFound {
                run: run.to_string(),
            })
    }

    /// The output of a completed run, `None` while it goes on; a run that ended otherwise is
    /// [`Error::WorkflowFailed`].
    pub async fn workflow_output<U: DeserializeOwned>(&self, run: Uuid) -> Result<Option<U>> {
        let info = self.describe(run).await?;
        match info.status {
            RunStatus::Completed => Ok(Some(U::deserialize(
                info.run.output.as_ref().unwrap_or(&serde_json::Value::Null),
            )?)),
            s if s.is_terminal() => Err(Error::WorkflowFailed {
                run,
                status: s,
                message: info
                    .run
                    .error
                    .unwrap_or_else(|| "no error recorded".to_owned()),
            }),
            _ => Ok(None),
        }
    }

    /// Waits for a run's output, up to `timeout` (`Duration::MAX` waits until it ends); no
    /// end within it is [`Error::Timeout`] (the run goes on).
    pub async fn workflow_result<U: DeserializeOwned>(
        &self,
        run: Uuid,
        timeout: Duration,
    ) -> Result<U> {
        let deadline = crate::duration::deadline(timeout);
        let mut every = POLL_MIN;
        loop {
            if let Some(out) = self.workflow_output::<U>(run).await? {
                return Ok(out);
            }
            let now = tokio::time::Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(Error::Timeout(timeout));
            }
            let left = deadline.map_or(every, |d| d - now);
            tokio::time::sleep(every.min(left)).await;
            every = (every * 2).min(POLL_MAX);
        }
    }

    /// A stream of a run's status and steps, yielding every change it observes and ending
    /// after the run ends.
    pub fn watch_workflow(
        &self,
        run: Uuid,
    ) -> impl Stream<Item = Result<RunSnapshot>> + Send + 'static {
        let client = self.clone();
        futures_util::stream::unfold(
            (client, None::<RunSnapshot>, false),
            move |(client, last, done)| async move {
                if done {
                    return None;
                }
                let mut every = POLL_MIN;
                loop {
                    let info = match client.describe(run).await {
                        Ok(i) => i,
                        Err(e) => return Some((Err(e), (client, last, true))),
                    };
                    let snap = RunSnapshot {
                        run_id: run,
                        status: info.status,
                        steps: info
                            .steps
                            .iter()
                            .map(|s| (s.name.clone(), s.status))
                            .collect(),
                    };
                    if last.as_ref() != Some(&snap) {
                        let ended = snap.status.is_terminal();
                        return Some((Ok(snap.clone()), (client, Some(snap), ended)));
                    }
                    tokio::time::sleep(every).await;
                    every = (every * 2).min(POLL_MAX);
                }
            },
        )
    }

    /// Sends signal `name` with `payload` to a run: a wait for it resumes the run; sent before
    /// the wait, it is kept until a wait of that name consumes it. A run that has ended is
    /// [`Error::RunFinished`]. Returns the signal's id.
    pub async fn signal(&self, run: Uuid, name: &str, payload: &impl Serialize) -> Result<Uuid> {
        if name.is_empty() || name.len() > 256 {
            return Err(Error::invalid("signal name", "use 1 to 256 bytes of text"));
        }
        let payload = serde_json::to_string(payload)?;
        self.store()
            .workflow_signal(run, name, &payload)
            .await?
            .ok_or_else(|| Error::RunNotFound {
                run: run.to_string(),
            })
    }

    /// Reads the query state a run stored under `key` (`ctx.set_state`), `None` when it has
    /// none (Forze `query`).
    pub async fn query<T: DeserializeOwned>(&self, run: Uuid, key: &str) -> Result<Option<T>> {
        match self.store().workflow_query(run, key).await? {
            Some(v) => Ok(Some(T::deserialize(&v)?)),
            None => {
                // Tell an unknown run from a key not set.
                self.describe(run).await?;
                Ok(None)
            }
        }
    }

    /// Cancels a run: it stops at its next step boundary, compensates its completed steps and
    /// ends `cancelled` (or `compensated`); its unfinished children are cancelled too.
    pub async fn cancel_workflow(&self, run: Uuid) -> Result<RunCancel> {
        self.store()
            .workflow_cancel(run)
            .await?
            .ok_or_else(|| Error::RunNotFound {
                run: run.to_string(),
            })
    }

    /// Starts a new run of an ended run's workflow with the same input, in which the steps
    /// before `step` return their recorded results and the rest run again (DBOS fork,
    /// Temporal reset). The new run takes over the workflow id; `describe` links the two.
    /// It runs with the workflow's default options on the old run's queue.
    pub async fn restart_from(&self, run: Uuid, step: &str) -> Result<Uuid> {
        let info = self.describe(run).await?;
        if !info.status.is_terminal() {
            return Err(Error::invalid(
                "run",
                format!(
                    "run {run} is {}; only an ended run can be restarted (cancel it first)",
                    info.status
                ),
            ));
        }
        let Some(keep) = info.steps.iter().find(|s| s.name == step).map(|s| s.seq) else {
            let names: Vec<&str> = info.steps.iter().map(|s| s.name.as_str()).collect();
            return Err(Error::invalid(
                "step",
                format!(
                    "run {run} has no step {:?}; its steps are {names:?}",
                    crate::error::excerpt(step)
                ),
            ));
        };
        let old = &info.run;
        let mut options = WorkflowOptions {
            queue: old.queue.clone(),
            ..WorkflowOptions::default()
        };
        if let Some(d) = old.deadline {
            options.timeout = (d - old.created_at).to_std().ok();
        }
        let spec = NewRunSpec {
            name: "",
            version: old.version,
            options,
            input: old.input.to_string(),
            workflow_id: old.workflow_id.clone(),
            parent_id: old.parent_id,
        };
        let mut new = spec.build()?;
        new.name = old.name.clone();
        new.job.kind = Some(crate::workflow::job_kind(&old.name));
        Ok(self.store().workflow_restart(run, keep, &new).await?.id)
    }

    /// Lists runs, newest first, without their steps.
    pub async fn list_workflows(&self, filter: &RunFilter) -> Result<Vec<RunInfo>> {
        self.store().workflow_list(filter).await
    }
}

fn no_answer() -> Error {
    Error::CorruptRow {
        id: String::new(),
        reason: "a start answered no run".to_owned(),
    }
}
