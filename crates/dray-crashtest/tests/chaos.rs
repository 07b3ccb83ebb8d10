//! The chaos suite: worker processes killed mid-drain, killed over and over, their database
//! connections ended under them; poison jobs; two processes on one SQLite file. Real processes
//! and real databases; every test ends by checking that no job was lost (each completed, or in
//! its documented terminal state) and that every job whose effect happened twice was one a
//! kill made run again (its lease expired and was rescued), counted in the output.

mod common;

use std::time::{Duration, Instant};

use common::{
    DRAIN, Fine, Proc, drained, enqueue, no_job_lost, pg_done_per_job, pg_store, spawn, spawn_with,
    sqlite_done_per_job, sqlite_store, wait_for,
};
use dray::{
    Backoff, Client, FailureKind, Job, JobContext, JobError, JobOptions, MessageState, RetryPolicy,
    Store, Worker,
};

/// Scenario 1: three worker processes drain 20,000 jobs; one is SIGKILLed a quarter of the way
/// in. The other two finish; the killed one's jobs are rescued once their leases end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_one_of_three_workers_during_a_drain() {
    let (store, schema) = pg_store("dray_chaos").await;
    let url = common::pg_url();
    let client = Client::new(store.clone());
    let n = 20_000;
    enqueue(&client, 0, n).await;
    let start = Instant::now();
    let mut workers: Vec<Proc> = (0..3).map(|_| spawn(&url, &schema, "work")).collect();
    wait_for("a quarter of the drain", DRAIN, async || {
        common::pg_effects(&store, "done").await >= n / 4
    })
    .await;
    workers[0].kill();
    drained(&client, n, "the drain to finish").await;
    let twice = no_job_lost(&client, n, pg_done_per_job(&store).await).await;
    eprintln!(
        "20,000 jobs, 1 of 3 workers killed: drained in {:?}; {twice} effects happened twice \
         (jobs the killed worker was running)",
        start.elapsed()
    );
    drop(workers);
    store.drop_schema().await.unwrap();
}

/// Scenario 2: a steady 100 jobs/s for 30 s while the only worker process is SIGKILLed and
/// started again every 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_and_restarted_every_two_seconds() {
    let (store, schema) = pg_store("dray_chaos").await;
    let url = common::pg_url();
    let client = Client::new(store.clone());
    let producer = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            for i in 0..300 {
                tick.tick().await;
                enqueue(&client, i * 10, 10).await;
            }
        })
    };
    let mut worker = spawn(&url, &schema, "work");
    let mut kills = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        worker.kill();
        kills += 1;
        worker = spawn(&url, &schema, "work");
    }
    producer.await.unwrap();
    drained(&client, 3000, "the last worker to finish").await;
    let twice = no_job_lost(&client, 3000, pg_done_per_job(&store).await).await;
    eprintln!("3,000 jobs over 30 s, {kills} kills: {twice} effects happened twice");
    drop(worker);
    store.drop_schema().await.unwrap();
}

/// Scenario 4: every connection of two worker processes (pool and LISTEN) is ended by
/// `pg_terminate_backend` every 200 ms while they drain 3,000 jobs. They reconnect by
/// themselves and finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_connections_terminated_during_a_drain() {
    let (store, schema) = pg_store("dray_chaos").await;
    let url = common::pg_url();
    let client = Client::new(store.clone());
    let n = 3000;
    enqueue(&client, 0, n).await;
    let app = format!("chaos_term_{}", &common::suffix()[20..]);
    let workers: Vec<Proc> = (0..2)
        .map(|_| spawn_with(&url, &schema, "work", 800, Some(&app)))
        .collect();
    let mut ended = 0i64;
    let start = Instant::now();
    loop {
        let completed = client.queue().stats("default").await.unwrap().completed;
        if completed == n {
            break;
        }
        assert!(
            start.elapsed() < DRAIN,
            "{completed} of {n} completed, stuck"
        );
        let q = format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name LIKE '{app}%'"
        );
        ended += dray::sqlx::query_scalar::<_, i64>(dray::sqlx::AssertSqlSafe(q))
            .fetch_one(store.pool())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ended > 0, "connections were ended");
    let twice = no_job_lost(&client, n, pg_done_per_job(&store).await).await;
    eprintln!(
        "3,000 jobs, {ended} worker connections terminated: drained in {:?}; {twice} effects \
         happened twice",
        start.elapsed()
    );
    drop(workers);
    store.drop_schema().await.unwrap();
}

/// Scenario 9: two worker processes on one SQLite file drain 2,000 jobs; one is SIGKILLed in
/// the middle (mid-transaction, as often as not: it writes all the time). The file passes
/// SQLite's integrity check and every job ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_two_processes_one_killed_mid_write() {
    let dir = tempfile::tempdir().unwrap();
    let (store, url) = sqlite_store(dir.path()).await;
    let client = Client::new(store.clone());
    let n = 2000;
    enqueue(&client, 0, n).await;
    let mut a = spawn(&url, "dray", "work");
    let b = spawn(&url, "dray", "work");
    wait_for("a quarter of the drain", DRAIN, async || {
        common::sqlite_effects(&store, "done").await >= n / 4
    })
    .await;
    a.kill();
    drained(&client, n, "the other process to finish").await;
    let check: String = dray::sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(check, "ok");
    let twice = no_job_lost(&client, n, sqlite_done_per_job(&store).await).await;
    eprintln!("SQLite, 2 processes, 1 killed: {twice} effects happened twice");
    drop(b);
}

/// Panics on every attempt.
struct Panics;
/// Never returns: its timeout ends every attempt.
struct Hangs;
/// Allocates 1 MiB after another until its timeout drops it.
struct Hogs;

fn poison_options(timeout: Option<Duration>) -> JobOptions {
    JobOptions {
        timeout,
        retry: RetryPolicy {
            max_attempts: 2,
            backoff: Backoff::Fixed,
            base: Duration::from_millis(50),
            max: Duration::from_millis(50),
            jitter: false,
        },
        ..JobOptions::default()
    }
}

impl Job for Panics {
    const NAME: &'static str = "panics";
    type Input = ();
    type Output = ();
    fn options() -> JobOptions {
        poison_options(None)
    }
    async fn run(&self, _ctx: &JobContext, _: ()) -> Result<(), JobError> {
        panic!("poison");
    }
}

impl Job for Hangs {
    const NAME: &'static str = "hangs";
    type Input = ();
    type Output = ();
    fn options() -> JobOptions {
        poison_options(Some(Duration::from_millis(200)))
    }
    async fn run(&self, _ctx: &JobContext, _: ()) -> Result<(), JobError> {
        std::future::pending().await
    }
}

impl Job for Hogs {
    const NAME: &'static str = "hogs";
    type Input = ();
    type Output = ();
    fn options() -> JobOptions {
        poison_options(Some(Duration::from_millis(300)))
    }
    async fn run(&self, _ctx: &JobContext, _: ()) -> Result<(), JobError> {
        let mut held: Vec<Vec<u8>> = Vec::new();
        loop {
            held.push(vec![1u8; 1 << 20]);
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// Scenario 8: a job that panics, one that never returns, one that allocates until its
/// timeout drops it, among 500 healthy ones: each poison job ends dead after its two attempts
/// with the error of its kind, and every healthy job completes on its first attempt.
async fn poison_jobs_end_as_documented<S: Store>(store: S) {
    let client = Client::new(store.clone());
    let worker = Worker::new(store.clone())
        .register(Panics)
        .register(Hangs)
        .register(Hogs)
        .register(Fine)
        .configure(|c| {
            c.lease = Duration::from_secs(2);
            c.heartbeat = Duration::from_millis(200);
        })
        .start()
        .unwrap();
    let poison = [
        (
            client.enqueue::<Panics>(&()).await.unwrap().id,
            FailureKind::Panic,
        ),
        (
            client.enqueue::<Hangs>(&()).await.unwrap().id,
            FailureKind::Timeout,
        ),
        (
            client.enqueue::<Hogs>(&()).await.unwrap().id,
            FailureKind::Timeout,
        ),
    ];
    let inputs: Vec<i64> = (0..500).collect();
    let healthy = client.enqueue_many::<Fine>(inputs.iter()).await.unwrap();
    for e in &healthy {
        let out = client.wait(e.id, Duration::from_secs(30)).await.unwrap();
        assert_eq!((out.state, out.attempts), (MessageState::Completed, 1));
    }
    for (id, kind) in poison {
        let out = client.wait(id, Duration::from_secs(30)).await.unwrap();
        assert_eq!(out.state, MessageState::Dead, "{id}");
        assert_eq!(out.errors.len(), 2, "{:?}", out.errors);
        assert!(
            out.errors.iter().all(|e| e.kind == kind),
            "{:?}",
            out.errors
        );
    }
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_jobs_on_postgres() {
    let (store, _) = pg_store("dray_chaos").await;
    poison_jobs_end_as_documented(store.clone()).await;
    store.drop_schema().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_jobs_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = sqlite_store(dir.path()).await;
    poison_jobs_end_as_documented(store).await;
}
