//! What the crash and chaos tests share: worker processes, waiting on conditions, and the
//! effects table the worker binary writes.

#![allow(dead_code)] // each test binary uses its own part

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use dray::{
    Client, FailureKind, Job, JobContext, JobError, PgStore, SchemaMode, SqliteStore, Store,
};

/// The same job name and types as the worker binary's (this side only enqueues).
pub struct Effect;
impl Job for Effect {
    const NAME: &'static str = "effect";
    type Input = i64;
    type Output = i64;
    async fn run(&self, _ctx: &JobContext, n: i64) -> Result<i64, JobError> {
        Ok(n)
    }
}

/// Does nothing (for in-process workers).
pub struct Fine;
impl Job for Fine {
    const NAME: &'static str = "fine";
    type Input = i64;
    type Output = i64;
    async fn run(&self, _ctx: &JobContext, n: i64) -> Result<i64, JobError> {
        Ok(n)
    }
}

/// A running `dray-crash-worker`; dropping it kills the process.
pub struct Proc {
    pub child: Child,
    _stdin: ChildStdin,
    /// The process's wall clock when it started, in Unix seconds (as it printed it).
    pub clock: i64,
}

impl Proc {
    /// SIGKILL: no shutdown, no lease release, no goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts a worker process (`hang` or `work`, leases of `lease_ms`) and waits for its `ready`.
pub fn spawn_with(url: &str, schema: &str, mode: &str, lease_ms: u64, app: Option<&str>) -> Proc {
    let env: Vec<(&str, &str)> = app.map(|a| ("DRAY_APP_NAME", a)).into_iter().collect();
    spawn_env(url, schema, mode, lease_ms, &env)
}

/// [`spawn_with`] with extra environment variables.
pub fn spawn_env(url: &str, schema: &str, mode: &str, lease_ms: u64, env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dray-crash-worker"));
    cmd.args([url, schema, mode, &lease_ms.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stdin = child.stdin.take().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let clock = match line.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["ready", _id, clock] => clock.parse().unwrap(),
        _ => panic!("worker did not start: {line:?}"),
    };
    Proc {
        child,
        _stdin: stdin,
        clock,
    }
}

/// [`spawn_with`] with 800 ms leases.
pub fn spawn(url: &str, schema: &str, mode: &str) -> Proc {
    spawn_with(url, schema, mode, 800, None)
}

/// Waits until `f` holds, checking every 20 ms, failing after `limit`.
pub async fn wait_for(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn pg_url() -> String {
    std::env::var("DRAY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn suffix() -> String {
    dray::uuid::Uuid::now_v7().simple().to_string()
}

/// A fresh PostgreSQL schema with Dray's tables and the effects table.
pub async fn pg_store(prefix: &str) -> (PgStore, String) {
    pg_store_at(&pg_url(), prefix).await
}

/// [`pg_store`] on the server at `url`. Each effect records when it happened (`at`, the
/// database clock).
pub async fn pg_store_at(url: &str, prefix: &str) -> (PgStore, String) {
    let schema = format!("{prefix}_{}", suffix());
    let store = PgStore::builder(url)
        .schema(schema.as_str())
        .schema_mode(SchemaMode::Migrate)
        .connect()
        .await
        .expect("PostgreSQL is required for this test");
    let create = format!(
        "CREATE TABLE \"{schema}\".crash_effects (job_id text NOT NULL, attempt int NOT NULL, phase text NOT NULL, \
         at timestamptz NOT NULL DEFAULT clock_timestamp())"
    );
    dray::sqlx::query(dray::sqlx::AssertSqlSafe(create))
        .execute(store.pool())
        .await
        .unwrap();
    (store, schema)
}

/// A SQLite file in `dir` with Dray's tables and the effects table.
pub async fn sqlite_store(dir: &std::path::Path) -> (SqliteStore, String) {
    let url = format!("sqlite://{}", dir.join("crash.db").display());
    let store = SqliteStore::open(&url).await.unwrap();
    dray::sqlx::query(
        "CREATE TABLE crash_effects (job_id TEXT NOT NULL, attempt INTEGER NOT NULL, phase TEXT NOT NULL)",
    )
    .execute(store.pool())
    .await
    .unwrap();
    (store, url)
}

/// Effects recorded in `phase` (PostgreSQL).
pub async fn pg_effects(store: &PgStore, phase: &str) -> i64 {
    let q = format!(
        "SELECT count(*) FROM \"{}\".crash_effects WHERE phase = $1",
        store.schema()
    );
    dray::sqlx::query_scalar(dray::sqlx::AssertSqlSafe(q))
        .bind(phase.to_owned())
        .fetch_one(store.pool())
        .await
        .unwrap()
}

/// Effects recorded in `phase` (SQLite).
pub async fn sqlite_effects(store: &SqliteStore, phase: &str) -> i64 {
    dray::sqlx::query_scalar("SELECT count(*) FROM crash_effects WHERE phase = ?1")
        .bind(phase.to_owned())
        .fetch_one(store.pool())
        .await
        .unwrap()
}

/// How long any drain may take before a test fails.
pub const DRAIN: Duration = Duration::from_secs(180);

/// How many `done` effects each job recorded (PostgreSQL).
pub async fn pg_done_per_job(store: &PgStore) -> HashMap<String, i64> {
    let q = format!(
        "SELECT job_id, count(*) FROM \"{}\".crash_effects WHERE phase = 'done' GROUP BY job_id",
        store.schema()
    );
    dray::sqlx::query_as::<_, (String, i64)>(dray::sqlx::AssertSqlSafe(q))
        .fetch_all(store.pool())
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// How many `done` effects each job recorded (SQLite).
pub async fn sqlite_done_per_job(store: &SqliteStore) -> HashMap<String, i64> {
    dray::sqlx::query_as::<_, (String, i64)>(
        "SELECT job_id, count(*) FROM crash_effects WHERE phase = 'done' GROUP BY job_id",
    )
    .fetch_all(store.pool())
    .await
    .unwrap()
    .into_iter()
    .collect()
}

/// Enqueues `n` effect jobs in batches of 1,000.
pub async fn enqueue<S: Store>(client: &Client<S>, from: i64, n: i64) {
    let mut i = from;
    while i < from + n {
        let chunk: Vec<i64> = (i..(i + 1000).min(from + n)).collect();
        client.enqueue_many::<Effect>(chunk.iter()).await.unwrap();
        i += 1000;
    }
}

/// The end of every scenario: all `n` jobs completed (none dead, none left), each effect
/// happened, and each job whose effect happened more than once ran again because its lease
/// expired (a kill or a lost connection made that run unavoidable). Returns how many did.
pub async fn no_job_lost<S: Store>(
    client: &Client<S>,
    n: i64,
    done: HashMap<String, i64>,
) -> usize {
    let stats = client.queue().stats("default").await.unwrap();
    assert_eq!(
        (
            stats.completed,
            stats.dead,
            stats.available + stats.scheduled + stats.leased
        ),
        (n, 0, 0),
        "every job completed: {stats:?}"
    );
    assert_eq!(done.len() as i64, n, "every job's effect happened");
    let mut twice = 0;
    for (id, times) in done {
        if times > 1 {
            twice += 1;
            let m = client.get(id.parse().unwrap()).await.unwrap().unwrap();
            assert!(
                m.attempt >= 2 && m.errors.iter().any(|e| e.kind == FailureKind::LeaseExpired),
                "{id} ran {times} times without a rescued lease: {m:?}"
            );
        }
    }
    twice
}

/// Waits until `n` jobs are completed.
pub async fn drained<S: Store>(client: &Client<S>, n: i64, what: &str) {
    wait_for(what, DRAIN, async || {
        client.queue().stats("default").await.unwrap().completed == n
    })
    .await;
}

/// The worker binary's five-step workflow, as a client names it (this side only starts it).
pub struct CrashFlow;
impl dray::Workflow for CrashFlow {
    const NAME: &'static str = "crash_flow";
    type Input = ();
    type Output = u32;
    async fn run(&self, _: &dray::WorkflowContext, _: ()) -> Result<u32, dray::WorkflowError> {
        Err(dray::WorkflowError::permanent(
            "runs in the worker binary only",
        ))
    }
}

/// The worker binary's saga, as a client names it.
pub struct CrashSaga;
impl dray::Workflow for CrashSaga {
    const NAME: &'static str = "crash_saga";
    type Input = ();
    type Output = ();
    async fn run(&self, _: &dray::WorkflowContext, _: ()) -> Result<(), dray::WorkflowError> {
        Err(dray::WorkflowError::permanent(
            "runs in the worker binary only",
        ))
    }
}
