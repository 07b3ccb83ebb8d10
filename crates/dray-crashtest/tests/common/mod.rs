//! What the crash and chaos tests share: worker processes, waiting on conditions, and the
//! effects table the worker binary writes.

#![allow(dead_code)] // each test binary uses its own part

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use dray::{Job, JobContext, JobError, PgStore, SchemaMode, SqliteStore};

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

/// A running `dray-crash-worker`; dropping it kills the process.
pub struct Proc {
    pub child: Child,
    _stdin: ChildStdin,
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
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dray-crash-worker"));
    cmd.args([url, schema, mode, &lease_ms.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    if let Some(app) = app {
        cmd.env("DRAY_APP_NAME", app);
    }
    let mut child = cmd.spawn().unwrap();
    let stdin = child.stdin.take().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("ready"), "worker did not start: {line:?}");
    Proc {
        child,
        _stdin: stdin,
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
    let url = pg_url();
    let schema = format!("{prefix}_{}", suffix());
    let store = PgStore::builder(url.as_str())
        .schema(schema.as_str())
        .schema_mode(SchemaMode::Migrate)
        .connect()
        .await
        .expect("PostgreSQL is required for this test");
    let create = format!(
        "CREATE TABLE \"{schema}\".crash_effects (job_id text NOT NULL, attempt int NOT NULL, phase text NOT NULL)"
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
