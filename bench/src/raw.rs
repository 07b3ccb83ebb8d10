//! The baselines Dray is measured against on the same driver and the same table: a plain
//! one-row INSERT (back to back, and paced as W3 enqueues), and the raw-SQL floor of a queue
//! (claim 500 with SKIP LOCKED, then mark those 500 completed; no client logic at all).

use std::time::Instant;

use dray::sqlx::{self, AssertSqlSafe, Row};
use dray::{PgStore, SqliteStore};

use crate::BenchResult;

/// What the harness needs from a store beyond [`dray::WorkflowStore`] and [`dray::OutboxStore`].
pub trait RawStore: dray_server::ServerStore {
    /// Transactions the database has committed or rolled back so far, all sessions
    /// (PostgreSQL's `pg_stat_database`); `None` on SQLite.
    fn transactions(&self) -> impl Future<Output = BenchResult<Option<i64>>> + Send;

    /// The WAL position now (PostgreSQL), for WAL bytes per job.
    fn wal_position(&self) -> impl Future<Output = BenchResult<Option<String>>> + Send;
    /// Bytes of WAL between two positions.
    fn wal_diff(&self, later: &str, earlier: &str)
    -> impl Future<Output = BenchResult<f64>> + Send;
    /// Creates `bench_plain`, the table of the plain INSERT: an id and a JSON payload.
    fn create_plain(&self) -> impl Future<Output = BenchResult<()>> + Send;
    /// One autocommit INSERT of row `i` into `bench_plain`.
    fn insert_plain(&self, i: usize) -> impl Future<Output = BenchResult<()>> + Send;
    /// Updates the planner's statistics of Dray's tables.
    fn analyze(&self) -> impl Future<Output = BenchResult<()>> + Send;
    /// Drains `n` queued jobs with raw claim-and-complete statements; jobs/s.
    fn floor(&self, n: usize) -> impl Future<Output = BenchResult<f64>> + Send;
    /// Whether `queue` still has an unfinished job: the cheap end-of-run check of W2, one
    /// descent of the claim index rather than [`dray::Queue::stats`]' count of every row (which,
    /// polled while the last completions are in flight, slowed them down).
    fn any_unfinished(&self, queue: &str) -> impl Future<Output = BenchResult<bool>> + Send;
    /// A second handle on the same database (its own connections and wake-up hub), as another
    /// process would open it; `url` is the one this store was opened with.
    fn reopen(&self, url: &str) -> impl Future<Output = BenchResult<Self>> + Send;
    /// Closes this handle's connections.
    fn close_handle(&self) -> impl Future<Output = ()> + Send;
    /// Opens a transaction on a connection of its own and keeps it open until the returned
    /// value is dropped (W6). PostgreSQL: `BEGIN; SELECT txid_current();`, a write transaction
    /// that holds back the xmin horizon, so VACUUM can remove no row version deleted after it
    /// began. SQLite: a read transaction, which keeps checkpoints from recycling the WAL.
    fn hold_xmin(&self) -> impl Future<Output = BenchResult<Box<dyn Send>>> + Send;
    /// Stores `n` jobs that finished an hour ago, where this store keeps finished jobs
    /// (PostgreSQL: the history; SQLite: the job table itself), as a day of history would
    /// stand beside the live jobs (`DRAY_BENCH_HISTORY`, an experiment knob of W2).
    fn fill_history(&self, n: usize) -> impl Future<Output = BenchResult<()>> + Send;
    /// Sizes of Dray's job tables (bytes, indexes and TOAST included) and their dead row
    /// versions, as one JSON object; `None` where the database cannot tell (SQLite).
    fn table_sizes(&self) -> impl Future<Output = BenchResult<Option<serde_json::Value>>> + Send;
    /// VACUUMs the unfinished jobs' table (PostgreSQL; nothing on SQLite), as autovacuum
    /// would after a burst.
    fn vacuum_hot(&self) -> impl Future<Output = BenchResult<()>> + Send;
}

const PG_CLAIM: &str = "
UPDATE {s}.dray_jobs j SET state = 'running', attempt = j.attempt + 1,
    leased_until = now() + interval '30 seconds'
WHERE j.ctid = ANY(ARRAY(
    SELECT ctid FROM {s}.dray_jobs
    WHERE queue = 'default' AND finished_at IS NULL
      AND state IN ('scheduled', 'available', 'retryable') AND run_at <= now()
    ORDER BY -(priority::int4), run_at, id LIMIT 500 FOR UPDATE SKIP LOCKED))
RETURNING j.id";

const PG_COMPLETE: &str = "
UPDATE {s}.dray_jobs SET state = 'completed', finished_at = now(), leased_until = NULL
WHERE id = ANY($1)";

impl RawStore for PgStore {
    async fn close_handle(&self) {
        self.close().await
    }

    async fn hold_xmin(&self) -> BenchResult<Box<dyn Send>> {
        let mut tx = self.pool().begin().await?;
        sqlx::query("SELECT txid_current()")
            .execute(&mut *tx)
            .await?;
        Ok(Box::new(tx))
    }

    async fn fill_history(&self, n: usize) -> BenchResult<()> {
        let sql = format!(
            "INSERT INTO \"{}\".dray_jobs_history (id, queue, kind, payload, state, attempt,
                 max_attempts, enqueued_at, run_at, finished_at)
             SELECT gen_random_uuid(), 'default', 'bench_noop', jsonb_build_object('i', i),
                    'completed', 1, 25, now() - interval '61 minutes',
                    now() - interval '61 minutes', now() - interval '1 hour'
             FROM generate_series(1, $1) AS i",
            self.schema()
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(n as i64)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn vacuum_hot(&self) -> BenchResult<()> {
        sqlx::raw_sql(AssertSqlSafe(format!(
            "VACUUM \"{}\".dray_jobs",
            self.schema()
        )))
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn table_sizes(&self) -> BenchResult<Option<serde_json::Value>> {
        // Every table of the schema named dray_jobs*, partitions included; the hot table is
        // dray_jobs itself, everything else is history.
        let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT c.relname::text, pg_total_relation_size(c.oid),
                    COALESCE(s.n_live_tup, 0), COALESCE(s.n_dead_tup, 0)
             FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
             WHERE n.nspname = $1 AND c.relkind = 'r' AND left(c.relname, 9) = 'dray_jobs'",
        )
        .bind(self.schema())
        .fetch_all(self.pool())
        .await?;
        let mut out = serde_json::json!({
            "hot_bytes": 0, "hot_live_rows": 0, "hot_dead_rows": 0,
            "history_bytes": 0, "history_live_rows": 0, "history_dead_rows": 0,
        });
        for (name, bytes, live, dead) in rows {
            let side = if name == "dray_jobs" {
                "hot"
            } else {
                "history"
            };
            for (what, v) in [("bytes", bytes), ("live_rows", live), ("dead_rows", dead)] {
                let key = format!("{side}_{what}");
                let sum = out[&key].as_i64().unwrap_or(0) + v;
                out[&key] = sum.into();
            }
        }
        Ok(Some(out))
    }

    async fn reopen(&self, url: &str) -> BenchResult<Self> {
        Ok(PgStore::builder(url)
            .schema(self.schema())
            .max_connections(4)
            .schema_mode(dray::SchemaMode::Check)
            .connect()
            .await?)
    }

    async fn any_unfinished(&self, queue: &str) -> BenchResult<bool> {
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM \"{}\".dray_jobs WHERE queue = $1 AND finished_at IS NULL)",
            self.schema()
        );
        let any: bool = sqlx::query_scalar(AssertSqlSafe(sql))
            .bind(queue)
            .fetch_one(self.pool())
            .await?;
        Ok(any)
    }

    async fn transactions(&self) -> BenchResult<Option<i64>> {
        let mut conn = self.pool().acquire().await?;
        sqlx::query("SELECT pg_stat_clear_snapshot()")
            .execute(&mut *conn)
            .await?;
        let n: i64 = sqlx::query_scalar(
            "SELECT (xact_commit + xact_rollback)::int8 FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&mut *conn)
        .await?;
        Ok(Some(n))
    }

    async fn wal_position(&self) -> BenchResult<Option<String>> {
        let lsn: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
            .fetch_one(self.pool())
            .await?;
        Ok(Some(lsn))
    }

    async fn wal_diff(&self, later: &str, earlier: &str) -> BenchResult<f64> {
        let d: f64 = sqlx::query_scalar("SELECT pg_wal_lsn_diff($1::pg_lsn, $2::pg_lsn)::float8")
            .bind(later)
            .bind(earlier)
            .fetch_one(self.pool())
            .await?;
        Ok(d)
    }

    async fn analyze(&self) -> BenchResult<()> {
        let sql = format!("ANALYZE \"{}\".dray_jobs", self.schema());
        sqlx::query(AssertSqlSafe(sql)).execute(self.pool()).await?;
        Ok(())
    }

    async fn create_plain(&self) -> BenchResult<()> {
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE \"{}\".bench_plain (id uuid PRIMARY KEY, payload jsonb NOT NULL)",
            self.schema()
        )))
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn insert_plain(&self, i: usize) -> BenchResult<()> {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{}\".bench_plain (id, payload) VALUES ($1, $2::jsonb)",
            self.schema()
        )))
        .bind(dray::uuid::Uuid::now_v7())
        .bind(format!("{{\"i\":{i}}}"))
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn floor(&self, n: usize) -> BenchResult<f64> {
        let s = format!("\"{}\"", self.schema());
        let claim = PG_CLAIM.replace("{s}", &s);
        let complete = PG_COMPLETE.replace("{s}", &s);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..2 {
            let pool = self.pool().clone();
            let (claim, complete) = (claim.clone(), complete.clone());
            tasks.push(tokio::spawn(async move {
                let mut done = 0usize;
                loop {
                    let rows = sqlx::query(AssertSqlSafe(claim.clone()))
                        .fetch_all(&pool)
                        .await?;
                    if rows.is_empty() {
                        return Ok::<usize, sqlx::Error>(done);
                    }
                    let ids: Vec<dray::uuid::Uuid> = rows.iter().map(|r| r.get(0)).collect();
                    done += ids.len();
                    sqlx::query(AssertSqlSafe(complete.clone()))
                        .bind(ids)
                        .execute(&pool)
                        .await?;
                }
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await??;
        }
        if total != n {
            return Err(format!("floor drained {total} of {n} jobs").into());
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    }
}

impl RawStore for SqliteStore {
    async fn close_handle(&self) {
        self.close().await
    }

    async fn hold_xmin(&self) -> BenchResult<Box<dyn Send>> {
        // A read transaction on a connection of its own (not the store's writer).
        let pool = sqlx::SqlitePool::connect(self.url()).await?;
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT count(*) FROM dray_jobs")
            .execute(&mut *tx)
            .await?;
        Ok(Box::new((tx, pool)))
    }

    async fn fill_history(&self, n: usize) -> BenchResult<()> {
        sqlx::query(
            "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < ?1)
             INSERT INTO dray_jobs (id, queue, kind, payload, state, attempt, max_attempts,
                 enqueued_at, run_at, finished_at)
             SELECT randomblob(16), 'default', 'bench_noop', json_object('i', i), 'completed',
                    1, 25, t - 3660000, t - 3660000, t - 3600000
             FROM c, (SELECT CAST(unixepoch('subsec') * 1000 AS INTEGER) AS t)",
        )
        .bind(n as i64)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn table_sizes(&self) -> BenchResult<Option<serde_json::Value>> {
        Ok(None)
    }

    async fn vacuum_hot(&self) -> BenchResult<()> {
        Ok(())
    }

    async fn reopen(&self, _url: &str) -> BenchResult<Self> {
        Ok(SqliteStore::builder(self.url())
            .schema_mode(dray::SchemaMode::Check)
            .open()
            .await?)
    }

    async fn any_unfinished(&self, queue: &str) -> BenchResult<bool> {
        let any: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM dray_jobs WHERE queue = ?1 AND finished_at IS NULL)",
        )
        .bind(queue)
        .fetch_one(self.pool())
        .await?;
        Ok(any)
    }

    async fn transactions(&self) -> BenchResult<Option<i64>> {
        Ok(None)
    }

    async fn wal_position(&self) -> BenchResult<Option<String>> {
        Ok(None)
    }

    async fn wal_diff(&self, _later: &str, _earlier: &str) -> BenchResult<f64> {
        Ok(0.0)
    }

    async fn analyze(&self) -> BenchResult<()> {
        sqlx::query("ANALYZE dray_jobs")
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn create_plain(&self) -> BenchResult<()> {
        sqlx::query("CREATE TABLE bench_plain (id BLOB PRIMARY KEY, payload TEXT NOT NULL)")
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn insert_plain(&self, i: usize) -> BenchResult<()> {
        sqlx::query("INSERT INTO bench_plain (id, payload) VALUES (?1, ?2)")
            .bind(dray::uuid::Uuid::now_v7())
            .bind(format!("{{\"i\":{i}}}"))
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn floor(&self, n: usize) -> BenchResult<f64> {
        let start = Instant::now();
        let mut done = 0;
        loop {
            let ids: Vec<dray::uuid::Uuid> = sqlx::query_scalar(
                "UPDATE dray_jobs SET state = 'running', attempt = attempt + 1,
                     leased_until = CAST(unixepoch('subsec') * 1000 AS INTEGER) + 30000
                 WHERE id IN (SELECT id FROM dray_jobs
                     WHERE queue = 'default' AND finished_at IS NULL
                       AND state IN ('scheduled', 'available', 'retryable')
                       AND run_at <= CAST(unixepoch('subsec') * 1000 AS INTEGER)
                     ORDER BY rank, run_at, id LIMIT 500)
                 RETURNING id",
            )
            .fetch_all(self.pool())
            .await?;
            if ids.is_empty() {
                break;
            }
            done += ids.len();
            let list: Vec<String> = ids.iter().map(|i| i.simple().to_string()).collect();
            sqlx::query(
                "UPDATE dray_jobs SET state = 'completed', leased_until = NULL,
                     finished_at = CAST(unixepoch('subsec') * 1000 AS INTEGER)
                 WHERE id IN (SELECT unhex(value) FROM json_each(?1))",
            )
            .bind(serde_json::to_string(&list)?)
            .execute(self.pool())
            .await?;
        }
        if done != n {
            return Err(format!("floor drained {done} of {n} jobs").into());
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    }
}
