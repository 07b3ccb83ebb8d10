//! The outbox and inbox on SQLite: [`OutboxStore`] for [`SqliteStore`] (schema version 8; the
//! same tables as PostgreSQL's). The single writer serializes claims, so two relays never
//! claim one row.

use std::time::Duration;

use dray_core::batch::millis;
use dray_core::outbox::{
    OutboxEvent, OutboxRetry, OutboxRow, OutboxStats, OutboxStatus, OutboxStore, wake_channel,
};
use dray_core::{Error, Result};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};
use uuid::Uuid;

use crate::{SqliteStore, ms_to_time};

const NOW: &str = "CAST(round(unixepoch('subsec') * 1000) AS INTEGER)";

const COLS: &str = "id, outbox, event_type, event_id, payload, ordering_key, occurred_at, status, \
    attempts, available_at, claimed_at, published_at, last_error, headers";

fn q(text: &str) -> sqlx::query::Query<'static, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    sqlx::query(sqlx::AssertSqlSafe(
        text.replace("{now}", NOW).replace("{cols}", COLS),
    ))
}

fn ids_json(ids: &[Uuid]) -> String {
    serde_json::to_string(
        &ids.iter()
            .map(|i| i.simple().to_string())
            .collect::<Vec<_>>(),
    )
    .unwrap_or_else(|_| "[]".into())
}

fn decode(row: &SqliteRow) -> Result<OutboxRow> {
    let id: Uuid = row.try_get("id").map_err(Error::db("outbox"))?;
    let bad = |c: &str, e: String| Error::CorruptRow {
        id: id.to_string(),
        reason: format!("outbox column {c}: {e}"),
    };
    let text = |c: &str| -> Result<String> { row.try_get(c).map_err(|e| bad(c, e.to_string())) };
    let time = |c: &str| -> Result<Option<chrono::DateTime<chrono::Utc>>> {
        let v: Option<i64> = row.try_get(c).map_err(|e| bad(c, e.to_string()))?;
        v.map(|v| ms_to_time(&id, c, v)).transpose()
    };
    let required = |c: &str| -> Result<chrono::DateTime<chrono::Utc>> {
        time(c)?.ok_or_else(|| bad(c, "NULL".into()))
    };
    Ok(OutboxRow {
        id,
        outbox: text("outbox")?,
        event_type: text("event_type")?,
        event_id: text("event_id")?,
        payload: serde_json::from_str(&text("payload")?)
            .map_err(|e| bad("payload", e.to_string()))?,
        ordering_key: row
            .try_get("ordering_key")
            .map_err(|e| bad("ordering_key", e.to_string()))?,
        occurred_at: required("occurred_at")?,
        status: OutboxStatus::parse(&text("status")?)?,
        attempts: row
            .try_get("attempts")
            .map_err(|e| bad("attempts", e.to_string()))?,
        available_at: required("available_at")?,
        claimed_at: time("claimed_at")?,
        published_at: time("published_at")?,
        last_error: row
            .try_get("last_error")
            .map_err(|e| bad("last_error", e.to_string()))?,
        headers: dray_core::batch::decode_headers(
            &id,
            serde_json::from_str(&text("headers")?).map_err(|e| bad("headers", e.to_string()))?,
        )?,
    })
}

impl OutboxStore for SqliteStore {
    async fn outbox_insert_in(
        &self,
        conn: &mut SqliteConnection,
        outbox: &str,
        events: &[OutboxEvent],
    ) -> Result<u64> {
        let mut n = 0;
        for e in events {
            n += q("INSERT INTO dray_outbox
                        (id, outbox, event_type, event_id, payload, ordering_key, occurred_at,
                         available_at, headers)
                    VALUES (?1, ?2, ?3, ?4, ?5, ?6, COALESCE(?7, {now}), {now}, ?8)
                    ON CONFLICT (outbox, event_id) DO NOTHING")
            .bind(Uuid::now_v7())
            .bind(outbox.to_owned())
            .bind(e.event_type.clone())
            .bind(e.event_id.clone())
            .bind(e.payload.to_string())
            .bind(e.ordering_key.clone())
            .bind(e.occurred_at.map(|t| t.timestamp_millis()))
            .bind(serde_json::to_string(&e.headers)?)
            .execute(&mut *conn)
            .await
            .map_err(Error::db("outbox_flush"))?
            .rows_affected();
        }
        Ok(n)
    }

    async fn outbox_claim(&self, outbox: &str, limit: u32, relay: &str) -> Result<Vec<OutboxRow>> {
        let rows = q("UPDATE dray_outbox
                      SET status = 'processing', attempts = attempts + 1, claimed_at = {now},
                          claimed_by = ?3
                      WHERE id IN (SELECT id FROM dray_outbox
                                   WHERE outbox = ?1 AND status = 'pending' AND available_at <= {now}
                                   ORDER BY id LIMIT ?2)
                      RETURNING {cols}")
        .bind(outbox.to_owned())
        .bind(i64::from(limit))
        .bind(relay.to_owned())
        .fetch_all(self.pool())
        .await
        .map_err(Error::db("outbox_claim"))?;
        let mut out = rows.iter().map(decode).collect::<Result<Vec<_>>>()?;
        out.sort_by_key(|r| r.id);
        Ok(out)
    }

    async fn outbox_mark_published(&self, ids: &[Uuid]) -> Result<u64> {
        Ok(q(
            "UPDATE dray_outbox SET status = 'published', published_at = {now},
                  claimed_at = NULL, claimed_by = NULL
              WHERE id IN (SELECT unhex(value) FROM json_each(?1)) AND status = 'processing'",
        )
        .bind(ids_json(ids))
        .execute(self.pool())
        .await
        .map_err(Error::db("outbox_mark_published"))?
        .rows_affected())
    }

    async fn outbox_mark_failed(&self, ids: &[Uuid], error: &str) -> Result<u64> {
        Ok(
            q("UPDATE dray_outbox SET status = 'failed', last_error = ?2,
                  claimed_at = NULL, claimed_by = NULL
              WHERE id IN (SELECT unhex(value) FROM json_each(?1)) AND status = 'processing'")
            .bind(ids_json(ids))
            .bind(error.to_owned())
            .execute(self.pool())
            .await
            .map_err(Error::db("outbox_mark_failed"))?
            .rows_affected(),
        )
    }

    async fn outbox_mark_retry(&self, retries: &[OutboxRetry]) -> Result<u64> {
        let mut tx = self
            .pool()
            .begin()
            .await
            .map_err(Error::db("outbox_mark_retry"))?;
        let mut n = 0;
        for r in retries {
            n += q(
                "UPDATE dray_outbox SET status = 'pending', attempts = ?2, available_at = ?3,
                        last_error = ?4, claimed_at = NULL, claimed_by = NULL
                    WHERE id = ?1 AND status = 'processing'",
            )
            .bind(r.id)
            .bind(r.attempts)
            .bind(r.available_at.timestamp_millis())
            .bind(r.error.clone())
            .execute(&mut *tx)
            .await
            .map_err(Error::db("outbox_mark_retry"))?
            .rows_affected();
        }
        tx.commit().await.map_err(Error::db("outbox_mark_retry"))?;
        Ok(n)
    }

    async fn outbox_reclaim_stale(&self, outbox: &str, older_than: Duration) -> Result<u64> {
        Ok(q(
            "UPDATE dray_outbox SET status = 'pending', claimed_at = NULL, claimed_by = NULL
              WHERE outbox = ?1 AND status = 'processing' AND claimed_at < {now} - ?2",
        )
        .bind(outbox.to_owned())
        .bind(millis(older_than))
        .execute(self.pool())
        .await
        .map_err(Error::db("outbox_reclaim_stale"))?
        .rows_affected())
    }

    async fn outbox_requeue_failed(&self, outbox: &str, ids: Option<&[Uuid]>) -> Result<u64> {
        let n = q(
            "UPDATE dray_outbox SET status = 'pending', attempts = 0, available_at = {now}
              WHERE outbox = ?1 AND status = 'failed'
                AND (?2 IS NULL OR id IN (SELECT unhex(value) FROM json_each(?2)))",
        )
        .bind(outbox.to_owned())
        .bind(ids.map(ids_json))
        .execute(self.pool())
        .await
        .map_err(Error::db("outbox_requeue_failed"))?
        .rows_affected();
        if n > 0 {
            self.inner.hub.wake(&wake_channel(outbox));
        }
        Ok(n)
    }

    async fn outbox_stats(&self, outbox: &str) -> Result<OutboxStats> {
        let rows = q("SELECT status, count(*) FROM dray_outbox WHERE outbox = ?1 GROUP BY status")
            .bind(outbox.to_owned())
            .fetch_all(&self.inner.reader)
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
        let rows = q("SELECT {cols} FROM dray_outbox WHERE outbox = ?1
                      AND (?2 IS NULL OR status = ?2) ORDER BY id DESC LIMIT ?3")
        .bind(outbox.to_owned())
        .bind(status.map(|s| s.as_str()))
        .bind(i64::from(limit))
        .fetch_all(&self.inner.reader)
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
        Ok(
            q("DELETE FROM dray_outbox WHERE status = 'published' AND published_at < {now} - ?1")
                .bind(millis(older_than))
                .execute(self.pool())
                .await
                .map_err(Error::db("outbox_prune"))?
                .rows_affected(),
        )
    }

    async fn inbox_mark_if_unseen_in(
        &self,
        conn: &mut SqliteConnection,
        inbox: &str,
        message_id: &str,
    ) -> Result<bool> {
        let row = q(
            "INSERT INTO dray_inbox (inbox, message_id, seen_at) VALUES (?1, ?2, {now})
                     ON CONFLICT DO NOTHING RETURNING 1",
        )
        .bind(inbox.to_owned())
        .bind(message_id.to_owned())
        .fetch_optional(&mut *conn)
        .await
        .map_err(Error::db("inbox_mark_if_unseen"))?;
        Ok(row.is_some())
    }

    async fn inbox_prune(&self, older_than: Duration) -> Result<u64> {
        Ok(q("DELETE FROM dray_inbox WHERE seen_at < {now} - ?1")
            .bind(millis(older_than))
            .execute(self.pool())
            .await
            .map_err(Error::db("inbox_prune"))?
            .rows_affected())
    }
}
