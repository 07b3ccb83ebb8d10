//! The values that cross the store seam: queue names, priorities, messages and their states.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};

/// A validated queue name: 1 to [`QueueName::MAX_LEN`] characters from `A-Z a-z 0-9 _ . : -`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct QueueName(String);

impl QueueName {
    /// Longest accepted queue name, in bytes.
    pub const MAX_LEN: usize = 128;

    /// Validates `name`.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        let reason = if name.is_empty() {
            Some("it is empty")
        } else if name.len() > Self::MAX_LEN {
            Some("it is too long")
        } else if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
        {
            Some("it has characters outside the allowed set")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::InvalidQueueName {
                name: crate::error::excerpt(&name),
                reason,
            }),
            None => Ok(QueueName(name)),
        }
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl AsRef<str> for QueueName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for QueueName {
    type Error = Error;
    fn try_from(value: &str) -> Result<Self> {
        QueueName::new(value)
    }
}

impl TryFrom<String> for QueueName {
    type Error = Error;
    fn try_from(value: String) -> Result<Self> {
        QueueName::new(value)
    }
}

impl TryFrom<&QueueName> for QueueName {
    type Error = Error;
    fn try_from(value: &QueueName) -> Result<Self> {
        Ok(value.clone())
    }
}

impl<'de> Deserialize<'de> for QueueName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        QueueName::new(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// Delivery priority: higher is delivered first. Any `i16` is accepted; the named levels are
/// the ones Forge's `priority = "…"` attribute uses.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Priority(pub i16);

impl Priority {
    /// Runs after everything else.
    pub const BACKGROUND: Priority = Priority(-20);
    /// Behind normal work.
    pub const LOW: Priority = Priority(-10);
    /// The default.
    pub const NORMAL: Priority = Priority(0);
    /// Ahead of normal work.
    pub const HIGH: Priority = Priority(10);
    /// Ahead of everything else.
    pub const CRITICAL: Priority = Priority(20);

    /// Parses a level name (`background`, `low`, `normal`, `high`, `critical`) or an integer.
    pub fn parse(s: &str) -> Result<Priority> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "background" => Self::BACKGROUND,
            "low" => Self::LOW,
            "normal" => Self::NORMAL,
            "high" => Self::HIGH,
            "critical" => Self::CRITICAL,
            other => Priority(other.parse::<i16>().map_err(|_| {
                Error::invalid(
                    "priority",
                    format!("{s:?} is not one of background, low, normal, high, critical or an integer from -32768 to 32767"),
                )
            })?),
        })
    }
}

/// Where a message is in its life.
///
/// `scheduled → available → running → completed`, with `retryable` between attempts, and the
/// terminal states `completed`, `dead` and `cancelled`, which change only by an explicit re-drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum MessageState {
    /// Waiting for its due time.
    Scheduled,
    /// Due and waiting for a receiver.
    Available,
    /// Delivered and leased to a receiver.
    Running,
    /// Failed an attempt, waiting for the next one.
    Retryable,
    /// Acknowledged / finished successfully. Terminal.
    Completed,
    /// Rejected for good (nack without requeue, or attempts exhausted). Terminal.
    Dead,
    /// Cancelled before it finished. Terminal.
    Cancelled,
}

impl MessageState {
    /// Every state, in life order.
    pub const ALL: [MessageState; 7] = [
        MessageState::Scheduled,
        MessageState::Available,
        MessageState::Running,
        MessageState::Retryable,
        MessageState::Completed,
        MessageState::Dead,
        MessageState::Cancelled,
    ];

    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageState::Scheduled => "scheduled",
            MessageState::Available => "available",
            MessageState::Running => "running",
            MessageState::Retryable => "retryable",
            MessageState::Completed => "completed",
            MessageState::Dead => "dead",
            MessageState::Cancelled => "cancelled",
        }
    }

    /// Parses a stored state name.
    pub fn parse(s: &str) -> Result<MessageState> {
        MessageState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(
                    "state",
                    format!(
                        "{:?} is not one of scheduled, available, running, retryable, completed, dead, cancelled",
                        crate::error::excerpt(s)
                    ),
                )
            })
    }

    /// True for `completed`, `dead` and `cancelled`.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            MessageState::Completed | MessageState::Dead | MessageState::Cancelled
        )
    }
}

impl fmt::Display for MessageState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When a new message becomes due.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RunAt {
    /// At once (the database's `now()` at insert).
    #[default]
    Now,
    /// This long after the database's `now()` at insert.
    After(Duration),
    /// Not before this instant.
    At(DateTime<Utc>),
}

/// A message as the store inserts it. Built by [`crate::Queue`] from a payload and
/// [`crate::EnqueueOptions`]; the id is made client-side (UUIDv7), so batches need no round trip
/// for ids.
#[derive(Clone, Debug)]
pub struct NewMessage {
    /// UUIDv7 made by the client.
    pub id: Uuid,
    /// Target queue.
    pub queue: QueueName,
    /// Message type (Forze's `type`, a job's kind).
    pub kind: Option<String>,
    /// Dedup key: while a message of this queue with this key is unfinished, enqueuing another
    /// returns the existing id.
    pub key: Option<String>,
    /// The payload, serialized JSON text.
    pub payload: String,
    /// Headers as serialized JSON object text.
    pub headers: String,
    /// Delivery priority.
    pub priority: Priority,
    /// When it becomes due.
    pub run_at: RunAt,
    /// Caller-supplied enqueue time; the database's `now()` when `None`.
    pub enqueued_at: Option<DateTime<Utc>>,
    /// Deliveries allowed before the message is dead.
    pub max_attempts: i32,
    /// URL that receives a signed POST of the outcome when the job finishes.
    pub callback_url: Option<String>,
}

/// What one enqueue did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Enqueued {
    /// The message's id: new, or the existing one when `duplicate`.
    pub id: Uuid,
    /// True when the key matched an unfinished message and nothing new was stored.
    pub duplicate: bool,
}

/// A stored message (a job row seen through the queue port).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Message {
    /// Id (UUIDv7).
    pub id: Uuid,
    /// Queue it belongs to.
    pub queue: String,
    /// Message type, if given.
    pub kind: Option<String>,
    /// Dedup key, if given.
    pub key: Option<String>,
    /// The payload.
    pub payload: serde_json::Value,
    /// Headers.
    pub headers: BTreeMap<String, String>,
    /// Delivery priority.
    pub priority: Priority,
    /// Current state.
    pub state: MessageState,
    /// Deliveries so far (1 on the first delivery).
    pub attempt: i32,
    /// Deliveries allowed before it is dead.
    pub max_attempts: i32,
    /// When it was enqueued.
    pub enqueued_at: DateTime<Utc>,
    /// When it is (or was) due.
    pub run_at: DateTime<Utc>,
    /// When the current lease ends, while `running`.
    pub leased_until: Option<DateTime<Utc>>,
    /// Who holds the lease, while `running`.
    pub leased_by: Option<String>,
    /// When it reached a terminal state.
    pub finished_at: Option<DateTime<Utc>>,
    /// The handler's output, once completed (jobs); `None` when it had none (a handler
    /// returning `()` or `None`), which [`JobOutcome::output`](crate::JobOutcome::output) reads
    /// as JSON null.
    pub result: Option<serde_json::Value>,
    /// One entry per failed attempt, oldest first (jobs).
    pub errors: Vec<AttemptError>,
    /// Last progress the handler reported, 0 to 100 (jobs).
    pub progress: Option<u8>,
    /// The message that came with the last progress report.
    pub progress_message: Option<String>,
    /// True once a cancel was requested (a running job stops at its next check).
    pub cancel_requested: bool,
    /// The HTTP completion callback, if one was asked for.
    pub callback: Option<CallbackStatus>,
    /// Set when some stored columns of this row could not be read (written by another tool,
    /// an older or newer version, or a bad migration): which column, and what was found. The
    /// fields those columns feed hold defaults. Only listings return such rows (so that one
    /// bad row does not hide the others); a claim never hands one to a receiver but
    /// quarantines it as `dead` with a [`FailureKind::Unreadable`] error, and reading it by
    /// id answers [`Error::CorruptRow`]. Fix the row, then re-drive it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreadable: Option<String>,
}

/// Where a job's HTTP completion callback stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CallbackStatus {
    /// The URL that receives the POST.
    pub url: String,
    /// Tries so far for the current terminal state.
    pub attempts: i32,
    /// When the endpoint answered 2xx.
    pub delivered_at: Option<DateTime<Utc>>,
    /// What the last failed try saw.
    pub last_error: Option<String>,
}

/// How one callback try ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallbackSettle {
    /// The endpoint answered 2xx.
    Delivered,
    /// It did not; try again after this long.
    Retry {
        /// Delay before the next try.
        after: Duration,
        /// What went wrong.
        error: String,
    },
}

/// Why an attempt failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum FailureKind {
    /// The handler returned a transient error (retried with backoff).
    Error,
    /// The handler returned a permanent error (not retried).
    Permanent,
    /// The handler ran past its timeout.
    Timeout,
    /// The handler panicked (counted as transient).
    Panic,
    /// The job was cancelled while it ran.
    Cancelled,
    /// The lease ended without a result (the worker died or stalled).
    LeaseExpired,
    /// The stored row could not be read, so it was never run: quarantined as dead by the
    /// claim that found it (see [`Message::unreadable`]).
    Unreadable,
}

impl FailureKind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Error => "error",
            FailureKind::Permanent => "permanent",
            FailureKind::Timeout => "timeout",
            FailureKind::Panic => "panic",
            FailureKind::Cancelled => "cancelled",
            FailureKind::LeaseExpired => "lease_expired",
            FailureKind::Unreadable => "unreadable",
        }
    }
}

/// One failed attempt, as recorded in [`Message::errors`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AttemptError {
    /// The attempt that failed (1 for the first).
    pub attempt: i32,
    /// When (database clock).
    pub at: DateTime<Utc>,
    /// Why.
    pub kind: FailureKind,
    /// What the handler (or Dray) said.
    pub message: String,
}

/// Where a failed attempt sends the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailTo {
    /// Run again after this delay (database clock); dead instead when out of attempts.
    Retry(Duration),
    /// Dead at once.
    Dead,
    /// Cancelled.
    Cancelled,
}

impl FailTo {
    /// The state a failed attempt sends its job to, unless it went dead instead (a retry out
    /// of attempts).
    pub fn next_state(self) -> MessageState {
        match self {
            FailTo::Retry(_) => MessageState::Retryable,
            FailTo::Dead => MessageState::Dead,
            FailTo::Cancelled => MessageState::Cancelled,
        }
    }
}

/// A finished attempt to record as completed.
#[derive(Clone, Debug)]
pub struct Completion {
    /// The delivery that finished (fenced).
    pub lease: LeaseRef,
    /// The output, serialized JSON.
    pub result: Option<String>,
}

/// What a cancel request did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum CancelOutcome {
    /// It had not started: it is cancelled and will never run.
    Cancelled,
    /// It is running: the handler is asked to stop (cooperatively) and the attempt ends as
    /// cancelled.
    Requested,
    /// It had already finished in this state; nothing changed.
    AlreadyFinished(MessageState),
}

/// Which jobs to list.
#[derive(Clone, Debug, Default)]
pub struct JobFilter {
    /// Only this queue.
    pub queue: Option<QueueName>,
    /// Only this kind.
    pub kind: Option<String>,
    /// Only this state.
    pub state: Option<MessageState>,
    /// Only ids before this one (for paging; results are newest first).
    pub before: Option<Uuid>,
    /// At most this many (default 100, at most 10,000).
    pub limit: u32,
}

impl Message {
    /// A reference to this delivery, for fenced `ack`/`nack`/`extend`.
    pub fn lease(&self) -> LeaseRef {
        LeaseRef {
            id: self.id,
            attempt: Some(self.attempt),
        }
    }

    /// Deserializes the payload into `T`.
    pub fn payload_as<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        Ok(T::deserialize(&self.payload)?)
    }
}

/// Names a leased message in `ack`, `nack` and `extend`.
///
/// Built from a [`Message`] (`&msg`), it is *fenced*: it names the delivery (attempt) you hold,
/// and the write is refused if the lease was taken back meanwhile. Built from a bare [`Uuid`], it
/// acts on whatever delivery currently holds the message (what the CLI does).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeaseRef {
    /// The message id.
    pub id: Uuid,
    /// The delivery it must still be on, or `None` for any.
    pub attempt: Option<i32>,
}

impl From<Uuid> for LeaseRef {
    fn from(id: Uuid) -> Self {
        LeaseRef { id, attempt: None }
    }
}

impl From<&Uuid> for LeaseRef {
    fn from(id: &Uuid) -> Self {
        LeaseRef {
            id: *id,
            attempt: None,
        }
    }
}

impl From<&Message> for LeaseRef {
    fn from(m: &Message) -> Self {
        m.lease()
    }
}

impl From<Message> for LeaseRef {
    fn from(m: Message) -> Self {
        m.lease()
    }
}

/// Counts of one queue's messages by where they stand, read at one instant of the database clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QueueStats {
    /// Due and waiting for a receiver.
    pub available: i64,
    /// Waiting for their due time (delayed, or retrying later).
    pub scheduled: i64,
    /// Delivered and under lease.
    pub leased: i64,
    /// Acknowledged.
    pub completed: i64,
    /// Dead (nacked without requeue, or out of attempts).
    pub dead: i64,
    /// Cancelled.
    pub cancelled: i64,
}

/// One queue's unfinished jobs at one instant of the database clock, as the maintenance leader
/// samples them for the per-queue gauges ([`crate::Store::queue_gauges`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueGauge {
    /// The queue.
    pub queue: String,
    /// Due and waiting for a receiver.
    pub available: i64,
    /// Waiting for their due time.
    pub scheduled: i64,
    /// Delivered and under lease.
    pub running: i64,
    /// How long the oldest available job has been due (zero when none is available).
    pub oldest_available_age: Duration,
}

/// A request to lease up to `limit` due messages of `queue`.
#[derive(Clone, Debug)]
pub struct ClaimParams {
    /// The queue.
    pub queue: QueueName,
    /// Most messages to lease.
    pub limit: u32,
    /// Lease (visibility timeout) length.
    pub lease: Duration,
    /// Who takes the lease (worker id), recorded for operators.
    pub leased_by: Option<String>,
}

/// What a `nack` does with each message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NackAction {
    /// Make it deliverable again after `delay` (dead instead when out of attempts).
    Requeue {
        /// How long to wait before redelivery.
        delay: Duration,
    },
    /// Make it dead at once.
    Dead,
    /// Give back a delivery that never started: deliverable again at once, in its old place
    /// in the queue, and the attempt is not counted (its attempt number goes back down by
    /// one, so it can never go dead this way). A worker uses it for jobs it claimed ahead and
    /// did not get to.
    Release,
    /// Give back a delivery that never started, deliverable again after `delay`, without
    /// counting the attempt (as `Release`, but later). A worker uses it for a job of a kind it
    /// has no handler for, so that a worker that has one can take it.
    Defer {
        /// How long to wait before redelivery.
        delay: Duration,
    },
}

impl NackAction {
    /// The state a message given back this way is in, unless it went dead (out of attempts,
    /// or [`NackAction::Dead`]).
    pub fn next_state(self) -> MessageState {
        match self {
            NackAction::Dead => MessageState::Dead,
            a if a.delay().is_zero() => MessageState::Available,
            _ => MessageState::Scheduled,
        }
    }

    /// The name the stores' SQL uses for this action.
    pub fn mode(self) -> &'static str {
        match self {
            NackAction::Requeue { .. } => "requeue",
            NackAction::Dead => "dead",
            NackAction::Release => "release",
            NackAction::Defer { .. } => "defer",
        }
    }

    /// Redelivery delay (zero for `Dead` and `Release`).
    pub fn delay(self) -> Duration {
        match self {
            NackAction::Requeue { delay } | NackAction::Defer { delay } => delay,
            NackAction::Dead | NackAction::Release => Duration::ZERO,
        }
    }
}

/// The result of a store write about leased messages.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseWrite {
    /// Ids the write applied to.
    pub applied: Vec<Uuid>,
    /// Ids of messages that went dead instead of being requeued (out of attempts).
    pub dead: Vec<Uuid>,
    /// Ids (among `applied`) whose job has a cancel request pending.
    pub cancel_requested: Vec<Uuid>,
}

/// An index a store rebuilt to give back the space a burst of jobs left in it (see
/// [`crate::Store::job_table_compact`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RebuiltIndex {
    /// The index.
    pub name: String,
    /// Its size before, in bytes.
    pub bytes_before: u64,
    /// Its size after, in bytes.
    pub bytes_after: u64,
}

/// What a sweep of expired leases did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RescueReport {
    /// Made available again.
    pub requeued: u64,
    /// Out of attempts, now dead.
    pub dead: u64,
}

/// What a migration run did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MigrationReport {
    /// Schema version before the run (0: no Dray tables).
    pub from: i64,
    /// Schema version after the run.
    pub to: i64,
    /// Versions applied by this run, in order.
    pub applied: Vec<i64>,
}
