//! The conformance suite against SQLite, each test on its own file in a temp dir.

use std::time::Duration;

use dray_core::{
    ClaimParams, Completion, Error, MessageState, Queue, QueueName, SchemaMode, Store,
};
use dray_sqlite::SqliteStore;
use dray_testkit::Fixture;
use serde_json::json;
use uuid::Uuid;

struct Lite;

impl Fixture for Lite {
    type Store = SqliteStore;
    // Another handle's commits are found by the store's watch, a timer (every 20 ms) like the
    // poll, so the shared suite holds SQLite to the poll's looser bound; the watch itself is
    // tested below with the poll out of the way.
    const CROSS_HANDLE_WAKE: bool = false;

    async fn store(&self) -> SqliteStore {
        // The directory is removed at cleanup (from the store's URL).
        let dir = tempfile::tempdir().unwrap().keep();
        SqliteStore::open(dir.join("dray.db").to_str().unwrap())
            .await
            .unwrap()
    }

    async fn reopen(&self, store: &SqliteStore) -> SqliteStore {
        SqliteStore::builder(store.url())
            .schema_mode(SchemaMode::Check)
            .open()
            .await
            .unwrap()
    }

    async fn set_columns(&self, store: &SqliteStore, id: uuid::Uuid, set: &str) {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE dray_jobs SET {set} WHERE id = ?1"
        )))
        .bind(id)
        .execute(store.pool())
        .await
        .unwrap();
    }

    async fn set_run_columns(&self, store: &SqliteStore, id: uuid::Uuid, set: &str) {
        // One connection (the writer): the pragma holds for the update.
        let mut conn = store.pool().acquire().await.unwrap();
        sqlx::query("PRAGMA ignore_check_constraints = ON")
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE dray_workflow_runs SET {set} WHERE id = ?1"
        )))
        .bind(id)
        .execute(&mut *conn)
        .await
        .unwrap();
        sqlx::query("PRAGMA ignore_check_constraints = OFF")
            .execute(&mut *conn)
            .await
            .unwrap();
    }

    async fn cron_rewind(&self, store: &SqliteStore, name: &str, secs: i64) {
        sqlx::query(
            "UPDATE dray_cron_schedules SET last_tick = last_tick - ?2 * 1000 WHERE name = ?1",
        )
        .bind(name.to_owned())
        .bind(secs)
        .execute(store.pool())
        .await
        .unwrap();
    }

    async fn cleanup(&self, store: SqliteStore) {
        store.close().await;
        let path = std::path::PathBuf::from(store.url().trim_start_matches("sqlite://"));
        if let Some(dir) = path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

dray_testkit::conformance_tests!(Lite);

#[tokio::test]
async fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.db");
    let path = path.to_str().unwrap();
    let store = SqliteStore::open(path).await.unwrap();
    sqlx::query(
        "INSERT INTO dray_schema_version (version, name, applied_at) VALUES (9999, 'future', 0)",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let err = SqliteStore::open(path).await.unwrap_err();
    assert!(
        matches!(err, Error::SchemaTooNew { found: 9999, .. }),
        "{err}"
    );
    let err = SqliteStore::builder(path)
        .schema_mode(SchemaMode::Check)
        .open()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::SchemaTooNew { .. }), "{err}");
}

#[tokio::test]
async fn opening_migrates_a_new_file_and_check_refuses_an_empty_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e.db");
    let err = SqliteStore::builder(path.to_str().unwrap())
        .schema_mode(SchemaMode::Check)
        .open()
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::SchemaOutdated { found: 0, .. }),
        "{err}"
    );
    let store = SqliteStore::open(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    assert_eq!(
        store.schema_version().await.unwrap(),
        dray_sqlite::MIGRATIONS.last().unwrap().version
    );
}

#[tokio::test]
async fn bad_paths_say_so() {
    let err = SqliteStore::open("/nonexistent-dir/sub/x.db")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert!(err.to_string().contains("cannot connect"), "{err}");
}

#[tokio::test]
async fn in_memory_works_for_a_single_process() {
    let store = SqliteStore::open("sqlite::memory:").await.unwrap();
    let q = Queue::new(store);
    let e = q
        .enqueue("m", &json!(1), &Default::default())
        .await
        .unwrap();
    let got = q.receive("m", 1, std::time::Duration::ZERO).await.unwrap();
    assert_eq!(got[0].id, e.id);
    assert_eq!(q.get(e.id).await.unwrap().unwrap().attempt, 1);
}

#[tokio::test]
async fn unreadable_rows_cannot_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("c.db").to_str().unwrap())
        .await
        .unwrap();
    let q = Queue::new(store.clone());
    let e = q
        .enqueue("c", &json!(1), &Default::default())
        .await
        .unwrap();
    // The schema's CHECKs refuse JSON that is not JSON, headers that are not an object, and a
    // running row without a lease end.
    for stmt in [
        "UPDATE dray_jobs SET payload = 'not json' WHERE id = ?1",
        "UPDATE dray_jobs SET headers = '[1]' WHERE id = ?1",
        "UPDATE dray_jobs SET state = 'running', leased_until = NULL WHERE id = ?1",
    ] {
        let err = sqlx::query(stmt)
            .bind(e.id)
            .execute(store.pool())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("CHECK"), "{stmt}: {err}");
    }
    // What passes the CHECKs but is not Dray's (headers of the wrong shape; since schema
    // version 5 also a progress, attempt or state the schema leaves to Dray) is read back as a
    // `CorruptRow` naming the row and what is wrong, never a panic.
    for (set, what) in [
        (r#"headers = '{"n": 1}'"#, "headers"),
        ("headers = '{}', progress = 150", "progress 150"),
        ("progress = NULL, attempt = -1", "attempt -1"),
        ("attempt = 0, max_attempts = 0", "max_attempts 0"),
        // Values of the wrong type in columns Dray reads packed (see `sql::CLAIM_COLS`).
        ("max_attempts = 5, priority = 'high'", "priority"),
        ("priority = 0, run_at = 1.5", "run_at"),
        ("run_at = 0, progress = 'half'", "progress"),
        ("progress = NULL, kind = x'ff00'", "columns"),
        ("kind = NULL, callback_url = x'c3'", "columns"),
        ("callback_url = NULL, attempt = 70000000000", "attempt"),
        ("attempt = 0, state = 'paused'", "paused"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE dray_jobs SET {set} WHERE id = ?1"
        )))
        .bind(e.id)
        .execute(store.pool())
        .await
        .unwrap();
        let err = q.get(e.id).await.unwrap_err();
        assert!(matches!(err, Error::CorruptRow { .. }), "{set}: {err}");
        assert!(err.to_string().contains(&e.id.to_string()), "{err}");
        assert!(err.to_string().contains(what), "{err}");
    }
    // A row whose state is not pending is never claimed, though it is not finished.
    let got = q.receive("c", 10, std::time::Duration::ZERO).await.unwrap();
    assert!(got.is_empty(), "{got:?}");
}

/// Completions without output of the leases `claimed` holds.
fn completions(claimed: &[dray_core::Message]) -> Vec<Completion> {
    claimed
        .iter()
        .map(|m| Completion {
            lease: m.lease(),
            result: None,
        })
        .collect()
}

/// A completion finds each claimed row by the rowid its claim returned, but never trusts it: a
/// row moved to another rowid, and another row moved into the rowid a claimed one had, leave
/// the batch completing exactly the rows it names (by the id path), and the row that took the
/// old rowid untouched. A handle that did not claim the rows completes them by id.
#[tokio::test]
async fn completion_by_rowid_never_touches_another_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.db");
    let store = SqliteStore::open(path.to_str().unwrap()).await.unwrap();
    let q = Queue::new(store.clone());
    let mut ids = Vec::new();
    for n in 0..6 {
        let e = q
            .enqueue("r", &json!(n), &Default::default())
            .await
            .unwrap();
        ids.push(e.id);
    }
    let params = ClaimParams {
        queue: QueueName::new("r").unwrap(),
        limit: 3,
        lease: Duration::from_secs(60),
        leased_by: None,
    };
    let claimed = store.message_claim(&params).await.unwrap();
    let claimed_ids: Vec<Uuid> = claimed.iter().map(|m| m.id).collect();
    assert_eq!(claimed_ids, ids[..3]);
    let rowid_of = |id: Uuid| {
        let store = store.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT rowid FROM dray_jobs WHERE id = ?1")
                .bind(id)
                .fetch_one(store.pool())
                .await
                .unwrap()
        }
    };
    let old = rowid_of(ids[0]).await;
    for (sql, id) in [
        (
            "UPDATE dray_jobs SET rowid = rowid + 1000 WHERE id = ?1",
            ids[0],
        ),
        ("UPDATE dray_jobs SET rowid = ?2 WHERE id = ?1", ids[5]),
    ] {
        sqlx::query(sql)
            .bind(id)
            .bind(old)
            .execute(store.pool())
            .await
            .unwrap();
    }
    assert_eq!(rowid_of(ids[5]).await, old);
    let done = completions(&claimed);
    let wrote = store.job_complete_many(&done).await.unwrap();
    assert_eq!(wrote.applied.len(), 3, "{wrote:?}");
    for id in &claimed_ids {
        assert!(wrote.applied.contains(id), "{id} not applied: {wrote:?}");
        let m = q.get(*id).await.unwrap().unwrap();
        assert_eq!(m.state, MessageState::Completed, "{id}");
    }
    let bystander = q.get(ids[5]).await.unwrap().unwrap();
    assert_eq!(bystander.state, MessageState::Available);
    assert_eq!(bystander.attempt, 0);
    assert!(bystander.finished_at.is_none());

    // Claimed through one handle, completed through another (no hints there): by id, and a
    // second completion of the same leases applies nothing.
    let claimed = store.message_claim(&params).await.unwrap();
    assert_eq!(claimed.len(), 3);
    let other = SqliteStore::open(path.to_str().unwrap()).await.unwrap();
    let done = completions(&claimed);
    assert_eq!(
        other.job_complete_many(&done).await.unwrap().applied.len(),
        3
    );
    assert!(
        store
            .job_complete_many(&done)
            .await
            .unwrap()
            .applied
            .is_empty()
    );
    for m in &claimed {
        let m = q.get(m.id).await.unwrap().unwrap();
        assert_eq!(m.state, MessageState::Completed);
    }
}

/// The store checkpoints the write-ahead log itself, beside the writer: pages written to the
/// log reach the database file without any commit reaching SQLite's own threshold. With the
/// store's checkpoints turned off, the same writes stay in the log (SQLite's default waits for
/// 1,000 pages).
#[tokio::test]
async fn the_store_checkpoints_the_log_beside_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let size = |name: &str| std::fs::metadata(dir.path().join(name)).unwrap().len();
    let payload = "x".repeat(1000);
    for (name, every) in [
        ("off.db", Duration::ZERO),
        ("on.db", Duration::from_millis(10)),
    ] {
        let store = SqliteStore::builder(dir.path().join(name).to_str().unwrap())
            .checkpoint_interval(every)
            .open()
            .await
            .unwrap();
        let before = size(name);
        // ~1.6 MB of rows: ~400 pages, under SQLite's threshold.
        Queue::new(store.clone())
            .enqueue_many("wal", (0..1500).map(|_| &payload), &Default::default())
            .await
            .unwrap();
        if every.is_zero() {
            assert!(
                size(name) < before + 500_000,
                "nothing checkpointed yet: {} -> {}",
                before,
                size(name)
            );
            continue;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while size(name) < before + 1_000_000 {
            assert!(
                std::time::Instant::now() < deadline,
                "the log was never checkpointed: {} -> {}",
                before,
                size(name)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A file at schema version 3, holding rows in every state as version 3 wrote them, moves to
/// version 4 (predicates on `finished_at`, a generated `rank`, no lease index) with nothing
/// lost: every row keeps its state, the claim takes only what is due, a dedup key still
/// matches the running row that holds it, and that row's lease still works.
#[tokio::test]
async fn upgrade_from_schema_3_keeps_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("u.db");
    let path = path.to_str().unwrap();
    let skip = SqliteStore::builder(path)
        .schema_mode(SchemaMode::Skip)
        .open()
        .await
        .unwrap();
    let mut setup = String::from(
        "CREATE TABLE dray_schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL,
             applied_at INTEGER NOT NULL);",
    );
    for m in dray_sqlite::MIGRATIONS.iter().filter(|m| m.version <= 3) {
        setup.push_str(m.sql);
        setup.push_str(&format!(
            "\n;INSERT INTO dray_schema_version (version, name, applied_at) VALUES ({}, '{}', 0);",
            m.version, m.name
        ));
    }
    // Rows as version 3 left them (times in ms): due, not yet due, running (with a key), and
    // the three finished states.
    setup.push_str(&format!(
        "INSERT INTO dray_jobs (id, queue, key, payload, state, attempt, max_attempts,
             enqueued_at, run_at, leased_until, leased_by, finished_at)
         SELECT randomblob(16), 'up', NULL, '1', 'available', 0, 5, n, n - 1000, NULL, NULL, NULL FROM (SELECT CAST(unixepoch('subsec') * 1000 AS INTEGER) AS n)
         UNION ALL SELECT randomblob(16), 'up', NULL, '2', 'scheduled', 0, 5, n, n + 3600000, NULL, NULL, NULL FROM (SELECT CAST(unixepoch('subsec') * 1000 AS INTEGER) AS n)
         UNION ALL SELECT x'{running}', 'up', 'k', '3', 'running', 1, 5, n, n - 2000, n + 3600000, 'old-worker', NULL FROM (SELECT CAST(unixepoch('subsec') * 1000 AS INTEGER) AS n)
         UNION ALL SELECT randomblob(16), 'up', 'k', '4', 'completed', 1, 5, n, n - 3000, NULL, NULL, n FROM (SELECT CAST(unixepoch('subsec') * 1000 AS INTEGER) AS n)
         UNION ALL SELECT randomblob(16), 'up', NULL, '5', 'dead', 5, 5, n, n - 4000, NULL, NULL, n FROM (SELECT CAST(unixepoch('subsec') * 1000 AS INTEGER) AS n)
         UNION ALL SELECT randomblob(16), 'up', NULL, '6', 'cancelled', 0, 5, n, n - 5000, NULL, NULL, n FROM (SELECT CAST(unixepoch('subsec') * 1000 AS INTEGER) AS n);",
        running = dray_testkit::queue::UPGRADED_RUNNING_ID.simple()
    ));
    sqlx::raw_sql(sqlx::AssertSqlSafe(setup))
        .execute(skip.pool())
        .await
        .unwrap();
    let report = skip.migrate().await.unwrap();
    assert_eq!(
        (report.from, report.to),
        (3, dray_sqlite::MIGRATIONS.len() as i64)
    );
    skip.close().await;

    let store = SqliteStore::builder(path)
        .schema_mode(SchemaMode::Check)
        .open()
        .await
        .unwrap();
    dray_testkit::queue::an_upgraded_store_keeps_every_row(store.clone()).await;
    store.close().await;
}

/// A receiver waiting on one handle is woken by an enqueue through another (as from another
/// process) by the store's watch of the file's commits, not by its poll: here the poll is ten
/// minutes away. With the watch off, the same receiver is still waiting well after the enqueue.
#[tokio::test]
async fn another_handles_enqueue_wakes_a_waiting_receiver_through_the_watch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.db");
    let path = path.to_str().unwrap();
    let other = Queue::new(SqliteStore::open(path).await.unwrap());
    let opts = dray_core::EnqueueOptions::new();
    for watch in [dray_sqlite::DEFAULT_WATCH_INTERVAL, Duration::ZERO] {
        let store = SqliteStore::builder(path)
            .poll_interval(Duration::from_secs(600))
            .watch_interval(watch)
            .open()
            .await
            .unwrap();
        let receiver = {
            let q = Queue::new(store.clone());
            tokio::spawn(async move { q.receive("x", 1, Duration::from_secs(600)).await })
        };
        dray_testkit::wait_until("the receiver is blocked", Duration::from_secs(10), || {
            store.wake().waiting("x") == 1
        })
        .await;
        other.enqueue("x", &json!(1), &opts).await.unwrap();
        if watch.is_zero() {
            let waited = tokio::time::timeout(Duration::from_millis(500), receiver).await;
            assert!(waited.is_err(), "without the watch only the poll wakes it");
            assert_eq!(store.wake().waiting("x"), 1);
        } else {
            let got = tokio::time::timeout(Duration::from_secs(10), receiver)
                .await
                .expect("woken by the watch, long before its poll")
                .unwrap()
                .unwrap();
            assert_eq!(got.len(), 1);
        }
        store.close().await;
    }
}

/// The builder's durations are checked when the store opens: an interval of zero or one
/// nanosecond (where zero does not mean "off"), or beyond 100 years, and a busy timeout SQLite
/// cannot count, are refused naming the setting; nothing is created.
#[tokio::test]
async fn builder_durations_are_checked() {
    use dray_core::duration::MAX_SPAN;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.db");
    let url = path.to_str().unwrap();
    let ns = Duration::from_nanos(1);
    type Set = fn(dray_sqlite::SqliteStoreBuilder, Duration) -> dray_sqlite::SqliteStoreBuilder;
    let settings: [(&str, Set, &[Duration]); 5] = [
        (
            "poll_interval",
            |b, d| b.poll_interval(d),
            &[Duration::ZERO, ns, Duration::MAX],
        ),
        (
            "acquire_timeout",
            |b, d| b.acquire_timeout(d),
            &[Duration::ZERO, ns, MAX_SPAN + Duration::from_secs(1)],
        ),
        (
            "busy_timeout",
            |b, d| b.busy_timeout(d),
            &[
                dray_sqlite::MAX_BUSY_TIMEOUT + Duration::from_millis(1),
                Duration::MAX,
            ],
        ),
        (
            "checkpoint_interval",
            |b, d| b.checkpoint_interval(d),
            &[ns, MAX_SPAN + Duration::from_secs(1), Duration::MAX],
        ),
        (
            "watch_interval",
            |b, d| b.watch_interval(d),
            &[ns, Duration::MAX],
        ),
    ];
    for (what, set, bad) in settings {
        for d in bad {
            let err = set(SqliteStore::builder(url), *d).open().await.unwrap_err();
            assert!(
                matches!(err, Error::InvalidArgument { .. }),
                "{what} {d:?}: {err}"
            );
            assert!(err.to_string().contains(what), "{err}");
        }
    }
    assert!(!path.exists(), "nothing was created");
    // One millisecond is accepted (it may be too short to open a connection: that is a
    // pool error, not a refusal of the setting).
    match SqliteStore::builder(url)
        .acquire_timeout(Duration::from_millis(1))
        .open()
        .await
    {
        Ok(store) => store.close().await,
        Err(err) => assert!(!matches!(err, Error::InvalidArgument { .. }), "{err}"),
    }
    // At the bounds (and zero where it means off), it opens.
    let store = SqliteStore::builder(url)
        .poll_interval(Duration::from_millis(1))
        .busy_timeout(dray_sqlite::MAX_BUSY_TIMEOUT)
        .checkpoint_interval(Duration::ZERO)
        .watch_interval(MAX_SPAN)
        .open()
        .await
        .unwrap();
    store.close().await;
    SqliteStore::builder(url)
        .poll_interval(MAX_SPAN)
        .acquire_timeout(MAX_SPAN)
        .busy_timeout(Duration::ZERO)
        .checkpoint_interval(MAX_SPAN)
        .watch_interval(Duration::ZERO)
        .open()
        .await
        .unwrap()
        .close()
        .await;
}
