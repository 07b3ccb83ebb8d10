//! Durable workflows: multi-step runs whose steps are memoized, that sleep for days, wait for
//! signals, expose query state, compensate on failure, start child runs, and survive crashes of
//! every process.
//!
//! A run is a row of its own plus its history of step records, driven by a job whose id is the
//! run's: claims, leases, fencing, rescue, retries and wake-ups are the ones jobs have. Each
//! resume claims the run's job, replays the body from the top (completed steps return their
//! records), and ends completed, failed, or suspended (sleeping or waiting), holding no worker
//! slot while suspended. See the workflows guide (`docs/workflows.md`).

mod client;
mod context;
pub(crate) mod engine;
pub mod store;
pub mod types;

use std::future::Future;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

pub use client::{StartOptions, WorkflowHandle};
pub use context::{ChildRun, RUNNING_MARK, Step, StepOptions, WorkflowContext, WorkflowError};
pub use store::WorkflowStore;
pub use types::{
    ChildOutcome, LoadBuilder, LoadedRun, NewRun, PendingSignal, RunCancel, RunFilter, RunInfo,
    RunOp, RunRow, RunStarted, RunStatus, RunWrite, StepKind, StepRecord, StepStatus, StepWrite,
};

pub(crate) use engine::WorkflowEngine;

use crate::job::RetryPolicy;
use crate::types::{NewMessage, Priority, QueueName, RunAt};

/// Default queue of workflow runs.
pub const DEFAULT_WORKFLOW_QUEUE: &str = "workflows";

/// Default attempts of a run: a transient failure resumes it from its last completed step, up
/// to this many times in all.
pub const DEFAULT_WORKFLOW_ATTEMPTS: i32 = 25;

/// The job kind that drives runs of workflow `name`.
pub fn job_kind(name: &str) -> String {
    format!("workflow:{name}")
}

/// A durable workflow: a named, versioned body of steps.
///
/// ```
/// use dray_core::workflow::{Workflow, WorkflowContext, WorkflowError};
///
/// struct Greet;
///
/// impl Workflow for Greet {
///     const NAME: &'static str = "greet";
///     type Input = String;
///     type Output = String;
///     async fn run(&self, ctx: &WorkflowContext, name: String) -> Result<String, WorkflowError> {
///         let greeting = ctx.step("compose", || async { Ok(format!("hello {name}")) }).await?;
///         ctx.sleep(std::time::Duration::from_secs(1)).await?;
///         Ok(greeting)
///     }
/// }
/// ```
pub trait Workflow: Send + Sync + 'static {
    /// Stable name: stored with every run.
    const NAME: &'static str;
    /// The version of this code. A run records the version it started with and only a worker
    /// that registered that version resumes it (register several side by side while old runs
    /// finish).
    const VERSION: i32 = 1;
    /// What a run is given.
    type Input: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// What a run produces.
    type Output: Serialize + DeserializeOwned + Send + 'static;

    /// Default options.
    fn options() -> WorkflowOptions {
        WorkflowOptions::default()
    }

    /// The body, replayed from the top on every resume.
    fn run(
        &self,
        ctx: &WorkflowContext,
        input: Self::Input,
    ) -> impl Future<Output = Result<Self::Output, WorkflowError>> + Send;
}

/// A workflow's options.
#[derive(Clone, Debug)]
pub struct WorkflowOptions {
    /// Queue its runs' jobs go to ([`DEFAULT_WORKFLOW_QUEUE`]).
    pub queue: String,
    /// Priority of its runs' jobs.
    pub priority: Priority,
    /// Whole-run timeout, from the start: a run still going then stops at its next step
    /// boundary, compensates, and ends `timed_out` (or `compensated`).
    pub timeout: Option<Duration>,
    /// Retries of the run after transient failures (each resumes from the last completed step).
    pub retry: RetryPolicy,
}

impl Default for WorkflowOptions {
    fn default() -> Self {
        WorkflowOptions {
            queue: DEFAULT_WORKFLOW_QUEUE.into(),
            priority: Priority::NORMAL,
            timeout: None,
            retry: RetryPolicy {
                max_attempts: DEFAULT_WORKFLOW_ATTEMPTS,
                ..RetryPolicy::default()
            },
        }
    }
}

/// Everything a start needs besides the store: built from a workflow type and an input.
#[derive(Clone, Debug)]
pub(crate) struct NewRunSpec {
    pub(crate) name: &'static str,
    pub(crate) version: i32,
    pub(crate) options: WorkflowOptions,
    pub(crate) input: String,
    pub(crate) workflow_id: String,
    pub(crate) parent_id: Option<Uuid>,
}

impl NewRunSpec {
    pub(crate) fn of<W: Workflow>(
        input: String,
        workflow_id: String,
        parent: Option<Uuid>,
    ) -> Self {
        NewRunSpec {
            name: W::NAME,
            version: W::VERSION,
            options: W::options(),
            input,
            workflow_id,
            parent_id: parent,
        }
    }

    /// The run row and its job, with a new id.
    pub(crate) fn build(&self) -> crate::Result<NewRun> {
        let id = Uuid::now_v7();
        let queue = QueueName::new(self.options.queue.clone())?;
        check_workflow_id(&self.workflow_id)?;
        let retry = self.options.retry;
        if retry.max_attempts < 1 {
            return Err(crate::Error::invalid(
                "retry.max_attempts",
                "must be at least 1",
            ));
        }
        if let Some(t) = self.options.timeout {
            crate::duration::check_span("timeout", t, Duration::from_millis(1))?;
        }
        Ok(NewRun {
            id,
            name: self.name.to_owned(),
            version: self.version,
            workflow_id: if self.workflow_id.is_empty() {
                id.to_string()
            } else {
                self.workflow_id.clone()
            },
            input: self.input.clone(),
            timeout: self.options.timeout,
            parent_id: self.parent_id,
            job: NewMessage {
                id,
                queue,
                kind: Some(job_kind(self.name)),
                key: None,
                payload: "null".to_owned(),
                // The span that starts the run parents every attempt of its driving job.
                headers: crate::trace::headers_json(&Default::default())?,
                priority: self.options.priority,
                run_at: RunAt::Now,
                enqueued_at: None,
                max_attempts: retry.max_attempts,
                callback_url: None,
            },
        })
    }
}

/// Longest accepted workflow id, in bytes.
pub const MAX_WORKFLOW_ID: usize = 512;

fn check_workflow_id(id: &str) -> crate::Result<()> {
    if id.len() > MAX_WORKFLOW_ID {
        return Err(crate::Error::invalid(
            "workflow_id",
            format!(
                "{} bytes is longer than the {MAX_WORKFLOW_ID} allowed",
                id.len()
            ),
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(crate::Error::invalid(
            "workflow_id",
            "it holds control characters; use printable text",
        ));
    }
    Ok(())
}
