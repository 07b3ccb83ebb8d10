//! Typed jobs: a [`Job`] is a named handler with serde input and output types and default
//! options (queue, priority, timeout, retry policy, uniqueness). Jobs travel as queue messages
//! whose `kind` is the job's [`Job::NAME`]; a [`crate::Worker`] runs them and a
//! [`crate::Client`] enqueues, waits for and tracks them.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::types::{LeaseRef, Priority, QueueName};

/// Default queue of jobs that do not name one.
pub const DEFAULT_JOB_QUEUE: &str = "default";
/// Default attempts of a job (Forge's `retry(max_attempts = 3)` is a common override).
pub const DEFAULT_JOB_ATTEMPTS: i32 = 25;

/// A typed background job.
///
/// ```
/// use dray_core::{Job, JobContext, JobError};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Export { format: String }
///
/// struct ExportUsers;
///
/// impl Job for ExportUsers {
///     const NAME: &'static str = "export_users";
///     type Input = Export;
///     type Output = usize;
///     async fn run(&self, ctx: &JobContext, input: Export) -> Result<usize, JobError> {
///         ctx.progress(50, "halfway").await?;
///         Ok(input.format.len())
///     }
/// }
/// ```
pub trait Job: Send + Sync + 'static {
    /// Stable name: stored with every job, and how a worker finds the handler. Renaming it
    /// strands queued jobs of the old name.
    const NAME: &'static str;
    /// What the job is given.
    type Input: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// What the job produces (stored, and returned by `Client::result`).
    type Output: Serialize + DeserializeOwned + Send + 'static;

    /// Default options; `Client::enqueue_with` can override queue, priority and key per call.
    fn options() -> JobOptions {
        JobOptions::default()
    }

    /// The dedup key of a job with this input: while an unfinished job of this queue has the
    /// same key, enqueuing returns the existing id. `None` (the default) falls back to a key
    /// derived from the whole input when [`JobOptions::unique`] is set, and to no key otherwise.
    fn key(_input: &Self::Input) -> Option<String> {
        None
    }

    /// Runs one attempt.
    fn run(
        &self,
        ctx: &JobContext,
        input: Self::Input,
    ) -> impl Future<Output = std::result::Result<Self::Output, JobError>> + Send;
}

/// How a handler says an attempt failed.
///
/// Any error converts into [`JobError::Transient`] with `?` (retried with backoff); say
/// [`JobError::permanent`] for errors a retry cannot fix (the job is dead at once), and
/// [`JobError::Cancelled`] when the handler stops because [`JobContext::is_cancelled`].
#[derive(Debug)]
pub enum JobError {
    /// Worth retrying (network, rate limits, a database restart).
    Transient(String),
    /// Not worth retrying (bad input, a logic error): the job is dead at once.
    Permanent(String),
    /// The handler stopped because it was asked to.
    Cancelled,
}

impl JobError {
    /// A permanent failure: no retry.
    pub fn permanent(e: impl fmt::Display) -> JobError {
        JobError::Permanent(e.to_string())
    }
    /// A transient failure: retried with backoff while attempts remain.
    pub fn transient(e: impl fmt::Display) -> JobError {
        JobError::Transient(e.to_string())
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobError::Transient(m) | JobError::Permanent(m) => f.write_str(m),
            JobError::Cancelled => f.write_str("cancelled"),
        }
    }
}

impl<E: std::error::Error> From<E> for JobError {
    /// Any error is transient by default. (A lost lease needs no special case: the worker's
    /// write about this attempt is fenced and changes nothing.)
    fn from(e: E) -> Self {
        JobError::Transient(e.to_string())
    }
}

/// How the delay between attempts grows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backoff {
    /// `base` every time.
    Fixed,
    /// `base × attempt`.
    Linear,
    /// `base × 2^(attempt − 1)`.
    Exponential,
}

impl Backoff {
    /// Parses `fixed`, `linear` or `exponential`.
    pub fn parse(s: &str) -> Result<Backoff> {
        match s {
            "fixed" => Ok(Backoff::Fixed),
            "linear" => Ok(Backoff::Linear),
            "exponential" => Ok(Backoff::Exponential),
            other => Err(Error::invalid(
                "backoff",
                format!("{other:?} is not fixed, linear or exponential"),
            )),
        }
    }
}

/// When and how often a failed job runs again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: i32,
    /// Growth of the delay.
    pub backoff: Backoff,
    /// First delay.
    pub base: Duration,
    /// Longest delay.
    pub max: Duration,
    /// Spread delays over `[delay/2, delay]` so failures of many jobs at once do not retry in
    /// lockstep.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: DEFAULT_JOB_ATTEMPTS,
            backoff: Backoff::Exponential,
            base: Duration::from_secs(1),
            max: Duration::from_secs(3600),
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// The delay before the attempt after `attempt` (1-based) failed. `seed` spreads jitter
    /// (the job id's random bits do).
    pub fn delay(&self, attempt: i32, seed: u64) -> Duration {
        let n = attempt.max(1) as u32;
        let raw = match self.backoff {
            Backoff::Fixed => self.base,
            Backoff::Linear => self.base.saturating_mul(n),
            Backoff::Exponential => self
                .base
                .saturating_mul(2u32.saturating_pow((n - 1).min(31))),
        };
        let d = raw.min(self.max);
        if !self.jitter || d.is_zero() {
            return d;
        }
        // A cheap, well-mixed hash of (seed, attempt): splitmix64.
        let mut x = seed ^ u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        let half = d / 2;
        half + Duration::from_nanos(x % (half.as_nanos().max(1) as u64))
    }
}

/// A job's default options.
#[derive(Clone, Debug)]
pub struct JobOptions {
    /// Queue it runs on ([`DEFAULT_JOB_QUEUE`]).
    pub queue: String,
    /// Priority.
    pub priority: Priority,
    /// Longest an attempt may run; the handler's future is dropped then and the attempt
    /// counts as a transient failure (`FailureKind::Timeout`).
    pub timeout: Option<Duration>,
    /// Retries.
    pub retry: RetryPolicy,
    /// At most one unfinished job of this kind per input: the key is derived from the input.
    pub unique: bool,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            queue: DEFAULT_JOB_QUEUE.into(),
            priority: Priority::NORMAL,
            timeout: None,
            retry: RetryPolicy::default(),
            unique: false,
        }
    }
}

/// A stable key for "this kind with this input": kind, FNV-1a 64 of the input's JSON, length.
pub fn unique_key(kind: &str, input_json: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in input_json.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{kind}:{h:016x}:{}", input_json.len())
}

/// A cooperative cancellation signal.
#[derive(Clone, Debug, Default)]
pub struct CancelToken {
    inner: Arc<(AtomicBool, Notify)>,
}

impl CancelToken {
    /// A token not yet cancelled.
    pub fn new() -> Self {
        Self::default()
    }
    /// Signals cancellation (idempotent).
    pub fn cancel(&self) {
        self.inner.0.store(true, Ordering::SeqCst);
        self.inner.1.notify_waiters();
    }
    /// True once cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.inner.0.load(Ordering::SeqCst)
    }
    /// Completes when cancelled.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.inner.1.notified();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }
}

/// What a running job can do through its context, store-agnostic.
pub(crate) trait ContextOps: Send + Sync {
    fn progress<'a>(
        &'a self,
        queue: &'a QueueName,
        lease: LeaseRef,
        percent: u8,
        message: Option<&'a str>,
    ) -> futures_util::future::BoxFuture<'a, Result<crate::LeaseWrite>>;
    fn extend<'a>(
        &'a self,
        queue: &'a QueueName,
        lease: LeaseRef,
    ) -> futures_util::future::BoxFuture<'a, Result<crate::LeaseWrite>>;
    fn store_any(&self) -> &(dyn Any + Send + Sync);
}

/// What a handler knows about the attempt it runs: ids, attempt, progress, heartbeat,
/// cancellation. Cheap to clone.
#[derive(Clone)]
pub struct JobContext {
    pub(crate) inner: Arc<ContextInner>,
}

pub(crate) struct ContextInner {
    pub(crate) id: Uuid,
    pub(crate) kind: String,
    pub(crate) queue: Arc<QueueName>,
    pub(crate) attempt: i32,
    pub(crate) max_attempts: i32,
    pub(crate) cancel: CancelToken,
    pub(crate) ops: Arc<dyn ContextOps>,
    pub(crate) span: tracing::Span,
    /// The database clock minus this machine's, as of the claim.
    pub(crate) db_offset: chrono::TimeDelta,
}

impl fmt::Debug for JobContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobContext")
            .field("id", &self.inner.id)
            .field("kind", &self.inner.kind)
            .field("attempt", &self.inner.attempt)
            .finish()
    }
}

impl JobContext {
    /// The job's id.
    pub fn id(&self) -> Uuid {
        self.inner.id
    }
    /// The job's kind ([`Job::NAME`]).
    pub fn kind(&self) -> &str {
        &self.inner.kind
    }
    /// The queue it runs on.
    pub fn queue(&self) -> &str {
        self.inner.queue.as_str()
    }
    /// This attempt, 1 for the first.
    pub fn attempt(&self) -> i32 {
        self.inner.attempt
    }
    /// Attempts allowed in all.
    pub fn max_attempts(&self) -> i32 {
        self.inner.max_attempts
    }
    /// True on the second and later attempts.
    pub fn is_retry(&self) -> bool {
        self.inner.attempt > 1
    }
    /// The tracing span of this attempt (`dray.job` with id, kind, attempt).
    pub fn span(&self) -> &tracing::Span {
        &self.inner.span
    }

    /// Records progress (0 to 100, higher values are clamped) with a message; any client can
    /// read it (`Client::get`, `Client::watch`). Fails with [`Error::LeaseLost`] when this
    /// attempt no longer holds the job.
    pub async fn progress(&self, percent: u8, message: impl AsRef<str>) -> Result<()> {
        let lease = self.lease();
        let w = self
            .inner
            .ops
            .progress(&self.inner.queue, lease, percent, Some(message.as_ref()))
            .await?;
        self.check(w)
    }

    /// Extends this attempt's lease now (the worker also does so on its own schedule); tells
    /// the context about a pending cancel. Fails with [`Error::LeaseLost`] when the lease was
    /// taken back.
    pub async fn heartbeat(&self) -> Result<()> {
        let w = self
            .inner
            .ops
            .extend(&self.inner.queue, self.lease())
            .await?;
        self.check(w)
    }

    /// True once a cancel was requested (seen at the latest heartbeat) or the lease was lost.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancel.is_cancelled()
    }

    /// Completes when the job is cancelled; `select!` on it around long waits.
    pub async fn cancelled(&self) {
        self.inner.cancel.cancelled().await
    }

    /// The store this worker runs on, if it is an `S` (e.g. `ctx.store::<PgStore>()` to reach
    /// its pool for the job's own queries).
    pub fn store<S: crate::Store>(&self) -> Option<&S> {
        self.inner.ops.store_any().downcast_ref::<S>()
    }

    fn lease(&self) -> LeaseRef {
        LeaseRef {
            id: self.inner.id,
            attempt: Some(self.inner.attempt),
        }
    }

    fn check(&self, w: crate::LeaseWrite) -> Result<()> {
        if w.cancel_requested.contains(&self.inner.id) {
            self.inner.cancel.cancel();
        }
        if w.applied.contains(&self.inner.id) {
            Ok(())
        } else {
            self.inner.cancel.cancel();
            Err(Error::LeaseLost {
                id: self.inner.id,
                attempt: self.inner.attempt,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            max_attempts: 10,
            backoff: Backoff::Exponential,
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
            jitter: false,
        };
        let d: Vec<_> = (1..=6).map(|a| p.delay(a, 7).as_millis()).collect();
        assert_eq!(d, vec![100, 200, 400, 800, 1000, 1000]);
        let lin = RetryPolicy {
            backoff: Backoff::Linear,
            ..p
        };
        assert_eq!(lin.delay(3, 0), Duration::from_millis(300));
        let fixed = RetryPolicy {
            backoff: Backoff::Fixed,
            ..p
        };
        assert_eq!(fixed.delay(9, 0), Duration::from_millis(100));
        let j = RetryPolicy { jitter: true, ..p };
        for seed in 0..100 {
            let d = j.delay(3, seed);
            assert!(
                d >= Duration::from_millis(200) && d <= Duration::from_millis(400),
                "{d:?}"
            );
        }
        assert!(Backoff::parse("quadratic").is_err());
    }

    #[test]
    fn unique_keys_are_stable() {
        assert_eq!(unique_key("k", "{\"a\":1}"), unique_key("k", "{\"a\":1}"));
        assert_ne!(unique_key("k", "{\"a\":1}"), unique_key("k", "{\"a\":2}"));
        assert_ne!(unique_key("k", "1"), unique_key("j", "1"));
    }
}
