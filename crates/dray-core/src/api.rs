//! What the HTTP API (`dray serve`, crate `dray-server`) needs of a store beyond the engine's
//! contract: bearer tokens (kept hashed), idempotency keys of POSTs, a listing of every queue
//! with its counts, and a batched read of many jobs (one query per tick serves every live-event
//! subscriber).

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::store::Store;
use crate::types::{Message, QueueStats};

/// What a bearer token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Scope {
    /// Read jobs, queues, workflows, crons, the outbox, and follow live events.
    Read,
    /// Everything `read` may, and create or change things: enqueue, cancel, retry, start,
    /// signal, pause, trigger, requeue.
    Write,
    /// Run jobs over HTTP: claim, heartbeat, complete, fail.
    Worker,
    /// Everything, including tokens.
    Admin,
}

impl Scope {
    /// Every scope, in order.
    pub const ALL: [Scope; 4] = [Scope::Read, Scope::Write, Scope::Worker, Scope::Admin];

    /// The scope's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Worker => "worker",
            Scope::Admin => "admin",
        }
    }

    /// Reads a scope name.
    pub fn parse(s: &str) -> Result<Scope> {
        Scope::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(
                    "scope",
                    format!(
                        "{:?} is not a scope; use read, write, worker or admin",
                        crate::error::excerpt(s)
                    ),
                )
            })
    }

    /// Whether a token holding `self` may do what needs `needed`: `admin` may do everything,
    /// `write` may also read.
    pub fn allows(self, needed: Scope) -> bool {
        self == needed || self == Scope::Admin || (self == Scope::Write && needed == Scope::Read)
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reads a comma-separated list of scopes (`"read,write"`), refusing an empty one.
pub fn parse_scopes(s: &str) -> Result<Vec<Scope>> {
    let mut scopes = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(Scope::parse)
        .collect::<Result<Vec<_>>>()?;
    scopes.sort();
    scopes.dedup();
    if scopes.is_empty() {
        return Err(Error::invalid(
            "scopes",
            "name at least one of read, write, worker, admin",
        ));
    }
    Ok(scopes)
}

/// Writes scopes as their comma-separated list.
pub fn format_scopes(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// A token as the store keeps it: never the secret itself, only its SHA-256.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenInfo {
    /// The token's id (shown by `dray tokens list`, used to revoke it).
    pub id: Uuid,
    /// A name for people (unique among live tokens).
    pub name: String,
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// When it was made (database clock).
    pub created_at: DateTime<Utc>,
    /// When it stops working, if ever.
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
}

impl TokenInfo {
    /// Whether the token holds a scope that allows `needed`.
    pub fn allows(&self, needed: Scope) -> bool {
        self.scopes.iter().any(|s| s.allows(needed))
    }
}

/// A token to store.
#[derive(Clone, Debug)]
pub struct NewToken {
    /// Its id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// Its scopes.
    pub scopes: Vec<Scope>,
    /// The SHA-256 of the secret, hex ([`hash_token`]).
    pub hash: String,
    /// How long it works, from now (database clock); `None`: until revoked.
    pub ttl: Option<Duration>,
}

impl NewToken {
    /// The error of a store that found a live token with this one's name.
    pub fn name_taken(&self) -> Error {
        Error::invalid(
            "token name",
            format!(
                "a live token is already named {:?}; revoke it first or pick another name",
                self.name
            ),
        )
    }
}

/// Prefix of every token Dray makes, so secret scanners and people recognise one.
pub const TOKEN_PREFIX: &str = "dray_";

/// A new random token secret (`dray_` and 64 hex digits: 256 bits from the operating system's
/// random source) and its hash, as stored.
pub fn generate_token() -> Result<(String, String)> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| {
        Error::invalid(
            "token",
            format!("the operating system gave no random bytes: {e}"),
        )
    })?;
    let secret = format!("{TOKEN_PREFIX}{}", hex(&bytes));
    let hash = hash_token(&secret);
    Ok((secret, hash))
}

/// The SHA-256 of a token secret, hex: what the store keeps and looks up. A token is 256
/// random bits, so a plain hash is enough (no password hashing is needed to resist guessing).
pub fn hash_token(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Checks a token name: 1 to 128 characters from `[A-Za-z0-9_.:-]`.
pub fn check_token_name(name: &str) -> Result<()> {
    crate::outbox::check_name("token name", name)
}

/// One queue and its counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QueueCounts {
    /// The queue.
    pub queue: String,
    /// Its messages by state.
    #[serde(flatten)]
    pub stats: QueueStats,
}

/// Decodes a row of `(queue, available, scheduled, leased, completed, dead, cancelled)`, as
/// both stores' [`ApiStore::queue_list`] select it.
pub fn decode_queue_counts<'r, R>(row: &'r R, op: &'static str) -> Result<QueueCounts>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let g = |i: usize| -> Result<i64> { row.try_get(i).map_err(Error::db(op)) };
    Ok(QueueCounts {
        queue: row.try_get(0).map_err(Error::db(op))?,
        stats: QueueStats {
            available: g(1)?,
            scheduled: g(2)?,
            leased: g(3)?,
            completed: g(4)?,
            dead: g(5)?,
            cancelled: g(6)?,
        },
    })
}

/// What [`ApiStore::idempotency_begin`] found for a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdempotencyBegin {
    /// The key is new: it is now reserved for this request; finish or release it.
    New,
    /// Another request with this key has begun and not finished.
    InProgress {
        /// That request's fingerprint.
        fingerprint: String,
    },
    /// A request with this key finished: its answer, to be replayed.
    Done {
        /// That request's fingerprint (method, path and body hash).
        fingerprint: String,
        /// Its HTTP status.
        status: u16,
        /// Its body.
        body: String,
    },
}

impl IdempotencyBegin {
    /// What a key already taken holds, from its stored columns: a finished answer, or a
    /// request still running (also when the row went between the insert and the read, which
    /// a retry resolves).
    pub fn taken(fingerprint: Option<String>, status: Option<i32>, body: Option<String>) -> Self {
        let fingerprint = fingerprint.unwrap_or_default();
        match (status.and_then(|s| u16::try_from(s).ok()), body) {
            (Some(status), Some(body)) => IdempotencyBegin::Done {
                fingerprint,
                status,
                body,
            },
            _ => IdempotencyBegin::InProgress { fingerprint },
        }
    }
}

/// Longest accepted `Idempotency-Key`, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// The store part of the HTTP API (both of Dray's stores implement it).
pub trait ApiStore: Store {
    /// The schema version this build of the store migrates to (readiness compares the
    /// database's [`Store::schema_version`] with it).
    fn schema_target(&self) -> i64;

    /// Reads many jobs by id, in any state, in one query; ids that match nothing are absent.
    fn message_get_many(&self, ids: &[Uuid]) -> impl Future<Output = Result<Vec<Message>>> + Send;

    /// Every queue that has messages, with its counts at one instant, by name.
    fn queue_list(&self) -> impl Future<Output = Result<Vec<QueueCounts>>> + Send;

    /// Stores a token. A live token with the same name is refused with
    /// [`Error::InvalidArgument`].
    fn token_insert(&self, token: &NewToken) -> impl Future<Output = Result<TokenInfo>> + Send;

    /// Every token, revoked ones included, newest first.
    fn token_list(&self) -> impl Future<Output = Result<Vec<TokenInfo>>> + Send;

    /// Revokes the live token with this id or name; false when there is none.
    fn token_revoke(&self, id_or_name: &str) -> impl Future<Output = Result<bool>> + Send;

    /// The live (not revoked, not expired) token with this hash.
    fn token_find(&self, hash: &str) -> impl Future<Output = Result<Option<TokenInfo>>> + Send;

    /// Reserves idempotency key `key` in `scope` (the caller's token, or the route) for a
    /// request with `fingerprint`, or reports what an earlier request with it did.
    fn idempotency_begin(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &str,
    ) -> impl Future<Output = Result<IdempotencyBegin>> + Send;

    /// Records the answer of the request that reserved the key.
    fn idempotency_finish(
        &self,
        scope: &str,
        key: &str,
        status: u16,
        body: &str,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Gives a reserved key up (its request failed in a way worth retrying).
    fn idempotency_release(
        &self,
        scope: &str,
        key: &str,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Deletes keys older than `older_than`; returns how many.
    fn idempotency_prune(&self, older_than: Duration) -> impl Future<Output = Result<u64>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_and_imply() {
        assert_eq!(
            parse_scopes("write, read,write").unwrap(),
            vec![Scope::Read, Scope::Write]
        );
        assert!(parse_scopes("").is_err());
        assert!(parse_scopes("root").is_err());
        assert!(Scope::Admin.allows(Scope::Worker));
        assert!(Scope::Write.allows(Scope::Read));
        assert!(!Scope::Read.allows(Scope::Write));
        assert!(!Scope::Worker.allows(Scope::Read));
    }

    #[test]
    fn tokens_are_random_and_hashed() {
        let (a, ha) = generate_token().unwrap();
        let (b, _) = generate_token().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 64);
        assert_eq!(hash_token(&a), ha);
        assert_eq!(ha.len(), 64);
    }
}
