//! Every SQL statement the SQLite store runs at steady state, with the reasons.
//!
//! All writes go through one writer connection, so each statement below is atomic against every
//! other writer of this process; other processes are serialized by SQLite's database lock (WAL
//! mode, `busy_timeout`). There is no SKIP LOCKED and none is needed: a claim is one UPDATE,
//! and only one UPDATE runs at a time.
//!
//! Time is SQLite's clock, read once per statement ({now}: milliseconds since the Unix epoch;
//! SQLite evaluates 'now' once per statement step, so every use in a statement agrees).

/// The columns a message is decoded from, in `decode_message`'s order.
const COLS: &str = "id, queue, kind, key, payload, headers, priority, state, attempt, \
     max_attempts, enqueued_at, run_at, leased_until, leased_by, finished_at";

const NOW: &str = "CAST(round(unixepoch('subsec') * 1000) AS INTEGER)";

const PENDING: &str = "('scheduled', 'available', 'retryable')";

/// Insert one row; a key that matches an unfinished row inserts nothing (no RETURNING row), and
/// the store then reads the existing id in the same transaction. (`WHERE true` is SQLite's
/// required disambiguation between INSERT … SELECT and an upsert clause.)
pub const INSERT: &str = "
INSERT INTO dray_jobs
    (id, queue, kind, key, payload, headers, priority, state, attempt, max_attempts,
     enqueued_at, run_at)
SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7,
       CASE WHEN d.due > d.now THEN 'scheduled' ELSE 'available' END,
       0, ?10, COALESCE(?11, d.now), d.due
FROM (SELECT {now} AS now, COALESCE(?9, {now} + ?8) AS due) d
WHERE true
ON CONFLICT (queue, key)
    WHERE key IS NOT NULL AND state IN ('scheduled', 'available', 'retryable', 'running')
    DO NOTHING
RETURNING id";

pub const FIND_KEY: &str = "
SELECT id FROM dray_jobs
WHERE queue = ?1 AND key = ?2 AND state IN ('scheduled', 'available', 'retryable', 'running')";

/// Claim: pick and lease in one UPDATE. The subquery reads the claim index in delivery order.
pub const CLAIM: &str = "
UPDATE dray_jobs
SET state = 'running', attempt = attempt + 1, leased_until = {now} + ?3, leased_by = ?4
WHERE id IN (
    SELECT id FROM dray_jobs
    WHERE queue = ?1 AND state IN {pending} AND run_at <= {now}
    ORDER BY priority DESC, run_at, id
    LIMIT ?2)
RETURNING {cols}";

/// The rows a lease write names: a JSON array of [hex id, attempt or null]. Fencing as on
/// PostgreSQL: a named attempt must still hold the lease.
const REFS: &str = "
FROM (SELECT unhex(value ->> 0) AS id, value ->> 1 AS attempt FROM json_each(?2)) r
WHERE dray_jobs.id = r.id AND dray_jobs.queue = ?1 AND dray_jobs.state = 'running'
  AND (r.attempt IS NULL OR dray_jobs.attempt = r.attempt)
RETURNING dray_jobs.id, dray_jobs.state";

pub const ACK: &str = "
UPDATE dray_jobs SET state = 'completed', finished_at = {now}, leased_until = NULL {refs}";

/// Nack: ?3 = requeue (1) or dead (0); ?4 = redelivery delay in ms.
pub const NACK: &str = "
UPDATE dray_jobs
SET state = CASE WHEN NOT ?3 OR dray_jobs.attempt >= dray_jobs.max_attempts THEN 'dead'
                 WHEN ?4 > 0 THEN 'scheduled' ELSE 'available' END,
    run_at = CASE WHEN NOT ?3 OR dray_jobs.attempt >= dray_jobs.max_attempts THEN dray_jobs.run_at
                  ELSE {now} + ?4 END,
    finished_at = CASE WHEN NOT ?3 OR dray_jobs.attempt >= dray_jobs.max_attempts THEN {now} END,
    leased_until = NULL {refs}";

pub const EXTEND: &str = "UPDATE dray_jobs SET leased_until = {now} + ?3 {refs}";

pub const RESCUE: &str = "
UPDATE dray_jobs
SET state = CASE WHEN attempt >= max_attempts THEN 'dead' ELSE 'available' END,
    finished_at = CASE WHEN attempt >= max_attempts THEN {now} END,
    leased_until = NULL
WHERE id IN (
    SELECT id FROM dray_jobs
    WHERE state = 'running' AND leased_until <= {now} AND (?1 IS NULL OR queue = ?1)
    ORDER BY leased_until
    LIMIT 1000)
RETURNING queue, state";

pub const GET: &str = "SELECT {cols} FROM dray_jobs WHERE id = ?1";

pub const STATS: &str = "
SELECT
    count(*) FILTER (WHERE state IN {pending} AND run_at <= n.now),
    count(*) FILTER (WHERE state IN {pending} AND run_at > n.now),
    count(*) FILTER (WHERE state = 'running'),
    count(*) FILTER (WHERE state = 'completed'),
    count(*) FILTER (WHERE state = 'dead'),
    count(*) FILTER (WHERE state = 'cancelled')
FROM dray_jobs, (SELECT {now} AS now) n WHERE queue = ?1";

pub const NEXT_DUE: &str = "
SELECT min(run_at) - {now} FROM dray_jobs
WHERE queue = ?1 AND state IN {pending} AND run_at > {now}";

pub const NOW_MS: &str = "SELECT {now}";

/// Expands the placeholders of a statement above (done once per statement, cached).
pub fn expand(t: &str) -> String {
    t.replace("{refs}", REFS)
        .replace("{cols}", COLS)
        .replace("{pending}", PENDING)
        .replace("{now}", NOW)
}
