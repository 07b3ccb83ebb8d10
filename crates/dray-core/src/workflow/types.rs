//! The values of the workflow layer that cross the store seam: runs, their statuses, step
//! records, and the batched writes a worker makes while it drives runs.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::types::{MessageState, NewMessage};

/// Where a workflow run stands.
///
/// `queued → running → completed`, suspended on the way as `sleeping` (a durable sleep) or
/// `waiting` (for a signal or a child run). A run that fails permanently, times out or is
/// cancelled runs the compensations of its completed steps (`compensating`) and ends
/// `compensated`; without compensations it ends `failed`, `timed_out` or `cancelled`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum RunStatus {
    /// Due, waiting for a worker.
    Queued,
    /// A worker is replaying it now.
    Running,
    /// In a durable sleep: due again at its wake time.
    Sleeping,
    /// Waiting for a signal or for a child run (pgqrs "Paused").
    Waiting,
    /// Finished with an output. Terminal.
    Completed,
    /// Failed permanently (or ran out of attempts). Terminal.
    Failed,
    /// Cancelled. Terminal.
    Cancelled,
    /// Ran past its whole-run timeout. Terminal.
    TimedOut,
    /// Running the compensations of its completed steps, newest first.
    Compensating,
    /// Its compensations ran after it failed, timed out or was cancelled. Terminal.
    Compensated,
}

impl RunStatus {
    /// Every status.
    pub const ALL: [RunStatus; 10] = [
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Sleeping,
        RunStatus::Waiting,
        RunStatus::Completed,
        RunStatus::Failed,
        RunStatus::Cancelled,
        RunStatus::TimedOut,
        RunStatus::Compensating,
        RunStatus::Compensated,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Sleeping => "sleeping",
            RunStatus::Waiting => "waiting",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::TimedOut => "timed_out",
            RunStatus::Compensating => "compensating",
            RunStatus::Compensated => "compensated",
        }
    }

    /// Parses a stored (or typed) status name.
    pub fn parse(s: &str) -> Result<RunStatus> {
        RunStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(
                    "run status",
                    format!(
                        "{:?} is not one of queued, running, sleeping, waiting, completed, failed, cancelled, timed_out, compensating, compensated",
                        crate::error::excerpt(s)
                    ),
                )
            })
    }

    /// True for `completed`, `failed`, `cancelled`, `timed_out` and `compensated`.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Completed
                | RunStatus::Failed
                | RunStatus::Cancelled
                | RunStatus::TimedOut
                | RunStatus::Compensated
        )
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a step stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum StepStatus {
    /// Known but not done: a sleep before its wake time, a wait for a signal or a child.
    Pending,
    /// Started and not finished (recorded for steps that run longer than a moment, and by
    /// [`crate::workflow::WorkflowContext::record_step_start`]).
    Running,
    /// Done; its output is stored and every replay returns it.
    Completed,
    /// Failed permanently; every replay returns the same error.
    Failed,
}

impl StepStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Running => "running",
            StepStatus::Completed => "completed",
            StepStatus::Failed => "failed",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Result<StepStatus> {
        [
            StepStatus::Pending,
            StepStatus::Running,
            StepStatus::Completed,
            StepStatus::Failed,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
        .ok_or_else(|| {
            Error::invalid(
                "step status",
                format!(
                    "{:?} is not one of pending, running, completed, failed",
                    crate::error::excerpt(s)
                ),
            )
        })
    }
}

impl fmt::Display for StepStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a history record stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum StepKind {
    /// `ctx.step(…)` or the explicit step API.
    Step,
    /// `ctx.sleep(…)` / `ctx.sleep_until(…)`.
    Sleep,
    /// `ctx.wait_for_signal(…)`.
    Signal,
    /// `ctx.start_child(…)`: the output is the child's run id.
    Child,
    /// `ctx.wait_child(…)`: the output is the child's output.
    ChildResult,
}

impl StepKind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Step => "step",
            StepKind::Sleep => "sleep",
            StepKind::Signal => "signal",
            StepKind::Child => "child",
            StepKind::ChildResult => "child_result",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Result<StepKind> {
        [
            StepKind::Step,
            StepKind::Sleep,
            StepKind::Signal,
            StepKind::Child,
            StepKind::ChildResult,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
        .ok_or_else(|| {
            Error::invalid(
                "step kind",
                format!(
                    "{:?} is not one of step, sleep, signal, child, child_result",
                    crate::error::excerpt(s)
                ),
            )
        })
    }
}

impl fmt::Display for StepKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One record of a run's history, in the order the body reached it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StepRecord {
    /// Position in the history, from 0.
    pub seq: i32,
    /// What it stands for.
    pub kind: StepKind,
    /// The step's name; the second and later steps of one name in a run carry an ordinal
    /// (`charge#2`), so loops work.
    pub name: String,
    /// Where it stands.
    pub status: StepStatus,
    /// The stored output (JSON), once completed.
    pub output: Option<serde_json::Value>,
    /// The error of a failed step, or of the last failed try of a completed one.
    pub error: Option<String>,
    /// Tries made.
    pub attempts: i32,
    /// When it started (database clock).
    pub started_at: Option<DateTime<Utc>>,
    /// When it finished (database clock).
    pub finished_at: Option<DateTime<Utc>>,
    /// A sleep's wake time, or a wait's timeout.
    pub wake_at: Option<DateTime<Utc>>,
    /// When its compensation ran, if it has one and the run compensated.
    pub compensated_at: Option<DateTime<Utc>>,
}

/// A signal sent to a run and not yet consumed by a wait.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PendingSignal {
    /// The signal's id (UUIDv7: sending order).
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// Its payload.
    pub payload: serde_json::Value,
}

/// A run as its stored row has it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunRow {
    /// The run's id (also the id of the job that drives it).
    pub id: Uuid,
    /// The workflow's name.
    pub name: String,
    /// The workflow version the run was started with.
    pub version: i32,
    /// The caller's stable id for it (unique per workflow name).
    pub workflow_id: String,
    /// The queue its driving job runs on.
    pub queue: String,
    /// Its input.
    pub input: serde_json::Value,
    /// Its status, as stored (see [`RunInfo::status`] for the one to show).
    pub status: RunStatus,
    /// Why it is compensating or compensated: `failed`, `timed_out` or `cancelled`.
    pub end_reason: Option<RunStatus>,
    /// The output of a completed run.
    pub output: Option<serde_json::Value>,
    /// The error that ended it, or the last transient one.
    pub error: Option<String>,
    /// The signal a waiting run waits for.
    pub wait_signal: Option<String>,
    /// Why it is not progressing, when Dray knows (no worker runs its version).
    pub note: Option<String>,
    /// When the whole-run timeout ends it.
    pub deadline: Option<DateTime<Utc>>,
    /// When a cancel was asked for.
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// The run that started it as a child.
    pub parent_id: Option<Uuid>,
    /// The run it restarts (see `Client::restart_from`).
    pub restarted_from: Option<Uuid>,
    /// The run that restarted it.
    pub superseded_by: Option<Uuid>,
    /// When it was started.
    pub created_at: DateTime<Utc>,
    /// When it last changed status.
    pub updated_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// Set when some stored columns of this run (or of its history) could not be read: which,
    /// and what was found. Lists show such a run; a worker does not replay it (its job fails
    /// with this reason) until the row is fixed and the job re-driven.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreadable: Option<String>,
}

impl RunRow {
    /// A run row that could not be read: its id, its name if it read, and why.
    pub fn unreadable(id: Uuid, name: String, reason: String) -> RunRow {
        RunRow {
            id,
            name,
            version: 0,
            workflow_id: String::new(),
            queue: String::new(),
            input: serde_json::Value::Null,
            status: RunStatus::Failed,
            end_reason: None,
            output: None,
            error: None,
            wait_signal: None,
            note: None,
            deadline: None,
            cancel_requested_at: None,
            parent_id: None,
            restarted_from: None,
            superseded_by: None,
            created_at: DateTime::<Utc>::UNIX_EPOCH,
            updated_at: DateTime::<Utc>::UNIX_EPOCH,
            finished_at: None,
            unreadable: Some(reason),
        }
    }
}

/// A run with its history, as a worker loads it to replay it.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedRun {
    /// The row.
    pub run: RunRow,
    /// Its history, by `seq`.
    pub steps: Vec<StepRecord>,
    /// Signals sent and not consumed, oldest first.
    pub signals: Vec<PendingSignal>,
    /// For each child this run waits for (`ctx.wait_child`) and that has ended: its id,
    /// status, output and error. Only children that ended are listed.
    pub children: Vec<ChildOutcome>,
}

/// Puts loaded runs together from a store's rows: the runs, then their history records,
/// pending signals and ended children, each already decoded. A record that did not decode
/// marks its run unreadable (so the replay refuses it, naming the column) instead of failing
/// the whole batch.
#[derive(Debug, Default)]
pub struct LoadBuilder {
    runs: std::collections::HashMap<Uuid, LoadedRun>,
}

impl LoadBuilder {
    /// A run row (or a salvaged, unreadable one).
    pub fn run(&mut self, run: RunRow) {
        self.runs.insert(
            run.id,
            LoadedRun {
                run,
                steps: Vec::new(),
                signals: Vec::new(),
                children: Vec::new(),
            },
        );
    }

    fn of(&mut self, run: Uuid, item: Result<()>) {
        if let (Err(e), Some(l)) = (item, self.runs.get_mut(&run)) {
            l.run.unreadable = Some(e.to_string());
        }
    }

    /// A history record of `run`, in `seq` order.
    pub fn step(&mut self, run: Uuid, rec: Result<StepRecord>) {
        let rec = rec.map(|r| {
            if let Some(l) = self.runs.get_mut(&run) {
                l.steps.push(r);
            }
        });
        self.of(run, rec);
    }

    /// A pending signal of `run`, oldest first.
    pub fn signal(&mut self, run: Uuid, sig: Result<PendingSignal>) {
        let sig = sig.map(|s| {
            if let Some(l) = self.runs.get_mut(&run) {
                l.signals.push(s);
            }
        });
        self.of(run, sig);
    }

    /// An ended child of `parent`.
    pub fn child(&mut self, parent: Uuid, child: Result<ChildOutcome>) {
        let child = child.map(|c| {
            if let Some(l) = self.runs.get_mut(&parent) {
                l.children.push(c);
            }
        });
        self.of(parent, child);
    }

    /// The runs, in the order of `ids` (unknown ids left out).
    pub fn finish(mut self, ids: &[Uuid]) -> Vec<LoadedRun> {
        ids.iter().filter_map(|id| self.runs.remove(id)).collect()
    }
}

/// How a child run ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChildOutcome {
    /// The child.
    pub id: Uuid,
    /// Its terminal status.
    pub status: RunStatus,
    /// Its output, when completed.
    pub output: Option<serde_json::Value>,
    /// Its error otherwise.
    pub error: Option<String>,
}

/// A run as `describe` shows it: the row, the status to show (derived from the row and its
/// driving job), the job's attempt, and (for `describe`, not for lists) the history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunInfo {
    /// The stored row.
    pub run: RunRow,
    /// The status to show: `running` while a worker holds it, `queued` when due again.
    pub status: RunStatus,
    /// The driving job's state, while the run is unfinished.
    pub job_state: Option<MessageState>,
    /// Attempts of the driving job (transient failures add one).
    pub attempt: i32,
    /// The history, by `seq` (empty in lists).
    pub steps: Vec<StepRecord>,
}

impl RunInfo {
    /// A run as read with its driving job's state and attempt (a stored state this build does
    /// not know reads as none).
    pub fn new(
        run: RunRow,
        job_state: Option<&str>,
        attempt: Option<i32>,
        steps: Vec<StepRecord>,
    ) -> RunInfo {
        let job_state = job_state.and_then(|s| MessageState::parse(s).ok());
        RunInfo {
            status: RunInfo::derive_status(run.status, job_state),
            job_state,
            attempt: attempt.unwrap_or(0),
            run,
            steps,
        }
    }

    /// The status to show, from the stored one and the driving job's state.
    pub fn derive_status(stored: RunStatus, job: Option<MessageState>) -> RunStatus {
        if stored.is_terminal() {
            return stored;
        }
        match (stored, job) {
            (RunStatus::Compensating, _) => RunStatus::Compensating,
            (_, Some(MessageState::Running)) => RunStatus::Running,
            (RunStatus::Sleeping | RunStatus::Waiting, Some(MessageState::Scheduled)) => stored,
            (_, Some(MessageState::Dead)) => RunStatus::Failed,
            (_, Some(MessageState::Cancelled)) => RunStatus::Cancelled,
            _ => RunStatus::Queued,
        }
    }
}

/// A run to start: its row and the job that drives it.
#[derive(Clone, Debug)]
pub struct NewRun {
    /// The run id, also the driving job's id (UUIDv7).
    pub id: Uuid,
    /// Workflow name.
    pub name: String,
    /// Workflow version.
    pub version: i32,
    /// Stable id: a second start with the same (name, workflow_id) returns the first run.
    pub workflow_id: String,
    /// Input, serialized JSON.
    pub input: String,
    /// When the whole-run timeout ends it, from the start (database clock).
    pub timeout: Option<std::time::Duration>,
    /// The parent run, for a child.
    pub parent_id: Option<Uuid>,
    /// The driving job (its id is `id`, its kind `workflow:<name>`).
    pub job: NewMessage,
}

/// What one start did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunStarted {
    /// The run: new, or the one already started with this workflow id.
    pub id: Uuid,
    /// True when a run with this (name, workflow_id) existed and nothing was started.
    pub existing: bool,
}

/// Which runs to list.
#[derive(Clone, Debug, Default)]
pub struct RunFilter {
    /// Only this workflow.
    pub name: Option<String>,
    /// Only this stored status (`running` and `queued` both match unfinished runs that are
    /// neither sleeping nor waiting).
    pub status: Option<RunStatus>,
    /// Only the children of this run.
    pub parent_id: Option<Uuid>,
    /// Only ids before this one (paging; newest first).
    pub before: Option<Uuid>,
    /// At most this many (default 100, at most 10,000).
    pub limit: u32,
}

/// What a cancel did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum RunCancel {
    /// Asked: the run stops at its next step boundary, then compensates. `runs` counts it
    /// and its unfinished descendants.
    Requested {
        /// Runs asked to stop (the run and its unfinished children, grandchildren…).
        runs: u64,
    },
    /// It had already ended in this status; nothing changed.
    AlreadyFinished(RunStatus),
}

/// One write a worker makes about a run it holds, fenced by the driving job's attempt.
#[derive(Clone, Debug)]
pub struct RunWrite {
    /// The run (and driving job).
    pub run: Uuid,
    /// The attempt of the driving job that makes the write; refused once it is not current.
    pub attempt: i32,
    /// What to write.
    pub op: RunOp,
}

/// A step record as written.
#[derive(Clone, Debug)]
pub struct StepWrite {
    /// Position.
    pub seq: i32,
    /// Kind.
    pub kind: StepKind,
    /// Name (with its ordinal).
    pub name: String,
    /// Status.
    pub status: StepStatus,
    /// Output, serialized JSON.
    pub output: Option<String>,
    /// Error.
    pub error: Option<String>,
    /// Tries made.
    pub attempts: i32,
    /// Started (database clock).
    pub started_at: Option<DateTime<Utc>>,
    /// Finished (database clock).
    pub finished_at: Option<DateTime<Utc>>,
    /// Wake time or wait timeout.
    pub wake_at: Option<DateTime<Utc>>,
    /// The signal this record consumed.
    pub consumes: Option<Uuid>,
}

/// What a [`RunWrite`] does.
#[derive(Clone, Debug)]
pub enum RunOp {
    /// Inserts or updates a step record (a completed record is never overwritten).
    Step(StepWrite),
    /// Sets a query value (`ctx.set_state`).
    State {
        /// Key.
        key: String,
        /// Value, serialized JSON.
        value: String,
    },
    /// Notes that the compensation of step `seq` ran.
    Compensated {
        /// The step.
        seq: i32,
    },
    /// Marks the run as compensating, for `reason` (`failed`, `timed_out`, `cancelled`).
    Compensating {
        /// Why.
        reason: RunStatus,
        /// The error that ended it.
        error: Option<String>,
    },
    /// Suspends the run: its job gives its lease back (uncounted) and is due again at
    /// `wake_at` (never when `None`, until a signal or a child wakes it). A wait whose signal
    /// already arrived, or whose child already ended, is due at once instead.
    Suspend {
        /// The record of the sleep or wait, written first.
        record: StepWrite,
        /// `sleeping` or `waiting`.
        status: RunStatus,
        /// When it is due again.
        wake_at: Option<DateTime<Utc>>,
        /// The signal it waits for.
        signal: Option<String>,
        /// The child it waits for.
        child: Option<Uuid>,
    },
    /// Ends the run in `status`, and its driving job with it (completed); wakes the parent.
    Finish {
        /// Terminal status.
        status: RunStatus,
        /// Output, serialized JSON.
        output: Option<String>,
        /// Error.
        error: Option<String>,
        /// The parent to wake.
        parent: Option<Uuid>,
    },
    /// Marks the run as due again after a transient failure, with the error (the driving job
    /// records the failed attempt itself).
    Retrying {
        /// The error.
        error: String,
    },
}

/// Far in the future: the due time of a wait without a timeout (a signal or a child wakes it).
pub fn never() -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp(253_370_764_800, 0).unwrap_or(DateTime::<Utc>::MAX_UTC) // 9999-01-01
}
