//! Live events (server-sent events): a job's status and progress to its end, a workflow run's
//! status and step changes to its end, and a stream of job state changes and per-queue counts
//! for dashboards.
//!
//! One hub per server follows everything subscribers watch. It is woken by the store's job
//! change feed ([`dray_core::changes`]: NOTIFY on PostgreSQL, in process on SQLite): when
//! followed jobs change, it reads them in one query, the queue counts once (only while someone
//! follows them), and each followed run once, at most once per
//! [`crate::ServerConfig::event_tick`], and fans the snapshots out to every subscriber through
//! watch channels. Without a change it reads everything again every ten ticks, and every tick
//! while runs are followed (a step inside a running attempt changes no job state) or where the
//! feed carries this process's changes only (SQLite: other processes on the file change jobs
//! too). A thousand subscribers to a thousand jobs cost one query per refresh, not a thousand;
//! nothing is read while nobody listens. `/events` streams take the job changes from the feed
//! directly, with no read at all.
//!
//! Every event carries an `id`: a fingerprint of the state it reports. A client that
//! reconnects with `Last-Event-ID` gets nothing until the state differs from the one it saw
//! last, then the current state (intermediate progress it missed is not replayed; the state
//! it resumes to is always the latest).

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use dray_core::QueueName;
use dray_core::api::QueueCounts;
use dray_core::changes::{Changes, JobChange};
use dray_core::workflow::{RunInfo, StepRecord};
use dray_core::{Error, JobStatus, Message};
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast::Receiver;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{Notify, watch};
use utoipa::IntoParams;
use uuid::Uuid;

use crate::error::{ApiError, ApiResult};
use crate::extract::{P, Q};
use crate::jobs::JobResult;
use crate::workflows::RunResult;
use crate::{App, ServerStore};

/// One server-sent event, as the OpenAPI document describes the stream's items: `event`
/// names it, `id` is the fingerprint to resume from, `data` is its JSON.
#[derive(Serialize, utoipa::ToSchema)]
pub struct SseEvent {
    /// `status`, `step`, `end`, `error`, `queues`, `queue`, `job` or `missed`.
    pub event: String,
    /// Send back as `Last-Event-ID` to resume.
    pub id: String,
    /// The event's JSON, as text.
    pub data: String,
}

/// What the hub last read of a followed thing.
#[derive(Clone, Debug, PartialEq)]
enum Snap<T> {
    Found(T),
    Missing,
}

type Followers<T> = Mutex<HashMap<Uuid, watch::Sender<Snap<T>>>>;

struct Shared<S> {
    store: S,
    jobs: Followers<Message>,
    runs: Followers<RunInfo>,
    queues: watch::Sender<Option<Vec<QueueCounts>>>,
    poke: Notify,
    reads: std::sync::atomic::AtomicU64,
}

/// The live-event hub.
pub struct Hub<S> {
    shared: Arc<Shared<S>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Keeps the followers somebody still listens to; answers their ids.
fn live_ids<T>(followers: &Followers<T>) -> Vec<Uuid> {
    let mut map = lock(followers);
    map.retain(|_, tx| tx.receiver_count() > 0);
    map.keys().copied().collect()
}

fn publish<T: PartialEq>(followers: &Followers<T>, id: Uuid, snap: Snap<T>) {
    if let Some(tx) = lock(followers).get(&id) {
        tx.send_if_modified(|cur| {
            if *cur == snap {
                false
            } else {
                *cur = snap;
                true
            }
        });
    }
}

impl<S: ServerStore> Shared<S> {
    fn idle(&self) -> bool {
        live_ids(&self.jobs).is_empty()
            && live_ids(&self.runs).is_empty()
            && self.queues.receiver_count() == 0
    }

    fn count_read(&self) {
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Reads what `dirty` says changed (everything when it is `full`) and publishes it.
    async fn refresh(&self, dirty: &Dirty) {
        let mut ids = live_ids(&self.jobs);
        if !dirty.full {
            ids.retain(|id| dirty.jobs.contains(id));
        }
        if !ids.is_empty() {
            self.count_read();
            match self.store.message_get_many(&ids).await {
                Ok(found) => {
                    let mut found: HashMap<Uuid, Message> =
                        found.into_iter().map(|m| (m.id, m)).collect();
                    for id in ids {
                        let snap = found.remove(&id).map_or(Snap::Missing, Snap::Found);
                        publish(&self.jobs, id, snap);
                    }
                }
                Err(e) => {
                    tracing::warn!(target: "dray::http", error = %e, "dray: live events could not read jobs; retrying next tick")
                }
            }
        }
        for run in live_ids(&self.runs) {
            self.count_read();
            match self.store.workflow_get(run).await {
                Ok(info) => publish(&self.runs, run, info.map_or(Snap::Missing, Snap::Found)),
                Err(e) => {
                    tracing::warn!(target: "dray::http", error = %e, "dray: live events could not read a run; retrying next tick")
                }
            }
        }
        if self.queues.receiver_count() > 0 && (dirty.full || !dirty.jobs.is_empty()) {
            self.count_read();
            match self.store.queue_list().await {
                Ok(list) => {
                    self.queues.send_if_modified(|cur| {
                        if cur.as_ref() == Some(&list) {
                            false
                        } else {
                            *cur = Some(list);
                            true
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(target: "dray::http", error = %e, "dray: live events could not count queues; retrying next tick")
                }
            }
        }
    }
}

/// What changed since the hub's last refresh.
#[derive(Default)]
struct Dirty {
    /// Read everything followed (a new follower, a gap in the feed, the fallback timer).
    full: bool,
    /// Jobs the feed reported changed.
    jobs: HashSet<Uuid>,
}

impl Dirty {
    fn add(
        &mut self,
        got: Option<Result<Changes, RecvError>>,
        feed: &mut Option<Receiver<Changes>>,
    ) {
        match got {
            Some(Ok(Changes::Jobs(changes))) => self.jobs.extend(changes.iter().map(|c| c.id)),
            Some(Ok(Changes::Missed) | Err(RecvError::Lagged(_))) => self.full = true,
            Some(Err(RecvError::Closed)) | None => {
                *feed = None;
                self.full = true;
            }
        }
    }

    fn any(&self) -> bool {
        self.full || !self.jobs.is_empty()
    }
}

/// The next item of the feed; never, without one.
async fn next_change(feed: &mut Option<Receiver<Changes>>) -> Option<Result<Changes, RecvError>> {
    match feed {
        Some(rx) => Some(rx.recv().await),
        None => std::future::pending().await,
    }
}

impl<S: ServerStore> Hub<S> {
    /// A hub on `store`; its task runs until `shutdown` turns true or its sender is dropped.
    /// Must be called inside a tokio runtime.
    pub fn new(store: S, tick: Duration, mut shutdown: watch::Receiver<bool>) -> Self {
        let shared = Arc::new(Shared {
            store,
            jobs: Mutex::new(HashMap::new()),
            runs: Mutex::new(HashMap::new()),
            queues: watch::channel(None).0,
            poke: Notify::new(),
            reads: std::sync::atomic::AtomicU64::new(0),
        });
        let task = shared.clone();
        let fallback = tick.saturating_mul(10);
        tokio::spawn(async move {
            let mut feed: Option<Receiver<Changes>> = None;
            let mut last = tokio::time::Instant::now();
            loop {
                let mut dirty = Dirty::default();
                if task.idle() {
                    feed = None;
                    tokio::select! {
                        _ = task.poke.notified() => dirty.full = true,
                        _ = shutdown.wait_for(|s| *s) => break,
                    }
                }
                if feed.is_none() {
                    // PostgreSQL: the feed arrives over LISTEN (without it, the fallback
                    // timer still refreshes).
                    if let Err(e) = task.store.listen().await {
                        tracing::warn!(target: "dray::http", error = %e, "dray: live events cannot LISTEN; refreshing on a timer");
                    }
                    feed = Some(task.store.wake().changes().subscribe());
                }
                if !dirty.any() {
                    // Runs change without a job change (a step inside an attempt); a feed
                    // that is not relayed (SQLite) misses other processes' changes: those are
                    // read every tick, as without a feed.
                    let poll = !lock(&task.runs).is_empty()
                        || (!task.store.wake().changes().relayed() && !task.idle());
                    let wait = if poll { tick } else { fallback };
                    tokio::select! {
                        got = next_change(&mut feed) => dirty.add(got, &mut feed),
                        _ = task.poke.notified() => dirty.full = true,
                        _ = tokio::time::sleep(wait) => dirty.full = true,
                        _ = shutdown.wait_for(|s| *s) => break,
                    }
                }
                // At most one refresh per tick: gather what else changes until then.
                let due = last + tick;
                loop {
                    tokio::select! {
                        got = next_change(&mut feed) => dirty.add(got, &mut feed),
                        _ = tokio::time::sleep_until(due) => break,
                        _ = shutdown.wait_for(|s| *s) => return,
                    }
                }
                last = tokio::time::Instant::now();
                task.refresh(&dirty).await;
            }
        });
        Hub { shared }
    }

    fn follow<T: Clone>(
        &self,
        followers: &Followers<T>,
        id: Uuid,
        now: T,
    ) -> watch::Receiver<Snap<T>> {
        let rx = lock(followers)
            .entry(id)
            .or_insert_with(|| watch::channel(Snap::Found(now)).0)
            .subscribe();
        self.shared.poke.notify_one();
        rx
    }

    /// Database reads the hub has made for all its subscribers together.
    pub fn reads(&self) -> u64 {
        self.shared.reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Streams following a job right now.
    pub fn job_followers(&self) -> usize {
        lock(&self.shared.jobs)
            .values()
            .map(watch::Sender::receiver_count)
            .sum()
    }

    fn follow_queues(&self) -> watch::Receiver<Option<Vec<QueueCounts>>> {
        let rx = self.shared.queues.subscribe();
        self.shared.poke.notify_one();
        rx
    }
}

fn fingerprint(v: &impl Serialize) -> String {
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    let digest = Sha256::digest(&bytes);
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn event(name: &str, id: &str, data: &impl Serialize) -> Event {
    Event::default()
        .event(name)
        .id(id)
        .json_data(data)
        .unwrap_or_else(|_| Event::default().event(name).id(id).data("{}"))
}

fn last_event_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

struct Following<T, F> {
    rx: watch::Receiver<T>,
    shutdown: watch::Receiver<bool>,
    render: F,
    first: bool,
    done: bool,
}

/// A stream that, on every change of `rx`, turns the snapshot into events, until `render`
/// says it is over or the server shuts down.
fn follow_stream<T, F>(
    rx: watch::Receiver<T>,
    shutdown: watch::Receiver<bool>,
    render: F,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static
where
    T: Clone + Send + Sync + 'static,
    F: FnMut(&T) -> (Vec<Event>, bool) + Send + 'static,
{
    let start = Following {
        rx,
        shutdown,
        render,
        first: true,
        done: false,
    };
    futures_util::stream::unfold(start, |mut st| async move {
        if st.done {
            return None;
        }
        if !st.first {
            tokio::select! {
                changed = st.rx.changed() => changed.ok()?,
                _ = st.shutdown.wait_for(|s| *s) => return None,
            }
        }
        st.first = false;
        let snap = st.rx.borrow_and_update().clone();
        let (events, over) = (st.render)(&snap);
        st.done = over;
        Some((events, st))
    })
    .flat_map(|events| futures_util::stream::iter(events.into_iter().map(Ok)))
}

/// A job's status and progress as they change, its outcome at the end, then the stream
/// closes. Events: `status` (id, state, attempt, progress, message) and `end` (the outcome).
#[utoipa::path(get, path = "/api/v1/jobs/{id}/events", tag = "events",
    params(("id" = Uuid, Path, description = "Job id"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume: the id of the last event received")),
    responses((status = 200, description = "text/event-stream of `status` events, then one `end`", content_type = "text/event-stream", body = SseEvent),
        crate::openapi::ReadErrors))]
pub async fn job_events<S: ServerStore>(
    State(app): State<App<S>>,
    P(id): P<Uuid>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let m = app
        .client()
        .get(id)
        .await?
        .ok_or(ApiError::from(Error::NotFound { id }))?;
    let rx = app.hub().follow(&app.hub().shared.jobs, id, m);
    let mut last = last_event_id(&headers);
    let stream = follow_stream(rx, app.shutdown_signal(), move |snap| match snap {
        Snap::Found(m) => {
            let status = JobStatus::from(m);
            let fp = fingerprint(&status);
            let terminal = m.state.is_terminal();
            if last.as_deref() == Some(fp.as_str()) {
                return (Vec::new(), terminal);
            }
            last = Some(fp.clone());
            let mut events = vec![event("status", &fp, &status)];
            if terminal {
                events.push(event("end", &fp, &JobResult::from(m.clone())));
            }
            (events, terminal)
        }
        Snap::Missing => (
            vec![event(
                "error",
                "gone",
                &serde_json::json!({"code": "not_found", "detail": "the job is gone (pruned after its retention)"}),
            )],
            true,
        ),
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// The status of a run, as `status` events carry it.
#[derive(Serialize)]
struct RunStatusEvent<'a> {
    run_id: Uuid,
    status: dray_core::RunStatus,
    attempt: i32,
    steps: usize,
    note: Option<&'a str>,
}

/// A run's status and step changes, its outcome at the end, then the stream closes. Events:
/// `status`, `step` (one per step that is new or changed), `end`.
#[utoipa::path(get, path = "/api/v1/workflows/{run}/events", tag = "events",
    params(("run" = Uuid, Path, description = "Run id"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume: the id of the last event received")),
    responses((status = 200, description = "text/event-stream of `status` and `step` events, then one `end`", content_type = "text/event-stream", body = SseEvent),
        crate::openapi::ReadErrors))]
pub async fn run_events<S: ServerStore>(
    State(app): State<App<S>>,
    P(run): P<Uuid>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let info = app.client().describe(run).await?;
    let rx = app.hub().follow(&app.hub().shared.runs, run, info);
    let mut last = last_event_id(&headers);
    let mut seen: Vec<StepRecord> = Vec::new();
    let mut last_status = None;
    let stream = follow_stream(rx, app.shutdown_signal(), move |snap| match snap {
        Snap::Found(info) => {
            let fp = fingerprint(&(info.status, info.attempt, &info.steps));
            let terminal = info.status.is_terminal();
            if last.as_deref() == Some(fp.as_str()) {
                return (Vec::new(), terminal);
            }
            last = Some(fp.clone());
            let mut events = Vec::new();
            if last_status != Some((info.status, info.attempt)) {
                last_status = Some((info.status, info.attempt));
                events.push(event(
                    "status",
                    &fp,
                    &RunStatusEvent {
                        run_id: run,
                        status: info.status,
                        attempt: info.attempt,
                        steps: info.steps.len(),
                        note: info.run.note.as_deref(),
                    },
                ));
            }
            for step in &info.steps {
                if !seen.contains(step) {
                    events.push(event("step", &fp, step));
                }
            }
            seen.clone_from(&info.steps);
            if terminal {
                events.push(event(
                    "end",
                    &fp,
                    &RunResult {
                        run_id: run,
                        status: info.status,
                        finished: true,
                        output: info.run.output.clone(),
                        error: info.run.error.clone(),
                    },
                ));
            }
            (events, terminal)
        }
        Snap::Missing => (
            vec![event(
                "error",
                "gone",
                &serde_json::json!({"code": "run_not_found", "detail": "the run is gone (pruned after its retention)"}),
            )],
            true,
        ),
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Filters of `GET /api/v1/events`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only the job changes of this queue (the counts still cover every queue).
    #[param(pattern = "^[A-Za-z0-9_.:-]{1,128}$")]
    pub queue: Option<String>,
    /// `false`: the per-queue counts only, no `job` events (default `true`).
    pub jobs: Option<bool>,
}

/// The `job` events of one subscriber: every change the store's feed reports (of one queue,
/// when asked), a `missed` event where the feed had a gap, until the server shuts down.
fn job_changes(
    feed: Receiver<Changes>,
    queue: Option<QueueName>,
    shutdown: watch::Receiver<bool>,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    let queue: Option<Arc<str>> = queue.map(|q| q.as_str().into());
    futures_util::stream::unfold((feed, shutdown), move |(mut feed, mut shutdown)| {
        let queue = queue.clone();
        async move {
            let got = tokio::select! {
                got = feed.recv() => got,
                _ = shutdown.wait_for(|s| *s) => return None,
            };
            let events: Vec<Event> = match got {
                Ok(Changes::Jobs(changes)) => changes
                    .iter()
                    .filter(|c| queue.as_deref().is_none_or(|q| q == c.queue))
                    .map(job_event)
                    .collect(),
                Ok(Changes::Missed) => vec![missed_event(None)],
                Err(RecvError::Lagged(n)) => vec![missed_event(Some(n))],
                Err(RecvError::Closed) => return None,
            };
            Some((events, (feed, shutdown)))
        }
    })
    .flat_map(|events| futures_util::stream::iter(events.into_iter().map(Ok)))
}

/// A `job` event. It has no id: a client's `Last-Event-ID` stays the last counts it saw.
fn job_event(change: &JobChange) -> Event {
    Event::default()
        .event("job")
        .json_data(change)
        .unwrap_or_else(|_| Event::default().event("job").data("{}"))
}

fn missed_event(batches: Option<u64>) -> Event {
    Event::default()
        .event("missed")
        .json_data(serde_json::json!({
            "detail": "job changes were lost here (the stream fell behind, or the database connection that carries them was lost); re-read what you show",
            "batches": batches,
        }))
        .unwrap_or_else(|_| Event::default().event("missed").data("{}"))
}

/// Job state changes and per-queue counts, for dashboards: one `queues` event with every
/// queue, then a `queue` event for each queue whose counts change, and a `job` event for each
/// job that changes state (or reports progress) anywhere. It does not end.
#[utoipa::path(get, path = "/api/v1/events", tag = "events",
    params(EventsQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume: the id of the last event received")),
    responses((status = 200, description = "text/event-stream of `queues`, `queue`, `job` and `missed` events", content_type = "text/event-stream", body = SseEvent),
        crate::openapi::ReadErrors))]
pub async fn all_events<S: ServerStore>(
    State(app): State<App<S>>,
    Q(q): Q<EventsQuery>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let queue = q.queue.map(QueueName::new).transpose()?;
    let jobs = if q.jobs.unwrap_or(true) {
        // PostgreSQL: the changes of every process arrive over LISTEN.
        app.store().listen().await?;
        Some(job_changes(
            app.store().wake().changes().subscribe(),
            queue,
            app.shutdown_signal(),
        ))
    } else {
        None
    };
    let counts = queue_counts(
        app.hub().follow_queues(),
        app.shutdown_signal(),
        last_event_id(&headers),
    );
    let stream = match jobs {
        Some(jobs) => futures_util::stream::select(counts, jobs).left_stream(),
        None => counts.right_stream(),
    };
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// The `queues` and `queue` events of one subscriber.
fn queue_counts(
    rx: watch::Receiver<Option<Vec<QueueCounts>>>,
    shutdown: watch::Receiver<bool>,
    mut last: Option<String>,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    let mut before: Option<HashMap<String, QueueCounts>> = None;
    follow_stream(rx, shutdown, move |snap| {
        let Some(list) = snap else {
            return (Vec::new(), false);
        };
        let fp = fingerprint(list);
        if last.as_deref() == Some(fp.as_str()) {
            before = Some(list.iter().map(|q| (q.queue.clone(), q.clone())).collect());
            return (Vec::new(), false);
        }
        last = Some(fp.clone());
        let events = match &before {
            None => vec![event("queues", &fp, &serde_json::json!({ "queues": list }))],
            Some(prev) => list
                .iter()
                .filter(|q| prev.get(&q.queue) != Some(*q))
                .map(|q| event("queue", &fp, q))
                .collect(),
        };
        before = Some(list.iter().map(|q| (q.queue.clone(), q.clone())).collect());
        (events, false)
    })
}
