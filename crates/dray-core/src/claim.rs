//! Claim cursors, which both stores share: where a store handle's next claim of a queue starts.
//!
//! A claim reads the store's claim index (every unfinished row of a queue, in delivery order:
//! −priority, due time, id) from the head and leases the first pending rows it finds. The rows
//! that earlier claims took sit at that head until they finish: as running rows on SQLite (they
//! stay in the index, so that a claim writes no index entry) and as running rows or dead index
//! entries on PostgreSQL (until VACUUM). Under a backlog, walking them is most of a claim's cost,
//! and it grows with everything claimed ahead. So a handle remembers the last row it claimed
//! from each queue, and its next claim starts just past it: one index descent.
//!
//! Rows can appear before the cursor: a higher priority enqueued later, a lease rescued or
//! released with its old due time, an enqueue whose transaction began before the claim and
//! committed after it, another process's writes. So the cursor is only a shortcut: a claim
//! scans from the head when the last head scan is older than the head-scan interval, and when
//! this handle enqueues, releases or rescues a row that may sort before the cursor. A row that
//! sorts before another process's cursor therefore waits at most one head-scan interval longer
//! than strict delivery order would have it wait.
//!
//! The head-scan interval is [`HEAD_SCAN_EVERY`] while a head scan is cheap, and grows with
//! what a head scan costs ([`HEAD_SCAN_SHARE`], up to [`HEAD_SCAN_MAX`]). The head is where the
//! finished jobs' index entries are until VACUUM removes them, and while another transaction
//! holds the database's xmin horizon back, VACUUM removes none: on PostgreSQL a head scan then
//! walks every job finished since (52 ms for 100,000 of them), where a claim from the cursor
//! walks only what came after it. While head scans are slow, a drained queue keeps its cursor
//! for the same reason (the jobs enqueued next sort after it); while they are cheap, a claim
//! that comes back short drops it, and the next starts at the head, one statement instead of
//! a claim from the cursor and another from the head.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::types::{Message, NewMessage, RunAt};

/// A position in a queue's delivery order: (−priority, due time, id), compared in that order,
/// as the stores' claim indexes sort their rows.
pub type ClaimKey = (i32, DateTime<Utc>, Uuid);

/// The key that sorts before every row: a claim "after" it starts at the head of the queue.
pub const HEAD: ClaimKey = (i32::MIN, DateTime::<Utc>::UNIX_EPOCH, Uuid::nil());

/// How often a claim starts from the head of the queue regardless of its cursor, while head
/// scans are cheap.
pub const HEAD_SCAN_EVERY: Duration = Duration::from_millis(100);

/// The share of the time that head scans may take: the interval between them is at least
/// the last one's duration times this (growing at most twofold per head scan).
pub const HEAD_SCAN_SHARE: u32 = 200;

/// The longest head-scan interval, however slow a head scan is.
pub const HEAD_SCAN_MAX: Duration = Duration::from_secs(10);

/// A message's position in its queue's delivery order.
pub fn claim_key(m: &Message) -> ClaimKey {
    (-i32::from(m.priority.0), m.run_at, m.id)
}

#[derive(Clone, Copy, Debug)]
struct Cursor {
    key: ClaimKey,
    head_scan_at: Instant,
    /// The head-scan interval, from the last head scan's cost.
    head_every: Duration,
}

/// The claim cursors of one store handle (shared by its clones), one per queue it claims from.
#[derive(Debug, Default)]
pub struct ClaimCursors(Mutex<HashMap<String, Cursor>>);

impl ClaimCursors {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Cursor>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Begins a claim of `queue`: the key its rows must sort after (the cursor when there is
    /// a fresh one, else [`HEAD`]), and the round that finishes it.
    ///
    /// The store leases up to its limit of pending rows after that key, in delivery order;
    /// when a claim from the cursor finds nothing, [`ClaimRound::retry`] gives the head to
    /// claim from once more; [`ClaimRound::finish`] then moves the cursor, before the rows are
    /// decoded: a store with one writer connection holds it from here to `finish`, and the
    /// next claim queued behind this one (another queue's, another worker's in the same
    /// process) starts from the new cursor while this one's rows are still being decoded.
    pub fn begin<'a>(&'a self, queue: &'a str) -> (ClaimRound<'a>, ClaimKey) {
        let (cursor, cheap_head) = {
            let cursors = self.lock();
            match cursors.get(queue) {
                Some(c) => (
                    (c.head_scan_at.elapsed() < c.head_every).then_some(c.key),
                    c.head_every <= HEAD_SCAN_EVERY,
                ),
                None => (None, true),
            }
        };
        let round = ClaimRound {
            cursors: self,
            queue,
            from_head: cursor.is_none(),
            cheap_head,
            started: Instant::now(),
        };
        (round, cursor.unwrap_or(HEAD))
    }

    /// The cursor a claim of `queue` may start from, or `None` when it should scan from the head.
    #[cfg(test)]
    fn start(&self, queue: &str) -> Option<ClaimKey> {
        let cursors = self.lock();
        let c = cursors.get(queue)?;
        (c.head_scan_at.elapsed() < c.head_every).then_some(c.key)
    }

    /// Where the last claim of `queue` through this handle ended, head scan due or not: the
    /// pending rows after it are the ones enqueued since, in delivery order (see
    /// `Store::queue_next_due`).
    pub fn peek(&self, queue: &str) -> Option<ClaimKey> {
        self.lock().get(queue).map(|c| c.key)
    }

    /// After a claim: the cursor moves past its greatest row. A head scan restarts the window
    /// and sets the head-scan interval from what it `cost`; one that found nothing leaves the
    /// cursor where it was. A `short` claim (the queue is drained) drops the cursor while head
    /// scans are cheap, so that the next claim starts at the head; while they are slow the
    /// cursor stays (the rows enqueued next sort after it).
    fn advance(
        &self,
        queue: &str,
        from_head: bool,
        short: bool,
        last: Option<ClaimKey>,
        cost: Duration,
    ) {
        let mut cursors = self.lock();
        // The interval follows the cost, but grows at most twofold per head scan: one scan
        // slowed by a busy machine (a scheduling delay, a checkpoint) must not push the next
        // one HEAD_SCAN_MAX away, where a row released or enqueued by another process before
        // the cursor would wait that long; a lasting slowdown still reaches it in a few scans.
        let before = cursors.get(queue).map_or(HEAD_SCAN_EVERY, |c| c.head_every);
        let head_every = (cost * HEAD_SCAN_SHARE)
            .clamp(HEAD_SCAN_EVERY, HEAD_SCAN_MAX)
            .min(before.saturating_mul(2));
        let cheap = match (from_head, cursors.get(queue)) {
            (true, _) => head_every <= HEAD_SCAN_EVERY,
            (false, Some(c)) => c.head_every <= HEAD_SCAN_EVERY,
            (false, None) => true,
        };
        if short && cheap {
            cursors.remove(queue);
            return;
        }
        if from_head {
            let now = Instant::now();
            match (cursors.get_mut(queue), last) {
                (_, Some(key)) => {
                    cursors.insert(
                        queue.to_owned(),
                        Cursor {
                            key,
                            head_scan_at: now,
                            head_every,
                        },
                    );
                }
                (Some(c), None) => {
                    c.head_scan_at = now;
                    c.head_every = head_every;
                }
                (None, None) => {}
            }
        } else if let (Some(c), Some(last)) = (cursors.get_mut(queue), last) {
            // Concurrent claims through this handle: the cursor only moves forward.
            c.key = c.key.max(last);
        }
    }

    /// Makes the next claim of `queue` start from the head, because a row that may sort before
    /// the cursor has become claimable (a release, a rescue).
    pub fn rewind(&self, queue: &str) {
        self.lock().remove(queue);
    }

    /// Rewinds the cursors that the messages being inserted may sort before: a higher priority
    /// than the cursor's row, or an explicit due time before it. (`Now` and delays are due
    /// after every row claimed so far.)
    pub fn rewind_for(&self, messages: &[NewMessage]) {
        let mut cursors = self.lock();
        if cursors.is_empty() {
            return;
        }
        for m in messages {
            let Some(c) = cursors.get(m.queue.as_str()) else {
                continue;
            };
            let neg = -i32::from(m.priority.0);
            let before = match m.run_at {
                RunAt::At(t) => (neg, t) < (c.key.0, c.key.1),
                RunAt::Now | RunAt::After(_) => neg < c.key.0,
            };
            if before {
                cursors.remove(m.queue.as_str());
            }
        }
    }
}

/// One claim of a queue, from [`ClaimCursors::begin`] to [`ClaimRound::finish`].
#[derive(Debug)]
pub struct ClaimRound<'a> {
    cursors: &'a ClaimCursors,
    queue: &'a str,
    from_head: bool,
    /// Whether the last head scan was cheap (so an empty claim may scan from the head too).
    cheap_head: bool,
    started: Instant,
}

impl ClaimRound<'_> {
    /// After a claim from the cursor found nothing: the head, to claim from once more (rows
    /// behind the cursor may have become pending again: released or rescued elsewhere), while
    /// head scans are cheap. `None` when the claim already started at the head, or when head
    /// scans are slow: the next due head scan finds those rows.
    pub fn retry(&mut self) -> Option<ClaimKey> {
        (!self.from_head && self.cheap_head).then(|| {
            self.from_head = true;
            self.started = Instant::now();
            HEAD
        })
    }

    /// Moves the cursor past the greatest key (`key_of`) of the rows claimed (in any order), of
    /// a claim of at most `limit` (see [`ClaimCursors`] for what a short claim does). A row
    /// whose key does not read (an unreadable row, which the store sets aside) does not move
    /// it. After a head scan, the time since [`ClaimCursors::begin`] sets the next head-scan
    /// interval.
    pub fn finish<R>(self, limit: u32, rows: &[R], key_of: impl Fn(&R) -> Option<ClaimKey>) {
        let last = rows.iter().filter_map(key_of).max();
        let short = rows.len() < limit as usize;
        self.cursors.advance(
            self.queue,
            self.from_head,
            short,
            last,
            self.started.elapsed(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Priority, QueueName};

    fn key(rank: i32, secs: i64, id: u128) -> ClaimKey {
        (
            rank,
            DateTime::from_timestamp(secs, 0).unwrap(),
            Uuid::from_u128(id),
        )
    }

    fn new_message(queue: &str, priority: i16, run_at: RunAt) -> NewMessage {
        NewMessage {
            id: Uuid::now_v7(),
            queue: QueueName::new(queue).unwrap(),
            kind: None,
            key: None,
            payload: "null".into(),
            headers: "{}".into(),
            priority: Priority(priority),
            run_at,
            enqueued_at: None,
            max_attempts: 1,
            callback_url: None,
        }
    }

    const CHEAP: Duration = Duration::from_micros(300);

    #[test]
    fn a_claim_from_the_head_sets_the_cursor_and_later_ones_only_move_it_forward() {
        let c = ClaimCursors::default();
        assert_eq!(c.start("q"), None, "no cursor: from the head");
        c.advance("q", true, false, Some(key(0, 10, 5)), CHEAP);
        assert_eq!(c.start("q"), Some(key(0, 10, 5)));
        c.advance("q", false, false, Some(key(0, 10, 9)), CHEAP);
        assert_eq!(c.start("q"), Some(key(0, 10, 9)));
        // A concurrent claim that started from an older cursor ends behind: no step back.
        c.advance("q", false, false, Some(key(0, 10, 7)), CHEAP);
        assert_eq!(c.start("q"), Some(key(0, 10, 9)));
        assert_eq!(c.start("other"), None, "cursors are per queue");
    }

    #[test]
    fn a_short_claim_drops_the_cursor_while_head_scans_are_cheap() {
        let c = ClaimCursors::default();
        c.advance("q", true, false, Some(key(0, 10, 5)), CHEAP);
        c.advance("q", false, true, Some(key(0, 10, 6)), CHEAP);
        assert_eq!(
            c.peek("q"),
            None,
            "drained: the next claim starts at the head"
        );
        // While head scans are slow, a short claim keeps it.
        c.advance(
            "q",
            true,
            false,
            Some(key(0, 10, 5)),
            Duration::from_millis(50),
        );
        c.advance("q", false, true, Some(key(0, 10, 6)), CHEAP);
        assert_eq!(c.peek("q"), Some(key(0, 10, 6)));
        c.advance("q", true, true, None, Duration::from_millis(50));
        assert_eq!(
            c.peek("q"),
            Some(key(0, 10, 6)),
            "a slow head scan that found nothing"
        );
    }

    #[test]
    fn while_head_scans_are_slow_a_claim_that_finds_nothing_keeps_the_cursor() {
        let c = ClaimCursors::default();
        let slow = Duration::from_millis(50);
        c.advance("q", true, false, Some(key(0, 10, 5)), slow);
        // Nothing claimed from the cursor: it stays.
        c.advance("q", false, true, None, CHEAP);
        assert_eq!(c.start("q"), Some(key(0, 10, 5)));
        // A slow head scan that finds nothing keeps it too.
        c.advance("q", true, true, None, slow);
        assert_eq!(c.peek("q"), Some(key(0, 10, 5)));
        // With no cursor, a head scan that finds nothing makes none.
        c.advance("r", true, true, None, slow);
        assert_eq!(c.peek("r"), None);
        // A claim from a cursor that is gone (rewound meanwhile) does not make one.
        c.advance("r", false, false, Some(key(0, 10, 5)), CHEAP);
        assert_eq!(c.peek("r"), None);
    }

    #[test]
    fn slow_head_scans_come_less_often() {
        let c = ClaimCursors::default();
        c.advance("q", true, false, Some(key(0, 10, 5)), CHEAP);
        assert_eq!(c.lock()["q"].head_every, HEAD_SCAN_EVERY);
        c.advance(
            "q",
            true,
            false,
            Some(key(0, 10, 5)),
            Duration::from_millis(10),
        );
        // One slow scan doubles the interval at most; slow scans in a row reach their cost's
        // share, then the ceiling.
        assert_eq!(c.lock()["q"].head_every, HEAD_SCAN_EVERY * 2);
        for _ in 0..8 {
            c.advance("q", true, false, None, Duration::from_millis(10));
        }
        assert_eq!(
            c.lock()["q"].head_every,
            Duration::from_millis(10) * HEAD_SCAN_SHARE
        );
        for _ in 0..4 {
            c.advance("q", true, false, None, Duration::from_secs(1));
        }
        assert_eq!(c.lock()["q"].head_every, HEAD_SCAN_MAX);
        // A cheap scan brings it straight back.
        c.advance("q", true, false, None, CHEAP);
        assert_eq!(c.lock()["q"].head_every, HEAD_SCAN_EVERY);
        for _ in 0..8 {
            c.advance("q", true, false, None, Duration::from_secs(1));
        }
        // While they are slow, an empty claim from the cursor does not retry from the head.
        c.lock().get_mut("q").unwrap().head_scan_at = Instant::now();
        let (mut round, after) = c.begin("q");
        assert_eq!(after, key(0, 10, 5));
        assert_eq!(round.retry(), None);
    }

    #[test]
    fn a_round_moves_the_cursor_past_the_greatest_readable_row() {
        let c = ClaimCursors::default();
        let (mut round, after) = c.begin("q");
        assert_eq!(after, HEAD);
        assert_eq!(round.retry(), None, "already at the head");
        // Rows in any order: the cursor goes past the greatest. (The round's cost is what
        // finish measures from `started`; restart it so a busy machine's scheduling delay
        // between begin and finish does not read as a slow head scan.)
        let rows = [key(0, 10, 7), key(0, 10, 9), key(0, 10, 8)];
        round.started = Instant::now();
        round.finish(3, &rows, |k| Some(*k));
        assert_eq!(c.start("q"), Some(key(0, 10, 9)));
        let (mut round, after) = c.begin("q");
        assert_eq!(after, key(0, 10, 9));
        assert_eq!(
            round.retry(),
            Some(HEAD),
            "head scans are cheap: once from the head"
        );
        assert_eq!(round.retry(), None);
        // A row whose key does not read does not move it.
        let rows = [key(0, 10, 12), key(0, 10, 10)];
        round.finish(2, &rows, |k| (k.2 != Uuid::from_u128(12)).then_some(*k));
        assert_eq!(c.start("q"), Some(key(0, 10, 10)));
    }

    #[test]
    fn inserts_that_may_sort_before_the_cursor_rewind_it() {
        let c = ClaimCursors::default();
        let t = |secs| DateTime::from_timestamp(secs, 0).unwrap();
        let set = || c.advance("q", true, false, Some(key(-5, 10, 5)), CHEAP);
        set();
        // Due now, or after a delay, at the cursor's priority or lower: after every claimed row.
        c.rewind_for(&[
            new_message("q", 5, RunAt::Now),
            new_message("q", 1, RunAt::After(Duration::from_secs(1))),
            new_message("other", 9, RunAt::Now),
        ]);
        assert!(c.start("q").is_some());
        // A higher priority sorts before it.
        c.rewind_for(&[new_message("q", 6, RunAt::Now)]);
        assert_eq!(c.start("q"), None);
        // So does an explicit due time before the cursor's at the same priority.
        set();
        c.rewind_for(&[new_message("q", 5, RunAt::At(t(11)))]);
        assert!(c.start("q").is_some(), "due after the cursor's row");
        c.rewind_for(&[new_message("q", 5, RunAt::At(t(9)))]);
        assert_eq!(c.start("q"), None);
        set();
        c.rewind("q");
        assert_eq!(c.start("q"), None);
    }
}
