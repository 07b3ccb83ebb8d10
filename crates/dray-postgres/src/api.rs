//! The HTTP API's part of the store on PostgreSQL: [`ApiStore`] for [`PgStore`] (schema version
//! 13): tokens (only their hashes), idempotency keys, the queue listing and batched job reads.

use std::time::Duration;

use dray_core::api::{
    ApiStore, IdempotencyBegin, NewToken, QueueCounts, TokenInfo, decode_queue_counts,
    format_scopes, parse_scopes,
};
use dray_core::batch::micros;
use dray_core::{Error, Message, Result};
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, Row};
use uuid::Uuid;

use crate::{PgStore, decode_message};

const TOKEN_COLS: &str = "id, name, scopes, created_at, expires_at, revoked_at";

const TOKEN_INSERT: &str = "
INSERT INTO {s}.dray_tokens (id, name, scopes, hash, expires_at)
VALUES ($1, $2, $3, $4, now() + $5::int8 * interval '1 microsecond')
ON CONFLICT DO NOTHING
RETURNING {token_cols}";

const TOKEN_FIND: &str = "
SELECT {token_cols} FROM {s}.dray_tokens
WHERE hash = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())";

const TOKEN_REVOKE: &str = "
UPDATE {s}.dray_tokens SET revoked_at = now()
WHERE revoked_at IS NULL AND (name = $1 OR id::text = $1)";

const IDEM_BEGIN: &str = "
WITH ins AS (
    INSERT INTO {s}.dray_idempotency (scope, key, fingerprint) VALUES ($1, $2, $3)
    ON CONFLICT DO NOTHING RETURNING 1)
SELECT EXISTS (SELECT 1 FROM ins) AS new, i.fingerprint, i.status, i.body
FROM (SELECT 1) one
LEFT JOIN {s}.dray_idempotency i ON i.scope = $1 AND i.key = $2 AND NOT EXISTS (SELECT 1 FROM ins)";

fn decode_token(row: &PgRow) -> Result<TokenInfo> {
    let id: Uuid = row.try_get("id").map_err(Error::db("tokens"))?;
    let bad = |c: &str, e: &dyn std::fmt::Display| Error::CorruptRow {
        id: id.to_string(),
        reason: format!("token column {c}: {e}"),
    };
    let scopes: String = row.try_get("scopes").map_err(|e| bad("scopes", &e))?;
    Ok(TokenInfo {
        id,
        name: row.try_get("name").map_err(|e| bad("name", &e))?,
        scopes: parse_scopes(&scopes).map_err(|e| bad("scopes", &e))?,
        created_at: row
            .try_get("created_at")
            .map_err(|e| bad("created_at", &e))?,
        expires_at: row
            .try_get("expires_at")
            .map_err(|e| bad("expires_at", &e))?,
        revoked_at: row
            .try_get("revoked_at")
            .map_err(|e| bad("revoked_at", &e))?,
    })
}

impl PgStore {
    fn api(
        &self,
        template: &'static str,
    ) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
        let text = self.expanded(template, |t| t.replace("{token_cols}", TOKEN_COLS));
        sqlx::query(AssertSqlSafe(text)).persistent(false)
    }
}

impl ApiStore for PgStore {
    fn schema_target(&self) -> i64 {
        crate::MIGRATIONS.last().map_or(0, |m| m.version)
    }

    async fn message_get_many(&self, ids: &[Uuid]) -> Result<Vec<Message>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(AssertSqlSafe(self.inner.sql.get_many.clone()))
            .bind(ids)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(Error::db("message_get_many"))?;
        // A row that does not decode costs only itself (its watchers see it as missing).
        Ok(rows.iter().filter_map(|r| decode_message(r).ok()).collect())
    }

    async fn queue_list(&self) -> Result<Vec<QueueCounts>> {
        let op = "queue_list";
        let rows = sqlx::query(AssertSqlSafe(self.inner.sql.queue_list.clone()))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(Error::db(op))?;
        rows.iter()
            .map(|row| decode_queue_counts(row, op))
            .collect()
    }

    async fn token_insert(&self, token: &NewToken) -> Result<TokenInfo> {
        let row = self
            .api(TOKEN_INSERT)
            .bind(token.id)
            .bind(&token.name)
            .bind(format_scopes(&token.scopes))
            .bind(&token.hash)
            .bind(token.ttl.map(micros))
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(Error::db("token_insert"))?;
        match row {
            Some(row) => decode_token(&row),
            None => Err(token.name_taken()),
        }
    }

    async fn token_list(&self) -> Result<Vec<TokenInfo>> {
        let rows = self
            .api("SELECT {token_cols} FROM {s}.dray_tokens ORDER BY created_at DESC, id DESC")
            .fetch_all(&self.inner.pool)
            .await
            .map_err(Error::db("token_list"))?;
        rows.iter().map(decode_token).collect()
    }

    async fn token_revoke(&self, id_or_name: &str) -> Result<bool> {
        let done = self
            .api(TOKEN_REVOKE)
            .bind(id_or_name)
            .execute(&self.inner.pool)
            .await
            .map_err(Error::db("token_revoke"))?;
        Ok(done.rows_affected() > 0)
    }

    async fn token_find(&self, hash: &str) -> Result<Option<TokenInfo>> {
        let row = self
            .api(TOKEN_FIND)
            .bind(hash)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(Error::db("token_find"))?;
        row.as_ref().map(decode_token).transpose()
    }

    async fn idempotency_begin(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &str,
    ) -> Result<IdempotencyBegin> {
        let op = "idempotency_begin";
        let row = self
            .api(IDEM_BEGIN)
            .bind(scope)
            .bind(key)
            .bind(fingerprint)
            .fetch_one(&self.inner.pool)
            .await
            .map_err(Error::db(op))?;
        let new: bool = row.try_get("new").map_err(Error::db(op))?;
        if new {
            return Ok(IdempotencyBegin::New);
        }
        let fingerprint: Option<String> = row.try_get("fingerprint").map_err(Error::db(op))?;
        let status: Option<i32> = row.try_get("status").map_err(Error::db(op))?;
        let body: Option<String> = row.try_get("body").map_err(Error::db(op))?;
        Ok(IdempotencyBegin::taken(fingerprint, status, body))
    }

    async fn idempotency_finish(
        &self,
        scope: &str,
        key: &str,
        status: u16,
        body: &str,
    ) -> Result<()> {
        self.api(
            "UPDATE {s}.dray_idempotency SET status = $3, body = $4 WHERE scope = $1 AND key = $2",
        )
        .bind(scope)
        .bind(key)
        .bind(i32::from(status))
        .bind(body)
        .execute(&self.inner.pool)
        .await
        .map_err(Error::db("idempotency_finish"))?;
        Ok(())
    }

    async fn idempotency_release(&self, scope: &str, key: &str) -> Result<()> {
        self.api(
            "DELETE FROM {s}.dray_idempotency WHERE scope = $1 AND key = $2 AND status IS NULL",
        )
        .bind(scope)
        .bind(key)
        .execute(&self.inner.pool)
        .await
        .map_err(Error::db("idempotency_release"))?;
        Ok(())
    }

    async fn idempotency_prune(&self, older_than: Duration) -> Result<u64> {
        let done = self
            .api("DELETE FROM {s}.dray_idempotency WHERE created_at < now() - $1::int8 * interval '1 microsecond'")
            .bind(micros(older_than))
            .execute(&self.inner.pool)
            .await
            .map_err(Error::db("idempotency_prune"))?;
        Ok(done.rows_affected())
    }
}
