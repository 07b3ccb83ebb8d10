//! Conformance tests of durable workflows, run against every store.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dray_core::workflow::{
    RunCancel, RunFilter, RunStatus, StepKind, StepStatus, Workflow, WorkflowContext,
    WorkflowError, WorkflowOptions,
};
use dray_core::{
    Backoff, Client, Error, RetryPolicy, StartOptions, StepOptions, Store, Worker, WorkerHandle,
    WorkflowStore,
};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Fixture;

const WAIT: Duration = Duration::from_secs(30);

/// What the workflows of a test did, in order.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, s: impl Into<String>) {
        self.0.lock().unwrap().push(s.into());
    }
    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
    fn count(&self, s: &str) -> usize {
        self.all().iter().filter(|e| *e == s).count()
    }
}

fn quick_retry(max_attempts: i32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        backoff: Backoff::Fixed,
        base: Duration::from_millis(50),
        max: Duration::from_millis(50),
        jitter: false,
    }
}

fn options() -> WorkflowOptions {
    WorkflowOptions {
        retry: quick_retry(5),
        ..WorkflowOptions::default()
    }
}

/// A worker with short leases and heartbeats, running `build`'s workflows.
fn worker<S: WorkflowStore>(store: &S, build: impl FnOnce(Worker<S>) -> Worker<S>) -> WorkerHandle {
    build(Worker::new(store.clone()).configure(|c| {
        c.lease = Duration::from_secs(2);
        c.heartbeat = Duration::from_millis(100);
        c.maintenance_interval = Duration::from_millis(100);
        c.shutdown_grace = Duration::from_millis(300);
    }))
    .start()
    .unwrap()
}

async fn status_becomes<S: WorkflowStore>(client: &Client<S>, run: Uuid, want: RunStatus) {
    let start = std::time::Instant::now();
    loop {
        let info = client.describe(run).await.unwrap();
        if info.status == want {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "run {run} is {} (job {:?}), not {want}: {info:#?}",
            info.status,
            info.job_state
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Three steps; the second fails transiently on the run's first attempt.
struct Three(Log);
impl Workflow for Three {
    const NAME: &'static str = "three";
    type Input = u32;
    type Output = u32;
    fn options() -> WorkflowOptions {
        options()
    }
    async fn run(&self, ctx: &WorkflowContext, n: u32) -> Result<u32, WorkflowError> {
        let log = self.0.clone();
        let a: u32 = ctx
            .step("a", || async {
                log.push("a");
                Ok(n + 1)
            })
            .await?;
        let log = self.0.clone();
        let attempt = ctx.attempt();
        let b: u32 = ctx
            .step("b", || async {
                log.push("b");
                if attempt == 1 {
                    return Err(WorkflowError::transient("b is not ready yet"));
                }
                Ok(a * 10)
            })
            .await?;
        let log = self.0.clone();
        let c: u32 = ctx
            .step("c", || async {
                log.push("c");
                Ok(b + 1)
            })
            .await?;
        Ok(c)
    }
}

pub async fn workflow_steps_run_once_and_replay<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let log = Log::default();
    let w = worker(&store, |w| w.register_workflow(Three(log.clone())));
    let client = Client::new(store.clone());
    let run = client.start_workflow::<Three>(&4, "three-4").await.unwrap();
    assert!(!run.is_existing());
    assert_eq!(run.result(WAIT).await.unwrap(), 51);
    // `a` completed before `b` failed: the retry replayed it from its record.
    assert_eq!(log.all(), vec!["a", "b", "b", "c"]);
    let info = run.describe().await.unwrap();
    assert_eq!(info.status, RunStatus::Completed);
    assert_eq!(info.run.name, "three");
    assert_eq!(info.run.version, 1);
    assert_eq!(info.run.workflow_id, "three-4");
    assert_eq!(info.attempt, 2, "one transient failure, one more attempt");
    let names: Vec<&str> = info.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, vec!["a", "b", "c"]);
    for s in &info.steps {
        assert_eq!(s.status, StepStatus::Completed, "{s:?}");
        assert_eq!(s.kind, StepKind::Step);
        assert!(s.started_at.is_some() && s.finished_at.is_some(), "{s:?}");
        assert!(s.started_at <= s.finished_at, "{s:?}");
    }
    assert_eq!(info.steps[0].attempts, 1);
    assert_eq!(info.steps[1].attempts, 2, "b failed once, then completed");
    assert_eq!(info.steps[1].output, Some(serde_json::json!(50)));
    assert_eq!(run.get().await.unwrap(), Some(51));
    // The second start of the same workflow id is the same run, and says so.
    let again = client.start_workflow::<Three>(&9, "three-4").await.unwrap();
    assert_eq!(again.run_id(), run.run_id());
    assert!(again.is_existing());
    let err = client
        .start_workflow_with::<Three>(
            &9,
            StartOptions::new()
                .workflow_id("three-4")
                .raise_on_already_started(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::AlreadyStarted { run, .. } if *run == again.run_id()),
        "{err}"
    );
    assert_eq!(err.code(), "already_started");
    assert_eq!(
        client.find_workflow("three", "three-4").await.unwrap(),
        run.run_id()
    );
    w.shutdown().await.unwrap();
}

/// Sleeps, then answers.
struct Sleeper(Log);
impl Workflow for Sleeper {
    const NAME: &'static str = "sleeper";
    type Input = u64;
    type Output = String;
    async fn run(&self, ctx: &WorkflowContext, ms: u64) -> Result<String, WorkflowError> {
        let log = self.0.clone();
        ctx.step("before", || async {
            log.push("before");
            Ok(())
        })
        .await?;
        ctx.sleep(Duration::from_millis(ms)).await?;
        let log = self.0.clone();
        ctx.step("after", || async {
            log.push("after");
            Ok(())
        })
        .await?;
        Ok("rested".into())
    }
}

pub async fn a_sleeping_run_holds_no_slot_and_survives_a_restart<F: Fixture>(
    fx: Arc<F>,
    store: F::Store,
) {
    let log = Log::default();
    let w = worker(&store, |w| w.register_workflow(Sleeper(log.clone())));
    let client = Client::new(store.clone());
    let run = client
        .start_workflow_with::<Sleeper>(&2000, StartOptions::new())
        .await
        .unwrap();
    status_becomes(&client, run.run_id(), RunStatus::Sleeping).await;
    assert_eq!(w.running(), 0, "a sleeping run holds no worker slot");
    let info = run.describe().await.unwrap();
    let sleep = &info.steps[1];
    assert_eq!(sleep.kind, StepKind::Sleep);
    assert_eq!(sleep.status, StepStatus::Pending);
    let wake = sleep.wake_at.expect("the wake time is stored");
    // Every process goes away during the sleep; a new one (another handle) resumes it.
    w.shutdown().await.unwrap();
    let other = fx.reopen(&store).await;
    let w2 = worker(&other, |w| w.register_workflow(Sleeper(log.clone())));
    let out = Client::new(other.clone())
        .workflow_result::<String>(run.run_id(), WAIT)
        .await
        .unwrap();
    assert_eq!(out, "rested");
    assert_eq!(log.all(), vec!["before", "after"]);
    let info = run.describe().await.unwrap();
    let sleep = &info.steps[1];
    assert_eq!(sleep.status, StepStatus::Completed);
    assert!(
        sleep.finished_at.unwrap() >= wake,
        "woke at {:?}, before its wake time {wake:?}",
        sleep.finished_at
    );
    // It resumed promptly once due (the poll interval, not a long scan).
    let late = (sleep.finished_at.unwrap() - wake).to_std().unwrap();
    assert!(
        late < Duration::from_secs(3),
        "resumed {late:?} after its wake time"
    );
    w2.shutdown().await.unwrap();
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Approval {
    by: String,
}

/// Waits for signals: two `approval`s in order, then a `never` that times out, then a `count`
/// whose payload does not fit.
struct Approvals;
impl Workflow for Approvals {
    const NAME: &'static str = "approvals";
    type Input = ();
    type Output = Vec<String>;
    async fn run(&self, ctx: &WorkflowContext, _: ()) -> Result<Vec<String>, WorkflowError> {
        let mut seen = Vec::new();
        ctx.set_state("stage", &"waiting for approvals").await?;
        for _ in 0..2 {
            let a: Option<Approval> = ctx.wait_for_signal("approval", None).await?;
            seen.push(a.map(|a| a.by).unwrap_or_default());
        }
        ctx.set_state("stage", &"waiting for never").await?;
        let never: Option<Approval> = ctx
            .wait_for_signal("never", Some(Duration::from_millis(300)))
            .await?;
        seen.push(format!("never: {never:?}"));
        ctx.set_state("stage", &"waiting for count").await?;
        match ctx.wait_for_signal::<u32>("count", None).await {
            Err(WorkflowError::SignalPayload { name, reason }) => {
                seen.push(format!("bad {name}: {}", reason.contains("u32")));
            }
            other => seen.push(format!("unexpected {other:?}")),
        }
        Ok(seen)
    }
}

pub async fn signals_before_and_after_the_wait_in_order<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let client = Client::new(store.clone());
    // One approval is sent before any worker runs the workflow: it is kept.
    let run = client.start_workflow::<Approvals>(&(), "ap").await.unwrap();
    run.signal("approval", &Approval { by: "ann".into() })
        .await
        .unwrap();
    let w = worker(&store, |w| w.register_workflow(Approvals));
    // It consumes the kept one, then waits for the second.
    wait_until_waiting_for(&client, run.run_id(), "approval#2").await;
    assert_eq!(
        run.query::<String>("stage").await.unwrap().as_deref(),
        Some("waiting for approvals"),
        "query state is readable while the run goes on"
    );
    assert_eq!(w.running(), 0, "a waiting run holds no worker slot");
    run.signal("approval", &Approval { by: "bob".into() })
        .await
        .unwrap();
    wait_until_waiting_for(&client, run.run_id(), "count").await;
    run.signal("count", &"not a number").await.unwrap();
    let out = run.result(WAIT).await.unwrap();
    assert_eq!(
        out,
        vec!["ann", "bob", "never: None", "bad count: true"],
        "in order; the timeout is a value; the bad payload a typed error"
    );
    // A finished run takes no more signals.
    let err = run
        .signal("approval", &Approval { by: "late".into() })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::RunFinished {
                status: RunStatus::Completed,
                ..
            }
        ),
        "{err}"
    );
    w.shutdown().await.unwrap();
}

async fn wait_until_waiting_for<S: WorkflowStore>(client: &Client<S>, run: Uuid, step: &str) {
    let start = std::time::Instant::now();
    loop {
        let info = client.describe(run).await.unwrap();
        let pending = info
            .steps
            .last()
            .is_some_and(|s| s.name == step && s.status == StepStatus::Pending);
        if pending && info.status == RunStatus::Waiting {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "run {run} never waited at {step:?}: {info:#?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn concurrent_starts_of_one_workflow_id_make_one_run<F: Fixture>(
    _fx: Arc<F>,
    store: F::Store,
) {
    let client = Client::new(store.clone());
    let starts = (0..20).map(|i| {
        let client = client.clone();
        async move {
            client
                .start_workflow::<Three>(&i, "only-one")
                .await
                .unwrap()
        }
    });
    let handles = futures_util::future::join_all(starts).await;
    let ids: std::collections::HashSet<Uuid> = handles.iter().map(|h| h.run_id()).collect();
    assert_eq!(ids.len(), 1, "20 starts of one workflow id: one run");
    assert_eq!(handles.iter().filter(|h| !h.is_existing()).count(), 1);
    let runs = client
        .list_workflows(&RunFilter {
            name: Some("three".into()),
            ..RunFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(runs.len(), 1);
    // A batch start answers in input order, a repeated id within it included.
    let inputs = [1u32, 2, 3];
    let started = client
        .start_workflows::<Three>([
            (&inputs[0], Some("batch-a".to_owned())),
            (&inputs[1], Some("batch-b".to_owned())),
            (&inputs[2], Some("batch-a".to_owned())),
        ])
        .await
        .unwrap();
    assert!(!started[0].existing && !started[1].existing && started[2].existing);
    assert_eq!(started[0].id, started[2].id);
}

/// Books a trip: three steps with compensations, then a payment that fails for good.
struct Trip(Log);
impl Workflow for Trip {
    const NAME: &'static str = "trip";
    type Input = bool;
    type Output = ();
    fn options() -> WorkflowOptions {
        options()
    }
    async fn run(&self, ctx: &WorkflowContext, pay_fails: bool) -> Result<(), WorkflowError> {
        for what in ["flight", "hotel", "car"] {
            let log = self.0.clone();
            let undo = self.0.clone();
            ctx.step(what, || async {
                log.push(format!("book {what}"));
                Ok(format!("{what}-1"))
            })
            .compensate_with(move |booking: String| async move {
                undo.push(format!("cancel {booking}"));
                Ok(())
            })
            .await?;
        }
        let log = self.0.clone();
        ctx.step("pay", || async {
            log.push("pay");
            if pay_fails {
                Err(WorkflowError::permanent("card declined"))
            } else {
                Ok(())
            }
        })
        .await?;
        Ok(())
    }
}

pub async fn compensations_run_newest_first_once<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let log = Log::default();
    let w = worker(&store, |w| w.register_workflow(Trip(log.clone())));
    let client = Client::new(store.clone());
    let run = client
        .start_workflow::<Trip>(&true, "trip-1")
        .await
        .unwrap();
    let err = run.result(WAIT).await.unwrap_err();
    assert!(
        matches!(&err, Error::WorkflowFailed { status: RunStatus::Compensated, message, .. } if message.contains("card declined")),
        "{err}"
    );
    assert_eq!(
        log.all(),
        vec![
            "book flight",
            "book hotel",
            "book car",
            "pay",
            "cancel car-1",
            "cancel hotel-1",
            "cancel flight-1"
        ]
    );
    let info = run.describe().await.unwrap();
    assert_eq!(info.run.end_reason, Some(RunStatus::Failed));
    for s in &info.steps[..3] {
        assert!(s.compensated_at.is_some(), "{s:?}");
    }
    assert_eq!(info.steps[3].status, StepStatus::Failed);
    assert_eq!(info.steps[3].error.as_deref(), Some("card declined"));
    // A run that does not fail compensates nothing.
    let ok = client
        .start_workflow::<Trip>(&false, "trip-2")
        .await
        .unwrap();
    ok.result(WAIT).await.unwrap();
    assert_eq!(log.count("cancel car-1"), 1);
    w.shutdown().await.unwrap();
}

/// Version 1 of `evolving`: steps `a`, then a wait, then `b`.
struct EvolvingV1;
impl Workflow for EvolvingV1 {
    const NAME: &'static str = "evolving";
    type Input = ();
    type Output = String;
    async fn run(&self, ctx: &WorkflowContext, _: ()) -> Result<String, WorkflowError> {
        ctx.step("a", || async { Ok(1) }).await?;
        ctx.wait_for_signal::<()>("go", None).await?;
        ctx.step("b", || async { Ok(2) }).await?;
        Ok("v1".into())
    }
}

/// The same name and version with step `a` renamed: a change that breaks running runs.
struct EvolvingRenamed;
impl Workflow for EvolvingRenamed {
    const NAME: &'static str = "evolving";
    type Input = ();
    type Output = String;
    async fn run(&self, ctx: &WorkflowContext, _: ()) -> Result<String, WorkflowError> {
        ctx.step("a_renamed", || async { Ok(1) }).await?;
        ctx.wait_for_signal::<()>("go", None).await?;
        Ok("renamed".into())
    }
}

/// Version 2, registered beside version 1.
struct EvolvingV2;
impl Workflow for EvolvingV2 {
    const NAME: &'static str = "evolving";
    const VERSION: i32 = 2;
    type Input = ();
    type Output = String;
    async fn run(&self, ctx: &WorkflowContext, _: ()) -> Result<String, WorkflowError> {
        ctx.step("x", || async { Ok(1) }).await?;
        Ok("v2".into())
    }
}

pub async fn a_renamed_step_is_a_non_determinism_error<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let client = Client::new(store.clone());
    let w = worker(&store, |w| w.register_workflow(EvolvingV1));
    let run = client
        .start_workflow::<EvolvingV1>(&(), "ev")
        .await
        .unwrap();
    wait_until_waiting_for(&client, run.run_id(), "go").await;
    w.shutdown().await.unwrap();
    // The code changes under the waiting run.
    let w = worker(&store, |w| w.register_workflow(EvolvingRenamed));
    run.signal("go", &()).await.unwrap();
    let err = run.result(WAIT).await.unwrap_err();
    let Error::WorkflowFailed {
        status, message, ..
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(*status, RunStatus::Failed);
    assert!(
        message.contains("non-determinism at history position 0")
            && message.contains("\"a_renamed\"")
            && message.contains("\"a\""),
        "{message}"
    );
    w.shutdown().await.unwrap();
}

pub async fn versions_run_side_by_side_and_an_unknown_version_waits<F: Fixture>(
    _fx: Arc<F>,
    store: F::Store,
) {
    let client = Client::new(store.clone());
    let w = worker(&store, |w| w.register_workflow(EvolvingV1));
    let v2 = client
        .start_workflow::<EvolvingV2>(&(), "ev2")
        .await
        .unwrap();
    // No worker runs version 2 yet: the run waits, and says why.
    let start = std::time::Instant::now();
    loop {
        let info = v2.describe().await.unwrap();
        if let Some(note) = &info.run.note {
            assert!(note.contains("version 2"), "{note}");
            assert!(!info.status.is_terminal());
            break;
        }
        assert!(start.elapsed() < WAIT, "no note on {info:#?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    w.shutdown().await.unwrap();
    // A worker with both versions runs old and new runs side by side.
    let w = worker(&store, |w| {
        w.register_workflow(EvolvingV1)
            .register_workflow(EvolvingV2)
    });
    let v1 = client
        .start_workflow::<EvolvingV1>(&(), "ev1")
        .await
        .unwrap();
    assert_eq!(v2.result(WAIT).await.unwrap(), "v2");
    assert_eq!(v2.describe().await.unwrap().run.note, None);
    wait_until_waiting_for(&client, v1.run_id(), "go").await;
    v1.signal("go", &()).await.unwrap();
    assert_eq!(v1.result(WAIT).await.unwrap(), "v1");
    assert_eq!(v1.describe().await.unwrap().run.version, 1);
    w.shutdown().await.unwrap();
}

/// A child that doubles, or waits for a signal that never comes.
struct Child;
impl Workflow for Child {
    const NAME: &'static str = "child";
    type Input = i64;
    type Output = i64;
    async fn run(&self, ctx: &WorkflowContext, n: i64) -> Result<i64, WorkflowError> {
        if n < 0 {
            ctx.wait_for_signal::<()>("never", None).await?;
        }
        ctx.step("double", || async { Ok(n * 2) }).await
    }
}

struct Parent(Log);
impl Workflow for Parent {
    const NAME: &'static str = "parent";
    type Input = i64;
    type Output = i64;
    async fn run(&self, ctx: &WorkflowContext, n: i64) -> Result<i64, WorkflowError> {
        let log = self.0.clone();
        ctx.step("prepare", || async {
            log.push("prepare");
            Ok(())
        })
        .compensate_with({
            let log = self.0.clone();
            move |_: ()| async move {
                log.push("undo prepare");
                Ok(())
            }
        })
        .await?;
        let child = ctx.start_child::<Child>(&n).await?;
        let out = ctx.wait_child(&child).await?;
        Ok(out + 1)
    }
}

pub async fn child_results_and_cancel_cascades<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let log = Log::default();
    let w = worker(&store, |w| {
        w.register_workflow(Parent(log.clone()))
            .register_workflow(Child)
    });
    let client = Client::new(store.clone());
    let parent = client.start_workflow::<Parent>(&20, "p1").await.unwrap();
    assert_eq!(parent.result(WAIT).await.unwrap(), 41);
    let info = parent.describe().await.unwrap();
    let kinds: Vec<StepKind> = info.steps.iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds,
        vec![StepKind::Step, StepKind::Child, StepKind::ChildResult]
    );
    let children = client
        .list_workflows(&RunFilter {
            parent_id: Some(parent.run_id()),
            ..RunFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(children.len(), 1);
    assert_eq!(children[0].status, RunStatus::Completed);
    assert_eq!(children[0].run.parent_id, Some(parent.run_id()));

    // Cancelling a parent that waits on a child cancels the child too.
    let parent = client.start_workflow::<Parent>(&-1, "p2").await.unwrap();
    let start = std::time::Instant::now();
    let child = loop {
        let children = client
            .list_workflows(&RunFilter {
                parent_id: Some(parent.run_id()),
                ..RunFilter::default()
            })
            .await
            .unwrap();
        if let Some(c) = children.first()
            && c.status == RunStatus::Waiting
        {
            break c.run.id;
        }
        assert!(start.elapsed() < WAIT, "the child never waited");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    status_becomes(&client, parent.run_id(), RunStatus::Waiting).await;
    assert_eq!(
        parent.cancel().await.unwrap(),
        RunCancel::Requested { runs: 2 }
    );
    status_becomes(&client, child, RunStatus::Cancelled).await;
    let err = parent.result(WAIT).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::WorkflowFailed {
                status: RunStatus::Compensated,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        parent.describe().await.unwrap().run.end_reason,
        Some(RunStatus::Cancelled)
    );
    assert_eq!(log.count("undo prepare"), 1);
    assert_eq!(
        parent.cancel().await.unwrap(),
        RunCancel::AlreadyFinished(RunStatus::Compensated)
    );
    w.shutdown().await.unwrap();
}

/// Fails at `c` while the flag says so.
struct Fragile(Log, Arc<Mutex<bool>>);
impl Workflow for Fragile {
    const NAME: &'static str = "fragile";
    type Input = ();
    type Output = String;
    async fn run(&self, ctx: &WorkflowContext, _: ()) -> Result<String, WorkflowError> {
        let mut out = String::new();
        for name in ["a", "b", "c"] {
            let log = self.0.clone();
            let broken = self.1.clone();
            let part: String = ctx
                .step(name, || async {
                    log.push(name);
                    if name == "c" && *broken.lock().unwrap() {
                        return Err(WorkflowError::permanent("c is broken"));
                    }
                    Ok(name.to_owned())
                })
                .await?;
            out.push_str(&part);
        }
        Ok(out)
    }
}

pub async fn restart_from_a_step_reuses_the_steps_before_it<F: Fixture>(
    _fx: Arc<F>,
    store: F::Store,
) {
    let log = Log::default();
    let broken = Arc::new(Mutex::new(true));
    let w = worker(&store, |w| {
        w.register_workflow(Fragile(log.clone(), broken.clone()))
    });
    let client = Client::new(store.clone());
    let run = client.start_workflow::<Fragile>(&(), "fr").await.unwrap();
    assert!(run.result(WAIT).await.is_err());
    assert_eq!(log.all(), vec!["a", "b", "c"]);
    // Not a step of the run; not an ended run: typed refusals.
    let err = client.restart_from(run.run_id(), "zzz").await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument { what: "step", reason } if reason.contains("\"a\"")),
        "{err}"
    );
    *broken.lock().unwrap() = false;
    let new = client.restart_from(run.run_id(), "b").await.unwrap();
    assert_ne!(new, run.run_id());
    let out: String = client.workflow_result(new, WAIT).await.unwrap();
    assert_eq!(out, "abc");
    assert_eq!(
        log.all(),
        vec!["a", "b", "c", "b", "c"],
        "a came from the record"
    );
    let old = client.describe(run.run_id()).await.unwrap();
    let fresh = client.describe(new).await.unwrap();
    assert_eq!(old.run.superseded_by, Some(new));
    assert_eq!(fresh.run.restarted_from, Some(run.run_id()));
    assert_eq!(client.find_workflow("fragile", "fr").await.unwrap(), new);
    let err = client.restart_from(run.run_id(), "b").await.unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { what: "run", .. }),
        "{err}"
    );
    w.shutdown().await.unwrap();
}

/// Takes a number.
struct Numbers;
impl Workflow for Numbers {
    const NAME: &'static str = "numbers";
    type Input = u32;
    type Output = u32;
    async fn run(&self, _ctx: &WorkflowContext, n: u32) -> Result<u32, WorkflowError> {
        Ok(n)
    }
}

/// The same name, started with text: its input does not fit `Numbers`.
struct NumbersAsText;
impl Workflow for NumbersAsText {
    const NAME: &'static str = "numbers";
    type Input = String;
    type Output = u32;
    async fn run(&self, _ctx: &WorkflowContext, _: String) -> Result<u32, WorkflowError> {
        Ok(0)
    }
}

pub async fn bad_input_to_workflows_is_a_typed_error<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let client = Client::new(store.clone());
    let unknown = Uuid::now_v7();
    let err = client.describe(unknown).await.unwrap_err();
    assert_eq!(err.code(), "run_not_found", "{err}");
    let err = client.signal(unknown, "x", &1).await.unwrap_err();
    assert_eq!(err.code(), "run_not_found", "{err}");
    let err = client.query::<u32>(unknown, "k").await.unwrap_err();
    assert_eq!(err.code(), "run_not_found", "{err}");
    let err = client.cancel_workflow(unknown).await.unwrap_err();
    assert_eq!(err.code(), "run_not_found", "{err}");
    let err = client
        .find_workflow("no-such-workflow", "x")
        .await
        .unwrap_err();
    assert_eq!(err.code(), "run_not_found", "{err}");
    let err = client.restart_from(unknown, "a").await.unwrap_err();
    assert_eq!(err.code(), "run_not_found", "{err}");
    let err = client
        .start_workflow::<Numbers>(&1, &"x".repeat(600))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "invalid_argument", "{err}");
    let err = client.signal(unknown, "", &1).await.unwrap_err();
    assert_eq!(err.code(), "invalid_argument", "{err}");

    let w = worker(&store, |w| w.register_workflow(Numbers));
    let bad = client
        .start_workflow::<NumbersAsText>(&"seven".to_owned(), "n1")
        .await
        .unwrap();
    let err = client
        .workflow_result::<u32>(bad.run_id(), WAIT)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::WorkflowFailed { status: RunStatus::Failed, message, .. } if message.contains("input does not fit")),
        "{err}"
    );
    let good = client.start_workflow::<Numbers>(&7, "n2").await.unwrap();
    assert_eq!(good.result(WAIT).await.unwrap(), 7);
    // A wait that times out says so, and the run goes on.
    let slow = client
        .start_workflow::<Approvals>(&(), "slow")
        .await
        .unwrap();
    let err = slow.result(Duration::from_millis(50)).await.unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err}");
    assert_eq!(slow.get().await.unwrap(), None);
    w.shutdown().await.unwrap();
}

/// Waits for a signal that never comes, under a 1 s whole-run timeout.
struct Patient(Log);
impl Workflow for Patient {
    const NAME: &'static str = "patient";
    type Input = ();
    type Output = ();
    fn options() -> WorkflowOptions {
        WorkflowOptions {
            timeout: Some(Duration::from_secs(1)),
            ..options()
        }
    }
    async fn run(&self, ctx: &WorkflowContext, _: ()) -> Result<(), WorkflowError> {
        let log = self.0.clone();
        ctx.step("reserve", || async { Ok(()) })
            .compensate_with(move |_: ()| async move {
                log.push("release");
                Ok(())
            })
            .await?;
        ctx.wait_for_signal::<()>("never", None).await?;
        Ok(())
    }
}

/// Waits for nothing, then runs a step that takes far longer than the timeout.
struct Slowpoke;
impl Workflow for Slowpoke {
    const NAME: &'static str = "slowpoke";
    type Input = ();
    type Output = ();
    fn options() -> WorkflowOptions {
        WorkflowOptions {
            timeout: Some(Duration::from_millis(500)),
            ..options()
        }
    }
    async fn run(&self, ctx: &WorkflowContext, _: ()) -> Result<(), WorkflowError> {
        ctx.step("forever", || async {
            std::future::pending::<()>().await;
            Ok(())
        })
        .await
    }
}

pub async fn the_whole_run_timeout_ends_a_run<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let log = Log::default();
    let w = worker(&store, |w| {
        w.register_workflow(Patient(log.clone()))
            .register_workflow(Slowpoke)
    });
    let client = Client::new(store.clone());
    let patient = client.start_workflow::<Patient>(&(), "pt").await.unwrap();
    let slow = client.start_workflow::<Slowpoke>(&(), "sp").await.unwrap();
    let err = patient.result(WAIT).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::WorkflowFailed {
                status: RunStatus::Compensated,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        patient.describe().await.unwrap().run.end_reason,
        Some(RunStatus::TimedOut)
    );
    assert_eq!(log.all(), vec!["release"]);
    let err = slow.result(WAIT).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::WorkflowFailed {
                status: RunStatus::TimedOut,
                ..
            }
        ),
        "a step running past the run's timeout ends it: {err}"
    );
    w.shutdown().await.unwrap();
}

/// Forge's explicit step API, and a loop of steps of one name.
struct Explicit(Log);
impl Workflow for Explicit {
    const NAME: &'static str = "explicit";
    type Input = ();
    type Output = (String, u32);
    async fn run(&self, ctx: &WorkflowContext, _: ()) -> Result<(String, u32), WorkflowError> {
        if !ctx.is_step_completed("token") {
            ctx.record_step_start("token").await?;
            self.0.push("token");
            ctx.record_step_complete("token", &"t-123").await?;
        }
        let token: String = ctx.get_step_result("token")?.expect("completed above");
        let mut sum = 0;
        for i in 1..=3u32 {
            let log = self.0.clone();
            sum += ctx
                .step_with(
                    "add",
                    StepOptions {
                        retry: Some(quick_retry(3)),
                        timeout: Some(Duration::from_secs(5)),
                    },
                    || async {
                        log.push(format!("add {i}"));
                        Ok(i)
                    },
                )
                .await?;
        }
        // A suspension after the steps makes every step above replay once.
        ctx.sleep(Duration::from_millis(100)).await?;
        Ok((token, sum))
    }
}

pub async fn forges_explicit_step_api_and_loops<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let log = Log::default();
    let w = worker(&store, |w| w.register_workflow(Explicit(log.clone())));
    let client = Client::new(store.clone());
    let run = client.start_workflow::<Explicit>(&(), "ex").await.unwrap();
    assert_eq!(run.result(WAIT).await.unwrap(), ("t-123".to_owned(), 6));
    assert_eq!(log.all(), vec!["token", "add 1", "add 2", "add 3"]);
    let names: Vec<String> = run
        .describe()
        .await
        .unwrap()
        .steps
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, vec!["token", "add", "add#2", "add#3", "sleep"]);
    // watch yields the run's changes and ends with it.
    let seen: Vec<_> = client.watch_workflow(run.run_id()).collect().await;
    let last = seen.last().unwrap().as_ref().unwrap();
    assert_eq!(last.status, RunStatus::Completed);
    w.shutdown().await.unwrap();
}

pub async fn start_workflow_in_commits_or_rolls_back_with_the_callers_transaction<F: Fixture>(
    _fx: Arc<F>,
    store: F::Store,
) {
    let client = Client::new(store.clone());
    let mut tx = store.pool().begin().await.unwrap();
    let rolled = client
        .start_workflow_in::<Numbers>(&mut *tx, &1, StartOptions::new().workflow_id("tx-1"))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let err = client.describe(rolled.run_id()).await.unwrap_err();
    assert_eq!(err.code(), "run_not_found", "rolled back: no run");
    assert!(client.find_workflow("numbers", "tx-1").await.is_err());

    let mut tx = store.pool().begin().await.unwrap();
    let kept = client
        .start_workflow_in::<Numbers>(&mut *tx, &2, StartOptions::new().workflow_id("tx-1"))
        .await
        .unwrap();
    // Inside the same transaction the workflow id is taken already.
    let again = client
        .start_workflow_in::<Numbers>(&mut *tx, &3, StartOptions::new().workflow_id("tx-1"))
        .await
        .unwrap();
    assert_eq!(again.run_id(), kept.run_id());
    assert!(again.is_existing());
    tx.commit().await.unwrap();
    let w = worker(&store, |w| w.register_workflow(Numbers));
    assert_eq!(kept.result(WAIT).await.unwrap(), 2, "committed: it runs");
    w.shutdown().await.unwrap();
}

/// Panics in its step on the run's first attempt.
struct Panicky(Log);
impl Workflow for Panicky {
    const NAME: &'static str = "panicky";
    type Input = ();
    type Output = String;
    fn options() -> WorkflowOptions {
        options()
    }
    async fn run(&self, ctx: &WorkflowContext, _: ()) -> Result<String, WorkflowError> {
        let log = self.0.clone();
        let attempt = ctx.attempt();
        ctx.step("fragile", || async {
            log.push(format!("try {attempt}"));
            if attempt == 1 {
                panic!("the disk is on fire");
            }
            Ok("survived".to_owned())
        })
        .await
    }
}

pub async fn a_panic_is_a_transient_failure<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let log = Log::default();
    let w = worker(&store, |w| w.register_workflow(Panicky(log.clone())));
    let client = Client::new(store.clone());
    let run = client.start_workflow::<Panicky>(&(), "pn").await.unwrap();
    assert_eq!(run.result(WAIT).await.unwrap(), "survived");
    assert_eq!(log.all(), vec!["try 1", "try 2"]);
    let info = run.describe().await.unwrap();
    assert_eq!(info.attempt, 2);
    assert_eq!(info.steps[0].attempts, 2);
    let job = client.get(run.run_id()).await.unwrap().unwrap();
    assert!(
        job.errors[0]
            .message
            .contains("panicked: the disk is on fire"),
        "{:?}",
        job.errors
    );
    w.shutdown().await.unwrap();
}

/// Holds its first step until the run is cancelled (as a long step that watches for it).
struct Gate(Log);
impl Workflow for Gate {
    const NAME: &'static str = "gate";
    type Input = ();
    type Output = ();
    async fn run(&self, ctx: &WorkflowContext, _: ()) -> Result<(), WorkflowError> {
        let log = self.0.clone();
        let undo = self.0.clone();
        ctx.step("hold", || async {
            log.push("hold");
            ctx.cancelled().await;
            log.push("saw the cancel");
            Ok(())
        })
        .compensate_with(move |()| async move {
            undo.push("undo hold");
            Ok(())
        })
        .await?;
        let log = self.0.clone();
        ctx.step("after", || async {
            log.push("after");
            Ok(())
        })
        .await
    }
}

pub async fn a_cancel_stops_a_running_run_at_its_next_step<F: Fixture>(
    _fx: Arc<F>,
    store: F::Store,
) {
    let log = Log::default();
    let w = worker(&store, |w| w.register_workflow(Gate(log.clone())));
    let client = Client::new(store.clone());
    let run = client.start_workflow::<Gate>(&(), "gt").await.unwrap();
    // The step runs longer than a moment: describe shows it running.
    let start = std::time::Instant::now();
    loop {
        let info = run.describe().await.unwrap();
        if info
            .steps
            .first()
            .is_some_and(|s| s.status == StepStatus::Running)
        {
            assert_eq!(info.status, RunStatus::Running);
            break;
        }
        assert!(start.elapsed() < WAIT, "never recorded running: {info:#?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        run.cancel().await.unwrap(),
        RunCancel::Requested { runs: 1 }
    );
    // The worker learns of it at a heartbeat; the step in flight sees it and finishes.
    let err = run.result(WAIT).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::WorkflowFailed {
                status: RunStatus::Compensated,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        log.all(),
        vec!["hold", "saw the cancel", "undo hold"],
        "`after` never ran"
    );
    let info = run.describe().await.unwrap();
    assert_eq!(info.run.end_reason, Some(RunStatus::Cancelled));
    assert_eq!(info.steps.len(), 1);
    w.shutdown().await.unwrap();
}

pub async fn an_unreadable_run_costs_only_itself<F: Fixture>(fx: Arc<F>, store: F::Store) {
    let client = Client::new(store.clone());
    let bad = client.start_workflow::<Numbers>(&1, "bad").await.unwrap();
    let good = client.start_workflow::<Numbers>(&2, "good").await.unwrap();
    // A newer version's status, say, that this build does not know.
    fx.set_run_columns(&store, bad.run_id(), "status = 'hibernating'")
        .await;
    let w = worker(&store, |w| w.register_workflow(Numbers));
    assert_eq!(good.result(WAIT).await.unwrap(), 2, "the neighbour runs");
    // The bad run's job fails for good, saying which column and what it found.
    let start = std::time::Instant::now();
    let job = loop {
        let job = client.get(bad.run_id()).await.unwrap().unwrap();
        if job.state == dray_core::MessageState::Dead {
            break job;
        }
        assert!(start.elapsed() < WAIT, "{job:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let why = &job.errors.last().unwrap().message;
    assert!(
        why.contains("status") && why.contains("hibernating"),
        "{why}"
    );
    // Lists still show both; the bad one says what is wrong with it.
    let runs = client.list_workflows(&RunFilter::default()).await.unwrap();
    assert_eq!(runs.len(), 2);
    let listed = runs.iter().find(|r| r.run.id == bad.run_id()).unwrap();
    assert!(
        listed
            .run
            .unreadable
            .as_deref()
            .is_some_and(|u| u.contains("hibernating")),
        "{listed:?}"
    );
    let info = client.describe(bad.run_id()).await.unwrap();
    assert!(info.run.unreadable.is_some());
    // Fixed and re-driven, it runs.
    fx.set_run_columns(&store, bad.run_id(), "status = 'queued'")
        .await;
    client.retry(bad.run_id()).await.unwrap();
    assert_eq!(bad.result(WAIT).await.unwrap(), 1);
    w.shutdown().await.unwrap();
}
