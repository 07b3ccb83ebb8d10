//! The values of the cron layer that cross the store seam.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::types::{MessageState, NewMessage};
use crate::workflow::NewRun;

/// What a tick of a schedule does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "target", rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum CronTarget {
    /// Runs the `#[dray::cron]` handler of the schedule's name (job kind `cron:<name>`).
    Handler,
    /// Enqueues a job of this kind, with the schedule's payload as its input.
    Job {
        /// The job kind (a `Job::NAME`).
        kind: String,
    },
    /// Starts a run of this workflow, with the schedule's payload as its input and the tick in
    /// its workflow id.
    Workflow {
        /// The workflow's name.
        name: String,
        /// Its version.
        version: i32,
    },
}

/// What a tick does while the previous run of its schedule is still going.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Overlap {
    /// Skip the tick and record the skip (the default).
    #[default]
    Skip,
    /// Run them side by side.
    Allow,
}

impl Overlap {
    /// `skip` or `allow`.
    pub fn as_str(self) -> &'static str {
        match self {
            Overlap::Skip => "skip",
            Overlap::Allow => "allow",
        }
    }
    /// Parses `skip` or `allow`.
    pub fn parse(s: &str) -> Result<Overlap> {
        match s {
            "skip" => Ok(Overlap::Skip),
            "allow" => Ok(Overlap::Allow),
            other => Err(Error::invalid(
                "overlap",
                format!("{:?} is not skip or allow", crate::error::excerpt(other)),
            )),
        }
    }
}

/// A schedule as declared (in code, or at run time through the client).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScheduleSpec {
    /// Unique name.
    pub name: String,
    /// The cron expression.
    pub expression: String,
    /// Its IANA time zone.
    pub timezone: String,
    /// What a tick does.
    pub target: CronTarget,
    /// The input of a job or workflow target (JSON).
    pub payload: serde_json::Value,
    /// The queue its jobs (or runs) go to.
    pub queue: String,
    /// Attempts of each tick's job.
    pub max_attempts: i32,
    /// Run missed ticks after downtime, oldest first.
    pub catch_up: bool,
    /// At most this many missed ticks (the most recent) when catching up.
    pub catch_up_limit: u32,
    /// A tick while the previous run is still going.
    pub overlap: Overlap,
}

impl ScheduleSpec {
    /// A schedule that enqueues a job of `kind` on every tick of `expression` (UTC, queue
    /// `default`, payload `null`, 25 attempts, no catch-up, overlapping ticks skipped); adjust
    /// it with the methods below.
    ///
    /// ```
    /// use dray_core::cron::ScheduleSpec;
    /// let spec = ScheduleSpec::job("nightly-export", "0 2 * * *", "export_users")
    ///     .timezone("Europe/Berlin")
    ///     .payload(serde_json::json!({ "format": "csv" }))
    ///     .catch_up(3);
    /// ```
    pub fn job(
        name: impl Into<String>,
        expression: impl Into<String>,
        kind: impl Into<String>,
    ) -> Self {
        ScheduleSpec {
            name: name.into(),
            expression: expression.into(),
            timezone: "UTC".into(),
            target: CronTarget::Job { kind: kind.into() },
            payload: serde_json::Value::Null,
            queue: crate::job::DEFAULT_JOB_QUEUE.into(),
            max_attempts: crate::job::DEFAULT_JOB_ATTEMPTS,
            catch_up: false,
            catch_up_limit: 1,
            overlap: Overlap::Skip,
        }
    }

    /// A schedule that starts a run of workflow `W` on every tick (queue `workflows`; the
    /// payload is the run's input).
    pub fn workflow<W: crate::workflow::Workflow>(
        name: impl Into<String>,
        expression: impl Into<String>,
    ) -> Self {
        ScheduleSpec {
            target: CronTarget::Workflow {
                name: W::NAME.into(),
                version: W::VERSION,
            },
            queue: W::options().queue,
            ..ScheduleSpec::job(name, expression, "")
        }
    }

    /// Sets the IANA time zone.
    pub fn timezone(mut self, zone: impl Into<String>) -> Self {
        self.timezone = zone.into();
        self
    }
    /// Sets the target's input.
    pub fn payload(mut self, payload: serde_json::Value) -> Self {
        self.payload = payload;
        self
    }
    /// Sets the queue.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }
    /// Runs up to `limit` missed ticks after downtime.
    pub fn catch_up(mut self, limit: u32) -> Self {
        self.catch_up = true;
        self.catch_up_limit = limit;
        self
    }
    /// Sets what a tick does while the previous run is still going.
    pub fn overlap(mut self, overlap: Overlap) -> Self {
        self.overlap = overlap;
        self
    }
    /// Sets the attempts of each tick's job.
    pub fn max_attempts(mut self, n: i32) -> Self {
        self.max_attempts = n;
        self
    }
}

/// A stored schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScheduleRow {
    /// The definition.
    #[serde(flatten)]
    pub spec: ScheduleSpec,
    /// `code` (declared by a worker's `register_cron`) or `api` (made through the client).
    pub source: String,
    /// False once no worker declares it any more (its history is kept).
    pub enabled: bool,
    /// Paused by an operator.
    pub paused: bool,
    /// The last tick handled (fired or skipped): the next one is after it.
    pub last_tick: DateTime<Utc>,
    /// The job (or run) of the last fired tick.
    pub last_job: Option<Uuid>,
    /// When it was first stored.
    pub created_at: DateTime<Utc>,
    /// When its definition last changed.
    pub updated_at: DateTime<Utc>,
}

/// How a tick ended up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum TickStatus {
    /// Its job (or run) was enqueued.
    Fired,
    /// It was not run: missed during downtime without catch-up (or beyond the catch-up
    /// limit), or the previous run was still going (`overlap = skip`).
    Skipped,
    /// Run by hand (`trigger`), outside the schedule.
    Triggered,
}

impl TickStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            TickStatus::Fired => "fired",
            TickStatus::Skipped => "skipped",
            TickStatus::Triggered => "triggered",
        }
    }
    /// Parses a stored name.
    pub fn parse(s: &str) -> Result<TickStatus> {
        match s {
            "fired" => Ok(TickStatus::Fired),
            "skipped" => Ok(TickStatus::Skipped),
            "triggered" => Ok(TickStatus::Triggered),
            other => Err(Error::invalid(
                "tick status",
                format!(
                    "{:?} is not fired, skipped or triggered",
                    crate::error::excerpt(other)
                ),
            )),
        }
    }
}

impl fmt::Display for TickStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One tick of a schedule's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TickRow {
    /// The schedule.
    pub schedule: String,
    /// The tick's scheduled time.
    pub tick: DateTime<Utc>,
    /// Fired, skipped or triggered.
    pub status: TickStatus,
    /// Why it was skipped.
    pub reason: Option<String>,
    /// The job (or workflow run) it made.
    pub job_id: Option<Uuid>,
    /// When a scheduler recorded it (database clock).
    pub recorded_at: DateTime<Utc>,
    /// That job's state now (`None` once pruned, or for a workflow run's job still running).
    pub job_state: Option<MessageState>,
    /// When the job finished.
    pub finished_at: Option<DateTime<Utc>>,
    /// Time from the tick to the job's end.
    pub duration_ms: Option<i64>,
    /// The job's last error.
    pub error: Option<String>,
}

/// A tick to fire: its time and the job or run it makes.
#[derive(Clone, Debug)]
pub struct TickFire {
    /// The tick's scheduled time.
    pub tick: DateTime<Utc>,
    /// The job to enqueue (handler and job targets).
    pub job: Option<NewMessage>,
    /// The run to start (workflow targets).
    pub run: Option<NewRun>,
}

/// What a scheduler asks a store to do about one schedule, in one transaction.
#[derive(Clone, Debug)]
pub struct CronFire {
    /// The schedule.
    pub schedule: String,
    /// Ticks to fire, oldest first: each is recorded once (a tick another scheduler recorded
    /// already is left alone, so every tick fires exactly once), and with `overlap = skip`
    /// recorded as skipped instead while the schedule's previous job is unfinished.
    pub fire: Vec<TickFire>,
    /// Ticks to record as skipped, with why.
    pub skip: Vec<(DateTime<Utc>, String)>,
    /// Skip instead of firing while the previous job is unfinished.
    pub overlap: Overlap,
    /// The schedule's last handled tick becomes at least this.
    pub advance_to: DateTime<Utc>,
    /// Ticks run by hand (`trigger`): recorded as triggered, never skipped for overlap, and
    /// the schedule's last tick stays.
    pub manual: bool,
}

/// What a store records for one tick of a [`CronFire`] (see [`CronFire::decide`]).
#[derive(Clone, Copy, Debug)]
pub struct TickDecision<'a> {
    /// The tick and its work.
    pub fire: &'a TickFire,
    /// Fired, skipped (overlap) or triggered.
    pub status: TickStatus,
    /// Why it is skipped.
    pub reason: Option<&'static str>,
    /// The job (or run) it makes; `None` when skipped.
    pub job: Option<Uuid>,
}

impl CronFire {
    /// What to record for each tick to fire, given whether the schedule's previous job is
    /// unfinished: with `overlap = skip` (and not by hand) every tick is then skipped.
    pub fn decide(&self, previous_unfinished: bool) -> Vec<TickDecision<'_>> {
        let busy = previous_unfinished && !self.manual && self.overlap == Overlap::Skip;
        self.fire
            .iter()
            .map(|fire| {
                let id = fire
                    .job
                    .as_ref()
                    .map(|j| j.id)
                    .or(fire.run.as_ref().map(|r| r.id));
                if busy {
                    TickDecision {
                        fire,
                        status: TickStatus::Skipped,
                        reason: Some("overlap: the previous run of the schedule is still going"),
                        job: None,
                    }
                } else {
                    TickDecision {
                        fire,
                        status: if self.manual {
                            TickStatus::Triggered
                        } else {
                            TickStatus::Fired
                        },
                        reason: None,
                        job: id,
                    }
                }
            })
            .collect()
    }
}

/// What a [`CronFire`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FireReport {
    /// Ticks this call fired, with the job (or run) id.
    pub fired: Vec<(DateTime<Utc>, Uuid)>,
    /// Ticks this call recorded as skipped.
    pub skipped: Vec<DateTime<Utc>>,
}
