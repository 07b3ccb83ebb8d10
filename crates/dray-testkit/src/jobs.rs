//! Conformance tests of typed jobs, the worker and the client, run against every store.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dray_core::{
    Backoff, CallbackSettle, CancelOutcome, Client, Completion, Error, FailTo, FailureKind, Job,
    JobContext, JobError, JobFilter, JobOptions, LeaseRef, MessageState, Queue, ReceiveOptions,
    RetryPolicy, Store, Worker, WorkerEvent, WorkerHandle,
};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, broadcast};
use uuid::Uuid;

use crate::Fixture;

const WAIT: Duration = Duration::from_secs(20);

fn fast_retry(max_attempts: i32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        backoff: Backoff::Fixed,
        base: Duration::from_millis(200),
        max: Duration::from_secs(1),
        jitter: false,
    }
}

/// Starts a worker with short leases and heartbeats (so tests see them act quickly).
fn worker<S: Store>(store: &S, build: impl FnOnce(Worker<S>) -> Worker<S>) -> WorkerHandle {
    build(Worker::new(store.clone()).configure(|c| {
        c.lease = Duration::from_secs(2);
        c.heartbeat = Duration::from_millis(100);
        c.maintenance_interval = Duration::from_millis(100);
        c.shutdown_grace = Duration::from_millis(300);
    }))
    .start()
    .unwrap()
}

/// Waits for a worker event matching `pred`.
async fn event(
    rx: &mut broadcast::Receiver<WorkerEvent>,
    what: &str,
    pred: impl Fn(&WorkerEvent) -> bool,
) -> WorkerEvent {
    let wait = async {
        loop {
            match rx.recv().await {
                Ok(e) if pred(&e) => return e,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("worker events ended while waiting for {what}: {e}"),
            }
        }
    };
    tokio::time::timeout(WAIT, wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Fails with a transient error until attempt `succeed_on`, then returns `n * 2`.
struct Flaky;
#[derive(Serialize, Deserialize)]
struct FlakyIn {
    n: i64,
    succeed_on: i32,
}
impl Job for Flaky {
    const NAME: &'static str = "flaky";
    type Input = FlakyIn;
    type Output = i64;
    fn options() -> JobOptions {
        JobOptions {
            retry: fast_retry(5),
            ..JobOptions::default()
        }
    }
    async fn run(&self, ctx: &JobContext, input: FlakyIn) -> Result<i64, JobError> {
        if ctx.attempt() < input.succeed_on {
            return Err(std::io::Error::other(format!("boom on attempt {}", ctx.attempt())).into());
        }
        ctx.heartbeat().await?; // holds the lease: succeeds
        Ok(input.n * 2)
    }
}

pub async fn retries_follow_the_backoff_then_succeed<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let w = worker(&store, |w| w.register(Flaky));
    let client = Client::new(store.clone());
    let e = client
        .enqueue::<Flaky>(&FlakyIn {
            n: 21,
            succeed_on: 3,
        })
        .await
        .unwrap();
    let out = client.wait(e.id, WAIT).await.unwrap();
    assert_eq!(out.state, MessageState::Completed);
    assert_eq!(out.attempts, 3, "completed on attempt 3");
    assert_eq!(out.output::<i64>().unwrap(), 42);
    assert_eq!(out.errors.len(), 2, "two recorded errors");
    assert_eq!((out.errors[0].attempt, out.errors[1].attempt), (1, 2));
    assert!(out.errors.iter().all(|e| e.kind == FailureKind::Error));
    assert!(out.errors[0].message.contains("boom on attempt 1"));
    // Fixed backoff of 200 ms, measured on the database clock between the recorded failures;
    // tolerance: the next attempt starts within a poll interval (+ scheduling) of being due.
    let gap = out.errors[1].at - out.errors[0].at;
    assert!(
        gap >= chrono::Duration::milliseconds(200),
        "retried too early: {gap}"
    );
    let slack = store.poll_interval() + Duration::from_millis(800);
    assert!(
        gap <= chrono::Duration::milliseconds(200) + chrono::Duration::from_std(slack).unwrap(),
        "retried too late: {gap}"
    );
    w.shutdown().await.unwrap();
}

/// Sleeps far longer than its timeout.
struct Slow;
impl Job for Slow {
    const NAME: &'static str = "slow";
    type Input = ();
    type Output = ();
    fn options() -> JobOptions {
        JobOptions {
            timeout: Some(Duration::from_millis(150)),
            retry: fast_retry(2),
            ..JobOptions::default()
        }
    }
    async fn run(&self, _ctx: &JobContext, _: ()) -> Result<(), JobError> {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok(())
    }
}

pub async fn timeouts_count_as_failed_attempts<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let w = worker(&store, |w| w.register(Slow));
    let client = Client::new(store.clone());
    let e = client.enqueue::<Slow>(&()).await.unwrap();
    let out = client.wait(e.id, WAIT).await.unwrap();
    assert_eq!(
        out.state,
        MessageState::Dead,
        "out of attempts after timing out twice"
    );
    assert_eq!(out.errors.len(), 2);
    assert!(out.errors.iter().all(|e| e.kind == FailureKind::Timeout));
    assert!(
        out.errors[0].message.contains("timed out after 150ms"),
        "{}",
        out.errors[0].message
    );
    let err = out.output::<()>().unwrap_err();
    assert!(
        matches!(
            err,
            Error::JobFailed {
                state: MessageState::Dead,
                ..
            }
        ),
        "{err}"
    );
    w.shutdown().await.unwrap();
}

/// Panics on its first attempt.
struct Panicky;
impl Job for Panicky {
    const NAME: &'static str = "panicky";
    type Input = ();
    type Output = String;
    fn options() -> JobOptions {
        JobOptions {
            retry: fast_retry(3),
            ..JobOptions::default()
        }
    }
    async fn run(&self, ctx: &JobContext, _: ()) -> Result<String, JobError> {
        if ctx.attempt() == 1 {
            panic!("the handler blew up");
        }
        Ok("recovered".into())
    }
}

/// Fails permanently.
struct Doomed;
impl Job for Doomed {
    const NAME: &'static str = "doomed";
    type Input = String;
    type Output = ();
    fn options() -> JobOptions {
        JobOptions {
            retry: fast_retry(5),
            ..JobOptions::default()
        }
    }
    async fn run(&self, _ctx: &JobContext, why: String) -> Result<(), JobError> {
        Err(JobError::permanent(why))
    }
}

pub async fn panics_retry_and_permanent_errors_do_not<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let w = worker(&store, |w| w.register(Panicky).register(Doomed));
    let client = Client::new(store.clone());
    let p = client.enqueue::<Panicky>(&()).await.unwrap();
    let out = client.wait(p.id, WAIT).await.unwrap();
    assert_eq!(out.output::<String>().unwrap(), "recovered");
    assert_eq!(out.errors.len(), 1);
    assert_eq!(out.errors[0].kind, FailureKind::Panic);
    assert!(out.errors[0].message.contains("the handler blew up"));

    let d = client
        .enqueue::<Doomed>(&"bad input".to_owned())
        .await
        .unwrap();
    let out = client.wait(d.id, WAIT).await.unwrap();
    assert_eq!(out.state, MessageState::Dead);
    assert_eq!(out.attempts, 1, "a permanent error is not retried");
    assert_eq!(out.errors[0].kind, FailureKind::Permanent);
    let err = client
        .submit_and_wait::<Doomed>(&"still bad".to_owned(), WAIT)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::JobFailed { message, .. } if message == "still bad"),
        "{err}"
    );
    assert_eq!(err.code(), "job_failed");
    w.shutdown().await.unwrap();
}

/// Reports progress step by step, each step released by the test, then waits for a cancel.
struct Stepper {
    gate: Arc<Semaphore>,
}
impl Job for Stepper {
    const NAME: &'static str = "stepper";
    type Input = bool; // true: wait for cancellation at the end
    type Output = u8;
    async fn run(&self, ctx: &JobContext, wait_cancel: bool) -> Result<u8, JobError> {
        for p in [0u8, 25, 50, 75, 100] {
            self.gate
                .acquire()
                .await
                .map_err(JobError::transient)?
                .forget();
            ctx.progress(p, format!("step {p}")).await?;
        }
        if wait_cancel {
            ctx.cancelled().await;
            return Err(JobError::Cancelled);
        }
        Ok(100)
    }
}

pub async fn watch_sees_progress_from_0_to_100<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let gate = Arc::new(Semaphore::new(0));
    let w = worker(&store, |w| w.register(Stepper { gate: gate.clone() }));
    let client = Client::new(store.clone());
    let e = client.enqueue::<Stepper>(&false).await.unwrap();
    assert!(
        client.result(e.id).await.unwrap().is_none(),
        "no result while pending"
    );
    let mut watch = std::pin::pin!(client.watch(e.id));
    let mut seen = Vec::new();
    gate.add_permits(1);
    while let Some(s) = watch.next().await {
        let s = s.unwrap();
        if let Some(p) = s.progress
            && seen.last() != Some(&p)
        {
            seen.push(p);
            assert_eq!(s.message.as_deref(), Some(format!("step {p}").as_str()));
            gate.add_permits(1); // release the next step only once this one was seen
        }
        if s.state.is_terminal() {
            assert_eq!(s.state, MessageState::Completed);
            break;
        }
    }
    assert_eq!(seen, vec![0, 25, 50, 75, 100]);
    assert_eq!(
        client
            .result(e.id)
            .await
            .unwrap()
            .unwrap()
            .output::<u8>()
            .unwrap(),
        100
    );
    w.shutdown().await.unwrap();
}

pub async fn cancel_a_queued_and_a_running_job<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let gate = Arc::new(Semaphore::new(0));
    let w = worker(&store, |w| {
        w.register(Stepper { gate: gate.clone() }).register(Flaky)
    });
    let mut events = w.events();
    let client = Client::new(store.clone());

    // Queued (not due for an hour): cancelled at once, never runs.
    let later = client
        .enqueue_with::<Flaky>(
            &FlakyIn {
                n: 1,
                succeed_on: 1,
            },
            |o| o.delay(Duration::from_secs(3600)),
        )
        .await
        .unwrap();
    assert_eq!(
        client.cancel(later.id).await.unwrap(),
        CancelOutcome::Cancelled
    );
    let out = client.result(later.id).await.unwrap().unwrap();
    assert_eq!(out.state, MessageState::Cancelled);
    assert_eq!(out.attempts, 0, "never ran");
    assert_eq!(
        client.cancel(later.id).await.unwrap(),
        CancelOutcome::AlreadyFinished(MessageState::Cancelled)
    );

    // Running: the handler sees the request at the next heartbeat and stops.
    let running = client.enqueue::<Stepper>(&true).await.unwrap();
    gate.add_permits(5);
    event(
        &mut events,
        "the stepper to start",
        |e| matches!(e, WorkerEvent::Started { id, .. } if *id == running.id),
    )
    .await;
    assert_eq!(
        client.cancel(running.id).await.unwrap(),
        CancelOutcome::Requested
    );
    let out = client.wait(running.id, WAIT).await.unwrap();
    assert_eq!(out.state, MessageState::Cancelled);
    assert_eq!(out.errors.last().unwrap().kind, FailureKind::Cancelled);
    let err = client.cancel(Uuid::now_v7()).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }));
    w.shutdown().await.unwrap();
}

pub async fn submit_and_wait_result_and_callbacks<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let w = worker(&store, |w| w.register(Flaky).register(Doomed));
    let client = Client::new(store.clone());
    let out = client
        .submit_and_wait::<Flaky>(
            &FlakyIn {
                n: 5,
                succeed_on: 1,
            },
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(out, 10);

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for (job, tx) in [("ok", tx.clone()), ("dead", tx.clone())] {
        if job == "ok" {
            client
                .enqueue_with_callback::<Flaky>(
                    &FlakyIn {
                        n: 1,
                        succeed_on: 2,
                    },
                    move |o| tx.send(("ok", o.unwrap().state)).unwrap(),
                )
                .await
                .unwrap();
        } else {
            client
                .enqueue_with_callback::<Doomed>(&"no".to_owned(), move |o| {
                    tx.send(("dead", o.unwrap().state)).unwrap()
                })
                .await
                .unwrap();
        }
    }
    drop(tx);
    let mut got = Vec::new();
    while let Some(x) = tokio::time::timeout(WAIT, rx.recv()).await.unwrap() {
        got.push(x);
    }
    got.sort_by_key(|x| x.0);
    assert_eq!(
        got,
        vec![
            ("dead", MessageState::Dead),
            ("ok", MessageState::Completed)
        ],
        "each callback fired exactly once"
    );

    let err = client.result(Uuid::now_v7()).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }));
    w.shutdown().await.unwrap();
}

pub async fn fencing_refuses_a_worker_whose_lease_was_taken<F: Fixture>(
    _fx: Arc<F>,
    store: F::Store,
) {
    // Store level: the first holder's completion, failure and progress change nothing.
    let q = Queue::new(store.clone());
    let client = Client::from_queue(q.clone());
    let e = client
        .enqueue::<Flaky>(&FlakyIn {
            n: 1,
            succeed_on: 1,
        })
        .await
        .unwrap();
    let short = ReceiveOptions {
        limit: 1,
        wait: Duration::ZERO,
        lease: Some(Duration::from_millis(200)),
    };
    let first = q.receive_with("default", &short).await.unwrap().remove(0);
    let second = q.receive("default", 1, WAIT).await.unwrap().remove(0);
    assert_eq!(second.attempt, 2, "redelivered after the lease ended");
    let stale = first.lease();
    let w = store
        .job_complete_many(&[Completion {
            lease: stale,
            result: Some("1".into()),
        }])
        .await
        .unwrap();
    assert!(w.applied.is_empty());
    assert!(
        store
            .job_fail(stale, FailureKind::Error, "late", FailTo::Dead)
            .await
            .unwrap()
            .applied
            .is_empty()
    );
    assert!(
        store
            .job_progress(stale, 50, None)
            .await
            .unwrap()
            .applied
            .is_empty()
    );
    let now = client.get(e.id).await.unwrap().unwrap();
    assert_eq!(
        (now.state, now.attempt, now.result.clone()),
        (MessageState::Running, 2, None)
    );
    // In one batch with a stale lease, the live one still completes, and only it is applied.
    let w = store
        .job_complete_many(&[
            Completion {
                lease: stale,
                result: Some("1".into()),
            },
            Completion {
                lease: second.lease(),
                result: Some("2".into()),
            },
        ])
        .await
        .unwrap();
    assert_eq!(w.applied, vec![e.id]);
    assert_eq!(
        client.get(e.id).await.unwrap().unwrap().attempt,
        2,
        "the stale completion changed nothing"
    );
    assert_eq!(
        client
            .result(e.id)
            .await
            .unwrap()
            .unwrap()
            .output::<i64>()
            .unwrap(),
        2
    );

    // Worker level: a paused handler loses its lease; its context reports LeaseLost and its
    // completion is refused.
    let gate = Arc::new(Semaphore::new(0));
    // One slot: while the paused attempt holds it, this worker claims nothing else.
    let wk = worker(&store, |w| {
        w.register(Stepper { gate: gate.clone() })
            .queue("default", 1)
            .unwrap()
    });
    let mut events = wk.events();
    let job = client.enqueue::<Stepper>(&false).await.unwrap();
    event(
        &mut events,
        "the stepper to start",
        |e| matches!(e, WorkerEvent::Started { id, .. } if *id == job.id),
    )
    .await;
    // Take the job away as a rescue would (unfenced requeue), and lease it elsewhere.
    q.nack("default", [job.id], true).await.unwrap();
    let thief = q.receive("default", 1, WAIT).await.unwrap().remove(0);
    assert_eq!(thief.attempt, 2);
    gate.add_permits(5);
    let fin = event(
        &mut events,
        "the stale attempt to end",
        |e| matches!(e, WorkerEvent::Finished { id, .. } if *id == job.id),
    )
    .await;
    assert!(
        matches!(
            fin,
            WorkerEvent::Finished {
                attempt: 1,
                recorded: false,
                ..
            }
        ),
        "{fin:?}"
    );
    let m = client.get(job.id).await.unwrap().unwrap();
    assert_eq!(
        (m.state, m.attempt),
        (MessageState::Running, 2),
        "the new holder is untouched"
    );
    wk.shutdown().await.unwrap();
}

/// Unique per input.
struct Once;
impl Job for Once {
    const NAME: &'static str = "once";
    type Input = u32;
    type Output = ();
    fn options() -> JobOptions {
        JobOptions {
            unique: true,
            queue: "unique".into(),
            ..JobOptions::default()
        }
    }
    async fn run(&self, _ctx: &JobContext, _: u32) -> Result<(), JobError> {
        Ok(())
    }
}

pub async fn unique_jobs_under_concurrent_enqueues<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let client = Client::new(store.clone());
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let c = client.clone();
        tasks.push(tokio::spawn(
            async move { c.enqueue::<Once>(&7).await.unwrap() },
        ));
    }
    let mut ids = HashSet::new();
    let mut fresh = 0;
    for t in tasks {
        let e = t.await.unwrap();
        ids.insert(e.id);
        fresh += usize::from(!e.duplicate);
    }
    assert_eq!(
        (ids.len(), fresh),
        (1, 1),
        "50 concurrent enqueues of one unique job: one job"
    );
    let other = client.enqueue::<Once>(&8).await.unwrap();
    assert!(!other.duplicate, "another input is another job");
    let batch = client.enqueue_many::<Once>([&7, &9, &9]).await.unwrap();
    assert!(batch[0].duplicate && !batch[1].duplicate && batch[2].duplicate);
    assert_eq!(batch[1].id, batch[2].id);
}

/// Counts its runs; fails permanently on the first.
struct Redrivable {
    runs: Arc<AtomicUsize>,
}
impl Job for Redrivable {
    const NAME: &'static str = "redrivable";
    type Input = ();
    type Output = usize;
    async fn run(&self, _ctx: &JobContext, _: ()) -> Result<usize, JobError> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        if n == 1 {
            Err(JobError::permanent("first run fails"))
        } else {
            Ok(n)
        }
    }
}

pub async fn dead_jobs_are_re_driven_and_listed<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let runs = Arc::new(AtomicUsize::new(0));
    let w = worker(&store, |w| w.register(Redrivable { runs: runs.clone() }));
    let client = Client::new(store.clone());
    let e = client.enqueue::<Redrivable>(&()).await.unwrap();
    assert_eq!(
        client.wait(e.id, WAIT).await.unwrap().state,
        MessageState::Dead
    );
    let dead = client
        .list(&JobFilter {
            kind: Some("redrivable".into()),
            state: Some(MessageState::Dead),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(dead.iter().map(|m| m.id).collect::<Vec<_>>(), vec![e.id]);

    let again = client.retry(e.id).await.unwrap();
    assert_eq!(
        (again.state, again.attempt),
        (MessageState::Available, 0),
        "fresh attempts"
    );
    let out = client.wait(e.id, WAIT).await.unwrap();
    assert_eq!(out.output::<usize>().unwrap(), 2);
    assert_eq!(out.errors.len(), 1, "the error history is kept");
    let err = client.retry(e.id).await.unwrap_err();
    assert!(
        err.to_string().contains("only a dead or cancelled job"),
        "{err}"
    );
    assert!(matches!(
        client.retry(Uuid::now_v7()).await.unwrap_err(),
        Error::NotFound { .. }
    ));
    let all = client
        .list(&JobFilter {
            queue: Some("default".try_into().unwrap()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
    assert!(
        client
            .list(&JobFilter {
                state: Some(MessageState::Dead),
                ..Default::default()
            })
            .await
            .unwrap()
            .is_empty()
    );
    w.shutdown().await.unwrap();
}

pub async fn leadership_is_exclusive_and_fails_over<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let ttl = Duration::from_millis(300);
    assert!(store.leader_acquire("m", "a", ttl).await.unwrap());
    assert!(
        !store.leader_acquire("m", "b", ttl).await.unwrap(),
        "held by a"
    );
    assert!(
        store.leader_acquire("m", "a", ttl).await.unwrap(),
        "a renews"
    );
    assert!(
        store.leader_acquire("other", "b", ttl).await.unwrap(),
        "roles are independent"
    );
    // a stops renewing (dies): b takes over once the lease expires on the database clock.
    let start = std::time::Instant::now();
    while !store.leader_acquire("m", "b", ttl).await.unwrap() {
        assert!(start.elapsed() < WAIT, "leadership never failed over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        start.elapsed() >= Duration::from_millis(200),
        "not before the lease expired"
    );
    store.leader_release("m", "b").await.unwrap();
    assert!(
        store.leader_acquire("m", "a", ttl).await.unwrap(),
        "released: free at once"
    );
}

pub async fn finished_jobs_are_pruned<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let q = Queue::new(store.clone());
    let kept = q.enqueue("p", &1, &Default::default()).await.unwrap();
    let done = q.enqueue("p", &2, &Default::default()).await.unwrap();
    let got = q.receive("p", 2, Duration::ZERO).await.unwrap();
    q.ack("p", got.iter().filter(|m| m.id == done.id))
        .await
        .unwrap();
    assert_eq!(
        store
            .job_prune(Duration::from_secs(3600), 100)
            .await
            .unwrap(),
        0,
        "too recent"
    );
    let start = std::time::Instant::now();
    while store
        .job_prune(Duration::from_millis(1), 100)
        .await
        .unwrap()
        == 0
    {
        assert!(start.elapsed() < WAIT);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        q.get(done.id).await.unwrap().is_none(),
        "finished and old: pruned"
    );
    assert!(
        q.get(kept.id).await.unwrap().is_some(),
        "unfinished rows are never pruned"
    );
}

/// Never finishes on its own and ignores cancellation.
struct Stubborn;
impl Job for Stubborn {
    const NAME: &'static str = "stubborn";
    type Input = ();
    type Output = ();
    async fn run(&self, _ctx: &JobContext, _: ()) -> Result<(), JobError> {
        std::future::pending::<()>().await;
        Ok(())
    }
}

pub async fn shutdown_releases_unfinished_jobs_and_maintenance_rescues<F: Fixture>(
    _fx: Arc<F>,
    store: F::Store,
) {
    let w = worker(&store, |w| w.register(Stubborn));
    let mut events = w.events();
    let client = Client::new(store.clone());
    let e = client.enqueue::<Stubborn>(&()).await.unwrap();
    event(
        &mut events,
        "the job to start",
        |ev| matches!(ev, WorkerEvent::Started { id, .. } if *id == e.id),
    )
    .await;
    w.shutdown().await.unwrap();
    let m = client.get(e.id).await.unwrap().unwrap();
    assert_eq!(
        (m.state, m.attempt),
        (MessageState::Available, 1),
        "released at once after the grace period"
    );

    // A receiver that dies holding a lease: the maintenance leader takes it back and a worker
    // runs it.
    let q = Queue::new(store.clone());
    let f = client
        .enqueue_with::<Flaky>(
            &FlakyIn {
                n: 4,
                succeed_on: 1,
            },
            |o| o.priority(dray_core::Priority::CRITICAL),
        )
        .await
        .unwrap();
    let held = q
        .receive_with(
            "default",
            &ReceiveOptions {
                limit: 1,
                wait: Duration::ZERO,
                lease: Some(Duration::from_millis(100)),
            },
        )
        .await
        .unwrap();
    assert_eq!(held[0].id, f.id);
    let w = worker(&store, |w| w.register(Flaky).register(Stubborn));
    let out = client.wait(f.id, WAIT).await.unwrap();
    assert_eq!(out.output::<i64>().unwrap(), 8);
    assert_eq!(out.attempts, 2);
    assert_eq!(out.errors[0].kind, FailureKind::LeaseExpired);
    let _ = LeaseRef::from(f.id);
    w.shutdown().await.unwrap();
}

/// One request the hook saw: the status it answered, lower-cased headers, body.
type Seen = (u16, std::collections::HashMap<String, String>, Vec<u8>);

/// A local HTTP endpoint that records every request and answers 500 to the first one.
struct Hook {
    url: String,
    seen: Arc<std::sync::Mutex<Vec<Seen>>>,
}

async fn hook() -> Hook {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/dray", listener.local_addr().unwrap());
    let seen: Arc<std::sync::Mutex<Vec<_>>> = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Read the head, then Content-Length bytes of body.
            let (head_end, len) = loop {
                let n = sock.read(&mut chunk).await.unwrap();
                assert!(n > 0, "request ended early");
                buf.extend_from_slice(&chunk[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..i]).to_string();
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap())
                        })
                        .unwrap();
                    break (i + 4, len);
                }
            };
            while buf.len() < head_end + len {
                let n = sock.read(&mut chunk).await.unwrap();
                buf.extend_from_slice(&chunk[..n]);
            }
            let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
            let headers = head
                .lines()
                .skip(1)
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            let body = buf[head_end..head_end + len].to_vec();
            let status = {
                let mut seen = record.lock().unwrap();
                let status = if seen.is_empty() { 500 } else { 200 };
                seen.push((status, headers, body));
                status
            };
            let reply =
                format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let _ = sock.write_all(reply.as_bytes()).await;
        }
    });
    Hook { url, seen }
}

pub async fn http_callbacks_fire_once_per_terminal_state<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    const SECRET: &[u8] = b"test-secret";
    let hook = hook().await;
    let w = worker(&store, |w| {
        w.register(Flaky)
            .register(Doomed)
            .configure(|c| c.callback_secret = Some(dray_core::Secret(SECRET.to_vec())))
    });
    let client = Client::new(store.clone());
    let ok = client
        .enqueue_with_callback_url::<Flaky>(
            &FlakyIn {
                n: 3,
                succeed_on: 1,
            },
            &hook.url,
        )
        .await
        .unwrap();
    let dead = client
        .enqueue_with_callback_url::<Doomed>(&"nope".to_owned(), &hook.url)
        .await
        .unwrap();
    let delivered = |id: Uuid| {
        let client = client.clone();
        async move {
            let start = std::time::Instant::now();
            loop {
                let m = client.get(id).await.unwrap().unwrap();
                if let Some(at) = m.callback.as_ref().and_then(|c| c.delivered_at) {
                    return (m, at);
                }
                assert!(
                    start.elapsed() < WAIT,
                    "callback for {id} never delivered: {:?}",
                    m.callback
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let (m_ok, _) = delivered(ok.id).await;
    let (m_dead, _) = delivered(dead.id).await;
    assert!(m_ok.callback.as_ref().unwrap().attempts >= 1);
    assert!(
        store
            .callback_claim(10, Duration::from_secs(1))
            .await
            .unwrap()
            .is_empty(),
        "nothing left to deliver"
    );

    let seen = hook.seen.lock().unwrap().clone();
    assert_eq!(
        seen.len(),
        3,
        "two jobs, one delivery failed once and was retried: {} requests",
        seen.len()
    );
    assert_eq!(seen[0].0, 500);
    let mut good: Vec<(Uuid, MessageState)> = Vec::new();
    for (status, headers, body) in &seen {
        let sig = headers.get("dray-signature").expect("signed");
        let now = chrono::Utc::now().timestamp();
        dray_core::callback::verify(SECRET, sig, body, now, Duration::from_secs(300)).unwrap();
        assert!(
            dray_core::callback::verify(b"wrong", sig, body, now, Duration::from_secs(300))
                .is_err()
        );
        let b: dray_core::callback::CallbackBody = serde_json::from_slice(body).unwrap();
        assert_eq!(headers.get("dray-job-id"), Some(&b.id.to_string()));
        if *status == 200 {
            good.push((b.id, b.state));
        }
        if b.id == ok.id && *status == 200 {
            assert_eq!(b.result, Some(serde_json::json!(6)));
        }
    }
    good.sort_by_key(|g| g.0);
    let mut want = vec![
        (ok.id, MessageState::Completed),
        (dead.id, MessageState::Dead),
    ];
    want.sort_by_key(|g| g.0);
    assert_eq!(good, want, "exactly one successful delivery per job");
    let _ = m_dead;

    // A re-drive is a new terminal state: one more delivery for it, and only one.
    client.retry(dead.id).await.unwrap();
    assert_eq!(
        client.wait(dead.id, WAIT).await.unwrap().state,
        MessageState::Dead
    );
    delivered(dead.id).await;
    let seen = hook.seen.lock().unwrap().clone();
    let for_dead = seen
        .iter()
        .filter(|(s, h, _)| *s == 200 && h.get("dray-job-id") == Some(&dead.id.to_string()))
        .count();
    assert_eq!(for_dead, 2);
    assert_eq!(seen.len(), 4);
    w.shutdown().await.unwrap();

    // Bad URLs are refused at enqueue.
    for bad in ["https://u:p@example.com/x", "ftp://x", "http://"] {
        let err = client
            .enqueue_with_callback_url::<Flaky>(
                &FlakyIn {
                    n: 1,
                    succeed_on: 1,
                },
                bad,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidArgument {
                    what: "callback_url",
                    ..
                }
            ),
            "{bad}: {err}"
        );
    }
}

/// Counts how many of its runs overlap; each run waits for a permit from the test.
struct Gated {
    gate: Arc<Semaphore>,
    now: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}
impl Job for Gated {
    const NAME: &'static str = "gated";
    type Input = ();
    type Output = ();
    async fn run(&self, _ctx: &JobContext, _: ()) -> Result<(), JobError> {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(n, Ordering::SeqCst);
        self.gate
            .acquire()
            .await
            .map_err(JobError::transient)?
            .forget();
        self.now.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

pub async fn each_queue_runs_at_most_its_concurrency<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let gate = Arc::new(Semaphore::new(0));
    let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let w = worker(&store, |w| {
        w.register(Gated {
            gate: gate.clone(),
            now: now.clone(),
            peak: peak.clone(),
        })
        .register(Flaky)
        .queue("default", 3)
        .unwrap()
        .queue("other", 2)
        .unwrap()
    });
    let mut events = w.events();
    let client = Client::new(store.clone());
    let gated: Vec<_> = (0..8).map(|_| ()).collect();
    let ids = client.enqueue_many::<Gated>(gated.iter()).await.unwrap();
    for _ in 0..3 {
        event(&mut events, "a gated job to start", |e| {
            matches!(e, WorkerEvent::Started { .. })
        })
        .await;
    }
    // The default queue is full (3 running, 5 waiting); another queue still runs its jobs.
    let q = Queue::new(store.clone());
    let on_other = q
        .enqueue(
            "other",
            &serde_json::json!({"n": 5, "succeed_on": 1}),
            &dray_core::EnqueueOptions::new().kind("flaky"),
        )
        .await
        .unwrap();
    assert_eq!(
        client
            .wait(on_other.id, WAIT)
            .await
            .unwrap()
            .output::<i64>()
            .unwrap(),
        10,
        "the other queue is not blocked"
    );
    assert_eq!(
        now.load(Ordering::SeqCst),
        3,
        "three gated jobs running, no more"
    );
    assert_eq!(
        q.stats("default").await.unwrap().leased,
        3,
        "no job is leased beyond the free slots: the queue finishes none, so it claims none ahead"
    );
    gate.add_permits(8);
    for e in &ids {
        client.wait(e.id, WAIT).await.unwrap();
    }
    assert_eq!(
        peak.load(Ordering::SeqCst),
        3,
        "never more than the queue's concurrency at once"
    );
    w.shutdown().await.unwrap();
}

/// Runs the first `free` attempts at once, then holds every later one until `gate` opens.
struct Burst {
    runs: Arc<AtomicUsize>,
    free: usize,
    gate: Arc<Semaphore>,
    started: Arc<std::sync::Mutex<HashSet<Uuid>>>,
}
impl Job for Burst {
    const NAME: &'static str = "burst";
    type Input = ();
    type Output = ();
    async fn run(&self, ctx: &JobContext, _: ()) -> Result<(), JobError> {
        self.started
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ctx.id());
        if self.runs.fetch_add(1, Ordering::SeqCst) >= self.free {
            self.gate
                .acquire()
                .await
                .map_err(JobError::transient)?
                .forget();
        }
        Ok(())
    }
}

/// Polls the queue's stats until `cond` holds (or fails after [`WAIT`]).
async fn stats_until<S: Store>(
    q: &Queue<S>,
    what: &str,
    cond: impl Fn(&dray_core::QueueStats) -> bool,
) -> dray_core::QueueStats {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = q.stats("default").await.unwrap();
        if cond(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what} (last stats: {s:?})"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// 400 `Burst` jobs queued on the default queue, and a client and a queue handle on `store`.
async fn burst_backlog<S: Store>(store: &S) -> (Client<S>, Queue<S>) {
    let client = Client::new(store.clone());
    let units: Vec<()> = vec![(); 400];
    client.enqueue_many::<Burst>(units.iter()).await.unwrap();
    (client, Queue::new(store.clone()))
}

/// Up to `limit` jobs of the default queue in `state`.
async fn default_jobs_in<S: Store>(
    client: &Client<S>,
    state: MessageState,
    limit: u32,
) -> Vec<dray_core::Message> {
    client
        .list(&JobFilter {
            queue: Some(dray_core::QueueName::new("default").unwrap()),
            state: Some(state),
            limit,
            ..JobFilter::default()
        })
        .await
        .unwrap()
}

/// A worker running only `job` on the default queue with `slots` slots, claiming ahead by
/// `prefetch`, up to 100 per claim.
fn claiming_ahead<S: Store>(
    store: &S,
    job: Burst,
    slots: usize,
    prefetch: Duration,
) -> WorkerHandle {
    worker(store, |w| {
        w.register(job)
            .queue("default", slots)
            .unwrap()
            .configure(|c| {
                c.fetch_batch = 100;
                c.prefetch = prefetch;
            })
    })
}

pub async fn claimed_ahead_jobs_are_given_back_unstarted<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let (client, q) = burst_backlog(&store).await;
    // Short jobs finish fast, so the queue claims ahead of its two slots; then the slots hold
    // on to two jobs that never end, and the claimed-ahead rest waits in the buffer.
    let runs = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let burst = |free| Burst {
        runs: runs.clone(),
        free,
        gate: gate.clone(),
        started: Arc::default(),
    };
    let w = claiming_ahead(&store, burst(300), 2, Duration::from_secs(1));
    let held = stats_until(&q, "300 jobs completed and both slots stuck", |s| {
        s.completed == 300 && runs.load(Ordering::SeqCst) == 302
    })
    .await;
    assert!(
        held.leased > 2,
        "jobs claimed ahead of the two slots are leased too: {held:?}"
    );
    w.shutdown().await.unwrap();
    let s = q.stats("default").await.unwrap();
    assert_eq!(
        (s.completed, s.available, s.leased),
        (300, 100, 0),
        "shutdown gives everything back"
    );
    let jobs = default_jobs_in(&client, MessageState::Available, 1000).await;
    // The buffered ones (`held.leased - 2` of them, attempt 1 while claimed) are back at
    // attempt 0, like the ones never claimed.
    let unstarted = jobs.iter().filter(|j| j.attempt == 0).count();
    assert_eq!(
        unstarted, 98,
        "jobs claimed ahead are given back without counting an attempt"
    );
    assert_eq!(
        jobs.iter().filter(|j| j.attempt == 1).count(),
        2,
        "the two that started were released after the grace period"
    );

    // Jobs claimed ahead that wait longer than ten times the prefetch horizon (at least a
    // second) go back while the worker runs, so another worker can take them.
    runs.store(0, Ordering::SeqCst);
    let more: Vec<()> = vec![(); 300];
    client.enqueue_many::<Burst>(more.iter()).await.unwrap();
    let w = claiming_ahead(&store, burst(300), 2, Duration::from_millis(50));
    let held = stats_until(&q, "300 more completed and both slots stuck", |s| {
        s.completed == 600 && runs.load(Ordering::SeqCst) == 302
    })
    .await;
    assert!(held.leased > 2, "claimed ahead again: {held:?}");
    stats_until(&q, "the buffered jobs are given back", |s| s.leased == 2).await;
    gate.add_permits(1000);
    stats_until(&q, "every job completed", |s| s.completed == 700).await;
    w.shutdown().await.unwrap();
    // A handler without output (`()`) leaves no result, which reads back as `()`.
    let done = default_jobs_in(&client, MessageState::Completed, 1).await;
    assert_eq!(done[0].result, None, "no output, no result");
    let outcome = client.wait(done[0].id, WAIT).await.unwrap();
    outcome.output::<()>().unwrap();
}

pub async fn a_cancel_reaches_a_job_claimed_ahead<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let (client, q) = burst_backlog(&store).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let started = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let burst = Burst {
        runs: runs.clone(),
        free: 300,
        gate: gate.clone(),
        started: started.clone(),
    };
    let w = claiming_ahead(&store, burst, 1, Duration::from_secs(1));
    stats_until(
        &q,
        "300 completed, the slot stuck and jobs claimed ahead",
        |s| s.completed == 300 && runs.load(Ordering::SeqCst) == 301 && s.leased > 1,
    )
    .await;
    // A job leased to the worker whose handler never started: it waits in the buffer.
    let leased = default_jobs_in(&client, MessageState::Running, 1000).await;
    let waiting = {
        let started = started.lock().unwrap();
        leased
            .iter()
            .find(|j| !started.contains(&j.id))
            .map(|j| j.id)
            .expect("a leased job that has not started")
    };
    assert_eq!(
        client.cancel(waiting).await.unwrap(),
        CancelOutcome::Requested,
        "it is leased, so the worker is asked"
    );
    // The heartbeat brings the request to the buffer. Each beat extends the waiting job's
    // lease too, and beats run one after another: once the lease has been extended twice since
    // the request, the first beat's answer (cancel requested) has been applied.
    let mut lease = q.get(waiting).await.unwrap().unwrap().leased_until;
    for beat in 0..2 {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let now = q.get(waiting).await.unwrap().unwrap().leased_until;
            if now > lease {
                lease = now;
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "heartbeat {beat} never extended the waiting job's lease"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // Once the slot frees, the job is settled as cancelled without its handler running.
    gate.add_permits(1000);
    let out = client.wait(waiting, WAIT).await.unwrap();
    assert_eq!(out.state, MessageState::Cancelled);
    assert!(
        out.errors
            .last()
            .is_some_and(|e| e.message.contains("before it started")),
        "{:?}",
        out.errors
    );
    assert!(
        !started.lock().unwrap().contains(&waiting),
        "the handler of a job cancelled while it waited never ran"
    );
    stats_until(&q, "the rest completed", |s| {
        s.completed == 399 && s.cancelled == 1
    })
    .await;
    w.shutdown().await.unwrap();
}

/// A claim reads back fewer columns than `get` and fills in the ones it fixes (queue, state,
/// holder, no finish time, no result, a callback not yet tried): what it returns must equal the
/// stored row, for a fresh row and for rows with a history (progress, errors, a callback tried
/// and then re-driven), with and without a holder.
pub async fn claimed_rows_read_as_stored<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let q = Queue::new(store.clone());
    let e = q
        .enqueue(
            "hist",
            &serde_json::json!({"n": 1}),
            &dray_core::EnqueueOptions::new()
                .kind("report")
                .key("k-1")
                .header("trace", "t-9")
                .priority(dray_core::Priority::HIGH)
                .max_attempts(2)
                .callback_url("http://127.0.0.1:9/never"),
        )
        .await
        .unwrap();
    let claim = |holder: Option<&str>| dray_core::ClaimParams {
        queue: dray_core::QueueName::new("hist").unwrap(),
        limit: 10,
        lease: Duration::from_secs(30),
        leased_by: holder.map(str::to_owned),
    };
    let claim_one = |holder: Option<&'static str>| {
        let store = store.clone();
        let p = claim(holder);
        async move {
            let got = store.message_claim(&p).await.unwrap();
            assert_eq!(got.len(), 1, "one row to claim");
            let stored = store.message_get(got[0].id).await.unwrap().unwrap();
            assert_eq!(got[0], stored, "a claimed row reads as stored");
            got.into_iter().next().unwrap()
        }
    };
    // Fresh.
    let m = claim_one(Some("worker-a")).await;
    assert_eq!((m.id, m.attempt), (e.id, 1));
    assert_eq!(m.leased_by.as_deref(), Some("worker-a"));
    let lease = LeaseRef {
        id: m.id,
        attempt: Some(m.attempt),
    };
    // With progress and an error from the first attempt, and no holder.
    store
        .job_progress(lease, 40, Some("half way"))
        .await
        .unwrap();
    store
        .job_fail(
            lease,
            FailureKind::Error,
            "boom",
            FailTo::Retry(Duration::ZERO),
        )
        .await
        .unwrap();
    let m = claim_one(None).await;
    assert_eq!((m.attempt, m.errors.len(), m.progress), (2, 1, Some(40)));
    assert_eq!(m.leased_by, None);
    // Dead, its callback tried once, re-driven: the claim sees the callback reset.
    let lease = LeaseRef {
        id: m.id,
        attempt: Some(m.attempt),
    };
    store
        .job_fail(lease, FailureKind::Permanent, "no", FailTo::Dead)
        .await
        .unwrap();
    let tried = store
        .callback_claim(10, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(tried.len(), 1);
    assert_eq!(tried[0].callback.as_ref().map(|c| c.attempts), Some(1));
    store.job_redrive(e.id).await.unwrap().unwrap();
    let m = claim_one(Some("worker-b")).await;
    assert_eq!(m.attempt, 1);
    assert_eq!(m.callback.as_ref().map(|c| c.attempts), Some(0));
}

/// One row that does not decode (headers of the wrong shape, as a hand edit or another version
/// could leave) costs exactly that row: the jobs claimed beside it run once, on their first
/// attempt; it is quarantined as dead with an error naming the column; listings still show
/// every row, it among them; once mended it is re-driven and runs.
pub async fn an_unreadable_row_costs_only_itself<F: Fixture>(fx: Arc<F>, store: F::Store) {
    let client = Client::new(store.clone());
    let mut healthy = Vec::new();
    let mut bad = None;
    for n in 0..11 {
        let e = client
            .enqueue::<Flaky>(&FlakyIn { n, succeed_on: 1 })
            .await
            .unwrap();
        if n == 5 {
            bad = Some(e.id);
        } else {
            healthy.push((n, e.id));
        }
    }
    let bad = bad.unwrap();
    fx.set_columns(&store, bad, r#"headers = '{"n": 1}'"#).await;

    let w = worker(&store, |w| w.register(Flaky));
    for (n, id) in &healthy {
        let out = client.wait(*id, WAIT).await.unwrap();
        assert_eq!(out.state, MessageState::Completed, "job {n}");
        assert_eq!(out.attempts, 1, "job {n} ran on its first attempt");
        assert_eq!(out.output::<i64>().unwrap(), n * 2);
    }
    // The bad row is quarantined, and listed with the rest.
    let listed = loop {
        let all = client
            .list(&JobFilter {
                queue: Some("default".try_into().unwrap()),
                ..Default::default()
            })
            .await
            .unwrap();
        let state = all.iter().find(|m| m.id == bad).map(|m| m.state);
        if state == Some(MessageState::Dead) {
            break all;
        }
        assert_ne!(state, None, "the unreadable row is listed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(listed.len(), 11);
    let shown = listed.iter().find(|m| m.id == bad).unwrap();
    let why = shown.unreadable.as_deref().expect("marked unreadable");
    assert!(why.contains("headers"), "{why}");
    assert_eq!(shown.kind.as_deref(), Some("flaky"));
    assert!(
        listed
            .iter()
            .filter(|m| m.id != bad)
            .all(|m| m.unreadable.is_none())
    );
    // Read by id, it is a typed error naming the row and the column.
    let err = client.get(bad).await.unwrap_err();
    assert!(matches!(err, Error::CorruptRow { .. }), "{err}");
    assert!(err.to_string().contains("headers"), "{err}");

    // Mended, it reads as dead with an `unreadable` attempt error that says what was found,
    // and is re-driven like any dead job.
    fx.set_columns(&store, bad, "headers = '{}'").await;
    let dead = client.get(bad).await.unwrap().unwrap();
    assert_eq!(dead.state, MessageState::Dead);
    let last = dead.errors.last().unwrap();
    assert_eq!(last.kind, FailureKind::Unreadable);
    assert!(last.message.contains("headers"), "{}", last.message);
    client.retry(bad).await.unwrap();
    let out = client.wait(bad, WAIT).await.unwrap();
    assert_eq!(out.state, MessageState::Completed);
    assert_eq!(out.output::<i64>().unwrap(), 10);
    w.shutdown().await.unwrap();
}

/// A finished job whose row cannot be read, among others whose completion callbacks are due:
/// the callback claim hands out the healthy deliveries and settles the unreadable one as a
/// failed try that names the column, to be tried again after
/// [`dray_core::batch::UNREADABLE_CALLBACK_PAUSE`] (the row may be mended by then).
pub async fn an_unreadable_row_costs_only_its_callback<F: Fixture>(fx: Arc<F>, store: F::Store) {
    let client = Client::new(store.clone());
    let url = "http://127.0.0.1:9/hook";
    let mut ids = Vec::new();
    for n in 0..3 {
        let e = client
            .enqueue_with_callback_url::<Flaky>(&FlakyIn { n, succeed_on: 1 }, url)
            .await
            .unwrap();
        ids.push(e.id);
    }
    // Run them with a worker that delivers no callbacks (it has no secret).
    let w = worker(&store, |w| w.register(Flaky));
    for id in &ids {
        let out = client.wait(*id, WAIT).await.unwrap();
        assert_eq!(out.state, MessageState::Completed);
    }
    w.shutdown().await.unwrap();
    let bad = ids[1];
    fx.set_columns(&store, bad, r#"headers = '{"n": 1}'"#).await;
    let claimed = store
        .callback_claim(10, Duration::from_secs(30))
        .await
        .expect("one unreadable row does not fail the claim");
    let mut got: Vec<Uuid> = claimed.iter().map(|m| m.id).collect();
    got.sort();
    let mut want = vec![ids[0], ids[2]];
    want.sort();
    assert_eq!(got, want, "the healthy deliveries, and only those");
    for m in &claimed {
        store
            .callback_settle(
                m.id,
                m.callback.as_ref().unwrap().attempts,
                &CallbackSettle::Delivered,
            )
            .await
            .unwrap();
    }
    assert!(
        store
            .callback_claim(10, Duration::from_secs(30))
            .await
            .unwrap()
            .is_empty(),
        "the unreadable row's delivery waits for its pause"
    );
    fx.set_columns(&store, bad, "headers = '{}'").await;
    let mended = client.get(bad).await.unwrap().unwrap();
    let cb = mended.callback.expect("a callback");
    assert_eq!((cb.attempts, cb.delivered_at), (1, None), "{cb:?}");
    let why = cb.last_error.expect("the failed try says why");
    assert!(why.contains("headers"), "{why}");
}

/// Fails every attempt; retried after a delay that only the cut to 100 years keeps storable.
struct FarRetry;
impl Job for FarRetry {
    const NAME: &'static str = "far_retry";
    type Input = ();
    type Output = ();
    fn options() -> JobOptions {
        JobOptions {
            timeout: Some(Duration::MAX),
            retry: RetryPolicy {
                max_attempts: 3,
                backoff: Backoff::Fixed,
                base: Duration::MAX,
                max: Duration::MAX,
                jitter: false,
            },
            ..JobOptions::default()
        }
    }
    async fn run(&self, _ctx: &JobContext, _: ()) -> Result<(), JobError> {
        Err(JobError::transient(std::io::Error::other(
            "once more, much later",
        )))
    }
}

/// Asserts that `r` is an `InvalidArgument` naming `what`.
#[track_caller]
fn refused<T: std::fmt::Debug>(r: dray_core::Result<T>, what: &str) {
    match r {
        Err(e @ Error::InvalidArgument { .. }) => {
            assert!(e.to_string().contains(what), "{e}");
            assert!(
                e.to_string().contains("100 years") || e.to_string().contains("shorter"),
                "{e}"
            );
        }
        other => panic!("expected InvalidArgument naming {what}, got {other:?}"),
    }
}

/// Every public parameter of the queue, the client and the worker that takes a `Duration` is
/// either refused up front (`InvalidArgument` naming it and its bound) or given a documented
/// meaning (a wait of `Duration::MAX` waits until there is something), at zero, one nanosecond,
/// `Duration::MAX` and around each bound; nothing out of range reaches the database, so every
/// row written reads back.
pub async fn every_duration_parameter_is_clamped_or_refused<F: Fixture>(
    _fx: Arc<F>,
    store: F::Store,
) {
    use dray_core::EnqueueOptions;
    use dray_core::duration::MAX_SPAN;
    let ns = Duration::from_nanos(1);
    let ms = Duration::from_millis(1);
    let over = MAX_SPAN + Duration::from_secs(1);
    let q = Queue::new(store.clone());

    // Delays: zero is now, and so is one nanosecond at the databases' resolution; 100 years is
    // kept, more is refused.
    for d in [Duration::ZERO, ns, ms, MAX_SPAN] {
        let e = q
            .enqueue("d", &1, &EnqueueOptions::new().delay(d))
            .await
            .unwrap();
        let m = q.get(e.id).await.unwrap().unwrap();
        assert_eq!(m.state == MessageState::Scheduled, d >= ms, "{d:?}");
    }
    for d in [over, Duration::MAX] {
        refused(
            q.enqueue("d", &1, &EnqueueOptions::new().delay(d)).await,
            "delay",
        );
    }

    // Leases of a receive: 1 ms to 100 years.
    let opts = |lease, wait| ReceiveOptions {
        limit: 1,
        wait,
        lease: Some(lease),
    };
    for l in [Duration::ZERO, ns, over, Duration::MAX] {
        refused(q.receive_with("l", &opts(l, Duration::ZERO)).await, "lease");
    }
    q.enqueue_many("l", &[1, 2], &EnqueueOptions::new())
        .await
        .unwrap();
    for l in [ms, MAX_SPAN] {
        let got = q.receive_with("l", &opts(l, Duration::ZERO)).await.unwrap();
        let m = q.get(got[0].id).await.unwrap().unwrap();
        assert!(m.leased_until.is_some(), "{l:?}: the lease reads back");
        // Extends: the same bounds.
        for by in [Duration::ZERO, ns, over, Duration::MAX] {
            refused(q.extend_lease(&got[0], by).await, "lease");
            refused(q.extend("l", [&got[0]], by).await, "lease");
        }
        q.extend_lease(&got[0], MAX_SPAN).await.unwrap_or_else(|e| {
            // The 1 ms lease may have ended already: then the extend is fenced off.
            assert!(matches!(e, Error::LeaseLost { .. }), "{e}");
        });
        q.get(got[0].id).await.unwrap().unwrap();
    }
    // Waits: zero and one nanosecond return at once; `Duration::MAX` waits until a message
    // comes.
    for w in [Duration::ZERO, ns] {
        assert!(q.receive("w", 1, w).await.unwrap().is_empty());
    }
    let waiting = {
        let q = q.clone();
        tokio::spawn(async move { q.receive("w", 1, Duration::MAX).await })
    };
    tokio::task::yield_now().await;
    q.enqueue("w", &7, &EnqueueOptions::new()).await.unwrap();
    let got = tokio::time::timeout(WAIT, waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got[0].payload, serde_json::json!(7));

    // The store is handed spans directly too: cut to 100 years, never out of the database's
    // range.
    let e = q.enqueue("s", &1, &EnqueueOptions::new()).await.unwrap();
    let got = q.receive("s", 1, Duration::ZERO).await.unwrap();
    let queue: dray_core::QueueName = "s".try_into().unwrap();
    store
        .message_extend_many(&queue, &[got[0].lease()], Duration::MAX)
        .await
        .unwrap();
    assert!(q.get(e.id).await.unwrap().unwrap().leased_until.is_some());
    assert!(store.leader_acquire("t", "a", Duration::MAX).await.unwrap());
    assert!(!store.leader_acquire("t", "b", Duration::MAX).await.unwrap());
    assert_eq!(store.job_prune(Duration::MAX, 10).await.unwrap(), 0);
    store.callback_claim(10, Duration::MAX).await.unwrap();
    store.callback_claim(10, Duration::ZERO).await.unwrap();

    // Worker settings: checked when it starts.
    let start = |f: &dyn Fn(&mut dray_core::WorkerConfig)| {
        Worker::new(store.clone())
            .register(FarRetry)
            .configure(|c| f(c))
            .start()
    };
    for l in [
        Duration::ZERO,
        ns,
        Duration::from_millis(99),
        over,
        Duration::MAX,
    ] {
        refused(start(&|c| c.lease = l), "lease");
    }
    for h in [Duration::ZERO, ns, Duration::MAX] {
        refused(start(&|c| c.heartbeat = h), "heartbeat");
    }
    refused(start(&|c| c.heartbeat = c.lease), "heartbeat");
    refused(start(&|c| c.prefetch = Duration::MAX), "prefetch");
    for m in [Duration::ZERO, ns, Duration::MAX] {
        refused(
            start(&|c| c.maintenance_interval = m),
            "maintenance_interval",
        );
    }
    refused(start(&|c| c.retention = Duration::MAX), "retention");
    // At the bounds, and a grace of `Duration::MAX`, it runs: a job whose timeout is
    // `Duration::MAX` fails, and its retry, `Duration::MAX` later by its policy, is stored 100
    // years ahead.
    let w = start(&|c| {
        c.lease = MAX_SPAN;
        c.heartbeat = Duration::from_millis(100);
        c.prefetch = Duration::ZERO;
        c.maintenance_interval = Duration::from_millis(100);
        c.retention = Duration::ZERO;
        c.shutdown_grace = Duration::MAX;
    })
    .unwrap();
    let client = Client::new(store.clone());
    let far = client.enqueue::<FarRetry>(&()).await.unwrap();
    let m = loop {
        let m = client.get(far.id).await.unwrap().unwrap();
        if m.state == MessageState::Retryable {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        m.run_at > chrono::Utc::now() + chrono::Duration::days(365 * 99),
        "{m:?}"
    );
    w.shutdown().await.unwrap();

    // Client waits: zero on an unfinished job times out at once; `Duration::MAX` waits until
    // the job finishes.
    assert!(matches!(
        client.wait(far.id, Duration::ZERO).await.unwrap_err(),
        Error::Timeout(_)
    ));
    assert!(matches!(
        client.wait(far.id, ns).await.unwrap_err(),
        Error::Timeout(_)
    ));
    client.cancel(far.id).await.unwrap();
    let out = client.wait(far.id, Duration::MAX).await.unwrap();
    assert_eq!(out.state, MessageState::Cancelled);
    let w = worker(&store, |w| w.register(Flaky));
    let n = client
        .submit_and_wait::<Flaky>(
            &FlakyIn {
                n: 4,
                succeed_on: 1,
            },
            Duration::MAX,
        )
        .await
        .unwrap();
    assert_eq!(n, 8);
    w.shutdown().await.unwrap();
}

/// Echoes its input.
struct Echo;
impl Job for Echo {
    const NAME: &'static str = "echo";
    type Input = String;
    type Output = String;
    async fn run(&self, _ctx: &JobContext, s: String) -> Result<String, JobError> {
        Ok(s)
    }
}

/// A worker that has no handler for a job's kind gives it back without using an attempt, so
/// two workers with different job sets on one queue each run their own jobs, every one on its
/// first attempt; with no worker for the kind at all, the job waits, attempts untouched.
pub async fn a_worker_gives_back_kinds_it_does_not_run<F: Fixture>(_fx: Arc<F>, store: F::Store) {
    let client = Client::new(store.clone());
    let echo = client.enqueue::<Echo>(&"alone".into()).await.unwrap();
    let only_flaky = worker(&store, |w| w.register(Flaky));
    let mut events = only_flaky.events();
    for _ in 0..2 {
        event(
            &mut events,
            "a deferral",
            |e| matches!(e, WorkerEvent::Deferred { id, kind } if *id == echo.id && kind == "echo"),
        )
        .await;
    }
    let m = client.get(echo.id).await.unwrap().unwrap();
    assert!(!m.state.is_terminal(), "{m:?}");
    assert_eq!(m.attempt, 0, "no attempt used");
    assert!(m.errors.is_empty(), "{:?}", m.errors);

    let only_echo = worker(&store, |w| w.register(Echo));
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push((
            client.enqueue::<Echo>(&format!("e{n}")).await.unwrap().id,
            false,
        ));
        ids.push((
            client
                .enqueue::<Flaky>(&FlakyIn { n, succeed_on: 1 })
                .await
                .unwrap()
                .id,
            true,
        ));
    }
    let out = client.wait(echo.id, WAIT).await.unwrap();
    assert_eq!(out.output::<String>().unwrap(), "alone");
    assert_eq!(out.attempts, 1);
    for (id, _) in ids {
        let out = client.wait(id, WAIT).await.unwrap();
        assert_eq!(out.state, MessageState::Completed);
        assert_eq!(out.attempts, 1, "ran on its first attempt");
        assert!(out.errors.is_empty());
    }
    only_flaky.shutdown().await.unwrap();
    only_echo.shutdown().await.unwrap();
}

/// `Client::enqueue_with` puts a job on another queue; a `Queue::enqueue` whose options name
/// a different queue is refused; long bad input is repeated cut short in errors; an unknown id
/// points to `dray jobs list`.
pub async fn enqueue_options_and_errors_say_what_they_mean<F: Fixture>(
    _fx: Arc<F>,
    store: F::Store,
) {
    use dray_core::EnqueueOptions;
    let client = Client::new(store.clone());
    let e = client
        .enqueue_with::<Flaky>(
            &FlakyIn {
                n: 1,
                succeed_on: 1,
            },
            |o| o.queue("elsewhere"),
        )
        .await
        .unwrap();
    assert_eq!(client.get(e.id).await.unwrap().unwrap().queue, "elsewhere");
    // A worker serving that queue runs it.
    let w = worker(&store, |w| w.register(Flaky).queue("elsewhere", 2).unwrap());
    assert_eq!(
        client
            .wait(e.id, WAIT)
            .await
            .unwrap()
            .output::<i64>()
            .unwrap(),
        2
    );
    w.shutdown().await.unwrap();

    let q = Queue::new(store.clone());
    let err = q
        .enqueue("a", &1, &EnqueueOptions::new().queue("b"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { what: "queue", .. }),
        "{err}"
    );
    q.enqueue("a", &1, &EnqueueOptions::new().queue("a"))
        .await
        .unwrap();

    let long = "x".repeat(10_000) + " ";
    let err = q
        .enqueue(&long, &1, &EnqueueOptions::new())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.len() < 400, "{} bytes: {text}", text.len());
    assert!(text.contains("10001 bytes"), "{text}");
    let err = client.retry(Uuid::now_v7()).await.unwrap_err();
    assert!(err.to_string().contains("dray jobs list"), "{err}");
}

/// Jobs scheduled ahead (by delay, and by an absolute time on the database clock) start within
/// a few milliseconds of their due time, whichever enqueued them: this handle, or another
/// (another process).
pub async fn scheduled_jobs_start_at_their_due_time<F: Fixture>(fx: Arc<F>, store: F::Store) {
    use dray_core::EnqueueOptions;
    let other = fx.reopen(&store).await;
    let w = worker(&store, |w| w.register(Flaky));
    let mut events = w.events();
    let mut late = Vec::new();
    for round in 0..3 {
        for (who, s) in [("same", &store), ("other", &other)] {
            let client = Client::new(s.clone());
            let a = client
                .enqueue_with::<Flaky>(
                    &FlakyIn {
                        n: round,
                        succeed_on: 1,
                    },
                    |o| o.delay(Duration::from_millis(600)),
                )
                .await
                .unwrap();
            let at = s.now().await.unwrap() + chrono::Duration::milliseconds(600);
            let b = client
                .enqueue_with::<Flaky>(
                    &FlakyIn {
                        n: round,
                        succeed_on: 1,
                    },
                    |o: EnqueueOptions| o.not_before(at),
                )
                .await
                .unwrap();
            // They start in either order (one claim may take both).
            let mut started = HashMap::new();
            while started.len() < 2 {
                let e = event(
                    &mut events,
                    "a scheduled job's start",
                    |e| matches!(e, WorkerEvent::Started { id, .. } if *id == a.id || *id == b.id),
                )
                .await;
                if let WorkerEvent::Started { id, .. } = e {
                    started.insert(id, chrono::Utc::now());
                }
            }
            for id in [a.id, b.id] {
                let due = client.get(id).await.unwrap().unwrap().run_at;
                late.push((who, (started[&id] - due).num_milliseconds()));
            }
        }
    }
    w.shutdown().await.unwrap();
    eprintln!("start - due (ms): {late:?}");
    assert!(late.iter().all(|(_, ms)| *ms >= 0), "none early: {late:?}");
    let bound = 150;
    assert!(
        late.iter().all(|(_, ms)| *ms <= bound),
        "every start within {bound} ms of its due time: {late:?}"
    );
}
