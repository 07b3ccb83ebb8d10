//! In-process wake-ups: how a receiver blocked in `receive` learns that work may be waiting.
//!
//! Stores signal the hub when they insert or requeue (SQLite: after the commit, in process;
//! PostgreSQL: from LISTEN/NOTIFY, so other processes' enqueues arrive too). A wake-up is a hint,
//! never a promise: the receiver always re-checks the database, and polls at
//! [`crate::Store::poll_interval`] in case a hint was lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Wake-up channels, one per queue name.
#[derive(Debug, Default)]
pub struct WakeHub {
    queues: Mutex<HashMap<String, Arc<QueueSignal>>>,
}

/// One queue's wake-up channel.
#[derive(Debug, Default)]
pub struct QueueSignal {
    notify: Notify,
    waiting: AtomicUsize,
}

impl QueueSignal {
    /// The notifier; call `notified()` and `enable()` it *before* checking the database, so a
    /// wake-up between the check and the wait is not lost.
    pub fn notify(&self) -> &Notify {
        &self.notify
    }

    /// Counts the caller as blocked on this queue until the guard drops.
    pub fn waiting_guard(self: &Arc<Self>) -> WaitingGuard {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        WaitingGuard(self.clone())
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
            s.notify.notify_waiters();
        }
    }

    /// Wakes every waiting receiver of every queue (after a lost LISTEN connection, when
    /// wake-ups may have been missed).
    pub fn wake_all(&self) {
        let map = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        for s in map.values() {
            s.notify.notify_waiters();
        }
    }

    /// How many receivers are blocked waiting on `queue` right now (a test signal: a test waits
    /// for this to reach 1 before it enqueues, instead of sleeping).
    pub fn waiting(&self, queue: &str) -> usize {
        let map = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        map.get(queue)
            .map_or(0, |s| s.waiting.load(Ordering::SeqCst))
    }
}
