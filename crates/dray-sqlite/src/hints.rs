//! Where a claimed row sits in the table, remembered from its claim until its completion.
//!
//! A claim returns each row's `rowid` beside its columns. Completing a batch by rowid lets SQLite
//! go straight to each row in the table, where completing it by id first descends the primary
//! key's index (a second B-tree, comparing 16-byte blobs) for every row: about a quarter of a
//! completion's time per row on this box (see `bench/HISTORY.md`).
//!
//! A hint is never trusted: the completion statement still names each row's id and lease
//! (`sql::COMPLETE_UNIFORM_ROWS`), so a row that moved (a `VACUUM` may renumber rowids) or was
//! replaced is simply not matched, the count comes out short, and the batch is rolled back and
//! run again by id alone. Hints are per store handle; a row claimed through another handle or
//! process has none and takes the id path.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use uuid::Uuid;

/// At most this many hints are kept: past it (leases that ended some other way than a
/// completion seen here, piling up over a long life) they are all dropped, which costs only
/// the next completions' speed.
const CAPACITY: usize = 1 << 18;

/// Rowids of the rows this handle claimed, by id.
#[derive(Default)]
pub(crate) struct RowHints {
    rows: Mutex<HashMap<Uuid, i64>>,
}

impl RowHints {
    /// Remembers where each claimed row is.
    pub(crate) fn remember(&self, rows: impl IntoIterator<Item = (Uuid, i64)>) {
        let mut map = self.rows.lock().unwrap_or_else(PoisonError::into_inner);
        map.extend(rows);
        if map.len() > CAPACITY {
            map.clear();
        }
    }

    /// Takes the rowids of `ids`, in order, if every one of them is known; forgets them all
    /// either way (each lease write ends its row's lease or fails on it).
    pub(crate) fn take_all(&self, ids: impl ExactSizeIterator<Item = Uuid>) -> Option<Vec<i64>> {
        let mut map = self.rows.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = Some(Vec::with_capacity(ids.len()));
        for id in ids {
            match (map.remove(&id), out.as_mut()) {
                (Some(rowid), Some(v)) => v.push(rowid),
                _ => out = None,
            }
        }
        out
    }

    /// Forgets `ids` (their leases ended some other way).
    pub(crate) fn forget(&self, ids: impl IntoIterator<Item = Uuid>) {
        let mut map = self.rows.lock().unwrap_or_else(PoisonError::into_inner);
        for id in ids {
            map.remove(&id);
        }
    }

    /// How many hints are held (for tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.rows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[test]
    fn takes_only_when_every_id_is_known_and_forgets_either_way() {
        let hints = RowHints::default();
        hints.remember([(id(1), 10), (id(2), 20), (id(3), 30)]);
        assert_eq!(
            hints.take_all([id(2), id(1)].into_iter()),
            Some(vec![20, 10])
        );
        assert_eq!(hints.len(), 1);
        assert_eq!(hints.take_all([id(3), id(4)].into_iter()), None);
        assert_eq!(
            hints.len(),
            0,
            "a partly known batch still forgets what it named"
        );
        hints.remember([(id(5), 50)]);
        hints.forget([id(5), id(6)]);
        assert_eq!(hints.len(), 0);
    }

    #[test]
    fn past_capacity_everything_is_dropped() {
        let hints = RowHints::default();
        hints.remember((0..CAPACITY as u128).map(|n| (id(n), n as i64)));
        assert_eq!(hints.len(), CAPACITY);
        hints.remember([(id(u128::MAX), 1)]);
        assert_eq!(hints.len(), 0);
        assert_eq!(hints.take_all([id(7)].into_iter()), None);
    }
}
