//! The conformance suite against the local PostgreSQL server, each test in its own schema.
//! PostgreSQL must be running: these tests fail (never skip) when it is not.

use std::time::Duration;

use dray_core::{Error, Queue, SchemaMode, Store};
use dray_postgres::PgStore;
use dray_testkit::Fixture;
use serde_json::json;

fn url() -> String {
    std::env::var("DRAY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn fresh_schema() -> String {
    format!("dray_t_{}", uuid::Uuid::now_v7().simple())
}

async fn open(schema: &str, mode: SchemaMode) -> dray_core::Result<PgStore> {
    PgStore::builder(url())
        .schema(schema)
        .max_connections(4)
        .schema_mode(mode)
        .connect()
        .await
}

struct Pg;

impl Fixture for Pg {
    type Store = PgStore;
    const CROSS_HANDLE_WAKE: bool = true;

    async fn store(&self) -> PgStore {
        open(&fresh_schema(), SchemaMode::Migrate)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL is required for these tests ({}): {e}", url()))
    }

    async fn reopen(&self, store: &PgStore) -> PgStore {
        open(store.schema(), SchemaMode::Check).await.unwrap()
    }

    async fn set_columns(&self, store: &PgStore, id: uuid::Uuid, set: &str) {
        // The job is in the hot table or, finished, in the history.
        for table in ["dray_jobs", "dray_jobs_history"] {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE \"{}\".{table} SET {set} WHERE id = $1",
                store.schema()
            )))
            .bind(id)
            .execute(store.pool())
            .await
            .unwrap();
        }
    }

    async fn set_run_columns(&self, store: &PgStore, id: uuid::Uuid, set: &str) {
        let schema = store.schema();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE \"{schema}\".dray_workflow_runs
             DROP CONSTRAINT IF EXISTS dray_workflow_runs_status_check"
        )))
        .execute(store.pool())
        .await
        .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE \"{schema}\".dray_workflow_runs SET {set} WHERE id = $1"
        )))
        .bind(id)
        .execute(store.pool())
        .await
        .unwrap();
    }

    async fn cron_rewind(&self, store: &PgStore, name: &str, secs: i64) {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE \"{}\".dray_cron_schedules SET last_tick = last_tick - $2 * interval '1 second'
             WHERE name = $1",
            store.schema()
        )))
        .bind(name)
        .bind(secs as f64)
        .execute(store.pool())
        .await
        .unwrap();
    }

    async fn cleanup(&self, store: PgStore) {
        store.drop_schema().await.unwrap();
        store.close().await;
    }
}

dray_testkit::conformance_tests!(Pg);

/// Starts a receive of one message of `queue` on `rq` (up to 30 s), and returns once it waits
/// in `rstore`'s wake hub; the task answers when the receive returned, and what it got.
async fn blocked_receiver(
    rq: Queue<PgStore>,
    rstore: &PgStore,
    queue: &'static str,
) -> tokio::task::JoinHandle<(std::time::Instant, Vec<dray_core::Message>)> {
    let receiver = tokio::spawn(async move {
        let got = rq.receive(queue, 1, Duration::from_secs(30)).await.unwrap();
        (std::time::Instant::now(), got)
    });
    let hub = rstore.clone();
    dray_testkit::wait_until("receiver blocked", Duration::from_secs(10), || {
        hub.wake().waiting(queue) == 1
    })
    .await;
    receiver
}

/// Runs `f` on a fresh schema and drops it afterwards.
async fn with_store<Fut: std::future::Future<Output = ()> + Send + 'static>(
    f: impl FnOnce(PgStore) -> Fut,
) {
    dray_testkit::run(Pg, |_, s| f(s)).await
}

#[tokio::test]
async fn newer_schema_is_refused() {
    with_store(|store| async move {
        let table = format!("\"{}\".dray_schema_version", store.schema());
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {table} (version, name) VALUES (9999, 'from the future')"
        )))
        .execute(store.pool())
        .await
        .unwrap();
        let err = open(store.schema(), SchemaMode::Check).await.unwrap_err();
        assert!(
            matches!(err, Error::SchemaTooNew { found: 9999, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("upgrade Dray"));
        let err = store.migrate().await.unwrap_err();
        assert!(matches!(err, Error::SchemaTooNew { .. }), "{err}");
        // Skip opens it anyway (for tools that only inspect).
        open(store.schema(), SchemaMode::Skip).await.unwrap();
    })
    .await
}

#[tokio::test]
async fn missing_schema_is_refused_until_migrated() {
    let schema = fresh_schema();
    let err = open(&schema, SchemaMode::Check).await.unwrap_err();
    assert!(
        matches!(err, Error::SchemaOutdated { found: 0, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("dray migrate"));
    let store = open(&schema, SchemaMode::Skip).await.unwrap();
    let r = store.migrate().await.unwrap();
    assert_eq!(r.from, 0);
    let all: Vec<i64> = dray_postgres::MIGRATIONS
        .iter()
        .map(|m| m.version)
        .collect();
    assert_eq!(r.applied, all);
    open(&schema, SchemaMode::Check).await.unwrap();
    store.drop_schema().await.unwrap();
}

/// A database at schema version 4, holding rows in every state as version 4 wrote them, moves
/// to version 5 (predicates on `finished_at`, no lease index) with nothing lost: every row keeps
/// its state, the claim takes only what is due, a dedup key still matches the running row that
/// holds it, and the running row's lease still works.
#[tokio::test]
async fn upgrade_from_schema_4_keeps_every_row() {
    // Rows as version 4 left them: due, not yet due, running (with a key), and the three
    // finished states.
    let rows = format!(
        "INSERT INTO dray_jobs (id, queue, key, payload, state, attempt, max_attempts,
             enqueued_at, run_at, leased_until, leased_by, finished_at) VALUES
         (gen_random_uuid(), 'up', NULL, '1', 'available', 0, 5, now(), now() - interval '1 s', NULL, NULL, NULL),
         (gen_random_uuid(), 'up', NULL, '2', 'scheduled', 0, 5, now(), now() + interval '1 h', NULL, NULL, NULL),
         ('{running}', 'up', 'k', '3', 'running', 1, 5, now(), now() - interval '2 s', now() + interval '1 h', 'old-worker', NULL),
         (gen_random_uuid(), 'up', 'k', '4', 'completed', 1, 5, now(), now() - interval '3 s', NULL, NULL, now()),
         (gen_random_uuid(), 'up', NULL, '5', 'dead', 5, 5, now(), now() - interval '4 s', NULL, NULL, now()),
         (gen_random_uuid(), 'up', NULL, '6', 'cancelled', 0, 5, now(), now() - interval '5 s', NULL, NULL, now());",
        running = dray_testkit::queue::UPGRADED_RUNNING_ID
    );
    let (skip, schema) = schema_at(4, &rows).await;
    let report = skip.migrate().await.unwrap();
    assert_eq!(
        (report.from, report.to),
        (4, dray_postgres::MIGRATIONS.len() as i64)
    );

    let store = open(&schema, SchemaMode::Check).await.unwrap();
    dray_testkit::queue::an_upgraded_store_keeps_every_row(store.clone()).await;
    store.drop_schema().await.unwrap();
}

/// A schema built by the migrations up to `version` (`dray_schema_version` as `migrate` keeps
/// it), with `rows` run after them; returns a handle that neither checks nor migrates.
async fn schema_at(version: i64, rows: &str) -> (PgStore, String) {
    let schema = fresh_schema();
    let skip = open(&schema, SchemaMode::Skip).await.unwrap();
    let mut setup = format!(
        "CREATE SCHEMA \"{schema}\"; SET search_path TO \"{schema}\";
         CREATE TABLE dray_schema_version (version bigint PRIMARY KEY, name text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now());"
    );
    for m in dray_postgres::MIGRATIONS
        .iter()
        .filter(|m| m.version <= version)
    {
        setup.push_str(m.sql);
        setup.push_str(&format!(
            "\n;INSERT INTO dray_schema_version (version, name) VALUES ({}, '{}');",
            m.version, m.name
        ));
    }
    setup.push_str(rows);
    sqlx::raw_sql(sqlx::AssertSqlSafe(setup))
        .execute(skip.pool())
        .await
        .unwrap();
    (skip, schema)
}

/// The upgrade to schema version 9 (finished jobs in a history of their own) from version 8,
/// with rows in every state: it runs while other sessions hold a row lock and an open insert
/// on the job table (it takes no lock that would wait for them), moves no row, and afterwards
/// every row reads as before; the finished ones, left in the hot table, are still re-driven,
/// have their callbacks delivered and are pruned; a job finished after the upgrade lands in
/// the history.
#[tokio::test]
async fn upgrade_from_schema_8_moves_nothing_and_keeps_every_row() {
    let id = |n: u128| uuid::Uuid::from_u128(0x0190a000_0000_7000_8000_000000000100 + n);
    let rows = format!(
        "INSERT INTO dray_jobs (id, queue, key, payload, state, attempt, max_attempts,
             enqueued_at, run_at, leased_until, leased_by, finished_at, callback_url) VALUES
         ('{}', 'up', NULL, '1', 'available', 0, 5, now(), now() - interval '1 s', NULL, NULL, NULL, NULL),
         ('{}', 'up', NULL, '2', 'scheduled', 0, 5, now(), now() + interval '1 h', NULL, NULL, NULL, NULL),
         ('{}', 'up', 'k', '3', 'running', 1, 5, now(), now() - interval '2 s', now() + interval '1 h', 'old-worker', NULL, NULL),
         ('{}', 'up', NULL, '4', 'retryable', 1, 5, now(), now() + interval '1 h', NULL, NULL, NULL, NULL),
         ('{}', 'up', 'k', '5', 'completed', 1, 5, now(), now() - interval '3 s', NULL, NULL, now(), 'http://127.0.0.1:9/hook'),
         ('{}', 'up', NULL, '6', 'dead', 5, 5, now(), now() - interval '4 s', NULL, NULL, now(), NULL),
         ('{}', 'up', NULL, '7', 'cancelled', 0, 5, now(), now() - interval '5 s', NULL, NULL, now(), NULL),
         ('{}', 'up', NULL, '8', 'completed', 1, 5, now() - interval '3 days', now() - interval '3 days', NULL, NULL, now() - interval '2 days', NULL);",
        id(1), id(2), id(3), id(4), id(5), id(6), id(7), id(8)
    );
    let (skip, schema) = schema_at(8, &rows).await;
    // Other sessions at work on the table: one holds a row lock, one an uncommitted insert.
    let mut locker = skip.pool().begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT id FROM \"{schema}\".dray_jobs WHERE id = $1 FOR UPDATE"
    )))
    .bind(id(3))
    .execute(&mut *locker)
    .await
    .unwrap();
    let mut writer = skip.pool().begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO \"{schema}\".dray_jobs (id, queue, payload, state, max_attempts, enqueued_at, run_at)
         VALUES ($1, 'other', '0', 'available', 1, now(), now())"
    )))
    .bind(id(9))
    .execute(&mut *writer)
    .await
    .unwrap();
    let report = tokio::time::timeout(Duration::from_secs(20), skip.migrate())
        .await
        .expect("the upgrade waits for no other session")
        .unwrap();
    assert_eq!(
        (report.from, report.to),
        (8, dray_core::migrate::latest(dray_postgres::MIGRATIONS))
    );
    writer.rollback().await.unwrap();
    locker.rollback().await.unwrap();

    let store = open(&schema, SchemaMode::Check).await.unwrap();
    let count = |sql: String| {
        let store = store.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql))
                .fetch_one(store.pool())
                .await
                .unwrap()
        }
    };
    let hot = format!("SELECT count(*) FROM \"{schema}\".dray_jobs");
    let history = format!("SELECT count(*) FROM \"{schema}\".dray_jobs_history");
    assert_eq!(
        (count(hot.clone()).await, count(history.clone()).await),
        (8, 0),
        "nothing moved"
    );

    // Every row reads as it was.
    let client = dray_core::Client::new(store.clone());
    let want = [
        "available",
        "scheduled",
        "running",
        "retryable",
        "completed",
        "dead",
        "cancelled",
        "completed",
    ];
    for (n, state) in want.iter().enumerate() {
        let m = client.get(id(n as u128 + 1)).await.unwrap().unwrap();
        assert_eq!(m.state.as_str(), *state, "row {}", n + 1);
    }
    let q = Queue::new(store.clone());
    let s = q.stats("up").await.unwrap();
    assert_eq!(
        (
            s.available,
            s.scheduled,
            s.leased,
            s.completed,
            s.dead,
            s.cancelled
        ),
        (1, 2, 1, 2, 1, 1)
    );
    // The finished rows left behind are still served: a callback delivery, a re-drive, a
    // cancel that finds the job already ended.
    let due = store
        .callback_claim(10, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(due.iter().map(|m| m.id).collect::<Vec<_>>(), vec![id(5)]);
    assert!(
        store
            .callback_settle(id(5), 1, &dray_core::CallbackSettle::Delivered)
            .await
            .unwrap()
    );
    let cancelled = client.cancel(id(7)).await.unwrap();
    assert_eq!(
        cancelled,
        dray_core::CancelOutcome::AlreadyFinished(dray_core::MessageState::Cancelled)
    );
    client.retry(id(6)).await.unwrap();
    // The re-driven row and the due one run; finished now, they land in the history.
    let got = q.receive("up", 10, Duration::ZERO).await.unwrap();
    let mut ids: Vec<_> = got.iter().map(|m| m.id).collect();
    ids.sort();
    assert_eq!(ids, vec![id(1), id(6)]);
    let refs: Vec<_> = got.iter().map(|m| m.lease()).collect();
    store
        .message_ack_many(&dray_core::QueueName::new("up").unwrap(), &refs)
        .await
        .unwrap();
    assert_eq!(
        (count(hot.clone()).await, count(history.clone()).await),
        (6, 2),
        "the two finished jobs moved to the history"
    );
    for n in [1, 6] {
        let m = client.get(id(n)).await.unwrap().unwrap();
        assert_eq!(m.state.as_str(), "completed");
    }
    // Pruning with a day's retention removes the finished row two days old, left behind in
    // the hot table, and nothing younger.
    let pruned = store
        .job_prune(Duration::from_secs(24 * 3600), 100)
        .await
        .unwrap();
    assert_eq!(pruned, 1);
    assert!(client.get(id(8)).await.unwrap().is_none());
    assert_eq!(count(hot).await, 5);
    store.drop_schema().await.unwrap();
}

#[tokio::test]
async fn concurrent_migrations_apply_once() {
    let schema = fresh_schema();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let schema = schema.clone();
        tasks.push(tokio::spawn(async move {
            let s = open(&schema, SchemaMode::Skip).await.unwrap();
            s.migrate().await.unwrap().applied.len()
        }));
    }
    let mut applied = Vec::new();
    for t in tasks {
        applied.push(t.await.unwrap());
    }
    applied.sort();
    assert_eq!(
        applied,
        vec![0, 0, 0, dray_postgres::MIGRATIONS.len()],
        "one process applies the migrations; the others find nothing to do"
    );
    open(&schema, SchemaMode::Check)
        .await
        .unwrap()
        .drop_schema()
        .await
        .unwrap();
}

#[tokio::test]
async fn bad_urls_and_unreachable_servers_say_so() {
    let err = PgStore::connect("postgres://u:secret@127.0.0.1:1/db")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert!(err.to_string().contains("server is running"), "{err}");
    let err = PgStore::connect("postgres://[not a host")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidUrl { .. }), "{err}");
    let err = PgStore::builder(url())
        .schema("Bad-Schema")
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
}

/// Claims are HOT updates (schema versions 5 and 8): a claimed version of each row fits on
/// its page beside the row as it was enqueued, even though it is wider (the lease end and a
/// worker's id as lease holder), so no claim moves a row to another page and writes index
/// entries for it. Small jobs claimed in batches, as a worker claims them, are the tightest
/// case: with the fillfactor of version 5 alone, 215 of these 2,000 moved.
#[tokio::test]
async fn claims_keep_every_row_on_its_page() {
    with_store(|store| async move {
        let config = dray_core::QueueConfig {
            // As long as a worker's default id (`worker-` and 12 hex digits).
            receiver_id: Some("worker-0123456789ab".into()),
            ..Default::default()
        };
        let q = Queue::with_config(store.clone(), config);
        let opts = dray_core::EnqueueOptions::new().kind("small");
        for chunk in 0..2 {
            let payloads: Vec<_> = (0..1000)
                .map(|i| json!({ "i": chunk * 1000 + i }))
                .collect();
            q.enqueue_many("hot", payloads, &opts).await.unwrap();
        }
        // Each row's id and the block (page) its current version is on.
        let blocks = |store: PgStore| async move {
            sqlx::query_as::<_, (uuid::Uuid, i64)>(sqlx::AssertSqlSafe(format!(
                "SELECT id, (ctid::text::point)[0]::int8 FROM \"{}\".dray_jobs ORDER BY id",
                store.schema()
            )))
            .fetch_all(store.pool())
            .await
            .unwrap()
        };
        let before = blocks(store.clone()).await;
        assert_eq!(before.len(), 2000);
        let mut claimed = 0;
        while claimed < 2000 {
            let got = q.receive("hot", 500, Duration::ZERO).await.unwrap();
            assert!(!got.is_empty(), "claimed {claimed} of 2000, then nothing");
            claimed += got.len();
        }
        let after = blocks(store.clone()).await;
        let moved: Vec<_> = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| b != a)
            .map(|(b, _)| b.0)
            .collect();
        assert!(
            moved.is_empty(),
            "{} of 2000 claimed rows moved to another page (non-HOT claims): {:?}",
            moved.len(),
            &moved[..moved.len().min(5)]
        );
    })
    .await
}

#[tokio::test]
async fn unreadable_rows_give_a_typed_error() {
    with_store(|store| async move {
        let q = Queue::new(store.clone());
        let e = q
            .enqueue("c", &json!(1), &Default::default())
            .await
            .unwrap();
        // Written by something else, each read back as a `CorruptRow` naming the row and what
        // is wrong: headers that are not an object of strings; then values that the schema
        // leaves to Dray's own checks (schema version 7): a progress out of range, a negative
        // attempt, an attempt limit below 1 and a state Dray does not know.
        for (set, what) in [
            (r#"headers = '{"n": 1}'"#, "headers"),
            ("headers = '{}', progress = 150", "progress 150"),
            ("progress = NULL, attempt = -1", "attempt -1"),
            ("attempt = 0, max_attempts = 0", "max_attempts 0"),
            (
                "max_attempts = 5, state = 'paused', finished_at = now()",
                "paused",
            ),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE \"{}\".dray_jobs SET {set} WHERE id = $1",
                store.schema()
            )))
            .bind(e.id)
            .execute(store.pool())
            .await
            .unwrap();
            let err = q.get(e.id).await.unwrap_err();
            assert!(matches!(err, Error::CorruptRow { .. }), "{err}");
            assert!(err.to_string().contains(&e.id.to_string()), "{err}");
            assert!(err.to_string().contains(what), "{err}");
        }
        // A row whose state is not pending counts as finished: no claim takes it.
        let got = q.receive("c", 10, Duration::ZERO).await.unwrap();
        assert!(got.is_empty(), "{got:?}");
    })
    .await
}

#[tokio::test]
async fn listen_connection_is_re_established() {
    with_store(|store| async move {
        // A receiver whose only timely wake-up source is LISTEN (polling every 60 s).
        let app = format!("rl_{}", &store.schema()[7..20]);
        let rstore = PgStore::builder(url())
            .schema(store.schema())
            .max_connections(2)
            .poll_interval(Duration::from_secs(60))
            .application_name(app.clone())
            .connect()
            .await
            .unwrap();
        let rq = Queue::new(rstore.clone());
        let eq = Queue::new(store.clone());
        rstore.listen().await.unwrap();
        // Kill the LISTEN connection from the server side.
        let killed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = $1) t",
        )
        .bind(format!("{app}:listen"))
        .fetch_one(store.pool())
        .await
        .unwrap();
        assert_eq!(killed, 1);
        // Wait until it is back (a new backend with that name is listening).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            )
            .bind(format!("{app}:listen"))
            .fetch_one(store.pool())
            .await
            .unwrap();
            if n == 1 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "LISTEN never came back"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let receiver = blocked_receiver(rq, &rstore, "relisten").await;
        eq.enqueue("relisten", &json!(1), &Default::default())
            .await
            .unwrap();
        let sent = std::time::Instant::now();
        let (woke, got) = receiver.await.unwrap();
        assert_eq!(got.len(), 1);
        let latency = woke.saturating_duration_since(sent);
        assert!(
            latency < Duration::from_millis(500),
            "woke after {latency:?}"
        );
        rstore.close().await;
    })
    .await
}

/// A pooled connection that the server ended is not handed out again after the statement that
/// found it dead: the next call gets a working one. (A connection idle for a second or more is
/// checked before it is handed out, so only one used within that second can fail a statement.)
#[tokio::test]
async fn connections_ended_by_the_server_are_replaced() {
    with_store(|store| async move {
        let app = format!("rc_{}", &store.schema()[7..20]);
        let s = PgStore::builder(url())
            .schema(store.schema())
            .max_connections(1)
            .application_name(app.clone())
            .connect()
            .await
            .unwrap();
        let q = Queue::new(s.clone());
        q.enqueue("rc", &json!(0), &Default::default())
            .await
            .unwrap();
        let killed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = $1) t",
        )
        .bind(&app)
        .fetch_one(store.pool())
        .await
        .unwrap();
        assert_eq!(killed, 1, "the store's one pooled connection");
        let mut failures = 0;
        let stored = loop {
            match q.enqueue("rc", &json!(1), &Default::default()).await {
                Ok(e) => break e,
                Err(err) => {
                    failures += 1;
                    assert!(
                        failures < 2,
                        "the dead connection was handed out again: {err}"
                    );
                }
            }
        };
        assert!(!stored.duplicate);
        assert_eq!(
            Queue::new(store.clone())
                .stats("rc")
                .await
                .unwrap()
                .available,
            2
        );
        s.close().await;
    })
    .await
}

/// An enqueue inside the caller's transaction wakes receivers in other processes when that
/// transaction commits (its NOTIFY is sent in the transaction), and one that rolls back is
/// never delivered: the receiver below polls only once a minute, so only a NOTIFY wakes it in
/// time.
#[tokio::test]
async fn an_enqueue_in_a_transaction_wakes_other_processes_at_commit() {
    with_store(|store| async move {
        let rstore = PgStore::builder(url())
            .schema(store.schema())
            .max_connections(2)
            .poll_interval(Duration::from_secs(60))
            .connect()
            .await
            .unwrap();
        rstore.listen().await.unwrap();
        let rq = Queue::new(rstore.clone());
        let eq = Queue::new(store.clone());
        // Rolled back: nothing to deliver, and the NOTIFY never goes out.
        let mut tx = store.pool().begin().await.unwrap();
        eq.enqueue_in(&mut tx, "txwake", &json!(0), &Default::default())
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        let receiver = blocked_receiver(rq, &rstore, "txwake").await;
        let mut tx = store.pool().begin().await.unwrap();
        let e = eq
            .enqueue_in(&mut tx, "txwake", &json!(1), &Default::default())
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let committed = std::time::Instant::now();
        let (woke, got) = receiver.await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, e.id);
        let latency = woke.saturating_duration_since(committed);
        assert!(
            latency < Duration::from_millis(500),
            "woke {latency:?} after the commit"
        );
        rstore.close().await;
    })
    .await
}

/// The builder's durations (poll interval, acquire timeout, LISTEN check) are checked when the
/// store connects: zero, one nanosecond and beyond 100 years are refused naming the setting;
/// 1 ms and 100 years are accepted.
#[tokio::test]
async fn builder_durations_are_checked() {
    use dray_core::duration::MAX_SPAN;
    use dray_postgres::PgStoreBuilder;
    type Set = fn(PgStoreBuilder, Duration) -> PgStoreBuilder;
    let settings: [(&str, Set); 3] = [
        ("poll_interval", |b, d| b.poll_interval(d)),
        ("acquire_timeout", |b, d| b.acquire_timeout(d)),
        ("listen_check_interval", |b, d| b.listen_check_interval(d)),
    ];
    for (what, set) in settings {
        for d in [
            Duration::ZERO,
            Duration::from_nanos(1),
            MAX_SPAN + Duration::from_secs(1),
            Duration::MAX,
        ] {
            let err = set(PgStore::builder(url()).schema(fresh_schema()), d)
                .connect()
                .await
                .unwrap_err();
            assert!(matches!(err, Error::InvalidArgument { .. }), "{d:?}: {err}");
            assert!(err.to_string().contains(what), "{err}");
        }
        for d in [Duration::from_millis(1), MAX_SPAN] {
            let builder = PgStore::builder(url())
                .schema(fresh_schema())
                .schema_mode(SchemaMode::Migrate);
            match set(builder, d).connect().await {
                Ok(store) => {
                    // Through a handle with the default acquire timeout (1 ms may be too short).
                    let admin = open(store.schema(), SchemaMode::Skip).await.unwrap();
                    admin.drop_schema().await.unwrap();
                    admin.close().await;
                    store.close().await;
                }
                // Accepted, yet too short to wait for a connection of a busy server.
                Err(Error::PoolExhausted { .. }) if what == "acquire_timeout" => {}
                Err(err) => panic!("{what} {d:?}: {err}"),
            }
        }
    }
}

/// The indexes of the unfinished jobs' table and their sizes in bytes.
async fn hot_indexes(store: &PgStore) -> Vec<(String, i64)> {
    sqlx::query_as(
        "SELECT c.relname::text, pg_relation_size(c.oid) FROM pg_index i
         JOIN pg_class c ON c.oid = i.indexrelid
         WHERE i.indrelid = to_regclass($1) ORDER BY 1",
    )
    .bind(format!("\"{}\".dray_jobs", store.schema()))
    .fetch_all(store.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn a_burst_gives_its_index_space_back() {
    with_store(|store| async move {
        let q = Queue::new(store.clone());
        let opts = dray_core::EnqueueOptions::new().kind("burst");
        for chunk in 0..20 {
            let payloads: Vec<_> = (0..1000).map(|i| json!(chunk * 1000 + i)).collect();
            q.enqueue_many("burst", payloads, &opts).await.unwrap();
            let got = q.receive("burst", 1000, Duration::ZERO).await.unwrap();
            assert_eq!(got.len(), 1000);
            q.ack("burst", got.iter().map(|m| m.lease())).await.unwrap();
        }
        // VACUUM until it has removed the finished rows' entries: a snapshot older than them,
        // held by a test running beside this one, keeps it from removing them for a moment.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "VACUUM \"{}\".dray_jobs",
                store.schema()
            )))
            .execute(store.pool())
            .await
            .unwrap();
            let entries: f32 =
                sqlx::query_scalar("SELECT reltuples FROM pg_class WHERE oid = to_regclass($1)")
                    .bind(format!("\"{}\".dray_jobs_pkey", store.schema()))
                    .fetch_one(store.pool())
                    .await
                    .unwrap();
            if entries < 100.0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "VACUUM left {entries} entries for a minute"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let before = hot_indexes(&store).await;
        let pkey = |list: &[(String, i64)]| {
            list.iter()
                .find(|(n, _)| n == "dray_jobs_pkey")
                .map(|(_, b)| *b)
                .unwrap()
        };
        assert!(pkey(&before) > 300_000, "{before:?}");
        // Under the slack the maintenance leader allows, nothing is rebuilt.
        assert_eq!(store.job_table_compact().await.unwrap(), Vec::new());
        // What an interrupted rebuild leaves: an invalid copy, dropped by the next call.
        q.enqueue_many("burst", [json!(1), json!(2)], &opts)
            .await
            .unwrap();
        let failed = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE UNIQUE INDEX CONCURRENTLY dray_jobs_pkey_ccnew ON \"{}\".dray_jobs (queue)",
            store.schema()
        )))
        .execute(store.pool())
        .await;
        assert!(failed.is_err(), "two jobs of one queue make it fail");
        assert!(
            hot_indexes(&store)
                .await
                .iter()
                .any(|(n, _)| n == "dray_jobs_pkey_ccnew")
        );
        // With no slack, every index larger than its entries need is rebuilt. A rebuild waits
        // for older transactions database-wide (other tests run beside this one): try again
        // when one makes it give up.
        let mut rebuilt = Vec::new();
        for _ in 0..10 {
            match store.rebuild_bloated_indexes(0).await {
                Ok(r) => {
                    rebuilt.extend(r);
                    break;
                }
                Err(e) => eprintln!("rebuild gave up: {e}"),
            }
        }
        let after = hot_indexes(&store).await;
        assert!(
            after.iter().all(|(n, _)| !n.contains("_ccnew")),
            "the leftover is gone: {after:?}"
        );
        let r = rebuilt
            .iter()
            .find(|r| r.name == "dray_jobs_pkey")
            .unwrap_or_else(|| panic!("{rebuilt:?}"));
        assert_eq!(r.bytes_before, pkey(&before) as u64);
        assert!(r.bytes_after <= 65_536, "{r:?}");
        assert_eq!(pkey(&after) as u64, r.bytes_after);
        // The table works as before: keys are still unique among unfinished jobs, claims and
        // completions go on.
        let keyed = dray_core::EnqueueOptions::new().kind("burst").key("k");
        let a = q.enqueue("burst", &json!(3), &keyed).await.unwrap();
        let b = q.enqueue("burst", &json!(4), &keyed).await.unwrap();
        assert_eq!((a.id, b.duplicate), (b.id, true));
        let got = q.receive("burst", 10, Duration::ZERO).await.unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(
            q.ack("burst", got.iter().map(|m| m.lease())).await.unwrap(),
            3
        );
    })
    .await
}
