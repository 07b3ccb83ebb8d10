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
//! scans from the head whenever the cursor is older than [`HEAD_SCAN_EVERY`], when a claim from
//! the cursor finds nothing, after a claim that came back short (the queue is drained: the head
//! is cheap to find), and when this handle enqueues, releases or rescues a row that may sort
//! before it. A row that sorts before another process's cursor therefore waits at most
//! [`HEAD_SCAN_EVERY`] longer than strict delivery order would have it wait.

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

/// How often a claim of a busy queue starts from the head of the queue regardless of its
/// cursor.
pub const HEAD_SCAN_EVERY: Duration = Duration::from_millis(100);

/// A message's position in its queue's delivery order.
pub fn claim_key(m: &Message) -> ClaimKey {
    (-i32::from(m.priority.0), m.run_at, m.id)
}

#[derive(Clone, Copy, Debug)]
struct Cursor {
    key: ClaimKey,
    head_scan_at: Instant,
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
        let cursor = self.start(queue);
        let round = ClaimRound {
            cursors: self,
            queue,
            from_head: cursor.is_none(),
        };
        (round, cursor.unwrap_or(HEAD))
    }

    /// The cursor a claim of `queue` may start from, or `None` when it should scan from the head.
    fn start(&self, queue: &str) -> Option<ClaimKey> {
        let cursors = self.lock();
        let c = cursors.get(queue)?;
        (c.head_scan_at.elapsed() < HEAD_SCAN_EVERY).then_some(c.key)
    }

    /// After a claim: a full batch moves the cursor to its last row; a short one means the
    /// queue is drained, so the next claim starts from the head (which is then cheap).
    fn advance(&self, queue: &str, from_head: bool, full: bool, last: Option<ClaimKey>) {
        let mut cursors = self.lock();
        let last = match last {
            Some(k) if full => k,
            _ => {
                cursors.remove(queue);
                return;
            }
        };
        if from_head {
            // A head scan restarts the window; rows between it and an older cursor come next.
            cursors.insert(
                queue.to_owned(),
                Cursor {
                    key: last,
                    head_scan_at: Instant::now(),
                },
            );
        } else if let Some(c) = cursors.get_mut(queue) {
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
}

impl ClaimRound<'_> {
    /// After a claim from the cursor found nothing: the head, to claim from once more (the
    /// rows behind the cursor may have become pending again). `None` when the claim already
    /// started at the head.
    pub fn retry(&mut self) -> Option<ClaimKey> {
        (!self.from_head).then(|| {
            self.from_head = true;
            HEAD
        })
    }

    /// Moves the cursor past the greatest key (`key_of`) of the rows claimed (in any order),
    /// of a claim of at most `limit`; a claim that came back short (the queue is drained)
    /// drops it, so that the next starts at the head. A row whose key does not read (an
    /// unreadable row, which the store sets aside) does not move the cursor.
    pub fn finish<R>(self, limit: u32, rows: &[R], key_of: impl Fn(&R) -> Option<ClaimKey>) {
        let last = rows.iter().filter_map(key_of).max();
        let full = rows.len() >= limit as usize;
        self.cursors.advance(self.queue, self.from_head, full, last);
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

    #[test]
    fn a_full_claim_from_the_head_sets_the_cursor_and_later_ones_only_move_it_forward() {
        let c = ClaimCursors::default();
        assert_eq!(c.start("q"), None, "no cursor: from the head");
        c.advance("q", true, true, Some(key(0, 10, 5)));
        assert_eq!(c.start("q"), Some(key(0, 10, 5)));
        c.advance("q", false, true, Some(key(0, 10, 9)));
        assert_eq!(c.start("q"), Some(key(0, 10, 9)));
        // A concurrent claim that started from an older cursor ends behind: no step back.
        c.advance("q", false, true, Some(key(0, 10, 7)));
        assert_eq!(c.start("q"), Some(key(0, 10, 9)));
        assert_eq!(c.start("other"), None, "cursors are per queue");
    }

    #[test]
    fn a_short_claim_means_drained_and_the_next_starts_at_the_head() {
        let c = ClaimCursors::default();
        c.advance("q", true, true, Some(key(0, 10, 5)));
        c.advance("q", false, false, Some(key(0, 10, 6)));
        assert_eq!(c.start("q"), None);
        c.advance("q", true, true, Some(key(0, 10, 5)));
        c.advance("q", false, true, None);
        assert_eq!(c.start("q"), None, "nothing claimed: from the head");
    }

    #[test]
    fn a_round_retries_from_the_head_once_and_moves_the_cursor_past_the_greatest_row() {
        let c = ClaimCursors::default();
        let (mut round, after) = c.begin("q");
        assert_eq!(after, HEAD);
        assert_eq!(round.retry(), None, "already at the head");
        // Rows in any order: the cursor goes past the greatest.
        let rows = [key(0, 10, 7), key(0, 10, 9), key(0, 10, 8)];
        round.finish(3, &rows, |k| Some(*k));
        assert_eq!(c.start("q"), Some(key(0, 10, 9)));

        let (mut round, after) = c.begin("q");
        assert_eq!(after, key(0, 10, 9));
        assert_eq!(
            round.retry(),
            Some(HEAD),
            "nothing after the cursor: once from the head"
        );
        assert_eq!(round.retry(), None);
        // From the head, full: the cursor starts again there (and its head-scan clock too).
        round.finish(1, &[key(0, 10, 2)], |k| Some(*k));
        assert_eq!(c.start("q"), Some(key(0, 10, 2)));

        // A short round drops it.
        let (round, _) = c.begin("q");
        round.finish(5, &[key(0, 10, 3)], |k| Some(*k));
        assert_eq!(c.start("q"), None);
        // A row whose key does not read does not move it: a full round of only such rows
        // leaves no cursor, one with a readable row moves it to that row.
        let (round, _) = c.begin("q");
        round.finish(1, &[key(0, 10, 3)], |_| None);
        assert_eq!(c.start("q"), None);
        let (round, _) = c.begin("q");
        let rows = [key(0, 10, 4), key(0, 10, 6)];
        round.finish(2, &rows, |k| (k.2 != Uuid::from_u128(6)).then_some(*k));
        assert_eq!(c.start("q"), Some(key(0, 10, 4)));
    }

    #[test]
    fn a_claim_from_a_cursor_without_a_head_scan_does_not_create_one() {
        let c = ClaimCursors::default();
        c.advance("q", false, true, Some(key(0, 10, 5)));
        assert_eq!(c.start("q"), None);
    }

    #[test]
    fn inserts_that_may_sort_before_the_cursor_rewind_it() {
        let c = ClaimCursors::default();
        let t = |secs| DateTime::from_timestamp(secs, 0).unwrap();
        let set = || c.advance("q", true, true, Some(key(-5, 10, 5)));
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
