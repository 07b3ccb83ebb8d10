//! The store seam: the only place Dray's engine meets a database.
//!
//! Every state transition is one method here and one transaction in the implementation, named
//! noun-then-verb (`message_claim`, `message_ack_many`) so the trait reads as the list of
//! everything that can happen to a row. Database differences live in the implementations
//! (`dray-postgres`, `dray-sqlite`), never as `if sqlite` branches above this line. Both
//! implementations pass the same conformance suite (`dray-testkit`).

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::Result;
use crate::types::{
    CallbackSettle, CancelOutcome, ClaimParams, Completion, Enqueued, FailTo, FailureKind,
    JobFilter, LeaseRef, LeaseWrite, Message, MigrationReport, NackAction, NewMessage, QueueGauge,
    QueueName, QueueStats, RebuiltIndex, RescueReport,
};
use crate::wake::WakeHub;

/// The connection type a caller's transaction dereferences to, for store `S`
/// (`sqlx::PgConnection` or `sqlx::SqliteConnection`). Pass `&mut *tx` where a method asks for it.
pub type StoreConnection<S> = <<S as Store>::Database as sqlx::Database>::Connection;

/// A Dray store: PostgreSQL or SQLite behind one contract.
///
/// Implementations are cheap to clone (they share pools) and are safe to use from many tasks.
pub trait Store: Clone + Send + Sync + 'static {
    /// The sqlx database this store runs on; a caller's own transaction of this database can
    /// carry Dray writes (see [`Store::message_insert_many_in`]).
    type Database: sqlx::Database;

    /// `"postgres"` or `"sqlite"`, for messages and reports.
    fn backend(&self) -> &'static str;

    /// The pool to begin transactions on when you want Dray writes to commit or roll back
    /// with your own (on SQLite this is the single writer connection).
    fn pool(&self) -> &sqlx::Pool<Self::Database>;

    /// The in-process wake-up hub this store signals when work may have become available.
    fn wake(&self) -> &WakeHub;

    /// How often a waiting receiver re-checks the database when no wake-up arrives.
    fn poll_interval(&self) -> Duration;

    /// Makes sure wake-ups from other processes reach [`Store::wake`] (PostgreSQL: starts the
    /// LISTEN connection, re-established if it drops). Cheap once started.
    fn listen(&self) -> impl Future<Output = Result<()>> + Send;

    /// Applies every migration this build has that the database lacks; running it again
    /// changes nothing. Refuses a schema newer than this build.
    fn migrate(&self) -> impl Future<Output = Result<MigrationReport>> + Send;

    /// The schema version in the database (0 when Dray's tables do not exist yet).
    fn schema_version(&self) -> impl Future<Output = Result<i64>> + Send;

    /// The database clock's `now()`. Leases, due times and schedules all use this clock.
    fn now(&self) -> impl Future<Output = Result<DateTime<Utc>>> + Send;

    /// Inserts messages in one transaction (one statement where the database allows).
    /// Returns one [`Enqueued`] per input, in input order; a key that matches an unfinished
    /// message of the same queue (or an earlier message of this batch) yields the existing id
    /// with `duplicate = true`.
    fn message_insert_many(
        &self,
        messages: &[NewMessage],
    ) -> impl Future<Output = Result<Vec<Enqueued>>> + Send;

    /// [`Store::message_insert_many`] inside the caller's transaction: the messages exist if and
    /// only if that transaction commits.
    fn message_insert_many_in(
        &self,
        conn: &mut StoreConnection<Self>,
        messages: &[NewMessage],
    ) -> impl Future<Output = Result<Vec<Enqueued>>> + Send;

    /// Inserts one message already leased, as [`Store::message_claim`] with `params` would
    /// have leased it (running, attempt 1, the lease starting now on the database clock), and
    /// returns it as that claim would. It wakes no receiver: nobody else may take it. This is
    /// the direct hand-off from an enqueue to a receiver of the same process that is waiting on
    /// an empty queue (see [`crate::Queue::enqueue_messages`]); `message` has no dedup key and
    /// is due now.
    fn message_insert_leased(
        &self,
        message: &NewMessage,
        params: &ClaimParams,
    ) -> impl Future<Output = Result<Message>> + Send;

    /// Leases up to `limit` due messages of a queue, in delivery order (priority descending,
    /// then due time, then id), raising each one's attempt by one. No message is leased by
    /// two concurrent callers.
    fn message_claim(
        &self,
        params: &ClaimParams,
    ) -> impl Future<Output = Result<Vec<Message>>> + Send;

    /// Marks leased messages completed. A fenced [`LeaseRef`] applies only while its delivery
    /// still holds the lease.
    fn message_ack_many(
        &self,
        queue: &QueueName,
        refs: &[LeaseRef],
    ) -> impl Future<Output = Result<LeaseWrite>> + Send;

    /// Gives leased messages back: requeued (dead instead when out of attempts) or dead.
    fn message_nack_many(
        &self,
        queue: &QueueName,
        refs: &[LeaseRef],
        action: NackAction,
    ) -> impl Future<Output = Result<LeaseWrite>> + Send;

    /// Sets the lease of leased messages to end `lease` from now (database clock).
    fn message_extend_many(
        &self,
        queue: &QueueName,
        refs: &[LeaseRef],
        lease: Duration,
    ) -> impl Future<Output = Result<LeaseWrite>> + Send;

    /// Takes back leases that have ended: the message becomes available again, or dead when it
    /// has used all its attempts. `queue = None` sweeps every queue.
    ///
    /// A store may bound the work of one call: both stores examine at most
    /// [`crate::batch::SWEEP_WINDOW`] (10,000) unfinished messages per call, continuing where
    /// the previous call on the same handle stopped, so a sweep of a larger backlog takes
    /// several calls. Callers sweep regularly (workers' maintenance, receivers' rescue interval) rather than
    /// relying on one call to see everything.
    fn message_rescue_expired(
        &self,
        queue: Option<&QueueName>,
    ) -> impl Future<Output = Result<RescueReport>> + Send;

    /// Reads one message by id, in any state.
    fn message_get(&self, id: Uuid) -> impl Future<Output = Result<Option<Message>>> + Send;

    /// Counts a queue's messages by state, at one instant of the database clock.
    fn queue_stats(&self, queue: &QueueName) -> impl Future<Output = Result<QueueStats>> + Send;

    /// Every queue with unfinished jobs, with its counts of available, scheduled and running
    /// jobs and the age of its oldest available one, read from the unfinished jobs only (the
    /// maintenance leader samples it for the per-queue gauges of [`crate::metrics`]).
    fn queue_gauges(&self) -> impl Future<Output = Result<Vec<QueueGauge>>> + Send;

    /// How long until the earliest pending message of the queue is due (database clock): zero
    /// when one is due already (it came due after a claim looked, or another receiver is
    /// claiming it), `None` when there is none.
    fn queue_next_due(
        &self,
        queue: &QueueName,
    ) -> impl Future<Output = Result<Option<Duration>>> + Send;

    /// Records finished attempts as completed with their outputs, in one statement. Fenced:
    /// an attempt whose lease was taken back is not applied (it is absent from `applied`).
    /// `dead` and `cancel_requested` are always empty: a completed job has nothing left to
    /// cancel.
    fn job_complete_many(
        &self,
        done: &[Completion],
    ) -> impl Future<Output = Result<LeaseWrite>> + Send;

    /// Records a failed attempt (appending to the job's errors) and sends the job where `to`
    /// says; a retry of a job out of attempts makes it dead. Fenced.
    fn job_fail(
        &self,
        lease: LeaseRef,
        kind: FailureKind,
        message: &str,
        to: FailTo,
    ) -> impl Future<Output = Result<LeaseWrite>> + Send;

    /// Records progress (0 to 100) of a running attempt. Fenced.
    fn job_progress(
        &self,
        lease: LeaseRef,
        percent: u8,
        message: Option<&str>,
    ) -> impl Future<Output = Result<LeaseWrite>> + Send;

    /// Cancels a job that has not started, or asks a running one to stop.
    fn job_cancel(&self, id: Uuid) -> impl Future<Output = Result<Option<CancelOutcome>>> + Send;

    /// Re-drives a dead or cancelled job: available again now, with fresh attempts (its error
    /// history is kept). Returns the job as it now is, or `None` when no job has this id.
    /// A job in another state is refused with [`crate::Error::InvalidArgument`].
    fn job_redrive(&self, id: Uuid) -> impl Future<Output = Result<Option<Message>>> + Send;

    /// Lists jobs, newest first.
    fn job_list(&self, filter: &JobFilter) -> impl Future<Output = Result<Vec<Message>>> + Send;

    /// Deletes finished (completed, dead, cancelled) jobs that finished more than `older_than`
    /// ago, up to `limit` where it deletes row by row; returns how many. A store may keep its
    /// history in time partitions and drop whole ones instead (PostgreSQL: hourly), keeping a
    /// job up to one partition's span longer, and reporting the dropped partitions' row counts
    /// as its statistics estimate them.
    fn job_prune(
        &self,
        older_than: Duration,
        limit: u32,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Gives back the space a burst of jobs left in the unfinished jobs' indexes, where the
    /// store's indexes keep it: PostgreSQL B-trees keep emptied pages for their own reuse, so
    /// after a million jobs went through, the indexes of a nearly empty table stay at their
    /// high-water size. Rebuilds (without blocking writers) each index larger than
    /// [`crate::batch::INDEX_SLACK_BYTES`] and four times what its entries need; answers what
    /// it rebuilt. The maintenance leader calls it every
    /// [`crate::worker::COMPACT_EVERY`]. A store with nothing of the kind to do (SQLite, whose
    /// freed pages go back to the file's free list for every table) does nothing.
    fn job_table_compact(&self) -> impl Future<Output = Result<Vec<RebuiltIndex>>> + Send {
        async { Ok(Vec::new()) }
    }

    /// Takes or renews leadership of role `name` for `ttl` (database clock): true when
    /// `holder` holds it now. Fails over when the holder stops renewing.
    fn leader_acquire(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Gives leadership of `name` up, if `holder` has it.
    fn leader_release(&self, name: &str, holder: &str) -> impl Future<Output = Result<()>> + Send;

    /// Leases up to `limit` due HTTP callback deliveries (finished jobs with a callback URL
    /// and no successful delivery yet) for `lease`, raising each one's callback attempt count.
    /// No delivery is leased by two dispatchers at once.
    fn callback_claim(
        &self,
        limit: u32,
        lease: Duration,
    ) -> impl Future<Output = Result<Vec<Message>>> + Send;

    /// Records how a callback try ended. Fenced by the callback attempt: a late answer to an
    /// older try changes nothing (returns false).
    fn callback_settle(
        &self,
        id: Uuid,
        attempt: i32,
        outcome: &CallbackSettle,
    ) -> impl Future<Output = Result<bool>> + Send;
}
