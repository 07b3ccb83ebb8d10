//! Every SQL statement the SQLite store runs at steady state, with the reasons.
//!
//! All writes go through one writer connection, so each statement below is atomic against every
//! other writer of this process; other processes are serialized by SQLite's database lock (WAL
//! mode, `busy_timeout`). There is no SKIP LOCKED and none is needed: a claim is one UPDATE,
//! and only one UPDATE runs at a time.
//!
//! Time is SQLite's clock, read once per statement ({now}: milliseconds since the Unix epoch;
//! SQLite evaluates 'now' once per statement step, so every use in a statement agrees).

/// The columns a claimed message is decoded from (`decode_row`): every column but those whose
/// value the claim fixes (see `dray_core::batch::RowTail`), as three values: the id, the
/// payload, and the rest packed into one JSON array (`lib.rs`'s `PACKED` names its items).
///
/// Packed, because what a row costs SQLite's thread to hand over is mostly per value, not per
/// byte: sqlx copies every value of every row it returns (`sqlite3_value_dup`, an allocation
/// each, freed later on the runtime's thread). Measured on this 2-core box, a claim of 500
/// that returned sixteen columns took 8.3 µs per row, one that returned the row packed like
/// this 4.9 µs, one that returned the id alone 3.4 µs: the writer, which every claim and
/// completion waits for, spent nearly half of a claim handing over values. The payload stays a
/// column of its own (it may be large, and is passed over as it is stored, never re-escaped).
/// Empty headers and an empty error list (what nearly every claimed row has) come back as
/// NULL, which spares the client a JSON parse for each; both are JSON text inside the array
/// (`json_array` makes a TEXT value a JSON string). Every text item is cast to TEXT: a BLOB,
/// which only a foreign writer could have stored there, would fail the whole statement inside
/// `json_array`; cast, it is a `CorruptRow` error for its row alone.
const CLAIM_COLS: &str = "id, payload, json_array(CAST(kind AS TEXT), CAST(key AS TEXT), \
     CAST(NULLIF(headers, '{}') AS TEXT), priority, attempt, max_attempts, enqueued_at, run_at, \
     leased_until, CAST(NULLIF(errors, '[]') AS TEXT), progress, CAST(progress_message AS TEXT), \
     (cancel_requested_at IS NOT NULL), CAST(callback_url AS TEXT))";

/// The columns a message is decoded from: [`CLAIM_COLS`], then the tail (`decode_tail`).
const TAIL_COLS: &str = "queue, state, leased_by, finished_at, result, callback_attempts, \
     callback_done_at, callback_error";

/// The database clock as an RFC 3339 string, for timestamps inside JSON (attempt errors).
const ISO_NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

/// What every fenced lease write returns: id, new state, cancel requested.
const LEASE_RETURNING: &str =
    "RETURNING dray_jobs.id, dray_jobs.state, (dray_jobs.cancel_requested_at IS NOT NULL)";

const NOW: &str = "CAST(round(unixepoch('subsec') * 1000) AS INTEGER)";

const PENDING: &str = "('scheduled', 'available', 'retryable')";

/// Insert one row; a key that matches an unfinished row inserts nothing (no RETURNING row), and
/// the store then reads the existing id in the same transaction. (`WHERE true` is SQLite's
/// required disambiguation between INSERT … SELECT and an upsert clause.)
pub const INSERT: &str = "
INSERT INTO dray_jobs
    (id, queue, kind, key, payload, headers, priority, state, attempt, max_attempts,
     enqueued_at, run_at, callback_url)
SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7,
       CASE WHEN d.due > d.now THEN 'scheduled' ELSE 'available' END,
       0, ?10, COALESCE(?11, d.now), d.due, ?12
FROM (SELECT {now} AS now, COALESCE(?9, {now} + ?8) AS due) d
WHERE true
ON CONFLICT (queue, key)
    WHERE key IS NOT NULL AND finished_at IS NULL
    DO NOTHING
RETURNING id";

/// Insert every key-less row of a batch in one statement: ?1 is a JSON array of
/// [hex id, queue, kind, payload text, headers text, priority, delay ms, not_before ms,
/// max_attempts, enqueued_at ms, callback_url]. The due time uses the database clock, read once.
pub const INSERT_MANY: &str = "
INSERT INTO dray_jobs
    (id, queue, kind, key, payload, headers, priority, state, attempt, max_attempts,
     enqueued_at, run_at, callback_url)
SELECT unhex(r.value ->> 0), r.value ->> 1, r.value ->> 2, NULL, r.value ->> 3, r.value ->> 4,
       r.value ->> 5,
       CASE WHEN COALESCE(r.value ->> 7, d.now + (r.value ->> 6)) > d.now
            THEN 'scheduled' ELSE 'available' END,
       0, r.value ->> 8, COALESCE(r.value ->> 9, d.now),
       COALESCE(r.value ->> 7, d.now + (r.value ->> 6)), r.value ->> 10
FROM json_each(?1) r, (SELECT {now} AS now) d";

/// Leased insert (`Store::message_insert_leased`): one message, due now and without a key,
/// stored as a claim with lease `?9` ms by holder `?10` would leave it (running, attempt 1).
/// Reads back only the times the database decides.
pub const INSERT_LEASED: &str = "
INSERT INTO dray_jobs
    (id, queue, kind, key, payload, headers, priority, state, attempt, max_attempts,
     enqueued_at, run_at, leased_until, leased_by, callback_url)
SELECT ?1, ?2, ?3, NULL, ?4, ?5, ?6, 'running', 1, ?7, COALESCE(?8, d.now), d.now, d.now + ?9,
       ?10, ?11
FROM (SELECT {now} AS now) d
RETURNING enqueued_at, run_at, leased_until";

/// [`INSERT_MANY`] for a uniform batch (`dray_core::batch::uniform`: no keys, every message
/// with the same options): ?1 is a JSON array of [hex id, payload text] pairs, and what repeats
/// is bound once: ?2 queue, ?3 kind, ?4 headers, ?5 priority, ?6 delay ms, ?7 not_before ms,
/// ?8 max_attempts, ?9 enqueued_at ms, ?10 callback_url. Half the JSON to build and parse.
pub const INSERT_UNIFORM: &str = "
INSERT INTO dray_jobs
    (id, queue, kind, key, payload, headers, priority, state, attempt, max_attempts,
     enqueued_at, run_at, callback_url)
SELECT unhex(r.value ->> 0), ?2, ?3, NULL, r.value ->> 1, ?4, ?5,
       CASE WHEN d.due > d.now THEN 'scheduled' ELSE 'available' END,
       0, ?8, COALESCE(?9, d.now), d.due, ?10
FROM json_each(?1) r, (SELECT {now} AS now, COALESCE(?7, {now} + ?6) AS due) d";

pub const FIND_KEY: &str = "
SELECT id FROM dray_jobs
WHERE queue = ?1 AND key = ?2 AND finished_at IS NULL";

/// Claim: pick and lease in one UPDATE. The subquery reads `dray_jobs_unfinished_idx` in
/// delivery order (`rank` is −priority), passing over running rows by their state: they stay in
/// that index so that a claim writes no index entry (migration 0004).
///
/// The pick starts after the claim cursor `(?5, ?6, ?7)` = (rank, run_at, id) of the last row
/// this handle claimed from the queue (`dray_core::claim`; `rank = i32::MIN` starts at the
/// head): one descent of the index, instead of a walk over the rows claimed ahead and still
/// running, each looked up in the table for its state (measured with 5,000 of them at the
/// head: a claim of 500 took twice as long). The bound is a row subquery for the same reason as
/// the queue's below.
///
/// `queue = (SELECT ?1)` rather than `queue = ?1`: once a file has been analyzed (`ANALYZE`,
/// `PRAGMA optimize`), the bundled SQLite (built with `ENABLE_STAT4`) treats a statement whose
/// plan could depend on a value bound against an indexed column as needing a fresh plan
/// whenever that value is bound, which is every run. The scalar subquery gives the same plan
/// (an equality on the claim index) with nothing to re-plan. Measured on an analyzed file: W2
/// ~19.2k → ~23.8k jobs/s (medians of 7 runs each; unanalyzed files within noise).
///
/// The picked rows are named by `rowid`, which every entry of the claim index carries: the
/// UPDATE then finds each row in the table directly, where naming them by `id` looked each up
/// in the primary key's index first (a second B-tree descent, comparing 16-byte blobs, per
/// claimed row). The rowid of a row cannot change while this one statement runs. It is
/// returned after the columns (index 3) for the completion to find the row by (`hints`), and
/// then the row's priority and due time, the claim cursor's key, which the store reads before
/// it releases the writer and decodes the rows.
pub const CLAIM: &str = "
UPDATE dray_jobs
SET state = 'running', attempt = attempt + 1, leased_until = {now} + ?3, leased_by = ?4
WHERE rowid IN (
    SELECT rowid FROM dray_jobs
    WHERE queue = (SELECT ?1) AND (rank, run_at, id) > (SELECT ?5, ?6, ?7)
      AND finished_at IS NULL AND state IN {pending} AND run_at <= {now}
    ORDER BY rank, run_at, id
    LIMIT ?2)
RETURNING {claim_cols}, rowid, priority, run_at";

/// The rows a lease write names: a JSON array of strings, each the id's 32 hex digits followed
/// by the attempt in decimal and `|` (`"0192…ab3|"` names any attempt); see `lease_item`.
/// Scalars rather than `[id, attempt]` pairs: `json_each` hands a string element over as it is,
/// while a nested array is rendered back to JSON text and parsed again by every `->>` (that
/// round trip was about a tenth of SQLite's time during W2). Fencing as on PostgreSQL: a named
/// attempt must still hold the lease.
///
/// `(SELECT ?1)` for the queue: see CLAIM.
///
/// `+dray_jobs.state` (a unary plus) kept the planner off the running-rows index of schema
/// versions 1–3, which after an `ANALYZE` taken while nothing ran looked nearly empty, so SQLite
/// scanned every running row and evaluated the JSON list once per row (measured: W2-tuned fell
/// from ~40,000 to ~2,000 jobs/s). No index names `state` since version 4; the plus stays so
/// that none ever can. The only plan is the one wanted: each listed id looked up by key.
const REFS: &str = "
FROM ({lease_items}) r
WHERE dray_jobs.id = r.id AND dray_jobs.queue = (SELECT ?1) AND +dray_jobs.state = 'running'
  AND (r.attempt IS NULL OR dray_jobs.attempt = r.attempt)
{lease_returning}";

/// Decodes the lease items of parameter ?N (see REFS) into id, attempt and, after the `|`, the
/// completion's output as JSON text (NULL when nothing follows the `|`).
const LEASE_ITEMS: &str = "
SELECT unhex(substr(i.value, 1, 32)) AS id,
       CAST(NULLIF(substr(i.value, 33, instr(i.value, '|') - 33), '') AS INTEGER) AS attempt,
       json(NULLIF(substr(i.value, instr(i.value, '|') + 1), '')) AS result
FROM json_each(?N) i";

pub const ACK: &str = "
UPDATE dray_jobs SET state = 'completed', finished_at = {now}, leased_until = NULL {refs}";

/// Nack: ?3 = 'requeue', 'dead' or 'release' (see the PostgreSQL store's NACK for what each
/// does); ?4 = redelivery delay in ms.
pub const NACK: &str = "
UPDATE dray_jobs
SET state = CASE WHEN ?3 = 'release' THEN 'available'
                 WHEN ?3 = 'defer' THEN CASE WHEN ?4 > 0 THEN 'scheduled' ELSE 'available' END
                 WHEN ?3 = 'dead' OR dray_jobs.attempt >= dray_jobs.max_attempts THEN 'dead'
                 WHEN ?4 > 0 THEN 'scheduled' ELSE 'available' END,
    attempt = CASE WHEN ?3 IN ('release', 'defer') THEN dray_jobs.attempt - 1
                   ELSE dray_jobs.attempt END,
    run_at = CASE WHEN ?3 = 'defer' THEN {now} + ?4
                  WHEN ?3 = 'release' OR ?3 = 'dead'
                       OR dray_jobs.attempt >= dray_jobs.max_attempts THEN dray_jobs.run_at
                  ELSE {now} + ?4 END,
    finished_at = CASE WHEN ?3 NOT IN ('release', 'defer')
                            AND (?3 = 'dead' OR dray_jobs.attempt >= dray_jobs.max_attempts)
                       THEN {now} END,
    leased_until = NULL {refs}";

pub const EXTEND: &str = "UPDATE dray_jobs SET leased_until = {now} + ?3 {refs}";

/// One window of the expired-lease sweep (see the PostgreSQL store's SWEEP_WINDOW): up to ?5
/// unfinished rows in claim-index order after (?1, ?2, ?3, ?4) = (queue, rank, run_at, id).
/// Answers how many rows the window held, the hex ids among them whose lease has ended (of
/// queue ?6, or of any queue when ?6 is NULL) as a JSON array, and the window's last key.
pub const SWEEP_WINDOW: &str = "
WITH w AS MATERIALIZED (
    SELECT queue, rank, run_at, id, state, leased_until FROM dray_jobs
    WHERE (queue, rank, run_at, id) > (?1, ?2, ?3, ?4) AND finished_at IS NULL
    ORDER BY queue, rank, run_at, id
    LIMIT ?5)
SELECT (SELECT count(*) FROM w),
       (SELECT json_group_array(hex(id)) FROM w
         WHERE state = 'running' AND leased_until <= {now} AND (?6 IS NULL OR queue = ?6)),
       l.queue, l.rank, l.run_at, l.id
FROM (SELECT 1) AS one
LEFT JOIN (SELECT queue, rank, run_at, id FROM w
           ORDER BY queue DESC, rank DESC, run_at DESC, id DESC LIMIT 1) AS l";

/// Rescue the expired leases a sweep window found (?1: a JSON array of hex ids), checked again
/// in this statement.
pub const RESCUE: &str = "
UPDATE dray_jobs
SET state = CASE WHEN attempt >= max_attempts THEN 'dead' ELSE 'available' END,
    finished_at = CASE WHEN attempt >= max_attempts THEN {now} END,
    leased_until = NULL,
    errors = json_insert(errors, '$[#]', json_object('attempt', attempt, 'at', {iso_now},
        'kind', 'lease_expired',
        'message', 'the lease ended without a result (worker died, stalled or was cut off)'))
WHERE id IN (SELECT unhex(value) FROM json_each(?1))
  AND state = 'running' AND leased_until <= {now}
RETURNING queue, state";

pub const GET: &str = "SELECT {cols} FROM dray_jobs WHERE id = ?1";

/// Many jobs by id (a JSON array of ids as 32 hex digits): one query per live-event tick.
pub const GET_MANY: &str =
    "SELECT {cols} FROM dray_jobs WHERE id IN (SELECT unhex(value) FROM json_each(?1))";

/// Every queue with its counts, at one instant.
pub const QUEUE_LIST: &str = "SELECT queue, {counts} FROM dray_jobs, (SELECT {now} AS now) n \
    GROUP BY queue ORDER BY queue";

/// The per-queue gauges: unfinished rows only, every count at one instant `n.now`.
pub const GAUGES: &str = "SELECT queue,
    count(*) FILTER (WHERE state IN {pending} AND run_at <= n.now),
    count(*) FILTER (WHERE state IN {pending} AND run_at > n.now),
    count(*) FILTER (WHERE state = 'running'),
    COALESCE(n.now - min(run_at) FILTER (WHERE state IN {pending} AND run_at <= n.now), 0)
FROM dray_jobs, (SELECT {now} AS now) n WHERE finished_at IS NULL GROUP BY queue ORDER BY queue";

pub const STATS: &str = "SELECT {counts} FROM dray_jobs, (SELECT {now} AS now) n WHERE queue = ?1";

/// A queue's counts by state (available, scheduled, leased, completed, dead, cancelled), every
/// one at the same instant `n.now`.
const COUNTS: &str = "
    count(*) FILTER (WHERE state IN {pending} AND run_at <= n.now),
    count(*) FILTER (WHERE state IN {pending} AND run_at > n.now),
    count(*) FILTER (WHERE state = 'running'),
    count(*) FILTER (WHERE state = 'completed'),
    count(*) FILTER (WHERE state = 'dead'),
    count(*) FILTER (WHERE state = 'cancelled')";

/// Time until the queue's earliest pending row is due, in ms (NULL: none; zero or less: one is
/// due already, see the PostgreSQL store's NEXT_DUE).
pub const NEXT_DUE: &str = "
SELECT min(run_at) - {now} FROM dray_jobs
WHERE queue = ?1 AND finished_at IS NULL AND state IN {pending}";

pub const NOW_MS: &str = "SELECT {now}";

/// Complete a batch: ?1 lists lease items (see REFS), each with its output, if any, after the
/// `|`. Fenced.
pub const COMPLETE: &str = "
UPDATE dray_jobs
SET state = 'completed', finished_at = {now}, leased_until = NULL, result = r.result
FROM ({complete_items}) r
WHERE dray_jobs.id = r.id AND +dray_jobs.state = 'running' -- `+`: see REFS
  AND (r.attempt IS NULL OR dray_jobs.attempt = r.attempt)
{lease_returning}";

/// [`COMPLETE`] for the usual batch, without RETURNING: every attempt the same (?2; NULL:
/// unfenced) and no output. ?1 is a JSON array of hex ids, so each item is one `unhex` instead
/// of the three string cuts and a `json()` of a lease item.
pub const COMPLETE_UNIFORM: &str = "
UPDATE dray_jobs
SET state = 'completed', finished_at = {now}, leased_until = NULL, result = NULL
FROM (SELECT unhex(i.value) AS id FROM json_each(?1) i) r
WHERE dray_jobs.id = r.id AND +dray_jobs.state = 'running' -- `+`: see REFS
  AND (?2 IS NULL OR dray_jobs.attempt = ?2)";

/// [`COMPLETE_UNIFORM`] when the claim's rowid of every row is known (`hints`): each item of ?1
/// is the id's 32 hex digits followed by the rowid in decimal. The row is found by its rowid,
/// straight in the table, and must still carry the id, the running state and the attempt; a
/// rowid that now names another row (or none) matches nothing, and the caller sees a short
/// count.
pub const COMPLETE_UNIFORM_ROWS: &str = "
UPDATE dray_jobs
SET state = 'completed', finished_at = {now}, leased_until = NULL, result = NULL
FROM (SELECT CAST(substr(i.value, 33) AS INTEGER) AS rid, unhex(substr(i.value, 1, 32)) AS id
      FROM json_each(?1) i) r
WHERE dray_jobs.rowid = r.rid AND dray_jobs.id = r.id
  AND +dray_jobs.state = 'running' -- `+`: see REFS
  AND (?2 IS NULL OR dray_jobs.attempt = ?2)";

/// Fail an attempt: ?5 is 'retry', 'dead' or 'cancelled'; ?6 the retry delay in ms. SET
/// expressions all read the row as it was before the update. Fenced.
pub const FAIL: &str = "
UPDATE dray_jobs
SET state = CASE WHEN ?5 = 'retry' AND attempt < max_attempts THEN 'retryable'
                 WHEN ?5 = 'cancelled' THEN 'cancelled' ELSE 'dead' END,
    run_at = CASE WHEN ?5 = 'retry' AND attempt < max_attempts THEN {now} + ?6 ELSE run_at END,
    finished_at = CASE WHEN ?5 = 'retry' AND attempt < max_attempts THEN NULL ELSE {now} END,
    leased_until = NULL,
    errors = json_insert(errors, '$[#]', json_object('attempt', attempt, 'at', {iso_now},
        'kind', ?3, 'message', ?4))
WHERE id = ?1 AND state = 'running' AND (?2 IS NULL OR attempt = ?2)
{lease_returning}";

pub const PROGRESS: &str = "
UPDATE dray_jobs SET progress = ?3, progress_message = ?4
WHERE id = ?1 AND state = 'running' AND (?2 IS NULL OR attempt = ?2)
{lease_returning}";

pub const STATE_OF: &str = "SELECT state FROM dray_jobs WHERE id = ?1";

/// Cancel, given the state read in the same IMMEDIATE transaction (SQLite's RETURNING cannot
/// show the state before the update).
pub const CANCEL: &str = "
UPDATE dray_jobs
SET state = CASE WHEN state IN {pending} THEN 'cancelled' ELSE state END,
    finished_at = CASE WHEN state IN {pending} THEN {now} ELSE finished_at END,
    cancel_requested_at = CASE WHEN state IN {pending} OR state = 'running'
                               THEN COALESCE(cancel_requested_at, {now})
                               ELSE cancel_requested_at END
WHERE id = ?1";

pub const REDRIVE: &str = "
UPDATE dray_jobs
SET state = 'available', attempt = 0, run_at = {now}, finished_at = NULL, leased_until = NULL,
    leased_by = NULL, cancel_requested_at = NULL, result = NULL, progress = NULL,
    progress_message = NULL, callback_attempts = 0, callback_next_at = NULL,
    callback_done_at = NULL, callback_error = NULL
WHERE id = ?1 AND state IN ('dead', 'cancelled')
RETURNING {cols}";

pub const LIST: &str = "
SELECT {cols} FROM dray_jobs
WHERE (?1 IS NULL OR queue = ?1) AND (?2 IS NULL OR kind = ?2)
  AND (?3 IS NULL OR state = ?3) AND (?4 IS NULL OR id < ?4)
ORDER BY id DESC
LIMIT ?5";

pub const PRUNE: &str = "
DELETE FROM dray_jobs WHERE id IN (
    SELECT id FROM dray_jobs
    WHERE finished_at < {now} - ?1
    ORDER BY finished_at
    LIMIT ?2)";

pub const LEADER_ACQUIRE: &str = "
INSERT INTO dray_leaders (name, holder, expires_at) VALUES (?1, ?2, {now} + ?3)
ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
    WHERE dray_leaders.holder = excluded.holder OR dray_leaders.expires_at <= {now}
RETURNING holder";

/// Claim due callback deliveries (see the PostgreSQL store for the reasons); NULLs sort first.
pub const CALLBACK_CLAIM: &str = "
UPDATE dray_jobs
SET callback_attempts = callback_attempts + 1, callback_next_at = {now} + ?2
WHERE id IN (
    SELECT id FROM dray_jobs
    WHERE callback_url IS NOT NULL AND callback_done_at IS NULL AND finished_at IS NOT NULL
      AND (callback_next_at IS NULL OR callback_next_at <= {now})
    ORDER BY callback_next_at
    LIMIT ?1)
RETURNING {cols}";

/// Quarantine rows a claim leased but could not decode (?1: a JSON array of `[hex id,
/// message]`): dead at once, with an `unreadable` attempt error naming the column and what it
/// held, so that the claim's other rows go on as if these were not there.
pub const QUARANTINE: &str = "
UPDATE dray_jobs
SET state = 'dead', finished_at = {now}, leased_until = NULL,
    errors = json_insert(errors, '$[#]', json_object('attempt', attempt, 'at', {iso_now},
        'kind', 'unreadable', 'message', q.value ->> 1))
FROM json_each(?1) AS q
WHERE dray_jobs.id = unhex(q.value ->> 0) AND dray_jobs.state = 'running'";

pub const CALLBACK_SETTLE: &str = "
UPDATE dray_jobs
SET callback_done_at = CASE WHEN ?3 THEN {now} END,
    callback_next_at = CASE WHEN ?3 THEN callback_next_at ELSE {now} + ?4 END,
    callback_error = CASE WHEN ?3 THEN NULL ELSE ?5 END
WHERE id = ?1 AND callback_attempts = ?2 AND callback_done_at IS NULL";

pub const LEADER_RELEASE: &str = "DELETE FROM dray_leaders WHERE name = ?1 AND holder = ?2";

/// Expands the placeholders of a statement above (done once per statement, cached).
pub fn expand(t: &str) -> String {
    t.replace("{counts}", COUNTS)
        .replace("{refs}", REFS)
        .replace("{lease_items}", &LEASE_ITEMS.replace("?N", "?2"))
        .replace("{complete_items}", &LEASE_ITEMS.replace("?N", "?1"))
        .replace("{lease_returning}", LEASE_RETURNING)
        .replace("{iso_now}", ISO_NOW)
        .replace("{cols}", &format!("{CLAIM_COLS}, {TAIL_COLS}"))
        .replace("{claim_cols}", CLAIM_COLS)
        .replace("{pending}", PENDING)
        .replace("{now}", NOW)
}
