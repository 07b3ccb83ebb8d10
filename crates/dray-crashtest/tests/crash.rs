//! kill -9 a worker process mid-job, mid-workflow and mid-compensation: another process
//! finishes the work after the lease expires, and every completed step's effect happened once.
//! Real processes, real databases.

mod common;

use std::time::Duration;

use common::{
    CrashFlow, CrashSaga, Effect, pg_effects, pg_store, spawn, sqlite_effects, sqlite_store,
    wait_for,
};
use dray::workflow::RunStatus;
use dray::{Client, Error, FailureKind, MessageState, PgStore, SqliteStore, Store, WorkflowStore};

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

/// A worker process dies in the third of five steps; another process resumes the run: steps 1
/// and 2 come from their records, 3 runs again, and every completed step's effect happened once.
async fn crash_mid_workflow<S: WorkflowStore>(
    store: S,
    url: &str,
    schema: &str,
    count: impl AsyncFn(&S, &str) -> i64,
) {
    let client = Client::new(store.clone());
    let mut a = spawn(url, schema, "hang");
    let run = client
        .start_workflow::<CrashFlow>(&(), "crash-flow")
        .await
        .unwrap();
    wait_for(
        "process A to reach step 3",
        Duration::from_secs(30),
        async || count(&store, "step3-started").await == 1,
    )
    .await;
    a.kill();
    let info = run.describe().await.unwrap();
    assert_eq!(
        info.status,
        RunStatus::Running,
        "still held by the dead process"
    );
    let mut b = spawn(url, schema, "work");
    assert_eq!(run.result(Duration::from_secs(60)).await.unwrap(), 15);
    for step in ["step1", "step2", "step3", "step4", "step5"] {
        assert_eq!(count(&store, step).await, 1, "{step} happened once");
    }
    assert_eq!(count(&store, "step3-started").await, 1);
    let info = run.describe().await.unwrap();
    assert_eq!(
        info.attempt, 2,
        "the rescue counted the dead process's attempt"
    );
    assert_eq!(info.steps.len(), 5);
    b.kill();
}

/// A worker process dies while compensating (in the compensation of b, after c's was
/// recorded); another process resumes the compensation: c's does not run again, b's and a's
/// run once, and the run ends compensated.
async fn crash_mid_compensation<S: WorkflowStore>(
    store: S,
    url: &str,
    schema: &str,
    count: impl AsyncFn(&S, &str) -> i64,
) {
    let client = Client::new(store.clone());
    let mut a = spawn(url, schema, "hang");
    let run = client
        .start_workflow::<CrashSaga>(&(), "crash-saga")
        .await
        .unwrap();
    wait_for(
        "process A to compensate b",
        Duration::from_secs(30),
        async || count(&store, "undo-b-started").await == 1,
    )
    .await;
    a.kill();
    assert_eq!(count(&store, "undo-c").await, 1);
    assert_eq!(
        run.describe().await.unwrap().run.status,
        RunStatus::Compensating
    );
    let mut b = spawn(url, schema, "work");
    let err = run.result(Duration::from_secs(60)).await.unwrap_err();
    assert!(
        matches!(&err, Error::WorkflowFailed { status: RunStatus::Compensated, message, .. } if message.contains("card declined")),
        "{err}"
    );
    for (phase, n) in [
        ("a", 1),
        ("b", 1),
        ("c", 1),
        ("undo-c", 1),
        ("undo-b-started", 1),
        ("undo-b", 1),
        ("undo-a", 1),
    ] {
        assert_eq!(count(&store, phase).await, n, "{phase}");
    }
    let info = run.describe().await.unwrap();
    assert!(info.steps[..3].iter().all(|s| s.compensated_at.is_some()));
    assert_eq!(info.run.end_reason, Some(RunStatus::Failed));
    b.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_workflow_on_postgres() {
    let (store, schema) = pg_store("dray_crash").await;
    crash_mid_workflow(
        store.clone(),
        &common::pg_url(),
        &schema,
        async |s: &PgStore, phase: &str| pg_effects(s, phase).await,
    )
    .await;
    store.drop_schema().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_workflow_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let (store, url) = sqlite_store(dir.path()).await;
    crash_mid_workflow(
        store.clone(),
        &url,
        "dray",
        async |s: &SqliteStore, phase: &str| sqlite_effects(s, phase).await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_compensation_on_postgres() {
    let (store, schema) = pg_store("dray_crash").await;
    crash_mid_compensation(
        store.clone(),
        &common::pg_url(),
        &schema,
        async |s: &PgStore, phase: &str| pg_effects(s, phase).await,
    )
    .await;
    store.drop_schema().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_compensation_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let (store, url) = sqlite_store(dir.path()).await;
    crash_mid_compensation(
        store.clone(),
        &url,
        "dray",
        async |s: &SqliteStore, phase: &str| sqlite_effects(s, phase).await,
    )
    .await;
}

/// Three scheduler processes on one PostgreSQL database, a per-second schedule, 30 ticks and
/// more: every tick ran exactly once, none missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_scheduler_processes_run_each_tick_once() {
    let (store, schema) = pg_store("dray_cron").await;
    let url = common::pg_url();
    let procs: Vec<_> = (0..3)
        .map(|_| common::spawn_with(&url, &schema, "cron", 2000, None))
        .collect();
    let ticks = async || -> Vec<(String, i64)> {
        let q = format!(
            "SELECT phase, count(*) FROM \"{schema}\".crash_effects WHERE phase LIKE 'tick %' GROUP BY phase"
        );
        dray::sqlx::query_as::<_, (String, i64)>(dray::sqlx::AssertSqlSafe(q))
            .fetch_all(store.pool())
            .await
            .unwrap()
    };
    wait_for("32 ticks to run", Duration::from_secs(90), async || {
        ticks().await.len() >= 32
    })
    .await;
    drop(procs);
    let runs = ticks().await;
    let twice: Vec<_> = runs.iter().filter(|(_, n)| *n != 1).collect();
    assert!(twice.is_empty(), "ticks that ran more than once: {twice:?}");
    let mut seconds: Vec<i64> = runs
        .iter()
        .map(|(p, _)| p.trim_start_matches("tick ").parse().unwrap())
        .collect();
    seconds.sort();
    for w in seconds.windows(2) {
        assert_eq!(w[1] - w[0], 1, "a tick was missed: {seconds:?}");
    }
    // The schedule's own record agrees: every tick fired once, none skipped.
    let history = Client::new(store.clone())
        .schedule_history("crash_tick", 1000)
        .await
        .unwrap();
    assert!(
        history
            .iter()
            .all(|t| t.status == dray::cron::TickStatus::Fired),
        "{history:?}"
    );
    store.drop_schema().await.unwrap();
}

/// A relay process is killed with SIGKILL after it delivered a batch and before it marked it:
/// the events stay `processing`, are taken back as stale and delivered again by another relay
/// process, and a consumer using the inbox applies each event's effect exactly once (an effects
/// table whose primary key would refuse a second one).
macro_rules! relay_crash {
    ($store:expr, $url:expr, $schema:expr, $table:expr) => {{
        let store = $store;
        let client = Client::new(store.clone());
        let table: String = $table;
        dray::sqlx::query(dray::sqlx::AssertSqlSafe(format!(
            "CREATE TABLE {table} (event_id text PRIMARY KEY)"
        )))
        .execute(store.pool())
        .await
        .unwrap();
        let mut a = common::spawn_with($url, $schema, "relay-hang", 500, None);
        let mut outbox = dray::Outbox::new("crash").unwrap();
        for i in 0..200 {
            outbox
                .stage_event(
                    dray::OutboxEvent::new("crash.event", &i)
                        .unwrap()
                        .event_id(format!("ev-{i}")),
                )
                .unwrap();
        }
        let mut tx = store.pool().begin().await.unwrap();
        outbox.flush(&store, &mut *tx).await.unwrap();
        tx.commit().await.unwrap();
        let queue = dray::Queue::new(store.clone());
        wait_for(
            "process A to deliver the batch",
            Duration::from_secs(30),
            async || queue.stats("crash-events").await.unwrap().available == 200,
        )
        .await;
        a.kill();
        assert_eq!(client.outbox_stats("crash").await.unwrap().processing, 200);
        // The consumer: effects through the inbox, once per event id.
        let consume = async || {
            let mut applied = 0;
            loop {
                let got = queue
                    .receive("crash-events", 100, Duration::ZERO)
                    .await
                    .unwrap();
                if got.is_empty() {
                    return applied;
                }
                for m in &got {
                    let id = dray::outbox::inbox_message_id(m);
                    if let Some(mut tx) = client.inbox_begin_message("effects", m).await.unwrap() {
                        dray::sqlx::query(dray::sqlx::AssertSqlSafe(format!(
                            "INSERT INTO {table} (event_id) VALUES ($1)"
                        )))
                        .bind(id)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                        tx.commit().await.unwrap();
                        applied += 1;
                    }
                    queue.ack_lease(m).await.unwrap();
                }
            }
        };
        assert_eq!(consume().await, 200);
        // Another relay process takes the stale claims back and delivers them again.
        let mut b = common::spawn_with($url, $schema, "relay", 500, None);
        wait_for(
            "process B to publish every event",
            Duration::from_secs(30),
            async || client.outbox_stats("crash").await.unwrap().published == 200,
        )
        .await;
        b.kill();
        assert_eq!(
            queue.stats("crash-events").await.unwrap().available,
            200,
            "delivered again: at least once"
        );
        assert_eq!(consume().await, 0, "the inbox applied none of them twice");
        let n: i64 = dray::sqlx::query_scalar(dray::sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {table}"
        )))
        .fetch_one(store.pool())
        .await
        .unwrap();
        assert_eq!(n, 200, "each effect once");
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_relay_with_claimed_events_on_postgres() {
    let (store, schema) = pg_store("dray_relay").await;
    relay_crash!(
        store.clone(),
        &common::pg_url(),
        &schema,
        format!("\"{schema}\".inbox_effects")
    );
    store.drop_schema().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_relay_with_claimed_events_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let (store, url) = sqlite_store(dir.path()).await;
    relay_crash!(store.clone(), &url, "dray", "inbox_effects".to_owned());
}
