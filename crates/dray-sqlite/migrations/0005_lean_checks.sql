-- Dray schema version 5 on SQLite: only the CHECK constraints that guard a job's life or the
-- readability of what it carries stay (as on PostgreSQL at its version 7).
--
-- SQLite evaluates a table's CHECK constraints on UPDATE whenever a column they name changes,
-- and it codes a constant `IN (…)` list of more than two values as a small temporary B-tree
-- that a constraint (unlike a WHERE clause) builds again for every row it checks. The state
-- check, with its seven states, did so for every row a claim, a completion or a retry wrote:
-- with the attempt and progress range checks, 2–3 µs of the 7–12 µs a claimed or completed row
-- cost (W2, measured with the bundled SQLite on this 2-core box).
--
-- Kept: the id's length and the JSON checks (each runs only when its column is written, and an
-- unreadable payload must never be stored) and the lease check (a running row has a lease end,
-- else no sweep would ever rescue it). Dropped, because every value they limited is checked
-- before it is written (`JobOptions`, `Progress`, the state machine in Dray's own statements)
-- and again when a row is read (an unknown state, a negative attempt or a progress outside
-- 0..=100 is a `CorruptRow` error naming the row): the state list, `attempt >= 0`,
-- `max_attempts >= 1` and `progress BETWEEN 0 AND 100`. A state outside the pending list is
-- never claimed.
--
-- SQLite cannot drop a constraint in place, so the table is rebuilt (copied row by row, rowids
-- kept) inside the migration's transaction, and its indexes made again as version 4 left them.

CREATE TABLE dray_jobs_v5 (
    id                  BLOB    NOT NULL PRIMARY KEY CHECK (length(id) = 16),
    queue               TEXT    NOT NULL,
    kind                TEXT,
    key                 TEXT,
    payload             TEXT    NOT NULL CHECK (json_valid(payload)),
    headers             TEXT    NOT NULL DEFAULT '{}'
                                CHECK (json_valid(headers) AND json_type(headers) = 'object'),
    priority            INTEGER NOT NULL DEFAULT 0,
    state               TEXT    NOT NULL,
    attempt             INTEGER NOT NULL DEFAULT 0,
    max_attempts        INTEGER NOT NULL,
    enqueued_at         INTEGER NOT NULL,
    run_at              INTEGER NOT NULL,
    leased_until        INTEGER,
    leased_by           TEXT,
    finished_at         INTEGER,
    result              TEXT    CHECK (result IS NULL OR json_valid(result)),
    errors              TEXT    NOT NULL DEFAULT '[]'
                                CHECK (json_valid(errors) AND json_type(errors) = 'array'),
    progress            INTEGER,
    progress_message    TEXT,
    cancel_requested_at INTEGER,
    callback_url        TEXT,
    callback_attempts   INTEGER NOT NULL DEFAULT 0,
    callback_next_at    INTEGER,
    callback_done_at    INTEGER,
    callback_error      TEXT,
    rank                INTEGER GENERATED ALWAYS AS (-priority) VIRTUAL,
    CHECK (state <> 'running' OR leased_until IS NOT NULL)
);

INSERT INTO dray_jobs_v5
    (rowid, id, queue, kind, key, payload, headers, priority, state, attempt, max_attempts,
     enqueued_at, run_at, leased_until, leased_by, finished_at, result, errors, progress,
     progress_message, cancel_requested_at, callback_url, callback_attempts, callback_next_at,
     callback_done_at, callback_error)
SELECT rowid, id, queue, kind, key, payload, headers, priority, state, attempt, max_attempts,
       enqueued_at, run_at, leased_until, leased_by, finished_at, result, errors, progress,
       progress_message, cancel_requested_at, callback_url, callback_attempts, callback_next_at,
       callback_done_at, callback_error
FROM dray_jobs;

DROP TABLE dray_jobs;
ALTER TABLE dray_jobs_v5 RENAME TO dray_jobs;

CREATE INDEX dray_jobs_unfinished_idx ON dray_jobs (queue, rank, run_at, id)
    WHERE finished_at IS NULL;
CREATE UNIQUE INDEX dray_jobs_unfinished_key_idx ON dray_jobs (queue, key)
    WHERE key IS NOT NULL AND finished_at IS NULL;
CREATE INDEX dray_jobs_finished_at_idx ON dray_jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX dray_jobs_callback_due_idx ON dray_jobs (callback_next_at)
    WHERE callback_url IS NOT NULL AND callback_done_at IS NULL AND finished_at IS NOT NULL;
