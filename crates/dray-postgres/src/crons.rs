//! The cron layer on PostgreSQL: [`CronStore`] for [`PgStore`] (schema version 11). A tick is
//! recorded under the primary key (schedule, tick_at) in the transaction that enqueues its job;
//! the schedule's row is locked first, so concurrent schedulers of one schedule take turns.

use std::time::Duration;

use dray_core::batch::micros;
use dray_core::cron::{
    CronFire, CronStore, CronTarget, FireReport, Overlap, ScheduleRow, ScheduleSpec, TickRow,
    TickStatus,
};
use dray_core::{Error, MessageState, Result};
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, PgConnection, Row};
use uuid::Uuid;

use crate::PgStore;

const COLS: &str = "name, expression, timezone, target, payload, queue, max_attempts, catch_up, \
    catch_up_limit, overlap, source, enabled, paused, last_tick, last_job, created_at, updated_at";

const UPSERT: &str = "
INSERT INTO {s}.dray_cron_schedules AS c
    (name, expression, timezone, target, payload, queue, max_attempts, catch_up, catch_up_limit,
     overlap, source)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT (name) DO UPDATE SET
    last_tick = CASE WHEN c.expression <> EXCLUDED.expression OR c.timezone <> EXCLUDED.timezone
                          OR NOT c.enabled
                     THEN now() ELSE c.last_tick END,
    expression = EXCLUDED.expression, timezone = EXCLUDED.timezone, target = EXCLUDED.target,
    payload = EXCLUDED.payload, queue = EXCLUDED.queue, max_attempts = EXCLUDED.max_attempts,
    catch_up = EXCLUDED.catch_up, catch_up_limit = EXCLUDED.catch_up_limit,
    overlap = EXCLUDED.overlap, source = EXCLUDED.source, enabled = true, updated_at = now()";

const DISABLE_UNDECLARED: &str = "
UPDATE {s}.dray_cron_schedules SET enabled = false, updated_at = now()
WHERE source = 'code' AND enabled AND NOT (name = ANY($1))";

const LOCK: &str = "
SELECT last_job, EXISTS (
    SELECT 1 FROM {s}.dray_jobs j
    WHERE j.id = c.last_job AND j.state IN ('scheduled', 'available', 'running', 'retryable'))
FROM {s}.dray_cron_schedules c WHERE name = $1 FOR UPDATE";

const TICK: &str = "
INSERT INTO {s}.dray_cron_ticks (schedule, tick_at, status, reason, job_id)
VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING 1";

const ADVANCE: &str = "
UPDATE {s}.dray_cron_schedules
SET last_tick = CASE WHEN $4 THEN last_tick ELSE GREATEST(last_tick, $2) END,
    last_job = COALESCE($3, last_job)
WHERE name = $1";

const HISTORY: &str = "
SELECT t.schedule, t.tick_at, t.status, t.reason, t.job_id, t.recorded_at, j.state, j.finished_at,
       j.errors -> -1 ->> 'message' AS error
FROM {s}.dray_cron_ticks t LEFT JOIN {s}.dray_jobs_all j ON j.id = t.job_id
WHERE t.schedule = $1 ORDER BY t.tick_at DESC LIMIT $2";

fn corrupt(name: &str, what: &str, e: impl std::fmt::Display) -> Error {
    Error::CorruptRow {
        id: name.to_owned(),
        reason: format!("cron schedule column {what}: {e}"),
    }
}

fn decode(row: &PgRow) -> Result<ScheduleRow> {
    let name: String = row.try_get("name").map_err(|e| corrupt("", "name", e))?;
    let col = |c: &str| corrupt(&name, c, "unreadable");
    let target: serde_json::Value = row.try_get("target").map_err(|_| col("target"))?;
    let overlap: String = row.try_get("overlap").map_err(|_| col("overlap"))?;
    let limit: i32 = row
        .try_get("catch_up_limit")
        .map_err(|_| col("catch_up_limit"))?;
    Ok(ScheduleRow {
        spec: ScheduleSpec {
            expression: row.try_get("expression").map_err(|_| col("expression"))?,
            timezone: row.try_get("timezone").map_err(|_| col("timezone"))?,
            target: serde_json::from_value::<CronTarget>(target)
                .map_err(|e| corrupt(&name, "target", e))?,
            payload: row.try_get("payload").map_err(|_| col("payload"))?,
            queue: row.try_get("queue").map_err(|_| col("queue"))?,
            max_attempts: row
                .try_get("max_attempts")
                .map_err(|_| col("max_attempts"))?,
            catch_up: row.try_get("catch_up").map_err(|_| col("catch_up"))?,
            catch_up_limit: u32::try_from(limit)
                .map_err(|e| corrupt(&name, "catch_up_limit", e))?,
            overlap: Overlap::parse(&overlap).map_err(|e| corrupt(&name, "overlap", e))?,
            name: name.clone(),
        },
        source: row.try_get("source").map_err(|_| col("source"))?,
        enabled: row.try_get("enabled").map_err(|_| col("enabled"))?,
        paused: row.try_get("paused").map_err(|_| col("paused"))?,
        last_tick: row.try_get("last_tick").map_err(|_| col("last_tick"))?,
        last_job: row.try_get("last_job").map_err(|_| col("last_job"))?,
        created_at: row.try_get("created_at").map_err(|_| col("created_at"))?,
        updated_at: row.try_get("updated_at").map_err(|_| col("updated_at"))?,
    })
}

impl PgStore {
    /// A cron statement, its schema filled in once per store.
    fn cq(
        &self,
        template: &'static str,
    ) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
        sqlx::query(AssertSqlSafe(
            self.expanded(template, |t| t.replace("{cols}", COLS)),
        ))
    }

    async fn upsert_in(
        &self,
        conn: &mut PgConnection,
        spec: &ScheduleSpec,
        source: &str,
    ) -> Result<()> {
        self.cq(UPSERT)
            .bind(&spec.name)
            .bind(&spec.expression)
            .bind(&spec.timezone)
            .bind(serde_json::to_value(&spec.target)?)
            .bind(&spec.payload)
            .bind(&spec.queue)
            .bind(spec.max_attempts)
            .bind(spec.catch_up)
            .bind(i32::try_from(spec.catch_up_limit).unwrap_or(i32::MAX))
            .bind(spec.overlap.as_str())
            .bind(source)
            .execute(&mut *conn)
            .await
            .map_err(Error::db("cron_upsert"))?;
        Ok(())
    }
}

impl CronStore for PgStore {
    async fn cron_declare(&self, specs: &[ScheduleSpec]) -> Result<()> {
        let op = "cron_declare";
        let mut tx = self.pool().begin().await.map_err(Error::db(op))?;
        for spec in specs {
            self.upsert_in(&mut tx, spec, "code").await?;
        }
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        self.cq(DISABLE_UNDECLARED)
            .bind(&names)
            .execute(&mut *tx)
            .await
            .map_err(Error::db(op))?;
        tx.commit().await.map_err(Error::db(op))
    }

    async fn cron_upsert(&self, spec: &ScheduleSpec) -> Result<()> {
        let mut conn = self
            .pool()
            .acquire()
            .await
            .map_err(Error::db("cron_upsert"))?;
        self.upsert_in(&mut conn, spec, "api").await
    }

    async fn cron_remove(&self, name: &str) -> Result<bool> {
        let done = self
            .cq("DELETE FROM {s}.dray_cron_schedules WHERE name = $1")
            .bind(name)
            .execute(self.pool())
            .await
            .map_err(Error::db("cron_remove"))?;
        Ok(done.rows_affected() > 0)
    }

    async fn cron_list(&self) -> Result<Vec<ScheduleRow>> {
        let rows = self
            .cq("SELECT {cols} FROM {s}.dray_cron_schedules ORDER BY name")
            .fetch_all(self.pool())
            .await
            .map_err(Error::db("cron_list"))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            match decode(row) {
                Ok(s) => out.push(s),
                Err(e) => {
                    tracing::warn!(err = %e, "dray: an unreadable cron schedule was left out")
                }
            }
        }
        Ok(out)
    }

    async fn cron_fire(&self, f: &CronFire) -> Result<FireReport> {
        let op = "cron_fire";
        let mut tx = self.pool().begin().await.map_err(Error::db(op))?;
        let Some(row) = self
            .cq(LOCK)
            .bind(&f.schedule)
            .fetch_optional(&mut *tx)
            .await
            .map_err(Error::db(op))?
        else {
            return Ok(FireReport::default());
        };
        let previous_unfinished: bool = row.try_get(1).map_err(Error::db(op))?;
        let mut report = FireReport::default();
        let mut last_job = None;
        let mut queues = Vec::new();
        for d in f.decide(previous_unfinished) {
            let t = d.fire;
            let recorded = self
                .cq(TICK)
                .bind(&f.schedule)
                .bind(t.tick)
                .bind(d.status.as_str())
                .bind(d.reason)
                .bind(d.job)
                .fetch_optional(&mut *tx)
                .await
                .map_err(Error::db(op))?
                .is_some();
            // Not recorded: another scheduler handled this tick.
            let Some(id) = d.job.filter(|_| recorded) else {
                if recorded {
                    report.skipped.push(t.tick);
                }
                continue;
            };
            if let Some(j) = &t.job {
                self.insert(&mut tx, std::slice::from_ref(j)).await?;
                queues.push(j.queue.as_str().to_owned());
            }
            if let Some(r) = &t.run {
                self.start_runs_in(&mut tx, std::slice::from_ref(r)).await?;
                queues.push(r.job.queue.as_str().to_owned());
            }
            report.fired.push((t.tick, id));
            last_job = Some(id);
        }
        for (tick, reason) in &f.skip {
            let recorded = self
                .cq(TICK)
                .bind(&f.schedule)
                .bind(*tick)
                .bind(TickStatus::Skipped.as_str())
                .bind(reason.as_str())
                .bind(None::<Uuid>)
                .fetch_optional(&mut *tx)
                .await
                .map_err(Error::db(op))?
                .is_some();
            if recorded {
                report.skipped.push(*tick);
            }
        }
        self.cq(ADVANCE)
            .bind(&f.schedule)
            .bind(f.advance_to)
            .bind(last_job)
            .bind(f.manual)
            .execute(&mut *tx)
            .await
            .map_err(Error::db(op))?;
        tx.commit().await.map_err(Error::db(op))?;
        queues.sort();
        queues.dedup();
        if !queues.is_empty() {
            self.notify(&queues).await?;
        }
        Ok(report)
    }

    async fn cron_set_paused(&self, name: &str, paused: bool) -> Result<bool> {
        let done = self
            .cq(
                "UPDATE {s}.dray_cron_schedules SET paused = $2, updated_at = now(),
                 last_tick = CASE WHEN paused AND NOT $2 THEN now() ELSE last_tick END
             WHERE name = $1",
            )
            .bind(name)
            .bind(paused)
            .execute(self.pool())
            .await
            .map_err(Error::db("cron_set_paused"))?;
        Ok(done.rows_affected() > 0)
    }

    async fn cron_history(&self, name: &str, limit: u32) -> Result<Vec<TickRow>> {
        let op = "cron_history";
        let rows = self
            .cq(HISTORY)
            .bind(name)
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await
            .map_err(Error::db(op))?;
        rows.iter()
            .map(|row| -> Result<TickRow> {
                let status: String = row.try_get("status").map_err(Error::db(op))?;
                let state: Option<String> = row.try_get("state").map_err(Error::db(op))?;
                let tick: chrono::DateTime<chrono::Utc> =
                    row.try_get("tick_at").map_err(Error::db(op))?;
                let finished_at: Option<chrono::DateTime<chrono::Utc>> =
                    row.try_get("finished_at").map_err(Error::db(op))?;
                Ok(TickRow {
                    schedule: row.try_get("schedule").map_err(Error::db(op))?,
                    tick,
                    status: TickStatus::parse(&status)?,
                    reason: row.try_get("reason").map_err(Error::db(op))?,
                    job_id: row.try_get("job_id").map_err(Error::db(op))?,
                    recorded_at: row.try_get("recorded_at").map_err(Error::db(op))?,
                    job_state: state.and_then(|s| MessageState::parse(&s).ok()),
                    duration_ms: finished_at.map(|f| (f - tick).num_milliseconds()),
                    finished_at,
                    error: row.try_get("error").map_err(Error::db(op))?,
                })
            })
            .collect()
    }

    async fn cron_prune(&self, older_than: Duration) -> Result<u64> {
        let done = self.cq("DELETE FROM {s}.dray_cron_ticks WHERE tick_at < now() - $1 * interval '1 microsecond'")
        .bind(micros(older_than))
        .execute(self.pool())
        .await
        .map_err(Error::db("cron_prune"))?;
        Ok(done.rows_affected())
    }
}
