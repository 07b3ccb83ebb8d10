//! Dray's embedded SQLite store: the zero-setup default. One file, WAL mode, one writer
//! connection (every write is `BEGIN IMMEDIATE` or a single statement on it) and a pool of
//! readers; receivers in the same process are woken in-process the moment a write commits.
//!
//! ```no_run
//! # async fn f() -> dray_core::Result<()> {
//! let store = dray_sqlite::SqliteStore::open("sqlite://dray.db").await?;
//! # Ok(()) }
//! ```
//!
//! Several processes may open the same file (SQLite serializes their writes). While a receiver
//! waits, its store looks every [`DEFAULT_WATCH_INTERVAL`] whether another connection has
//! committed to the file and, if so, wakes it (see [`SqliteStoreBuilder::watch_interval`]), so
//! a job enqueued by another process starts within milliseconds; use PostgreSQL to scale out.

#![forbid(unsafe_code)]

mod api;
mod crons;
mod hints;
mod outbox;
mod sql;
mod workflow;

use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use dray_core::batch::{
    RowHead, RowTail, Salvaged, SweepCursor, Unreadable, cancel_outcome, claimed_in_order,
    decode_attempts, decode_errors, decode_gauge, decode_headers, decode_progress, decode_state,
    dedup_keys, fail_to_parts, list_limit, millis, redrive_key_taken, redrive_refused,
    settle_parts,
};
use dray_core::claim::{ClaimCursors, ClaimKey};
use dray_core::duration::MAX_SPAN;
use dray_core::migrate::{self, Migration, SchemaMode};
use dray_core::{
    CallbackSettle, CancelOutcome, ClaimParams, Completion, Enqueued, Error, FailTo, FailureKind,
    JobFilter, LeaseRef, LeaseWrite, Message, MessageState, MigrationReport, NackAction,
    NewMessage, Priority, QueueGauge, QueueName, QueueStats, RescueReport, Result, RunAt, Store,
    WakeHub,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row, Sqlite, SqliteConnection, SqlitePool};
use uuid::Uuid;

use crate::hints::RowHints;

/// The migrations this build knows, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "jobs",
        sql: include_str!("../migrations/0001_jobs.sql"),
    },
    Migration {
        version: 2,
        name: "job_results",
        sql: include_str!("../migrations/0002_job_results.sql"),
    },
    Migration {
        version: 3,
        name: "callbacks",
        sql: include_str!("../migrations/0003_callbacks.sql"),
    },
    Migration {
        version: 4,
        name: "unfinished_index",
        sql: include_str!("../migrations/0004_unfinished_index.sql"),
    },
    Migration {
        version: 5,
        name: "lean_checks",
        sql: include_str!("../migrations/0005_lean_checks.sql"),
    },
    Migration {
        version: 6,
        name: "workflows",
        sql: include_str!("../migrations/0006_workflows.sql"),
    },
    Migration {
        version: 7,
        name: "crons",
        sql: include_str!("../migrations/0007_crons.sql"),
    },
    Migration {
        version: 8,
        name: "outbox",
        sql: include_str!("../migrations/0008_outbox.sql"),
    },
    Migration {
        version: 9,
        name: "api",
        sql: include_str!("../migrations/0009_api.sql"),
    },
    Migration {
        version: 10,
        name: "outbox_headers",
        sql: include_str!("../migrations/0010_outbox_headers.sql"),
    },
];

/// Fallback poll interval of waiting receivers: enqueues inside a caller's transaction on the
/// same handle are found by it, and other processes' commits by it when the watch
/// ([`DEFAULT_WATCH_INTERVAL`]) is off or misses one.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How long a write waits for another process's write lock before failing.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Reader connections.
pub const DEFAULT_READERS: u32 = 4;
/// How often a store with a waiting receiver looks for commits of other processes (see
/// [`SqliteStoreBuilder::watch_interval`]): a job enqueued by another process waits about
/// half of this on average before a waiting receiver claims it (measured: W3-remote's p50
/// 104 ms with the 200 ms poll alone, 9 ms with this watch).
pub const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_millis(20);
/// How often a store checkpoints its file's write-ahead log, off the writer connection (see
/// [`SqliteStoreBuilder::checkpoint_interval`]).
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_millis(250);

/// Pages of write-ahead log after which a committing connection checkpoints by itself anyway
/// (SQLite's `wal_autocheckpoint`; its default is 1,000): a backstop for when the store's own
/// checkpoints fall behind (4 KiB pages: 64 MiB).
const WAL_BACKSTOP_PAGES: u32 = 16_384;

struct Statements {
    insert: String,
    insert_many: String,
    insert_leased: String,
    insert_uniform: String,
    find_key: String,
    claim: String,
    ack: String,
    nack: String,
    extend: String,
    sweep_window: String,
    rescue: String,
    get: String,
    get_many: String,
    queue_list: String,
    gauges: String,
    stats: String,
    next_due: String,
    now: String,
    complete: String,
    complete_quiet: String,
    complete_uniform: String,
    complete_uniform_rows: String,
    fail: String,
    progress: String,
    state_of: String,
    cancel: String,
    redrive: String,
    list: String,
    prune: String,
    leader_acquire: String,
    leader_release: String,
    callback_claim: String,
    callback_settle: String,
    quarantine: String,
}

static SQL: LazyLock<Statements> = LazyLock::new(|| Statements {
    insert: sql::expand(sql::INSERT),
    insert_many: sql::expand(sql::INSERT_MANY),
    insert_leased: sql::expand(sql::INSERT_LEASED),
    insert_uniform: sql::expand(sql::INSERT_UNIFORM),
    find_key: sql::expand(sql::FIND_KEY),
    claim: sql::expand(sql::CLAIM),
    ack: sql::expand(sql::ACK),
    nack: sql::expand(sql::NACK),
    extend: sql::expand(sql::EXTEND),
    sweep_window: sql::expand(sql::SWEEP_WINDOW),
    rescue: sql::expand(sql::RESCUE),
    get: sql::expand(sql::GET),
    get_many: sql::expand(sql::GET_MANY),
    queue_list: sql::expand(sql::QUEUE_LIST),
    gauges: sql::expand(sql::GAUGES),
    stats: sql::expand(sql::STATS),
    next_due: sql::expand(sql::NEXT_DUE),
    now: sql::expand(sql::NOW_MS),
    complete: sql::expand(sql::COMPLETE),
    complete_quiet: sql::expand(&sql::COMPLETE.replace("{lease_returning}", "")),
    complete_uniform: sql::expand(sql::COMPLETE_UNIFORM),
    complete_uniform_rows: sql::expand(sql::COMPLETE_UNIFORM_ROWS),
    fail: sql::expand(sql::FAIL),
    progress: sql::expand(sql::PROGRESS),
    state_of: sql::expand(sql::STATE_OF),
    cancel: sql::expand(sql::CANCEL),
    redrive: sql::expand(sql::REDRIVE),
    list: sql::expand(sql::LIST),
    prune: sql::expand(sql::PRUNE),
    leader_acquire: sql::expand(sql::LEADER_ACQUIRE),
    leader_release: sql::expand(sql::LEADER_RELEASE),
    callback_claim: sql::expand(sql::CALLBACK_CLAIM),
    callback_settle: sql::expand(sql::CALLBACK_SETTLE),
    quarantine: sql::expand(sql::QUARANTINE),
});

fn q(s: &'static str) -> sqlx::query::Query<'static, Sqlite, sqlx::sqlite::SqliteArguments> {
    sqlx::query(s)
}

/// The longest [`SqliteStoreBuilder::busy_timeout`]: SQLite counts it in milliseconds in a
/// 32-bit integer (about 24.8 days).
pub const MAX_BUSY_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);

/// Settings for opening a [`SqliteStore`].
#[derive(Clone, Debug)]
pub struct SqliteStoreBuilder {
    url: String,
    schema_mode: SchemaMode,
    poll_interval: Duration,
    busy_timeout: Duration,
    acquire_timeout: Duration,
    readers: u32,
    create: bool,
    checkpoint_interval: Duration,
    watch_interval: Duration,
}

impl SqliteStoreBuilder {
    /// What to do about the schema on open (default: migrate).
    pub fn schema_mode(mut self, mode: SchemaMode) -> Self {
        self.schema_mode = mode;
        self
    }
    /// Fallback poll interval ([`DEFAULT_POLL_INTERVAL`]; 1 ms to 100 years, checked by
    /// [`open`](Self::open)).
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.poll_interval = d;
        self
    }
    /// How long a write waits on another process's lock ([`DEFAULT_BUSY_TIMEOUT`]; at most
    /// [`MAX_BUSY_TIMEOUT`], checked by [`open`](Self::open)).
    pub fn busy_timeout(mut self, d: Duration) -> Self {
        self.busy_timeout = d;
        self
    }
    /// How long an operation waits for the writer (or a reader) connection of this handle
    /// before it fails with [`Error::PoolExhausted`]
    /// ([`dray_core::error::POOL_ACQUIRE_TIMEOUT`]; 1 ms to 100 years, checked by
    /// [`open`](Self::open)). The writer is held by a transaction begun on
    /// [`SqliteStore::pool`] until it ends.
    pub fn acquire_timeout(mut self, d: Duration) -> Self {
        self.acquire_timeout = d;
        self
    }
    /// Reader connections ([`DEFAULT_READERS`]).
    pub fn readers(mut self, n: u32) -> Self {
        self.readers = n.max(1);
        self
    }
    /// How often the store checkpoints the file's write-ahead log
    /// ([`DEFAULT_CHECKPOINT_INTERVAL`]), from a reader connection, so that the writer never
    /// does.
    ///
    /// SQLite's default is for the connection whose commit takes the log past 1,000 pages to
    /// checkpoint it then and there: copy the pages into the database file and sync both
    /// files, 20–30 ms on this project's test machine, every ~200 ms of a busy queue, during
    /// which that one writer connection (every claim, completion and enqueue of the process)
    /// waits. The store's own checkpoints run beside the writer instead (SQLite's `PASSIVE`
    /// mode: they never wait for it, nor it for them); a writer still checkpoints by itself
    /// if the log ever reaches 64 MiB. Every checkpoint also syncs the log, which is what makes
    /// commits durable across a power loss (see `docs/guarantees.md`, "Durability of commits
    /// (SQLite)"). `Duration::ZERO` leaves checkpoints to SQLite's default; otherwise 1 ms to 100
    /// years.
    pub fn checkpoint_interval(mut self, d: Duration) -> Self {
        self.checkpoint_interval = d;
        self
    }

    /// How often, while one of this handle's receivers is waiting for work, the store looks
    /// whether another connection to the file has committed ([`DEFAULT_WATCH_INTERVAL`]): a
    /// worker in another process, the `dray` command, another handle in this process. When one
    /// has, every waiting receiver looks at its queue again, so a job enqueued elsewhere starts
    /// within about this long rather than at the next [`poll_interval`](Self::poll_interval).
    ///
    /// A look is a `stat` of the write-ahead log (every commit appends to it) and, when that
    /// changed, `PRAGMA data_version` on the store's writer connection, which changes only when
    /// another connection has committed, so this handle's own writes (which wake its receivers
    /// directly) never count. A handle none of whose receivers is waiting does not look at
    /// all. `Duration::ZERO` turns the watch off: other processes' jobs are then found by the
    /// poll alone; otherwise 1 ms to 100 years. (Enqueues in a caller's transaction on this handle commit on the writer
    /// connection itself, so those, too, are found by the poll.)
    pub fn watch_interval(mut self, d: Duration) -> Self {
        self.watch_interval = d;
        self
    }

    /// Whether [`open`](Self::open) creates the file when there is none (default true). With
    /// false, a missing file is an [`Error::InvalidUrl`] naming it, so a mistyped path is not
    /// taken for a new, empty database.
    pub fn create_if_missing(mut self, yes: bool) -> Self {
        self.create = yes;
        self
    }

    /// Checks the builder's durations (see each setter).
    fn check_durations(&self) -> Result<()> {
        use dray_core::duration::check_span;
        let ms = Duration::from_millis(1);
        check_span("poll_interval", self.poll_interval, ms)?;
        check_span("acquire_timeout", self.acquire_timeout, ms)?;
        if self.busy_timeout > MAX_BUSY_TIMEOUT {
            return Err(Error::invalid(
                "busy_timeout",
                format!(
                    "{:?} is longer than SQLite can wait ({MAX_BUSY_TIMEOUT:?}): use at most that",
                    self.busy_timeout
                ),
            ));
        }
        for (what, d) in [
            ("checkpoint_interval", self.checkpoint_interval),
            ("watch_interval", self.watch_interval),
        ] {
            if !d.is_zero() {
                check_span(what, d, ms)?;
            }
        }
        Ok(())
    }

    /// Opens (creating the file if needed) and handles the schema as configured.
    pub async fn open(self) -> Result<SqliteStore> {
        self.check_durations()?;
        let url = if self.url.starts_with("sqlite:") {
            self.url.clone()
        } else {
            format!("sqlite://{}", self.url)
        };
        let memory = url.contains(":memory:") || url.contains("mode=memory");
        // PRAGMAs live in the connect options so that every connection of both pools gets them
        // (a PRAGMA run once through a pool reaches only one connection).
        let options = SqliteConnectOptions::from_str(&url)
            .map_err(|e| Error::InvalidUrl {
                url: self.url.clone(),
                reason: e.to_string(),
            })?
            .create_if_missing(self.create)
            .journal_mode(if memory {
                SqliteJournalMode::Memory
            } else {
                SqliteJournalMode::Wal
            })
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(self.busy_timeout)
            .foreign_keys(true)
            .pragma("temp_store", "memory")
            // sqlx hands rows from its connection thread to the caller through a channel of
            // this many; at the default (50) a claim of 500 rows stalled SQLite's thread ten
            // times waiting for the caller to drain it.
            .row_buffer_size(ROW_CHANNEL);
        let checkpoints = !memory && !self.checkpoint_interval.is_zero();
        let options = if checkpoints {
            options.pragma("wal_autocheckpoint", WAL_BACKSTOP_PAGES.to_string())
        } else {
            options
        };
        if !self.create && !memory && !options.get_filename().exists() {
            return Err(Error::InvalidUrl {
                url: self.url.clone(),
                reason: format!(
                    "there is no database file at {}; check the path, or create it with \
                     `dray migrate`",
                    options.get_filename().display()
                ),
            });
        }
        let mut log = options.get_filename().as_os_str().to_owned();
        log.push("-wal");
        let log = std::path::PathBuf::from(log);
        // No health check when a connection is handed out (sqlx's default pings it, a round
        // trip to the connection's thread): a connection to a local file does not drop.
        let writer = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(self.acquire_timeout)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options.clone())
            .await
            .map_err(|source| Error::Connect { source })?;
        let reader = if memory {
            writer.clone()
        } else {
            SqlitePoolOptions::new()
                .test_before_acquire(false)
                .max_connections(self.readers)
                .acquire_timeout(self.acquire_timeout)
                .connect_lazy_with(options.create_if_missing(false))
        };
        let store = SqliteStore {
            inner: Arc::new(Inner {
                url,
                writer,
                reader,
                hub: WakeHub::new(),
                poll_interval: self.poll_interval,
                watch: (!memory && !self.watch_interval.is_zero())
                    .then_some((self.watch_interval, log)),
                watching: tokio::sync::OnceCell::new(),
                sweep: SweepCursor::default(),
                cursors: ClaimCursors::default(),
                rows: RowHints::default(),
            }),
        };
        if checkpoints {
            tokio::spawn(checkpoints_every(
                Arc::downgrade(&store.inner),
                self.checkpoint_interval,
            ));
        }
        match self.schema_mode {
            SchemaMode::Migrate => {
                store.migrate().await?;
            }
            SchemaMode::Check => migrate::check(MIGRATIONS, store.schema_version().await?)?,
            SchemaMode::Skip => {}
        }
        Ok(store)
    }
}

/// The clock of a store's background task: a tick every `every`, the first one interval from
/// now, each handing out the store while it is open.
struct StoreTicks {
    inner: std::sync::Weak<Inner>,
    tick: tokio::time::Interval,
}

impl StoreTicks {
    async fn new(inner: std::sync::Weak<Inner>, every: Duration) -> Self {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is at once
        StoreTicks { inner, tick }
    }

    /// The store at the next tick; `None` once every handle of it is gone or it was closed.
    async fn next(&mut self) -> Option<Arc<Inner>> {
        self.tick.tick().await;
        let inner = self.inner.upgrade()?;
        (!inner.writer.is_closed() && !inner.reader.is_closed()).then_some(inner)
    }
}

/// Checkpoints the write-ahead log every `every` from a reader connection while the store is
/// open (see [`SqliteStoreBuilder::checkpoint_interval`]). A `PASSIVE` checkpoint copies what
/// no reader still needs and waits for nobody; one with nothing to copy costs a look at the
/// log's header.
async fn checkpoints_every(inner: std::sync::Weak<Inner>, every: Duration) {
    let mut ticks = StoreTicks::new(inner, every).await;
    while let Some(inner) = ticks.next().await {
        match sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&inner.reader)
            .await
        {
            Ok(_) => {}
            Err(sqlx::Error::PoolClosed) => return,
            // Transient (the disk, a lock held by another process's checkpoint): the next
            // tick tries again, and the writer's backstop bounds the log meanwhile.
            Err(err) => tracing::debug!(%err, "dray: WAL checkpoint failed; retrying"),
        }
    }
}

/// Wakes the handle's waiting receivers when another connection has committed to the file (see
/// [`SqliteStoreBuilder::watch_interval`]): every `every` while a receiver waits, until every
/// handle of the store is gone. `seen` is the writer's `data_version` when the watch began.
///
/// A look first compares the write-ahead log's length and modification time with the last
/// look's, a `stat` of a few microseconds: every commit, this process's or another's, appends
/// to the log. Only when those changed does it ask the writer connection whether the commit
/// was another connection's (a round trip to the connection's thread, ~0.2 ms of CPU on the
/// test machine: asked every 10 ms, an idle receiver spent 2 % of a core on it; with the
/// `stat` first and every 20 ms, ~0.3 %, most of it the timer's wake-ups).
async fn watch_commits(
    inner: std::sync::Weak<Inner>,
    every: Duration,
    log: std::path::PathBuf,
    mut seen: i64,
) {
    let stamp = || {
        std::fs::metadata(&log)
            .ok()
            .map(|m| (m.len(), m.modified().ok()))
    };
    let mut last = stamp();
    let mut ticks = StoreTicks::new(inner, every).await;
    while let Some(inner) = ticks.next().await {
        // With nobody waiting nobody needs waking; a commit meanwhile shows at the next look
        // (then one wake-up more than needed at worst, never one fewer).
        if !inner.hub.any_waiting() {
            continue;
        }
        let now = stamp();
        if now == last && now.is_some() {
            continue;
        }
        last = now;
        match data_version(&inner.writer).await {
            Ok(v) if v != seen => {
                seen = v;
                inner.hub.wake_all();
            }
            Ok(_) => {}
            Err(sqlx::Error::PoolClosed) => return,
            // Transient: receivers still poll, and the next tick looks again.
            Err(err) => tracing::debug!(%err, "dray: cannot look for other processes' commits"),
        }
    }
}

/// The connection's `PRAGMA data_version`: it changes whenever another connection has committed
/// to the file since the connection's last look.
async fn data_version(pool: &SqlitePool) -> std::result::Result<i64, sqlx::Error> {
    sqlx::query_scalar("PRAGMA data_version")
        .fetch_one(pool)
        .await
}

/// Rows sqlx may buffer between SQLite's thread and the caller: the largest claim (1,000 by
/// default at most) and completion (2,000) pass without the thread ever waiting.
const ROW_CHANNEL: usize = 2048;

/// The SQLite store. Cheap to clone; clones share the connections and the wake-up hub.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    writer: SqlitePool,
    reader: SqlitePool,
    hub: WakeHub,
    poll_interval: Duration,
    /// How often to look for other connections' commits while a receiver waits, and the
    /// file's write-ahead log (`None`: not at all; an in-memory database has no other
    /// connection).
    watch: Option<(Duration, std::path::PathBuf)>,
    /// Set once the look-out ([`watch_commits`]) has started (on the first `listen`).
    watching: tokio::sync::OnceCell<()>,
    /// Where this handle's next expired-lease sweep starts.
    sweep: SweepCursor<SweepKey>,
    /// Where the next claim of each queue starts (`dray_core::claim`).
    cursors: ClaimCursors,
    /// Rowids of the rows this handle claimed, for their completion.
    rows: RowHints,
}

pub use dray_core::batch::SWEEP_WINDOW;

/// A position in `dray_jobs_unfinished_idx`: (queue, rank = −priority, run_at ms, id).
type SweepKey = (String, i64, i64, Uuid);

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Settings for a store at `url` (`sqlite://path/to/file.db`, or a bare path).
    pub fn builder(url: impl Into<String>) -> SqliteStoreBuilder {
        SqliteStoreBuilder {
            url: url.into(),
            schema_mode: SchemaMode::Migrate,
            poll_interval: DEFAULT_POLL_INTERVAL,
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            acquire_timeout: dray_core::error::POOL_ACQUIRE_TIMEOUT,
            readers: DEFAULT_READERS,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            watch_interval: DEFAULT_WATCH_INTERVAL,
            create: true,
        }
    }

    /// Opens `url`, creating the file and applying migrations as needed.
    pub async fn open(url: &str) -> Result<SqliteStore> {
        Self::builder(url).open().await
    }

    /// The writer connection's pool: begin a transaction here to enqueue inside your own
    /// writes ([`dray_core::Client::enqueue_in`]).
    ///
    /// Everything this handle writes (enqueues, claims, completions, the worker's too) goes
    /// through this one writer connection, so a transaction begun on it holds all of them
    /// until it commits or rolls back: keep such transactions short. A write that cannot get
    /// the connection within [`SqliteStoreBuilder::acquire_timeout`] (30 s by default) fails
    /// with [`Error::PoolExhausted`] rather than waiting on.
    pub fn pool(&self) -> &SqlitePool {
        &self.inner.writer
    }

    /// The database clock's `now()`, which leases and due times use ([`Store::now`], here
    /// without the trait in scope).
    pub async fn now(&self) -> Result<DateTime<Utc>> {
        <Self as Store>::now(self).await
    }

    /// The URL this store was opened with (`sqlite://…`); open it again for another handle.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// Closes both pools.
    pub async fn close(&self) {
        self.inner.writer.close().await;
        self.inner.reader.close().await;
    }

    async fn insert(
        &self,
        conn: &mut SqliteConnection,
        messages: &[NewMessage],
    ) -> Result<Vec<Enqueued>> {
        let op = "message_insert_many";
        if messages.len() > 1 && dray_core::batch::uniform(messages) {
            let m = &messages[0];
            let (delay_ms, not_before) = due(m);
            let rows: Vec<serde_json::Value> = messages
                .iter()
                .map(|m| serde_json::json!([m.id.simple().to_string(), m.payload]))
                .collect();
            q(&SQL.insert_uniform)
                .bind(serde_json::Value::Array(rows).to_string())
                .bind(m.queue.as_str().to_owned())
                .bind(m.kind.clone())
                .bind(m.headers.clone())
                .bind(m.priority.0)
                .bind(delay_ms)
                .bind(not_before)
                .bind(m.max_attempts)
                .bind(m.enqueued_at.map(|t| t.timestamp_millis()))
                .bind(m.callback_url.clone())
                .execute(&mut *conn)
                .await
                .map_err(Error::db(op))?;
            self.inner.cursors.rewind_for(messages);
            return Ok(messages
                .iter()
                .map(|m| Enqueued {
                    id: m.id,
                    duplicate: false,
                })
                .collect());
        }
        let batch = dedup_keys(messages);
        let mut sent: Vec<Option<Enqueued>> = vec![None; batch.send.len()];
        // Key-less rows cannot conflict: all of them in one statement.
        let mut rows = Vec::new();
        for (pos, &i) in batch.send.iter().enumerate() {
            let m = &messages[i];
            if m.key.is_some() {
                continue;
            }
            let (delay_ms, not_before) = due(m);
            rows.push(serde_json::json!([
                m.id.simple().to_string(),
                m.queue.as_str(),
                m.kind,
                m.payload,
                m.headers,
                m.priority.0,
                delay_ms,
                not_before,
                m.max_attempts,
                m.enqueued_at.map(|t| t.timestamp_millis()),
                m.callback_url,
            ]));
            sent[pos] = Some(Enqueued {
                id: m.id,
                duplicate: false,
            });
        }
        if !rows.is_empty() {
            q(&SQL.insert_many)
                .bind(serde_json::Value::Array(rows).to_string())
                .execute(&mut *conn)
                .await
                .map_err(Error::db(op))?;
        }
        // Keyed rows one by one: each needs its own "inserted or already there" answer.
        for (pos, &i) in batch.send.iter().enumerate() {
            let m = &messages[i];
            if m.key.is_none() {
                continue;
            }
            let row = insert_one(m)
                .fetch_optional(&mut *conn)
                .await
                .map_err(Error::db(op))?;
            sent[pos] = Some(match row {
                Some(_) => Enqueued {
                    id: m.id,
                    duplicate: false,
                },
                None => {
                    let id: Uuid = sqlx::query_scalar(SQL.find_key.as_str())
                        .bind(m.queue.as_str())
                        .bind(m.key.as_deref())
                        .fetch_one(&mut *conn)
                        .await
                        .map_err(Error::db(op))?;
                    Enqueued {
                        id,
                        duplicate: true,
                    }
                }
            });
        }
        let sent: Vec<Enqueued> = sent.into_iter().flatten().collect();
        // Rows that sort before a claim cursor: this handle's next claim of their queue starts
        // at the head.
        self.inner.cursors.rewind_for(messages);
        batch.spread(&sent)
    }

    /// Sets aside rows a claim leased but could not decode (see `sql::QUARANTINE`), and logs
    /// each.
    async fn quarantine(&self, bad: &[Unreadable]) -> Result<()> {
        dray_core::batch::log_unreadable("sqlite", "message_claim", bad);
        let items: Vec<serde_json::Value> = bad
            .iter()
            .filter_map(|b| {
                let id = b.id?.simple().to_string();
                Some(serde_json::json!([id, b.quarantine_message()]))
            })
            .collect();
        q(&SQL.quarantine)
            .bind(serde_json::Value::Array(items).to_string())
            .execute(&self.inner.writer)
            .await
            .map_err(Error::db("message_quarantine"))?;
        Ok(())
    }

    fn wake_new(&self, messages: &[NewMessage]) {
        for q in dray_core::batch::queues_to_wake(messages, self.inner.poll_interval) {
            self.inner.hub.wake(q);
        }
    }

    async fn lease_write(
        &self,
        op: &'static str,
        query: sqlx::query::Query<'static, Sqlite, sqlx::sqlite::SqliteArguments>,
        queue: &QueueName,
    ) -> Result<LeaseWrite> {
        let rows = query
            .fetch_all(&self.inner.writer)
            .await
            .map_err(Error::db(op))?;
        self.lease_rows(op, &rows, queue.as_str())
    }

    /// Reads what a fenced lease write returned (id, new state, cancel requested), and wakes
    /// receivers when something became available again.
    fn lease_rows(&self, op: &'static str, rows: &[SqliteRow], queue: &str) -> Result<LeaseWrite> {
        let mut out = LeaseWrite::default();
        for row in rows {
            let id: Uuid = row.try_get(0).map_err(Error::db(op))?;
            let state: String = row.try_get(1).map_err(Error::db(op))?;
            let cancel: bool = row.try_get(2).map_err(Error::db(op))?;
            match state.as_str() {
                "dead" => out.dead.push(id),
                "available" if !queue.is_empty() => {
                    // Released or requeued, possibly with its old due time: it may sort before
                    // the claim cursor.
                    self.inner.cursors.rewind(queue);
                    self.inner.hub.wake(queue);
                }
                _ => {}
            }
            if cancel {
                out.cancel_requested.push(id);
            }
            out.applied.push(id);
        }
        Ok(out)
    }
}

/// Encodes lease refs for the lease-write statements (see `sql::REFS`).
fn refs_json(refs: &[LeaseRef]) -> String {
    let items: Vec<String> = refs.iter().map(|r| lease_item(r, None)).collect();
    serde_json::to_string(&items).unwrap_or_default()
}

/// One lease item: the id's 32 hex digits, the attempt in decimal (empty for any), `|`, then
/// the completion's output as JSON text, if any.
fn lease_item(r: &LeaseRef, output: Option<&str>) -> String {
    let mut item = String::with_capacity(44 + output.map_or(0, str::len));
    item.push_str(r.id.simple().encode_lower(&mut Uuid::encode_buffer()));
    if let Some(attempt) = r.attempt {
        item.push_str(&attempt.to_string());
    }
    item.push('|');
    if let Some(output) = output {
        item.push_str(output);
    }
    item
}

fn ms_to_time(id: &Uuid, what: &str, ms: i64) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms).ok_or_else(|| Error::CorruptRow {
        id: id.to_string(),
        reason: format!("{what} {ms} is not a valid time"),
    })
}

/// The id of a returned row, when it reads.
fn row_id(row: &SqliteRow) -> Option<Uuid> {
    row.try_get(0).ok()
}

/// What a listing shows of a row (`{cols}`) that did not decode (see [`Salvaged`]): the
/// queue and state columns, and what the packed columns still give.
fn salvage(row: &SqliteRow, err: Error) -> Result<Message> {
    let id: Uuid = row.try_get(0).map_err(Error::db("decode"))?;
    let reason = Unreadable::new(0, Some(id), err).reason;
    let packed: Vec<serde_json::Value> = row
        .try_get::<&str, _>(2)
        .ok()
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or_default();
    let item = |i: usize| packed.get(i);
    Ok(Salvaged {
        queue: row.try_get(3).ok(),
        kind: item(0).and_then(|v| v.as_str()).map(str::to_owned),
        state: row
            .try_get::<String, _>(4)
            .ok()
            .and_then(|s| MessageState::parse(&s).ok()),
        attempt: item(4)
            .and_then(serde_json::Value::as_i64)
            .and_then(|a| i32::try_from(a).ok()),
        enqueued_at: item(6)
            .and_then(serde_json::Value::as_i64)
            .and_then(DateTime::from_timestamp_millis),
    }
    .into_message(id, reason))
}

/// Decodes a row read with every column (`{cols}`).
fn decode_message(row: &SqliteRow) -> Result<Message> {
    decode_row(row, |id| decode_tail(id, row))
}

/// Decodes a row the claim `p` just leased (`{claim_cols}`).
fn decode_claimed(row: &SqliteRow, p: &ClaimParams) -> Result<Message> {
    decode_row(row, |_| Ok(RowTail::claimed(p)))
}

fn corrupt(id: &Uuid, what: &str, err: impl std::fmt::Display) -> Error {
    Error::CorruptRow {
        id: id.to_string(),
        reason: format!("{what}: {err}"),
    }
}

/// Narrows integer `v` of row `id` to the type Dray stores in column `what`.
fn narrow<T: TryFrom<i64>>(id: &Uuid, what: &str, v: i64) -> Result<T> {
    T::try_from(v).map_err(|_| corrupt(id, what, format!("{v} is out of range")))
}

/// Reads a JSON text column; NULL reads as `None`.
fn json_column(
    row: &SqliteRow,
    i: usize,
    id: &Uuid,
    what: &str,
) -> Result<Option<serde_json::Value>> {
    let text: Option<&str> = row.try_get(i).map_err(|e| corrupt(id, what, e))?;
    json_text(text, id, what)
}

/// Parses JSON text of row `id`; `None` reads as `None`.
fn json_text(text: Option<&str>, id: &Uuid, what: &str) -> Result<Option<serde_json::Value>> {
    text.map(serde_json::from_str)
        .transpose()
        .map_err(|e| corrupt(id, what, format!("not JSON: {e}")))
}

/// Reads the columns after `sql::CLAIM_COLS` (see `RowTail`).
fn decode_tail(id: &Uuid, row: &SqliteRow) -> Result<RowTail> {
    const AT: usize = 3;
    let opt_time = |i: usize, what: &str| -> Result<Option<DateTime<Utc>>> {
        let v: Option<i64> = row.try_get(i).map_err(|e| corrupt(id, what, e))?;
        v.map(|ms| ms_to_time(id, what, ms)).transpose()
    };
    let state: String = row.try_get(AT + 1).map_err(|e| corrupt(id, "state", e))?;
    Ok(RowTail {
        queue: row.try_get(AT).map_err(|e| corrupt(id, "queue", e))?,
        state: decode_state(id, &state)?,
        leased_by: row
            .try_get(AT + 2)
            .map_err(|e| corrupt(id, "leased_by", e))?,
        finished_at: opt_time(AT + 3, "finished_at")?,
        result: json_column(row, AT + 4, id, "result")?,
        callback_attempts: row
            .try_get(AT + 5)
            .map_err(|e| corrupt(id, "callback_attempts", e))?,
        callback_delivered_at: opt_time(AT + 6, "callback_done_at")?,
        callback_error: row
            .try_get(AT + 7)
            .map_err(|e| corrupt(id, "callback_error", e))?,
    })
}

/// Gives the writer connection back to its pool, and lets the pool hand it on before this task
/// goes on (see [`yield_to_release`]).
async fn release(conn: sqlx::pool::PoolConnection<Sqlite>) {
    drop(conn);
    yield_to_release().await;
}

/// Lets the task that returns a dropped pool connection run before the dropping task goes on.
///
/// sqlx returns a connection from a task it spawns on drop (it pings the connection, then
/// wakes the next waiter). Tokio runs a task spawned from a worker next on that same worker,
/// where no other worker can take it, only once the running task yields: after a claim that
/// was the decoding of its rows, after a completion the worker's bookkeeping, and the one
/// writer connection sat unused for those 1–3 ms while the next claim or completion waited for
/// it (measured during W2 on SQLite: a third of the writer's time). Yielding here hands the
/// connection on in ~0.1 ms.
async fn yield_to_release() {
    tokio::task::yield_now().await;
}

/// The one-row insert of `m` (`sql::INSERT`): returns its id, or no row when its dedup key
/// matches an unfinished row.
fn insert_one(m: &NewMessage) -> sqlx::query::Query<'_, Sqlite, sqlx::sqlite::SqliteArguments> {
    let (delay_ms, not_before) = due(m);
    sqlx::query(SQL.insert.as_str())
        .bind(m.id)
        .bind(m.queue.as_str())
        .bind(m.kind.as_deref())
        .bind(m.key.as_deref())
        .bind(m.payload.as_str())
        .bind(m.headers.as_str())
        .bind(m.priority.0)
        .bind(delay_ms)
        .bind(not_before)
        .bind(m.max_attempts)
        .bind(m.enqueued_at.map(|t| t.timestamp_millis()))
        .bind(m.callback_url.as_deref())
}

/// Leases up to `p.limit` pending rows of `p.queue` that sort after `after` (`sql::CLAIM`).
async fn claim_after(
    conn: &mut SqliteConnection,
    p: &ClaimParams,
    after: ClaimKey,
) -> Result<Vec<SqliteRow>> {
    q(&SQL.claim)
        .bind(p.queue.as_str().to_owned())
        .bind(i64::from(p.limit))
        .bind(millis(p.lease).max(1))
        .bind(p.leased_by.clone())
        .bind(after.0)
        .bind(after.1.timestamp_millis())
        .bind(after.2)
        .fetch_all(conn)
        .await
        .map_err(Error::db("message_claim"))
}

/// The column of a claim's rows that holds the rowid (after `sql::CLAIM_COLS`); the row's
/// priority and due time follow it.
const CLAIM_ROWID: usize = 3;

/// Where a claimed row (`{claim_cols}`) sits in its queue's delivery order.
fn claimed_key(row: &SqliteRow) -> Result<ClaimKey> {
    let id: Uuid = row.try_get(0).map_err(Error::db("message_claim"))?;
    let priority: i64 = row
        .try_get(CLAIM_ROWID + 1)
        .map_err(|e| corrupt(&id, "priority", e))?;
    let priority: i16 = narrow(&id, "priority", priority)?;
    let run_at: i64 = row
        .try_get(CLAIM_ROWID + 2)
        .map_err(|e| corrupt(&id, "run_at", e))?;
    Ok((-i32::from(priority), ms_to_time(&id, "run_at", run_at)?, id))
}

/// What a packed item holds as Dray stores it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Item {
    Text,
    Integer,
}

/// The items of the JSON array in `sql::CLAIM_COLS`, in order: name, what it holds, and
/// whether it may be NULL.
const PACKED: [(&str, Item, bool); 14] = [
    ("kind", Item::Text, true),
    ("key", Item::Text, true),
    ("headers", Item::Text, true),
    ("priority", Item::Integer, false),
    ("attempt", Item::Integer, false),
    ("max_attempts", Item::Integer, false),
    ("enqueued_at", Item::Integer, false),
    ("run_at", Item::Integer, false),
    ("leased_until", Item::Integer, true),
    ("errors", Item::Text, true),
    ("progress", Item::Integer, true),
    ("progress_message", Item::Text, true),
    ("cancel_requested", Item::Integer, false),
    ("callback_url", Item::Text, true),
];

/// [`PACKED`], read: text items as strings, integer items as `i64`, NULL as `None`.
type Packed = (
    Option<String>,
    Option<String>,
    Option<String>,
    i64,
    i64,
    i64,
    i64,
    i64,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<String>,
    i64,
    Option<String>,
);

/// Reads the packed columns of row `id` (column 2 of `sql::CLAIM_COLS`).
fn read_packed(row: &SqliteRow, id: &Uuid) -> Result<Packed> {
    let text: &str = row.try_get(2).map_err(|e| corrupt(id, "columns", e))?;
    serde_json::from_str(text).map_err(|_| packed_error(id, text))
}

/// Why the packed columns of row `id` did not read, naming the first column that is not what
/// Dray stores there (or the array itself). The slow path of [`read_packed`], for errors only.
fn packed_error(id: &Uuid, text: &str) -> Error {
    let items = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Array(items)) if items.len() == PACKED.len() => items,
        _ => return corrupt(id, "columns", format!("unreadable: {text}")),
    };
    for (item, (name, holds, nullable)) in items.iter().zip(PACKED) {
        let fits = match item {
            serde_json::Value::Null => nullable,
            serde_json::Value::Number(n) => holds == Item::Integer && n.is_i64(),
            serde_json::Value::String(_) => holds == Item::Text,
            _ => false,
        };
        if !fits {
            let expected = match holds {
                Item::Integer => "an integer",
                Item::Text => "text",
            };
            return corrupt(id, name, format!("{item} is not {expected}"));
        }
    }
    corrupt(id, "columns", format!("unreadable: {text}"))
}

/// Decodes `sql::CLAIM_COLS`, and the rest from `tail`.
fn decode_row(row: &SqliteRow, tail: impl FnOnce(&Uuid) -> Result<RowTail>) -> Result<Message> {
    let id: Uuid = row.try_get(0).map_err(|e| Error::CorruptRow {
        id: String::new(),
        reason: format!("id: {e}"),
    })?;
    let tail = tail(&id)?;
    let (
        kind,
        key,
        headers,
        priority,
        attempt,
        max_attempts,
        enqueued_at,
        run_at,
        leased_until,
        errors,
        progress,
        progress_message,
        cancel_requested,
        callback_url,
    ) = read_packed(row, &id)?;
    // Empty headers and errors come back as NULL (see `sql::CLAIM_COLS`).
    let headers = match json_text(headers.as_deref(), &id, "headers")? {
        Some(h) => decode_headers(&id, h)?,
        None => Default::default(),
    };
    let errors = match json_text(errors.as_deref(), &id, "errors")? {
        Some(e) => decode_errors(&id, e)?,
        None => Vec::new(),
    };
    let (attempt, max_attempts) = decode_attempts(
        &id,
        narrow(&id, "attempt", attempt)?,
        narrow(&id, "max_attempts", max_attempts)?,
    )?;
    Ok(RowHead {
        kind,
        key,
        payload: json_column(row, 1, &id, "payload")?
            .ok_or_else(|| corrupt(&id, "payload", "NULL"))?,
        headers,
        priority: Priority(narrow(&id, "priority", priority)?),
        attempt,
        max_attempts,
        enqueued_at: ms_to_time(&id, "enqueued_at", enqueued_at)?,
        run_at: ms_to_time(&id, "run_at", run_at)?,
        leased_until: leased_until
            .map(|ms| ms_to_time(&id, "leased_until", ms))
            .transpose()?,
        errors,
        progress: decode_progress(&id, progress)?,
        progress_message,
        cancel_requested: cancel_requested != 0,
        callback_url,
        id,
    }
    .with(tail))
}

/// A new row's delay (ms, rounded up: a delay is a promise not to deliver early) and
/// not-before time (ms since the epoch), for the insert statements.
fn due(m: &NewMessage) -> (i64, Option<i64>) {
    match m.run_at {
        RunAt::Now => (0, None),
        RunAt::After(d) => (
            i64::try_from(d.min(MAX_SPAN).as_micros().div_ceil(1000)).unwrap_or(i64::MAX),
            None,
        ),
        RunAt::At(t) => (0, Some(t.timestamp_millis())),
    }
}

impl Store for SqliteStore {
    type Database = Sqlite;

    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn pool(&self) -> &SqlitePool {
        SqliteStore::pool(self)
    }

    fn wake(&self) -> &WakeHub {
        &self.inner.hub
    }

    fn poll_interval(&self) -> Duration {
        self.inner.poll_interval
    }

    async fn listen(&self) -> Result<()> {
        // The first receiver to wait starts the look-out for other processes' commits. Its
        // starting point is read here, before that receiver first looks at its queue, so a
        // commit between the two is seen as a change. Receivers that wait meanwhile wait for
        // this start too; when it fails, the next one to wait tries again.
        let Some((every, log)) = &self.inner.watch else {
            return Ok(());
        };
        self.inner
            .watching
            .get_or_try_init(|| async {
                let seen = data_version(&self.inner.writer)
                    .await
                    .map_err(Error::db("listen"))?;
                let inner = Arc::downgrade(&self.inner);
                tokio::spawn(watch_commits(inner, *every, log.clone(), seen));
                Ok::<(), Error>(())
            })
            .await?;
        Ok(())
    }

    async fn migrate(&self) -> Result<MigrationReport> {
        let op = "migrate";
        // BEGIN IMMEDIATE takes the write lock up front: two processes migrating at once run
        // one after the other, and the second finds nothing to do.
        let mut tx = self
            .inner
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(Error::db(op))?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS dray_schema_version (
                 version    INTEGER PRIMARY KEY,
                 name       TEXT NOT NULL,
                 applied_at INTEGER NOT NULL)",
        )
        .execute(&mut *tx)
        .await
        .map_err(Error::db(op))?;
        let found: i64 =
            sqlx::query_scalar("SELECT COALESCE(max(version), 0) FROM dray_schema_version")
                .fetch_one(&mut *tx)
                .await
                .map_err(Error::db(op))?;
        let pending = migrate::pending(MIGRATIONS, found)?;
        let mut report = MigrationReport {
            from: found,
            to: found,
            applied: Vec::new(),
        };
        for m in pending {
            sqlx::raw_sql(AssertSqlSafe(m.sql))
                .execute(&mut *tx)
                .await
                .map_err(Error::db(op))?;
            sqlx::query(
                "INSERT INTO dray_schema_version (version, name, applied_at)
                 VALUES (?1, ?2, CAST(unixepoch('subsec') * 1000 AS INTEGER))",
            )
            .bind(m.version)
            .bind(m.name)
            .execute(&mut *tx)
            .await
            .map_err(Error::db(op))?;
            report.applied.push(m.version);
            report.to = m.version;
        }
        tx.commit().await.map_err(Error::db(op))?;
        Ok(report)
    }

    async fn schema_version(&self) -> Result<i64> {
        let op = "schema_version";
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'dray_schema_version')",
        )
        .fetch_one(&self.inner.reader)
        .await
        .map_err(Error::db(op))?;
        if !exists {
            return Ok(0);
        }
        sqlx::query_scalar("SELECT COALESCE(max(version), 0) FROM dray_schema_version")
            .fetch_one(&self.inner.reader)
            .await
            .map_err(Error::db(op))
    }

    async fn now(&self) -> Result<DateTime<Utc>> {
        let ms: i64 = sqlx::query_scalar(SQL.now.as_str())
            .fetch_one(&self.inner.reader)
            .await
            .map_err(Error::db("now"))?;
        ms_to_time(&Uuid::nil(), "now", ms)
    }

    async fn message_insert_many(&self, messages: &[NewMessage]) -> Result<Vec<Enqueued>> {
        let op = "message_insert_many";
        if let [m] = messages
            && m.key.is_none()
        {
            // One row that cannot conflict: one statement, atomic by itself, instead of a
            // transaction around a one-element batch (three round trips to SQLite's thread and
            // a JSON array parsed for one row).
            insert_one(m)
                .execute(&self.inner.writer)
                .await
                .map_err(Error::db(op))?;
            self.inner.cursors.rewind_for(messages);
            self.wake_new(messages);
            return Ok(vec![Enqueued {
                id: m.id,
                duplicate: false,
            }]);
        }
        let mut tx = self
            .inner
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(Error::db(op))?;
        let out = self.insert(&mut tx, messages).await?;
        tx.commit().await.map_err(Error::db(op))?;
        self.wake_new(messages);
        Ok(out)
    }

    async fn message_insert_leased(&self, m: &NewMessage, params: &ClaimParams) -> Result<Message> {
        let (enqueued_at, run_at, leased_until): (i64, i64, i64) = q(&SQL.insert_leased)
            .bind(m.id)
            .bind(m.queue.as_str().to_owned())
            .bind(m.kind.clone())
            .bind(m.payload.clone())
            .bind(m.headers.clone())
            .bind(m.priority.0)
            .bind(m.max_attempts)
            .bind(m.enqueued_at.map(|t| t.timestamp_millis()))
            .bind(millis(params.lease).max(1))
            .bind(params.leased_by.clone())
            .bind(m.callback_url.clone())
            .try_map(|r: SqliteRow| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .fetch_one(&self.inner.writer)
            .await
            .map_err(Error::db("message_insert_leased"))?;
        dray_core::batch::leased_insert(
            m,
            params,
            ms_to_time(&m.id, "enqueued_at", enqueued_at)?,
            ms_to_time(&m.id, "run_at", run_at)?,
            ms_to_time(&m.id, "leased_until", leased_until)?,
        )
    }

    async fn message_insert_many_in(
        &self,
        conn: &mut SqliteConnection,
        messages: &[NewMessage],
    ) -> Result<Vec<Enqueued>> {
        // The caller commits; receivers see the rows at their next poll.
        self.insert(conn, messages).await
    }

    async fn message_claim(&self, p: &ClaimParams) -> Result<Vec<Message>> {
        let op = "message_claim";
        // Held until the cursor has moved past what this claim took (see `ClaimCursors::begin`).
        let mut conn = self.inner.writer.acquire().await.map_err(Error::db(op))?;
        let (mut round, after) = self.inner.cursors.begin(p.queue.as_str());
        let mut rows = claim_after(&mut conn, p, after).await?;
        if rows.is_empty()
            && let Some(head) = round.retry()
        {
            rows = claim_after(&mut conn, p, head).await?;
        }
        round.finish(p.limit, &rows, |r| claimed_key(r).ok());
        // The cursor has moved: the next claim may have the connection while these decode.
        release(conn).await;
        // One row that does not decode costs only itself: the others are handed out, it is
        // quarantined.
        let (claimed, bad) = claimed_in_order(&rows, |r| decode_claimed(r, p), row_id);
        let rowids = rows
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(CLAIM_ROWID)?)))
            .collect::<std::result::Result<Vec<(Uuid, i64)>, sqlx::Error>>()
            .map_err(Error::db(op))?;
        self.inner.rows.remember(rowids);
        if !bad.is_empty() {
            self.quarantine(&bad).await?;
        }
        Ok(claimed)
    }

    async fn message_ack_many(&self, queue: &QueueName, refs: &[LeaseRef]) -> Result<LeaseWrite> {
        if refs.is_empty() {
            return Ok(LeaseWrite::default());
        }
        self.inner.rows.forget(refs.iter().map(|r| r.id));
        let query = q(&SQL.ack)
            .bind(queue.as_str().to_owned())
            .bind(refs_json(refs));
        self.lease_write("message_ack_many", query, queue).await
    }

    async fn message_nack_many(
        &self,
        queue: &QueueName,
        refs: &[LeaseRef],
        action: NackAction,
    ) -> Result<LeaseWrite> {
        if refs.is_empty() {
            return Ok(LeaseWrite::default());
        }
        self.inner.rows.forget(refs.iter().map(|r| r.id));
        let query = q(&SQL.nack)
            .bind(queue.as_str().to_owned())
            .bind(refs_json(refs))
            .bind(action.mode())
            .bind(millis(action.delay()));
        self.lease_write("message_nack_many", query, queue).await
    }

    async fn message_extend_many(
        &self,
        queue: &QueueName,
        refs: &[LeaseRef],
        lease: Duration,
    ) -> Result<LeaseWrite> {
        if refs.is_empty() {
            return Ok(LeaseWrite::default());
        }
        let query = q(&SQL.extend)
            .bind(queue.as_str().to_owned())
            .bind(refs_json(refs))
            .bind(millis(lease).max(1));
        self.lease_write("message_extend_many", query, queue).await
    }

    async fn message_rescue_expired(&self, queue: Option<&QueueName>) -> Result<RescueReport> {
        let op = "message_rescue_expired";
        let mut expired: Vec<String> = Vec::new();
        let mut sweep = self.inner.sweep.begin();
        loop {
            let (from, limit) = sweep.window();
            let (q_, rank, run_at, id) =
                from.unwrap_or_else(|| (String::new(), i64::MIN, i64::MIN, Uuid::nil()));
            let row = q(&SQL.sweep_window)
                .bind(q_)
                .bind(rank)
                .bind(run_at)
                .bind(id)
                .bind(limit)
                .bind(queue.map(|q| q.as_str().to_owned()))
                .fetch_one(&self.inner.reader)
                .await
                .map_err(Error::db(op))?;
            let seen: i64 = row.try_get(0).map_err(Error::db(op))?;
            let ids: String = row.try_get(1).map_err(Error::db(op))?;
            if ids != "[]" {
                expired.push(ids);
            }
            let last = match row.try_get::<Option<String>, _>(2).map_err(Error::db(op))? {
                Some(q_) => Some((
                    q_,
                    row.try_get(3).map_err(Error::db(op))?,
                    row.try_get(4).map_err(Error::db(op))?,
                    row.try_get(5).map_err(Error::db(op))?,
                )),
                None => None,
            };
            if !sweep.advance(seen, last) {
                break;
            }
        }
        self.inner.sweep.finish(sweep);
        let mut report = RescueReport::default();
        for ids in expired {
            let rows = q(&SQL.rescue)
                .bind(ids)
                .fetch_all(&self.inner.writer)
                .await
                .map_err(Error::db(op))?;
            for row in rows {
                let q: String = row.try_get(0).map_err(Error::db(op))?;
                let state: String = row.try_get(1).map_err(Error::db(op))?;
                if state == MessageState::Dead.as_str() {
                    report.dead += 1;
                } else {
                    report.requeued += 1;
                    // Requeued with its old due time: it sorts before this handle's cursor.
                    self.inner.cursors.rewind(&q);
                    self.inner.hub.wake(&q);
                }
            }
        }
        Ok(report)
    }

    async fn message_get(&self, id: Uuid) -> Result<Option<Message>> {
        let row = q(&SQL.get)
            .bind(id)
            .fetch_optional(&self.inner.reader)
            .await
            .map_err(Error::db("message_get"))?;
        row.as_ref().map(decode_message).transpose()
    }

    async fn queue_stats(&self, queue: &QueueName) -> Result<QueueStats> {
        let row = q(&SQL.stats)
            .bind(queue.as_str().to_owned())
            .fetch_one(&self.inner.reader)
            .await
            .map_err(Error::db("queue_stats"))?;
        let g = |i: usize| -> Result<i64> { row.try_get(i).map_err(Error::db("queue_stats")) };
        Ok(QueueStats {
            available: g(0)?,
            scheduled: g(1)?,
            leased: g(2)?,
            completed: g(3)?,
            dead: g(4)?,
            cancelled: g(5)?,
        })
    }

    async fn queue_gauges(&self) -> Result<Vec<QueueGauge>> {
        let rows = q(&SQL.gauges)
            .fetch_all(&self.inner.reader)
            .await
            .map_err(Error::db("queue_gauges"))?;
        rows.iter()
            .map(|row| decode_gauge(row, Duration::from_millis))
            .collect()
    }

    async fn queue_next_due(&self, queue: &QueueName) -> Result<Option<Duration>> {
        let ms: Option<i64> = sqlx::query_scalar(SQL.next_due.as_str())
            .bind(queue.as_str().to_owned())
            .fetch_one(&self.inner.reader)
            .await
            .map_err(Error::db("queue_next_due"))?;
        Ok(ms.map(|ms| Duration::from_millis(ms.max(0) as u64)))
    }

    async fn job_complete_many(&self, done: &[Completion]) -> Result<LeaseWrite> {
        if done.is_empty() {
            return Ok(LeaseWrite::default());
        }
        let op = "job_complete_many";
        let items = || -> Result<String> {
            let items: Vec<String> = done
                .iter()
                .map(|c| lease_item(&c.lease, c.result.as_deref()))
                .collect();
            Ok(serde_json::to_string(&items)?)
        };
        // Nearly always every lease is still held: then one UPDATE without RETURNING, checked
        // by its count, spares SQLite's thread a row handed over per job. Otherwise it is
        // rolled back and run again naming what it applied. A batch with one attempt number
        // and no outputs (the usual one) sends its ids alone, with where the claim left each
        // row when this handle claimed them all (see `hints`).
        let uniform = dray_core::batch::uniform_completions(done);
        let rowids = self.inner.rows.take_all(done.iter().map(|c| c.lease.id));
        let mut tx = self.inner.writer.begin().await.map_err(Error::db(op))?;
        let quiet = if let Some(attempt) = uniform {
            let mut hex = Uuid::encode_buffer();
            let (statement, items): (&str, Vec<String>) = match rowids {
                Some(rowids) => (
                    SQL.complete_uniform_rows.as_str(),
                    done.iter()
                        .zip(rowids)
                        .map(|(c, rowid)| {
                            let mut item = String::with_capacity(52);
                            item.push_str(c.lease.id.simple().encode_lower(&mut hex));
                            let _ = write!(item, "{rowid}"); // a String takes any write
                            item
                        })
                        .collect(),
                ),
                None => (
                    SQL.complete_uniform.as_str(),
                    done.iter()
                        .map(|c| c.lease.id.simple().encode_lower(&mut hex).to_owned())
                        .collect(),
                ),
            };
            sqlx::query(statement)
                .bind(serde_json::to_string(&items)?)
                .bind(attempt)
        } else {
            sqlx::query(SQL.complete_quiet.as_str()).bind(items()?)
        };
        let changed = quiet
            .execute(&mut *tx)
            .await
            .map_err(Error::db(op))?
            .rows_affected();
        if changed == done.len() as u64 {
            tx.commit().await.map_err(Error::db(op))?;
            yield_to_release().await;
            return Ok(LeaseWrite {
                applied: done.iter().map(|c| c.lease.id).collect(),
                ..LeaseWrite::default()
            });
        }
        tx.rollback().await.map_err(Error::db(op))?;
        let rows = q(&SQL.complete)
            .bind(items()?)
            .fetch_all(&self.inner.writer)
            .await
            .map_err(Error::db(op))?;
        let mut out = self.lease_rows(op, &rows, "")?;
        out.cancel_requested.clear(); // nothing left to cancel (see `Store::job_complete_many`)
        Ok(out)
    }

    async fn job_fail(
        &self,
        lease: LeaseRef,
        kind: FailureKind,
        message: &str,
        to: FailTo,
    ) -> Result<LeaseWrite> {
        let op = "job_fail";
        self.inner.rows.forget([lease.id]);
        let (to, delay) = fail_to_parts(to);
        let delay = millis(delay);
        let rows = q(&SQL.fail)
            .bind(lease.id)
            .bind(lease.attempt)
            .bind(kind.as_str())
            .bind(message.to_owned())
            .bind(to)
            .bind(delay)
            .fetch_all(&self.inner.writer)
            .await
            .map_err(Error::db(op))?;
        self.lease_rows(op, &rows, "")
    }

    async fn job_progress(
        &self,
        lease: LeaseRef,
        percent: u8,
        message: Option<&str>,
    ) -> Result<LeaseWrite> {
        let op = "job_progress";
        let rows = q(&SQL.progress)
            .bind(lease.id)
            .bind(lease.attempt)
            .bind(i64::from(percent.min(100)))
            .bind(message.map(str::to_owned))
            .fetch_all(&self.inner.writer)
            .await
            .map_err(Error::db(op))?;
        self.lease_rows(op, &rows, "")
    }

    async fn job_cancel(&self, id: Uuid) -> Result<Option<CancelOutcome>> {
        let op = "job_cancel";
        let mut tx = self
            .inner
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(Error::db(op))?;
        let before: Option<String> = sqlx::query_scalar(SQL.state_of.as_str())
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(Error::db(op))?;
        let Some(before) = before else {
            return Ok(None);
        };
        let before = decode_state(&id, &before)?;
        q(&SQL.cancel)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(Error::db(op))?;
        tx.commit().await.map_err(Error::db(op))?;
        Ok(Some(cancel_outcome(before)))
    }

    async fn job_redrive(&self, id: Uuid) -> Result<Option<Message>> {
        let op = "job_redrive";
        let row = q(&SQL.redrive)
            .bind(id)
            .fetch_optional(&self.inner.writer)
            .await
            .map_err(|e| match e.as_database_error() {
                Some(d) if d.is_unique_violation() => redrive_key_taken(id),
                _ => Error::db(op)(e),
            })?;
        match row {
            Some(row) => {
                let m = decode_message(&row)?;
                self.inner.hub.wake(&m.queue);
                Ok(Some(m))
            }
            None => match self.message_get(id).await? {
                None => Ok(None),
                Some(m) => Err(redrive_refused(id, m.state)),
            },
        }
    }

    async fn job_list(&self, f: &JobFilter) -> Result<Vec<Message>> {
        let limit = list_limit(f.limit);
        let rows = q(&SQL.list)
            .bind(f.queue.as_ref().map(|q| q.as_str().to_owned()))
            .bind(f.kind.clone())
            .bind(f.state.map(|s| s.as_str()))
            .bind(f.before)
            .bind(i64::from(limit))
            .fetch_all(&self.inner.reader)
            .await
            .map_err(Error::db("job_list"))?;
        // A row that does not decode is listed as what could be read of it, never hiding the rest.
        rows.iter()
            .map(|r| decode_message(r).or_else(|e| salvage(r, e)))
            .collect()
    }

    async fn job_prune(&self, older_than: Duration, limit: u32) -> Result<u64> {
        let r = q(&SQL.prune)
            .bind(millis(older_than))
            .bind(i64::from(limit))
            .execute(&self.inner.writer)
            .await
            .map_err(Error::db("job_prune"))?;
        Ok(r.rows_affected())
    }

    async fn leader_acquire(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool> {
        let row = q(&SQL.leader_acquire)
            .bind(name.to_owned())
            .bind(holder.to_owned())
            .bind(millis(ttl))
            .fetch_optional(&self.inner.writer)
            .await
            .map_err(Error::db("leader_acquire"))?;
        Ok(row.is_some())
    }

    async fn leader_release(&self, name: &str, holder: &str) -> Result<()> {
        q(&SQL.leader_release)
            .bind(name.to_owned())
            .bind(holder.to_owned())
            .execute(&self.inner.writer)
            .await
            .map_err(Error::db("leader_release"))?;
        Ok(())
    }

    async fn callback_claim(&self, limit: u32, lease: Duration) -> Result<Vec<Message>> {
        let rows = q(&SQL.callback_claim)
            .bind(i64::from(limit))
            .bind(millis(lease))
            .fetch_all(&self.inner.writer)
            .await
            .map_err(Error::db("callback_claim"))?;
        let (out, bad) = dray_core::batch::decode_each(&rows, decode_message, row_id);
        // Their tries are recorded as failed and tried again after a long pause (the rows may
        // be fixed meanwhile); the other deliveries go on.
        dray_core::batch::settle_unreadable_callbacks(self, &bad, |i| {
            rows[i].try_get::<i32, _>(8).ok()
        })
        .await?;
        Ok(out)
    }

    async fn callback_settle(
        &self,
        id: Uuid,
        attempt: i32,
        outcome: &CallbackSettle,
    ) -> Result<bool> {
        let (delivered, after, error) = settle_parts(outcome);
        let after = millis(after);
        let r = q(&SQL.callback_settle)
            .bind(id)
            .bind(attempt)
            .bind(delivered)
            .bind(after)
            .bind(error)
            .execute(&self.inner.writer)
            .await
            .map_err(Error::db("callback_settle"))?;
        Ok(r.rows_affected() == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plans SQLite picks for the statements whose speed rests on one: a completion by
    /// rowid finds each row in the table directly, never through the primary key's index.
    #[tokio::test]
    async fn completion_by_rowid_seeks_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("p.db").to_str().unwrap())
            .await
            .unwrap();
        let rows = sqlx::query(AssertSqlSafe(format!(
            "EXPLAIN QUERY PLAN {}",
            SQL.complete_uniform_rows
        )))
        .bind("[]")
        .bind(1)
        .fetch_all(store.pool())
        .await
        .unwrap();
        let plan: Vec<String> = rows.iter().map(|r| r.get::<String, _>(3)).collect();
        assert!(
            plan.iter()
                .any(|p| p.contains("dray_jobs USING INTEGER PRIMARY KEY (rowid=?)")),
            "{plan:?}"
        );
        assert!(!plan.iter().any(|p| p.contains("autoindex")), "{plan:?}");
    }
}
