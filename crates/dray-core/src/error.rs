//! Dray's error type.
//!
//! Every fallible call in Dray returns [`Error`]. Each variant says what was wrong and what to
//! do about it; the [`Error::code`] of a variant is stable, so scripts and other-language clients
//! can match on it without parsing prose.

use uuid::Uuid;

/// How long both stores' pools wait for a free connection before an operation fails with
/// [`Error::PoolExhausted`], unless the store's builder sets another `acquire_timeout`.
pub const POOL_ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// When a statement last failed because the database refused writes ([`Error::ReadOnly`]).
/// A PostgreSQL session keeps the read-only setting it started with (a role's or database's
/// `default_transaction_read_only`, a standby that was promoted since), so the stores drop any
/// pooled connection opened before this moment instead of handing it out again: once the
/// condition clears, new connections write.
static READ_ONLY_SEEN: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);

/// Whether a pooled connection `age` old was opened before the database last refused a write
/// (see [`Error::ReadOnly`]); such a connection should be closed rather than reused.
pub fn opened_before_read_only_refusal(age: std::time::Duration) -> bool {
    let seen = *READ_ONLY_SEEN.lock().unwrap_or_else(|p| p.into_inner());
    seen.is_some_and(|at| age > at.elapsed())
}

fn note_read_only_refusal() {
    *READ_ONLY_SEEN.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
}

/// Longest piece of a caller's input that an error message repeats, in bytes.
pub const EXCERPT_LEN: usize = 64;

/// `input` as an error message repeats it: whole when short, else its first
/// [`EXCERPT_LEN`] bytes (cut at a character boundary) and how long it was.
pub fn excerpt(input: &str) -> String {
    if input.len() <= EXCERPT_LEN {
        return input.to_owned();
    }
    let mut end = EXCERPT_LEN;
    while !input.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &input[..end], input.len())
}

/// A database's refusal that has an error variant of its own.
enum Refusal {
    ReadOnly,
    Full,
    /// Text the database cannot store: PostgreSQL refuses the NUL character in `text`
    /// (`22021`) and in `jsonb` strings (`22P05`).
    Unstorable,
}

impl Refusal {
    /// Reads the driver's code: a PostgreSQL SQLSTATE, always five characters (`25006`
    /// read-only transaction, `53100` disk full), or a SQLite result code, at most four digits
    /// (`8` SQLITE_READONLY, `13` SQLITE_FULL, each with its extended codes in the upper bits).
    fn of(e: &sqlx::Error) -> Option<Refusal> {
        let sqlx::Error::Database(db) = e else {
            return None;
        };
        let code = db.code()?;
        match code.as_ref() {
            "25006" => Some(Refusal::ReadOnly),
            "53100" => Some(Refusal::Full),
            "22021" | "22P05" => Some(Refusal::Unstorable),
            sqlstate if sqlstate.len() == 5 => None,
            other => match other.parse::<i64>().ok()? & 0xff {
                8 => Some(Refusal::ReadOnly),
                13 => Some(Refusal::Full),
                _ => None,
            },
        }
    }
}

/// Shorthand for `Result<T, dray_core::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in Dray.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A queue name was empty, too long, or had characters outside `[A-Za-z0-9_.:-]`. A long
    /// name is repeated cut to its first [`EXCERPT_LEN`] bytes.
    #[error("invalid queue name {name:?}: {reason}; use 1-{max} characters from A-Z a-z 0-9 _ . : -", max = crate::QueueName::MAX_LEN)]
    InvalidQueueName {
        /// The name as given.
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },

    /// An argument was outside what Dray accepts (a negative limit, an over-long key, …).
    #[error("invalid {what}: {reason}")]
    InvalidArgument {
        /// Which argument.
        what: &'static str,
        /// Why it was refused, and what is accepted.
        reason: String,
    },

    /// Both `delay` and `not_before` were set on one enqueue; they are mutually exclusive.
    #[error(
        "delay and not_before are mutually exclusive: set one of them (delay is relative to the database clock, not_before is an absolute time); nothing was enqueued"
    )]
    DelayConflict,

    /// A payload was larger than the configured maximum.
    #[error(
        "payload of {size} bytes exceeds the limit of {limit} bytes; store large data elsewhere and enqueue a reference, or raise the limit with QueueConfig::max_payload_bytes; nothing was enqueued"
    )]
    PayloadTooLarge {
        /// Size of the serialized payload in bytes.
        size: usize,
        /// The configured limit in bytes.
        limit: usize,
    },

    /// A payload could not be serialized to or deserialized from JSON.
    #[error("payload is not valid JSON for this use: {0}")]
    Payload(#[from] serde_json::Error),

    /// No message or job has this id.
    #[error(
        "no message or job with id {id}; check the id (`dray jobs list` lists them, newest first)"
    )]
    NotFound {
        /// The id that was looked up.
        id: Uuid,
    },

    /// A worker's write about a claimed message was rejected because it no longer holds the
    /// lease: the lease expired and the message was redelivered (or finished) meanwhile.
    #[error(
        "lease lost on {id} (delivery {attempt}): it expired and the message was taken back; this worker's result is discarded, the new delivery is authoritative"
    )]
    LeaseLost {
        /// The message or job.
        id: Uuid,
        /// The delivery (attempt) whose lease was lost.
        attempt: i32,
    },

    /// The database schema was written by a newer version of Dray than this binary.
    #[error(
        "the database schema is at version {found}, newer than this build of Dray understands (up to {supported}); upgrade Dray, or point it at another database or schema"
    )]
    SchemaTooNew {
        /// Version found in the database.
        found: i64,
        /// Highest version this build knows.
        supported: i64,
    },

    /// The database schema is missing or older than this binary needs.
    #[error(
        "the database schema is at version {found}, this build of Dray needs version {required}; run `dray migrate` (or Store::migrate) first"
    )]
    SchemaOutdated {
        /// Version found in the database (0 when Dray's tables do not exist).
        found: i64,
        /// Version this build needs.
        required: i64,
    },

    /// A database URL could not be understood.
    #[error(
        "invalid database URL {url:?}: {reason}; expected postgres://user@host:port/db or sqlite://path/to/file.db"
    )]
    InvalidUrl {
        /// The URL as given (passwords are not echoed).
        url: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The database could not be reached.
    #[error(
        "cannot connect to the database: {source}; check that the server is running and the URL (host, port, user, database) is right"
    )]
    Connect {
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },

    /// No pooled connection came free within the pool's acquire timeout
    /// ([`POOL_ACQUIRE_TIMEOUT`] unless the store's builder sets `acquire_timeout`).
    #[error(
        "no database connection came free within the pool's acquire timeout during {op}: every connection of the store's pool is in use (long transactions, or handlers holding connections); on SQLite a transaction begun on store.pool() holds the one writer connection, which every enqueue, claim and completion of that handle needs, until it commits or rolls back. End those transactions sooner, give the store more connections, or a longer acquire_timeout on its builder"
    )]
    PoolExhausted {
        /// The store operation that waited.
        op: &'static str,
    },

    /// The database refused a write because it is read-only: PostgreSQL in a read-only
    /// transaction (a role or database with `default_transaction_read_only`, a hot standby),
    /// SQLite on a file it may not write. Nothing was written; retry once the condition clears
    /// (the stores then reconnect by themselves).
    #[error(
        "the database refused a write during {op} because it is read-only: {source}; nothing was written. Make it writable again (PostgreSQL: RESET default_transaction_read_only for the role or database, or point the URL at the primary; SQLite: check the file's and directory's permissions) and retry"
    )]
    ReadOnly {
        /// The store operation that was refused.
        op: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },

    /// The database could not grow: its disk (or SQLite's file system) is full. Nothing was
    /// written; retry once there is space.
    #[error(
        "the database is out of space during {op}: {source}; nothing was written. Free disk space (or lower the retention of finished jobs) and retry"
    )]
    StorageFull {
        /// The store operation that failed.
        op: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },

    /// A stored row could not be read back (written by another tool, or corrupted).
    #[error(
        "stored row {id} is unreadable: {reason}; inspect it in the database, fix or delete it"
    )]
    CorruptRow {
        /// The row's id, when known.
        id: String,
        /// What could not be decoded.
        reason: String,
    },

    /// A database operation failed.
    #[error("database error during {op}: {source}")]
    Database {
        /// The store operation that failed.
        op: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },

    /// A wait ran out of time.
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),

    /// A job ended without a result: dead (out of attempts, or a permanent error) or cancelled.
    #[error(
        "job {id} ended {state}: {message}; see its errors with `dray jobs show {id}`, re-drive it with `dray jobs retry {id}`"
    )]
    JobFailed {
        /// The job.
        id: Uuid,
        /// `dead` or `cancelled`.
        state: crate::MessageState,
        /// The last attempt's error.
        message: String,
    },

    /// No workflow run has this id (or this workflow id).
    #[error("no workflow run {run}; check the id (`dray workflows list` lists runs, newest first)")]
    RunNotFound {
        /// The run id or workflow id looked up.
        run: String,
    },

    /// A start named a workflow id that a run of the workflow already has, and asked to be
    /// told (Forze's `raise_on_already_started`).
    #[error(
        "workflow {name:?} already has a run with workflow id {workflow_id:?}: run {run}; use another workflow id, or start without raise_on_already_started to get that run"
    )]
    AlreadyStarted {
        /// The workflow.
        name: String,
        /// The workflow id.
        workflow_id: String,
        /// The run that has it.
        run: uuid::Uuid,
    },

    /// A signal (or another change) was sent to a run that has ended.
    #[error("workflow run {run} has ended ({status}); it takes no more signals")]
    RunFinished {
        /// The run.
        run: uuid::Uuid,
        /// How it ended.
        status: crate::workflow::RunStatus,
    },

    /// A workflow run ended without an output.
    #[error(
        "workflow run {run} ended {status}: {message}; see its steps with `dray workflows describe {run}`"
    )]
    WorkflowFailed {
        /// The run.
        run: uuid::Uuid,
        /// `failed`, `cancelled`, `timed_out` or `compensated`.
        status: crate::workflow::RunStatus,
        /// Its error.
        message: String,
    },
}

impl Error {
    /// A stable, machine-readable code for this error (`"invalid_queue_name"`, `"lease_lost"`…).
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidQueueName { .. } => "invalid_queue_name",
            Error::InvalidArgument { .. } => "invalid_argument",
            Error::DelayConflict => "delay_conflict",
            Error::PayloadTooLarge { .. } => "payload_too_large",
            Error::Payload(_) => "invalid_payload",
            Error::NotFound { .. } => "not_found",
            Error::LeaseLost { .. } => "lease_lost",
            Error::SchemaTooNew { .. } => "schema_too_new",
            Error::SchemaOutdated { .. } => "schema_outdated",
            Error::InvalidUrl { .. } => "invalid_url",
            Error::Connect { .. } => "connect",
            Error::PoolExhausted { .. } => "pool_exhausted",
            Error::ReadOnly { .. } => "read_only",
            Error::StorageFull { .. } => "storage_full",
            Error::CorruptRow { .. } => "corrupt_row",
            Error::Database { .. } => "database",
            Error::Timeout(_) => "timeout",
            Error::JobFailed { .. } => "job_failed",
            Error::RunNotFound { .. } => "run_not_found",
            Error::AlreadyStarted { .. } => "already_started",
            Error::RunFinished { .. } => "run_finished",
            Error::WorkflowFailed { .. } => "workflow_failed",
        }
    }

    /// Wraps a driver error raised by store operation `op`. Connection failures become
    /// [`Error::Connect`] so callers can tell "unreachable" from "the query failed", and a
    /// pool with no free connection [`Error::PoolExhausted`]; a refused write
    /// [`Error::ReadOnly`] and a full disk [`Error::StorageFull`].
    pub fn db(op: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
        move |source| match source {
            sqlx::Error::PoolTimedOut => Error::PoolExhausted { op },
            sqlx::Error::Io(_) | sqlx::Error::Tls(_) => Error::Connect { source },
            source => match Refusal::of(&source) {
                Some(Refusal::ReadOnly) => {
                    note_read_only_refusal();
                    Error::ReadOnly { op, source }
                }
                Some(Refusal::Full) => Error::StorageFull { op, source },
                Some(Refusal::Unstorable) => Error::InvalidArgument {
                    what: "text",
                    reason: format!(
                        "{op} was given text the database cannot store (PostgreSQL refuses the NUL character, \\u0000, in text and JSON strings): {source}; remove it. Nothing was written"
                    ),
                },
                None => Error::Database { op, source },
            },
        }
    }

    /// `text` made storable everywhere: each NUL character (which PostgreSQL refuses in text)
    /// replaced by U+FFFD. For messages Dray records on its own (a handler's error, a progress
    /// message), which must not fail to be written.
    pub fn storable(text: &str) -> std::borrow::Cow<'_, str> {
        if text.contains('\0') {
            std::borrow::Cow::Owned(text.replace('\0', "\u{FFFD}"))
        } else {
            std::borrow::Cow::Borrowed(text)
        }
    }

    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(what: &'static str, reason: impl Into<String>) -> Error {
        Error::InvalidArgument {
            what,
            reason: reason.into(),
        }
    }
}
