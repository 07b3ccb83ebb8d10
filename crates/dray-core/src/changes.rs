//! The job change feed: jobs' state changes as they happen, for live views (the HTTP server's
//! `/api/v1/events` stream, a dashboard, a test).
//!
//! A change is recorded by the process that makes it, after its write commits: an enqueue
//! (available or scheduled), a claim (running), progress, a completion, a failed attempt
//! (retryable or dead), a cancel, a re-drive, a job given back. Enqueues made inside the
//! caller's own transaction are not recorded (the process cannot know when that commits): such
//! a job appears at its claim. Leases the maintenance sweep takes back are not recorded either
//! (the per-queue counts show them).
//!
//! **Nothing is recorded while nobody watches**, so the feed costs the hot path one atomic
//! load per batch until somebody subscribes:
//! - SQLite (and any store that does not relay): changes go straight to the subscribers of the
//!   same process, and only while there are any. Changes made by other processes on the same
//!   file are not seen.
//! - PostgreSQL relays: a process with subscribers announces it on the store's NOTIFY channel
//!   every [`WATCH_EVERY`]; every process that hears it records its changes for
//!   [`WATCH_TTL`] after the last announcement and sends them, batched, on the same channel;
//!   the watching processes deliver them to their subscribers. So a watcher sees the changes
//!   of every process sharing the database, a few milliseconds after they commit.
//!
//! The feed is a live view, not a log: a subscriber that falls behind, or a relay whose LISTEN
//! connection was lost, gets [`Changes::Missed`] and should re-read what it shows.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{Notify, broadcast};
use uuid::Uuid;

use crate::types::{
    Enqueued, LeaseRef, LeaseWrite, Message, MessageState, NewMessage, QueueName, RunAt,
};

/// How often a process with subscribers announces that it watches (relayed feeds).
pub const WATCH_EVERY: Duration = Duration::from_secs(5);

/// How long after the last announcement other processes keep recording their changes.
pub const WATCH_TTL: Duration = Duration::from_secs(15);

/// Batches a subscriber may fall behind by before it gets [`Changes::Missed`].
pub const FEED_CAPACITY: usize = 1024;

/// Changes a relayed feed keeps waiting for its relay; past that (the database is slow or
/// unreachable) it drops them and sends watchers [`Changes::Missed`] instead.
pub const MAX_OUTGOING: usize = 100_000;

/// One job's change of state (or progress).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobChange {
    /// The job.
    pub id: Uuid,
    /// Its queue.
    pub queue: String,
    /// The state it is in now.
    pub state: MessageState,
    /// Its attempt now (0 before its first claim), when the process that made the change
    /// knew it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<i32>,
    /// Progress reported by the running attempt (0–100), when that is the change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<u8>,
}

impl JobChange {
    /// A change of `id` on `queue` to `state` at `attempt`.
    pub fn new(id: Uuid, queue: &str, state: MessageState, attempt: Option<i32>) -> Self {
        JobChange {
            id,
            queue: queue.to_owned(),
            state,
            attempt,
            progress: None,
        }
    }
}

/// What a subscriber receives.
#[derive(Clone, Debug, PartialEq)]
pub enum Changes {
    /// Changes that committed together (or close together).
    Jobs(Arc<[JobChange]>),
    /// Changes may have been lost here (the subscriber fell behind, or the relay's connection
    /// was lost): re-read what is shown.
    Missed,
}

/// The feed of one store handle (shared by its clones; see the module docs).
#[derive(Debug)]
pub struct ChangeFeed {
    local: broadcast::Sender<Changes>,
    relayed: AtomicBool,
    epoch: Instant,
    /// Milliseconds after `epoch` until which somebody (here or elsewhere) watches.
    watched_until: AtomicU64,
    outgoing: Mutex<Vec<JobChange>>,
    /// Changes were dropped since the relay last took the outgoing ones.
    overflowed: AtomicBool,
    ready: Notify,
}

impl Default for ChangeFeed {
    fn default() -> Self {
        ChangeFeed {
            local: broadcast::channel(FEED_CAPACITY).0,
            relayed: AtomicBool::new(false),
            epoch: Instant::now(),
            watched_until: AtomicU64::new(0),
            outgoing: Mutex::new(Vec::new()),
            overflowed: AtomicBool::new(false),
            ready: Notify::new(),
        }
    }
}

impl ChangeFeed {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// True while changes should be recorded: somebody in this process subscribes, or (relayed)
    /// somebody anywhere announced within [`WATCH_TTL`].
    pub fn watched(&self) -> bool {
        if self.relayed.load(Ordering::Relaxed) {
            self.now_ms() < self.watched_until.load(Ordering::Relaxed)
        } else {
            self.local.receiver_count() > 0
        }
    }

    /// Records the changes `make` builds, if anybody watches (`make` is not called otherwise).
    pub fn record_with<I: IntoIterator<Item = JobChange>>(&self, make: impl FnOnce() -> I) {
        if !self.watched() {
            return;
        }
        let changes: Vec<JobChange> = make().into_iter().collect();
        if changes.is_empty() {
            return;
        }
        if self.relayed.load(Ordering::Relaxed) {
            let mut out = lock(&self.outgoing);
            if out.len() + changes.len() > MAX_OUTGOING {
                self.overflowed.store(true, Ordering::Relaxed);
            } else {
                out.extend(changes);
            }
            drop(out);
            self.ready.notify_one();
        } else {
            let _ = self.local.send(Changes::Jobs(changes.into()));
        }
    }

    /// Records a write to leases of `queue` (a completion, a failure, a give-back): each ref
    /// the write applied to is now in `state`, or dead where the write says so.
    pub fn record_write(
        &self,
        queue: &str,
        refs: &[LeaseRef],
        write: &LeaseWrite,
        state: MessageState,
    ) {
        self.record_with(|| {
            refs.iter()
                .filter(|r| write.applied.contains(&r.id))
                .map(|r| {
                    let state = if write.dead.contains(&r.id) {
                        MessageState::Dead
                    } else {
                        state
                    };
                    JobChange::new(r.id, queue, state, r.attempt)
                })
                .collect::<Vec<_>>()
        });
    }

    /// Subscribes to every change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Changes> {
        let rx = self.local.subscribe();
        if self.relayed.load(Ordering::Relaxed) {
            // Record our own changes at once; the relay announces to the others.
            self.heard_watching();
            self.ready.notify_one();
        }
        rx
    }

    /// True when the feed carries the changes of every process sharing the database (see
    /// [`ChangeFeed::set_relayed`]), false when only this process's.
    pub fn relayed(&self) -> bool {
        self.relayed.load(Ordering::Relaxed)
    }

    /// True while this process has subscribers.
    pub fn subscribed(&self) -> bool {
        self.local.receiver_count() > 0
    }

    /// Makes this feed relayed: recorded changes wait in [`ChangeFeed::take_outgoing`] for the
    /// store to send, and come back through [`ChangeFeed::deliver`].
    pub fn set_relayed(&self) {
        self.relayed.store(true, Ordering::Relaxed);
    }

    /// Signalled when there are changes to send, or a subscriber to announce.
    pub fn ready(&self) -> &Notify {
        &self.ready
    }

    /// The recorded changes not sent yet, and whether some were dropped before them (see
    /// [`MAX_OUTGOING`]).
    pub fn take_outgoing(&self) -> (Vec<JobChange>, bool) {
        let out = std::mem::take(&mut *lock(&self.outgoing));
        (out, self.overflowed.swap(false, Ordering::Relaxed))
    }

    /// Delivers relayed changes to this process's subscribers.
    pub fn deliver(&self, changes: Vec<JobChange>) {
        if !changes.is_empty() && self.subscribed() {
            let _ = self.local.send(Changes::Jobs(changes.into()));
        }
    }

    /// Tells subscribers that changes may have been lost.
    pub fn missed(&self) {
        if self.subscribed() {
            let _ = self.local.send(Changes::Missed);
        }
    }

    /// Somebody announced that they watch: record changes for [`WATCH_TTL`].
    pub fn heard_watching(&self) {
        let until = self
            .now_ms()
            .saturating_add(u64::try_from(WATCH_TTL.as_millis()).unwrap_or(u64::MAX));
        self.watched_until.fetch_max(until, Ordering::Relaxed);
    }
}

/// Records progress of a running attempt (when the write applied).
pub fn record_progress(
    feed: &ChangeFeed,
    queue: &QueueName,
    lease: LeaseRef,
    write: &LeaseWrite,
    percent: u8,
) {
    feed.record_with(|| {
        write.applied.contains(&lease.id).then(|| JobChange {
            progress: Some(percent.min(100)),
            ..JobChange::new(
                lease.id,
                queue.as_str(),
                MessageState::Running,
                lease.attempt,
            )
        })
    });
}

/// Records the new jobs of an enqueue (the duplicates changed nothing).
pub fn record_enqueued(feed: &ChangeFeed, messages: &[NewMessage], enqueued: &[Enqueued]) {
    feed.record_with(|| {
        let now = chrono::Utc::now();
        messages
            .iter()
            .zip(enqueued)
            .filter(|(_, e)| !e.duplicate)
            .map(|(m, e)| {
                let state = match m.run_at {
                    RunAt::After(d) if !d.is_zero() => MessageState::Scheduled,
                    RunAt::At(t) if t > now => MessageState::Scheduled,
                    _ => MessageState::Available,
                };
                JobChange::new(e.id, m.queue.as_str(), state, Some(0))
            })
            .collect::<Vec<_>>()
    });
}

/// Records claimed (or handed-off) messages as running.
pub fn record_claimed(feed: &ChangeFeed, messages: &[Message]) {
    feed.record_with(|| {
        messages
            .iter()
            .map(|m| JobChange::new(m.id, &m.queue, MessageState::Running, Some(m.attempt)))
            .collect::<Vec<_>>()
    });
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How relayed changes travel as NOTIFY payloads on the store's channel, beside the queue
/// names of enqueue wake-ups. Queue names cannot contain `!`, `;` or `,`, so the payloads
/// cannot be mistaken for one.
pub mod relay {
    use super::{JobChange, MessageState, Uuid};

    /// The payload announcing that a process watches.
    pub const WATCHING: &str = "!w";
    /// The prefix of a payload carrying changes.
    pub const CHANGES: &str = "!c";
    /// The payload telling watchers that a process dropped changes.
    pub const MISSED: &str = "!m";
    /// The largest payload made (PostgreSQL refuses payloads of 8,000 bytes or more).
    pub const MAX_PAYLOAD: usize = 7_900;

    /// What a payload on the channel is.
    #[derive(Debug, PartialEq)]
    pub enum Payload<'a> {
        /// A queue has new work.
        Queue(&'a str),
        /// Somebody watches.
        Watching,
        /// A process dropped changes.
        Missed,
        /// Changes (the entries that could not be read are left out).
        Changes(Vec<JobChange>),
    }

    /// Encodes changes into as few payloads as fit: `!c` then `state,attempt,progress,id,queue`
    /// entries separated by `;` (progress empty when there is none).
    pub fn encode(changes: &[JobChange]) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = String::from(CHANGES);
        for c in changes {
            let entry = format!(
                "{},{},{},{},{}",
                c.state.as_str(),
                c.attempt.map(|a| a.to_string()).unwrap_or_default(),
                c.progress.map(|p| p.to_string()).unwrap_or_default(),
                c.id.simple(),
                c.queue
            );
            if cur.len() > CHANGES.len() && cur.len() + 1 + entry.len() > MAX_PAYLOAD {
                out.push(std::mem::replace(&mut cur, String::from(CHANGES)));
            }
            if cur.len() > CHANGES.len() {
                cur.push(';');
            }
            cur.push_str(&entry);
        }
        if cur.len() > CHANGES.len() {
            out.push(cur);
        }
        out
    }

    fn entry(s: &str) -> Option<JobChange> {
        let mut parts = s.splitn(5, ',');
        let state = MessageState::parse(parts.next()?).ok()?;
        let attempt = match parts.next()? {
            "" => None,
            a => Some(a.parse().ok()?),
        };
        let progress = match parts.next()? {
            "" => None,
            p => Some(p.parse().ok()?),
        };
        let id = Uuid::try_parse(parts.next()?).ok()?;
        let queue = parts.next()?.to_owned();
        Some(JobChange {
            id,
            queue,
            state,
            attempt,
            progress,
        })
    }

    /// Reads a payload.
    pub fn parse(payload: &str) -> Payload<'_> {
        if payload == WATCHING {
            Payload::Watching
        } else if payload == MISSED {
            Payload::Missed
        } else if let Some(rest) = payload.strip_prefix(CHANGES) {
            Payload::Changes(rest.split(';').filter_map(entry).collect())
        } else {
            Payload::Queue(payload)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::relay::{Payload, encode, parse};
    use super::*;

    fn change(i: u128, queue: &str) -> JobChange {
        JobChange {
            id: Uuid::from_u128(i),
            queue: queue.into(),
            state: MessageState::Running,
            attempt: (!i.is_multiple_of(3)).then_some(2),
            progress: i.is_multiple_of(2).then_some(40),
        }
    }

    #[test]
    fn payloads_round_trip_and_stay_under_the_limit() {
        let changes: Vec<JobChange> = (0..500).map(|i| change(i, "emails.high")).collect();
        let payloads = encode(&changes);
        assert!(payloads.len() > 1, "500 changes need several payloads");
        let mut back = Vec::new();
        for p in &payloads {
            assert!(p.len() <= relay::MAX_PAYLOAD);
            match parse(p) {
                Payload::Changes(c) => back.extend(c),
                other => panic!("not changes: {other:?}"),
            }
        }
        assert_eq!(back, changes);
        assert_eq!(parse("emails"), Payload::Queue("emails"));
        assert_eq!(parse(relay::WATCHING), Payload::Watching);
        assert_eq!(parse(relay::MISSED), Payload::Missed);
        assert_eq!(encode(&[]), Vec::<String>::new());
        // A damaged entry costs only itself.
        let p = format!("{};bogus;{}", &payloads[0][..], "running,1,,zz,q");
        match parse(&p) {
            Payload::Changes(c) => assert_eq!(c.len(), payloads[0].split(';').count()),
            other => panic!("not changes: {other:?}"),
        }
    }

    #[tokio::test]
    async fn local_feed_records_only_while_subscribed() {
        let feed = ChangeFeed::default();
        let mut built = false;
        feed.record_with(|| {
            built = true;
            vec![change(1, "q")]
        });
        assert!(!built, "nothing is built while nobody watches");
        let mut rx = feed.subscribe();
        feed.record_with(|| vec![change(2, "q")]);
        assert_eq!(
            rx.recv().await.unwrap(),
            Changes::Jobs(vec![change(2, "q")].into())
        );
        drop(rx);
        assert!(!feed.watched());
    }

    #[tokio::test]
    async fn relayed_feed_waits_for_the_relay() {
        let feed = ChangeFeed::default();
        feed.set_relayed();
        feed.record_with(|| vec![change(1, "q")]);
        assert_eq!(
            feed.take_outgoing(),
            (vec![], false),
            "not watched: not recorded"
        );
        feed.heard_watching();
        feed.record_with(|| vec![change(3, "q")]);
        assert_eq!(feed.take_outgoing(), (vec![change(3, "q")], false));
        // A relay that cannot keep up: changes past the bound are dropped, and said so.
        feed.record_with(|| (0..MAX_OUTGOING as u128).map(|i| change(i, "q")));
        feed.record_with(|| vec![change(5, "q")]);
        let (kept, dropped) = feed.take_outgoing();
        assert_eq!((kept.len(), dropped), (MAX_OUTGOING, true));
        assert_eq!(feed.take_outgoing(), (vec![], false));
        let mut rx = feed.subscribe();
        feed.deliver(vec![change(4, "q")]);
        feed.missed();
        assert_eq!(
            rx.recv().await.unwrap(),
            Changes::Jobs(vec![change(4, "q")].into())
        );
        assert_eq!(rx.recv().await.unwrap(), Changes::Missed);
    }
}
