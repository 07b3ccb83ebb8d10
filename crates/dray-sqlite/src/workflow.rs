//! The workflow layer on SQLite: [`WorkflowStore`] for [`SqliteStore`], and every statement it
//! runs (schema version 6; the same tables as PostgreSQL's). Writes go through the one writer
//! connection, one transaction per call, so a signal, a cancel or a child's end and a run's
//! suspend are never interleaved: whichever commits second sees the first.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use dray_core::batch::millis;
use dray_core::workflow::types::never;
use dray_core::workflow::{
    ChildOutcome, LoadBuilder, LoadedRun, NewRun, PendingSignal, RunCancel, RunFilter, RunInfo,
    RunOp, RunRow, RunStarted, RunStatus, RunWrite, StepKind, StepRecord, StepStatus,
    WorkflowStore,
};
use dray_core::{Error, Result};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};
use uuid::Uuid;

use crate::{SqliteStore, ms_to_time};

const NOW: &str = "CAST(round(unixepoch('subsec') * 1000) AS INTEGER)";

const RUN_COLS: &str = "r.id, r.name, r.version, r.workflow_id, r.queue, r.input, r.status, \
    r.end_reason, r.output, r.error, r.wait_signal, r.note, r.deadline, r.cancel_requested_at, \
    r.parent_id, r.restarted_from, r.superseded_by, r.created_at, r.updated_at, r.finished_at";

const STEP_COLS: &str = "run_id, seq, kind, name, status, output, error, attempts, started_at, \
    finished_at, wake_at, compensated_at";

/// The ids of a JSON array of 32-hex-digit ids.
const IDS: &str = "(SELECT unhex(value) FROM json_each(?1))";

fn x(t: &str) -> String {
    t.replace("{now}", NOW)
        .replace("{run_cols}", RUN_COLS)
        .replace("{step_cols}", STEP_COLS)
        .replace("{ids}", IDS)
}

const START: &str = "
INSERT INTO dray_workflow_runs
    (id, name, version, workflow_id, queue, input, status, deadline, parent_id, created_at,
     updated_at)
SELECT ?1, ?2, ?3, ?4, ?5, ?6, 'queued', n.now + ?7, ?8, n.now, n.now FROM (SELECT {now} AS now) n
WHERE true
ON CONFLICT (name, workflow_id) WHERE superseded_by IS NULL DO NOTHING
RETURNING id";
const FIND: &str = "
SELECT id FROM dray_workflow_runs WHERE name = ?1 AND workflow_id = ?2 AND superseded_by IS NULL";
const LOAD_RUNS: &str = "SELECT {run_cols} FROM dray_workflow_runs r WHERE r.id IN {ids}";
const LOAD_STEPS: &str =
    "SELECT {step_cols} FROM dray_workflow_steps WHERE run_id IN {ids} ORDER BY run_id, seq";
const LOAD_SIGNALS: &str = "
SELECT id, run_id, name, payload FROM dray_workflow_signals
WHERE run_id IN {ids} AND consumed_seq IS NULL ORDER BY run_id, id";
const LOAD_CHILDREN: &str = "
SELECT r.id, r.parent_id, r.status, r.output, r.error FROM dray_workflow_runs r
WHERE r.parent_id IN {ids} AND r.finished_at IS NOT NULL";
const HELD: &str = "SELECT id, attempt, state FROM dray_jobs WHERE id IN {ids}";
const UPSERT_STEP: &str = "
INSERT INTO dray_workflow_steps
    (run_id, seq, kind, name, status, output, error, attempts, started_at, finished_at, wake_at)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
ON CONFLICT (run_id, seq) DO UPDATE SET
    kind = excluded.kind, name = excluded.name, status = excluded.status,
    output = excluded.output, error = excluded.error, attempts = excluded.attempts,
    started_at = excluded.started_at, finished_at = excluded.finished_at,
    wake_at = excluded.wake_at
WHERE dray_workflow_steps.status NOT IN ('completed', 'failed')";
const CONSUME: &str = "
UPDATE dray_workflow_signals SET consumed_seq = ?2 WHERE id = ?1 AND consumed_seq IS NULL";
const SET_STATE: &str = "
INSERT INTO dray_workflow_state (run_id, key, value, updated_at) VALUES (?1, ?2, ?3, {now})
ON CONFLICT (run_id, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at";
const COMPENSATED: &str =
    "UPDATE dray_workflow_steps SET compensated_at = {now} WHERE run_id = ?1 AND seq = ?2";
const COMPENSATING: &str = "
UPDATE dray_workflow_runs SET status = 'compensating', end_reason = ?2,
    error = COALESCE(?3, error), updated_at = {now}
WHERE id = ?1";
const RETRYING: &str = "
UPDATE dray_workflow_runs
SET error = ?2, updated_at = {now},
    status = CASE WHEN status = 'compensating' THEN status ELSE 'queued' END
WHERE id = ?1";
const SUSPEND_RUN: &str = "
UPDATE dray_workflow_runs SET status = ?2, wait_signal = ?3, updated_at = {now} WHERE id = ?1
RETURNING cancel_requested_at IS NOT NULL
   OR (?3 IS NOT NULL AND EXISTS (SELECT 1 FROM dray_workflow_signals g
        WHERE g.run_id = ?1 AND g.name = ?3 AND g.consumed_seq IS NULL))
   OR (?4 IS NOT NULL AND EXISTS (SELECT 1 FROM dray_workflow_runs c
        WHERE c.id = ?4 AND c.finished_at IS NOT NULL))";
const SUSPEND_JOB: &str = "
UPDATE dray_jobs
SET state = CASE WHEN ?2 <= {now} THEN 'available' ELSE 'scheduled' END,
    run_at = max(?2, {now}), attempt = max(attempt - 1, 0), leased_until = NULL, leased_by = NULL
WHERE id = ?1
RETURNING queue, state = 'available'";
const FINISH_RUN: &str = "
UPDATE dray_workflow_runs
SET status = ?2, output = ?3, error = COALESCE(?4, error), wait_signal = NULL,
    finished_at = {now}, updated_at = {now}
WHERE id = ?1";
const WAKE_PARENT: &str = "
UPDATE dray_jobs SET state = 'available', run_at = {now}
WHERE id = ?1 AND state = 'scheduled'
  AND EXISTS (SELECT 1 FROM dray_workflow_runs p WHERE p.id = ?1 AND p.status = 'waiting')
RETURNING queue";
const SIGNAL_RUN: &str = "SELECT status, wait_signal FROM dray_workflow_runs WHERE id = ?1";
const SIGNAL_INSERT: &str = "
INSERT INTO dray_workflow_signals (id, run_id, name, payload, sent_at) VALUES (?1, ?2, ?3, ?4, {now})";
const WAKE_ONE: &str = "
UPDATE dray_jobs SET state = 'available', run_at = {now}
WHERE id = ?1 AND state IN ('scheduled', 'retryable') RETURNING queue";
const GET: &str = "
SELECT {run_cols}, j.state AS job_state, j.attempt AS job_attempt
FROM dray_workflow_runs r LEFT JOIN dray_jobs j ON j.id = r.id WHERE r.id = ?1";
const GET_STEPS: &str =
    "SELECT {step_cols} FROM dray_workflow_steps WHERE run_id = ?1 ORDER BY seq";
const LIST: &str = "
SELECT {run_cols}, j.state AS job_state, j.attempt AS job_attempt
FROM dray_workflow_runs r LEFT JOIN dray_jobs j ON j.id = r.id
WHERE (?1 IS NULL OR r.name = ?1)
  AND (?2 IS NULL OR r.status = ?2)
  AND (?3 IS NULL OR r.parent_id = ?3)
  AND (?4 IS NULL OR r.id < ?4)
ORDER BY r.id DESC LIMIT ?5";
const QUERY: &str = "SELECT value FROM dray_workflow_state WHERE run_id = ?1 AND key = ?2";
const CANCEL_TREE: &str = "
WITH RECURSIVE tree(id) AS (
    SELECT id FROM dray_workflow_runs WHERE id = ?1
    UNION
    SELECT r.id FROM dray_workflow_runs r JOIN tree t ON r.parent_id = t.id)
SELECT id FROM tree";
const CANCEL_RUN: &str = "
UPDATE dray_workflow_runs SET cancel_requested_at = COALESCE(cancel_requested_at, {now}),
    updated_at = {now}
WHERE id = ?1 AND finished_at IS NULL RETURNING id";
const CANCEL_WAKE: &str = "
UPDATE dray_jobs SET state = 'available', run_at = {now}
WHERE id = ?1 AND state IN ('scheduled', 'retryable') RETURNING queue";
const CANCEL_RUNNING: &str = "
UPDATE dray_jobs SET cancel_requested_at = COALESCE(cancel_requested_at, {now})
WHERE id = ?1 AND state = 'running'";
const FINISH_JOB: &str = "
UPDATE dray_jobs SET state = 'completed', finished_at = {now}, leased_until = NULL, result = NULL
WHERE id = ?1";
const RESTART_OLD: &str = "
UPDATE dray_workflow_runs SET superseded_by = ?2, updated_at = {now}
WHERE id = ?1 AND superseded_by IS NULL AND finished_at IS NOT NULL RETURNING id";
const RESTART_NEW: &str = "
INSERT INTO dray_workflow_runs
    (id, name, version, workflow_id, queue, input, status, deadline, parent_id, restarted_from,
     created_at, updated_at)
SELECT ?1, o.name, o.version, o.workflow_id, o.queue, o.input, 'queued', {now} + ?3,
       o.parent_id, o.id, {now}, {now}
FROM dray_workflow_runs o WHERE o.id = ?2";
const RESTART_STEPS: &str = "
INSERT INTO dray_workflow_steps
    (run_id, seq, kind, name, status, output, error, attempts, started_at, finished_at, wake_at)
SELECT ?1, seq, kind, name, status, output, error, attempts, started_at, finished_at, wake_at
FROM dray_workflow_steps WHERE run_id = ?2 AND seq < ?3 AND status = 'completed'";
const NOTE: &str = "UPDATE dray_workflow_runs SET note = ?2 WHERE id = ?1";
const PRUNE_IDS: &str = "
SELECT id FROM dray_workflow_runs WHERE finished_at < {now} - ?1 LIMIT ?2";
const PRUNE_ONE: [&str; 4] = [
    "DELETE FROM dray_workflow_steps WHERE run_id = ?1",
    "DELETE FROM dray_workflow_signals WHERE run_id = ?1",
    "DELETE FROM dray_workflow_state WHERE run_id = ?1",
    "DELETE FROM dray_workflow_runs WHERE id = ?1",
];

fn query(text: &str) -> sqlx::query::Query<'static, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    sqlx::query(sqlx::AssertSqlSafe(x(text)))
}

fn hex_ids(ids: &[Uuid]) -> String {
    serde_json::to_string(
        &ids.iter()
            .map(|i| i.simple().to_string())
            .collect::<Vec<_>>(),
    )
    .unwrap_or_else(|_| "[]".to_owned())
}

fn ms(t: Option<DateTime<Utc>>) -> Option<i64> {
    t.map(|t| t.timestamp_millis())
}

fn corrupt(id: &Uuid, what: &str, err: impl std::fmt::Display) -> Error {
    Error::CorruptRow {
        id: id.to_string(),
        reason: format!("workflow column {what}: {err}"),
    }
}

fn col<'r, T: sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>>(
    row: &'r SqliteRow,
    id: &Uuid,
    name: &str,
) -> Result<T> {
    row.try_get(name).map_err(|e| corrupt(id, name, e))
}

fn time(row: &SqliteRow, id: &Uuid, name: &str) -> Result<Option<DateTime<Utc>>> {
    let v: Option<i64> = col(row, id, name)?;
    v.map(|v| ms_to_time(id, name, v)).transpose()
}

fn json(row: &SqliteRow, id: &Uuid, name: &str) -> Result<Option<serde_json::Value>> {
    let v: Option<String> = col(row, id, name)?;
    v.map(|t| serde_json::from_str(&t).map_err(|e| corrupt(id, name, e)))
        .transpose()
}

fn decode_run(row: &SqliteRow) -> Result<RunRow> {
    let id: Uuid = row
        .try_get("id")
        .map_err(|e| corrupt(&Uuid::nil(), "id", e))?;
    let status: String = col(row, &id, "status")?;
    let end_reason: Option<String> = col(row, &id, "end_reason")?;
    let required = |name: &str| -> Result<DateTime<Utc>> {
        time(row, &id, name)?.ok_or_else(|| corrupt(&id, name, "NULL"))
    };
    Ok(RunRow {
        id,
        name: col(row, &id, "name")?,
        version: col(row, &id, "version")?,
        workflow_id: col(row, &id, "workflow_id")?,
        queue: col(row, &id, "queue")?,
        input: json(row, &id, "input")?.unwrap_or_default(),
        status: RunStatus::parse(&status).map_err(|e| corrupt(&id, "status", e))?,
        end_reason: end_reason
            .map(|s| RunStatus::parse(&s))
            .transpose()
            .map_err(|e| corrupt(&id, "end_reason", e))?,
        output: json(row, &id, "output")?,
        error: col(row, &id, "error")?,
        wait_signal: col(row, &id, "wait_signal")?,
        note: col(row, &id, "note")?,
        deadline: time(row, &id, "deadline")?,
        cancel_requested_at: time(row, &id, "cancel_requested_at")?,
        parent_id: col(row, &id, "parent_id")?,
        restarted_from: col(row, &id, "restarted_from")?,
        superseded_by: col(row, &id, "superseded_by")?,
        created_at: required("created_at")?,
        updated_at: required("updated_at")?,
        finished_at: time(row, &id, "finished_at")?,
        unreadable: None,
    })
}

/// A run row that does not decode, as far as it reads: listed (and refused by a replay) with
/// what was wrong, so one bad row never hides the others.
fn decode_run_or_salvage(row: &SqliteRow) -> Result<RunRow> {
    decode_run(row).or_else(|e| match row.try_get::<Uuid, _>("id") {
        Ok(id) => Ok(RunRow::unreadable(
            id,
            row.try_get("name").unwrap_or_default(),
            e.to_string(),
        )),
        Err(_) => Err(e),
    })
}

fn decode_step(row: &SqliteRow) -> Result<(Uuid, StepRecord)> {
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
            output: json(row, &id, "output")?,
            error: col(row, &id, "error")?,
            attempts: col(row, &id, "attempts")?,
            started_at: time(row, &id, "started_at")?,
            finished_at: time(row, &id, "finished_at")?,
            wake_at: time(row, &id, "wake_at")?,
            compensated_at: time(row, &id, "compensated_at")?,
        },
    ))
}

fn decode_info(row: &SqliteRow, steps: Vec<StepRecord>) -> Result<RunInfo> {
    let run = decode_run_or_salvage(row)?;
    let job_state: Option<String> = row.try_get("job_state").ok().flatten();
    let attempt: Option<i32> = row.try_get("job_attempt").ok().flatten();
    Ok(RunInfo::new(run, job_state.as_deref(), attempt, steps))
}

impl SqliteStore {
    /// Starts runs on the caller's connection (a workflow start, or a cron tick's).
    pub(crate) async fn start_runs_in(
        &self,
        conn: &mut SqliteConnection,
        runs: &[NewRun],
    ) -> Result<Vec<RunStarted>> {
        let op = "workflow_start_many";
        let mut out = Vec::with_capacity(runs.len());
        let mut jobs = Vec::new();
        for r in runs {
            let inserted = query(START)
                .bind(r.id)
                .bind(r.name.as_str())
                .bind(r.version)
                .bind(r.workflow_id.as_str())
                .bind(r.job.queue.as_str())
                .bind(r.input.as_str())
                .bind(r.timeout.map(millis))
                .bind(r.parent_id)
                .fetch_optional(&mut *conn)
                .await
                .map_err(Error::db(op))?;
            if inserted.is_some() {
                jobs.push(r.job.clone());
                out.push(RunStarted {
                    id: r.id,
                    existing: false,
                });
            } else {
                let id: Uuid = query(FIND)
                    .bind(r.name.as_str())
                    .bind(r.workflow_id.as_str())
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(Error::db(op))?
                    .try_get(0)
                    .map_err(Error::db(op))?;
                out.push(RunStarted { id, existing: true });
            }
        }
        if !jobs.is_empty() {
            self.insert(conn, &jobs).await?;
        }
        Ok(out)
    }

    fn wake_queues(&self, queues: impl IntoIterator<Item = String>) {
        let queues: HashSet<String> = queues.into_iter().collect();
        for q in queues {
            self.inner.hub.wake(&q);
        }
    }
}

impl WorkflowStore for SqliteStore {
    async fn workflow_start_many(&self, runs: &[NewRun]) -> Result<Vec<RunStarted>> {
        let op = "workflow_start_many";
        let mut tx = self.inner.writer.begin().await.map_err(Error::db(op))?;
        let out = self.start_runs_in(&mut tx, runs).await?;
        tx.commit().await.map_err(Error::db(op))?;
        let fresh: HashSet<Uuid> = out.iter().filter(|s| !s.existing).map(|s| s.id).collect();
        self.wake_queues(
            runs.iter()
                .filter(|r| fresh.contains(&r.id))
                .map(|r| r.job.queue.as_str().to_owned()),
        );
        Ok(out)
    }

    async fn workflow_start_many_in(
        &self,
        conn: &mut SqliteConnection,
        runs: &[NewRun],
    ) -> Result<Vec<RunStarted>> {
        self.start_runs_in(conn, runs).await
    }

    async fn workflow_load_many(&self, ids: &[Uuid]) -> Result<Vec<LoadedRun>> {
        let op = "workflow_load_many";
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let hex = hex_ids(ids);
        let pool = &self.inner.reader;
        let runs = query(LOAD_RUNS)
            .bind(&hex)
            .fetch_all(pool)
            .await
            .map_err(Error::db(op))?;
        let steps = query(LOAD_STEPS)
            .bind(&hex)
            .fetch_all(pool)
            .await
            .map_err(Error::db(op))?;
        let signals = query(LOAD_SIGNALS)
            .bind(&hex)
            .fetch_all(pool)
            .await
            .map_err(Error::db(op))?;
        let children = query(LOAD_CHILDREN)
            .bind(&hex)
            .fetch_all(pool)
            .await
            .map_err(Error::db(op))?;
        let mut out = LoadBuilder::default();
        for row in &runs {
            if let Ok(run) = decode_run_or_salvage(row) {
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
                        id: col(row, &run, "id")?,
                        name: col(row, &run, "name")?,
                        payload: json(row, &run, "payload")?.unwrap_or_default(),
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
                        output: json(row, &id, "output")?,
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
        let mut ids: Vec<Uuid> = writes.iter().map(|w| w.run).collect();
        ids.sort();
        ids.dedup();
        let mut tx = self.inner.writer.begin().await.map_err(Error::db(op))?;
        let held: HashMap<Uuid, (i32, String)> = query(HELD)
            .bind(hex_ids(&ids))
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
        let mut applied: Vec<Uuid> = Vec::new();
        let mut wake: Vec<String> = Vec::new();
        let mut ended: Vec<Uuid> = Vec::new();
        for w in writes.iter().filter(|w| valid(w)) {
            applied.push(w.run);
            let record = match &w.op {
                RunOp::Step(s) => Some(s),
                RunOp::Suspend { record, .. } => Some(record),
                _ => None,
            };
            if let Some(s) = record {
                query(UPSERT_STEP)
                    .bind(w.run)
                    .bind(s.seq)
                    .bind(s.kind.as_str())
                    .bind(s.name.as_str())
                    .bind(s.status.as_str())
                    .bind(s.output.as_deref())
                    .bind(s.error.as_deref())
                    .bind(s.attempts)
                    .bind(ms(s.started_at))
                    .bind(ms(s.finished_at))
                    .bind(ms(s.wake_at))
                    .execute(&mut *tx)
                    .await
                    .map_err(Error::db(op))?;
                if let Some(sig) = s.consumes {
                    query(CONSUME)
                        .bind(sig)
                        .bind(s.seq)
                        .execute(&mut *tx)
                        .await
                        .map_err(Error::db(op))?;
                }
            }
            match &w.op {
                RunOp::Step(_) => {}
                RunOp::State { key, value } => {
                    query(SET_STATE)
                        .bind(w.run)
                        .bind(key.as_str())
                        .bind(value.as_str())
                        .execute(&mut *tx)
                        .await
                        .map_err(Error::db(op))?;
                }
                RunOp::Compensated { seq } => {
                    query(COMPENSATED)
                        .bind(w.run)
                        .bind(*seq)
                        .execute(&mut *tx)
                        .await
                        .map_err(Error::db(op))?;
                }
                RunOp::Compensating { reason, error } => {
                    query(COMPENSATING)
                        .bind(w.run)
                        .bind(reason.as_str())
                        .bind(error.as_deref())
                        .execute(&mut *tx)
                        .await
                        .map_err(Error::db(op))?;
                }
                RunOp::Retrying { error } => {
                    query(RETRYING)
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
                    let due_now: bool = query(SUSPEND_RUN)
                        .bind(w.run)
                        .bind(status.as_str())
                        .bind(signal.as_deref())
                        .bind(*child)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(Error::db(op))?
                        .map(|r| r.try_get::<bool, _>(0))
                        .transpose()
                        .map_err(Error::db(op))?
                        .unwrap_or(false);
                    let at = if due_now {
                        0
                    } else {
                        wake_at.unwrap_or_else(never).timestamp_millis()
                    };
                    if let Some(row) = query(SUSPEND_JOB)
                        .bind(w.run)
                        .bind(at)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(Error::db(op))?
                    {
                        let queue: String = row.try_get(0).map_err(Error::db(op))?;
                        let now: bool = row.try_get(1).map_err(Error::db(op))?;
                        // Due at once, or later: either way a waiting receiver of this handle
                        // looks again for the next due time.
                        let _ = now;
                        wake.push(queue);
                    }
                    ended.push(w.run);
                }
                RunOp::Finish {
                    status,
                    output,
                    error,
                    parent,
                } => {
                    query(FINISH_RUN)
                        .bind(w.run)
                        .bind(status.as_str())
                        .bind(output.as_deref())
                        .bind(error.as_deref())
                        .execute(&mut *tx)
                        .await
                        .map_err(Error::db(op))?;
                    query(FINISH_JOB)
                        .bind(w.run)
                        .execute(&mut *tx)
                        .await
                        .map_err(Error::db(op))?;
                    if let Some(p) = parent
                        && let Some(row) = query(WAKE_PARENT)
                            .bind(*p)
                            .fetch_optional(&mut *tx)
                            .await
                            .map_err(Error::db(op))?
                    {
                        wake.push(row.try_get(0).map_err(Error::db(op))?);
                    }
                    ended.push(w.run);
                }
            }
        }
        tx.commit().await.map_err(Error::db(op))?;
        // The claim's row hints of jobs whose lease ended here (see `hints`).
        let _ = self.inner.rows.take_all(ended.into_iter());
        self.wake_queues(wake);
        applied.sort();
        applied.dedup();
        Ok(applied)
    }

    async fn workflow_signal(&self, run: Uuid, name: &str, payload: &str) -> Result<Option<Uuid>> {
        let op = "workflow_signal";
        let mut tx = self.inner.writer.begin().await.map_err(Error::db(op))?;
        let Some(row) = query(SIGNAL_RUN)
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
        query(SIGNAL_INSERT)
            .bind(id)
            .bind(run)
            .bind(name)
            .bind(payload)
            .execute(&mut *tx)
            .await
            .map_err(Error::db(op))?;
        let mut wake = Vec::new();
        if status == RunStatus::Waiting
            && waits_for.as_deref() == Some(name)
            && let Some(row) = query(WAKE_ONE)
                .bind(run)
                .fetch_optional(&mut *tx)
                .await
                .map_err(Error::db(op))?
        {
            wake.push(row.try_get::<String, _>(0).map_err(Error::db(op))?);
        }
        tx.commit().await.map_err(Error::db(op))?;
        self.wake_queues(wake);
        Ok(Some(id))
    }

    async fn workflow_get(&self, run: Uuid) -> Result<Option<RunInfo>> {
        let op = "workflow_get";
        let Some(row) = query(GET)
            .bind(run)
            .fetch_optional(&self.inner.reader)
            .await
            .map_err(Error::db(op))?
        else {
            return Ok(None);
        };
        let steps = query(GET_STEPS)
            .bind(run)
            .fetch_all(&self.inner.reader)
            .await
            .map_err(Error::db(op))?
            .iter()
            .map(|r| decode_step(r).map(|(_, s)| s))
            .collect::<Result<Vec<_>>>()?;
        decode_info(&row, steps).map(Some)
    }

    async fn workflow_find(&self, name: &str, workflow_id: &str) -> Result<Option<Uuid>> {
        query(FIND)
            .bind(name)
            .bind(workflow_id)
            .fetch_optional(&self.inner.reader)
            .await
            .map_err(Error::db("workflow_find"))?
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(Error::db("workflow_find"))
    }

    async fn workflow_list(&self, f: &RunFilter) -> Result<Vec<RunInfo>> {
        let op = "workflow_list";
        let status = f.status.map(|s| match s {
            RunStatus::Running => "queued",
            s => s.as_str(),
        });
        let rows = query(LIST)
            .bind(f.name.as_deref())
            .bind(status)
            .bind(f.parent_id)
            .bind(f.before)
            .bind(i64::from(dray_core::batch::list_limit(f.limit)))
            .fetch_all(&self.inner.reader)
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
        let op = "workflow_query";
        let v: Option<String> = query(QUERY)
            .bind(run)
            .bind(key)
            .fetch_optional(&self.inner.reader)
            .await
            .map_err(Error::db(op))?
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(Error::db(op))?;
        v.map(|t| serde_json::from_str(&t).map_err(|e| corrupt(&run, "state value", e)))
            .transpose()
    }

    async fn workflow_cancel(&self, run: Uuid) -> Result<Option<RunCancel>> {
        let op = "workflow_cancel";
        let Some(info) = self.workflow_get(run).await? else {
            return Ok(None);
        };
        if info.run.status.is_terminal() {
            return Ok(Some(RunCancel::AlreadyFinished(info.run.status)));
        }
        let mut tx = self.inner.writer.begin().await.map_err(Error::db(op))?;
        let tree: Vec<Uuid> = query(CANCEL_TREE)
            .bind(run)
            .fetch_all(&mut *tx)
            .await
            .map_err(Error::db(op))?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<std::result::Result<_, _>>()
            .map_err(Error::db(op))?;
        let mut asked = 0u64;
        let mut wake = Vec::new();
        for id in tree {
            if query(CANCEL_RUN)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(Error::db(op))?
                .is_none()
            {
                continue;
            }
            asked += 1;
            if let Some(row) = query(CANCEL_WAKE)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(Error::db(op))?
            {
                wake.push(row.try_get::<String, _>(0).map_err(Error::db(op))?);
            }
            query(CANCEL_RUNNING)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(Error::db(op))?;
        }
        tx.commit().await.map_err(Error::db(op))?;
        self.wake_queues(wake);
        Ok(Some(RunCancel::Requested { runs: asked }))
    }

    async fn workflow_restart(&self, from: Uuid, keep: i32, new: &NewRun) -> Result<RunStarted> {
        let op = "workflow_restart";
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
        let mut tx = self.inner.writer.begin().await.map_err(Error::db(op))?;
        let took = query(RESTART_OLD)
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
        query(RESTART_NEW)
            .bind(new.id)
            .bind(from)
            .bind(new.timeout.map(millis))
            .execute(&mut *tx)
            .await
            .map_err(Error::db(op))?;
        query(RESTART_STEPS)
            .bind(new.id)
            .bind(from)
            .bind(keep)
            .execute(&mut *tx)
            .await
            .map_err(Error::db(op))?;
        self.insert(&mut tx, std::slice::from_ref(&new.job)).await?;
        tx.commit().await.map_err(Error::db(op))?;
        self.wake_queues([new.job.queue.as_str().to_owned()]);
        Ok(RunStarted {
            id: new.id,
            existing: false,
        })
    }

    async fn workflow_note(&self, run: Uuid, note: Option<&str>) -> Result<()> {
        query(NOTE)
            .bind(run)
            .bind(note)
            .execute(&self.inner.writer)
            .await
            .map_err(Error::db("workflow_note"))?;
        Ok(())
    }

    async fn workflow_prune(&self, older_than: Duration, limit: u32) -> Result<u64> {
        let op = "workflow_prune";
        let mut tx = self.inner.writer.begin().await.map_err(Error::db(op))?;
        let ids: Vec<Uuid> = query(PRUNE_IDS)
            .bind(millis(older_than))
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await
            .map_err(Error::db(op))?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<std::result::Result<_, _>>()
            .map_err(Error::db(op))?;
        for id in &ids {
            for s in PRUNE_ONE {
                sqlx::query(s)
                    .bind(*id)
                    .execute(&mut *tx)
                    .await
                    .map_err(Error::db(op))?;
            }
        }
        tx.commit().await.map_err(Error::db(op))?;
        Ok(ids.len() as u64)
    }
}
