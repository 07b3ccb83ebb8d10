//! Conformance tests of cron schedules, run against every store.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use dray_core::cron::{
    Cron, CronContext, CronOptions, CronTarget, Overlap, ScheduleSpec, TickStatus,
};
use dray_core::{Client, CronStore, Job, JobContext, JobError, Worker, WorkerHandle};

use crate::Fixture;

const WAIT: Duration = Duration::from_secs(30);

/// Records the scheduled time of every tick it runs.
struct EverySecond(Arc<Mutex<Vec<DateTime<Utc>>>>);
impl Cron for EverySecond {
    const NAME: &'static str = "every_second";
    fn options() -> CronOptions {
        CronOptions::new("* * * * * *")
    }
    async fn run(&self, ctx: &CronContext) -> Result<(), JobError> {
        assert_eq!(ctx.schedule(), "every_second");
        assert!(ctx.started_at() >= ctx.scheduled_at() - chrono::TimeDelta::milliseconds(50));
        self.0.lock().unwrap().push(ctx.scheduled_at());
        Ok(())
    }
}

fn worker<S: CronStore>(store: &S, build: impl FnOnce(Worker<S>) -> Worker<S>) -> WorkerHandle {
    build(Worker::new(store.clone()).configure(|c| {
        c.lease = Duration::from_secs(2);
        c.heartbeat = Duration::from_millis(100);
        c.maintenance_interval = Duration::from_millis(100);
        c.shutdown_grace = Duration::from_millis(300);
    }))
    .start()
    .unwrap()
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < WAIT, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn every_tick_runs_once_across_schedulers<F: Fixture>(fx: Arc<F>, store: F::Store) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    // Two workers on two handles (as two processes) both schedule and run the cron.
    let other = fx.reopen(&store).await;
    let a = worker(&store, |w| w.register_cron(EverySecond(seen.clone())));
    let b = worker(&other, |w| w.register_cron(EverySecond(seen.clone())));
    until("five ticks ran", || seen.lock().unwrap().len() >= 5).await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    let ticks = seen.lock().unwrap().clone();
    let distinct: BTreeSet<_> = ticks.iter().copied().collect();
    assert_eq!(distinct.len(), ticks.len(), "a tick ran twice: {ticks:?}");
    for pair in distinct.iter().collect::<Vec<_>>().windows(2) {
        assert_eq!(
            (*pair[1] - *pair[0]).num_seconds(),
            1,
            "a tick was missed: {distinct:?}"
        );
    }
    let client = Client::new(store.clone());
    let history = client.schedule_history("every_second", 100).await.unwrap();
    let fired: BTreeSet<_> = history
        .iter()
        .filter(|t| t.status == TickStatus::Fired)
        .map(|t| t.tick)
        .collect();
    assert!(distinct.is_subset(&fired), "{distinct:?} vs {fired:?}");
    let (row, next) = client
        .schedules()
        .await
        .unwrap()
        .into_iter()
        .find(|(s, _)| s.spec.name == "every_second")
        .unwrap();
    assert_eq!(row.source, "code");
    assert!(next.is_some(), "an active schedule has a next fire time");
}

/// A job a schedule made at run time enqueues: counts its runs.
struct Probe(Arc<Mutex<Vec<serde_json::Value>>>);
impl Job for Probe {
    const NAME: &'static str = "cron_probe";
    type Input = serde_json::Value;
    type Output = ();
    async fn run(&self, _ctx: &JobContext, input: serde_json::Value) -> Result<(), JobError> {
        self.0.lock().unwrap().push(input);
        Ok(())
    }
}

fn probe_spec(name: &str, catch_up: bool) -> ScheduleSpec {
    let spec = ScheduleSpec::job(name, "*/10 * * * * *", "cron_probe")
        .timezone("Europe/Berlin")
        .payload(serde_json::json!({ "from": name }))
        .max_attempts(3)
        .overlap(Overlap::Allow);
    assert_eq!(
        spec.target,
        CronTarget::Job {
            kind: "cron_probe".into()
        }
    );
    if catch_up { spec.catch_up(3) } else { spec }
}

pub async fn catch_up_runs_the_latest_missed_ticks_in_order<F: Fixture>(
    fx: Arc<F>,
    store: F::Store,
) {
    let client = Client::new(store.clone());
    client
        .upsert_schedule(&probe_spec("caught", true))
        .await
        .unwrap();
    client
        .upsert_schedule(&probe_spec("skipped", false))
        .await
        .unwrap();
    // Five minutes without a scheduler.
    fx.cron_rewind(&store, "caught", 300).await;
    fx.cron_rewind(&store, "skipped", 300).await;
    let runs = Arc::new(Mutex::new(Vec::new()));
    let w = worker(&store, |w| w.register(Probe(runs.clone())).schedule_crons());
    let recorded = |name: &'static str| {
        let client = client.clone();
        async move { client.schedule_history(name, 1000).await.unwrap() }
    };
    let start = std::time::Instant::now();
    let (caught, skipped) = loop {
        let (c, s) = (recorded("caught").await, recorded("skipped").await);
        if c.len() >= 25 && s.len() >= 25 {
            break (c, s);
        }
        assert!(
            start.elapsed() < WAIT,
            "{} / {} ticks recorded",
            c.len(),
            s.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    w.shutdown().await.unwrap();
    // A tick was missed when it was more than a minute old at the first round after the
    // outage: the round that recorded the oldest ticks.
    let round = |ticks: &[dray_core::cron::TickRow]| {
        ticks.iter().map(|t| t.recorded_at).min().unwrap() - chrono::TimeDelta::seconds(60)
    };
    let old = |ticks: &[dray_core::cron::TickRow], st: TickStatus| -> Vec<DateTime<Utc>> {
        let missed_before = round(ticks);
        let mut v: Vec<_> = ticks
            .iter()
            .filter(|t| t.status == st && t.tick < missed_before)
            .map(|t| t.tick)
            .collect();
        v.sort();
        v
    };
    // With catch-up: exactly the limit, the three most recent missed ticks, 10 s apart.
    let fired = old(&caught, TickStatus::Fired);
    assert_eq!(fired.len(), 3, "{caught:#?}");
    assert!(fired.windows(2).all(|w| (w[1] - w[0]).num_seconds() == 10));
    let skipped_old = old(&caught, TickStatus::Skipped);
    assert!(skipped_old.len() >= 20);
    assert!(
        skipped_old.iter().all(|t| *t < fired[0]),
        "older ones are the skipped ones"
    );
    assert!(
        caught
            .iter()
            .filter(|t| t.status == TickStatus::Skipped)
            .all(|t| t.reason.as_deref().is_some_and(|r| r.contains("missed")))
    );
    // Without: none of the missed ones.
    assert!(old(&skipped, TickStatus::Fired).is_empty(), "{skipped:#?}");
    // Each fired tick's job ran, oldest first.
    let caught_jobs: Vec<_> = caught
        .iter()
        .filter(|t| t.status == TickStatus::Fired)
        .map(|t| (t.tick, t.job_id.unwrap()))
        .collect();
    let mut by_tick = caught_jobs.clone();
    by_tick.sort();
    let mut by_id = caught_jobs.clone();
    by_id.sort_by_key(|(_, id)| *id);
    assert_eq!(by_tick, by_id, "jobs were enqueued oldest tick first");
    assert!(
        runs.lock()
            .unwrap()
            .iter()
            .filter(|p| p["from"] == "caught")
            .count()
            >= 3
    );
}

/// Runs until the test lets it go: its ticks overlap.
struct Slow(Arc<tokio::sync::Semaphore>, Arc<Mutex<usize>>);
impl Cron for Slow {
    const NAME: &'static str = "slow";
    fn options() -> CronOptions {
        CronOptions::new("* * * * * *")
    }
    async fn run(&self, _ctx: &CronContext) -> Result<(), JobError> {
        *self.1.lock().unwrap() += 1;
        self.0.acquire().await?.forget();
        Ok(())
    }
}

pub async fn overlapping_ticks_are_skipped_and_recorded<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let started = Arc::new(Mutex::new(0));
    let w = worker(&store, |w| {
        w.register_cron(Slow(gate.clone(), started.clone()))
    });
    let client = Client::new(store.clone());
    until("the first tick runs", || *started.lock().unwrap() == 1).await;
    let start = std::time::Instant::now();
    loop {
        let h = client.schedule_history("slow", 100).await.unwrap();
        if h.iter().filter(|t| t.status == TickStatus::Skipped).count() >= 2 {
            assert!(
                h.iter()
                    .filter(|t| t.status == TickStatus::Skipped)
                    .all(|t| t.reason.as_deref().is_some_and(|r| r.contains("overlap")))
            );
            break;
        }
        assert!(start.elapsed() < WAIT, "{h:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*started.lock().unwrap(), 1, "skipped ticks do not run");
    // Pause, trigger by hand (it runs beside the busy one), resume.
    client.pause_schedule("slow").await.unwrap();
    let id = client.trigger_schedule("slow").await.unwrap();
    until("the triggered run starts", || *started.lock().unwrap() == 2).await;
    gate.add_permits(2);
    let out = client.wait(id, WAIT).await.unwrap();
    assert_eq!(out.state, dray_core::MessageState::Completed);
    let h = client.schedule_history("slow", 100).await.unwrap();
    assert!(
        h.iter()
            .any(|t| t.status == TickStatus::Triggered && t.job_id == Some(id))
    );
    let (row, next) = client
        .schedules()
        .await
        .unwrap()
        .into_iter()
        .find(|(s, _)| s.spec.name == "slow")
        .unwrap();
    assert!(row.paused && next.is_none());
    client.resume_schedule("slow").await.unwrap();
    until("a tick runs after the resume", || {
        *started.lock().unwrap() >= 3
    })
    .await;
    gate.add_permits(100);
    w.shutdown().await.unwrap();
}

/// A schedule that starts a workflow run per tick.
struct Nightly;
impl dray_core::Workflow for Nightly {
    const NAME: &'static str = "nightly";
    type Input = serde_json::Value;
    type Output = String;
    async fn run(
        &self,
        ctx: &dray_core::WorkflowContext,
        input: serde_json::Value,
    ) -> Result<String, dray_core::WorkflowError> {
        Ok(format!(
            "{} {}",
            input["say"].as_str().unwrap_or(""),
            ctx.workflow_id()
        ))
    }
}

pub async fn schedules_start_workflows_and_refuse_bad_input<F: Fixture>(
    _fx: Arc<F>,
    store: F::Store,
) {
    let client = Client::new(store.clone());
    let spec = ScheduleSpec::workflow::<Nightly>("nightly-run", "* * * * * *")
        .payload(serde_json::json!({ "say": "hi" }))
        .overlap(Overlap::Allow);
    assert_eq!(spec.queue, "workflows");
    client.upsert_schedule(&spec).await.unwrap();
    let w = worker(&store, |w| w.register_workflow(Nightly).schedule_crons());
    let start = std::time::Instant::now();
    let run = loop {
        let h = client.schedule_history("nightly-run", 10).await.unwrap();
        if let Some(t) = h.iter().find(|t| t.status == TickStatus::Fired) {
            break (t.job_id.unwrap(), t.tick);
        }
        assert!(start.elapsed() < WAIT);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let out: String = client.workflow_result(run.0, WAIT).await.unwrap();
    assert!(out.starts_with("hi cron:nightly-run:"), "{out}");
    assert!(out.ends_with('Z'), "the tick is in the workflow id: {out}");
    w.shutdown().await.unwrap();
    client.remove_schedule("nightly-run").await.unwrap();

    // Bad input: typed errors naming what is wrong.
    for (change, what) in [
        (
            Box::new(|s: &mut ScheduleSpec| s.expression = "61 * * * *".into())
                as Box<dyn Fn(&mut ScheduleSpec) + Send + Sync>,
            "the minute field",
        ),
        (
            Box::new(|s: &mut ScheduleSpec| s.timezone = "Moon/Base".into()),
            "IANA",
        ),
        (
            Box::new(|s: &mut ScheduleSpec| s.name = "no spaces please".into()),
            "schedule name",
        ),
        (
            Box::new(|s: &mut ScheduleSpec| s.queue = "bad queue".into()),
            "queue name",
        ),
    ] {
        let mut bad = spec.clone();
        change(&mut bad);
        let err = client.upsert_schedule(&bad).await.unwrap_err();
        assert!(err.to_string().contains(what), "{err}");
    }
    for err in [
        client.pause_schedule("nope").await.unwrap_err(),
        client.trigger_schedule("nope").await.unwrap_err(),
        client.schedule_history("nope", 10).await.unwrap_err(),
        client.remove_schedule("nope").await.unwrap_err(),
    ] {
        assert!(err.to_string().contains("no schedule named"), "{err}");
    }
    // A bad #[dray::cron]-style declaration fails the worker's start, naming the field.
    struct Bad;
    impl Cron for Bad {
        const NAME: &'static str = "bad";
        fn options() -> CronOptions {
            CronOptions::new("0 25 * * *")
        }
        async fn run(&self, _ctx: &CronContext) -> Result<(), JobError> {
            Ok(())
        }
    }
    let err = Worker::new(store.clone())
        .register_cron(Bad)
        .start()
        .unwrap_err();
    assert!(err.to_string().contains("the hour field \"25\""), "{err}");
}

/// Another per-second cron, declared by a later build in place of `every_second`.
struct Replacement;
impl Cron for Replacement {
    const NAME: &'static str = "replacement";
    fn options() -> CronOptions {
        CronOptions::new("*/2 * * * * *")
    }
    async fn run(&self, _ctx: &CronContext) -> Result<(), JobError> {
        Ok(())
    }
}

pub async fn undeclared_schedules_are_disabled_with_history_kept<F: Fixture>(
    _fx: Arc<F>,
    store: F::Store,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let client = Client::new(store.clone());
    let old = worker(&store, |w| w.register_cron(EverySecond(seen.clone())));
    until("a tick ran", || !seen.lock().unwrap().is_empty()).await;
    old.shutdown().await.unwrap();
    // A new build no longer declares `every_second`.
    let new = worker(&store, |w| w.register_cron(Replacement));
    let start = std::time::Instant::now();
    loop {
        let all = client.schedules().await.unwrap();
        let gone = all.iter().find(|(s, _)| s.spec.name == "every_second");
        let added = all.iter().any(|(s, _)| s.spec.name == "replacement");
        if added && gone.is_some_and(|(s, next)| !s.enabled && next.is_none()) {
            break;
        }
        assert!(start.elapsed() < WAIT, "{all:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let kept = client.schedule_history("every_second", 100).await.unwrap();
    assert!(!kept.is_empty(), "its history is kept");
    // A disabled schedule does not fire.
    let before = seen.lock().unwrap().len();
    let count = kept.len();
    let until_tick = std::time::Instant::now();
    while client
        .schedule_history("replacement", 10)
        .await
        .unwrap()
        .len()
        < 2
    {
        assert!(until_tick.elapsed() < WAIT);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        client
            .schedule_history("every_second", 100)
            .await
            .unwrap()
            .len(),
        count
    );
    assert_eq!(seen.lock().unwrap().len(), before);
    new.shutdown().await.unwrap();
}
