//! In-process wake-ups: how a receiver blocked in `receive` learns that work may be waiting.
//!
//! Stores signal the hub when they insert or requeue (SQLite: after the commit, in process;
//! PostgreSQL: from LISTEN/NOTIFY, so other processes' enqueues arrive too). A wake-up is a hint,
//! never a promise: the receiver always re-checks the database, and polls at
//! [`crate::Store::poll_interval`] in case a hint was lost.
//!
//! The hub also carries *offers*: a receiver blocked on an empty queue offers to take the next
//! message of that queue directly. An enqueue in the same process that finds an offer inserts
//! its message already leased to that receiver and hands it over in memory, so the receiver
//! starts it without a claim of its own (see [`crate::Queue::enqueue_messages`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{Notify, oneshot};

use crate::changes::ChangeFeed;
use crate::types::{ClaimParams, Message};

/// Wake-up channels, one per queue name.
#[derive(Debug, Default)]
pub struct WakeHub {
    queues: Mutex<HashMap<String, Arc<QueueSignal>>>,
    changes: ChangeFeed,
}

/// One queue's wake-up channel.
#[derive(Debug, Default)]
pub struct QueueSignal {
    notify: Notify,
    /// Wake-ups so far: a look at the database is as fresh as the count it began at.
    wakes: AtomicU64,
    /// The last look that found nothing to claim: the wake count it began at, and until when
    /// nothing it knows of comes due (see [`QueueSignal::quiet_until`]).
    quiet: Mutex<Option<(u64, Instant)>>,
    waiting: AtomicUsize,
    offers: Mutex<VecDeque<Standing>>,
    next_offer: AtomicU64,
}

/// An offer waiting in [`QueueSignal`]: the lease its receiver would claim with, and where the
/// message goes.
#[derive(Debug)]
struct Standing {
    id: u64,
    params: ClaimParams,
    deliver: oneshot::Sender<Message>,
}

impl QueueSignal {
    /// The notifier; call `notified()` and `enable()` it *before* checking the database, so a
    /// wake-up between the check and the wait is not lost.
    pub fn notify(&self) -> &Notify {
        &self.notify
    }

    /// How many wake-ups this queue has had. A receiver reads it before it looks at the
    /// database; a wake-up after that makes the look stale.
    pub fn wakes(&self) -> u64 {
        self.wakes.load(Ordering::SeqCst)
    }

    /// Records that a look at the database, begun when [`QueueSignal::wakes`] was `wakes`,
    /// found nothing to claim, and that nothing it saw comes due before `until`.
    pub fn set_quiet(&self, wakes: u64, until: Instant) {
        *self.quiet.lock().unwrap_or_else(|p| p.into_inner()) = Some((wakes, until));
    }

    /// When the last look found nothing to claim, no wake-up has come since (`wakes` is still
    /// the count it began at) and its `until` is still ahead: that `until`. A receiver may then
    /// wait without looking again: everything that makes a message claimable sooner wakes the
    /// queue (an enqueue, a release, a retry, a rescue, a NOTIFY or, on SQLite, another
    /// process's commit), and what does not (a due time, another process's write that sends
    /// no wake-up) is bounded by `until`, which is at most one poll interval after the look.
    /// So a receiver that was just handed a message goes back to waiting at once, instead of
    /// looking at an empty queue after every job of a steady trickle.
    pub fn quiet_until(&self, wakes: u64) -> Option<Instant> {
        let quiet = *self.quiet.lock().unwrap_or_else(|p| p.into_inner());
        quiet
            .filter(|&(w, until)| w == wakes && until > Instant::now())
            .map(|(_, until)| until)
    }

    /// Counts the caller as blocked on this queue until the guard drops.
    pub fn waiting_guard(self: &Arc<Self>) -> WaitingGuard {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        WaitingGuard(self.clone())
    }

    /// Offers to take the next new message of this queue directly, leased as `params` says.
    /// The offer stands until it is taken or the returned [`Offer`] settles or drops.
    pub fn offer(self: &Arc<Self>, params: ClaimParams) -> Offer {
        let id = self.next_offer.fetch_add(1, Ordering::Relaxed);
        let (deliver, delivered) = oneshot::channel();
        self.offers().push_back(Standing {
            id,
            params,
            deliver,
        });
        Offer {
            signal: self.clone(),
            id,
            delivered: Some(delivered),
        }
    }

    /// Takes the oldest standing offer whose receiver is still there.
    fn take_offer(&self) -> Option<TakenOffer> {
        let mut offers = self.offers();
        while let Some(s) = offers.pop_front() {
            if !s.deliver.is_closed() {
                return Some(TakenOffer {
                    params: s.params,
                    deliver: s.deliver,
                });
            }
        }
        None
    }

    /// Removes a standing offer; false when it was taken meanwhile.
    fn withdraw(&self, id: u64) -> bool {
        let mut offers = self.offers();
        match offers.iter().position(|s| s.id == id) {
            Some(i) => {
                offers.remove(i);
                true
            }
            None => false,
        }
    }

    /// Counts a wake-up (making every earlier look stale), then wakes the waiting receivers.
    fn wake(&self) {
        self.wakes.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    fn offers(&self) -> std::sync::MutexGuard<'_, VecDeque<Standing>> {
        self.offers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A receiver's standing offer (see [`QueueSignal::offer`]).
#[derive(Debug)]
pub struct Offer {
    signal: Arc<QueueSignal>,
    id: u64,
    delivered: Option<oneshot::Receiver<Message>>,
}

impl Offer {
    /// Waits until an enqueue takes the offer: `Some` with the message, leased as offered, or
    /// `None` when the enqueue that took it did not store a message (then the receiver should
    /// look at the queue again). Cancel-safe; pending forever once it has returned.
    pub async fn delivered(&mut self) -> Option<Message> {
        match self.delivered.as_mut() {
            Some(rx) => {
                let got = rx.await.ok();
                self.delivered = None;
                got
            }
            None => std::future::pending().await,
        }
    }

    /// True once an enqueue has taken the offer (whether or not it has delivered yet).
    pub fn taken(&self) -> bool {
        self.delivered.is_none() || !self.signal.offers().iter().any(|s| s.id == self.id)
    }

    /// Ends the offer. When an enqueue took it meanwhile, waits for that enqueue and returns
    /// its message: once taken, a message is this receiver's to run or give back.
    pub async fn settle(mut self) -> Option<Message> {
        let rx = self.delivered.take()?;
        if self.signal.withdraw(self.id) {
            return None;
        }
        rx.await.ok()
    }
}

impl Drop for Offer {
    fn drop(&mut self) {
        if self.delivered.is_some() {
            self.signal.withdraw(self.id);
        }
    }
}

/// An offer an enqueue has taken: it owes the receiver the message it stores (or nothing,
/// by dropping this, when it stores none).
#[derive(Debug)]
pub struct TakenOffer {
    /// The lease the receiver asked for.
    pub params: ClaimParams,
    deliver: oneshot::Sender<Message>,
}

impl TakenOffer {
    /// Hands the stored message over; returns it when the receiver has gone meanwhile.
    pub fn deliver(self, message: Message) -> Option<Message> {
        self.deliver.send(message).err()
    }
}

/// Keeps a receiver counted in [`WakeHub::waiting`] while it is blocked.
#[derive(Debug)]
pub struct WaitingGuard(Arc<QueueSignal>);

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl WakeHub {
    /// A new hub with no queues.
    pub fn new() -> Self {
        Self::default()
    }

    /// The store's job change feed (see [`crate::changes`]).
    pub fn changes(&self) -> &ChangeFeed {
        &self.changes
    }

    /// The signal for `queue`, created on first use.
    pub fn signal(&self, queue: &str) -> Arc<QueueSignal> {
        let mut map = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = map.get(queue) {
            return s.clone();
        }
        let s = Arc::new(QueueSignal::default());
        map.insert(queue.to_owned(), s.clone());
        s
    }

    /// Wakes every receiver waiting on `queue`.
    pub fn wake(&self, queue: &str) {
        let map = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = map.get(queue) {
            s.wake();
        }
    }

    /// Takes the oldest standing offer of `queue` whose receiver is still waiting for it.
    pub fn take_offer(&self, queue: &str) -> Option<TakenOffer> {
        let signal = {
            let map = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            map.get(queue)?.clone()
        };
        signal.take_offer()
    }

    /// Wakes every waiting receiver of every queue (after a lost LISTEN connection, when
    /// wake-ups may have been missed).
    pub fn wake_all(&self) {
        let map = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        for s in map.values() {
            s.wake();
        }
    }

    /// True while a receiver is blocked on any queue: a store that has to look for other
    /// processes' writes itself (SQLite) looks only then.
    pub fn any_waiting(&self) -> bool {
        let map = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        map.values().any(|s| s.waiting.load(Ordering::SeqCst) > 0)
    }

    /// How many receivers are blocked waiting on `queue` right now (a test signal: a test waits
    /// for this to reach 1 before it enqueues, instead of sleeping).
    pub fn waiting(&self, queue: &str) -> usize {
        let map = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        map.get(queue)
            .map_or(0, |s| s.waiting.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::QueueName;
    use std::time::Duration;

    fn params(holder: &str) -> ClaimParams {
        ClaimParams {
            queue: QueueName::new("q").unwrap(),
            limit: 1,
            lease: Duration::from_secs(30),
            leased_by: Some(holder.to_owned()),
        }
    }

    fn message(id: u128) -> Message {
        let now = chrono::Utc::now();
        crate::batch::RowHead {
            id: uuid::Uuid::from_u128(id),
            kind: None,
            key: None,
            payload: serde_json::Value::Null,
            headers: Default::default(),
            priority: crate::Priority(0),
            attempt: 1,
            max_attempts: 1,
            enqueued_at: now,
            run_at: now,
            leased_until: Some(now),
            errors: Vec::new(),
            progress: None,
            progress_message: None,
            cancel_requested: false,
            callback_url: None,
        }
        .with(crate::batch::RowTail::claimed(&params("r")))
    }

    #[tokio::test]
    async fn offers_are_taken_oldest_first_and_skip_receivers_that_left() {
        let hub = WakeHub::new();
        assert!(hub.take_offer("q").is_none(), "no queue, no offer");
        let signal = hub.signal("q");
        let gone = signal.offer(params("gone"));
        let mut first = signal.offer(params("first"));
        let mut second = signal.offer(params("second"));
        drop(gone);
        let taken = hub.take_offer("q").unwrap();
        assert_eq!(taken.params.leased_by.as_deref(), Some("first"));
        assert!(first.taken() && !second.taken());
        assert!(taken.deliver(message(1)).is_none());
        assert_eq!(
            first.delivered().await.unwrap().id,
            uuid::Uuid::from_u128(1)
        );
        // A taken offer that is dropped unfulfilled tells its receiver to look again.
        let taken = hub.take_offer("q").unwrap();
        drop(taken);
        assert!(second.delivered().await.is_none());
        assert!(hub.take_offer("q").is_none(), "every offer is used");
    }

    #[test]
    fn a_quiet_look_stands_until_a_wake_up_or_its_end() {
        let hub = WakeHub::new();
        let signal = hub.signal("q");
        let other = hub.signal("other");
        assert_eq!(signal.quiet_until(signal.wakes()), None, "no look yet");
        let until = Instant::now() + Duration::from_secs(60);
        signal.set_quiet(signal.wakes(), until);
        assert_eq!(signal.quiet_until(signal.wakes()), Some(until));
        hub.wake("other");
        assert_eq!(
            signal.quiet_until(signal.wakes()),
            Some(until),
            "another queue's wake-up changes nothing here"
        );
        hub.wake("q");
        assert_eq!(
            signal.quiet_until(signal.wakes()),
            None,
            "woken: look again"
        );
        // A look that began before a wake-up and recorded its result after it is stale.
        let began = signal.wakes();
        hub.wake("q");
        signal.set_quiet(began, until);
        assert_eq!(signal.quiet_until(signal.wakes()), None);
        signal.set_quiet(signal.wakes(), until);
        hub.wake_all();
        assert_eq!(signal.quiet_until(signal.wakes()), None);
        assert!(other.wakes() >= 2);
        signal.set_quiet(signal.wakes(), Instant::now());
        assert_eq!(
            signal.quiet_until(signal.wakes()),
            None,
            "ended: look again"
        );
    }

    #[test]
    fn any_waiting_counts_blocked_receivers_of_every_queue() {
        let hub = WakeHub::new();
        assert!(!hub.any_waiting());
        let idle = hub.signal("idle");
        let busy = hub.signal("busy");
        let guard = busy.waiting_guard();
        assert!(hub.any_waiting() && hub.waiting("busy") == 1 && hub.waiting("idle") == 0);
        drop(guard);
        drop(idle);
        assert!(!hub.any_waiting());
    }

    #[tokio::test]
    async fn a_settled_offer_is_withdrawn_unless_taken_and_then_waits_for_the_message() {
        let hub = WakeHub::new();
        let signal = hub.signal("q");
        let offer = signal.offer(params("r"));
        assert!(offer.settle().await.is_none());
        assert!(
            hub.take_offer("q").is_none(),
            "a settled offer is withdrawn"
        );
        // Taken before it settles: settling waits for the enqueue and returns its message.
        let offer = signal.offer(params("r"));
        let taken = hub.take_offer("q").unwrap();
        let settle = tokio::spawn(offer.settle());
        tokio::task::yield_now().await;
        assert!(taken.deliver(message(2)).is_none());
        assert_eq!(settle.await.unwrap().unwrap().id, uuid::Uuid::from_u128(2));
        // The receiver left after its offer was taken: the message comes back to the enqueue.
        let offer = signal.offer(params("r"));
        let taken = hub.take_offer("q").unwrap();
        drop(offer);
        assert_eq!(
            taken.deliver(message(3)).unwrap().id,
            uuid::Uuid::from_u128(3)
        );
    }
}
