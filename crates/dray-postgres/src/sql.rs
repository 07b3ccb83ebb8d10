//! Every SQL statement the PostgreSQL store runs at steady state, with the reasons.
//!
//! Table names are qualified with Dray's schema (`{s}`, substituted once when the store opens)
//! rather than relying on `search_path`, because some statements run on the caller's own
//! connection (enqueue inside the caller's transaction), whose `search_path` is theirs.
//! Every time comparison uses the database clock, `now()` (the transaction's start time).

use std::sync::Arc;

/// The columns a claimed [`dray_core::Message`] is decoded from, in `decode_row`'s order:
/// every column but those whose value the claim fixes (see `dray_core::batch::RowTail`).
/// Empty headers and an empty error list (what nearly every claimed row has) come back as
/// NULL, which spares PostgreSQL a `jsonb` output and the client a JSON parse for each, per row.
const CLAIM_COLS: &str = "j.id, j.kind, j.key, j.payload, NULLIF(j.headers, '{}'::jsonb), \
     j.priority, j.attempt, j.max_attempts, j.enqueued_at, j.run_at, j.leased_until, \
     NULLIF(j.errors, '[]'::jsonb), j.progress, j.progress_message, \
     (j.cancel_requested_at IS NOT NULL), j.callback_url";

/// The columns every other read adds after [`CLAIM_COLS`] (`decode_tail`).
const TAIL_COLS: &str = "j.queue, j.state, j.leased_by, j.finished_at, j.result, \
     j.callback_attempts, j.callback_done_at, j.callback_error";

/// Every column of a job row, in the tables' order (`dray_jobs` and `dray_jobs_history` have the
/// same columns, schema version 9).
const ALL_COLS: [&str; 25] = [
    "id",
    "queue",
    "kind",
    "key",
    "payload",
    "headers",
    "priority",
    "state",
    "attempt",
    "max_attempts",
    "enqueued_at",
    "run_at",
    "leased_until",
    "leased_by",
    "finished_at",
    "result",
    "errors",
    "progress",
    "progress_message",
    "cancel_requested_at",
    "callback_url",
    "callback_attempts",
    "callback_next_at",
    "callback_done_at",
    "callback_error",
];

/// The row `j` as it leaves for the other table: every column by name, those in `overrides`
/// as the given expressions (for a `RETURNING` list whose rows an `INSERT … SELECT` then
/// writes, see [`MOVE`]).
fn moved(overrides: &[(&str, &str)]) -> String {
    ALL_COLS
        .iter()
        .map(|c| match overrides.iter().find(|(o, _)| o == c) {
            Some((_, expr)) => format!("{expr} AS {c}"),
            None => format!("j.{c}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// How a finished job leaves the hot table (schema version 9): a `gone` CTE deletes the rows and
/// returns them in their final form (`moved`), and this CTE writes them to the history, in the
/// same statement, so a job is always in exactly one of the two tables.
const MOVE: &str = "moved AS (INSERT INTO {s}.dray_jobs_history ({all}) SELECT {all} FROM gone)";

/// The overrides of a job that finishes now as `state` (an SQL expression).
fn finishing(state: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("state", state),
        ("finished_at", "now()"),
        ("leased_until", "NULL::timestamptz"),
    ]
}

/// What every fenced lease write returns: the row, its new state, and whether a cancel is
/// pending (so a heartbeat tells a running handler to stop).
const LEASE_RETURNING: &str = "RETURNING j.id, j.state, (j.cancel_requested_at IS NOT NULL)";

/// "The row is running", written so that the planner cannot apply the column's statistics to
/// it. Statistics taken while nothing ran (the usual case after a bulk enqueue) say that no row
/// is running, so a plain `state = 'running'` is estimated to match one row of any batch, and
/// the planner then joins the rows to the batch's UNNEST list with a nested loop that re-reads
/// the whole list for each row found: n² for a batch of n, 1.5–4 s per completion of 2,000
/// while a 100,000-job backlog drained (leases looked lost meanwhile). `(state || '') =
/// 'running'`, used before, gets the default selectivity of an equality (0.5%), which still
/// chose that loop for batches of up to a few hundred. A boolean expression the planner cannot
/// see into is estimated to hold for half the rows, and the list is then hashed for every batch
/// size (the unit test `lease_writes_of_large_batches_stay_linear_after_analyze` checks the
/// plans' loop counts from 33 to 2,000 ids). No index names `state` (schema version 5), so the
/// rows are still found through the primary key.
const RUNNING: &str = "COALESCE(j.state = 'running', false)";

/// The pending states: rows the claim may take once `run_at <= now()`. A statement that should
/// walk `dray_jobs_unfinished_idx` also says `finished_at IS NULL`, that index's predicate,
/// which the state alone does not let the planner infer.
const PENDING: &str = "('scheduled', 'available', 'retryable')";

/// Bulk insert: one statement for any number of rows, each column passed as one array
/// (UNNEST), so a batch of 1,000 costs one round trip and one parse.
///
/// * The due time is computed here from the database clock: `delay` is added to `now()`;
///   `not_before` is taken as given.
/// * Dedup keys: `ON CONFLICT` names the partial unique index over unfinished rows. `DO UPDATE`
///   (a no-op assignment) rather than `DO NOTHING` so that `RETURNING` yields the *existing* row,
///   and `xmax <> 0` tells an existing row (updated by us) from a fresh insert, in the same
///   round trip. The client removes repeated keys from a batch first, because one statement may
///   not update the same row twice.
/// * No NOTIFY here: the store sends it after the commit, or in the caller's transaction for
///   `enqueue_in` (see migration 0006).
const INSERT: &str = "
INSERT INTO {s}.dray_jobs AS j
    (id, queue, kind, key, payload, headers, priority, state, attempt, max_attempts,
     enqueued_at, run_at, callback_url)
SELECT r.id, r.queue, r.kind, r.key, r.payload::jsonb, r.headers::jsonb, r.priority,
       CASE WHEN r.due > now() THEN 'scheduled' ELSE 'available' END,
       0, r.max_attempts, COALESCE(r.enqueued_at, now()), r.due, r.callback_url
FROM (
    SELECT u.*, COALESCE(u.not_before, now() + u.delay_us * interval '1 microsecond') AS due
    FROM {rows}
         AS u(id, queue, kind, key, payload, headers, priority, delay_us, not_before,
              enqueued_at, max_attempts, callback_url)
) r
{on_conflict}
{returning}";

/// The rows of [`INSERT`] for a batch: one array per column.
const INSERT_ROWS: &str = "UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
        $6::text[], $7::int2[], $8::int8[], $9::timestamptz[], $10::timestamptz[], $11::int4[],
        $12::text[])";

/// The rows of [`INSERT`] for a uniform batch: no keys, and every message with the same
/// queue, kind, headers, priority, due time, enqueue time, attempts and callback, which is what
/// `enqueue_many` makes. Only ids and payloads travel as arrays (`$1`, `$2`); the rest is sent
/// once (`$3`–`$11`). Twelve arrays of 1,000 elements each cost the client their encoding and
/// the server their decoding and unnesting, for ten columns that repeat one value.
const INSERT_UNIFORM_ROWS: &str = "(SELECT a.id, $3::text, $4::text, NULL::text, a.payload,
        $5::text, $6::int2, $7::int8, $8::timestamptz, $9::timestamptz, $10::int4, $11::text
        FROM UNNEST($1::uuid[], $2::text[]) AS a(id, payload))";

/// The row of [`INSERT`] for one message (`Queue::enqueue`): the same columns as scalars, which
/// spares the server decoding twelve one-element arrays and unnesting them. Numbered as in
/// [`INSERT_UNIFORM_ROWS`] (id `$1`, payload `$2`, the shared columns `$3`–`$11`), with the
/// key last (`$12`), so that one binding of `$3`–`$11` serves both.
const INSERT_ONE_ROW: &str = "(VALUES ($1::uuid, $3::text, $4::text, $12::text, $2::text,
        $5::text, $6::int2, $7::int8, $8::timestamptz, $9::timestamptz, $10::int4, $11::text))";

/// What [`INSERT`] reads back for a batch with dedup keys: each row, and whether it was already
/// there. A batch without keys reads back nothing: every row is new (its id was made
/// client-side, and a duplicate id fails the statement), so the row count says it all, and
/// PostgreSQL sends no result row per job, and the client decodes none.
const INSERT_RETURNING: &str = "RETURNING j.id, j.queue, j.key, (j.xmax::text <> '0') AS duplicate";

/// The dedup clause of [`INSERT`], for batches in which some message has a key. A batch
/// without keys leaves it out: with `ON CONFLICT`, PostgreSQL inserts every row speculatively
/// (a speculative-insertion lock and one more WAL record per row), even for rows that the
/// arbiter index's predicate (`key IS NOT NULL`) excludes.
const ON_CONFLICT: &str = "ON CONFLICT (queue, key)
    WHERE key IS NOT NULL AND finished_at IS NULL
    DO UPDATE SET key = EXCLUDED.key";

/// Leased insert (`Store::message_insert_leased`): one message, due now and without a key,
/// stored as a claim by `$9` (lease in µs) and `$10` (holder) would leave it: running, attempt
/// 1. Reads back only what the database decides (the times); the rest is what was sent.
const INSERT_LEASED: &str = "
INSERT INTO {s}.dray_jobs AS j
    (id, queue, kind, payload, headers, priority, state, attempt, max_attempts,
     enqueued_at, run_at, leased_until, leased_by, callback_url)
VALUES ($1, $2, $3, $4::text::jsonb, $5::text::jsonb, $6, 'running', 1, $7,
        COALESCE($8, now()), now(), now() + $9 * interval '1 microsecond', $10, $11)
RETURNING j.enqueued_at, j.run_at, j.leased_until";

/// Claim: pick and lease in ONE statement, so the row lock taken by `FOR UPDATE SKIP LOCKED`
/// is held until the state change commits (a separate SELECT then UPDATE would let two
/// receivers take the same row).
///
/// The pick starts after a cursor `($5, $6, $7)` = (−priority, run_at, id) of the last row
/// this process claimed from the queue, one B-tree descent past the dead index entries that
/// earlier claims left behind (see migration 0004); `$5 = i32::MIN` starts at the head. The
/// row comparison is the scan's start key in `dray_jobs_unfinished_idx`, whose key columns
/// are all ascending in delivery order. The queue is pinned by `queue <= $1` together with the
/// row comparison (which implies `queue >= $1`) rather than by `queue = $1`: given an equality
/// on the first column, PostgreSQL starts the scan from the equality alone and only filters
/// by the row comparison, walking every dead entry again.
///
/// The pick is an `ARRAY(…)` sub-select, which PostgreSQL runs once, before the UPDATE, as an
/// InitPlan: it cannot be folded into the UPDATE (which could lock more rows than `LIMIT` asks
/// for). Its ORDER BY matches `dray_jobs_unfinished_idx` exactly, so the pick is an index range
/// scan that stops after `LIMIT` unlocked pending rows. That index also holds the running rows
/// (so that a claim is a HOT update, see migration 0005); the pick passes over them by their
/// state, and a claim from the cursor, which starts past the rows this process claimed last,
/// does not even walk them. The UPDATE then finds the picked rows by `ctid`
/// (a TID scan: no second index descent per row). `ctid = ANY(array)` rather than a join is
/// deliberate: with real table statistics the planner otherwise prefers a hash join over a
/// sequential scan of the whole table for a large batch, which made each claim cost as much
/// as the table is big. The ctid is stable while the statement runs because the pick holds the
/// row lock; a row updated between the statement's snapshot and the lock is simply not
/// claimed this time (it stays pending).
const CLAIM: &str = "
UPDATE {s}.dray_jobs j
SET state = 'running',
    attempt = j.attempt + 1,
    leased_until = now() + $3 * interval '1 microsecond',
    leased_by = $4
WHERE j.ctid = ANY(ARRAY(
    SELECT ctid FROM {s}.dray_jobs
    WHERE (queue, -(priority::int4), run_at, id) > ($1, $5, $6, $7) AND queue <= $1
      AND finished_at IS NULL AND state IN {pending} AND run_at <= now()
    ORDER BY queue, -(priority::int4), run_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED))
RETURNING {claim_cols}";

/// The rows a queue-port lease write (ack, nack, extend) names: `$1` the queue, `$2` the ids,
/// `$3` the attempts (NULL: unfenced). Fencing: a row named with an attempt is touched only
/// while that attempt still holds the lease (`state = 'running' AND attempt = r.attempt`); a
/// late write by a receiver whose lease was rescued matches nothing.
///
/// `j.id = ANY($2)` repeats the join key as an array condition so the rows are always found
/// through the primary key: joining the UNNEST alone lets the planner hash-join it against
/// every running row (the lease index), a cost that grows with the number of jobs in flight.
/// `COMPLETE` does the same.
const REFS: &str = "FROM UNNEST($2::uuid[], $3::int4[]) AS r(id, attempt)
WHERE {refs_where}
{lease_returning}";

/// The conditions of [`REFS`], for a `DELETE … USING` of the same rows.
const REFS_WHERE: &str = "j.id = ANY($2) AND j.id = r.id AND j.queue = $1 AND {running}
  AND (r.attempt IS NULL OR j.attempt = r.attempt)";

/// The fenced lease write's answer from the rows a statement moved to the history.
const GONE_RETURNING: &str = "SELECT id, state, (cancel_requested_at IS NOT NULL) FROM gone";

/// Ack: completes leased rows (they move to the history).
const ACK: &str = "
WITH gone AS (
    DELETE FROM {s}.dray_jobs j USING UNNEST($2::uuid[], $3::int4[]) AS r(id, attempt)
    WHERE {refs_where}
    RETURNING {moved_completed}),
{move}
{gone_returning}";

/// Nack, by mode `$4`:
/// * `'requeue'`: deliverable again after `$5` µs; a row that has used all its attempts goes
///   dead instead, so a poison message cannot loop forever;
/// * `'dead'`: dead at once;
/// * `'release'`: the delivery never started: available at once at its old due time (so in
///   its old place in the queue), its attempt uncounted (`attempt - 1`; the claim counted it).
///
/// The rows that die (`'dead'`, or out of attempts) move to the history; the others stay.
const NACK: &str = "
WITH kept AS (
    UPDATE {s}.dray_jobs j
    SET state = CASE WHEN $4 = 'release' THEN 'available'
                     WHEN $5 > 0 THEN 'scheduled' ELSE 'available' END,
        attempt = CASE WHEN $4 IN ('release', 'defer') THEN j.attempt - 1 ELSE j.attempt END,
        run_at = CASE WHEN $4 = 'release' THEN j.run_at
                      ELSE now() + $5 * interval '1 microsecond' END,
        leased_until = NULL
    FROM UNNEST($2::uuid[], $3::int4[]) AS r(id, attempt)
    WHERE {refs_where} AND NOT {nack_dies}
    {lease_returning}),
gone AS (
    DELETE FROM {s}.dray_jobs j USING UNNEST($2::uuid[], $3::int4[]) AS r(id, attempt)
    WHERE {refs_where} AND {nack_dies}
    RETURNING {moved_dead}),
{move}
SELECT * FROM kept UNION ALL {gone_returning}";

/// Whether a nack (mode `$4`) ends the row: a `'dead'` nack, or a requeue of a row that has
/// used all its attempts.
const NACK_DIES: &str =
    "($4 NOT IN ('release', 'defer') AND ($4 = 'dead' OR j.attempt >= j.max_attempts))";

/// Extend (heartbeat): the lease now ends `$4` microseconds after the database's now().
const EXTEND: &str = "
UPDATE {s}.dray_jobs j
SET leased_until = now() + $4 * interval '1 microsecond'
{refs}";

/// One window of the expired-lease sweep: up to `$5` unfinished rows in claim-index order,
/// starting after `($1, $2, $3, $4)` = (queue, −priority, run_at, id). Answers one row: how many
/// rows the window held, the ids among them whose lease has ended (of queue `$6`, or of any
/// queue when `$6` is NULL), and the window's last key, where the next window starts.
///
/// There is no index of running rows by lease end: it would name `state` or `leased_until`,
/// and then no claim or heartbeat could be a HOT update (migration 0005). The sweep walks the
/// claim index instead, a bounded window per call, so its cost per call stays bounded however
/// large the backlog is.
const SWEEP_WINDOW: &str = "
WITH w AS MATERIALIZED (
    SELECT queue, -(priority::int4) AS np, run_at, id, state, leased_until
    FROM {s}.dray_jobs
    WHERE (queue, -(priority::int4), run_at, id) > ($1, $2, $3, $4) AND finished_at IS NULL
    ORDER BY queue, -(priority::int4), run_at, id
    LIMIT $5)
SELECT (SELECT count(*) FROM w),
       ARRAY(SELECT id FROM w WHERE state = 'running' AND leased_until <= now()
                                AND ($6::text IS NULL OR queue = $6)),
       l.queue, l.np, l.run_at, l.id
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (SELECT queue, np, run_at, id FROM w
                   ORDER BY queue DESC, np DESC, run_at DESC, id DESC LIMIT 1) AS l ON true";

/// Rescue the expired leases a sweep window found (`$1`): back to available (or dead when out of
/// attempts). The lease is checked again under the row lock, and `SKIP LOCKED` keeps the sweep
/// from waiting on (or racing) a receiver that is acking the same row right now: whichever
/// commits first wins, the other matches nothing.
///
/// A row out of attempts dies and moves to the history; the others become available again.
const RESCUE: &str = "
WITH l AS MATERIALIZED (
    SELECT ctid, attempt >= max_attempts AS dies FROM {s}.dray_jobs
    WHERE id = ANY($1) AND state = 'running' AND leased_until <= now()
    FOR UPDATE SKIP LOCKED),
kept AS (
    UPDATE {s}.dray_jobs j
    SET state = 'available', leased_until = NULL, errors = {lease_expired}
    WHERE j.ctid = ANY(ARRAY(SELECT ctid FROM l WHERE NOT dies))
    RETURNING j.queue, j.state),
gone AS (
    DELETE FROM {s}.dray_jobs j
    WHERE j.ctid = ANY(ARRAY(SELECT ctid FROM l WHERE dies))
    RETURNING {moved_expired}),
{move}
SELECT * FROM kept UNION ALL SELECT queue, state FROM gone";

/// The attempt error a rescue records.
const LEASE_EXPIRED: &str = "j.errors || jsonb_build_array(jsonb_build_object('attempt', j.attempt,
        'at', now(), 'kind', 'lease_expired',
        'message', 'the lease ended without a result (worker died, stalled or was cut off)'))";

/// Reads go through `dray_jobs_all`, the hot table and the history as one (schema version 9).
const GET: &str = "SELECT {cols} FROM {s}.dray_jobs_all j WHERE j.id = $1";

/// Many jobs by id, wherever they are (hot table or history): one query per live-event tick.
const GET_MANY: &str = "SELECT {cols} FROM {s}.dray_jobs_all j WHERE j.id = ANY($1)";

/// Every queue with its counts, at one now().
const QUEUE_LIST: &str =
    "SELECT queue, {counts} FROM {s}.dray_jobs_all GROUP BY queue ORDER BY queue";

/// The per-queue gauges: the unfinished rows only (the hot table), every count at one now().
const GAUGES: &str = "
SELECT queue,
    count(*) FILTER (WHERE state IN {pending} AND run_at <= now()) AS available,
    count(*) FILTER (WHERE state IN {pending} AND run_at > now())  AS scheduled,
    count(*) FILTER (WHERE state = 'running') AS running,
    COALESCE((EXTRACT(EPOCH FROM now() - min(run_at)
        FILTER (WHERE state IN {pending} AND run_at <= now())) * 1000000)::int8, 0) AS oldest_us
FROM {s}.dray_jobs WHERE finished_at IS NULL GROUP BY queue ORDER BY queue";

/// Stats: one scan of the queue's rows, every count at the same now().
const STATS: &str = "SELECT {counts} FROM {s}.dray_jobs_all WHERE queue = $1";

/// A queue's counts by state, every one at the same now().
const COUNTS: &str = "
    count(*) FILTER (WHERE state IN {pending} AND run_at <= now()) AS available,
    count(*) FILTER (WHERE state IN {pending} AND run_at > now())  AS scheduled,
    count(*) FILTER (WHERE state = 'running')   AS leased,
    count(*) FILTER (WHERE state = 'completed') AS completed,
    count(*) FILTER (WHERE state = 'dead')      AS dead,
    count(*) FILTER (WHERE state = 'cancelled') AS cancelled";

/// Time until the queue's earliest pending row is due, in microseconds (NULL: none; zero or
/// less: one is due already). Rows already due count: a row that came due between a claim that
/// found nothing and this query is due now, and a receiver told "nothing is coming" would
/// leave it for a whole poll interval.
const NEXT_DUE: &str = "
SELECT (EXTRACT(EPOCH FROM min(run_at) - now()) * 1000000)::int8
FROM {s}.dray_jobs
WHERE queue = $1 AND finished_at IS NULL AND state IN {pending}";

/// [`NEXT_DUE`] for a handle that has claimed from the queue: the rows after its claim
/// cursor `($2, $3, $4)` = (−priority, run_at, id), the ones enqueued since in delivery order,
/// and the rows of a higher priority than the cursor's. It does not walk the rows before the
/// cursor at the cursor's priority: the finished ones among them are dead index entries, which
/// VACUUM cannot remove while another transaction holds the xmin horizon back, and walking them
/// cost every idle look tens of milliseconds then. A pending row among them (released or
/// rescued by another process) is found by the next head scan.
const NEXT_DUE_AFTER: &str = "
SELECT (EXTRACT(EPOCH FROM least(
    (SELECT min(run_at) FROM {s}.dray_jobs
     WHERE (queue, -(priority::int4), run_at, id) > ($1, $2, $3, $4) AND queue <= $1
       AND finished_at IS NULL AND state IN {pending}),
    (SELECT min(run_at) FROM {s}.dray_jobs
     WHERE queue = $1 AND -(priority::int4) < $2 AND finished_at IS NULL AND state IN {pending})
) - now()) * 1000000)::int8";

/// Complete: finished attempts with their outputs, one statement for the whole batch (the
/// worker's completer buffers them for a few milliseconds). Fenced like ack.
///
/// It answers with one row, not one per job: how many rows it completed, and the ids it
/// completed only when that is fewer than it was given (a lease was lost: the caller needs to
/// know which). A batch of 1,000 then costs PostgreSQL one result row instead of 1,000, and the
/// client one row to read.
///
/// The completed rows move to the history (see [`MOVE`]).
const COMPLETE: &str = "
WITH gone AS (
    DELETE FROM {s}.dray_jobs j
    USING UNNEST($1::uuid[], $2::int4[], $3::text[]) AS r(id, attempt, result)
    WHERE j.id = ANY($1) AND j.id = r.id AND {running}
      AND (r.attempt IS NULL OR j.attempt = r.attempt)
    RETURNING {moved_with_result}),
{move}
SELECT count(*),
       CASE WHEN count(*) < cardinality($1) THEN COALESCE(array_agg(id), '{}') END
FROM gone";

/// [`COMPLETE`] for the usual batch: every attempt the same (`$2`; NULL: unfenced) and no
/// output (jobs returning `()`). The rows are found by the primary key alone and fenced by
/// the one attempt number, with no id list to unnest and join: with the raw-SQL floor's claim
/// on this machine, this statement ran the drain at ~65k jobs/s where `COMPLETE` ran it at
/// ~50k (back to back).
const COMPLETE_UNIFORM: &str = "
WITH gone AS (
    DELETE FROM {s}.dray_jobs j
    WHERE j.id = ANY($1) AND {running} AND ($2::int4 IS NULL OR j.attempt = $2)
    RETURNING {moved_completed}),
{move}
SELECT count(*),
       CASE WHEN count(*) < cardinality($1) THEN COALESCE(array_agg(id), '{}') END
FROM gone";

/// Fail: record the attempt's error and move on: retryable after a delay (dead when out of
/// attempts), dead, or cancelled. $5 is 'retry', 'dead' or 'cancelled'. Fenced. A row that ends
/// (dead or cancelled) moves to the history.
const FAIL: &str = "
WITH kept AS (
    UPDATE {s}.dray_jobs j
    SET state = 'retryable', run_at = now() + $6 * interval '1 microsecond',
        leased_until = NULL, errors = {fail_error}
    WHERE j.id = $1 AND {running} AND ($2::int4 IS NULL OR j.attempt = $2)
      AND $5::text = 'retry' AND j.attempt < j.max_attempts
    {lease_returning}),
gone AS (
    DELETE FROM {s}.dray_jobs j
    WHERE j.id = $1 AND {running} AND ($2::int4 IS NULL OR j.attempt = $2)
      AND NOT ($5::text = 'retry' AND j.attempt < j.max_attempts)
    RETURNING {moved_failed}),
{move}
SELECT * FROM kept UNION ALL {gone_returning}";

/// The attempt error a failure records (`$3` kind, `$4` message).
const FAIL_ERROR: &str = "j.errors || jsonb_build_array(jsonb_build_object('attempt', j.attempt,
        'at', now(), 'kind', $3::text, 'message', $4::text))";

/// Progress of a running attempt. Fenced.
const PROGRESS: &str = "
UPDATE {s}.dray_jobs j SET progress = $3, progress_message = $4
WHERE j.id = $1 AND {running} AND ($2::int4 IS NULL OR j.attempt = $2)
{lease_returning}";

/// Cancel: a pending job is cancelled at once (and moves to the history); a running one gets a
/// cancel request that its worker sees at the next heartbeat. Answers the state before the
/// change: read under the row lock for a hot row, as stored for a finished one.
const CANCEL: &str = "
WITH o AS MATERIALIZED (SELECT state FROM {s}.dray_jobs WHERE id = $1 FOR UPDATE),
gone AS (
    DELETE FROM {s}.dray_jobs j
    WHERE j.id = $1 AND (SELECT state FROM o) IN {pending}
    RETURNING {moved_cancelled}),
{move},
asked AS (
    UPDATE {s}.dray_jobs j SET cancel_requested_at = COALESCE(j.cancel_requested_at, now())
    WHERE j.id = $1 AND (SELECT state FROM o) = 'running'
    RETURNING j.id)
SELECT state FROM o
UNION ALL
SELECT h.state FROM {s}.dray_jobs_history h WHERE h.id = $1 AND NOT EXISTS (SELECT 1 FROM o)
LIMIT 1";

/// Re-drive a dead or cancelled job with fresh attempts; its error history stays. The row moves
/// back from the history to the hot table; one that finished before schema version 9 (still in
/// the hot table) is reset where it is.
const REDRIVE: &str = "
WITH gone AS (
    DELETE FROM {s}.dray_jobs_history j
    WHERE j.id = $1 AND j.state IN ('dead', 'cancelled')
    RETURNING {moved_redriven}),
back AS (
    INSERT INTO {s}.dray_jobs AS j ({all}) SELECT {all} FROM gone
    RETURNING {cols}),
legacy AS (
    UPDATE {s}.dray_jobs j
    SET state = 'available', attempt = 0, run_at = now(), finished_at = NULL,
        leased_until = NULL, leased_by = NULL, cancel_requested_at = NULL, result = NULL,
        progress = NULL, progress_message = NULL, callback_attempts = 0,
        callback_next_at = NULL, callback_done_at = NULL, callback_error = NULL
    WHERE j.id = $1 AND j.state IN ('dead', 'cancelled')
    RETURNING {cols})
SELECT * FROM back UNION ALL SELECT * FROM legacy";

const LIST: &str = "
SELECT {cols} FROM {s}.dray_jobs_all j
WHERE ($1::text IS NULL OR j.queue = $1) AND ($2::text IS NULL OR j.kind = $2)
  AND ($3::text IS NULL OR j.state = $3) AND ($4::uuid IS NULL OR j.id < $4)
ORDER BY j.id DESC
LIMIT $5";

/// Prune finished rows still in the hot table (they finished before schema version 9) in bounded
/// batches, oldest first (walks dray_jobs_finished_at_idx: a row is finished exactly when it
/// has a `finished_at`, a constraint since schema version 5).
const PRUNE: &str = "
DELETE FROM {s}.dray_jobs WHERE id IN (
    SELECT id FROM {s}.dray_jobs
    WHERE finished_at < now() - $1 * interval '1 microsecond'
    ORDER BY finished_at
    LIMIT $2)";

/// Take or renew a leadership lease: the upsert's WHERE lets it through only for the current
/// holder or once the lease has expired (database clock); no row back means someone else leads.
/// Prune the history: drop the hourly partitions past the retention `$1` (whole tables, no
/// row-by-row delete); answers how many rows they held.
const PRUNE_HISTORY: &str = "SELECT {s}.dray_history_drop($1 * interval '1 microsecond')";

/// Prune history rows one by one, in bounded batches, oldest first, from `{from}`: the default
/// partition (rows whose hour had no partition yet), or the whole history when the retention
/// is shorter than a partition's hour.
const PRUNE_HISTORY_ROWS: &str = "
DELETE FROM {s}.{from} WHERE id IN (
    SELECT id FROM {s}.{from}
    WHERE finished_at < now() - $1 * interval '1 microsecond'
    ORDER BY finished_at
    LIMIT $2)";

/// Make the history's partitions for the next hours (see migration 0009).
const PREPARE_HISTORY: &str = "SELECT {s}.dray_history_prepare(3)";

const LEADER_ACQUIRE: &str = "
INSERT INTO {s}.dray_leaders AS l (name, holder, expires_at)
VALUES ($1, $2, now() + $3 * interval '1 microsecond')
ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
    WHERE l.holder = EXCLUDED.holder OR l.expires_at <= now()
RETURNING l.holder";

const LEADER_RELEASE: &str = "DELETE FROM {s}.dray_leaders WHERE name = $1 AND holder = $2";

/// Claim due callback deliveries: finished jobs with a URL not yet delivered, whose next try
/// is due. Leased by pushing callback_next_at out, so a dispatcher that dies mid-try is
/// retried after the lease; SKIP LOCKED keeps concurrent dispatchers apart. From the history,
/// and from rows that finished before schema version 9 (in the hot table).
const CALLBACK_CLAIM: &str = "
WITH h AS (
    UPDATE {s}.dray_jobs_history j
    SET callback_attempts = j.callback_attempts + 1,
        callback_next_at = now() + $2 * interval '1 microsecond'
    WHERE j.id = ANY(ARRAY(
        SELECT id FROM {s}.dray_jobs_history
        WHERE callback_url IS NOT NULL AND callback_done_at IS NULL
          AND (callback_next_at IS NULL OR callback_next_at <= now())
        ORDER BY callback_next_at NULLS FIRST
        LIMIT $1
        FOR UPDATE SKIP LOCKED))
    RETURNING {cols}),
legacy AS (
    UPDATE {s}.dray_jobs j
    SET callback_attempts = j.callback_attempts + 1,
        callback_next_at = now() + $2 * interval '1 microsecond'
    WHERE j.ctid = ANY(ARRAY(
        SELECT ctid FROM {s}.dray_jobs
        WHERE callback_url IS NOT NULL AND callback_done_at IS NULL AND finished_at IS NOT NULL
          AND (callback_next_at IS NULL OR callback_next_at <= now())
        ORDER BY callback_next_at NULLS FIRST
        LIMIT $1
        FOR UPDATE SKIP LOCKED))
    RETURNING {cols})
SELECT * FROM h UNION ALL SELECT * FROM legacy";

/// Quarantine rows a claim leased but could not decode (`$1` ids, `$2` the error to record):
/// dead at once, with an `unreadable` attempt error naming the column and what it held, so
/// that the claim's other rows go on as if these were not there. An error list that is itself
/// the unreadable column starts afresh (the recorded message says what it held).
const QUARANTINE: &str = "
WITH gone AS (
    DELETE FROM {s}.dray_jobs j USING UNNEST($1::uuid[], $2::text[]) AS q(id, message)
    WHERE j.id = ANY($1) AND j.id = q.id AND j.state = 'running'
    RETURNING {moved_quarantined}),
{move}
SELECT count(*) FROM gone";

/// The attempt error a quarantine records: an error list that is itself the unreadable column
/// starts afresh.
const QUARANTINE_ERROR: &str =
    "CASE WHEN jsonb_typeof(j.errors) = 'array' THEN j.errors ELSE '[]'::jsonb END
        || jsonb_build_array(jsonb_build_object('attempt', j.attempt, 'at', now(),
               'kind', 'unreadable', 'message', q.message))";

/// Settle a callback try ($3: delivered?), fenced by the try number; answers how many rows it
/// settled (the row is in the history, or in the hot table if it finished before version 9).
const CALLBACK_SETTLE: &str = "
WITH h AS ({settle_in_history} RETURNING 1), legacy AS ({settle_in_hot} RETURNING 1)
SELECT (SELECT count(*) FROM h) + (SELECT count(*) FROM legacy)";

/// One table's half of [`CALLBACK_SETTLE`] (`{table}`).
const SETTLE_IN: &str = "
UPDATE {s}.{table}
SET callback_done_at = CASE WHEN $3 THEN now() END,
    callback_next_at = CASE WHEN $3 THEN callback_next_at
                            ELSE now() + $4 * interval '1 microsecond' END,
    callback_error = CASE WHEN $3 THEN NULL ELSE $5::text END
WHERE id = $1 AND callback_attempts = $2 AND callback_done_at IS NULL";

/// Wakes receivers in other processes: after enqueues (from the store's notifier once they
/// committed, or inside the caller's transaction), requeues and rescues.
pub const NOTIFY: &str = "SELECT pg_notify($1, q) FROM UNNEST($2::text[]) AS q";

/// A write that names its rows by a list of ids, in two texts: one run as a cached prepared
/// statement for short lists, one planned for each run for long ones.
///
/// After five runs PostgreSQL may switch a prepared statement to a generic plan, made without
/// looking at the parameters: it assumes a list of ten ids and, for the join with the list,
/// picks a nested loop. Fine for a few rows; for a completion of 1,000 it meant a million
/// comparisons and about a second per statement (seen while draining a 200,000-job backlog).
/// A long list therefore runs as a one-off (unnamed) statement, which PostgreSQL plans for the
/// actual list. The driver reuses a cached statement for any text it has cached, so the
/// one-off form differs by a trailing comment. Short lists, which a lightly loaded worker sends
/// one job at a time, keep the cached plan and its lower latency.
#[derive(Debug)]
pub struct Batched {
    cached: Arc<str>,
    once: Arc<str>,
}

impl Batched {
    /// Longest id list that runs with the cached plan.
    const CACHED_UP_TO: usize = 32;

    fn new(text: Arc<str>) -> Batched {
        Batched {
            once: format!("{text}\n-- planned for this batch").into(),
            cached: text,
        }
    }

    /// The text to run for a list of `n` ids, and whether the driver may cache it.
    pub fn for_len(&self, n: usize) -> (Arc<str>, bool) {
        if n <= Self::CACHED_UP_TO {
            (self.cached.clone(), true)
        } else {
            (self.once.clone(), false)
        }
    }
}

/// The statements above with the schema filled in, built once per store.
#[derive(Debug)]
pub struct Sql {
    pub insert: Arc<str>,
    pub insert_unkeyed: Arc<str>,
    pub insert_one: Arc<str>,
    pub insert_one_unkeyed: Arc<str>,
    pub insert_leased: Arc<str>,
    pub insert_uniform: Arc<str>,
    pub claim: Arc<str>,
    pub ack: Batched,
    pub nack: Batched,
    pub extend: Batched,
    pub sweep_window: Arc<str>,
    pub rescue: Arc<str>,
    pub get: Arc<str>,
    pub get_many: Arc<str>,
    pub queue_list: Arc<str>,
    pub gauges: Arc<str>,
    pub stats: Arc<str>,
    pub next_due: Arc<str>,
    pub next_due_after: Arc<str>,
    pub complete: Batched,
    pub complete_uniform: Batched,
    pub fail: Arc<str>,
    pub progress: Arc<str>,
    pub cancel: Arc<str>,
    pub redrive: Arc<str>,
    pub list: Arc<str>,
    pub prune: Arc<str>,
    pub prune_history: Arc<str>,
    pub prune_history_default: Arc<str>,
    pub prune_history_rows: Arc<str>,
    pub prepare_history: Arc<str>,
    pub leader_acquire: Arc<str>,
    pub leader_release: Arc<str>,
    pub callback_claim: Arc<str>,
    pub callback_settle: Arc<str>,
    pub quarantine: Arc<str>,
}

impl Sql {
    /// Fills in the quoted schema name.
    pub fn new(quoted_schema: &str) -> Sql {
        let all = ALL_COLS.join(", ");
        let mut with_result = finishing("'completed'");
        with_result.push(("result", "r.result::jsonb"));
        let mut completed = finishing("'completed'");
        completed.push(("result", "NULL::jsonb"));
        let mut expired = finishing("'dead'");
        expired.push(("errors", LEASE_EXPIRED));
        let mut failed =
            finishing("CASE WHEN $5::text = 'cancelled' THEN 'cancelled' ELSE 'dead' END");
        failed.push(("errors", FAIL_ERROR));
        let mut cancelled = finishing("'cancelled'");
        cancelled.push((
            "cancel_requested_at",
            "COALESCE(j.cancel_requested_at, now())",
        ));
        let mut quarantined = finishing("'dead'");
        quarantined.push(("errors", QUARANTINE_ERROR));
        let redriven: Vec<(&str, &str)> = vec![
            ("state", "'available'"),
            ("attempt", "0"),
            ("run_at", "now()"),
            ("finished_at", "NULL::timestamptz"),
            ("leased_until", "NULL::timestamptz"),
            ("leased_by", "NULL::text"),
            ("cancel_requested_at", "NULL::timestamptz"),
            ("result", "NULL::jsonb"),
            ("progress", "NULL::int2"),
            ("progress_message", "NULL::text"),
            ("callback_attempts", "0"),
            ("callback_next_at", "NULL::timestamptz"),
            ("callback_done_at", "NULL::timestamptz"),
            ("callback_error", "NULL::text"),
        ];
        let f = |t: &str| -> Arc<str> {
            t.replace("{counts}", COUNTS)
                .replace(
                    "{settle_in_history}",
                    &SETTLE_IN.replace("{table}", "dray_jobs_history"),
                )
                .replace(
                    "{settle_in_hot}",
                    &SETTLE_IN.replace("{table}", "dray_jobs"),
                )
                .replace("{refs}", REFS)
                .replace("{refs_where}", REFS_WHERE)
                .replace("{nack_dies}", NACK_DIES)
                .replace("{move}", MOVE)
                .replace("{gone_returning}", GONE_RETURNING)
                .replace("{moved_with_result}", &moved(&with_result))
                .replace("{moved_completed}", &moved(&completed))
                .replace("{moved_dead}", &moved(&finishing("'dead'")))
                .replace("{moved_expired}", &moved(&expired))
                .replace("{moved_failed}", &moved(&failed))
                .replace("{moved_cancelled}", &moved(&cancelled))
                .replace("{moved_quarantined}", &moved(&quarantined))
                .replace("{moved_redriven}", &moved(&redriven))
                .replace("{lease_expired}", LEASE_EXPIRED)
                .replace("{fail_error}", FAIL_ERROR)
                .replace("{all}", &all)
                .replace("{running}", RUNNING)
                .replace("{lease_returning}", LEASE_RETURNING)
                .replace("{cols}", &format!("{CLAIM_COLS}, {TAIL_COLS}"))
                .replace("{claim_cols}", CLAIM_COLS)
                .replace("{pending}", PENDING)
                .replace("{s}", quoted_schema)
                .into()
        };
        let insert = |rows: &str, keyed: bool| {
            f(&INSERT
                .replace("{rows}", rows)
                .replace("{on_conflict}", if keyed { ON_CONFLICT } else { "" })
                .replace("{returning}", if keyed { INSERT_RETURNING } else { "" }))
        };
        Sql {
            insert: insert(INSERT_ROWS, true),
            insert_unkeyed: insert(INSERT_ROWS, false),
            insert_one: insert(INSERT_ONE_ROW, true),
            insert_one_unkeyed: insert(INSERT_ONE_ROW, false),
            insert_leased: f(INSERT_LEASED),
            insert_uniform: insert(INSERT_UNIFORM_ROWS, false),
            claim: f(CLAIM),
            ack: Batched::new(f(ACK)),
            nack: Batched::new(f(NACK)),
            extend: Batched::new(f(EXTEND)),
            sweep_window: f(SWEEP_WINDOW),
            rescue: f(RESCUE),
            get: f(GET),
            get_many: f(GET_MANY),
            queue_list: f(QUEUE_LIST),
            gauges: f(GAUGES),
            stats: f(STATS),
            next_due: f(NEXT_DUE),
            next_due_after: f(NEXT_DUE_AFTER),
            complete: Batched::new(f(COMPLETE)),
            complete_uniform: Batched::new(f(COMPLETE_UNIFORM)),
            fail: f(FAIL),
            progress: f(PROGRESS),
            cancel: f(CANCEL),
            redrive: f(REDRIVE),
            list: f(LIST),
            prune: f(PRUNE),
            prune_history: f(PRUNE_HISTORY),
            prune_history_default: f(
                &PRUNE_HISTORY_ROWS.replace("{from}", "dray_jobs_history_default")
            ),
            prune_history_rows: f(&PRUNE_HISTORY_ROWS.replace("{from}", "dray_jobs_history")),
            prepare_history: f(PREPARE_HISTORY),
            leader_acquire: f(LEADER_ACQUIRE),
            leader_release: f(LEADER_RELEASE),
            callback_claim: f(CALLBACK_CLAIM),
            callback_settle: f(CALLBACK_SETTLE),
            quarantine: f(QUARANTINE),
        }
    }
}
