//! The workflow layer on PostgreSQL: [`WorkflowStore`] for [`PgStore`], and every statement it
//! runs. Tables: `dray_workflow_runs`, `dray_workflow_steps`, `dray_workflow_signals`,
//! `dray_workflow_state` (schema version 10). A run's driving job is the `dray_jobs` row of the
//! same id: suspending a run gives that job's lease back (without counting an attempt) and
//! makes it due at the wake time; ending a run completes it (so it moves to the history).
//!
//! Writes about held runs are fenced and ordered against signals, cancels and children ending
//! by locking the driving jobs' rows first, in id order: a signal sent while its run suspends
//! either is seen by the suspend (which then makes the run due at once) or sees the suspended
//! run (and makes it due), never neither.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use dray_core::batch::micros;
use dray_core::workflow::types::never;
use dray_core::workflow::{
    ChildOutcome, LoadBuilder, LoadedRun, NewRun, PendingSignal, RunCancel, RunFilter, RunInfo,
    RunOp, RunRow, RunStarted, RunStatus, RunWrite, StepKind, StepRecord, StepStatus,
    WorkflowStore,
};
use dray_core::{Error, Result};
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, PgConnection, Row};
use uuid::Uuid;

use crate::PgStore;

/// Statements longer than this many ids are planned per run rather than cached (see
/// `sql::Batched` for why).
const CACHED_UP_TO: usize = 32;

const RUN_COLS: &str = "r.id, r.name, r.version, r.workflow_id, r.queue, r.input, r.status, \
    r.end_reason, r.output, r.error, r.wait_signal, r.note, r.deadline, r.cancel_requested_at, \
    r.parent_id, r.restarted_from, r.superseded_by, r.created_at, r.updated_at, r.finished_at";

const STEP_COLS: &str = "run_id, seq, kind, name, status, output, error, attempts, started_at, \
    finished_at, wake_at, compensated_at";

const START: &str = "
INSERT INTO {s}.dray_workflow_runs
    (id, name, version, workflow_id, queue, input, status, deadline, parent_id)
SELECT u.id, u.name, u.version, u.workflow_id, u.queue, u.input::jsonb, 'queued',
       now() + u.timeout_us * interval '1 microsecond', u.parent_id
FROM UNNEST($1::uuid[], $2::text[], $3::int4[], $4::text[], $5::text[], $6::text[], $7::int8[],
            $8::uuid[]) AS u(id, name, version, workflow_id, queue, input, timeout_us, parent_id)
ON CONFLICT (name, workflow_id) WHERE superseded_by IS NULL DO NOTHING
RETURNING id";

const FIND_MANY: &str = "
SELECT r.id, r.name, r.workflow_id FROM {s}.dray_workflow_runs r
JOIN UNNEST($1::text[], $2::text[]) AS u(name, workflow_id)
  ON r.name = u.name AND r.workflow_id = u.workflow_id
WHERE r.superseded_by IS NULL";

const LOAD_RUNS: &str = "SELECT {run_cols} FROM {s}.dray_workflow_runs r WHERE r.id = ANY($1)";
const LOAD_STEPS: &str =
    "SELECT {step_cols} FROM {s}.dray_workflow_steps WHERE run_id = ANY($1) ORDER BY run_id, seq";
const LOAD_SIGNALS: &str = "
SELECT id, run_id, name, payload FROM {s}.dray_workflow_signals
WHERE run_id = ANY($1) AND consumed_seq IS NULL ORDER BY run_id, id";
const LOAD_CHILDREN: &str = "
SELECT r.id, r.parent_id, r.status, r.output, r.error FROM {s}.dray_workflow_runs r
WHERE r.parent_id = ANY($1) AND r.finished_at IS NOT NULL";

/// Locks the driving jobs of a batch's runs (and of the parents it may wake), in id order, and
/// answers which are running on which attempt.
const LOCK: &str = "
SELECT id, attempt, state FROM {s}.dray_jobs WHERE id = ANY($1) ORDER BY id FOR UPDATE";

const UPSERT_STEPS: &str = "
INSERT INTO {s}.dray_workflow_steps
    (run_id, seq, kind, name, status, output, error, attempts, started_at, finished_at, wake_at)
SELECT * FROM UNNEST($1::uuid[], $2::int4[], $3::text[], $4::text[], $5::text[], $6::jsonb[],
                     $7::text[], $8::int4[], $9::timestamptz[], $10::timestamptz[],
                     $11::timestamptz[])
ON CONFLICT (run_id, seq) DO UPDATE SET
    kind = EXCLUDED.kind, name = EXCLUDED.name, status = EXCLUDED.status,
    output = EXCLUDED.output, error = EXCLUDED.error, attempts = EXCLUDED.attempts,
    started_at = EXCLUDED.started_at, finished_at = EXCLUDED.finished_at,
    wake_at = EXCLUDED.wake_at
WHERE {s}.dray_workflow_steps.status NOT IN ('completed', 'failed')";

const CONSUME: &str = "
UPDATE {s}.dray_workflow_signals g SET consumed_seq = u.seq
FROM UNNEST($1::uuid[], $2::int4[]) AS u(id, seq)
WHERE g.id = u.id AND g.consumed_seq IS NULL";

const SET_STATE: &str = "
INSERT INTO {s}.dray_workflow_state (run_id, key, value)
SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::jsonb[])
ON CONFLICT (run_id, key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()";

const COMPENSATED: &str = "
UPDATE {s}.dray_workflow_steps t SET compensated_at = now()
FROM UNNEST($1::uuid[], $2::int4[]) AS u(run_id, seq)
WHERE t.run_id = u.run_id AND t.seq = u.seq";

const COMPENSATING: &str = "
UPDATE {s}.dray_workflow_runs SET status = 'compensating', end_reason = $2,
    error = COALESCE($3, error), updated_at = now()
WHERE id = $1";

const RETRYING: &str = "
UPDATE {s}.dray_workflow_runs
SET error = $2, updated_at = now(),
    status = CASE WHEN status = 'compensating' THEN status ELSE 'queued' END
WHERE id = $1";

/// Suspends one run: its status, then its job, due at once when what it waits for is already
/// there (or a cancel was asked for), else at the wake time.
const SUSPEND: &str = "
WITH r AS (
    UPDATE {s}.dray_workflow_runs SET status = $2, wait_signal = $3, updated_at = now()
    WHERE id = $1 RETURNING cancel_requested_at),
due AS (
    SELECT CASE
        WHEN (SELECT cancel_requested_at FROM r) IS NOT NULL
          OR ($3::text IS NOT NULL AND EXISTS (
                SELECT 1 FROM {s}.dray_workflow_signals g
                WHERE g.run_id = $1 AND g.name = $3 AND g.consumed_seq IS NULL))
          OR ($4::uuid IS NOT NULL AND EXISTS (
                SELECT 1 FROM {s}.dray_workflow_runs c
                WHERE c.id = $4 AND c.finished_at IS NOT NULL))
        THEN now() ELSE GREATEST($5::timestamptz, now()) END AS at)
UPDATE {s}.dray_jobs j
SET state = CASE WHEN due.at <= now() THEN 'available' ELSE 'scheduled' END,
    run_at = due.at, attempt = GREATEST(j.attempt - 1, 0), leased_until = NULL, leased_by = NULL
FROM due WHERE j.id = $1
RETURNING j.queue, due.at <= now()";

const FINISH_RUNS: &str = "
UPDATE {s}.dray_workflow_runs r
SET status = u.status, output = u.output, error = COALESCE(u.error, r.error),
    wait_signal = NULL, finished_at = now(), updated_at = now()
FROM UNNEST($1::uuid[], $2::text[], $3::jsonb[], $4::text[]) AS u(id, status, output, error)
WHERE r.id = u.id";

/// Wakes parents waiting (for a child) on runs that just ended.
const WAKE_PARENTS: &str = "
UPDATE {s}.dray_jobs j SET state = 'available', run_at = now()
WHERE j.id = ANY($1) AND j.state = 'scheduled'
  AND EXISTS (SELECT 1 FROM {s}.dray_workflow_runs p WHERE p.id = j.id AND p.status = 'waiting')
RETURNING j.queue";

const SIGNAL_RUN: &str = "
SELECT status, wait_signal, queue FROM {s}.dray_workflow_runs WHERE id = $1";
const LOCK_ONE: &str = "SELECT 1 FROM {s}.dray_jobs WHERE id = $1 FOR UPDATE";
const SIGNAL_INSERT: &str = "
INSERT INTO {s}.dray_workflow_signals (id, run_id, name, payload) VALUES ($1, $2, $3, $4::jsonb)";
const WAKE_ONE: &str = "
UPDATE {s}.dray_jobs SET state = 'available', run_at = now()
WHERE id = $1 AND state IN ('scheduled', 'retryable') RETURNING queue";

const GET: &str = "
SELECT {run_cols}, j.state AS job_state, j.attempt AS job_attempt
FROM {s}.dray_workflow_runs r LEFT JOIN {s}.dray_jobs_all j ON j.id = r.id
WHERE r.id = $1";
const GET_STEPS: &str =
    "SELECT {step_cols} FROM {s}.dray_workflow_steps WHERE run_id = $1 ORDER BY seq";
const FIND: &str = "
SELECT id FROM {s}.dray_workflow_runs WHERE name = $1 AND workflow_id = $2
  AND superseded_by IS NULL";
const LIST: &str = "
SELECT {run_cols}, j.state AS job_state, j.attempt AS job_attempt
FROM {s}.dray_workflow_runs r LEFT JOIN {s}.dray_jobs j ON j.id = r.id
WHERE ($1::text IS NULL OR r.name = $1)
  AND ($2::text IS NULL OR r.status = $2)
  AND ($3::uuid IS NULL OR r.parent_id = $3)
  AND ($4::uuid IS NULL OR r.id < $4)
ORDER BY r.id DESC LIMIT $5";
const QUERY: &str = "SELECT value FROM {s}.dray_workflow_state WHERE run_id = $1 AND key = $2";

const CANCEL_TREE: &str = "
WITH RECURSIVE tree AS (
    SELECT id FROM {s}.dray_workflow_runs WHERE id = $1
    UNION
    SELECT r.id FROM {s}.dray_workflow_runs r JOIN tree t ON r.parent_id = t.id)
SELECT id FROM tree";
const CANCEL_RUNS: &str = "
UPDATE {s}.dray_workflow_runs SET cancel_requested_at = COALESCE(cancel_requested_at, now()),
    updated_at = now()
WHERE id = ANY($1) AND finished_at IS NULL RETURNING id";
const CANCEL_WAKE: &str = "
UPDATE {s}.dray_jobs SET state = 'available', run_at = now()
WHERE id = ANY($1) AND state IN ('scheduled', 'retryable') RETURNING queue";
const CANCEL_RUNNING: &str = "
UPDATE {s}.dray_jobs SET cancel_requested_at = COALESCE(cancel_requested_at, now())
WHERE id = ANY($1) AND state = 'running'";

const RESTART_OLD: &str = "
UPDATE {s}.dray_workflow_runs SET superseded_by = $2, updated_at = now()
WHERE id = $1 AND superseded_by IS NULL AND finished_at IS NOT NULL RETURNING id";
const RESTART_NEW: &str = "
INSERT INTO {s}.dray_workflow_runs
    (id, name, version, workflow_id, queue, input, status, deadline, parent_id, restarted_from)
SELECT $1, o.name, o.version, o.workflow_id, o.queue, o.input, 'queued',
       now() + $3 * interval '1 microsecond', o.parent_id, o.id
FROM {s}.dray_workflow_runs o WHERE o.id = $2";
const RESTART_STEPS: &str = "
INSERT INTO {s}.dray_workflow_steps
    (run_id, seq, kind, name, status, output, error, attempts, started_at, finished_at, wake_at)
SELECT $1, seq, kind, name, status, output, error, attempts, started_at, finished_at, wake_at
FROM {s}.dray_workflow_steps WHERE run_id = $2 AND seq < $3 AND status = 'completed'";

const NOTE: &str = "UPDATE {s}.dray_workflow_runs SET note = $2 WHERE id = $1";

const PRUNE: &str = "
WITH gone AS (
    DELETE FROM {s}.dray_workflow_runs WHERE id IN (
        SELECT id FROM {s}.dray_workflow_runs
        WHERE finished_at < now() - $1 * interval '1 microsecond' LIMIT $2)
    RETURNING id),
steps AS (DELETE FROM {s}.dray_workflow_steps WHERE run_id IN (SELECT id FROM gone)),
signals AS (DELETE FROM {s}.dray_workflow_signals WHERE run_id IN (SELECT id FROM gone)),
state AS (DELETE FROM {s}.dray_workflow_state WHERE run_id IN (SELECT id FROM gone))
SELECT count(*) FROM gone";

/// The workflow statements with the schema filled in.
pub(crate) struct WfSql {
    start: Arc<str>,
    find_many: Arc<str>,
    load_runs: Arc<str>,
    load_steps: Arc<str>,
    load_signals: Arc<str>,
    load_children: Arc<str>,
    lock: Arc<str>,
    upsert_steps: Arc<str>,
    consume: Arc<str>,
    set_state: Arc<str>,
    compensated: Arc<str>,
    compensating: Arc<str>,
    retrying: Arc<str>,
    suspend: Arc<str>,
    finish_runs: Arc<str>,
    wake_parents: Arc<str>,
    signal_run: Arc<str>,
    lock_one: Arc<str>,
    signal_insert: Arc<str>,
    wake_one: Arc<str>,
    get: Arc<str>,
    get_steps: Arc<str>,
    find: Arc<str>,
    list: Arc<str>,
    query: Arc<str>,
    cancel_tree: Arc<str>,
    cancel_runs: Arc<str>,
    cancel_wake: Arc<str>,
    cancel_running: Arc<str>,
    restart_old: Arc<str>,
    restart_new: Arc<str>,
    restart_steps: Arc<str>,
    note: Arc<str>,
    prune: Arc<str>,
}

impl WfSql {
    pub(crate) fn new(quoted_schema: &str) -> WfSql {
        let f = |t: &str| -> Arc<str> {
            t.replace("{run_cols}", RUN_COLS)
                .replace("{step_cols}", STEP_COLS)
                .replace("{s}", quoted_schema)
                .into()
        };
        WfSql {
            start: f(START),
            find_many: f(FIND_MANY),
            load_runs: f(LOAD_RUNS),
            load_steps: f(LOAD_STEPS),
            load_signals: f(LOAD_SIGNALS),
            load_children: f(LOAD_CHILDREN),
            lock: f(LOCK),
            upsert_steps: f(UPSERT_STEPS),
            consume: f(CONSUME),
            set_state: f(SET_STATE),
            compensated: f(COMPENSATED),
            compensating: f(COMPENSATING),
            retrying: f(RETRYING),
            suspend: f(SUSPEND),
            finish_runs: f(FINISH_RUNS),
            wake_parents: f(WAKE_PARENTS),
            signal_run: f(SIGNAL_RUN),
            lock_one: f(LOCK_ONE),
            signal_insert: f(SIGNAL_INSERT),
            wake_one: f(WAKE_ONE),
            get: f(GET),
            get_steps: f(GET_STEPS),
            find: f(FIND),
            list: f(LIST),
            query: f(QUERY),
            cancel_tree: f(CANCEL_TREE),
            cancel_runs: f(CANCEL_RUNS),
            cancel_wake: f(CANCEL_WAKE),
            cancel_running: f(CANCEL_RUNNING),
            restart_old: f(RESTART_OLD),
            restart_new: f(RESTART_NEW),
            restart_steps: f(RESTART_STEPS),
            note: f(NOTE),
            prune: f(PRUNE),
        }
    }
}

fn q(
    text: &Arc<str>,
    n: usize,
) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(AssertSqlSafe(text.clone())).persistent(n <= CACHED_UP_TO)
}

fn corrupt(id: &Uuid, what: &str, err: impl std::fmt::Display) -> Error {
    Error::CorruptRow {
        id: id.to_string(),
        reason: format!("workflow column {what}: {err}"),
    }
}

fn col<'r, T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>>(
    row: &'r PgRow,
    id: &Uuid,
    name: &str,
) -> Result<T> {
    row.try_get(name).map_err(|e| corrupt(id, name, e))
}

fn decode_run(row: &PgRow) -> Result<RunRow> {
    let id: Uuid = row
        .try_get("id")
        .map_err(|e| corrupt(&Uuid::nil(), "id", e))?;
    let status: String = col(row, &id, "status")?;
    let end_reason: Option<String> = col(row, &id, "end_reason")?;
    Ok(RunRow {
        id,
        name: col(row, &id, "name")?,
        version: col(row, &id, "version")?,
        workflow_id: col(row, &id, "workflow_id")?,
        queue: col(row, &id, "queue")?,
        input: col(row, &id, "input")?,
        status: RunStatus::parse(&status).map_err(|e| corrupt(&id, "status", e))?,
        end_reason: end_reason
            .map(|s| RunStatus::parse(&s))
            .transpose()
            .map_err(|e| corrupt(&id, "end_reason", e))?,
        output: col(row, &id, "output")?,
        error: col(row, &id, "error")?,
        wait_signal: col(row, &id, "wait_signal")?,
        note: col(row, &id, "note")?,
        deadline: col(row, &id, "deadline")?,
        cancel_requested_at: col(row, &id, "cancel_requested_at")?,
        parent_id: col(row, &id, "parent_id")?,
        restarted_from: col(row, &id, "restarted_from")?,
        superseded_by: col(row, &id, "superseded_by")?,
        created_at: col(row, &id, "created_at")?,
        updated_at: col(row, &id, "updated_at")?,
        finished_at: col(row, &id, "finished_at")?,
        unreadable: None,
    })
}

/// A run row that does not decode, as far as it reads: listed (and refused by a replay) with
/// what was wrong, so one bad row never hides the others.
fn salvage_run(row: &PgRow, err: &Error) -> Option<RunRow> {
    let id: Uuid = row.try_get("id").ok()?;
    Some(RunRow::unreadable(
        id,
        row.try_get("name").unwrap_or_default(),
        err.to_string(),
    ))
}

fn decode_run_or_salvage(row: &PgRow) -> Result<RunRow> {
    decode_run(row).or_else(|e| salvage_run(row, &e).ok_or(e))
}

fn decode_step(row: &PgRow) -> Result<(Uuid, StepRecord)> {
    let id: Uuid = row
        .try_get("run_id")
        .map_err(|e| corrupt(&Uuid::nil(), "run_id", e))?;
    let kind: String = col(row, &id, "kind")?;
    let status: String = col(row, &id, "status")?;
    Ok((
        id,
        StepRecord {
            seq: col(row, &id, "seq")?,
            kind: StepKind::parse(&kind).map_err(|e| corrupt(&id, "kind", e))?,
            name: col(row, &id, "name")?,
            status: StepStatus::parse(&status).map_err(|e| corrupt(&id, "status", e))?,
            output: col(row, &id, "output")?,
            error: col(row, &id, "error")?,
            attempts: col(row, &id, "attempts")?,
            started_at: col(row, &id, "started_at")?,
            finished_at: col(row, &id, "finished_at")?,
            wake_at: col(row, &id, "wake_at")?,
            compensated_at: col(row, &id, "compensated_at")?,
        },
    ))
}

fn decode_info(row: &PgRow, steps: Vec<StepRecord>) -> Result<RunInfo> {
    let run = decode_run_or_salvage(row)?;
    let job_state: Option<String> = row.try_get("job_state").ok().flatten();
    let attempt: Option<i32> = row.try_get("job_attempt").ok().flatten();
    Ok(RunInfo::new(run, job_state.as_deref(), attempt, steps))
}

fn us(d: Option<Duration>) -> Option<i64> {
    d.map(micros)
}

impl PgStore {
    /// Starts runs on the caller's connection (a workflow start, or a cron tick's).
    pub(crate) async fn start_runs_in(
        &self,
        conn: &mut PgConnection,
        runs: &[NewRun],
    ) -> Result<Vec<RunStarted>> {
        let op = "workflow_start_many";
        if runs.is_empty() {
            return Ok(Vec::new());
        }
        let sql = &self.inner.wf;
        let n = runs.len();
        let inserted: Vec<Uuid> = q(&sql.start, n)
            .bind(runs.iter().map(|r| r.id).collect::<Vec<_>>())
            .bind(runs.iter().map(|r| r.name.as_str()).collect::<Vec<_>>())
            .bind(runs.iter().map(|r| r.version).collect::<Vec<_>>())
            .bind(
                runs.iter()
                    .map(|r| r.workflow_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                runs.iter()
                    .map(|r| r.job.queue.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(runs.iter().map(|r| r.input.as_str()).collect::<Vec<_>>())
            .bind(runs.iter().map(|r| us(r.timeout)).collect::<Vec<_>>())
            .bind(runs.iter().map(|r| r.parent_id).collect::<Vec<_>>())
            .fetch_all(&mut *conn)
            .await
            .map_err(Error::db(op))?
            .iter()
            .map(|row| row.try_get::<Uuid, _>(0))
            .collect::<std::result::Result<_, _>>()
            .map_err(Error::db(op))?;
        let inserted: HashSet<Uuid> = inserted.into_iter().collect();
        let jobs: Vec<_> = runs
            .iter()
            .filter(|r| inserted.contains(&r.id))
            .map(|r| r.job.clone())
            .collect();
        if !jobs.is_empty() {
            self.insert(conn, &jobs).await?;
        }
        let mut existing: HashMap<(String, String), Uuid> = HashMap::new();
        if inserted.len() < n {
            let missing: Vec<&NewRun> = runs.iter().filter(|r| !inserted.contains(&r.id)).collect();
            let rows = q(&sql.find_many, missing.len())
                .bind(missing.iter().map(|r| r.name.as_str()).collect::<Vec<_>>())
                .bind(
                    missing
                        .iter()
                        .map(|r| r.workflow_id.as_str())
                        .collect::<Vec<_>>(),
                )
                .fetch_all(&mut *conn)
                .await
                .map_err(Error::db(op))?;
            for row in rows {
                let id: Uuid = row.try_get(0).map_err(Error::db(op))?;
                let name: String = row.try_get(1).map_err(Error::db(op))?;
                let wid: String = row.try_get(2).map_err(Error::db(op))?;
                existing.insert((name, wid), id);
            }
        }
        runs.iter()
            .map(|r| {
                if inserted.contains(&r.id) {
                    Ok(RunStarted {
                        id: r.id,
                        existing: false,
                    })
                } else {
                    existing
                        .get(&(r.name.clone(), r.workflow_id.clone()))
                        .map(|&id| RunStarted { id, existing: true })
                        .ok_or_else(|| Error::CorruptRow {
                            id: r.id.to_string(),
                            reason: format!(
                                "run {:?}/{:?} was neither started nor found",
                                r.name, r.workflow_id
                            ),
                        })
                }
            })
            .collect()
    }

    async fn wake_queues(&self, queues: Vec<String>) -> Result<()> {
        if queues.is_empty() {
            return Ok(());
        }
        let mut queues = queues;
        queues.sort();
        queues.dedup();
        self.notify(&queues).await
    }
}

impl WorkflowStore for PgStore {
    async fn workflow_start_many(&self, runs: &[NewRun]) -> Result<Vec<RunStarted>> {
        let op = "workflow_start_many";
        let mut tx = self.inner.pool.begin().await.map_err(Error::db(op))?;
        let out = self.start_runs_in(&mut tx, runs).await?;
        tx.commit().await.map_err(Error::db(op))?;
        let fresh: HashSet<Uuid> = out.iter().filter(|s| !s.existing).map(|s| s.id).collect();
        let queues: Vec<String> = runs
            .iter()
            .filter(|r| fresh.contains(&r.id))
            .map(|r| r.job.queue.as_str().to_owned())
            .collect();
        self.wake_queues(queues).await?;
        Ok(out)
    }

    async fn workflow_start_many_in(
        &self,
        conn: &mut PgConnection,
        runs: &[NewRun],
    ) -> Result<Vec<RunStarted>> {
        let out = self.start_runs_in(conn, runs).await?;
        let mut queues: Vec<String> = runs
            .iter()
            .map(|r| r.job.queue.as_str().to_owned())
            .collect();
        queues.sort();
        queues.dedup();
        if !queues.is_empty() {
            sqlx::query(crate::sql::NOTIFY)
                .bind(&self.inner.channel)
                .bind(&queues)
                .execute(&mut *conn)
                .await
                .map_err(Error::db("workflow_start_many_in"))?;
        }
        Ok(out)
    }

    async fn workflow_load_many(&self, ids: &[Uuid]) -> Result<Vec<LoadedRun>> {
        let op = "workflow_load_many";
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let sql = &self.inner.wf;
        let pool = &self.inner.worker_pool;
        let n = ids.len();
        let runs = q(&sql.load_runs, n)
            .bind(ids)
            .fetch_all(pool)
            .await
            .map_err(Error::db(op))?;
        let steps = q(&sql.load_steps, n)
            .bind(ids)
            .fetch_all(pool)
            .await
            .map_err(Error::db(op))?;
        let signals = q(&sql.load_signals, n)
            .bind(ids)
            .fetch_all(pool)
            .await
            .map_err(Error::db(op))?;
        let children = q(&sql.load_children, n)
            .bind(ids)
            .fetch_all(pool)
            .await
            .map_err(Error::db(op))?;
        let mut out = LoadBuilder::default();
        for row in &runs {
            if let Ok(run) = decode_run(row).or_else(|e| salvage_run(row, &e).ok_or(e)) {
                out.run(run);
            }
        }
        for row in &steps {
            if let Ok(id) = row.try_get::<Uuid, _>("run_id") {
                out.step(id, decode_step(row).map(|(_, s)| s));
            }
        }
        for row in &signals {
            let run: Uuid = row.try_get("run_id").map_err(Error::db(op))?;
            out.signal(
                run,
                (|| {
                    Ok(PendingSignal {
                        id: row
                            .try_get("id")
                            .map_err(|e| corrupt(&run, "signal id", e))?,
                        name: row
                            .try_get("name")
                            .map_err(|e| corrupt(&run, "signal name", e))?,
                        payload: row
                            .try_get("payload")
                            .map_err(|e| corrupt(&run, "payload", e))?,
                    })
                })(),
            );
        }
        for row in &children {
            let parent: Uuid = row.try_get("parent_id").map_err(Error::db(op))?;
            out.child(
                parent,
                (|| {
                    let id: Uuid = row.try_get("id").map_err(Error::db(op))?;
                    let status: String = col(row, &id, "status")?;
                    Ok(ChildOutcome {
                        id,
                        status: RunStatus::parse(&status).map_err(|e| corrupt(&id, "status", e))?,
                        output: col(row, &id, "output")?,
                        error: col(row, &id, "error")?,
                    })
                })(),
            );
        }
        Ok(out.finish(ids))
    }

    async fn workflow_write_many(&self, writes: &[RunWrite]) -> Result<Vec<Uuid>> {
        let op = "workflow_write_many";
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let sql = &self.inner.wf;
        let mut lock_ids: Vec<Uuid> = writes.iter().map(|w| w.run).collect();
        for w in writes {
            if let RunOp::Finish {
                parent: Some(p), ..
            } = &w.op
            {
                lock_ids.push(*p);
            }
        }
        lock_ids.sort();
        lock_ids.dedup();
        let mut tx = self
            .inner
            .worker_pool
            .begin()
            .await
            .map_err(Error::db(op))?;
        let held: HashMap<Uuid, (i32, String)> = q(&sql.lock, lock_ids.len())
            .bind(&lock_ids)
            .fetch_all(&mut *tx)
            .await
            .map_err(Error::db(op))?
            .iter()
            .map(|row| -> std::result::Result<_, sqlx::Error> {
                Ok((row.try_get(0)?, (row.try_get(1)?, row.try_get(2)?)))
            })
            .collect::<std::result::Result<_, _>>()
            .map_err(Error::db(op))?;
        let valid = |w: &RunWrite| {
            held.get(&w.run)
                .is_some_and(|(attempt, state)| *attempt == w.attempt && state == "running")
        };
        let writes: Vec<&RunWrite> = writes.iter().filter(|w| valid(w)).collect();
        let applied: Vec<Uuid> = {
            let mut a: Vec<Uuid> = writes.iter().map(|w| w.run).collect();
            a.sort();
            a.dedup();
            a
        };
        // Step records (a suspend writes its record too): the last write of a (run, seq) wins.
        let mut steps: Vec<(Uuid, &dray_core::workflow::StepWrite)> = Vec::new();
        let mut pos: HashMap<(Uuid, i32), usize> = HashMap::new();
        for w in &writes {
            let rec = match &w.op {
                RunOp::Step(s) => s,
                RunOp::Suspend { record, .. } => record,
                _ => continue,
            };
            match pos.get(&(w.run, rec.seq)) {
                Some(&i) => steps[i] = (w.run, rec),
                None => {
                    pos.insert((w.run, rec.seq), steps.len());
                    steps.push((w.run, rec));
                }
            }
        }
        if !steps.is_empty() {
            let n = steps.len();
            q(&sql.upsert_steps, n)
                .bind(steps.iter().map(|(r, _)| *r).collect::<Vec<_>>())
                .bind(steps.iter().map(|(_, s)| s.seq).collect::<Vec<_>>())
                .bind(
                    steps
                        .iter()
                        .map(|(_, s)| s.kind.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    steps
                        .iter()
                        .map(|(_, s)| s.name.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    steps
                        .iter()
                        .map(|(_, s)| s.status.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    steps
                        .iter()
                        .map(|(_, s)| json(s.output.as_deref()))
                        .collect::<Vec<_>>(),
                )
                .bind(
                    steps
                        .iter()
                        .map(|(_, s)| s.error.as_deref())
                        .collect::<Vec<_>>(),
                )
                .bind(steps.iter().map(|(_, s)| s.attempts).collect::<Vec<_>>())
                .bind(steps.iter().map(|(_, s)| s.started_at).collect::<Vec<_>>())
                .bind(steps.iter().map(|(_, s)| s.finished_at).collect::<Vec<_>>())
                .bind(steps.iter().map(|(_, s)| s.wake_at).collect::<Vec<_>>())
                .execute(&mut *tx)
                .await
                .map_err(Error::db(op))?;
            let consumed: Vec<(Uuid, i32)> = steps
                .iter()
                .filter_map(|(_, s)| s.consumes.map(|c| (c, s.seq)))
                .collect();
            if !consumed.is_empty() {
                q(&sql.consume, consumed.len())
                    .bind(consumed.iter().map(|c| c.0).collect::<Vec<_>>())
                    .bind(consumed.iter().map(|c| c.1).collect::<Vec<_>>())
                    .execute(&mut *tx)
                    .await
                    .map_err(Error::db(op))?;
            }
        }
        let mut state: Vec<(Uuid, &str, serde_json::Value)> = Vec::new();
        let mut compensated: Vec<(Uuid, i32)> = Vec::new();
        let mut finish: Vec<(Uuid, &'static str, Option<serde_json::Value>, Option<&str>)> =
            Vec::new();
        let mut parents: Vec<Uuid> = Vec::new();
        let mut wake: Vec<String> = Vec::new();
        for w in &writes {
            match &w.op {
                RunOp::Step(_) => {}
                RunOp::State { key, value } => {
                    state.push((w.run, key, parse_json(&w.run, value)?));
                }
                RunOp::Compensated { seq } => compensated.push((w.run, *seq)),
                RunOp::Compensating { reason, error } => {
                    q(&sql.compensating, 1)
                        .bind(w.run)
                        .bind(reason.as_str())
                        .bind(error.as_deref())
                        .execute(&mut *tx)
                        .await
                        .map_err(Error::db(op))?;
                }
                RunOp::Retrying { error } => {
                    q(&sql.retrying, 1)
                        .bind(w.run)
                        .bind(error.as_str())
                        .execute(&mut *tx)
                        .await
                        .map_err(Error::db(op))?;
                }
                RunOp::Suspend {
                    status,
                    wake_at,
                    signal,
                    child,
                    ..
                } => {
                    let row = q(&sql.suspend, 1)
                        .bind(w.run)
                        .bind(status.as_str())
                        .bind(signal.as_deref())
                        .bind(*child)
                        .bind(wake_at.unwrap_or_else(never))
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(Error::db(op))?;
                    if let Some(row) = row {
                        let queue: String = row.try_get(0).map_err(Error::db(op))?;
                        let now: bool = row.try_get(1).map_err(Error::db(op))?;
                        if now {
                            wake.push(queue);
                        }
                    }
                }
                RunOp::Finish {
                    status,
                    output,
                    error,
                    parent,
                } => {
                    let output = match output {
                        Some(o) => Some(parse_json(&w.run, o)?),
                        None => None,
                    };
                    finish.push((w.run, status.as_str(), output, error.as_deref()));
                    if let Some(p) = parent {
                        parents.push(*p);
                    }
                }
            }
        }
        if !state.is_empty() {
            q(&sql.set_state, state.len())
                .bind(state.iter().map(|s| s.0).collect::<Vec<_>>())
                .bind(state.iter().map(|s| s.1).collect::<Vec<_>>())
                .bind(state.iter().map(|s| s.2.clone()).collect::<Vec<_>>())
                .execute(&mut *tx)
                .await
                .map_err(Error::db(op))?;
        }
        if !compensated.is_empty() {
            q(&sql.compensated, compensated.len())
                .bind(compensated.iter().map(|c| c.0).collect::<Vec<_>>())
                .bind(compensated.iter().map(|c| c.1).collect::<Vec<_>>())
                .execute(&mut *tx)
                .await
                .map_err(Error::db(op))?;
        }
        if !finish.is_empty() {
            let n = finish.len();
            let ids: Vec<Uuid> = finish.iter().map(|f| f.0).collect();
            q(&sql.finish_runs, n)
                .bind(&ids)
                .bind(finish.iter().map(|f| f.1).collect::<Vec<_>>())
                .bind(finish.iter().map(|f| f.2.clone()).collect::<Vec<_>>())
                .bind(finish.iter().map(|f| f.3).collect::<Vec<_>>())
                .execute(&mut *tx)
                .await
                .map_err(Error::db(op))?;
            // The driving jobs complete (and move to the history) as any completed job does;
            // they are locked and checked above, so unfenced here.
            let (text, cache) = self.inner.sql.complete_uniform.for_len(n);
            sqlx::query(AssertSqlSafe(text))
                .persistent(cache)
                .bind(&ids)
                .bind(None::<i32>)
                .fetch_one(&mut *tx)
                .await
                .map_err(Error::db(op))?;
            if !parents.is_empty() {
                let rows = q(&sql.wake_parents, parents.len())
                    .bind(&parents)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(Error::db(op))?;
                for row in rows {
                    wake.push(row.try_get(0).map_err(Error::db(op))?);
                }
            }
        }
        tx.commit().await.map_err(Error::db(op))?;
        self.wake_queues(wake).await?;
        Ok(applied)
    }

    async fn workflow_signal(&self, run: Uuid, name: &str, payload: &str) -> Result<Option<Uuid>> {
        let op = "workflow_signal";
        let sql = &self.inner.wf;
        let payload: serde_json::Value = serde_json::from_str(payload)?;
        let mut tx = self.inner.pool.begin().await.map_err(Error::db(op))?;
        q(&sql.lock_one, 1)
            .bind(run)
            .execute(&mut *tx)
            .await
            .map_err(Error::db(op))?;
        let Some(row) = q(&sql.signal_run, 1)
            .bind(run)
            .fetch_optional(&mut *tx)
            .await
            .map_err(Error::db(op))?
        else {
            return Ok(None);
        };
        let status: String = col(&row, &run, "status")?;
        let status = RunStatus::parse(&status).map_err(|e| corrupt(&run, "status", e))?;
        if status.is_terminal() {
            return Err(Error::RunFinished { run, status });
        }
        let waits_for: Option<String> = col(&row, &run, "wait_signal")?;
        let id = Uuid::now_v7();
        q(&sql.signal_insert, 1)
            .bind(id)
            .bind(run)
            .bind(name)
            .bind(&payload)
            .execute(&mut *tx)
            .await
            .map_err(Error::db(op))?;
        let mut wake = Vec::new();
        if status == RunStatus::Waiting
            && waits_for.as_deref() == Some(name)
            && let Some(row) = q(&sql.wake_one, 1)
                .bind(run)
                .fetch_optional(&mut *tx)
                .await
                .map_err(Error::db(op))?
        {
            wake.push(row.try_get(0).map_err(Error::db(op))?);
        }
        tx.commit().await.map_err(Error::db(op))?;
        self.wake_queues(wake).await?;
        Ok(Some(id))
    }

    async fn workflow_get(&self, run: Uuid) -> Result<Option<RunInfo>> {
        let op = "workflow_get";
        let sql = &self.inner.wf;
        let Some(row) = q(&sql.get, 1)
            .bind(run)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(Error::db(op))?
        else {
            return Ok(None);
        };
        let steps = q(&sql.get_steps, 1)
            .bind(run)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(Error::db(op))?
            .iter()
            .map(|r| decode_step(r).map(|(_, s)| s))
            .collect::<Result<Vec<_>>>()?;
        decode_info(&row, steps).map(Some)
    }

    async fn workflow_find(&self, name: &str, workflow_id: &str) -> Result<Option<Uuid>> {
        sqlx::query_scalar(AssertSqlSafe(self.inner.wf.find.clone()))
            .bind(name)
            .bind(workflow_id)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(Error::db("workflow_find"))
    }

    async fn workflow_list(&self, f: &RunFilter) -> Result<Vec<RunInfo>> {
        let op = "workflow_list";
        let status = f.status.map(|s| match s {
            RunStatus::Running => "queued",
            s => s.as_str(),
        });
        let rows = q(&self.inner.wf.list, 1)
            .bind(f.name.as_deref())
            .bind(status)
            .bind(f.parent_id)
            .bind(f.before)
            .bind(i64::from(dray_core::batch::list_limit(f.limit)))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(Error::db(op))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            match decode_info(row, Vec::new()) {
                Ok(i) => out.push(i),
                Err(e) => {
                    tracing::warn!(err = %e, "dray: an unreadable workflow run was left out of a list")
                }
            }
        }
        Ok(out)
    }

    async fn workflow_query(&self, run: Uuid, key: &str) -> Result<Option<serde_json::Value>> {
        sqlx::query_scalar(AssertSqlSafe(self.inner.wf.query.clone()))
            .bind(run)
            .bind(key)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(Error::db("workflow_query"))
    }

    async fn workflow_cancel(&self, run: Uuid) -> Result<Option<RunCancel>> {
        let op = "workflow_cancel";
        let sql = &self.inner.wf;
        let Some(info) = self.workflow_get(run).await? else {
            return Ok(None);
        };
        if info.run.status.is_terminal() {
            return Ok(Some(RunCancel::AlreadyFinished(info.run.status)));
        }
        let mut tx = self.inner.pool.begin().await.map_err(Error::db(op))?;
        let mut tree: Vec<Uuid> = q(&sql.cancel_tree, 1)
            .bind(run)
            .fetch_all(&mut *tx)
            .await
            .map_err(Error::db(op))?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<std::result::Result<_, _>>()
            .map_err(Error::db(op))?;
        tree.sort();
        q(&sql.lock, tree.len())
            .bind(&tree)
            .execute(&mut *tx)
            .await
            .map_err(Error::db(op))?;
        let asked: Vec<Uuid> = q(&sql.cancel_runs, tree.len())
            .bind(&tree)
            .fetch_all(&mut *tx)
            .await
            .map_err(Error::db(op))?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<std::result::Result<_, _>>()
            .map_err(Error::db(op))?;
        let wake: Vec<String> = q(&sql.cancel_wake, asked.len())
            .bind(&asked)
            .fetch_all(&mut *tx)
            .await
            .map_err(Error::db(op))?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<std::result::Result<_, _>>()
            .map_err(Error::db(op))?;
        q(&sql.cancel_running, asked.len())
            .bind(&asked)
            .execute(&mut *tx)
            .await
            .map_err(Error::db(op))?;
        tx.commit().await.map_err(Error::db(op))?;
        self.wake_queues(wake).await?;
        Ok(Some(RunCancel::Requested {
            runs: asked.len() as u64,
        }))
    }

    async fn workflow_restart(&self, from: Uuid, keep: i32, new: &NewRun) -> Result<RunStarted> {
        let op = "workflow_restart";
        let sql = &self.inner.wf;
        let Some(info) = self.workflow_get(from).await? else {
            return Err(Error::RunNotFound {
                run: from.to_string(),
            });
        };
        if let Some(by) = info.run.superseded_by {
            return Err(Error::invalid(
                "run",
                format!("run {from} was restarted already, as run {by}: restart that one"),
            ));
        }
        let mut tx = self.inner.pool.begin().await.map_err(Error::db(op))?;
        let took = q(&sql.restart_old, 1)
            .bind(from)
            .bind(new.id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(Error::db(op))?;
        if took.is_none() {
            return Err(Error::invalid(
                "run",
                format!(
                    "run {from} has not ended (or was restarted meanwhile); only an ended run can be restarted"
                ),
            ));
        }
        q(&sql.restart_new, 1)
            .bind(new.id)
            .bind(from)
            .bind(us(new.timeout))
            .execute(&mut *tx)
            .await
            .map_err(Error::db(op))?;
        q(&sql.restart_steps, 1)
            .bind(new.id)
            .bind(from)
            .bind(keep)
            .execute(&mut *tx)
            .await
            .map_err(Error::db(op))?;
        self.insert(&mut tx, std::slice::from_ref(&new.job)).await?;
        tx.commit().await.map_err(Error::db(op))?;
        self.wake_queues(vec![new.job.queue.as_str().to_owned()])
            .await?;
        Ok(RunStarted {
            id: new.id,
            existing: false,
        })
    }

    async fn workflow_note(&self, run: Uuid, note: Option<&str>) -> Result<()> {
        q(&self.inner.wf.note, 1)
            .bind(run)
            .bind(note)
            .execute(&self.inner.pool)
            .await
            .map_err(Error::db("workflow_note"))?;
        Ok(())
    }

    async fn workflow_prune(&self, older_than: Duration, limit: u32) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(self.inner.wf.prune.clone()))
            .bind(micros(older_than))
            .bind(i64::from(limit))
            .fetch_one(&self.inner.pool)
            .await
            .map_err(Error::db("workflow_prune"))?;
        Ok(n as u64)
    }
}

fn json(text: Option<&str>) -> Option<serde_json::Value> {
    text.and_then(|t| serde_json::from_str(t).ok())
}

fn parse_json(run: &Uuid, text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text)
        .map_err(|e| Error::invalid("workflow value", format!("run {run}: {e}")))
}
