//! The queue port: named queues of JSON messages with leases.
//!
//! This is the raw port of Forze's queue contract (`enqueue`, `enqueue_many`, `receive`,
//! `consume`, `ack`, `nack`), the layer typed jobs are built on, and what non-Rust workers use
//! over HTTP.
//!
//! * **Delivery** is at-least-once. A received message is *leased* (invisible to other
//!   receivers) until it is acked, nacked, or its lease (visibility timeout) ends; then it is
//!   delivered again with its [`Message::attempt`] raised by one.
//! * **Order**: priority (higher first), then due time, then id (UUIDv7, so enqueue order).
//! * **Time** is the database's clock: `delay` is added to the database's `now()`, and leases
//!   end by the database's clock, so skewed worker clocks cannot deliver early or twice.
//! * **Keys**: while a message of a queue with key `k` is unfinished (not completed, dead or
//!   cancelled), enqueuing another message with key `k` on that queue stores nothing and returns
//!   the existing id with [`Enqueued::duplicate`] set. Once it is finished the key is free again.

use std::collections::BTreeMap;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_core::Stream;
use serde::Serialize;
use uuid::Uuid;

use crate::duration::check_span;
use crate::error::{Error, Result};
use crate::store::{Store, StoreConnection};
use crate::types::{
    ClaimParams, Enqueued, LeaseRef, LeaseWrite, Message, MessageState, NackAction, NewMessage,
    Priority, QueueName, QueueStats, RescueReport, RunAt,
};
use crate::wake::TakenOffer;

/// Default largest payload, serialized: 1 MiB.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;
/// Default lease (visibility timeout) of a received message: 30 seconds.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Default deliveries before a message is dead: 25.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 25;
/// How often receivers sweep expired leases back to available, by default: every second.
pub const DEFAULT_RESCUE_INTERVAL: Duration = Duration::from_secs(1);
/// How soon a receiver looks again when the queue's earliest pending message was already due
/// at its last look (see [`Store::queue_next_due`]).
const RELOOK_AFTER_DUE: Duration = Duration::from_millis(1);

/// Shortest lease (visibility timeout) a receive or an extend accepts: 1 ms.
pub const MIN_LEASE: Duration = Duration::from_millis(1);
/// Most messages one `receive` returns.
pub const MAX_RECEIVE_LIMIT: u32 = 10_000;
/// Longest accepted dedup key, in bytes.
pub const MAX_KEY_LEN: usize = 512;
/// Longest accepted message type, in bytes.
pub const MAX_KIND_LEN: usize = 256;

/// Settings of a [`Queue`] handle.
#[derive(Clone, Debug)]
pub struct QueueConfig {
    /// Largest payload accepted, serialized ([`DEFAULT_MAX_PAYLOAD_BYTES`]).
    pub max_payload_bytes: usize,
    /// Lease of received messages unless [`ReceiveOptions::lease`] says otherwise
    /// ([`DEFAULT_LEASE`]).
    pub default_lease: Duration,
    /// Deliveries allowed unless [`EnqueueOptions::max_attempts`] says otherwise
    /// ([`DEFAULT_MAX_ATTEMPTS`]).
    pub max_attempts: i32,
    /// How often this handle's receivers sweep expired leases ([`DEFAULT_RESCUE_INTERVAL`]):
    /// the first receive sweeps, then at most one receive per interval. `Duration::MAX`: never
    /// (a [`Worker`](crate::Worker) sets it for its own receives, since its maintenance leader
    /// sweeps).
    pub rescue_interval: Duration,
    /// Recorded as the lease holder of received messages, for operators.
    pub receiver_id: Option<String>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            default_lease: DEFAULT_LEASE,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            rescue_interval: DEFAULT_RESCUE_INTERVAL,
            receiver_id: None,
        }
    }
}

/// Options of one enqueue (Forze's keyword arguments). All are optional.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EnqueueOptions {
    /// Message type (Forze's `type`).
    pub kind: Option<String>,
    /// Dedup key (see the module docs).
    pub key: Option<String>,
    /// Delivery priority (default [`Priority::NORMAL`]).
    pub priority: Priority,
    /// Deliver this long after the database's `now()`. Exclusive with `not_before`.
    pub delay: Option<Duration>,
    /// Deliver no earlier than this instant. Exclusive with `delay`.
    pub not_before: Option<DateTime<Utc>>,
    /// Recorded enqueue time (Forze's `enqueued_at`); the database's `now()` when unset.
    pub enqueued_at: Option<DateTime<Utc>>,
    /// Headers carried with the message.
    pub headers: BTreeMap<String, String>,
    /// Deliveries allowed before the message is dead.
    pub max_attempts: Option<i32>,
    /// `http://…` URL that receives a signed POST of the outcome when the job finishes
    /// (see [`crate::callback`]).
    pub callback_url: Option<String>,
    /// The queue a job goes to instead of its own ([`crate::Client::enqueue_with`]); a worker
    /// must serve that queue to run it. [`Queue::enqueue`] names its queue as an argument and
    /// refuses this set to another one.
    pub queue: Option<String>,
}

impl EnqueueOptions {
    /// No options: due now, normal priority.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets the message type.
    pub fn kind(mut self, kind: impl Into<String>) -> Self {
        self.kind = Some(kind.into());
        self
    }
    /// Sets the dedup key.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }
    /// Sets the priority.
    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }
    /// Delays delivery.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }
    /// Holds delivery until `at`.
    pub fn not_before(mut self, at: DateTime<Utc>) -> Self {
        self.not_before = Some(at);
        self
    }
    /// Records a caller-chosen enqueue time.
    pub fn enqueued_at(mut self, at: DateTime<Utc>) -> Self {
        self.enqueued_at = Some(at);
        self
    }
    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }
    /// Sets the deliveries allowed before the message is dead.
    pub fn max_attempts(mut self, n: i32) -> Self {
        self.max_attempts = Some(n);
        self
    }
    /// Puts a job on `queue` instead of its own (see [`EnqueueOptions::queue`]).
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }
    /// Asks for an HTTP completion callback to `url`.
    pub fn callback_url(mut self, url: impl Into<String>) -> Self {
        self.callback_url = Some(url.into());
        self
    }

    fn run_at(&self) -> Result<RunAt> {
        match (self.delay, self.not_before) {
            (Some(_), Some(_)) => Err(Error::DelayConflict),
            (Some(d), None) if d.is_zero() => Ok(RunAt::Now),
            (Some(d), None) => Ok(RunAt::After(check_span("delay", d, Duration::ZERO)?)),
            (None, Some(at)) => Ok(RunAt::At(at)),
            (None, None) => Ok(RunAt::Now),
        }
    }
}

/// Options of one `receive`.
#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    /// Most messages to return (1 to [`MAX_RECEIVE_LIMIT`]).
    pub limit: u32,
    /// Longest time to wait for a first message (long poll); zero returns at once.
    pub wait: Duration,
    /// Lease (visibility timeout) of the returned messages; the queue's default when `None`.
    pub lease: Option<Duration>,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            limit: 1,
            wait: Duration::ZERO,
            lease: None,
        }
    }
}

impl ReceiveOptions {
    /// Checks the limit (1 to [`MAX_RECEIVE_LIMIT`]) and the lease (1 ms to
    /// [`MAX_SPAN`](crate::duration::MAX_SPAN)). Any wait is accepted: one longer than the clock
    /// can count (`Duration::MAX`) waits until a message arrives.
    pub fn validate(&self) -> Result<()> {
        if self.limit == 0 || self.limit > MAX_RECEIVE_LIMIT {
            return Err(Error::invalid(
                "limit",
                format!("must be 1 to {MAX_RECEIVE_LIMIT}, got {}", self.limit),
            ));
        }
        if let Some(lease) = self.lease {
            check_span("lease", lease, MIN_LEASE)?;
        }
        Ok(())
    }
}

/// A handle on a store's queues. Cheap to clone; clones share settings.
#[derive(Clone)]
pub struct Queue<S: Store> {
    store: S,
    config: Arc<QueueConfig>,
    last_rescue: Arc<Mutex<Option<Instant>>>,
}

impl<S: Store> std::fmt::Debug for Queue<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("backend", &self.store.backend())
            .field("config", &self.config)
            .finish()
    }
}

/// Acknowledges leases (completed) and records the change on the store's change feed.
async fn ack_recorded<S: Store>(
    store: &S,
    queue: &QueueName,
    refs: &[LeaseRef],
) -> Result<LeaseWrite> {
    let w = store.message_ack_many(queue, refs).await?;
    store
        .wake()
        .changes()
        .record_write(queue.as_str(), refs, &w, MessageState::Completed);
    Ok(w)
}

/// Gives leases back as `action` says and records the change on the store's change feed.
pub(crate) async fn give_back<S: Store>(
    store: &S,
    queue: &QueueName,
    refs: &[LeaseRef],
    action: NackAction,
) -> Result<LeaseWrite> {
    let w = store.message_nack_many(queue, refs, action).await?;
    store
        .wake()
        .changes()
        .record_write(queue.as_str(), refs, &w, action.next_state());
    Ok(w)
}

impl<S: Store> Queue<S> {
    /// A handle with the default [`QueueConfig`].
    pub fn new(store: S) -> Self {
        Self::with_config(store, QueueConfig::default())
    }

    /// A handle with the given settings.
    pub fn with_config(store: S, config: QueueConfig) -> Self {
        Queue {
            store,
            config: Arc::new(config),
            last_rescue: Arc::new(Mutex::new(None)),
        }
    }

    /// The store underneath.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The settings.
    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// Builds the row for one message without storing it: validates the queue name, options
    /// and payload size, and makes the id (UUIDv7).
    pub fn message(
        &self,
        queue: &str,
        payload: &impl Serialize,
        options: &EnqueueOptions,
    ) -> Result<NewMessage> {
        let queue = QueueName::new(queue)?;
        if let Some(other) = options.queue.as_deref()
            && other != queue.as_str()
        {
            return Err(Error::invalid(
                "queue",
                format!(
                    "the options name queue {:?} but the message goes to {:?}: name one queue",
                    crate::error::excerpt(other),
                    queue.as_str()
                ),
            ));
        }
        self.build(queue, payload, options, options.run_at()?)
    }

    fn build(
        &self,
        queue: QueueName,
        payload: &impl Serialize,
        options: &EnqueueOptions,
        run_at: RunAt,
    ) -> Result<NewMessage> {
        let payload = serde_json::to_string(payload)?;
        if payload.len() > self.config.max_payload_bytes {
            return Err(Error::PayloadTooLarge {
                size: payload.len(),
                limit: self.config.max_payload_bytes,
            });
        }
        if let Some(key) = &options.key
            && (key.is_empty() || key.len() > MAX_KEY_LEN)
        {
            return Err(Error::invalid(
                "key",
                format!("a key must be 1 to {MAX_KEY_LEN} bytes, got {}", key.len()),
            ));
        }
        if let Some(kind) = &options.kind
            && (kind.is_empty() || kind.len() > MAX_KIND_LEN)
        {
            return Err(Error::invalid(
                "type",
                format!(
                    "a message type must be 1 to {MAX_KIND_LEN} bytes, got {}",
                    kind.len()
                ),
            ));
        }
        let max_attempts = options.max_attempts.unwrap_or(self.config.max_attempts);
        if max_attempts < 1 {
            return Err(Error::invalid(
                "max_attempts",
                format!("must be at least 1, got {max_attempts}"),
            ));
        }
        if let Some(url) = &options.callback_url {
            crate::callback::Endpoint::parse(url)?;
        }
        Ok(NewMessage {
            callback_url: options.callback_url.clone(),
            id: Uuid::now_v7(),
            queue,
            kind: options.kind.clone(),
            key: options.key.clone(),
            payload,
            headers: crate::trace::headers_json(&options.headers)?,
            priority: options.priority,
            run_at,
            enqueued_at: options.enqueued_at,
            max_attempts,
        })
    }

    fn build_many<P: Serialize>(
        &self,
        queue: &str,
        payloads: impl IntoIterator<Item = P>,
        options: &EnqueueOptions,
    ) -> Result<Vec<NewMessage>> {
        let queue = QueueName::new(queue)?;
        let run_at = options.run_at()?;
        payloads
            .into_iter()
            .map(|p| self.build(queue.clone(), &p, options, run_at))
            .collect()
    }

    /// Enqueues one message; returns its id (or the existing one, for a duplicate key).
    pub async fn enqueue(
        &self,
        queue: &str,
        payload: &impl Serialize,
        options: &EnqueueOptions,
    ) -> Result<Enqueued> {
        let msg = self.message(queue, payload, options)?;
        let mut out = self.enqueue_messages(std::slice::from_ref(&msg)).await?;
        Ok(out.remove(0))
    }

    /// Enqueues many messages with the same options, in one statement where the database
    /// allows and always in one transaction: all are stored, or none.
    pub async fn enqueue_many<P: Serialize>(
        &self,
        queue: &str,
        payloads: impl IntoIterator<Item = P>,
        options: &EnqueueOptions,
    ) -> Result<Vec<Enqueued>> {
        let msgs = self.build_many(queue, payloads, options)?;
        self.enqueue_messages(&msgs).await
    }

    /// Enqueues prepared messages (see [`Queue::message`]), possibly of different queues and
    /// options, in one transaction.
    ///
    /// **Direct hand-off.** A single message that is due now and has no dedup key goes straight
    /// to a receiver of this process (a [`crate::Worker`]'s, or a [`Queue::receive`] call on the
    /// same store) that is blocked waiting on its empty queue, when there is one: the message is
    /// inserted already leased to that receiver, in the same one statement and commit as any
    /// enqueue, and handed over in memory, so it starts without a claim and without a wake-up
    /// round trip through the database. It is as durable as any enqueued message: the lease is
    /// in the row, so if this process dies the lease expires and another receiver takes the
    /// message, and if the receiver stopped waiting in between, the enqueue gives the message
    /// back (available to everyone, its attempt uncounted). Order is kept: a receiver only
    /// offers while the last look at its queue found nothing due.
    pub async fn enqueue_messages(&self, messages: &[NewMessage]) -> Result<Vec<Enqueued>> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        if let [m] = messages
            && m.key.is_none()
            && matches!(m.run_at, RunAt::Now)
            && let Some(offer) = self.store.wake().take_offer(m.queue.as_str())
        {
            return self.hand_off(m, offer).await.map(|e| vec![e]);
        }
        let stored = self.store.message_insert_many(messages).await;
        if let Ok(enqueued) = &stored {
            crate::changes::record_enqueued(self.store.wake().changes(), messages, enqueued);
        }
        crate::metrics::count_enqueued(messages, stored)
    }

    /// Inserts `m` leased as `offer` asks and hands it over (see [`Queue::enqueue_messages`]).
    async fn hand_off(&self, m: &NewMessage, offer: TakenOffer) -> Result<Enqueued> {
        // On an error the offer drops unfulfilled, and its receiver looks at the queue again.
        let message = self.store.message_insert_leased(m, &offer.params).await?;
        crate::changes::record_claimed(self.store.wake().changes(), std::slice::from_ref(&message));
        crate::metrics::enqueued(std::slice::from_ref(m), std::iter::once(true));
        let id = message.id;
        let queue = offer.params.queue.clone();
        if let Some(message) = offer.deliver(message) {
            // The receiver stopped waiting between taking the offer and now: give the message
            // back for anyone to claim (a failure here leaves it to the expired-lease sweep).
            let lease = LeaseRef {
                id,
                attempt: Some(message.attempt),
            };
            if let Err(err) = give_back(&self.store, &queue, &[lease], NackAction::Release).await {
                tracing::warn!(%err, %id, "dray: cannot give back a message whose receiver left; it returns when its lease expires");
            }
        }
        Ok(Enqueued {
            id,
            duplicate: false,
        })
    }

    /// [`Queue::enqueue`] inside your transaction: the message exists if and only if it
    /// commits. Pass `&mut *tx` for a `sqlx::Transaction` begun on the same database (for
    /// SQLite, on [`Store::pool`]: the one writer connection, which every other write of the
    /// handle then waits for until the transaction ends, at most the store's acquire timeout
    /// (30 s by default) before [`Error::PoolExhausted`]; keep it short).
    pub async fn enqueue_in(
        &self,
        conn: &mut StoreConnection<S>,
        queue: &str,
        payload: &impl Serialize,
        options: &EnqueueOptions,
    ) -> Result<Enqueued> {
        let msg = self.message(queue, payload, options)?;
        let one = std::slice::from_ref(&msg);
        let mut out = crate::metrics::count_enqueued(
            one,
            self.store.message_insert_many_in(conn, one).await,
        )?;
        Ok(out.remove(0))
    }

    /// [`Queue::enqueue_many`] inside your transaction.
    pub async fn enqueue_many_in<P: Serialize>(
        &self,
        conn: &mut StoreConnection<S>,
        queue: &str,
        payloads: impl IntoIterator<Item = P>,
        options: &EnqueueOptions,
    ) -> Result<Vec<Enqueued>> {
        let msgs = self.build_many(queue, payloads, options)?;
        if msgs.is_empty() {
            return Ok(Vec::new());
        }
        crate::metrics::count_enqueued(&msgs, self.store.message_insert_many_in(conn, &msgs).await)
    }

    /// Receives up to `limit` messages, waiting up to `timeout` for the first one. Returned
    /// messages are leased for the queue's default lease.
    pub async fn receive(
        &self,
        queue: &str,
        limit: u32,
        timeout: Duration,
    ) -> Result<Vec<Message>> {
        self.receive_with(
            queue,
            &ReceiveOptions {
                limit,
                wait: timeout,
                lease: None,
            },
        )
        .await
    }

    /// Receives with every option spelled out.
    pub async fn receive_with(
        &self,
        queue: &str,
        options: &ReceiveOptions,
    ) -> Result<Vec<Message>> {
        self.receive_until(queue, options, std::future::pending::<()>())
            .await
    }

    /// [`Queue::receive_with`] that also returns (empty-handed) as soon as `stop` completes.
    /// `stop` only cuts the *waiting* short: a claim already sent to the database is always
    /// read back, so no message is leased and then forgotten.
    pub async fn receive_until(
        &self,
        queue: &str,
        options: &ReceiveOptions,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<Vec<Message>> {
        let mut stop = pin!(stop);
        let queue = QueueName::new(queue)?;
        options.validate()?;
        let lease = match options.lease {
            Some(lease) => lease,
            None => check_span("default_lease", self.config.default_lease, MIN_LEASE)?,
        };
        let params = ClaimParams {
            queue,
            limit: options.limit,
            lease,
            leased_by: self.config.receiver_id.clone(),
        };
        // `None`: a wait longer than the clock can count, which waits until a message arrives.
        let deadline = Instant::now().checked_add(options.wait);
        if !options.wait.is_zero() {
            self.store.listen().await?;
        }
        let signal = self.store.wake().signal(params.queue.as_str());
        loop {
            // Register for wake-ups before looking, so one that lands between the look and the
            // wait is not lost.
            let mut notified = pin!(signal.notify().notified());
            notified.as_mut().enable();
            self.rescue_if_due().await?;
            let wakes = signal.wakes();
            // Unless the last look found the queue empty and nothing has woken it since
            // (`QueueSignal::quiet_until`), look at the database.
            let until = match signal.quiet_until(wakes) {
                Some(until) => until,
                None => {
                    let got = self.store.message_claim(&params).await?;
                    if !got.is_empty() {
                        crate::changes::record_claimed(self.store.wake().changes(), &got);
                        return Ok(got);
                    }
                    let looked = Instant::now();
                    let mut quiet = self.store.poll_interval();
                    if let Some(due) = self.store.queue_next_due(&params.queue).await? {
                        // Due already (it came due since the claim looked, or another receiver
                        // is taking it): look again in a moment, not a poll interval later.
                        quiet = quiet.min(due.max(RELOOK_AFTER_DUE));
                    }
                    let until = looked + quiet;
                    signal.set_quiet(wakes, until);
                    until
                }
            };
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(Vec::new());
            }
            let wait = deadline
                .map_or(until, |d| d.min(until))
                .saturating_duration_since(now);
            let _waiting = signal.waiting_guard();
            // Offer to take the next message of this process's enqueues directly, while waiting.
            let mut offer = signal.offer(params.clone());
            let mut stopped = false;
            tokio::select! {
                got = offer.delivered() => match got {
                    Some(m) => return Ok(vec![m]),
                    None => continue, // the enqueue that took the offer stored nothing: look again
                },
                _ = notified => {}
                _ = tokio::time::sleep(wait) => {}
                _ = stop.as_mut() => stopped = true,
            }
            // An enqueue may have taken the offer just now: its message is ours.
            if let Some(m) = offer.settle().await {
                return Ok(vec![m]);
            }
            if stopped {
                return Ok(Vec::new());
            }
        }
    }

    /// Sweeps expired leases at most once per [`QueueConfig::rescue_interval`].
    async fn rescue_if_due(&self) -> Result<()> {
        if self.config.rescue_interval == Duration::MAX {
            return Ok(());
        }
        {
            let mut last = self.last_rescue.lock().unwrap_or_else(|p| p.into_inner());
            match *last {
                Some(t) if t.elapsed() < self.config.rescue_interval => return Ok(()),
                _ => *last = Some(Instant::now()),
            }
        }
        self.store.message_rescue_expired(None).await.map(|_| ())
    }

    /// Sweeps expired leases now (normally done by receivers as they poll). A store bounds one
    /// sweep (a window of 10,000 unfinished messages per call, see
    /// [`Store::message_rescue_expired`]): a lease behind a larger backlog comes back at a later
    /// call.
    pub async fn rescue_expired(&self) -> Result<RescueReport> {
        self.store.message_rescue_expired(None).await
    }

    /// A stream of messages: receives in batches of up to `batch`, yields them one by one, and
    /// ends when no message arrives for `timeout` (or after yielding an error). Each yielded
    /// message is leased; ack or nack it.
    pub fn consume(
        &self,
        queue: &str,
        batch: u32,
        timeout: Duration,
    ) -> impl Stream<Item = Result<Message>> + Send + 'static {
        struct State<S: Store> {
            queue: Queue<S>,
            name: String,
            options: ReceiveOptions,
            buffer: std::collections::VecDeque<Message>,
            done: bool,
        }
        let state = State {
            queue: self.clone(),
            name: queue.to_owned(),
            options: ReceiveOptions {
                limit: batch,
                wait: timeout,
                lease: None,
            },
            buffer: Default::default(),
            done: false,
        };
        futures_util::stream::unfold(state, |mut st| async move {
            if let Some(m) = st.buffer.pop_front() {
                return Some((Ok(m), st));
            }
            if st.done {
                return None;
            }
            match st.queue.receive_with(&st.name, &st.options).await {
                Ok(batch) if batch.is_empty() => None,
                Ok(batch) => {
                    st.buffer.extend(batch);
                    let first = st.buffer.pop_front()?;
                    Some((Ok(first), st))
                }
                Err(e) => {
                    st.done = true;
                    Some((Err(e), st))
                }
            }
        })
    }

    /// Acknowledges leased messages (they are completed); returns how many were.
    pub async fn ack<R: Into<LeaseRef>>(
        &self,
        queue: &str,
        refs: impl IntoIterator<Item = R>,
    ) -> Result<u64> {
        let (queue, refs) = Self::refs(queue, refs)?;
        let w = ack_recorded(&self.store, &queue, &refs).await?;
        Ok(w.applied.len() as u64)
    }

    /// Acknowledges one message you received, fenced: [`Error::LeaseLost`] if its lease was
    /// taken back meanwhile.
    pub async fn ack_lease(&self, message: &Message) -> Result<()> {
        let queue = QueueName::new(message.queue.as_str())?;
        let w = ack_recorded(&self.store, &queue, &[message.lease()]).await?;
        Self::fenced(message, w)
    }

    /// Negative-acknowledges leased messages: requeued for another delivery (dead instead
    /// when out of attempts), or dead at once when `requeue` is false. Returns how many changed.
    pub async fn nack<R: Into<LeaseRef>>(
        &self,
        queue: &str,
        refs: impl IntoIterator<Item = R>,
        requeue: bool,
    ) -> Result<u64> {
        let action = if requeue {
            NackAction::Requeue {
                delay: Duration::ZERO,
            }
        } else {
            NackAction::Dead
        };
        self.nack_with(queue, refs, action)
            .await
            .map(|w| w.applied.len() as u64)
    }

    /// [`Queue::nack`] with a redelivery delay or an explicit action; reports which went dead.
    pub async fn nack_with<R: Into<LeaseRef>>(
        &self,
        queue: &str,
        refs: impl IntoIterator<Item = R>,
        action: NackAction,
    ) -> Result<LeaseWrite> {
        check_span("delay", action.delay(), Duration::ZERO)?;
        let (queue, refs) = Self::refs(queue, refs)?;
        give_back(&self.store, &queue, &refs, action).await
    }

    /// Extends leases: each now ends `by` from the database's `now()` (a heartbeat). Returns
    /// how many leases were extended.
    pub async fn extend<R: Into<LeaseRef>>(
        &self,
        queue: &str,
        refs: impl IntoIterator<Item = R>,
        by: Duration,
    ) -> Result<u64> {
        check_span("lease", by, MIN_LEASE)?;
        let (queue, refs) = Self::refs(queue, refs)?;
        Ok(self
            .store
            .message_extend_many(&queue, &refs, by)
            .await?
            .applied
            .len() as u64)
    }

    /// Extends the lease of one message you received, fenced.
    pub async fn extend_lease(&self, message: &Message, by: Duration) -> Result<()> {
        check_span("lease", by, MIN_LEASE)?;
        let queue = QueueName::new(message.queue.as_str())?;
        let w = self
            .store
            .message_extend_many(&queue, &[message.lease()], by)
            .await?;
        Self::fenced(message, w)
    }

    /// Counts the queue's messages by state.
    pub async fn stats(&self, queue: &str) -> Result<QueueStats> {
        self.store.queue_stats(&QueueName::new(queue)?).await
    }

    /// Reads one message by id.
    pub async fn get(&self, id: Uuid) -> Result<Option<Message>> {
        self.store.message_get(id).await
    }

    fn refs<R: Into<LeaseRef>>(
        queue: &str,
        refs: impl IntoIterator<Item = R>,
    ) -> Result<(QueueName, Vec<LeaseRef>)> {
        let queue = QueueName::new(queue)?;
        let mut refs: Vec<LeaseRef> = refs.into_iter().map(Into::into).collect();
        refs.sort_by_key(|r| r.id);
        refs.dedup_by_key(|r| r.id);
        Ok((queue, refs))
    }

    fn fenced(message: &Message, w: LeaseWrite) -> Result<()> {
        if w.applied.contains(&message.id) {
            Ok(())
        } else {
            Err(Error::LeaseLost {
                id: message.id,
                attempt: message.attempt,
            })
        }
    }
}
