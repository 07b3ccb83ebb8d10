-- Dray schema version 1: the job table (queue messages are job rows) and its indexes.
-- Runs with search_path set to Dray's schema, inside one transaction.

CREATE TABLE dray_jobs (
    id            uuid        PRIMARY KEY,             -- UUIDv7, made client-side
    queue         text        NOT NULL,
    kind          text,                                -- message type / job kind
    key           text,                                -- dedup key while unfinished
    payload       jsonb       NOT NULL,
    headers       jsonb       NOT NULL DEFAULT '{}',
    priority      smallint    NOT NULL DEFAULT 0,      -- higher first
    state         text        NOT NULL,
    attempt       integer     NOT NULL DEFAULT 0,      -- deliveries so far
    max_attempts  integer     NOT NULL,
    enqueued_at   timestamptz NOT NULL,
    run_at        timestamptz NOT NULL,                -- due time
    leased_until  timestamptz,                         -- set while running
    leased_by     text,
    finished_at   timestamptz,
    CONSTRAINT dray_jobs_state_check CHECK (state IN
        ('scheduled', 'available', 'running', 'retryable', 'completed', 'dead', 'cancelled')),
    CONSTRAINT dray_jobs_attempts_check CHECK (max_attempts >= 1 AND attempt >= 0),
    CONSTRAINT dray_jobs_lease_check CHECK (state <> 'running' OR leased_until IS NOT NULL)
) WITH (fillfactor = 80); -- room on each page so lease and state updates can stay HOT-ish

-- The claim index: the pending set, in exactly the order the claim reads it. Partial, so
-- finished rows (the bulk of the table over time) never enter it.
CREATE INDEX dray_jobs_claim_idx ON dray_jobs (queue, priority DESC, run_at, id)
    WHERE state IN ('scheduled', 'available', 'retryable');

-- Expired-lease sweep: only running rows.
CREATE INDEX dray_jobs_lease_idx ON dray_jobs (leased_until) WHERE state = 'running';

-- At most one unfinished message per (queue, key). The insert's ON CONFLICT names this
-- predicate, so a duplicate returns the existing row in the same round trip.
CREATE UNIQUE INDEX dray_jobs_key_idx ON dray_jobs (queue, key)
    WHERE key IS NOT NULL AND state IN ('scheduled', 'available', 'retryable', 'running');

-- Wake-ups: one NOTIFY per inserting statement and queue (not per row), on channel
-- "<schema>.dray", payload = queue name. Delivered at commit, so a rolled-back enqueue never
-- wakes anyone. Identical notifications in one transaction are coalesced by PostgreSQL.
CREATE FUNCTION dray_jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '.dray', q.queue)
       FROM (SELECT DISTINCT n.queue FROM new_rows n WHERE n.state = 'available') q;
    RETURN NULL;
END $$;

CREATE TRIGGER dray_jobs_notify_insert AFTER INSERT ON dray_jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION dray_jobs_notify();
