//! Helpers both stores share: bulk inserts, decoding rows, claim order.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::types::{Enqueued, NewMessage};

/// A batch with repeated dedup keys folded: `send` lists the rows to insert (indexes into the
/// input), and `answer[i]` names the position in `send` whose outcome answers input `i`.
#[derive(Debug)]
pub struct DedupedBatch {
    /// Indexes of the input rows to insert, in input order.
    pub send: Vec<usize>,
    /// For every input row, the position in `send` that answers it.
    pub answer: Vec<usize>,
}

/// Folds rows whose (queue, key) repeats an earlier row of the same batch into that row: one
/// statement may not insert and then find the same key, and the later rows are duplicates of
/// the first anyway.
pub fn dedup_keys(messages: &[NewMessage]) -> DedupedBatch {
    let mut send = Vec::with_capacity(messages.len());
    let mut answer = Vec::with_capacity(messages.len());
    let mut seen: HashMap<(&str, &str), usize> = HashMap::new();
    for (i, m) in messages.iter().enumerate() {
        if let Some(key) = &m.key {
            if let Some(&pos) = seen.get(&(m.queue.as_str(), key.as_str())) {
                answer.push(pos);
                continue;
            }
            seen.insert((m.queue.as_str(), key.as_str()), send.len());
        }
        answer.push(send.len());
        send.push(i);
    }
    DedupedBatch { send, answer }
}

impl DedupedBatch {
    /// Spreads the outcomes of the sent rows back over the input: a folded row reports its
    /// first row's id, as a duplicate.
    pub fn spread(&self, sent: &[Enqueued]) -> Result<Vec<Enqueued>> {
        if sent.len() != self.send.len() {
            return Err(Error::CorruptRow {
                id: String::new(),
                reason: format!(
                    "insert returned {} rows for {} messages",
                    sent.len(),
                    self.send.len()
                ),
            });
        }
        let mut first = vec![true; sent.len()];
        Ok(self
            .answer
            .iter()
            .map(|&pos| {
                let mut e = sent[pos];
                if !std::mem::replace(&mut first[pos], false) {
                    e.duplicate = true;
                }
                e
            })
            .collect())
    }
}

/// True when no message of the batch has a key and all share everything but id and payload
/// (what `enqueue_many` makes): a store can send what repeats once, and only ids and
/// payloads per message.
pub fn uniform(messages: &[NewMessage]) -> bool {
    let Some(first) = messages.first() else {
        return false;
    };
    messages.iter().all(|m| {
        m.key.is_none()
            && m.queue == first.queue
            && m.kind == first.kind
            && m.headers == first.headers
            && m.priority == first.priority
            && m.run_at == first.run_at
            && m.enqueued_at == first.enqueued_at
            && m.max_attempts == first.max_attempts
            && m.callback_url == first.callback_url
    })
}

/// The one attempt number of a completion batch in which every job is on the same attempt
/// and has no output (the usual batch): a store can fence it by that number alone, with no
/// per-job list of attempts and outputs. `None` for any other batch (or an empty one).
pub fn uniform_completions(done: &[crate::Completion]) -> Option<Option<i32>> {
    let attempt = done.first()?.lease.attempt;
    done.iter()
        .all(|c| c.lease.attempt == attempt && c.result.is_none())
        .then_some(attempt)
}

/// The queues whose waiting receivers a batch of new messages should wake, each once: those
/// with a message due now, at an explicit time (which may have passed), or after a delay
/// shorter than `poll`. A receiver's last look at an empty queue stands for up to one poll
/// interval, so a message due sooner than that must wake it for the receiver to learn its due
/// time and start it then; one due later is found by the receiver's next look in time.
pub fn queues_to_wake(messages: &[NewMessage], poll: std::time::Duration) -> Vec<&str> {
    let mut queues: Vec<&str> = Vec::new();
    for m in messages {
        let soon = match m.run_at {
            crate::RunAt::Now | crate::RunAt::At(_) => true,
            crate::RunAt::After(d) => d < poll,
        };
        if soon && !queues.contains(&m.queue.as_str()) {
            queues.push(m.queue.as_str());
        }
    }
    queues
}

/// Reads stored headers (a JSON object of strings).
pub fn decode_headers(
    id: &uuid::Uuid,
    value: serde_json::Value,
) -> Result<std::collections::BTreeMap<String, String>> {
    serde_json::from_value(value).map_err(|e| Error::CorruptRow {
        id: id.to_string(),
        reason: format!("headers are not a JSON object of strings: {e}"),
    })
}

/// Reads a stored state name.
pub fn decode_state(id: &uuid::Uuid, s: &str) -> Result<crate::MessageState> {
    crate::MessageState::parse(s).map_err(|e| Error::CorruptRow {
        id: id.to_string(),
        reason: e.to_string(),
    })
}

/// Microseconds in `d`, cut to [`crate::duration::MAX_SPAN`] (for SQL interval arithmetic: no
/// span a store is handed can move a time out of the database's range).
pub fn micros(d: std::time::Duration) -> i64 {
    i64::try_from(d.min(crate::duration::MAX_SPAN).as_micros()).unwrap_or(i64::MAX)
}

/// Milliseconds in `d`, cut to [`crate::duration::MAX_SPAN`] (see [`micros`]).
pub fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.min(crate::duration::MAX_SPAN).as_millis()).unwrap_or(i64::MAX)
}

/// Reads stored attempt errors (a JSON array of objects).
pub fn decode_errors(
    id: &uuid::Uuid,
    value: serde_json::Value,
) -> Result<Vec<crate::AttemptError>> {
    serde_json::from_value(value).map_err(|e| Error::CorruptRow {
        id: id.to_string(),
        reason: format!("errors are not a list of attempt errors: {e}"),
    })
}

/// Reads a stored attempt count and attempt limit: the attempt is never negative and the limit
/// at least 1 (the schema leaves both to Dray since PostgreSQL version 7 and SQLite version 5).
pub fn decode_attempts(id: &uuid::Uuid, attempt: i32, max_attempts: i32) -> Result<(i32, i32)> {
    if attempt < 0 || max_attempts < 1 {
        return Err(Error::CorruptRow {
            id: id.to_string(),
            reason: format!(
                "attempt {attempt} of max_attempts {max_attempts}: the attempt must be 0 or more \
                 and max_attempts 1 or more"
            ),
        });
    }
    Ok((attempt, max_attempts))
}

/// Reads a stored progress value (0 to 100).
pub fn decode_progress(id: &uuid::Uuid, value: Option<i64>) -> Result<Option<u8>> {
    value
        .map(|v| {
            u8::try_from(v)
                .ok()
                .filter(|p| *p <= 100)
                .ok_or_else(|| Error::CorruptRow {
                    id: id.to_string(),
                    reason: format!("progress {v} is outside 0..=100"),
                })
        })
        .transpose()
}

/// Delivery order (priority descending, then due time, then id), for sorting rows that an
/// `UPDATE … RETURNING` hands back in no particular order.
pub fn delivery_order(a: &crate::Message, b: &crate::Message) -> std::cmp::Ordering {
    b.priority
        .cmp(&a.priority)
        .then(a.run_at.cmp(&b.run_at))
        .then(a.id.cmp(&b.id))
}

/// The columns of a job row that a claim does not read back, because for a row the claim has
/// just leased their values are known: the claim's queue, `running`, the claim's `leased_by`,
/// no finish time, no result, and a callback not yet tried (callbacks are only tried for
/// finished jobs, and a re-drive resets them). Leaving them out of the claim's `RETURNING`
/// saves eight values per claimed row (the conformance test `claimed_rows_read_as_stored`
/// checks that a claimed message equals the stored row). Every other read takes them from
/// the row.
#[derive(Clone, Debug)]
pub struct RowTail {
    /// `queue`.
    pub queue: String,
    /// `state`.
    pub state: crate::MessageState,
    /// `leased_by`.
    pub leased_by: Option<String>,
    /// `finished_at`.
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    /// `result`.
    pub result: Option<serde_json::Value>,
    /// `callback_attempts`.
    pub callback_attempts: i32,
    /// `callback_done_at`.
    pub callback_delivered_at: Option<chrono::DateTime<chrono::Utc>>,
    /// `callback_error`.
    pub callback_error: Option<String>,
}

impl RowTail {
    /// The tail of every row the claim `p` leased.
    pub fn claimed(p: &crate::ClaimParams) -> Self {
        RowTail {
            queue: p.queue.as_str().to_owned(),
            state: crate::MessageState::Running,
            leased_by: p.leased_by.clone(),
            finished_at: None,
            result: None,
            callback_attempts: 0,
            callback_delivered_at: None,
            callback_error: None,
        }
    }

    /// The callback status of a row whose `callback_url` is `url`.
    pub fn callback(&self, url: Option<String>) -> Option<crate::CallbackStatus> {
        url.map(|url| crate::CallbackStatus {
            url,
            attempts: self.callback_attempts,
            delivered_at: self.callback_delivered_at,
            last_error: self.callback_error.clone(),
        })
    }
}

/// The columns every read of a job row returns, claims included (the rest is [`RowTail`]), as
/// each store decodes them.
#[derive(Clone, Debug)]
pub struct RowHead {
    /// `id`.
    pub id: uuid::Uuid,
    /// `kind`.
    pub kind: Option<String>,
    /// `key`.
    pub key: Option<String>,
    /// `payload`.
    pub payload: serde_json::Value,
    /// `headers`.
    pub headers: std::collections::BTreeMap<String, String>,
    /// `priority`.
    pub priority: crate::Priority,
    /// `attempt`.
    pub attempt: i32,
    /// `max_attempts`.
    pub max_attempts: i32,
    /// `enqueued_at`.
    pub enqueued_at: chrono::DateTime<chrono::Utc>,
    /// `run_at`.
    pub run_at: chrono::DateTime<chrono::Utc>,
    /// `leased_until`.
    pub leased_until: Option<chrono::DateTime<chrono::Utc>>,
    /// `errors`.
    pub errors: Vec<crate::AttemptError>,
    /// `progress`.
    pub progress: Option<u8>,
    /// `progress_message`.
    pub progress_message: Option<String>,
    /// `cancel_requested_at IS NOT NULL`.
    pub cancel_requested: bool,
    /// `callback_url`.
    pub callback_url: Option<String>,
}

impl RowHead {
    /// The message these columns and `tail` make.
    pub fn with(self, tail: RowTail) -> crate::Message {
        crate::Message {
            callback: tail.callback(self.callback_url),
            id: self.id,
            queue: tail.queue,
            kind: self.kind,
            key: self.key,
            payload: self.payload,
            headers: self.headers,
            priority: self.priority,
            state: tail.state,
            attempt: self.attempt,
            max_attempts: self.max_attempts,
            enqueued_at: self.enqueued_at,
            run_at: self.run_at,
            leased_until: self.leased_until,
            leased_by: tail.leased_by,
            finished_at: tail.finished_at,
            result: tail.result,
            errors: self.errors,
            progress: self.progress,
            progress_message: self.progress_message,
            cancel_requested: self.cancel_requested,
            unreadable: None,
        }
    }
}

/// The message that [`crate::Store::message_insert_leased`] stored: every column as inserted
/// from `m`, the lease as `p` asked for it, and the three times the database set.
pub fn leased_insert(
    m: &crate::NewMessage,
    p: &crate::ClaimParams,
    enqueued_at: chrono::DateTime<chrono::Utc>,
    run_at: chrono::DateTime<chrono::Utc>,
    leased_until: chrono::DateTime<chrono::Utc>,
) -> Result<crate::Message> {
    let head = RowHead {
        id: m.id,
        kind: m.kind.clone(),
        key: m.key.clone(),
        payload: serde_json::from_str(&m.payload)?,
        headers: serde_json::from_str(&m.headers)?,
        priority: m.priority,
        attempt: 1,
        max_attempts: m.max_attempts,
        enqueued_at,
        run_at,
        leased_until: Some(leased_until),
        errors: Vec::new(),
        progress: None,
        progress_message: None,
        cancel_requested: false,
        callback_url: m.callback_url.clone(),
    };
    Ok(head.with(RowTail::claimed(p)))
}

/// A row of a bulk read that did not decode: where it stood in the read, its id when that
/// much was readable, and why (the column and what was found).
#[derive(Clone, Debug)]
pub struct Unreadable {
    /// Position of the row in what the statement returned.
    pub index: usize,
    /// The row's id, when it could be read.
    pub id: Option<uuid::Uuid>,
    /// The column that did not decode, and what it held.
    pub reason: String,
}

impl Unreadable {
    /// The unreadable row at `index`, from the error its decoding gave.
    pub fn new(index: usize, id: Option<uuid::Uuid>, err: Error) -> Unreadable {
        let reason = match err {
            Error::CorruptRow { reason, .. } => reason,
            other => other.to_string(),
        };
        Unreadable { index, id, reason }
    }

    /// The error recorded on a quarantined row (a [`crate::FailureKind::Unreadable`] attempt).
    pub fn quarantine_message(&self) -> String {
        format!(
            "the stored row could not be read ({}), so it was not run; fix the row in the \
             database, then re-drive it (`dray jobs retry ID`)",
            self.reason
        )
    }

    /// How a callback delivery of an unreadable row is settled: a failed try, tried again
    /// after [`UNREADABLE_CALLBACK_PAUSE`] (the row may be fixed by then).
    pub fn callback_settle(&self) -> crate::CallbackSettle {
        crate::CallbackSettle::Retry {
            after: UNREADABLE_CALLBACK_PAUSE,
            error: self.quarantine_message(),
        }
    }
}

/// Settles the callback deliveries that a claim leased but could not decode (see
/// [`Unreadable::callback_settle`]), logging each; `attempt_of(index)` reads the delivery's try
/// number from the returned row (a row whose id or try number is unreadable is left to its
/// lease).
pub async fn settle_unreadable_callbacks<S: crate::Store>(
    store: &S,
    bad: &[Unreadable],
    attempt_of: impl Fn(usize) -> Option<i32>,
) -> Result<()> {
    for b in bad {
        let (Some(id), Some(attempt)) = (b.id, attempt_of(b.index)) else {
            continue;
        };
        log_unreadable(store.backend(), "callback_claim", std::slice::from_ref(b));
        store
            .callback_settle(id, attempt, &b.callback_settle())
            .await?;
    }
    Ok(())
}

/// How long a callback delivery whose job row cannot be read waits before it is tried again.
pub const UNREADABLE_CALLBACK_PAUSE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Logs rows that a claim (or another bulk read that acts on its rows) set aside as
/// unreadable, once each, where the operator of the process that found them looks.
pub fn log_unreadable(backend: &str, op: &str, rows: &[Unreadable]) {
    for r in rows {
        let id =
            r.id.map_or_else(|| "(unreadable id)".to_owned(), |id| id.to_string());
        tracing::error!(
            backend,
            op,
            %id,
            reason = %r.reason,
            "a stored job row could not be read; it was set aside and its neighbours go on"
        );
    }
}

/// Decodes the rows of a bulk read one by one (each store's own `decode`): the rows that
/// decode, and the ones that did not, each on its own. One unreadable row costs that row,
/// never the rows read with it.
pub fn decode_each<R>(
    rows: &[R],
    decode: impl Fn(&R) -> Result<crate::Message>,
    id_of: impl Fn(&R) -> Option<uuid::Uuid>,
) -> (Vec<crate::Message>, Vec<Unreadable>) {
    let mut out = Vec::with_capacity(rows.len());
    let mut bad = Vec::new();
    for (index, row) in rows.iter().enumerate() {
        match decode(row) {
            Ok(m) => out.push(m),
            Err(e) => bad.push(Unreadable::new(index, id_of(row), e)),
        }
    }
    (out, bad)
}

/// Decodes the rows a claim returned (each store's own `decode`) and puts the readable ones in
/// [`delivery_order`]; the unreadable ones are the store's to quarantine.
pub fn claimed_in_order<R>(
    rows: &[R],
    decode: impl Fn(&R) -> Result<crate::Message>,
    id_of: impl Fn(&R) -> Option<uuid::Uuid>,
) -> (Vec<crate::Message>, Vec<Unreadable>) {
    let (mut out, bad) = decode_each(rows, decode, id_of);
    out.sort_by(delivery_order);
    (out, bad)
}

/// What a listing shows of a row that did not decode: its id, and the parts the store could
/// still read (`salvage`), every other field empty, with [`crate::Message::unreadable`] saying
/// why.
#[derive(Clone, Debug, Default)]
pub struct Salvaged {
    /// `queue`, if readable.
    pub queue: Option<String>,
    /// `kind`, if readable.
    pub kind: Option<String>,
    /// `state`, if readable and known.
    pub state: Option<crate::MessageState>,
    /// `attempt`, if readable.
    pub attempt: Option<i32>,
    /// `enqueued_at`, if readable.
    pub enqueued_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl Salvaged {
    /// The placeholder message for unreadable row `id`. A row whose state cannot be read shows
    /// as `dead` (it can neither be claimed nor finish).
    pub fn into_message(self, id: uuid::Uuid, reason: String) -> crate::Message {
        let at = self.enqueued_at.unwrap_or_default();
        crate::Message {
            id,
            queue: self.queue.unwrap_or_default(),
            kind: self.kind,
            key: None,
            payload: serde_json::Value::Null,
            headers: Default::default(),
            priority: crate::Priority::NORMAL,
            state: self.state.unwrap_or(crate::MessageState::Dead),
            attempt: self.attempt.unwrap_or(0),
            max_attempts: 1,
            enqueued_at: at,
            run_at: at,
            leased_until: None,
            leased_by: None,
            finished_at: None,
            result: None,
            errors: Vec::new(),
            progress: None,
            progress_message: None,
            cancel_requested: false,
            callback: None,
            unreadable: Some(reason),
        }
    }
}

/// What a cancel did, from the state the job had before it.
pub fn cancel_outcome(before: crate::MessageState) -> crate::CancelOutcome {
    match before {
        crate::MessageState::Running => crate::CancelOutcome::Requested,
        s if s.is_terminal() => crate::CancelOutcome::AlreadyFinished(s),
        _ => crate::CancelOutcome::Cancelled,
    }
}

/// The error for a re-drive of a job that is neither dead nor cancelled.
pub fn redrive_refused(id: uuid::Uuid, state: crate::MessageState) -> Error {
    Error::invalid(
        "retry",
        format!("job {id} is {state}; only a dead or cancelled job can be re-driven"),
    )
}

/// The error for a re-drive blocked by another unfinished job holding the same key.
pub fn redrive_key_taken(id: uuid::Uuid) -> Error {
    Error::invalid(
        "retry",
        format!("job {id} cannot be re-driven: another unfinished job of its queue holds its key"),
    )
}

/// The row limit of a listing: 100 by default, at most 10,000.
pub fn list_limit(limit: u32) -> u32 {
    if limit == 0 { 100 } else { limit.min(10_000) }
}

/// A failed attempt's destination as the stores' SQL takes it: `'retry'`, `'dead'` or
/// `'cancelled'`, and the retry delay.
pub fn fail_to_parts(to: crate::FailTo) -> (&'static str, std::time::Duration) {
    match to {
        crate::FailTo::Retry(d) => ("retry", d),
        crate::FailTo::Dead => ("dead", std::time::Duration::ZERO),
        crate::FailTo::Cancelled => ("cancelled", std::time::Duration::ZERO),
    }
}

/// A callback try's outcome as the stores' SQL takes it: delivered?, retry delay, error.
pub fn settle_parts(outcome: &crate::CallbackSettle) -> (bool, std::time::Duration, Option<&str>) {
    match outcome {
        crate::CallbackSettle::Delivered => (true, std::time::Duration::ZERO, None),
        crate::CallbackSettle::Retry { after, error } => (false, *after, Some(error.as_str())),
    }
}

/// Most unfinished rows one expired-lease sweep examines ([`crate::Store::message_rescue_expired`]).
///
/// No index of either store lists running rows by lease end: on PostgreSQL one would cost every
/// claim and heartbeat its HOT update, on SQLite two index writes on the one writer. A sweep
/// therefore walks the unfinished rows, in claim-index order, up to this many per call,
/// continuing where the previous call of the same store handle stopped and wrapping around at
/// the end ([`SweepCursor`]). One call covers every unfinished row of a store holding fewer than
/// this many; a full pass over `n` unfinished rows takes `n / SWEEP_WINDOW` calls. A window costs
/// about as much as claiming a few hundred jobs.
pub const SWEEP_WINDOW: i64 = 10_000;

/// Where a store handle's next expired-lease sweep starts: a key of the store's claim index, or
/// nothing for its head. Shared by the handle's clones.
#[derive(Debug)]
pub struct SweepCursor<K>(std::sync::Mutex<Option<K>>);

impl<K> Default for SweepCursor<K> {
    fn default() -> Self {
        SweepCursor(std::sync::Mutex::new(None))
    }
}

impl<K: Clone> SweepCursor<K> {
    /// Starts a sweep where the previous one stopped. Until [`SweepCursor::finish`] records
    /// where it ended, a concurrent or later sweep starts from the head (so a sweep that fails
    /// half-way only costs the next one a walk from the head).
    pub fn begin(&self) -> Sweep<K> {
        let start = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        Sweep {
            from: start.clone(),
            wrapped: start.is_none(),
            budget: SWEEP_WINDOW,
            next: None,
        }
    }

    /// Records where the next sweep starts.
    pub fn finish(&self, sweep: Sweep<K>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = sweep.next;
    }
}

/// One sweep in progress: the windows it reads, [`SWEEP_WINDOW`] rows in all, from where the
/// previous sweep stopped, wrapping around once at the end of the index.
///
/// ```text
/// let mut sweep = cursor.begin();
/// loop {
///     let (after, limit) = sweep.window();   // after: None = from the head
///     /* read up to `limit` unfinished rows after `after`: how many, and the last key */
///     if !sweep.advance(seen, last) { break }
/// }
/// cursor.finish(sweep);
/// ```
#[derive(Debug)]
pub struct Sweep<K> {
    from: Option<K>,
    wrapped: bool,
    budget: i64,
    next: Option<K>,
}

impl<K: Clone> Sweep<K> {
    /// The next window to read: up to `limit` rows after `after` (`None`: from the head).
    pub fn window(&self) -> (Option<K>, i64) {
        (self.from.clone(), self.budget)
    }

    /// Records what the window read (`seen` rows, the last one's key); true when another
    /// window follows.
    pub fn advance(&mut self, seen: i64, last: Option<K>) -> bool {
        if seen >= self.budget {
            // The window was full: the next sweep goes on after its last row.
            self.next = last;
            return false;
        }
        self.budget -= seen;
        self.next = None;
        // The end of the index: wrap around once to the rows before where this sweep began.
        if self.wrapped || self.budget == 0 {
            return false;
        }
        self.wrapped = true;
        self.from = None;
        true
    }
}

/// Decodes a row of `(queue, available, scheduled, running, oldest available age)`, as both
/// stores' [`crate::Store::queue_gauges`] select it; `unit` turns the age column (the store's
/// clock unit) into a duration.
pub fn decode_gauge<'r, R>(
    row: &'r R,
    unit: fn(u64) -> std::time::Duration,
) -> Result<crate::types::QueueGauge>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let op = "queue_gauges";
    let age: i64 = row.try_get(4).map_err(Error::db(op))?;
    Ok(crate::types::QueueGauge {
        queue: row.try_get(0).map_err(Error::db(op))?,
        available: row.try_get(1).map_err(Error::db(op))?,
        scheduled: row.try_get(2).map_err(Error::db(op))?,
        running: row.try_get(3).map_err(Error::db(op))?,
        oldest_available_age: unit(age.max(0) as u64),
    })
}

/// Below this size an index of the unfinished jobs is never rebuilt (see
/// [`crate::Store::job_table_compact`]): 4 MiB, "a few MB" of slack that a steady load
/// reuses.
pub const INDEX_SLACK_BYTES: u64 = 4 * 1024 * 1024;

/// Whether an index of `bytes` holding about `entries` entries should be rebuilt: it is above
/// [`INDEX_SLACK_BYTES`] and more than four times what its entries need (64 bytes each,
/// generously, plus a few pages).
pub fn index_bloated(bytes: u64, entries: f64, slack: u64) -> bool {
    let needed = entries.max(0.0) * 64.0 + 65_536.0;
    bytes > slack && bytes as f64 > 4.0 * needed
}

#[cfg(test)]
mod sweep_tests {
    use super::*;

    /// Runs one sweep over an index of `rows` keys (0..rows), returning the windows it read.
    fn sweep(cursor: &SweepCursor<i64>, rows: i64) -> Vec<(Option<i64>, i64)> {
        let mut windows = Vec::new();
        let mut s = cursor.begin();
        loop {
            let (after, limit) = s.window();
            windows.push((after, limit));
            let first = after.map_or(0, |a| a + 1);
            let seen = (rows - first).clamp(0, limit);
            let last = (seen > 0).then_some(first + seen - 1);
            if !s.advance(seen, last) {
                break;
            }
        }
        cursor.finish(s);
        windows
    }

    #[test]
    fn a_small_index_is_covered_by_every_sweep() {
        let c = SweepCursor::default();
        for _ in 0..3 {
            assert_eq!(sweep(&c, 10), vec![(None, SWEEP_WINDOW)]);
        }
    }

    #[test]
    fn a_large_index_is_covered_in_turns_and_wraps_around() {
        let c = SweepCursor::default();
        let rows = 2 * SWEEP_WINDOW + 500;
        assert_eq!(sweep(&c, rows), vec![(None, SWEEP_WINDOW)]);
        assert_eq!(
            sweep(&c, rows),
            vec![(Some(SWEEP_WINDOW - 1), SWEEP_WINDOW)]
        );
        // The third sweep reads the last 500 rows, then wraps to the head for the rest of its
        // budget, and the fourth goes on from there.
        assert_eq!(
            sweep(&c, rows),
            vec![
                (Some(2 * SWEEP_WINDOW - 1), SWEEP_WINDOW),
                (None, SWEEP_WINDOW - 500)
            ]
        );
        assert_eq!(
            sweep(&c, rows),
            vec![(Some(SWEEP_WINDOW - 501), SWEEP_WINDOW)]
        );
    }

    #[test]
    fn an_index_that_shrank_below_the_cursor_restarts_at_the_head() {
        let c = SweepCursor::default();
        sweep(&c, 3 * SWEEP_WINDOW);
        assert_eq!(
            sweep(&c, 100),
            vec![(Some(SWEEP_WINDOW - 1), SWEEP_WINDOW), (None, SWEEP_WINDOW)]
        );
        assert_eq!(sweep(&c, 100), vec![(None, SWEEP_WINDOW)]);
    }
}
