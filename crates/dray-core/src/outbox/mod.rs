//! The transactional outbox and the inbox (Forze's outbox and inbox ports).
//!
//! **Outbox**: stage events in memory, then [`Outbox::flush`] writes them inside your own
//! transaction, so they exist if and only if your business writes commit. A [`Relay`] claims
//! them, publishes each to a [`Sink`] (a Dray queue here; brokers behind features), and marks
//! them published; failures retry with backoff up to `max_attempts`, then wait as `failed` until
//! re-driven. Delivery is at least once: consumers deduplicate on the event id.
//!
//! **Inbox**: [`Client::inbox_begin`](crate::Client::inbox_begin) opens a transaction that has
//! recorded a message id as seen, or answers `None` when it was seen before: a consumer's
//! effects and the mark commit together, so each message's effects happen exactly once.

pub mod store;
pub mod types;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde::Serialize;
use uuid::Uuid;

pub use store::OutboxStore;
pub use types::{OutboxEvent, OutboxRetry, OutboxRow, OutboxStats, OutboxStatus};

use crate::error::{Error, Result};
use crate::job::{Backoff, CancelToken, RetryPolicy};
use crate::store::{Store, StoreConnection};
use crate::types::{NewMessage, Priority, QueueName, RunAt};

/// The header that carries an event's id on every delivered message.
pub const EVENT_ID_HEADER: &str = "dray-event-id";
/// The header that carries an event's type.
pub const EVENT_TYPE_HEADER: &str = "dray-event-type";
/// The header that carries an event's ordering key, when it has one.
pub const ORDERING_KEY_HEADER: &str = "dray-ordering-key";

/// Default tries of an event before it is `failed`.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 5;

/// Checks an outbox or inbox name: 1-128 characters from `A-Z a-z 0-9 _ . : -`.
pub fn check_name(what: &'static str, name: &str) -> Result<()> {
    QueueName::new(name).map(|_| ()).map_err(|_| {
        Error::invalid(
            what,
            format!(
                "{:?}: use 1-128 characters from A-Z a-z 0-9 _ . : -",
                crate::error::excerpt(name)
            ),
        )
    })
}

/// The command side of one outbox: events staged in memory, written by [`Outbox::flush`]
/// inside the caller's transaction.
#[derive(Clone, Debug)]
pub struct Outbox {
    name: String,
    staged: Vec<OutboxEvent>,
}

impl Outbox {
    /// The outbox `name`.
    pub fn new(name: &str) -> Result<Outbox> {
        check_name("outbox", name)?;
        Ok(Outbox {
            name: name.to_owned(),
            staged: Vec::new(),
        })
    }

    /// The outbox's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stages one event of `event_type` with `payload` (Forze `stage`); set its id, time and
    /// ordering key with [`Outbox::stage_event`] instead.
    pub fn stage(&mut self, event_type: &str, payload: &impl Serialize) -> Result<&mut Self> {
        self.stage_event(OutboxEvent::new(event_type, payload)?)
    }

    /// Stages a built event (Forze `stage_event`).
    pub fn stage_event(&mut self, mut event: OutboxEvent) -> Result<&mut Self> {
        event.check()?;
        crate::trace::inject(&mut event.headers);
        self.staged.push(event);
        Ok(self)
    }

    /// Stages many (Forze `stage_many`).
    pub fn stage_many(
        &mut self,
        events: impl IntoIterator<Item = OutboxEvent>,
    ) -> Result<&mut Self> {
        for e in events {
            self.stage_event(e)?;
        }
        Ok(self)
    }

    /// Events staged and not yet flushed.
    pub fn staged(&self) -> &[OutboxEvent] {
        &self.staged
    }

    /// Writes the staged events inside the caller's transaction (Forze `flush`) and clears
    /// them; returns how many rows were written (an event whose id is there already is
    /// dropped). Rolled back, no event exists; committed, they will be delivered.
    pub async fn flush<S: OutboxStore>(
        &mut self,
        store: &S,
        conn: &mut StoreConnection<S>,
    ) -> Result<u64> {
        if self.staged.is_empty() {
            return Ok(0);
        }
        let n = store
            .outbox_insert_in(conn, &self.name, &self.staged)
            .await?;
        self.staged.clear();
        Ok(n)
    }

    /// Stages `event` in `outbox` and writes it at once, in the caller's transaction.
    pub async fn publish_in<S: OutboxStore>(
        store: &S,
        conn: &mut StoreConnection<S>,
        outbox: &str,
        event: OutboxEvent,
    ) -> Result<u64> {
        let mut o = Outbox::new(outbox)?;
        o.stage_event(event)?;
        o.flush(store, conn).await
    }
}

/// Why a publish failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishError {
    /// What went wrong.
    pub message: String,
    /// True when a retry cannot help (the event is `failed` at once).
    pub permanent: bool,
}

impl PublishError {
    /// A failure worth retrying (the broker is down, a timeout).
    pub fn transient(e: impl std::fmt::Display) -> Self {
        PublishError {
            message: e.to_string(),
            permanent: false,
        }
    }
    /// This failure as the answer for every event of a batch.
    pub fn for_each<T>(&self, events: &[T]) -> Vec<std::result::Result<(), PublishError>> {
        events.iter().map(|_| Err(self.clone())).collect()
    }

    /// A failure no retry fixes.
    pub fn permanent(e: impl std::fmt::Display) -> Self {
        PublishError {
            message: e.to_string(),
            permanent: true,
        }
    }
}

/// Where a relay delivers events. One call publishes a batch and answers per event.
pub trait Sink: Send + Sync + 'static {
    /// A short description for logs (`queue orders`, `nats subject …`).
    fn describe(&self) -> String;
    /// Publishes `events`; one result per event, in order.
    fn publish<'a>(
        &'a self,
        events: &'a [OutboxRow],
    ) -> BoxFuture<'a, Vec<std::result::Result<(), PublishError>>>;
}

/// The headers every delivered message carries.
pub fn event_headers(e: &OutboxRow) -> BTreeMap<String, String> {
    let mut h = e.headers.clone();
    h.insert(EVENT_ID_HEADER.to_owned(), e.event_id.clone());
    h.insert(EVENT_TYPE_HEADER.to_owned(), e.event_type.clone());
    if let Some(k) = &e.ordering_key {
        h.insert(ORDERING_KEY_HEADER.to_owned(), k.clone());
    }
    h
}

/// Relays to a Dray queue (Forze's relay-to-queue kit): each event becomes a message whose
/// kind is the event type and whose dedup key is the event id, with the event headers.
#[derive(Clone, Debug)]
pub struct QueueSink<S: Store> {
    store: S,
    queue: QueueName,
}

impl<S: Store> QueueSink<S> {
    /// Delivers to `queue` of `store` (any store; it need not be the outbox's).
    pub fn new(store: S, queue: &str) -> Result<Self> {
        Ok(QueueSink {
            store,
            queue: QueueName::new(queue)?,
        })
    }
}

impl<S: Store> Sink for QueueSink<S> {
    fn describe(&self) -> String {
        format!("queue {}", self.queue)
    }

    fn publish<'a>(
        &'a self,
        events: &'a [OutboxRow],
    ) -> BoxFuture<'a, Vec<std::result::Result<(), PublishError>>> {
        async move {
            let messages: Vec<NewMessage> = events
                .iter()
                .map(|e| NewMessage {
                    id: Uuid::now_v7(),
                    queue: self.queue.clone(),
                    kind: Some(e.event_type.clone()),
                    key: Some(e.event_id.clone()),
                    payload: e.payload.to_string(),
                    headers: serde_json::to_string(&event_headers(e))
                        .unwrap_or_else(|_| "{}".into()),
                    priority: Priority::NORMAL,
                    run_at: RunAt::Now,
                    enqueued_at: None,
                    max_attempts: crate::job::DEFAULT_JOB_ATTEMPTS,
                    callback_url: None,
                })
                .collect();
            let stored = self.store.message_insert_many(&messages).await;
            match crate::metrics::count_enqueued(&messages, stored) {
                Ok(_) => events.iter().map(|_| Ok(())).collect(),
                Err(e) => PublishError::transient(format!("enqueue to {}: {e}", self.queue))
                    .for_each(events),
            }
        }
        .boxed()
    }
}

/// Settings of a [`Relay`].
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Who claims (recorded on claimed rows).
    pub relay_id: String,
    /// Most events claimed and published per round (default 500).
    pub batch: u32,
    /// Tries of an event before it is `failed` (default 5).
    pub max_attempts: i32,
    /// Delays between tries: exponential from 1 s to 5 min, with jitter.
    pub backoff: RetryPolicy,
    /// How often an idle relay looks for new events (default 100 ms; a commit in this
    /// process wakes it sooner on PostgreSQL through NOTIFY).
    pub poll: Duration,
    /// Events claimed longer ago than this are taken back from a dead relay (default 5 min).
    pub stale_after: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            relay_id: format!("relay-{}", &Uuid::now_v7().simple().to_string()[20..]),
            batch: 500,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff: RetryPolicy {
                max_attempts: DEFAULT_MAX_ATTEMPTS,
                backoff: Backoff::Exponential,
                base: Duration::from_secs(1),
                max: Duration::from_secs(300),
                jitter: true,
            },
            poll: Duration::from_millis(100),
            stale_after: Duration::from_secs(300),
        }
    }
}

/// What a publish left to mark.
#[derive(Debug, Default)]
struct Marks {
    claimed: usize,
    published: Vec<Uuid>,
    retries: Vec<OutboxRetry>,
    failed: Vec<(Uuid, String)>,
}

/// What one relay round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayRound {
    /// Events claimed.
    pub claimed: usize,
    /// Delivered.
    pub published: usize,
    /// Sent back for a later try.
    pub retried: usize,
    /// Failed for good.
    pub failed: usize,
}

/// Claims an outbox's events, publishes them to a sink, and marks them.
pub struct Relay<S: OutboxStore> {
    store: S,
    pub(crate) outbox: String,
    sink: Arc<dyn Sink>,
    config: RelayConfig,
}

impl<S: OutboxStore> std::fmt::Debug for Relay<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("outbox", &self.outbox)
            .field("sink", &self.sink.describe())
            .field("config", &self.config)
            .finish()
    }
}

impl<S: OutboxStore> Relay<S> {
    /// A relay of `outbox` to `sink`, with default settings.
    pub fn new(store: S, outbox: &str, sink: impl Sink) -> Result<Self> {
        check_name("outbox", outbox)?;
        Ok(Relay {
            store,
            outbox: outbox.to_owned(),
            sink: Arc::new(sink),
            config: RelayConfig::default(),
        })
    }

    /// Changes settings.
    pub fn configure(mut self, f: impl FnOnce(&mut RelayConfig)) -> Result<Self> {
        f(&mut self.config);
        let c = &self.config;
        if c.batch == 0 || c.max_attempts < 1 {
            return Err(Error::invalid(
                "relay",
                "batch and max_attempts must be at least 1",
            ));
        }
        crate::duration::check_span("poll", c.poll, Duration::from_millis(1))?;
        crate::duration::check_span("stale_after", c.stale_after, Duration::from_millis(1))?;
        Ok(self)
    }

    /// One round: claim a batch, publish it, mark each event.
    pub async fn run_once(&self) -> Result<RelayRound> {
        let rows = self.claim().await?;
        let marks = self.publish(&rows).await?;
        self.mark(marks).await
    }

    async fn claim(&self) -> Result<Vec<OutboxRow>> {
        self.store
            .outbox_claim(&self.outbox, self.config.batch, &self.config.relay_id)
            .await
    }

    /// Publishes claimed rows and sorts them into what to mark.
    async fn publish(&self, rows: &[OutboxRow]) -> Result<Marks> {
        let mut marks = Marks {
            claimed: rows.len(),
            ..Marks::default()
        };
        if rows.is_empty() {
            return Ok(marks);
        }
        let outcomes = std::panic::AssertUnwindSafe(self.sink.publish(rows))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| {
                rows.iter()
                    .map(|_| Err(PublishError::transient("the sink panicked")))
                    .collect()
            });
        let mut now = None;
        let latency = metrics::histogram!(crate::metrics::OUTBOX_PUBLISH_LATENCY, "outbox" => self.outbox.clone());
        let published_at = chrono::Utc::now();
        for (row, outcome) in rows
            .iter()
            .zip(
                outcomes
                    .into_iter()
                    .chain(std::iter::repeat(Err(PublishError::transient(
                        "the sink gave no answer for this event",
                    )))),
            )
        {
            match outcome {
                Ok(()) => {
                    // Created when its UUIDv7 id was made, at the stage.
                    if let Some(created) = crate::metrics::uuid_time(row.id) {
                        latency.record(crate::metrics::seconds(published_at - created));
                    }
                    marks.published.push(row.id)
                }
                Err(e) if e.permanent || row.attempts >= self.config.max_attempts => {
                    marks.failed.push((row.id, e.message));
                }
                Err(e) => {
                    let now = match now {
                        Some(n) => n,
                        None => *now.insert(self.store.now().await?),
                    };
                    let delay = self
                        .config
                        .backoff
                        .delay(row.attempts, row.id.as_u128() as u64);
                    marks.retries.push(OutboxRetry {
                        id: row.id,
                        attempts: row.attempts,
                        available_at: now + chrono::TimeDelta::from_std(delay).unwrap_or_default(),
                        error: e.message,
                    });
                }
            }
        }
        Ok(marks)
    }

    /// Records what a publish did.
    async fn mark(&self, marks: Marks) -> Result<RelayRound> {
        let mut round = RelayRound {
            claimed: marks.claimed,
            ..RelayRound::default()
        };
        let label = || self.outbox.clone();
        if !marks.published.is_empty() {
            round.published = self.store.outbox_mark_published(&marks.published).await? as usize;
            metrics::counter!(crate::metrics::OUTBOX_PUBLISHED, "outbox" => label())
                .increment(round.published as u64);
        }
        let failures = marks.retries.len() + marks.failed.len();
        if failures > 0 {
            metrics::counter!(crate::metrics::OUTBOX_PUBLISH_FAILURES, "outbox" => label())
                .increment(failures as u64);
        }
        if !marks.retries.is_empty() {
            for r in &marks.retries {
                tracing::warn!(outbox = %self.outbox, event = %r.id, attempt = r.attempts, error = %r.error, sink = %self.sink.describe(), "dray: publish failed; retrying later");
            }
            round.retried = self.store.outbox_mark_retry(&marks.retries).await? as usize;
        }
        for (id, error) in &marks.failed {
            tracing::error!(outbox = %self.outbox, event = %id, %error, sink = %self.sink.describe(), "dray: event failed for good; `dray outbox requeue-failed` re-drives it");
            round.failed += self
                .store
                .outbox_mark_failed(std::slice::from_ref(id), error)
                .await? as usize;
        }
        Ok(round)
    }

    /// Runs rounds until `stop`: back to back while there are events (each batch claimed while
    /// the previous one's marks are written), then waits `poll` or a wake-up; takes back stale
    /// claims every so often.
    pub async fn run(&self, stop: CancelToken) {
        let signal = self.store.wake().signal(&wake_channel(&self.outbox));
        let stale_every = (self.config.stale_after / 5).max(Duration::from_millis(100));
        let mut last_reclaim: Option<tokio::time::Instant> = None;
        let mut backoff = Duration::from_millis(100);
        let mut pending: Option<Marks> = None;
        loop {
            if stop.is_cancelled() {
                break;
            }
            if last_reclaim.is_none_or(|t| t.elapsed() >= stale_every) {
                match self
                    .store
                    .outbox_reclaim_stale(&self.outbox, self.config.stale_after)
                    .await
                {
                    Ok(n) if n > 0 => {
                        tracing::warn!(outbox = %self.outbox, n, "dray: took back events a relay claimed and never marked")
                    }
                    Ok(_) => {}
                    Err(err) => {
                        tracing::warn!(%err, "dray: could not take back stale outbox claims")
                    }
                }
                last_reclaim = Some(tokio::time::Instant::now());
            }
            let notified = signal.notify().notified();
            // Pipelined: the next batch is claimed while the last one's marks are written
            // (publishes stay in order, one batch after the other).
            let (claimed, marked) = futures_util::future::join(self.claim(), async {
                match pending.take() {
                    Some(m) => self.mark(m).await.map(Some),
                    None => Ok(None),
                }
            })
            .await;
            if let Err(err) = marked {
                tracing::warn!(%err, outbox = %self.outbox, "dray: could not mark relayed events; they are relayed again after stale_after");
            }
            let wait = match claimed {
                Ok(rows) => match self.publish(&rows).await {
                    Ok(marks) => {
                        backoff = Duration::from_millis(100);
                        let any = !rows.is_empty();
                        pending = Some(marks);
                        if any {
                            // Go again at once: more may be waiting, and the marks go out with
                            // the next claim.
                            continue;
                        }
                        self.config.poll
                    }
                    Err(err) => {
                        tracing::warn!(%err, outbox = %self.outbox, "dray: relay round failed; retrying");
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        backoff
                    }
                },
                Err(err) => {
                    tracing::warn!(%err, outbox = %self.outbox, "dray: relay round failed; retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    backoff
                }
            };
            if let Some(m) = pending.take()
                && let Err(err) = self.mark(m).await
            {
                tracing::warn!(%err, outbox = %self.outbox, "dray: could not mark relayed events; they are relayed again after stale_after");
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = notified => {}
                _ = stop.cancelled() => break,
            }
        }
        if let Some(m) = pending.take()
            && let Err(err) = self.mark(m).await
        {
            tracing::warn!(%err, outbox = %self.outbox, "dray: could not mark relayed events; they are relayed again after stale_after");
        }
    }

    /// Runs [`Relay::run`] in a task; stop it with [`RelayHandle::shutdown`].
    pub fn spawn(self) -> RelayHandle {
        let stop = CancelToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move { self.run(s).await });
        RelayHandle { stop, task }
    }
}

/// The wake-up channel of an outbox in a store's wake hub (its NOTIFY payload on PostgreSQL).
pub fn wake_channel(outbox: &str) -> String {
    format!("outbox:{outbox}")
}

/// A running relay.
#[derive(Debug)]
pub struct RelayHandle {
    stop: CancelToken,
    task: tokio::task::JoinHandle<()>,
}

impl RelayHandle {
    /// Stops after the round in flight.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

impl<S: OutboxStore> crate::Client<S> {
    /// Opens a transaction that has recorded `message_id` as seen in `inbox`, or answers
    /// `None` when it was seen before (Forze's `process_with_inbox`): write the message's
    /// effects through it and commit, and they happen exactly once however often the message
    /// is delivered.
    ///
    /// ```ignore
    /// if let Some(mut tx) = client.inbox_begin("billing", &event_id).await? {
    ///     sqlx::query("INSERT INTO invoices …").execute(&mut *tx).await?;
    ///     tx.commit().await?;
    /// }
    /// ```
    pub async fn inbox_begin(
        &self,
        inbox: &str,
        message_id: &str,
    ) -> Result<Option<sqlx::Transaction<'static, S::Database>>> {
        check_name("inbox", inbox)?;
        if message_id.is_empty() || message_id.len() > 512 {
            return Err(Error::invalid("message_id", "use 1 to 512 bytes"));
        }
        let mut tx = self
            .store()
            .pool()
            .begin()
            .await
            .map_err(Error::db("inbox_begin"))?;
        if self
            .store()
            .inbox_mark_if_unseen_in(&mut *tx, inbox, message_id)
            .await?
        {
            Ok(Some(tx))
        } else {
            let _ = tx.rollback().await;
            Ok(None)
        }
    }

    /// [`Client::inbox_begin`](crate::Client::inbox_begin) for a message received from a Dray
    /// queue (Forze's `process_with_inbox` for a queue consumer): the id recorded is
    /// [`inbox_message_id`] (the event id it carries, else its key, else its id). For a job
    /// handler, `inbox_begin(inbox, &ctx.id().to_string())` makes the job's effects and the
    /// mark one transaction.
    pub async fn inbox_begin_message(
        &self,
        inbox: &str,
        message: &crate::Message,
    ) -> Result<Option<sqlx::Transaction<'static, S::Database>>> {
        self.inbox_begin(inbox, &inbox_message_id(message)).await
    }

    /// Stats of an outbox.
    pub async fn outbox_stats(&self, outbox: &str) -> Result<OutboxStats> {
        check_name("outbox", outbox)?;
        self.store().outbox_stats(outbox).await
    }

    /// An outbox's events, newest first.
    pub async fn outbox_list(
        &self,
        outbox: &str,
        status: Option<OutboxStatus>,
        limit: u32,
    ) -> Result<Vec<OutboxRow>> {
        check_name("outbox", outbox)?;
        self.store()
            .outbox_list(outbox, status, crate::batch::list_limit(limit))
            .await
    }

    /// Re-drives failed events (all, or `ids`), attempts back to 0.
    pub async fn outbox_requeue_failed(&self, outbox: &str, ids: Option<&[Uuid]>) -> Result<u64> {
        check_name("outbox", outbox)?;
        self.store().outbox_requeue_failed(outbox, ids).await
    }
}

/// The id an inbox records for a delivered queue message: its event id header when it came
/// through an outbox, else its dedup key, else its id.
pub fn inbox_message_id(m: &crate::Message) -> String {
    m.headers
        .get(EVENT_ID_HEADER)
        .cloned()
        .or_else(|| m.key.clone())
        .unwrap_or_else(|| m.id.to_string())
}
