//! Dray's PostgreSQL store: the scale-out store. Any number of processes on any number of
//! machines share one database; claims use `FOR UPDATE SKIP LOCKED`, wake-ups use
//! LISTEN/NOTIFY, and all time comes from the database clock.
//!
//! ```no_run
//! # async fn f() -> dray_core::Result<()> {
//! use dray_postgres::PgStore;
//! let store = PgStore::builder("postgres://postgres@127.0.0.1/postgres")
//!     .schema("dray")
//!     .migrate(true)
//!     .connect()
//!     .await?;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

mod api;
mod crons;
mod outbox;
mod sql;
mod workflow;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dray_core::batch::{
    RowHead, RowTail, Salvaged, SweepCursor, Unreadable, cancel_outcome, claimed_in_order,
    decode_attempts, decode_errors, decode_gauge, decode_headers, decode_progress, decode_state,
    dedup_keys, fail_to_parts, list_limit, micros, queues_to_wake, redrive_key_taken,
    redrive_refused, settle_parts,
};
use dray_core::changes;
use dray_core::claim::{ClaimCursors, ClaimKey, HEAD, claim_key};
use dray_core::migrate::{self, Migration, SchemaMode};
use dray_core::{
    CallbackSettle, CancelOutcome, ClaimParams, Completion, Enqueued, Error, FailTo, FailureKind,
    JobFilter, LeaseRef, LeaseWrite, Message, MessageState, MigrationReport, NackAction,
    NewMessage, Priority, QueueGauge, QueueName, QueueStats, RebuiltIndex, RescueReport, Result,
    RunAt, Store, WakeHub,
};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Postgres, Row};
use uuid::Uuid;

use crate::sql::Sql;

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
        name: "claim_cursor",
        sql: include_str!("../migrations/0004_claim_cursor.sql"),
    },
    Migration {
        version: 5,
        name: "hot_claims",
        sql: include_str!("../migrations/0005_hot_claims.sql"),
    },
    Migration {
        version: 6,
        name: "client_notify",
        sql: include_str!("../migrations/0006_client_notify.sql"),
    },
    Migration {
        version: 7,
        name: "lean_checks",
        sql: include_str!("../migrations/0007_lean_checks.sql"),
    },
    Migration {
        version: 8,
        name: "claim_room",
        sql: include_str!("../migrations/0008_claim_room.sql"),
    },
    Migration {
        version: 9,
        name: "history",
        sql: include_str!("../migrations/0009_history.sql"),
    },
    Migration {
        version: 10,
        name: "workflows",
        sql: include_str!("../migrations/0010_workflows.sql"),
    },
    Migration {
        version: 11,
        name: "crons",
        sql: include_str!("../migrations/0011_crons.sql"),
    },
    Migration {
        version: 12,
        name: "outbox",
        sql: include_str!("../migrations/0012_outbox.sql"),
    },
    Migration {
        version: 13,
        name: "api",
        sql: include_str!("../migrations/0013_api.sql"),
    },
    Migration {
        version: 14,
        name: "outbox_headers",
        sql: include_str!("../migrations/0014_outbox_headers.sql"),
    },
];

/// The span of one partition of the history of finished jobs (schema version 9): a partition
/// is dropped once all of its hour is past the retention, so a finished job is kept for at
/// least the retention and at most an hour more. A retention shorter than this is kept by
/// deleting rows one by one instead.
pub const HISTORY_PARTITION: Duration = Duration::from_secs(3600);

/// How often a handle makes the history's coming partitions: they are made three hours
/// ahead, so every few minutes is ample, and a prune round (every maintenance interval) need
/// not ask each time.
const HISTORY_PREPARE_EVERY: Duration = Duration::from_secs(600);

/// Default schema for Dray's tables.
pub const DEFAULT_SCHEMA: &str = "dray";
/// Default pool size.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10;
/// Default of [`PgStoreBuilder::listen_check_interval`].
pub const DEFAULT_LISTEN_CHECK: Duration = Duration::from_secs(30);
/// Default fallback poll interval of waiting receivers (LISTEN/NOTIFY wakes them sooner).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Settings for opening a [`PgStore`].
#[derive(Clone, Debug)]
pub struct PgStoreBuilder {
    url: String,
    schema: String,
    max_connections: u32,
    schema_mode: SchemaMode,
    poll_interval: Duration,
    application_name: Option<String>,
    synchronous_worker_commits: bool,
    acquire_timeout: Duration,
    listen_check: Duration,
}

impl PgStoreBuilder {
    /// Whether worker-side transitions (claim, complete, fail, progress, heartbeat, rescue,
    /// leadership, callback bookkeeping) wait for their commit to reach disk. Default `false`:
    /// they commit with `synchronous_commit = off`, which saves an fsync wait per statement.
    /// That is safe under Dray's at-least-once promise: if PostgreSQL itself crashes and loses
    /// the last few of those commits, the jobs concerned are simply delivered again. Enqueues,
    /// cancels and re-drives are always synchronous. Set `true` to make every commit wait.
    pub fn synchronous_worker_commits(mut self, yes: bool) -> Self {
        self.synchronous_worker_commits = yes;
        self
    }
    /// Schema holding Dray's tables ([`DEFAULT_SCHEMA`]): lowercase letters, digits and `_`,
    /// starting with a letter or `_`, at most 63 bytes.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }
    /// Pool size ([`DEFAULT_MAX_CONNECTIONS`]); the LISTEN connection is extra.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n;
        self
    }
    /// `true`: apply pending migrations on connect. `false` (the default): refuse to open a
    /// schema that is not exactly this build's ([`SchemaMode::Check`]).
    pub fn migrate(mut self, yes: bool) -> Self {
        self.schema_mode = if yes {
            SchemaMode::Migrate
        } else {
            SchemaMode::Check
        };
        self
    }
    /// What to do about the schema on connect.
    pub fn schema_mode(mut self, mode: SchemaMode) -> Self {
        self.schema_mode = mode;
        self
    }
    /// Fallback poll interval of waiting receivers ([`DEFAULT_POLL_INTERVAL`]; 1 ms to 100
    /// years, checked by [`connect`](Self::connect)).
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.poll_interval = d;
        self
    }
    /// How long an operation waits for a free pooled connection before it fails with
    /// [`Error::PoolExhausted`] ([`dray_core::error::POOL_ACQUIRE_TIMEOUT`]; 1 ms to 100
    /// years, checked by [`connect`](Self::connect)).
    pub fn acquire_timeout(mut self, d: Duration) -> Self {
        self.acquire_timeout = d;
        self
    }
    /// How long the LISTEN connection may stay silent before it is pinged
    /// ([`DEFAULT_LISTEN_CHECK`]; 1 ms to 100 years). One that does not answer the ping within
    /// the same span (at most 10 s) is taken for dead (a half-open connection: a NAT or
    /// firewall that forgot it, a server that vanished without a FIN) and replaced; meanwhile
    /// waiting receivers fall back to polling.
    pub fn listen_check_interval(mut self, d: Duration) -> Self {
        self.listen_check = d;
        self
    }
    /// `application_name` of the store's connections (shown in `pg_stat_activity`); the LISTEN
    /// connection gets the same name with `:listen` appended.
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = Some(name.into());
        self
    }

    /// Connects (one connection is opened at once, so a bad URL or an unreachable server fails
    /// here), then handles the schema as configured.
    pub async fn connect(self) -> Result<PgStore> {
        validate_schema(&self.schema)?;
        if self.max_connections == 0 {
            return Err(Error::invalid("max_connections", "must be at least 1"));
        }
        for (what, d) in [
            ("poll_interval", self.poll_interval),
            ("acquire_timeout", self.acquire_timeout),
            ("listen_check_interval", self.listen_check),
        ] {
            dray_core::duration::check_span(what, d, Duration::from_millis(1))?;
        }
        let mut options = PgConnectOptions::from_str(&self.url).map_err(|e| Error::InvalidUrl {
            url: redact(&self.url),
            reason: e.to_string(),
        })?;
        let app = self
            .application_name
            .clone()
            .unwrap_or_else(|| format!("dray:{}", self.schema));
        options = options.application_name(&app);
        // One direct connection first: the pool would retry a refused connection until its
        // acquire timeout, and a wrong URL should fail now, with the driver's reason.
        let first = sqlx::ConnectOptions::connect(&options)
            .await
            .map_err(|source| Error::Connect { source })?;
        let pool_options = |n| pool_options(n, self.acquire_timeout);
        let pool = pool_options(self.max_connections).connect_lazy_with(options.clone());
        drop(first);
        // Worker-side transitions run on connections of their own:
        // * they commit without waiting for the WAL flush (see `synchronous_worker_commits`):
        //   a lost one only means a job is delivered again;
        // * every one of them names its rows by key (a batch of ids, the claim index's range,
        //   a lease end), so a sequential scan or a parallel plan is never the right plan for
        //   them, yet the planner picks one for a large batch of ids on a table whose
        //   statistics predate the batch (seen: a parallel seq scan per 2,000 completions).
        //   `enable_seqscan = off` makes the index the plan whenever one applies, and no
        //   parallel workers are started for a few milliseconds of work.
        let mut worker_settings = vec![
            ("enable_seqscan", "off"),
            ("max_parallel_workers_per_gather", "0"),
        ];
        if !self.synchronous_worker_commits {
            worker_settings.push(("synchronous_commit", "off"));
        }
        let worker_pool = pool_options(self.max_connections).connect_lazy_with(
            options
                .clone()
                .application_name(&format!("{app}:worker"))
                .options(worker_settings),
        );
        let listen = Arc::new(Listen {
            options: options.application_name(&format!("{app}:listen")),
            acquire_timeout: self.acquire_timeout,
            check: self.listen_check,
        });
        let quoted = format!("\"{}\"", self.schema);
        let channel = format!("{}.dray", self.schema);
        let notifier = Arc::new(Notifier::default());
        let hub = Arc::new(WakeHub::new());
        hub.changes().set_relayed();
        let notifier_task = NotifierTask(tokio::spawn(notify_loop(
            notifier.clone(),
            hub.clone(),
            pool.clone(),
            channel.clone(),
        )));
        let store = PgStore {
            inner: Arc::new(Inner {
                sql: Sql::new(&quoted),
                wf: workflow::WfSql::new(&quoted),
                expanded: Default::default(),
                channel,
                schema: self.schema,
                pool,
                worker_pool,
                listen,
                hub,
                listener: tokio::sync::OnceCell::new(),
                notifier,
                notifier_task,
                poll_interval: self.poll_interval,
                cursors: ClaimCursors::default(),
                sweep: SweepCursor::default(),
                history_prepared: std::sync::Mutex::new(None),
            }),
        };
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

fn validate_schema(schema: &str) -> Result<()> {
    let ok = !schema.is_empty()
        && schema.len() <= 63
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !schema.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "schema",
            format!("{schema:?}: use 1-63 characters from a-z 0-9 _, not starting with a digit"),
        ))
    }
}

/// Hides a password in a URL before it is echoed in an error.
fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// The PostgreSQL store. Cheap to clone; clones share the pool, the LISTEN connection and the
/// wake-up hub.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    schema: String,
    channel: String,
    pool: PgPool,
    /// Connections for worker-side transitions (index-only plans; `synchronous_commit = off`
    /// unless `synchronous_worker_commits`).
    worker_pool: PgPool,
    listen: Arc<Listen>,
    sql: Sql,
    /// The workflow layer's statements (`workflow`).
    wf: workflow::WfSql,
    /// Other layers' statements, expanded once per template (see `PgStore::expanded`).
    expanded: std::sync::Mutex<std::collections::HashMap<usize, Arc<str>>>,
    hub: Arc<WakeHub>,
    listener: tokio::sync::OnceCell<ListenerTask>,
    /// Sends the NOTIFYs of committed enqueues (see [`Notifier`]).
    notifier: Arc<Notifier>,
    notifier_task: NotifierTask,
    poll_interval: Duration,
    /// Per queue: where this process's next claim may start (see `dray_core::claim`).
    cursors: ClaimCursors,
    /// Where this handle's next expired-lease sweep starts.
    sweep: SweepCursor<SweepKey>,
    /// When this handle last made the history's coming partitions (see `job_prune`).
    history_prepared: std::sync::Mutex<Option<std::time::Instant>>,
}

pub use dray_core::batch::SWEEP_WINDOW;

/// A connection idle for less than this is handed out without a health check.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// The options of every pool of a store. sqlx checks a pooled connection with a round trip (a
/// Sync message) each time it hands one out; for a connection that was in use a moment ago that
/// doubled the round trips of a one-row enqueue or a claim. Only a connection idle for
/// [`PING_IF_IDLE_FOR`] or longer is checked now (a dead one is dropped and another taken): a
/// connection that breaks while in use, or within that second, fails its statement, as it
/// would have between a check and the statement.
///
/// A connection opened before the database last refused a write is closed instead of handed
/// out (see [`dray_core::error::opened_before_read_only_refusal`]): a session keeps the
/// read-only setting it began with, so only new connections see that the condition cleared.
fn pool_options(max_connections: u32, acquire_timeout: Duration) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(acquire_timeout)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if dray_core::error::opened_before_read_only_refusal(meta.age) {
                    return Ok(false);
                }
                if meta.idle_for >= PING_IF_IDLE_FOR {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

/// A position in `dray_jobs_unfinished_idx`: (queue, −priority, run_at, id).
type SweepKey = (String, i32, DateTime<Utc>, Uuid);

impl PgStore {
    /// `template` with `{s}` (the quoted schema) and whatever `fill` replaces, made once per
    /// store and template (keyed by the template's address: templates are `'static` consts).
    pub(crate) fn expanded(
        &self,
        template: &'static str,
        fill: impl FnOnce(&str) -> String,
    ) -> Arc<str> {
        let key = template.as_ptr() as usize;
        let mut map = self
            .inner
            .expanded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.entry(key)
            .or_insert_with(|| {
                fill(template)
                    .replace("{s}", &format!("\"{}\"", self.inner.schema))
                    .into()
            })
            .clone()
    }

    /// Claims up to `p.limit` rows that sort after `after` ((−priority, run_at, id), the key of
    /// `dray_jobs_unfinished_idx` after the queue), in delivery order.
    async fn claim_after(&self, p: &ClaimParams, after: ClaimKey) -> Result<Vec<PgRow>> {
        sqlx::query(AssertSqlSafe(self.inner.sql.claim.clone()))
            .bind(p.queue.as_str())
            .bind(i64::from(p.limit))
            .bind(micros(p.lease))
            .bind(p.leased_by.as_deref())
            .bind(after.0)
            .bind(after.1)
            .bind(after.2)
            .fetch_all(&self.inner.worker_pool)
            .await
            .map_err(Error::db("message_claim"))
    }

    /// Sets aside rows a claim leased but could not decode (see `sql::QUARANTINE`), and logs
    /// each.
    async fn quarantine(&self, bad: &[Unreadable]) -> Result<()> {
        dray_core::batch::log_unreadable("postgres", "message_claim", bad);
        let (ids, messages): (Vec<Uuid>, Vec<String>) = bad
            .iter()
            .filter_map(|b| Some((b.id?, b.quarantine_message())))
            .unzip();
        sqlx::query(AssertSqlSafe(self.inner.sql.quarantine.clone()))
            .bind(ids)
            .bind(messages)
            .execute(&self.inner.worker_pool)
            .await
            .map_err(Error::db("message_quarantine"))?;
        Ok(())
    }
}

/// The id of a returned row, when it reads.
fn row_id(row: &PgRow) -> Option<Uuid> {
    row.try_get(0).ok()
}

/// What a listing shows of a row (`{cols}`) that did not decode (see [`Salvaged`]).
fn salvage(row: &PgRow, err: Error) -> Result<Message> {
    let id: Uuid = row.try_get(0).map_err(Error::db("decode"))?;
    let reason = Unreadable::new(0, Some(id), err).reason;
    Ok(Salvaged {
        queue: row.try_get(16).ok(),
        kind: row.try_get::<Option<String>, _>(1).ok().flatten(),
        state: row
            .try_get::<String, _>(17)
            .ok()
            .and_then(|s| MessageState::parse(&s).ok()),
        attempt: row.try_get(6).ok(),
        enqueued_at: row.try_get(8).ok(),
    }
    .into_message(id, reason))
}

/// The wake-ups of committed enqueues, waiting to be sent. An enqueue does not NOTIFY inside
/// its own transaction: a transaction that has called NOTIFY holds a server-wide lock from the
/// start of its commit until its commit record is flushed, so concurrent enqueues would commit
/// one flush at a time (8 connections: half the commits per second). It commits, hands its
/// queues over here and returns; [`notify_loop`] sends them from a transaction that writes
/// nothing, all the queues gathered since its last send in one statement.
///
/// At most one NOTIFY leaves every [`NOTIFY_GAP`]: the first enqueue after a quiet spell is
/// announced at once, and a stream of enqueues is announced once per gap, not once per job (a
/// receiver woken by a NOTIFY claims everything due, so the ones in between would wake nobody
/// new). Sending one NOTIFY per one-row enqueue cost a single client 7–25% of its enqueue rate
/// on the test machine: a second statement on a second connection, competing for the CPU.
#[derive(Debug, Default)]
struct Notifier {
    pending: std::sync::Mutex<Vec<String>>,
    ready: tokio::sync::Notify,
}

/// The shortest time between two NOTIFYs of one store (see [`Notifier`]): what a receiver in
/// another process may wait, at most, beyond the send, while this process enqueues steadily.
const NOTIFY_GAP: Duration = Duration::from_millis(2);

impl Notifier {
    fn announce<'a>(&self, queues: impl IntoIterator<Item = &'a str>) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let before = pending.len();
        for q in queues {
            if !pending.iter().any(|p| p == q) {
                pending.push(q.to_owned());
            }
        }
        if pending.len() > before {
            self.ready.notify_one();
        }
    }
}

/// Sends what [`Notifier`] gathered, and the job changes of the change feed while somebody
/// watches (see [`dray_core::changes`]), one statement at a time and at most one per
/// [`NOTIFY_GAP`]; while this process has change subscribers, it announces so every
/// [`changes::WATCH_EVERY`]. Ends with the store.
async fn notify_loop(notifier: Arc<Notifier>, hub: Arc<WakeHub>, pool: PgPool, channel: String) {
    let feed = hub.changes();
    let mut last_sent: Option<tokio::time::Instant> = None;
    let mut last_announced: Option<tokio::time::Instant> = None;
    loop {
        let announce_at = feed.subscribed().then(|| {
            last_announced.map_or_else(tokio::time::Instant::now, |t| t + changes::WATCH_EVERY)
        });
        tokio::select! {
            _ = notifier.ready.notified() => {}
            _ = feed.ready().notified() => {}
            _ = async {
                match announce_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
        if let Some(t) = last_sent.map(|t| t + NOTIFY_GAP)
            && t > tokio::time::Instant::now()
        {
            tokio::time::sleep_until(t).await;
        }
        let mut payloads =
            std::mem::take(&mut *notifier.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let now = tokio::time::Instant::now();
        if feed.subscribed() && last_announced.is_none_or(|t| t + changes::WATCH_EVERY <= now) {
            payloads.push(changes::relay::WATCHING.to_owned());
            last_announced = Some(now);
        }
        let (outgoing, dropped) = feed.take_outgoing();
        if dropped {
            payloads.push(changes::relay::MISSED.to_owned());
        }
        payloads.extend(changes::relay::encode(&outgoing));
        if payloads.is_empty() {
            continue;
        }
        last_sent = Some(now);
        if let Err(err) = sqlx::query(sql::NOTIFY)
            .bind(&channel)
            .bind(&payloads)
            .execute(&pool)
            .await
        {
            // Receivers elsewhere find the jobs at their next poll instead; watchers miss
            // these changes.
            tracing::warn!(%err, "dray: cannot send wake-ups for new jobs; receivers will poll");
        }
    }
}

/// The [`notify_loop`] task; aborted when the store is dropped.
struct NotifierTask(tokio::task::JoinHandle<()>);

impl Drop for NotifierTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A due time as the insert statements take it: a delay in µs after the database's `now()`,
/// or an instant.
fn due_parts(run_at: RunAt) -> (i64, Option<DateTime<Utc>>) {
    match run_at {
        RunAt::Now => (0, None),
        RunAt::After(d) => (micros(d), None),
        RunAt::At(t) => (0, Some(t)),
    }
}

/// The insert statements' parameters `$3`–`$11`, which a one-row insert and a uniform batch
/// (whose rows share them) both take from one message: queue, kind, headers, priority, due
/// time (two), enqueue time, attempts and callback URL.
fn bind_shared<'q>(
    query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    m: &'q NewMessage,
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    let (delay, not_before) = due_parts(m.run_at);
    query
        .bind(m.queue.as_str())
        .bind(m.kind.as_deref())
        .bind(m.headers.as_str())
        .bind(m.priority.0)
        .bind(delay)
        .bind(not_before)
        .bind(m.enqueued_at)
        .bind(m.max_attempts)
        .bind(m.callback_url.as_deref())
}

/// Checks that an insert without dedup keys stored every one of its `n` rows (each is new: a
/// repeated id fails the statement instead).
fn all_inserted(n: usize, rows: u64) -> Result<()> {
    if rows == n as u64 {
        return Ok(());
    }
    Err(Error::CorruptRow {
        id: String::new(),
        reason: format!("an insert of {n} messages reported {rows} rows"),
    })
}

/// The background task feeding NOTIFYs into the hub; aborted when the store is dropped.
struct ListenerTask(tokio::task::JoinHandle<()>);

impl Drop for ListenerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("schema", &self.inner.schema)
            .finish()
    }
}

impl PgStore {
    /// Settings for a store at `url` (`postgres://user:password@host:port/database`).
    pub fn builder(url: impl Into<String>) -> PgStoreBuilder {
        PgStoreBuilder {
            url: url.into(),
            schema: DEFAULT_SCHEMA.into(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            schema_mode: SchemaMode::Check,
            poll_interval: DEFAULT_POLL_INTERVAL,
            application_name: None,
            synchronous_worker_commits: false,
            acquire_timeout: dray_core::error::POOL_ACQUIRE_TIMEOUT,
            listen_check: DEFAULT_LISTEN_CHECK,
        }
    }

    /// Connects with the default settings (schema `dray`, schema checked, not migrated).
    pub async fn connect(url: &str) -> Result<PgStore> {
        Self::builder(url).connect().await
    }

    /// The pool to begin a transaction on, to enqueue inside your own writes
    /// ([`dray_core::Client::enqueue_in`]).
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The database clock's `now()`, which leases and due times use ([`Store::now`], here
    /// without the trait in scope).
    pub async fn now(&self) -> Result<DateTime<Utc>> {
        <Self as Store>::now(self).await
    }

    /// The schema holding Dray's tables.
    pub fn schema(&self) -> &str {
        &self.inner.schema
    }

    /// Rebuilds, with `REINDEX INDEX CONCURRENTLY` (writers are not blocked), each index of
    /// the unfinished jobs' table that is larger than `slack` bytes and four times what its
    /// entries need (the entry count is the one the last VACUUM or ANALYZE recorded; an index
    /// never counted is left alone). First drops what an interrupted rebuild left behind (an
    /// invalid `…_ccnew` index). A rebuild waits at most 5 s for each lock it needs (a
    /// transaction held open elsewhere makes it give up; the next call tries again). What
    /// [`Store::job_table_compact`] runs, with [`dray_core::batch::INDEX_SLACK_BYTES`].
    pub async fn rebuild_bloated_indexes(&self, slack: u64) -> Result<Vec<RebuiltIndex>> {
        let op = "rebuild_bloated_indexes";
        let table = format!("\"{}\".dray_jobs", self.inner.schema);
        let indexes: Vec<(String, i64, f32, bool)> = sqlx::query_as(
            "SELECT c.relname::text, pg_relation_size(c.oid), c.reltuples, i.indisvalid
             FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
             WHERE i.indrelid = to_regclass($1) ORDER BY c.relname",
        )
        .bind(&table)
        .fetch_all(&self.inner.pool)
        .await
        .map_err(Error::db(op))?;
        let quoted = |name: &str| format!("\"{}\".\"{}\"", self.inner.schema, name);
        for (name, _, _, valid) in &indexes {
            if !valid && name.contains("_ccnew") {
                sqlx::raw_sql(AssertSqlSafe(format!(
                    "DROP INDEX CONCURRENTLY IF EXISTS {}",
                    quoted(name)
                )))
                .execute(&self.inner.pool)
                .await
                .map_err(Error::db(op))?;
            }
        }
        let mut rebuilt = Vec::new();
        for (name, bytes, entries, valid) in indexes {
            let bytes = bytes.max(0) as u64;
            if !valid
                || entries < 0.0
                || !dray_core::batch::index_bloated(bytes, f64::from(entries), slack)
            {
                continue;
            }
            let mut conn = self.inner.pool.acquire().await.map_err(Error::db(op))?;
            sqlx::raw_sql("SET lock_timeout = '5s'")
                .execute(&mut *conn)
                .await
                .map_err(Error::db(op))?;
            let done = sqlx::raw_sql(AssertSqlSafe(format!(
                "REINDEX INDEX CONCURRENTLY {}",
                quoted(&name)
            )))
            .execute(&mut *conn)
            .await;
            let reset = sqlx::raw_sql("RESET lock_timeout")
                .execute(&mut *conn)
                .await;
            if let Err(err) = done {
                // What it left (an invalid copy) goes at the next call's start.
                return Err(Error::db(op)(err));
            }
            reset.map_err(Error::db(op))?;
            let after: i64 = sqlx::query_scalar("SELECT pg_relation_size(to_regclass($1))")
                .bind(quoted(&name))
                .fetch_one(&mut *conn)
                .await
                .map_err(Error::db(op))?;
            rebuilt.push(RebuiltIndex {
                name,
                bytes_before: bytes,
                bytes_after: after.max(0) as u64,
            });
        }
        Ok(rebuilt)
    }

    /// Drops the schema and everything in it. For tests and `dray` tooling; irreversible.
    pub async fn drop_schema(&self) -> Result<()> {
        let stmt = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.inner.schema);
        sqlx::query(AssertSqlSafe(stmt))
            .execute(&self.inner.pool)
            .await
            .map_err(Error::db("drop_schema"))?;
        Ok(())
    }

    /// Stops the LISTEN task and closes the pools.
    pub async fn close(&self) {
        if let Some(task) = self.inner.listener.get() {
            task.0.abort();
        }
        self.inner.notifier_task.0.abort();
        self.inner.pool.close().await;
        self.inner.worker_pool.close().await;
    }

    /// [`PgStore::insert`] for a batch that [`dray_core::batch::uniform`] accepts: one statement carrying only
    /// ids and payloads as arrays (`sql::INSERT_UNIFORM_ROWS`).
    async fn insert_uniform(
        &self,
        conn: &mut PgConnection,
        messages: &[NewMessage],
    ) -> Result<Vec<Enqueued>> {
        let op = "message_insert_many";
        let m = &messages[0];
        let ids: Vec<Uuid> = messages.iter().map(|m| m.id).collect();
        let payloads: Vec<&str> = messages.iter().map(|m| m.payload.as_str()).collect();
        let query = sqlx::query(AssertSqlSafe(self.inner.sql.insert_uniform.clone()))
            .bind(&ids)
            .bind(&payloads);
        let done = bind_shared(query, m)
            .execute(&mut *conn)
            .await
            .map_err(Error::db(op))?;
        self.inner.cursors.rewind_for(messages);
        all_inserted(messages.len(), done.rows_affected())?;
        Ok(ids
            .into_iter()
            .map(|id| Enqueued {
                id,
                duplicate: false,
            })
            .collect())
    }

    async fn insert(
        &self,
        conn: &mut PgConnection,
        messages: &[NewMessage],
    ) -> Result<Vec<Enqueued>> {
        if messages.len() > 1 && dray_core::batch::uniform(messages) {
            return self.insert_uniform(conn, messages).await;
        }
        let batch = dedup_keys(messages);
        let n = batch.send.len();
        let keyed = batch.send.iter().any(|&i| messages[i].key.is_some());
        let sql = &self.inner.sql;
        let query = if let [i] = batch.send[..] {
            // One row (`Queue::enqueue`): its columns bound as they are, no arrays to build.
            let m = &messages[i];
            let sql = if keyed {
                &sql.insert_one
            } else {
                &sql.insert_one_unkeyed
            };
            let query = sqlx::query(AssertSqlSafe(sql.clone()))
                .bind(m.id)
                .bind(m.payload.as_str());
            bind_shared(query, m).bind(m.key.as_deref())
        } else {
            let (mut ids, mut queues, mut kinds, mut keys, mut payloads, mut headers) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            let mut callbacks: Vec<Option<&str>> = Vec::with_capacity(n);
            let (mut prios, mut delays, mut not_befores, mut enqueued, mut max_attempts) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            for &i in &batch.send {
                let m = &messages[i];
                ids.push(m.id);
                queues.push(m.queue.as_str());
                kinds.push(m.kind.as_deref());
                keys.push(m.key.as_deref());
                payloads.push(m.payload.as_str());
                headers.push(m.headers.as_str());
                prios.push(m.priority.0);
                let (delay, nb) = due_parts(m.run_at);
                delays.push(delay);
                not_befores.push(nb);
                enqueued.push(m.enqueued_at);
                max_attempts.push(m.max_attempts);
                callbacks.push(m.callback_url.as_deref());
            }
            let sql = if keyed {
                &sql.insert
            } else {
                &sql.insert_unkeyed
            };
            sqlx::query(AssertSqlSafe(sql.clone()))
                .bind(ids)
                .bind(queues)
                .bind(kinds)
                .bind(keys)
                .bind(payloads)
                .bind(headers)
                .bind(prios)
                .bind(delays)
                .bind(not_befores)
                .bind(enqueued)
                .bind(max_attempts)
                .bind(callbacks)
        };
        if !keyed {
            // No keys: every row is new, and the count says they all went in.
            let done = query
                .execute(&mut *conn)
                .await
                .map_err(Error::db("message_insert_many"))?;
            self.inner.cursors.rewind_for(messages);
            all_inserted(n, done.rows_affected())?;
            let sent: Vec<Enqueued> = batch
                .send
                .iter()
                .map(|&i| Enqueued {
                    id: messages[i].id,
                    duplicate: false,
                })
                .collect();
            return batch.spread(&sent);
        }
        let rows = query
            .fetch_all(&mut *conn)
            .await
            .map_err(Error::db("message_insert_many"))?;
        // Rows that sort before a claim cursor are claimable once committed (at once, or with
        // the caller's transaction): this process's next claim of their queue starts at the head.
        self.inner.cursors.rewind_for(messages);
        // RETURNING order is not input order: a fresh row is found by its id, a duplicate by
        // its (queue, key), which the batch holds at most once.
        let mut by_id = std::collections::HashMap::with_capacity(rows.len());
        let mut by_key = std::collections::HashMap::new();
        for row in &rows {
            let id: Uuid = row.try_get(0).map_err(Error::db("message_insert_many"))?;
            let dup: bool = row.try_get(3).map_err(Error::db("message_insert_many"))?;
            if dup {
                let q: String = row.try_get(1).map_err(Error::db("message_insert_many"))?;
                let k: Option<String> = row.try_get(2).map_err(Error::db("message_insert_many"))?;
                by_key.insert((q, k.unwrap_or_default()), id);
            } else {
                by_id.insert(id, ());
            }
        }
        let sent: Vec<Enqueued> = batch
            .send
            .iter()
            .map(|&i| {
                let m = &messages[i];
                if by_id.contains_key(&m.id) {
                    Ok(Enqueued {
                        id: m.id,
                        duplicate: false,
                    })
                } else {
                    let k = (
                        m.queue.as_str().to_owned(),
                        m.key.clone().unwrap_or_default(),
                    );
                    by_key
                        .get(&k)
                        .map(|&id| Enqueued {
                            id,
                            duplicate: true,
                        })
                        .ok_or_else(|| Error::CorruptRow {
                            id: m.id.to_string(),
                            reason: "insert returned no row for this message".into(),
                        })
                }
            })
            .collect::<Result<_>>()?;
        batch.spread(&sent)
    }

    async fn lease_write(
        &self,
        op: &'static str,
        sql: &sql::Batched,
        queue: &QueueName,
        refs: &[LeaseRef],
        extra: impl FnOnce(
            sqlx::query::Query<'static, Postgres, sqlx::postgres::PgArguments>,
        )
            -> sqlx::query::Query<'static, Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<LeaseWrite> {
        if refs.is_empty() {
            return Ok(LeaseWrite::default());
        }
        let ids: Vec<Uuid> = refs.iter().map(|r| r.id).collect();
        let attempts: Vec<Option<i32>> = refs.iter().map(|r| r.attempt).collect();
        let (text, cache) = sql.for_len(refs.len());
        let q = sqlx::query(AssertSqlSafe(text))
            .persistent(cache)
            .bind(queue.as_str().to_owned())
            .bind(ids)
            .bind(attempts);
        let rows = extra(q)
            .fetch_all(&self.inner.worker_pool)
            .await
            .map_err(Error::db(op))?;
        self.lease_rows(op, &rows, queue.as_str()).await
    }

    /// Reads what a fenced lease write returned (id, new state, cancel requested), and wakes
    /// receivers when something became available again.
    async fn lease_rows(
        &self,
        op: &'static str,
        rows: &[PgRow],
        queue: &str,
    ) -> Result<LeaseWrite> {
        let mut out = LeaseWrite::default();
        let mut requeued = false;
        for row in rows {
            let id: Uuid = row.try_get(0).map_err(Error::db(op))?;
            let state: String = row.try_get(1).map_err(Error::db(op))?;
            let cancel: bool = row.try_get(2).map_err(Error::db(op))?;
            match state.as_str() {
                "dead" => out.dead.push(id),
                "available" => requeued = true,
                _ => {}
            }
            if cancel {
                out.cancel_requested.push(id);
            }
            out.applied.push(id);
        }
        if requeued {
            self.notify(&[queue.to_owned()]).await?;
        }
        Ok(out)
    }

    /// Wakes receivers of `queues`, here at once and in other processes by NOTIFY.
    async fn notify(&self, queues: &[String]) -> Result<()> {
        for q in queues {
            self.inner.hub.wake(q);
        }
        sqlx::query(sql::NOTIFY)
            .bind(&self.inner.channel)
            .bind(queues)
            .execute(&self.inner.pool)
            .await
            .map_err(Error::db("notify"))?;
        Ok(())
    }
}

/// Decodes a row read with every column (`{cols}`).
fn decode_message(row: &PgRow) -> Result<Message> {
    decode_row(row, |id| decode_tail(id, row))
}

/// Decodes a row the claim `p` just leased (`{claim_cols}`).
fn decode_claimed(row: &PgRow, p: &ClaimParams) -> Result<Message> {
    decode_row(row, |_| Ok(RowTail::claimed(p)))
}

fn corrupt(id: &Uuid, what: &str, err: sqlx::Error) -> Error {
    Error::CorruptRow {
        id: id.to_string(),
        reason: format!("{what}: {err}"),
    }
}

/// Reads the columns after `sql::CLAIM_COLS` (see `RowTail`).
fn decode_tail(id: &Uuid, row: &PgRow) -> Result<RowTail> {
    const AT: usize = 16;
    let state: String = row.try_get(AT + 1).map_err(|e| corrupt(id, "state", e))?;
    Ok(RowTail {
        queue: row.try_get(AT).map_err(|e| corrupt(id, "queue", e))?,
        state: decode_state(id, &state)?,
        leased_by: row
            .try_get(AT + 2)
            .map_err(|e| corrupt(id, "leased_by", e))?,
        finished_at: row
            .try_get(AT + 3)
            .map_err(|e| corrupt(id, "finished_at", e))?,
        result: row.try_get(AT + 4).map_err(|e| corrupt(id, "result", e))?,
        callback_attempts: row
            .try_get(AT + 5)
            .map_err(|e| corrupt(id, "callback_attempts", e))?,
        callback_delivered_at: row
            .try_get(AT + 6)
            .map_err(|e| corrupt(id, "callback_done_at", e))?,
        callback_error: row
            .try_get(AT + 7)
            .map_err(|e| corrupt(id, "callback_error", e))?,
    })
}

/// Decodes `sql::CLAIM_COLS`, and the rest from `tail`.
fn decode_row(row: &PgRow, tail: impl FnOnce(&Uuid) -> Result<RowTail>) -> Result<Message> {
    let id: Uuid = row.try_get(0).map_err(Error::db("decode"))?;
    let tail = tail(&id)?;
    // NULL: empty (see `CLAIM_COLS`; the columns themselves are NOT NULL).
    let headers: Option<serde_json::Value> =
        row.try_get(4).map_err(|e| corrupt(&id, "headers", e))?;
    let errors: Option<serde_json::Value> =
        row.try_get(11).map_err(|e| corrupt(&id, "errors", e))?;
    let callback_url: Option<String> = row
        .try_get(15)
        .map_err(|e| corrupt(&id, "callback_url", e))?;
    let (attempt, max_attempts) = decode_attempts(
        &id,
        row.try_get(6).map_err(|e| corrupt(&id, "attempt", e))?,
        row.try_get(7)
            .map_err(|e| corrupt(&id, "max_attempts", e))?,
    )?;
    Ok(RowHead {
        kind: row.try_get(1).map_err(|e| corrupt(&id, "kind", e))?,
        key: row.try_get(2).map_err(|e| corrupt(&id, "key", e))?,
        payload: row.try_get(3).map_err(|e| corrupt(&id, "payload", e))?,
        headers: match headers {
            Some(h) => decode_headers(&id, h)?,
            None => Default::default(),
        },
        priority: Priority(row.try_get(5).map_err(|e| corrupt(&id, "priority", e))?),
        attempt,
        max_attempts,
        enqueued_at: row.try_get(8).map_err(|e| corrupt(&id, "enqueued_at", e))?,
        run_at: row.try_get(9).map_err(|e| corrupt(&id, "run_at", e))?,
        leased_until: row
            .try_get(10)
            .map_err(|e| corrupt(&id, "leased_until", e))?,
        errors: match errors {
            Some(e) => decode_errors(&id, e)?,
            None => Vec::new(),
        },
        progress: decode_progress(
            &id,
            row.try_get::<Option<i16>, _>(12)
                .map_err(|e| corrupt(&id, "progress", e))?
                .map(i64::from),
        )?,
        progress_message: row
            .try_get(13)
            .map_err(|e| corrupt(&id, "progress_message", e))?,
        cancel_requested: row
            .try_get(14)
            .map_err(|e| corrupt(&id, "cancel_requested", e))?,
        callback_url,
        id,
    }
    .with(tail))
}

/// How the LISTEN connection is opened and watched.
struct Listen {
    options: PgConnectOptions,
    acquire_timeout: Duration,
    /// See [`PgStoreBuilder::listen_check_interval`].
    check: Duration,
}

impl Listen {
    /// Opens a listener on `channel`, on a one-connection pool of its own: a listener given up
    /// for dead may leave its connection hanging (sqlx pings a connection it takes back, and
    /// a half-open one never answers), and that must not hold up the next one.
    async fn open(&self, channel: &str) -> std::result::Result<PgListener, sqlx::Error> {
        let pool = pool_options(1, self.acquire_timeout).connect_lazy_with(self.options.clone());
        let mut l = PgListener::connect_with(&pool).await?;
        l.listen(channel).await?;
        Ok(l)
    }

    /// How long a ping of a quiet listener may take.
    fn ping_timeout(&self) -> Duration {
        self.check.min(Duration::from_secs(10))
    }
}

/// Runs the LISTEN loop: every NOTIFY wakes its queue's receivers; a lost connection wakes
/// everyone (notifications may have been missed) and is re-established with backoff. A
/// connection silent for [`Listen::check`] is pinged, and replaced when the ping does not
/// come back in time (until then waiting receivers poll).
async fn listen_loop(
    listener: PgListener,
    listen: Arc<Listen>,
    channel: String,
    hub: Arc<WakeHub>,
) {
    let mut listener = Some(listener);
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(l) = listener.as_mut() else {
            tokio::time::sleep(backoff).await;
            match listen.open(&channel).await {
                Ok(l) => {
                    listener = Some(l);
                    backoff = Duration::from_millis(50);
                    // Anything sent while we were away was missed: everyone re-checks.
                    hub.wake_all();
                    hub.changes().missed();
                }
                Err(sqlx::Error::PoolClosed) => return,
                Err(err) => {
                    tracing::warn!(%err, "dray: cannot re-establish LISTEN; retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
            continue;
        };
        // `try_recv` is cancel-safe: a timeout loses no notification.
        let lost = match tokio::time::timeout(listen.check, l.try_recv()).await {
            Ok(Ok(Some(n))) => {
                match changes::relay::parse(n.payload()) {
                    changes::relay::Payload::Queue(q) => hub.wake(q),
                    changes::relay::Payload::Watching => hub.changes().heard_watching(),
                    changes::relay::Payload::Missed => hub.changes().missed(),
                    changes::relay::Payload::Changes(c) => hub.changes().deliver(c),
                }
                None
            }
            Ok(Ok(None)) => {
                hub.wake_all();
                None
            }
            Ok(Err(sqlx::Error::PoolClosed)) => return,
            Ok(Err(err)) => Some(format!("LISTEN connection lost ({err})")),
            Err(_quiet) => {
                let ping = sqlx::query("SELECT 1").execute(&mut *l);
                match tokio::time::timeout(listen.ping_timeout(), ping).await {
                    Ok(Ok(_)) => None,
                    Ok(Err(sqlx::Error::PoolClosed)) => return,
                    Ok(Err(err)) => Some(format!("LISTEN connection failed its ping ({err})")),
                    Err(_) => Some(format!(
                        "LISTEN connection did not answer a ping within {:?} (half-open?)",
                        listen.ping_timeout()
                    )),
                }
            }
        };
        if let Some(why) = lost {
            tracing::warn!("dray: {why}; polling meanwhile, reconnecting");
            listener = None;
            hub.wake_all();
            hub.changes().missed();
        }
    }
}

impl Store for PgStore {
    type Database = Postgres;

    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn pool(&self) -> &PgPool {
        PgStore::pool(self)
    }

    fn wake(&self) -> &WakeHub {
        &self.inner.hub
    }

    fn poll_interval(&self) -> Duration {
        self.inner.poll_interval
    }

    async fn listen(&self) -> Result<()> {
        self.inner
            .listener
            .get_or_try_init(|| async {
                let l = self
                    .inner
                    .listen
                    .open(&self.inner.channel)
                    .await
                    .map_err(Error::db("listen"))?;
                let task = tokio::spawn(listen_loop(
                    l,
                    self.inner.listen.clone(),
                    self.inner.channel.clone(),
                    self.inner.hub.clone(),
                ));
                Ok::<_, Error>(ListenerTask(task))
            })
            .await?;
        Ok(())
    }

    async fn migrate(&self) -> Result<MigrationReport> {
        let op = "migrate";
        let schema = &self.inner.schema;
        let mut tx = self.inner.pool.begin().await.map_err(Error::db(op))?;
        // One migrator at a time per schema, across processes.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('dray.migrate.' || $1))")
            .bind(schema)
            .execute(&mut *tx)
            .await
            .map_err(Error::db(op))?;
        let setup = format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
             SET LOCAL search_path TO \"{schema}\";
             CREATE TABLE IF NOT EXISTS dray_schema_version (
                 version    bigint PRIMARY KEY,
                 name       text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now());"
        );
        sqlx::raw_sql(AssertSqlSafe(setup))
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
            sqlx::query("INSERT INTO dray_schema_version (version, name) VALUES ($1, $2)")
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
        let table = format!("\"{}\".dray_schema_version", self.inner.schema);
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(&table)
            .fetch_one(&self.inner.pool)
            .await
            .map_err(Error::db(op))?;
        if !exists {
            return Ok(0);
        }
        sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT COALESCE(max(version), 0) FROM {table}"
        )))
        .fetch_one(&self.inner.pool)
        .await
        .map_err(Error::db(op))
    }

    async fn now(&self) -> Result<DateTime<Utc>> {
        sqlx::query_scalar("SELECT now()")
            .fetch_one(&self.inner.pool)
            .await
            .map_err(Error::db("now"))
    }

    async fn message_insert_many(&self, messages: &[NewMessage]) -> Result<Vec<Enqueued>> {
        let mut conn = self
            .inner
            .pool
            .acquire()
            .await
            .map_err(Error::db("message_insert_many"))?;
        let out = self.insert(&mut conn, messages).await?;
        drop(conn);
        // Committed. Local receivers need not wait for the NOTIFY round trip through the
        // server; other processes' get it from the notifier.
        let due = queues_to_wake(messages, self.inner.poll_interval);
        for q in &due {
            self.inner.hub.wake(q);
        }
        self.inner.notifier.announce(due);
        Ok(out)
    }

    async fn message_insert_leased(&self, m: &NewMessage, params: &ClaimParams) -> Result<Message> {
        let (enqueued_at, run_at, leased_until): (DateTime<Utc>, DateTime<Utc>, DateTime<Utc>) =
            sqlx::query_as(AssertSqlSafe(self.inner.sql.insert_leased.clone()))
                .bind(m.id)
                .bind(m.queue.as_str())
                .bind(m.kind.as_deref())
                .bind(m.payload.as_str())
                .bind(m.headers.as_str())
                .bind(m.priority.0)
                .bind(m.max_attempts)
                .bind(m.enqueued_at)
                .bind(micros(params.lease))
                .bind(params.leased_by.as_deref())
                .bind(m.callback_url.as_deref())
                .fetch_one(&self.inner.pool)
                .await
                .map_err(Error::db("message_insert_leased"))?;
        dray_core::batch::leased_insert(m, params, enqueued_at, run_at, leased_until)
    }

    async fn message_insert_many_in(
        &self,
        conn: &mut PgConnection,
        messages: &[NewMessage],
    ) -> Result<Vec<Enqueued>> {
        // No local wake-up here: the rows are invisible until the caller commits. The NOTIFY
        // goes out in the caller's transaction, so it is delivered exactly then (and never on
        // a rollback).
        let out = self.insert(conn, messages).await?;
        let due = queues_to_wake(messages, self.inner.poll_interval);
        if !due.is_empty() {
            sqlx::query(sql::NOTIFY)
                .bind(&self.inner.channel)
                .bind(&due)
                .execute(&mut *conn)
                .await
                .map_err(Error::db("message_insert_many_in"))?;
        }
        Ok(out)
    }

    async fn message_claim(&self, p: &ClaimParams) -> Result<Vec<Message>> {
        let (mut round, after) = self.inner.cursors.begin(p.queue.as_str());
        let mut rows = self.claim_after(p, after).await?;
        if rows.is_empty()
            && let Some(head) = round.retry()
        {
            rows = self.claim_after(p, head).await?;
        }
        // One row that does not decode costs only itself: the others are handed out, it is
        // quarantined.
        let (out, bad) = claimed_in_order(&rows, |r| decode_claimed(r, p), row_id);
        round.finish(p.limit, &out, |m| Some(claim_key(m)));
        if !bad.is_empty() {
            self.quarantine(&bad).await?;
        }
        Ok(out)
    }

    async fn message_ack_many(&self, queue: &QueueName, refs: &[LeaseRef]) -> Result<LeaseWrite> {
        self.lease_write("message_ack_many", &self.inner.sql.ack, queue, refs, |q| q)
            .await
    }

    async fn message_nack_many(
        &self,
        queue: &QueueName,
        refs: &[LeaseRef],
        action: NackAction,
    ) -> Result<LeaseWrite> {
        let delay = micros(action.delay());
        let written = self
            .lease_write(
                "message_nack_many",
                &self.inner.sql.nack,
                queue,
                refs,
                |q| q.bind(action.mode()).bind(delay),
            )
            .await?;
        if action == NackAction::Release && !written.applied.is_empty() {
            // Released rows keep their due time, so they may sort before the claim cursor.
            self.inner.cursors.rewind(queue.as_str());
        }
        Ok(written)
    }

    async fn message_extend_many(
        &self,
        queue: &QueueName,
        refs: &[LeaseRef],
        lease: Duration,
    ) -> Result<LeaseWrite> {
        let lease = micros(lease);
        self.lease_write(
            "message_extend_many",
            &self.inner.sql.extend,
            queue,
            refs,
            |q| q.bind(lease),
        )
        .await
    }

    async fn message_rescue_expired(&self, queue: Option<&QueueName>) -> Result<RescueReport> {
        let op = "message_rescue_expired";
        let mut expired: Vec<Uuid> = Vec::new();
        let mut sweep = self.inner.sweep.begin();
        loop {
            let (from, limit) = sweep.window();
            let (q, np, run_at, id) =
                from.unwrap_or_else(|| (String::new(), HEAD.0, HEAD.1, HEAD.2));
            let row = sqlx::query(AssertSqlSafe(self.inner.sql.sweep_window.clone()))
                .bind(q)
                .bind(np)
                .bind(run_at)
                .bind(id)
                .bind(limit)
                .bind(queue.map(|q| q.as_str()))
                .fetch_one(&self.inner.worker_pool)
                .await
                .map_err(Error::db(op))?;
            let seen: i64 = row.try_get(0).map_err(Error::db(op))?;
            let ids: Vec<Uuid> = row.try_get(1).map_err(Error::db(op))?;
            expired.extend(ids);
            let last = match row.try_get::<Option<String>, _>(2).map_err(Error::db(op))? {
                Some(q) => Some((
                    q,
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
        if expired.is_empty() {
            return Ok(RescueReport::default());
        }
        let rows = sqlx::query(AssertSqlSafe(self.inner.sql.rescue.clone()))
            .bind(&expired)
            .fetch_all(&self.inner.worker_pool)
            .await
            .map_err(Error::db(op))?;
        let mut report = RescueReport::default();
        let mut woken: Vec<String> = Vec::new();
        for row in rows {
            let q: String = row
                .try_get(0)
                .map_err(Error::db("message_rescue_expired"))?;
            let state: String = row
                .try_get(1)
                .map_err(Error::db("message_rescue_expired"))?;
            if state == MessageState::Dead.as_str() {
                report.dead += 1;
            } else {
                report.requeued += 1;
                // Requeued with its old due time: it sorts before this process's cursor.
                self.inner.cursors.rewind(&q);
                if !woken.contains(&q) {
                    woken.push(q);
                }
            }
        }
        if !woken.is_empty() {
            self.notify(&woken).await?;
        }
        Ok(report)
    }

    async fn message_get(&self, id: Uuid) -> Result<Option<Message>> {
        let row = sqlx::query(AssertSqlSafe(self.inner.sql.get.clone()))
            .bind(id)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(Error::db("message_get"))?;
        row.as_ref().map(decode_message).transpose()
    }

    async fn queue_stats(&self, queue: &QueueName) -> Result<QueueStats> {
        let row = sqlx::query(AssertSqlSafe(self.inner.sql.stats.clone()))
            .bind(queue.as_str())
            .fetch_one(&self.inner.pool)
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
        let rows = sqlx::query(AssertSqlSafe(self.inner.sql.gauges.clone()))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(Error::db("queue_gauges"))?;
        rows.iter()
            .map(|row| decode_gauge(row, Duration::from_micros))
            .collect()
    }

    async fn queue_next_due(&self, queue: &QueueName) -> Result<Option<Duration>> {
        let sql = &self.inner.sql;
        let us: Option<i64> = match self.inner.cursors.peek(queue.as_str()) {
            Some((np, run_at, id)) => sqlx::query_scalar(AssertSqlSafe(sql.next_due_after.clone()))
                .bind(queue.as_str())
                .bind(np)
                .bind(run_at)
                .bind(id),
            None => sqlx::query_scalar(AssertSqlSafe(sql.next_due.clone())).bind(queue.as_str()),
        }
        .fetch_one(&self.inner.pool)
        .await
        .map_err(Error::db("queue_next_due"))?;
        Ok(us.map(|us| Duration::from_micros(us.max(0) as u64)))
    }

    async fn job_complete_many(&self, done: &[Completion]) -> Result<LeaseWrite> {
        if done.is_empty() {
            return Ok(LeaseWrite::default());
        }
        let op = "job_complete_many";
        let ids: Vec<Uuid> = done.iter().map(|c| c.lease.id).collect();
        let uniform = dray_core::batch::uniform_completions(done);
        let row = if let Some(attempt) = uniform {
            let (text, cache) = self.inner.sql.complete_uniform.for_len(done.len());
            sqlx::query(AssertSqlSafe(text))
                .persistent(cache)
                .bind(ids)
                .bind(attempt)
                .fetch_one(&self.inner.worker_pool)
                .await
        } else {
            let attempts: Vec<Option<i32>> = done.iter().map(|c| c.lease.attempt).collect();
            let results: Vec<Option<&str>> = done.iter().map(|c| c.result.as_deref()).collect();
            let (text, cache) = self.inner.sql.complete.for_len(done.len());
            sqlx::query(AssertSqlSafe(text))
                .persistent(cache)
                .bind(ids)
                .bind(attempts)
                .bind(results)
                .fetch_one(&self.inner.worker_pool)
                .await
        }
        .map_err(Error::db(op))?;
        // One row: the count, and the completed ids when some were refused (see
        // `sql::COMPLETE`).
        let count: i64 = row.try_get(0).map_err(Error::db(op))?;
        let applied: Option<Vec<Uuid>> = row.try_get(1).map_err(Error::db(op))?;
        let applied = match applied {
            Some(ids) => ids,
            None if count == done.len() as i64 => done.iter().map(|c| c.lease.id).collect(),
            None => {
                return Err(Error::CorruptRow {
                    id: String::new(),
                    reason: format!(
                        "completion of {} jobs reported {count} completed without naming them",
                        done.len()
                    ),
                });
            }
        };
        Ok(LeaseWrite {
            applied,
            ..LeaseWrite::default()
        })
    }

    async fn job_fail(
        &self,
        lease: LeaseRef,
        kind: FailureKind,
        message: &str,
        to: FailTo,
    ) -> Result<LeaseWrite> {
        let op = "job_fail";
        let (to, delay) = fail_to_parts(to);
        let delay = micros(delay);
        let rows = sqlx::query(AssertSqlSafe(self.inner.sql.fail.clone()))
            .bind(lease.id)
            .bind(lease.attempt)
            .bind(kind.as_str())
            .bind(message)
            .bind(to)
            .bind(delay)
            .fetch_all(&self.inner.worker_pool)
            .await
            .map_err(Error::db(op))?;
        self.lease_rows(op, &rows, "").await
    }

    async fn job_progress(
        &self,
        lease: LeaseRef,
        percent: u8,
        message: Option<&str>,
    ) -> Result<LeaseWrite> {
        let op = "job_progress";
        let rows = sqlx::query(AssertSqlSafe(self.inner.sql.progress.clone()))
            .bind(lease.id)
            .bind(lease.attempt)
            .bind(i16::from(percent.min(100)))
            .bind(message)
            .fetch_all(&self.inner.worker_pool)
            .await
            .map_err(Error::db(op))?;
        self.lease_rows(op, &rows, "").await
    }

    async fn job_cancel(&self, id: Uuid) -> Result<Option<CancelOutcome>> {
        let op = "job_cancel";
        let row = sqlx::query(AssertSqlSafe(self.inner.sql.cancel.clone()))
            .bind(id)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(Error::db(op))?;
        let Some(row) = row else { return Ok(None) };
        let before: String = row.try_get(0).map_err(Error::db(op))?;
        let before = decode_state(&id, &before)?;
        Ok(Some(cancel_outcome(before)))
    }

    async fn job_redrive(&self, id: Uuid) -> Result<Option<Message>> {
        let op = "job_redrive";
        let row = sqlx::query(AssertSqlSafe(self.inner.sql.redrive.clone()))
            .bind(id)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(|e| match e.as_database_error().and_then(|d| d.code()) {
                Some(code) if code == "23505" => redrive_key_taken(id),
                _ => Error::db(op)(e),
            })?;
        match row {
            Some(row) => {
                let m = decode_message(&row)?;
                self.notify(std::slice::from_ref(&m.queue)).await?;
                Ok(Some(m))
            }
            None => match self.message_get(id).await? {
                None => Ok(None),
                Some(m) => Err(redrive_refused(id, m.state)),
            },
        }
    }

    async fn job_list(&self, f: &JobFilter) -> Result<Vec<Message>> {
        let rows = sqlx::query(AssertSqlSafe(self.inner.sql.list.clone()))
            .bind(f.queue.as_ref().map(|q| q.as_str().to_owned()))
            .bind(f.kind.clone())
            .bind(f.state.map(|s| s.as_str()))
            .bind(f.before)
            .bind(i64::from(list_limit(f.limit)))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(Error::db("job_list"))?;
        // A row that does not decode is listed as what could be read of it, never hiding the rest.
        rows.iter()
            .map(|r| decode_message(r).or_else(|e| salvage(r, e)))
            .collect()
    }

    /// Prunes the history by dropping its hourly partitions past the retention (never row by
    /// row), after making sure the next hours have theirs (every 10 minutes). Row by row only where whole
    /// partitions cannot serve: rows in the default partition (their hour had no partition
    /// yet), rows of a history whose retention is shorter than an hour, and rows that finished
    /// before schema version 9, still in the hot table. Answers how many rows went (the
    /// dropped partitions' count is the planner's estimate).
    async fn job_table_compact(&self) -> Result<Vec<RebuiltIndex>> {
        self.rebuild_bloated_indexes(dray_core::batch::INDEX_SLACK_BYTES)
            .await
    }

    async fn job_prune(&self, older_than: Duration, limit: u32) -> Result<u64> {
        let op = "job_prune";
        let sql = &self.inner.sql;
        let pool = &self.inner.pool;
        let older = micros(older_than);
        let prepare = self
            .inner
            .history_prepared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none_or(|at| at.elapsed() >= HISTORY_PREPARE_EVERY);
        if prepare {
            sqlx::query(AssertSqlSafe(sql.prepare_history.clone()))
                .execute(pool)
                .await
                .map_err(Error::db(op))?;
            *self
                .inner
                .history_prepared
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
        }
        let dropped: i64 = sqlx::query_scalar(AssertSqlSafe(sql.prune_history.clone()))
            .bind(older)
            .fetch_one(pool)
            .await
            .map_err(Error::db(op))?;
        let rows = if older_than < HISTORY_PARTITION {
            &sql.prune_history_rows
        } else {
            &sql.prune_history_default
        };
        let mut pruned = dropped.max(0) as u64;
        for text in [rows, &sql.prune] {
            let r = sqlx::query(AssertSqlSafe(text.clone()))
                .bind(older)
                .bind(i64::from(limit))
                .execute(pool)
                .await
                .map_err(Error::db(op))?;
            pruned += r.rows_affected();
        }
        Ok(pruned)
    }

    async fn leader_acquire(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool> {
        let row = sqlx::query(AssertSqlSafe(self.inner.sql.leader_acquire.clone()))
            .bind(name)
            .bind(holder)
            .bind(micros(ttl))
            .fetch_optional(&self.inner.worker_pool)
            .await
            .map_err(Error::db("leader_acquire"))?;
        Ok(row.is_some())
    }

    async fn leader_release(&self, name: &str, holder: &str) -> Result<()> {
        sqlx::query(AssertSqlSafe(self.inner.sql.leader_release.clone()))
            .bind(name)
            .bind(holder)
            .execute(&self.inner.worker_pool)
            .await
            .map_err(Error::db("leader_release"))?;
        Ok(())
    }

    async fn callback_claim(&self, limit: u32, lease: Duration) -> Result<Vec<Message>> {
        let rows = sqlx::query(AssertSqlSafe(self.inner.sql.callback_claim.clone()))
            .bind(i64::from(limit))
            .bind(micros(lease))
            .fetch_all(&self.inner.worker_pool)
            .await
            .map_err(Error::db("callback_claim"))?;
        let (out, bad) = dray_core::batch::decode_each(&rows, decode_message, row_id);
        // Their tries are recorded as failed and tried again after a long pause (the rows may
        // be fixed meanwhile); the other deliveries go on.
        dray_core::batch::settle_unreadable_callbacks(self, &bad, |i| {
            rows[i].try_get::<i32, _>(21).ok()
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
        let after = micros(after);
        let r = sqlx::query(AssertSqlSafe(self.inner.sql.callback_settle.clone()))
            .bind(id)
            .bind(attempt)
            .bind(delivered)
            .bind(after)
            .bind(error)
            .fetch_one(&self.inner.worker_pool)
            .await
            .map_err(Error::db("callback_settle"))?;
        let settled: i64 = r.try_get(0).map_err(Error::db("callback_settle"))?;
        Ok(settled == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        assert!(validate_schema("dray").is_ok());
        assert!(validate_schema("dray_test_01").is_ok());
        for bad in ["", "Dray", "1dray", "dr\"ay", "a-b", &"x".repeat(64)] {
            assert!(validate_schema(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }

    /// Runs `EXPLAIN (ANALYZE, BUFFERS)` of a lease write on a worker connection (its planner
    /// settings) in a transaction that is rolled back, and checks that its work is linear in
    /// the batch: no node runs more than once per statement (a nested loop over the id list
    /// re-reads the whole list for every row it finds: no extra pages, but n² comparisons),
    /// and the pages touched stay within `pages_per_row` per row.
    async fn assert_linear(
        store: &PgStore,
        what: &str,
        n: usize,
        q: sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
    ) {
        let mut tx = store.inner.worker_pool.begin().await.unwrap();
        let lines: Vec<String> = q
            .fetch_all(&mut *tx)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<String, _>(0))
            .collect();
        tx.rollback().await.unwrap();
        let plan = lines.join("\n");
        let number_after = |line: &str, key: &str| -> Option<u64> {
            line.split(key)
                .nth(1)?
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        };
        for line in &lines {
            if let Some(loops) = number_after(line, "loops=") {
                assert!(
                    loops <= 1,
                    "{what} of {n}: a node ran {loops} times:\n{plan}"
                );
            }
        }
        let pages = lines
            .iter()
            .filter(|l| l.contains("Buffers: shared"))
            .map(|l| {
                ["hit=", "read="]
                    .iter()
                    .filter_map(|k| number_after(l, k))
                    .sum::<u64>()
            })
            .max()
            .unwrap_or_else(|| panic!("no buffer counts in the plan:\n{plan}"));
        assert!(
            pages < 20 * n as u64,
            "{what} of {n} touched {pages} pages:\n{plan}"
        );
    }

    /// Completions and acks of any batch size do work linear in the batch on a table analyzed
    /// while nothing ran (so the statistics say no row is running). There the planner expects
    /// one matching row and, unless worker connections disable nested loops, joins the rows to
    /// the batch's id list with a loop that re-reads the whole list for each row: a completion
    /// of 2,000 took seconds while a 100,000-job backlog drained. Checked by the plan's loop
    /// counts and pages, not by timing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lease_writes_of_large_batches_stay_linear_after_analyze() {
        let url = std::env::var("DRAY_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let schema = format!("dray_t_{}", Uuid::now_v7().simple());
        let store = PgStore::builder(url)
            .schema(schema.as_str())
            .max_connections(4)
            .schema_mode(SchemaMode::Migrate)
            .connect()
            .await
            .expect("PostgreSQL is required for this test");
        // The checks run apart so that the schema is dropped whether they pass or not.
        let checks = std::panic::AssertUnwindSafe(lease_write_plans(&store, &schema));
        let outcome = futures_util::FutureExt::catch_unwind(checks).await;
        store.drop_schema().await.unwrap();
        store.close().await;
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }

    async fn lease_write_plans(store: &PgStore, schema: &str) {
        const BATCH: usize = 2_000;
        let q = dray_core::Queue::new(store.clone());
        let payloads: Vec<serde_json::Value> = (0..20_000).map(|i| serde_json::json!(i)).collect();
        for chunk in payloads.chunks(5_000) {
            q.enqueue_many("big", chunk, &dray_core::EnqueueOptions::new())
                .await
                .unwrap();
        }
        sqlx::query(AssertSqlSafe(format!("ANALYZE \"{schema}\".dray_jobs")))
            .execute(store.pool())
            .await
            .unwrap();
        let options = dray_core::ReceiveOptions {
            limit: BATCH as u32,
            wait: Duration::ZERO,
            lease: None,
        };
        let got = q.receive_with("big", &options).await.unwrap();
        assert_eq!(got.len(), BATCH);
        // Every batch size: the planner's choice between plans depends on it.
        for n in [33, 100, 250, 500, 1_000, 2_000] {
            let ids: Vec<Uuid> = got[..n].iter().map(|m| m.id).collect();
            let attempts: Vec<Option<i32>> = got[..n].iter().map(|m| Some(m.attempt)).collect();
            let results: Vec<Option<&str>> = vec![None; n];

            let (text, _) = store.inner.sql.complete.for_len(n);
            let explain = format!("EXPLAIN (ANALYZE, BUFFERS) {text}");
            let complete = sqlx::query(AssertSqlSafe(explain))
                .bind(&ids)
                .bind(&attempts)
                .bind(&results);
            assert_linear(store, "a completion", n, complete).await;

            let (text, _) = store.inner.sql.ack.for_len(n);
            let explain = format!("EXPLAIN (ANALYZE, BUFFERS) {text}");
            let ack = sqlx::query(AssertSqlSafe(explain))
                .bind("big")
                .bind(&ids)
                .bind(&attempts);
            assert_linear(store, "an ack", n, ack).await;
        }

        // The rows are untouched (both writes were rolled back) and complete for real.
        let done: Vec<Completion> = got
            .iter()
            .map(|m| Completion {
                lease: LeaseRef {
                    id: m.id,
                    attempt: Some(m.attempt),
                },
                result: None,
            })
            .collect();
        assert_eq!(
            store.job_complete_many(&done).await.unwrap().applied.len(),
            BATCH
        );
    }
}
