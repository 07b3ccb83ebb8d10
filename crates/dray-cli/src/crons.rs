//! `dray crons`: list schedules with their next fire times, pause, resume, trigger, history.

use clap::Subcommand;
use dray::cron::{CronExpr, TickStatus};
use dray::{Client, CronStore};
use serde_json::json;

use crate::{CliResult, print_json};

#[derive(Subcommand, Debug)]
pub(crate) enum CronsCommand {
    /// List schedules, with their next fire time in their zone and in UTC.
    List,
    /// Pause a schedule: no tick fires until it is resumed.
    Pause {
        /// Schedule name.
        name: String,
    },
    /// Resume a paused schedule (ticks while it was paused are not run).
    Resume {
        /// Schedule name.
        name: String,
    },
    /// Run a schedule's target now, outside its schedule.
    Trigger {
        /// Schedule name.
        name: String,
    },
    /// A schedule's ticks, newest first: fired, skipped (and why) or triggered, with how each
    /// run ended.
    History {
        /// Schedule name.
        name: String,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

pub(crate) fn validate(cmd: &CronsCommand) -> CliResult<()> {
    if let CronsCommand::History { limit, .. } = cmd
        && (*limit == 0 || *limit > 10_000)
    {
        return Err(dray::Error::invalid("--limit", "must be 1 to 10000").into());
    }
    Ok(())
}

pub(crate) async fn crons_command<S: CronStore>(
    c: &Client<S>,
    cmd: &CronsCommand,
    json_out: bool,
) -> CliResult<()> {
    match cmd {
        CronsCommand::List => {
            let all = c.schedules().await?;
            if json_out {
                let rows: Vec<_> = all
                    .iter()
                    .map(|(s, next)| json!({ "schedule": s, "next": next }))
                    .collect();
                print_json(&rows);
            } else if all.is_empty() {
                out!("no schedules");
            } else {
                out!(
                    "{:<24} {:<18} {:<18} {:<8} {:<31} next (UTC)",
                    "schedule",
                    "expression",
                    "timezone",
                    "state",
                    "next (its zone)"
                );
                for (s, next) in &all {
                    let state = if !s.enabled {
                        "disabled"
                    } else if s.paused {
                        "paused"
                    } else {
                        "active"
                    };
                    let local = match (next, CronExpr::parse(&s.spec.expression, &s.spec.timezone))
                    {
                        (Some(n), Ok(e)) => e.local(*n),
                        _ => "-".into(),
                    };
                    out!(
                        "{:<24} {:<18} {:<18} {:<8} {:<31} {}",
                        s.spec.name,
                        s.spec.expression,
                        s.spec.timezone,
                        state,
                        local,
                        next.map(|n| n.format("%Y-%m-%d %H:%M:%S").to_string())
                            .unwrap_or_else(|| "-".into())
                    );
                }
            }
        }
        CronsCommand::Pause { name } => {
            c.pause_schedule(name).await?;
            if json_out {
                print_json(&json!({ "schedule": name, "paused": true }));
            } else {
                out!("paused {name}: no tick fires until `dray crons resume {name}`");
            }
        }
        CronsCommand::Resume { name } => {
            c.resume_schedule(name).await?;
            if json_out {
                print_json(&json!({ "schedule": name, "paused": false }));
            } else {
                out!("resumed {name}");
            }
        }
        CronsCommand::Trigger { name } => {
            let id = c.trigger_schedule(name).await?;
            if json_out {
                print_json(&json!({ "schedule": name, "job": id }));
            } else {
                out!("triggered {name}: job {id}");
            }
        }
        CronsCommand::History { name, limit } => {
            let ticks = c.schedule_history(name, *limit).await?;
            if json_out {
                print_json(&ticks);
            } else if ticks.is_empty() {
                out!("{name} has no ticks yet");
            } else {
                out!(
                    "{:<24} {:<10} {:<10} {:>9}  detail",
                    "tick (UTC)",
                    "status",
                    "job",
                    "took"
                );
                for t in &ticks {
                    let detail = match t.status {
                        TickStatus::Skipped => t.reason.clone().unwrap_or_default(),
                        _ => t
                            .error
                            .clone()
                            .map(|e| format!("error: {e}"))
                            .or(t.job_id.map(|id| id.to_string()))
                            .unwrap_or_default(),
                    };
                    out!(
                        "{:<24} {:<10} {:<10} {:>9}  {}",
                        t.tick.format("%Y-%m-%d %H:%M:%S"),
                        t.status.as_str(),
                        t.job_state.map(|s| s.as_str()).unwrap_or("-"),
                        t.duration_ms.map(|d| format!("{d}ms")).unwrap_or_default(),
                        detail
                    );
                }
            }
        }
    }
    Ok(())
}
