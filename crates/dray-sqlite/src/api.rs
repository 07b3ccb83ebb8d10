//! The HTTP API's part of the store on SQLite: [`ApiStore`] for [`SqliteStore`] (schema version
//! 9; the same tables as PostgreSQL's, times in milliseconds).

use std::time::Duration;

use dray_core::api::{
    ApiStore, IdempotencyBegin, NewToken, QueueCounts, TokenInfo, decode_queue_counts,
    format_scopes, parse_scopes,
};
use dray_core::batch::millis;
use dray_core::{Error, Message, Result};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use uuid::Uuid;

use crate::{SQL, SqliteStore, decode_message, ms_to_time};

const NOW: &str = "CAST(round(unixepoch('subsec') * 1000) AS INTEGER)";

fn q(text: &str) -> sqlx::query::Query<'static, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    sqlx::query(sqlx::AssertSqlSafe(
        text.replace("{now}", NOW)
            .replace("{token_cols}", TOKEN_COLS),
    ))
}

const TOKEN_COLS: &str = "id, name, scopes, created_at, expires_at, revoked_at";

const TOKEN_INSERT: &str = "
INSERT INTO dray_tokens (id, name, scopes, hash, created_at, expires_at)
VALUES (?1, ?2, ?3, ?4, {now}, CASE WHEN ?5 IS NULL THEN NULL ELSE {now} + ?5 END)
ON CONFLICT DO NOTHING
RETURNING {token_cols}";

const TOKEN_FIND: &str = "
SELECT {token_cols} FROM dray_tokens
WHERE hash = ?1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > {now})";

fn decode_token(row: &SqliteRow) -> Result<TokenInfo> {
    let id: Uuid = row.try_get("id").map_err(Error::db("tokens"))?;
    let bad = |c: &str, e: &dyn std::fmt::Display| Error::CorruptRow {
        id: id.to_string(),
        reason: format!("token column {c}: {e}"),
    };
    let scopes: String = row.try_get("scopes").map_err(|e| bad("scopes", &e))?;
    let time = |c: &str| -> Result<Option<chrono::DateTime<chrono::Utc>>> {
        let ms: Option<i64> = row.try_get(c).map_err(|e| bad(c, &e))?;
        ms.map(|ms| ms_to_time(&id, c, ms)).transpose()
    };
    Ok(TokenInfo {
        id,
        name: row.try_get("name").map_err(|e| bad("name", &e))?,
        scopes: parse_scopes(&scopes).map_err(|e| bad("scopes", &e))?,
        created_at: time("created_at")?.ok_or_else(|| bad("created_at", &"NULL"))?,
        expires_at: time("expires_at")?,
        revoked_at: time("revoked_at")?,
    })
}

impl ApiStore for SqliteStore {
    fn schema_target(&self) -> i64 {
        crate::MIGRATIONS.last().map_or(0, |m| m.version)
    }

    async fn message_get_many(&self, ids: &[Uuid]) -> Result<Vec<Message>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let list: Vec<String> = ids.iter().map(|id| id.simple().to_string()).collect();
        let rows = sqlx::query(SQL.get_many.as_str())
            .bind(serde_json::to_string(&list)?)
            .fetch_all(&self.inner.reader)
            .await
            .map_err(Error::db("message_get_many"))?;
        // A row that does not decode costs only itself (its watchers see it as missing).
        Ok(rows.iter().filter_map(|r| decode_message(r).ok()).collect())
    }

    async fn queue_list(&self) -> Result<Vec<QueueCounts>> {
        let op = "queue_list";
        let rows = sqlx::query(SQL.queue_list.as_str())
            .fetch_all(&self.inner.reader)
            .await
            .map_err(Error::db(op))?;
        rows.iter()
            .map(|row| decode_queue_counts(row, op))
            .collect()
    }

    async fn token_insert(&self, token: &NewToken) -> Result<TokenInfo> {
        let row = q(TOKEN_INSERT)
            .bind(token.id)
            .bind(token.name.clone())
            .bind(format_scopes(&token.scopes))
            .bind(token.hash.clone())
            .bind(token.ttl.map(millis))
            .fetch_optional(&self.inner.writer)
            .await
            .map_err(Error::db("token_insert"))?;
        match row {
            Some(row) => decode_token(&row),
            None => Err(token.name_taken()),
        }
    }

    async fn token_list(&self) -> Result<Vec<TokenInfo>> {
        let rows = q("SELECT {token_cols} FROM dray_tokens ORDER BY created_at DESC, id DESC")
            .fetch_all(&self.inner.reader)
            .await
            .map_err(Error::db("token_list"))?;
        rows.iter().map(decode_token).collect()
    }

    async fn token_revoke(&self, id_or_name: &str) -> Result<bool> {
        let id = Uuid::parse_str(id_or_name).ok();
        let done = q("UPDATE dray_tokens SET revoked_at = {now}
                      WHERE revoked_at IS NULL AND (name = ?1 OR id = ?2)")
        .bind(id_or_name.to_owned())
        .bind(id)
        .execute(&self.inner.writer)
        .await
        .map_err(Error::db("token_revoke"))?;
        Ok(done.rows_affected() > 0)
    }

    async fn token_find(&self, hash: &str) -> Result<Option<TokenInfo>> {
        let row = q(TOKEN_FIND)
            .bind(hash.to_owned())
            .fetch_optional(&self.inner.reader)
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
        let inserted = q(
            "INSERT INTO dray_idempotency (scope, key, fingerprint, created_at)
                          VALUES (?1, ?2, ?3, {now}) ON CONFLICT DO NOTHING",
        )
        .bind(scope.to_owned())
        .bind(key.to_owned())
        .bind(fingerprint.to_owned())
        .execute(&self.inner.writer)
        .await
        .map_err(Error::db(op))?;
        if inserted.rows_affected() > 0 {
            return Ok(IdempotencyBegin::New);
        }
        let row = q("SELECT fingerprint, status, body FROM dray_idempotency
                     WHERE scope = ?1 AND key = ?2")
        .bind(scope.to_owned())
        .bind(key.to_owned())
        .fetch_optional(&self.inner.writer)
        .await
        .map_err(Error::db(op))?;
        Ok(match row {
            Some(row) => IdempotencyBegin::taken(
                row.try_get(0).map_err(Error::db(op))?,
                row.try_get(1).map_err(Error::db(op))?,
                row.try_get(2).map_err(Error::db(op))?,
            ),
            None => IdempotencyBegin::taken(None, None, None),
        })
    }

    async fn idempotency_finish(
        &self,
        scope: &str,
        key: &str,
        status: u16,
        body: &str,
    ) -> Result<()> {
        q("UPDATE dray_idempotency SET status = ?3, body = ?4 WHERE scope = ?1 AND key = ?2")
            .bind(scope.to_owned())
            .bind(key.to_owned())
            .bind(i32::from(status))
            .bind(body.to_owned())
            .execute(&self.inner.writer)
            .await
            .map_err(Error::db("idempotency_finish"))?;
        Ok(())
    }

    async fn idempotency_release(&self, scope: &str, key: &str) -> Result<()> {
        q("DELETE FROM dray_idempotency WHERE scope = ?1 AND key = ?2 AND status IS NULL")
            .bind(scope.to_owned())
            .bind(key.to_owned())
            .execute(&self.inner.writer)
            .await
            .map_err(Error::db("idempotency_release"))?;
        Ok(())
    }

    async fn idempotency_prune(&self, older_than: Duration) -> Result<u64> {
        let done = q("DELETE FROM dray_idempotency WHERE created_at < {now} - ?1")
            .bind(millis(older_than))
            .execute(&self.inner.writer)
            .await
            .map_err(Error::db("idempotency_prune"))?;
        Ok(done.rows_affected())
    }
}
