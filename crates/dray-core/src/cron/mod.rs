//! Cron schedules: ticks that enqueue a job or start a workflow, in a time zone, exactly once
//! per tick however many workers run the scheduler, with catch-up after downtime and overlap
//! control (Forge's `#[forge::cron]`).
//!
//! Each worker that schedules (one with `register_cron`, or `Worker::schedule_crons`) computes
//! the due ticks of every schedule from its last handled tick up to the database clock's now,
//! and asks the store to fire them. The store records each tick under the primary key
//! (schedule, tick time) in the transaction that enqueues its job: a tick another scheduler
//! recorded first is left alone, so a second run of a tick is impossible by construction.
//! See the crons guide (`docs/crons.md`).

mod expr;
pub mod grammar;
pub mod store;
pub mod types;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use expr::CronExpr;
pub use store::CronStore;
pub use types::{
    CronFire, CronTarget, FireReport, Overlap, ScheduleRow, ScheduleSpec, TickDecision, TickFire,
    TickRow, TickStatus,
};

use crate::error::{Error, Result};
use crate::job::{CancelToken, JobContext, JobError, JobOptions};
use crate::types::{NewMessage, QueueName, RunAt};
use crate::worker::{Erased, Handled};

/// Default queue of cron ticks' jobs.
pub const DEFAULT_CRON_QUEUE: &str = "crons";

/// A tick later than this when a scheduler sees it counts as missed (downtime): it runs only
/// with catch-up. Ticks seen within it run, late.
pub const MISSED_AFTER: Duration = Duration::from_secs(60);

/// At most this many missed ticks of one schedule are recorded as skipped per round (the most
/// recent); older ones leave no record.
pub const MAX_RECORDED_SKIPS: usize = 100;

/// How often a scheduler looks for new, changed or paused schedules when no tick is due
/// sooner.
pub const SCHEDULER_POLL: Duration = Duration::from_secs(1);

/// The job kind of the `#[dray::cron]` handler named `name`.
pub fn job_kind(name: &str) -> String {
    format!("cron:{name}")
}

/// A schedule's options, as `#[dray::cron(...)]` gives them.
#[derive(Clone, Debug)]
pub struct CronOptions {
    /// The cron expression (five fields, or six with seconds; or an alias).
    pub expression: String,
    /// The IANA time zone (default `UTC`).
    pub timezone: String,
    /// Run missed ticks after downtime (default false: skip them).
    pub catch_up: bool,
    /// At most this many missed ticks, the most recent (default 1).
    pub catch_up_limit: u32,
    /// A tick while the previous run is still going (default skip).
    pub overlap: Overlap,
    /// The tick's job: queue (default `crons`), priority, timeout, retries.
    pub job: JobOptions,
}

impl CronOptions {
    /// `expression` in UTC with the defaults.
    pub fn new(expression: impl Into<String>) -> Self {
        CronOptions {
            expression: expression.into(),
            timezone: "UTC".into(),
            catch_up: false,
            catch_up_limit: 1,
            overlap: Overlap::Skip,
            job: JobOptions {
                queue: DEFAULT_CRON_QUEUE.into(),
                ..JobOptions::default()
            },
        }
    }
}

/// A cron handler: runs on every tick of its schedule.
///
/// ```
/// use dray_core::cron::{Cron, CronContext, CronOptions};
/// use dray_core::JobError;
///
/// struct Digest;
///
/// impl Cron for Digest {
///     const NAME: &'static str = "daily_digest";
///     fn options() -> CronOptions {
///         CronOptions { timezone: "Europe/Berlin".into(), ..CronOptions::new("0 9 * * MON-FRI") }
///     }
///     async fn run(&self, ctx: &CronContext) -> Result<(), JobError> {
///         println!("tick of {} (late: {})", ctx.scheduled_at(), ctx.is_late());
///         Ok(())
///     }
/// }
/// ```
pub trait Cron: Send + Sync + 'static {
    /// The schedule's name (unique).
    const NAME: &'static str;
    /// The schedule.
    fn options() -> CronOptions;
    /// Runs one tick.
    fn run(
        &self,
        ctx: &CronContext,
    ) -> impl Future<Output = std::result::Result<(), JobError>> + Send;
}

/// What a tick's job carries.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TickPayload {
    /// The schedule.
    pub schedule: String,
    /// The tick's scheduled time.
    pub tick: DateTime<Utc>,
    /// True for a tick run by hand.
    #[serde(default)]
    pub manual: bool,
}

/// What a cron handler knows about its tick (Forge's `CronContext`).
#[derive(Clone, Debug)]
pub struct CronContext {
    job: JobContext,
    tick: TickPayload,
    started_at: DateTime<Utc>,
}

/// A tick that starts more than this after its scheduled time is late.
pub const LATE_AFTER: Duration = Duration::from_secs(1);

impl CronContext {
    /// The run's id (its job's id).
    pub fn run_id(&self) -> Uuid {
        self.job.id()
    }
    /// The schedule's name.
    pub fn schedule(&self) -> &str {
        &self.tick.schedule
    }
    /// The tick's scheduled time.
    pub fn scheduled_at(&self) -> DateTime<Utc> {
        self.tick.tick
    }
    /// When this attempt started (database clock, as the worker estimates it).
    pub fn started_at(&self) -> DateTime<Utc> {
        self.started_at
    }
    /// How long after its scheduled time the tick started.
    pub fn delay(&self) -> Duration {
        (self.started_at - self.tick.tick)
            .to_std()
            .unwrap_or_default()
    }
    /// True when it started more than [`LATE_AFTER`] after its scheduled time (a catch-up
    /// run, a busy queue, a retry).
    pub fn is_late(&self) -> bool {
        self.delay() > LATE_AFTER
    }
    /// True for a tick run by hand (`trigger`).
    pub fn is_manual(&self) -> bool {
        self.tick.manual
    }
    /// This attempt, 1 for the first.
    pub fn attempt(&self) -> i32 {
        self.job.attempt()
    }
    /// The job context underneath (progress, heartbeat, cancellation).
    pub fn job(&self) -> &JobContext {
        &self.job
    }
    /// The tracing span of this run.
    pub fn span(&self) -> &tracing::Span {
        self.job.span()
    }
    /// The store this worker runs on, if it is an `S` (Forge's `ctx.db()`: its pool).
    pub fn store<S: crate::Store>(&self) -> Option<&S> {
        self.job.store::<S>()
    }
}

/// The handler of one `#[dray::cron]`, as a worker runs it.
pub(crate) struct TypedCron<C: Cron> {
    pub(crate) cron: Arc<C>,
    pub(crate) options: JobOptions,
}

impl<C: Cron> Erased for TypedCron<C> {
    fn options(&self) -> &JobOptions {
        &self.options
    }

    fn call(
        &self,
        ctx: JobContext,
        payload: serde_json::Value,
    ) -> BoxFuture<'static, std::result::Result<Handled, JobError>> {
        let cron = self.cron.clone();
        async move {
            let tick: TickPayload = serde_json::from_value(payload).map_err(|e| {
                JobError::Permanent(format!(
                    "the tick's payload does not fit cron {}: {e}",
                    C::NAME
                ))
            })?;
            let started_at = Utc::now() + ctx.inner.db_offset;
            let cctx = CronContext {
                job: ctx,
                tick,
                started_at,
            };
            cron.run(&cctx).await?;
            Ok(Handled::Output(None))
        }
        .boxed()
    }
}

/// The spec of `#[dray::cron]` handler `C`.
pub fn spec_of<C: Cron>() -> Result<ScheduleSpec> {
    let o = C::options();
    let spec = ScheduleSpec {
        name: C::NAME.to_owned(),
        expression: o.expression,
        timezone: o.timezone,
        target: CronTarget::Handler,
        payload: serde_json::Value::Null,
        queue: o.job.queue,
        max_attempts: o.job.retry.max_attempts,
        catch_up: o.catch_up,
        catch_up_limit: o.catch_up_limit,
        overlap: o.overlap,
    };
    check_spec(&spec)?;
    Ok(spec)
}

/// Checks a schedule's name, expression, zone, queue and limits.
pub fn check_spec(spec: &ScheduleSpec) -> Result<CronExpr> {
    if spec.name.is_empty()
        || spec.name.len() > 200
        || !spec
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
    {
        return Err(Error::invalid(
            "schedule name",
            format!(
                "{:?}: use 1-200 characters from A-Z a-z 0-9 _ . : -",
                crate::error::excerpt(&spec.name)
            ),
        ));
    }
    QueueName::new(spec.queue.clone())?;
    if spec.max_attempts < 1 {
        return Err(Error::invalid("max_attempts", "must be at least 1"));
    }
    if spec.catch_up_limit > 1000 {
        return Err(Error::invalid("catch_up_limit", "at most 1000"));
    }
    CronExpr::parse(&spec.expression, &spec.timezone)
}

/// Which due ticks of a schedule fire and which are skipped, given its last handled tick and
/// the database clock's now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TickPlan {
    /// Ticks to fire, oldest first.
    pub fire: Vec<DateTime<Utc>>,
    /// Ticks to record as missed.
    pub missed: Vec<DateTime<Utc>>,
    /// The newest due tick (the schedule's last tick after this round).
    pub newest: Option<DateTime<Utc>>,
}

/// Plans a round: every tick after `last` and at or before `now`. Ticks later than
/// [`MISSED_AFTER`] are missed: with `catch_up` the most recent `catch_up_limit` of them fire,
/// oldest first; the others (at most [`MAX_RECORDED_SKIPS`] of them) are recorded skipped.
pub fn plan(
    expr: &CronExpr,
    last: DateTime<Utc>,
    now: DateTime<Utc>,
    catch_up: bool,
    catch_up_limit: u32,
) -> TickPlan {
    let missed_before = now - TimeDelta::from_std(MISSED_AFTER).unwrap_or_default();
    let keep_missed = if catch_up { catch_up_limit as usize } else { 0 } + MAX_RECORDED_SKIPS;
    // Walk back from now: the on-time ticks, then as many missed ones as are worth keeping.
    let mut on_time = Vec::new();
    let mut missed = Vec::new();
    let mut t = now;
    while let Some(p) = expr.at_or_before(t) {
        if p <= last {
            break;
        }
        if p > missed_before {
            on_time.push(p);
        } else {
            missed.push(p);
            if missed.len() >= keep_missed {
                break;
            }
        }
        t = p - TimeDelta::milliseconds(1);
    }
    let newest = on_time.first().or(missed.first()).copied();
    on_time.reverse();
    missed.reverse();
    let catch = if catch_up {
        (catch_up_limit as usize).min(missed.len())
    } else {
        0
    };
    let caught = missed.split_off(missed.len() - catch);
    let mut fire = caught;
    fire.extend(on_time);
    TickPlan {
        fire,
        missed,
        newest,
    }
}

/// The job or run a tick of `spec` makes.
pub(crate) fn tick_work(
    spec: &ScheduleSpec,
    tick: DateTime<Utc>,
    manual: bool,
) -> Result<TickFire> {
    let stamp = tick.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let key = format!("cron:{}:{stamp}", spec.name);
    let queue = QueueName::new(spec.queue.clone())?;
    let message = |kind: String, payload: String| NewMessage {
        id: Uuid::now_v7(),
        queue: queue.clone(),
        kind: Some(kind),
        key: Some(key.clone()),
        payload,
        headers: "{}".to_owned(),
        priority: crate::Priority::NORMAL,
        run_at: RunAt::Now,
        enqueued_at: None,
        max_attempts: spec.max_attempts,
        callback_url: None,
    };
    Ok(match &spec.target {
        CronTarget::Handler => TickFire {
            tick,
            job: Some(message(
                job_kind(&spec.name),
                serde_json::to_string(&TickPayload {
                    schedule: spec.name.clone(),
                    tick,
                    manual,
                })?,
            )),
            run: None,
        },
        CronTarget::Job { kind } => TickFire {
            tick,
            job: Some(message(kind.clone(), spec.payload.to_string())),
            run: None,
        },
        CronTarget::Workflow { name, version } => {
            let spec_run = crate::workflow::NewRunSpec {
                name: "",
                version: *version,
                options: crate::workflow::WorkflowOptions {
                    queue: spec.queue.clone(),
                    ..Default::default()
                },
                input: spec.payload.to_string(),
                workflow_id: key.clone(),
                parent_id: None,
            };
            let mut run = spec_run.build()?;
            run.name = name.clone();
            run.job.kind = Some(crate::workflow::job_kind(name));
            TickFire {
                tick,
                job: None,
                run: Some(run),
            }
        }
    })
}

/// A worker's scheduler: the schedules it declares, and the loop.
pub(crate) trait SchedulerOps: Send + Sync {
    fn run(&self, declared: Vec<ScheduleSpec>, stop: CancelToken) -> BoxFuture<'_, ()>;
    fn prune(&self, older_than: Duration) -> BoxFuture<'_, Result<u64>>;
}

pub(crate) struct Scheduler<S: CronStore> {
    pub(crate) store: S,
}

impl<S: CronStore> SchedulerOps for Scheduler<S> {
    fn run(&self, declared: Vec<ScheduleSpec>, stop: CancelToken) -> BoxFuture<'_, ()> {
        scheduler_loop(self.store.clone(), declared, stop).boxed()
    }
    fn prune(&self, older_than: Duration) -> BoxFuture<'_, Result<u64>> {
        self.store.cron_prune(older_than).boxed()
    }
}

async fn scheduler_loop<S: CronStore>(store: S, declared: Vec<ScheduleSpec>, stop: CancelToken) {
    let mut backoff = Duration::from_millis(100);
    let mut declared = Some(declared).filter(|d| !d.is_empty());
    let mut exprs: HashMap<(String, String), std::result::Result<CronExpr, String>> =
        HashMap::new();
    loop {
        if let Some(specs) = &declared {
            match store.cron_declare(specs).await {
                Ok(()) => declared = None,
                Err(err) => {
                    tracing::warn!(%err, "dray: could not store the declared cron schedules; retrying")
                }
            }
        }
        let wait = match round(&store, &mut exprs).await {
            Ok(wait) => {
                backoff = Duration::from_millis(100);
                wait
            }
            Err(err) => {
                tracing::warn!(%err, "dray: cron scheduler round failed; retrying");
                backoff = (backoff * 2).min(Duration::from_secs(5));
                backoff
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// One scheduler round: fires what is due; answers how long until the next tick (at most
/// [`SCHEDULER_POLL`]).
async fn round<S: CronStore>(
    store: &S,
    exprs: &mut HashMap<(String, String), std::result::Result<CronExpr, String>>,
) -> Result<Duration> {
    let now = store.now().await?;
    let mut next = now + TimeDelta::from_std(SCHEDULER_POLL).unwrap_or_default();
    for s in store.cron_list().await? {
        if !s.enabled || s.paused {
            continue;
        }
        let spec = &s.spec;
        let expr = exprs
            .entry((spec.expression.clone(), spec.timezone.clone()))
            .or_insert_with(|| {
                CronExpr::parse(&spec.expression, &spec.timezone).map_err(|e| {
                    tracing::warn!(schedule = %spec.name, err = %e, "dray: a stored cron schedule does not parse; it does not fire until fixed");
                    e.to_string()
                })
            });
        let Ok(expr) = expr else { continue };
        let p = plan(expr, s.last_tick, now, spec.catch_up, spec.catch_up_limit);
        if let Some(newest) = p.newest {
            let fire = p
                .fire
                .iter()
                .map(|t| tick_work(spec, *t, false))
                .collect::<Result<Vec<_>>>()?;
            let skip = p
                .missed
                .iter()
                .map(|t| {
                    (
                        *t,
                        "missed: no scheduler ran at its time (catch-up off or beyond its limit)"
                            .to_owned(),
                    )
                })
                .collect();
            let cron_fire = CronFire {
                schedule: spec.name.clone(),
                fire,
                skip,
                overlap: spec.overlap,
                advance_to: newest,
                manual: false,
            };
            let report = store.cron_fire(&cron_fire).await?;
            for (tick, id) in &report.fired {
                tracing::debug!(schedule = %spec.name, %tick, job = %id, "dray: cron tick fired");
            }
            count_ticks(&spec.name, &cron_fire.fire, &report, now);
        }
        if let Some(n) = expr.next_after(now) {
            next = next.min(n);
        }
    }
    Ok((next - now).to_std().unwrap_or_default())
}

/// Moves the cron metrics by what one `cron_fire` did (its handling time: `now`).
fn count_ticks(schedule: &str, fire: &[TickFire], report: &FireReport, now: DateTime<Utc>) {
    use crate::metrics as m;
    if !report.fired.is_empty() {
        let ticks =
            metrics::counter!(m::CRON_TICKS, "schedule" => schedule.to_owned(), "outcome" => "run");
        ticks.increment(report.fired.len() as u64);
        let delay = metrics::histogram!(m::CRON_TICK_DELAY, "schedule" => schedule.to_owned());
        let mut late = 0;
        for (tick, _) in &report.fired {
            let d = m::seconds(now - *tick);
            delay.record(d);
            if d > m::CRON_LATE_AFTER.as_secs_f64() {
                late += 1;
            }
            if let Some(f) = fire.iter().find(|f| f.tick == *tick) {
                count_work(f);
            }
        }
        if late > 0 {
            metrics::counter!(m::CRON_TICKS_LATE, "schedule" => schedule.to_owned())
                .increment(late);
        }
    }
    if !report.skipped.is_empty() {
        metrics::counter!(m::CRON_TICKS, "schedule" => schedule.to_owned(), "outcome" => "skipped")
            .increment(report.skipped.len() as u64);
    }
}

/// Counts the job (or workflow run) a fired tick enqueued.
fn count_work(f: &TickFire) {
    if let Some(job) = &f.job {
        crate::metrics::enqueued(std::slice::from_ref(job), std::iter::once(true));
    }
    if let Some(run) = &f.run {
        crate::metrics::run_started(&run.name);
    }
}

/// Client calls for schedules.
impl<S: CronStore> crate::Client<S> {
    /// Creates or updates a schedule at run time (Forge's runtime schedules): a job kind or a
    /// workflow as its target, with a JSON payload. A worker with a scheduler fires it.
    pub async fn upsert_schedule(&self, spec: &ScheduleSpec) -> Result<()> {
        check_spec(spec)?;
        self.store().cron_upsert(spec).await
    }

    /// Deletes a schedule made at run time (its history stays until pruned).
    pub async fn remove_schedule(&self, name: &str) -> Result<()> {
        if self.store().cron_remove(name).await? {
            Ok(())
        } else {
            Err(no_schedule(name))
        }
    }

    /// Every schedule, with its next fire time (database clock) when it is active.
    pub async fn schedules(&self) -> Result<Vec<(ScheduleRow, Option<DateTime<Utc>>)>> {
        let now = self.store().now().await?;
        Ok(self
            .store()
            .cron_list()
            .await?
            .into_iter()
            .map(|s| {
                let next = (s.enabled && !s.paused)
                    .then(|| CronExpr::parse(&s.spec.expression, &s.spec.timezone).ok())
                    .flatten()
                    .and_then(|e| e.next_after(now.max(s.last_tick)));
                (s, next)
            })
            .collect())
    }

    /// Pauses a schedule: no tick fires until it is resumed (ticks meanwhile are missed).
    pub async fn pause_schedule(&self, name: &str) -> Result<()> {
        if self.store().cron_set_paused(name, true).await? {
            Ok(())
        } else {
            Err(no_schedule(name))
        }
    }

    /// Resumes a paused schedule.
    pub async fn resume_schedule(&self, name: &str) -> Result<()> {
        if self.store().cron_set_paused(name, false).await? {
            Ok(())
        } else {
            Err(no_schedule(name))
        }
    }

    /// Runs a schedule's target now, outside its schedule; returns the job (or run) id.
    pub async fn trigger_schedule(&self, name: &str) -> Result<Uuid> {
        let s = self
            .store()
            .cron_list()
            .await?
            .into_iter()
            .find(|s| s.spec.name == name)
            .ok_or_else(|| no_schedule(name))?;
        let now = self.store().now().await?;
        let work = tick_work(&s.spec, now, true)?;
        let cron_fire = CronFire {
            schedule: s.spec.name.clone(),
            fire: vec![work],
            skip: Vec::new(),
            overlap: Overlap::Allow,
            advance_to: s.last_tick,
            manual: true,
        };
        let report = self.store().cron_fire(&cron_fire).await?;
        // A manual run is no tick: it counts as the job (or run) it made, not in the tick metrics.
        if !report.fired.is_empty() {
            cron_fire.fire.iter().for_each(count_work);
        }
        report
            .fired
            .first()
            .map(|(_, id)| *id)
            .ok_or_else(|| Error::invalid("trigger", "the tick was recorded already; try again"))
    }

    /// A schedule's ticks, newest first, with how each ended.
    pub async fn schedule_history(&self, name: &str, limit: u32) -> Result<Vec<TickRow>> {
        if !self
            .store()
            .cron_list()
            .await?
            .iter()
            .any(|s| s.spec.name == name)
        {
            return Err(no_schedule(name));
        }
        self.store()
            .cron_history(name, crate::batch::list_limit(limit))
            .await
    }
}

fn no_schedule(name: &str) -> Error {
    Error::invalid(
        "schedule",
        format!(
            "no schedule named {:?}; `dray crons list` lists them",
            crate::error::excerpt(name)
        ),
    )
}
