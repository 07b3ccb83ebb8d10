-- Dray schema version 1 on SQLite: the job table (queue messages are job rows) and its indexes.
-- Same shape as PostgreSQL's; the differences: ids are 16-byte BLOBs (UUIDv7, so byte order is
-- time order), times are INTEGER milliseconds since the Unix epoch (UTC), JSON is TEXT checked
-- with json_valid so an unreadable payload can never be stored.

CREATE TABLE dray_jobs (
    id            BLOB    NOT NULL PRIMARY KEY CHECK (length(id) = 16),
    queue         TEXT    NOT NULL,
    kind          TEXT,
    key           TEXT,
    payload       TEXT    NOT NULL CHECK (json_valid(payload)),
    headers       TEXT    NOT NULL DEFAULT '{}' CHECK (json_valid(headers) AND json_type(headers) = 'object'),
    priority      INTEGER NOT NULL DEFAULT 0,
    state         TEXT    NOT NULL CHECK (state IN
        ('scheduled', 'available', 'running', 'retryable', 'completed', 'dead', 'cancelled')),
    attempt       INTEGER NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    max_attempts  INTEGER NOT NULL CHECK (max_attempts >= 1),
    enqueued_at   INTEGER NOT NULL,
    run_at        INTEGER NOT NULL,
    leased_until  INTEGER,
    leased_by     TEXT,
    finished_at   INTEGER,
    CHECK (state <> 'running' OR leased_until IS NOT NULL)
);

-- The claim index: the pending set in the claim's order.
CREATE INDEX dray_jobs_claim_idx ON dray_jobs (queue, priority DESC, run_at, id)
    WHERE state IN ('scheduled', 'available', 'retryable');

-- Expired-lease sweep.
CREATE INDEX dray_jobs_lease_idx ON dray_jobs (leased_until) WHERE state = 'running';

-- At most one unfinished message per (queue, key).
CREATE UNIQUE INDEX dray_jobs_key_idx ON dray_jobs (queue, key)
    WHERE key IS NOT NULL AND state IN ('scheduled', 'available', 'retryable', 'running');
