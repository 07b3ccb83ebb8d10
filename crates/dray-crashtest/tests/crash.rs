//! kill -9 a worker process mid-job: another process completes the job after the lease
//! expires, and the job's effect happens once. Real processes, real databases.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use dray::{
    Client, FailureKind, Job, JobContext, JobError, MessageState, PgStore, SchemaMode, SqliteStore,
    Store,
};

/// The same job name and types as the worker binary's (this side only enqueues).
struct Effect;
impl Job for Effect {
    const NAME: &'static str = "effect";
    type Input = i64;
    type Output = i64;
    async fn run(&self, _ctx: &JobContext, n: i64) -> Result<i64, JobError> {
        Ok(n)
    }
}

struct Proc {
    child: Child,
    _stdin: ChildStdin,
}

fn spawn(url: &str, schema: &str, mode: &str) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dray-crash-worker"))
        .args([url, schema, mode, "800"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
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

async fn wait_for(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn crash_and_recover<S: Store>(
    store: S,
    url: &str,
    schema: &str,
    count: impl AsyncFn(&S, &str) -> i64,
) {
    let client = Client::new(store.clone());
    let mut a = spawn(url, schema, "hang");
    let job = client.enqueue::<Effect>(&7).await.unwrap();
    wait_for("process A to start the job", async || {
        count(&store, "started").await == 1
    })
    .await;

    // SIGKILL: no shutdown, no lease release, no goodbye.
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let m = client.get(job.id).await.unwrap().unwrap();
    assert_eq!(
        (m.state, m.attempt),
        (MessageState::Running, 1),
        "still leased by the dead process"
    );

    let mut b = spawn(url, schema, "work");
    let out = client.wait(job.id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(out.output::<i64>().unwrap(), 7);
    assert_eq!(out.attempts, 2, "run again after the lease expired");
    assert_eq!(out.errors.len(), 1);
    assert_eq!(out.errors[0].kind, FailureKind::LeaseExpired);
    assert_eq!(count(&store, "done").await, 1, "the effect happened once");
    assert_eq!(count(&store, "started").await, 1);
    b.child.kill().unwrap();
    b.child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_job_on_postgres() {
    let url = std::env::var("DRAY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let schema = format!("dray_crash_{}", uuid_suffix());
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
    let s2 = schema.clone();
    crash_and_recover(
        store.clone(),
        &url,
        &schema,
        async move |s: &PgStore, phase: &str| {
            let q = format!("SELECT count(*) FROM \"{s2}\".crash_effects WHERE phase = $1");
            dray::sqlx::query_scalar(dray::sqlx::AssertSqlSafe(q))
                .bind(phase.to_owned())
                .fetch_one(s.pool())
                .await
                .unwrap()
        },
    )
    .await;
    store.drop_schema().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_job_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("crash.db").display());
    let store = SqliteStore::open(&url).await.unwrap();
    dray::sqlx::query("CREATE TABLE crash_effects (job_id TEXT NOT NULL, attempt INTEGER NOT NULL, phase TEXT NOT NULL)")
        .execute(store.pool())
        .await
        .unwrap();
    crash_and_recover(
        store.clone(),
        &url,
        "dray",
        async |s: &SqliteStore, phase: &str| {
            dray::sqlx::query_scalar("SELECT count(*) FROM crash_effects WHERE phase = ?1")
                .bind(phase.to_owned())
                .fetch_one(s.pool())
                .await
                .unwrap()
        },
    )
    .await;
}

fn uuid_suffix() -> String {
    dray::uuid::Uuid::now_v7().simple().to_string()
}
