//! The outbox and inbox on PostgreSQL: [`OutboxStore`] for [`PgStore`] (schema version 12).
//! Staging is one `INSERT … SELECT FROM UNNEST` in the caller's transaction, with a NOTIFY
//! (delivered at its commit) that wakes the outbox's relays; a claim is one `UPDATE` of a
//! `FOR UPDATE SKIP LOCKED` batch in staging order.

use std::time::Duration;

use chrono::{DateTime, Utc};
use dray_core::batch::micros;
use dray_core::outbox::{
    OutboxEvent, OutboxRetry, OutboxRow, OutboxStats, OutboxStatus, OutboxStore, wake_channel,
};
use dray_core::{Error, Result};
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, PgConnection, Row};
use uuid::Uuid;

use crate::PgStore;

const COLS: &str = "id, outbox, event_type, event_id, payload, ordering_key, occurred_at, status, \
    attempts, available_at, claimed_at, published_at, last_error, headers";

/// The rows, and the NOTIFY that wakes the outbox's relays (delivered at the caller's commit,
/// never on a rollback), in one statement: one round trip per flush.
const INSERT: &str = "
WITH ins AS (
    INSERT INTO {s}.dray_outbox
        (id, outbox, event_type, event_id, payload, ordering_key, occurred_at, headers)
    SELECT u.id, $1, u.event_type, u.event_id, u.payload, u.ordering_key,
           COALESCE(u.occurred_at, now()), u.headers
    FROM UNNEST($2::uuid[], $3::text[], $4::text[], $5::jsonb[], $6::text[], $7::timestamptz[],
                $10::jsonb[])
        AS u(id, event_type, event_id, payload, ordering_key, occurred_at, headers)
    ON CONFLICT (outbox, event_id) DO NOTHING
    RETURNING 1)
SELECT count(*), pg_notify($8, $9) FROM ins";

const CLAIM: &str = "
UPDATE {s}.dray_outbox o
SET status = 'processing', attempts = o.attempts + 1, claimed_at = now(), claimed_by = $3
FROM (SELECT id FROM {s}.dray_outbox
      WHERE outbox = $1 AND status = 'pending' AND available_at <= now()
      ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED) c
WHERE o.id = c.id
RETURNING {cols}";

fn decode(row: &PgRow) -> Result<OutboxRow> {
    let id: Uuid = row.try_get("id").map_err(Error::db("outbox"))?;
    let bad = |c: &str, e: sqlx::Error| Error::CorruptRow {
        id: id.to_string(),
        reason: format!("outbox column {c}: {e}"),
    };
    let status: String = row.try_get("status").map_err(|e| bad("status", e))?;
    Ok(OutboxRow {
        id,
        outbox: row.try_get("outbox").map_err(|e| bad("outbox", e))?,
        event_type: row
            .try_get("event_type")
            .map_err(|e| bad("event_type", e))?,
        event_id: row.try_get("event_id").map_err(|e| bad("event_id", e))?,
        payload: row.try_get("payload").map_err(|e| bad("payload", e))?,
        ordering_key: row
            .try_get("ordering_key")
            .map_err(|e| bad("ordering_key", e))?,
        headers: dray_core::batch::decode_headers(
            &id,
            row.try_get("headers").map_err(|e| bad("headers", e))?,
        )?,
        occurred_at: row
            .try_get("occurred_at")
            .map_err(|e| bad("occurred_at", e))?,
        status: OutboxStatus::parse(&status)?,
        attempts: row.try_get("attempts").map_err(|e| bad("attempts", e))?,
        available_at: row
            .try_get("available_at")
            .map_err(|e| bad("available_at", e))?,
        claimed_at: row
            .try_get("claimed_at")
            .map_err(|e| bad("claimed_at", e))?,
        published_at: row
            .try_get("published_at")
            .map_err(|e| bad("published_at", e))?,
        last_error: row
            .try_get("last_error")
            .map_err(|e| bad("last_error", e))?,
    })
}

impl PgStore {
    /// An outbox statement, its schema and column lists filled in once per store.
    fn ob(
        &self,
        template: &'static str,
    ) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
        let text = self.expanded(template, |t| {
            let prefixed: Vec<String> = COLS.split(", ").map(|c| format!("o.{c}")).collect();
            t.replace("{cols}", &prefixed.join(", "))
                .replace("{plain_cols}", COLS)
        });
        sqlx::query(AssertSqlSafe(text)).persistent(false)
    }
}

impl OutboxStore for PgStore {
    async fn outbox_insert_in(
        &self,
        conn: &mut PgConnection,
        outbox: &str,
        events: &[OutboxEvent],
    ) -> Result<u64> {
        let op = "outbox_flush";
        if events.is_empty() {
            return Ok(0);
        }
        let ids: Vec<Uuid> = events.iter().map(|_| Uuid::now_v7()).collect();
        let row = self
            .ob(INSERT)
            .bind(outbox)
            .bind(&ids)
            .bind(
                events
                    .iter()
                    .map(|e| e.event_type.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                events
                    .iter()
                    .map(|e| e.event_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(events.iter().map(|e| e.payload.clone()).collect::<Vec<_>>())
            .bind(
                events
                    .iter()
                    .map(|e| e.ordering_key.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(events.iter().map(|e| e.occurred_at).collect::<Vec<_>>())
            .bind(&self.inner.channel)
            .bind(wake_channel(outbox))
            .bind(
                events
                    .iter()
                    .map(|e| serde_json::to_value(&e.headers).unwrap_or_default())
                    .collect::<Vec<_>>(),
            )
            .fetch_one(&mut *conn)
            .await
            .map_err(Error::db(op))?;
        let n: i64 = row.try_get(0).map_err(Error::db(op))?;
        Ok(n as u64)
    }

    async fn outbox_claim(&self, outbox: &str, limit: u32, relay: &str) -> Result<Vec<OutboxRow>> {
        let rows = self
            .ob(CLAIM)
            .bind(outbox)
            .bind(i64::from(limit))
            .bind(relay)
            .fetch_all(&self.inner.worker_pool)
            .await
            .map_err(Error::db("outbox_claim"))?;
        let mut out = rows.iter().map(decode).collect::<Result<Vec<_>>>()?;
        out.sort_by_key(|r| r.id);
        Ok(out)
    }

    async fn outbox_mark_published(&self, ids: &[Uuid]) -> Result<u64> {
        let done = self
            .ob(
                "UPDATE {s}.dray_outbox SET status = 'published', published_at = now(),
                 claimed_at = NULL, claimed_by = NULL
             WHERE id = ANY($1) AND status = 'processing'",
            )
            .bind(ids)
            .execute(&self.inner.worker_pool)
            .await
            .map_err(Error::db("outbox_mark_published"))?;
        Ok(done.rows_affected())
    }

    async fn outbox_mark_failed(&self, ids: &[Uuid], error: &str) -> Result<u64> {
        let done = self
            .ob(
                "UPDATE {s}.dray_outbox SET status = 'failed', last_error = $2,
                 claimed_at = NULL, claimed_by = NULL
             WHERE id = ANY($1) AND status = 'processing'",
            )
            .bind(ids)
            .bind(error)
            .execute(&self.inner.worker_pool)
            .await
            .map_err(Error::db("outbox_mark_failed"))?;
        Ok(done.rows_affected())
    }

    async fn outbox_mark_retry(&self, retries: &[OutboxRetry]) -> Result<u64> {
        let done = self
            .ob(
                "UPDATE {s}.dray_outbox o SET status = 'pending', attempts = u.attempts,
                 available_at = u.available_at, last_error = u.error,
                 claimed_at = NULL, claimed_by = NULL
             FROM UNNEST($1::uuid[], $2::int4[], $3::timestamptz[], $4::text[])
                 AS u(id, attempts, available_at, error)
             WHERE o.id = u.id AND o.status = 'processing'",
            )
            .bind(retries.iter().map(|r| r.id).collect::<Vec<_>>())
            .bind(retries.iter().map(|r| r.attempts).collect::<Vec<_>>())
            .bind(
                retries
                    .iter()
                    .map(|r| r.available_at)
                    .collect::<Vec<DateTime<Utc>>>(),
            )
            .bind(retries.iter().map(|r| r.error.as_str()).collect::<Vec<_>>())
            .execute(&self.inner.worker_pool)
            .await
            .map_err(Error::db("outbox_mark_retry"))?;
        Ok(done.rows_affected())
    }

    async fn outbox_reclaim_stale(&self, outbox: &str, older_than: Duration) -> Result<u64> {
        let done = self.ob("UPDATE {s}.dray_outbox SET status = 'pending', claimed_at = NULL, claimed_by = NULL
             WHERE outbox = $1 AND status = 'processing'
               AND claimed_at < now() - $2 * interval '1 microsecond'")
        .bind(outbox)
        .bind(micros(older_than))
        .execute(&self.inner.worker_pool)
        .await
        .map_err(Error::db("outbox_reclaim_stale"))?;
        Ok(done.rows_affected())
    }

    async fn outbox_requeue_failed(&self, outbox: &str, ids: Option<&[Uuid]>) -> Result<u64> {
        let done = self
            .ob(
                "UPDATE {s}.dray_outbox SET status = 'pending', attempts = 0, available_at = now()
             WHERE outbox = $1 AND status = 'failed' AND ($2::uuid[] IS NULL OR id = ANY($2))",
            )
            .bind(outbox)
            .bind(ids.map(<[Uuid]>::to_vec))
            .execute(self.pool())
            .await
            .map_err(Error::db("outbox_requeue_failed"))?;
        if done.rows_affected() > 0 {
            self.notify(&[wake_channel(outbox)]).await?;
        }
        Ok(done.rows_affected())
    }

    async fn outbox_stats(&self, outbox: &str) -> Result<OutboxStats> {
        let rows = self
            .ob("SELECT status, count(*) FROM {s}.dray_outbox WHERE outbox = $1 GROUP BY status")
            .bind(outbox)
            .fetch_all(self.pool())
            .await
            .map_err(Error::db("outbox_stats"))?;
        let mut s = OutboxStats::default();
        for row in rows {
            let status: String = row.try_get(0).map_err(Error::db("outbox_stats"))?;
            let n: i64 = row.try_get(1).map_err(Error::db("outbox_stats"))?;
            s.add(OutboxStatus::parse(&status)?, n);
        }
        Ok(s)
    }

    async fn outbox_list(
        &self,
        outbox: &str,
        status: Option<OutboxStatus>,
        limit: u32,
    ) -> Result<Vec<OutboxRow>> {
        let rows = self
            .ob("SELECT {plain_cols} FROM {s}.dray_outbox WHERE outbox = $1
             AND ($2::text IS NULL OR status = $2) ORDER BY id DESC LIMIT $3")
            .bind(outbox)
            .bind(status.map(|s| s.as_str()))
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await
            .map_err(Error::db("outbox_list"))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            match decode(row) {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::warn!(err = %e, "dray: an unreadable outbox row was left out of a list")
                }
            }
        }
        Ok(out)
    }

    async fn outbox_prune(&self, older_than: Duration) -> Result<u64> {
        let done = self
            .ob("DELETE FROM {s}.dray_outbox WHERE status = 'published'
               AND published_at < now() - $1 * interval '1 microsecond'")
            .bind(micros(older_than))
            .execute(self.pool())
            .await
            .map_err(Error::db("outbox_prune"))?;
        Ok(done.rows_affected())
    }

    async fn inbox_mark_if_unseen_in(
        &self,
        conn: &mut PgConnection,
        inbox: &str,
        message_id: &str,
    ) -> Result<bool> {
        let row = self
            .ob(
                "INSERT INTO {s}.dray_inbox (inbox, message_id) VALUES ($1, $2)
             ON CONFLICT DO NOTHING RETURNING 1",
            )
            .bind(inbox)
            .bind(message_id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(Error::db("inbox_mark_if_unseen"))?;
        Ok(row.is_some())
    }

    async fn inbox_prune(&self, older_than: Duration) -> Result<u64> {
        let done = self
            .ob("DELETE FROM {s}.dray_inbox WHERE seen_at < now() - $1 * interval '1 microsecond'")
            .bind(micros(older_than))
            .execute(self.pool())
            .await
            .map_err(Error::db("inbox_prune"))?;
        Ok(done.rows_affected())
    }
}
