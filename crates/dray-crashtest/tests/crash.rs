//! kill -9 a worker process mid-job: another process completes the job after the lease
//! expires, and the job's effect happens once. Real processes, real databases.

mod common;

use std::time::Duration;

use common::{Effect, pg_effects, pg_store, spawn, sqlite_effects, sqlite_store, wait_for};
use dray::{Client, FailureKind, MessageState, PgStore, SqliteStore, Store};

async fn crash_and_recover<S: Store>(
    store: S,
    url: &str,
    schema: &str,
    count: impl AsyncFn(&S, &str) -> i64,
) {
    let client = Client::new(store.clone());
    let mut a = spawn(url, schema, "hang");
    let job = client.enqueue::<Effect>(&7).await.unwrap();
    wait_for(
        "process A to start the job",
        Duration::from_secs(30),
        async || count(&store, "started").await == 1,
    )
    .await;

    a.kill();
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
    b.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_job_on_postgres() {
    let (store, schema) = pg_store("dray_crash").await;
    crash_and_recover(
        store.clone(),
        &common::pg_url(),
        &schema,
        async |s: &PgStore, phase: &str| pg_effects(s, phase).await,
    )
    .await;
    store.drop_schema().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_job_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let (store, url) = sqlite_store(dir.path()).await;
    crash_and_recover(
        store.clone(),
        &url,
        "dray",
        async |s: &SqliteStore, phase: &str| sqlite_effects(s, phase).await,
    )
    .await;
}
