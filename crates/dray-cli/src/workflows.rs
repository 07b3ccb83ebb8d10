//! `dray workflows`: list, describe, signal, cancel, wait for and restart workflow runs.

use std::time::Duration;

use clap::Subcommand;
use dray::workflow::{RunCancel, RunFilter, RunInfo, RunStatus, StepStatus};
use dray::{Client, WorkflowStore};
use serde_json::json;
use uuid::Uuid;

use crate::{CliError, CliResult, duration, parse_id, parse_json, print_json};

#[derive(Subcommand, Debug)]
pub(crate) enum WorkflowsCommand {
    /// List runs, newest first.
    List {
        /// Only this workflow.
        #[arg(long)]
        name: Option<String>,
        /// Only this status: queued, running, sleeping, waiting, completed, failed, cancelled,
        /// timed_out, compensating, compensated.
        #[arg(long, value_parser = status)]
        status: Option<RunStatus>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only runs older than this run id (paging).
        #[arg(long)]
        before: Option<String>,
    },
    /// Show one run: status, version, and its step timeline.
    Describe {
        /// Run id, or WORKFLOW_NAME/WORKFLOW_ID.
        run: String,
    },
    /// Send a signal to a run (a wait for it resumes the run; sent early, it is kept).
    Signal {
        /// Run id, or WORKFLOW_NAME/WORKFLOW_ID.
        run: String,
        /// Signal name.
        name: String,
        /// Payload, as JSON (default null).
        #[arg(default_value = "null")]
        payload: String,
    },
    /// Cancel a run and its children: they stop at their next step boundary and compensate.
    Cancel {
        /// Run id, or WORKFLOW_NAME/WORKFLOW_ID.
        run: String,
    },
    /// Print a run's output; with --wait, wait up to that long for it to end.
    Result {
        /// Run id, or WORKFLOW_NAME/WORKFLOW_ID.
        run: String,
        /// How long to wait for the run to end (0s: answer at once).
        #[arg(long, default_value = "0s", value_parser = duration)]
        wait: Duration,
    },
    /// Start a new run of an ended run's workflow, reusing the results of the steps before
    /// --from.
    Restart {
        /// Run id, or WORKFLOW_NAME/WORKFLOW_ID.
        run: String,
        /// The first step to run again.
        #[arg(long)]
        from: String,
    },
}

fn status(s: &str) -> Result<RunStatus, String> {
    RunStatus::parse(s).map_err(|e| e.to_string())
}

/// A run named on the command line: an id, or a workflow name and workflow id.
pub(crate) enum RunRef {
    Id(Uuid),
    Named(String, String),
}

impl RunRef {
    fn parse(s: &str) -> CliResult<RunRef> {
        if let Ok(id) = Uuid::parse_str(s.trim()) {
            return Ok(RunRef::Id(id));
        }
        match s.split_once('/') {
            Some((name, wid)) if !name.is_empty() && !wid.is_empty() => {
                Ok(RunRef::Named(name.to_owned(), wid.to_owned()))
            }
            _ => Err(CliError::BadRun(dray::error::excerpt(s))),
        }
    }

    async fn resolve<S: WorkflowStore>(&self, c: &Client<S>) -> CliResult<Uuid> {
        Ok(match self {
            RunRef::Id(id) => *id,
            RunRef::Named(name, wid) => c.find_workflow(name, wid).await?,
        })
    }
}

/// A workflows command whose arguments have been checked, before the database is opened.
pub(crate) enum WorkflowsValidated {
    List(RunFilter),
    Describe(RunRef),
    Signal(RunRef, String, serde_json::Value),
    Cancel(RunRef),
    Result(RunRef, Duration),
    Restart(RunRef, String),
}

impl WorkflowsValidated {
    pub(crate) fn new(cmd: &WorkflowsCommand) -> CliResult<WorkflowsValidated> {
        Ok(match cmd {
            WorkflowsCommand::List {
                name,
                status,
                limit,
                before,
            } => {
                if *limit == 0 || *limit > 10_000 {
                    return Err(dray::Error::invalid("--limit", "must be 1 to 10000").into());
                }
                WorkflowsValidated::List(RunFilter {
                    name: name.clone(),
                    status: *status,
                    parent_id: None,
                    before: before.as_deref().map(parse_id).transpose()?,
                    limit: *limit,
                })
            }
            WorkflowsCommand::Describe { run } => WorkflowsValidated::Describe(RunRef::parse(run)?),
            WorkflowsCommand::Signal { run, name, payload } => {
                if name.is_empty() {
                    return Err(dray::Error::invalid("signal name", "must not be empty").into());
                }
                WorkflowsValidated::Signal(
                    RunRef::parse(run)?,
                    name.clone(),
                    parse_json("the payload".into(), payload)?,
                )
            }
            WorkflowsCommand::Cancel { run } => WorkflowsValidated::Cancel(RunRef::parse(run)?),
            WorkflowsCommand::Result { run, wait } => {
                WorkflowsValidated::Result(RunRef::parse(run)?, *wait)
            }
            WorkflowsCommand::Restart { run, from } => {
                WorkflowsValidated::Restart(RunRef::parse(run)?, from.clone())
            }
        })
    }
}

pub(crate) async fn workflows_command<S: WorkflowStore>(
    c: &Client<S>,
    cmd: WorkflowsValidated,
    json_out: bool,
) -> CliResult<()> {
    match cmd {
        WorkflowsValidated::List(filter) => {
            let runs = c.list_workflows(&filter).await?;
            if json_out {
                print_json(&runs);
            } else if runs.is_empty() {
                out!("no workflow runs");
            } else {
                out!(
                    "{:<36}  {:<20} {:>3} {:<13} {:<24} started",
                    "run",
                    "workflow",
                    "v",
                    "status",
                    "workflow id"
                );
                for r in &runs {
                    out!(
                        "{:<36}  {:<20} {:>3} {:<13} {:<24} {}",
                        r.run.id,
                        r.run.name,
                        r.run.version,
                        r.status.as_str(),
                        clip(&r.run.workflow_id, 24),
                        r.run.created_at.format("%Y-%m-%d %H:%M:%S")
                    );
                    if let Some(why) = &r.run.unreadable {
                        out!("{:<38}UNREADABLE ROW: {why}", "");
                    }
                }
            }
        }
        WorkflowsValidated::Describe(run) => {
            let info = c.describe(run.resolve(c).await?).await?;
            if json_out {
                print_json(&info);
            } else {
                print_timeline(&info);
            }
        }
        WorkflowsValidated::Signal(run, name, payload) => {
            let id = run.resolve(c).await?;
            let signal = c.signal(id, &name, &payload).await?;
            if json_out {
                print_json(&json!({ "run": id, "signal": signal, "name": name }));
            } else {
                out!("sent signal {name:?} to run {id} (signal {signal})");
            }
        }
        WorkflowsValidated::Cancel(run) => {
            let id = run.resolve(c).await?;
            let outcome = c.cancel_workflow(id).await?;
            if json_out {
                print_json(&json!({ "run": id, "outcome": outcome }));
            } else {
                match outcome {
                    RunCancel::Requested { runs } => out!(
                        "cancel requested for run {id} ({runs} run(s) with its children): it stops at its next step boundary, then compensates"
                    ),
                    RunCancel::AlreadyFinished(s) => {
                        out!("run {id} had already ended ({s}); nothing changed")
                    }
                }
            }
        }
        WorkflowsValidated::Result(run, wait) => {
            let id = run.resolve(c).await?;
            let out: Option<serde_json::Value> = if wait.is_zero() {
                c.workflow_output(id).await?
            } else {
                Some(c.workflow_result(id, wait).await?)
            };
            match out {
                Some(v) if json_out => print_json(&json!({ "run": id, "output": v })),
                Some(v) => out!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
                None if json_out => {
                    print_json(&json!({ "run": id, "output": null, "ended": false }))
                }
                None => out!("run {id} has not ended yet; pass --wait 30s to wait for it"),
            }
        }
        WorkflowsValidated::Restart(run, from) => {
            let id = run.resolve(c).await?;
            let new = c.restart_from(id, &from).await?;
            if json_out {
                print_json(&json!({ "run": new, "restarted_from": id, "from_step": from }));
            } else {
                out!("restarted run {id} from step {from:?} as run {new}");
            }
        }
    }
    Ok(())
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let head: String = s.chars().take(n - 1).collect();
        format!("{head}…")
    }
}

/// Prints a run and its step timeline (also the demo's).
pub(crate) fn print_timeline(info: &RunInfo) {
    let r = &info.run;
    out!(
        "run {}  workflow {} v{}  (workflow id {:?})",
        r.id,
        r.name,
        r.version,
        r.workflow_id
    );
    let mut status = format!("status: {}", info.status);
    if let Some(why) = r.end_reason {
        status.push_str(&format!(" (after it {why})"));
    }
    status.push_str(&format!("   attempt {}", info.attempt));
    out!("{status}");
    if let Some(note) = &r.note {
        out!("note: {note}");
    }
    if let Some(e) = &r.error {
        out!("error: {e}");
    }
    if let Some(from) = r.restarted_from {
        out!("restarted from run {from}");
    }
    if let Some(by) = r.superseded_by {
        out!("restarted as run {by}");
    }
    if let Some(out) = &r.output {
        out!("output: {out}");
    }
    if info.steps.is_empty() {
        out!("no steps yet");
        return;
    }
    let t0 = r.created_at;
    out!(
        "  {:>3}  {:<12} {:<18} {:<10} {:>3}  {:>9}  {:>9}  detail",
        "#",
        "kind",
        "step",
        "status",
        "try",
        "start",
        "took"
    );
    for s in &info.steps {
        let since = |t: Option<chrono::DateTime<chrono::Utc>>| {
            t.map(|t| format!("+{}ms", (t - t0).num_milliseconds().max(0)))
                .unwrap_or_default()
        };
        let took = match (s.started_at, s.finished_at) {
            (Some(a), Some(b)) => format!("{}ms", (b - a).num_milliseconds().max(0)),
            _ => String::new(),
        };
        let mut detail = Vec::new();
        if s.status == StepStatus::Pending
            && let Some(w) = s.wake_at
        {
            detail.push(format!("due {}", w.format("%H:%M:%S%.3f")));
        }
        if let Some(e) = &s.error {
            detail.push(format!("error: {}", clip(e, 60)));
        }
        if let Some(o) = &s.output {
            detail.push(format!("-> {}", clip(&o.to_string(), 40)));
        }
        if s.compensated_at.is_some() {
            detail.push("compensated".into());
        }
        out!(
            "  {:>3}  {:<12} {:<18} {:<10} {:>3}  {:>9}  {:>9}  {}",
            s.seq,
            s.kind.as_str(),
            clip(&s.name, 18),
            s.status.as_str(),
            s.attempts,
            since(s.started_at),
            took,
            detail.join("; ")
        );
    }
}
