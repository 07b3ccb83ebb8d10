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

/// Microseconds in `d`, saturating (for SQL interval arithmetic).
pub fn micros(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
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
        }
    }
}

/// Decodes the rows a claim returned (each store's own `decode`) and puts them in
/// [`delivery_order`].
pub fn claimed_in_order<R>(
    rows: &[R],
    decode: impl Fn(&R) -> Result<crate::Message>,
) -> Result<Vec<crate::Message>> {
    let mut out = rows.iter().map(decode).collect::<Result<Vec<_>>>()?;
    out.sort_by(delivery_order);
    Ok(out)
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
