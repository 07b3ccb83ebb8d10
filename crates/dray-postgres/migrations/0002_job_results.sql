-- Dray schema version 2: what typed jobs record beyond the queue port, and leadership.

ALTER TABLE dray_jobs
    ADD COLUMN result              jsonb,                      -- the handler's output
    ADD COLUMN errors              jsonb NOT NULL DEFAULT '[]', -- one entry per failed attempt
    ADD COLUMN progress            smallint,                   -- 0..100, set by the handler
    ADD COLUMN progress_message    text,
    ADD COLUMN cancel_requested_at timestamptz,
    ADD CONSTRAINT dray_jobs_progress_check CHECK (progress BETWEEN 0 AND 100);

-- Pruning finished rows walks this (terminal rows only). There is deliberately no index over
-- all rows by state: every state change would insert into it (state is in the claim index's
-- predicate, so no claim or completion is a HOT update), costing the hot path ~15% for the
-- benefit of admin listings; listings walk the primary key (newest first) instead.
CREATE INDEX dray_jobs_finished_idx ON dray_jobs (finished_at)
    WHERE state IN ('completed', 'dead', 'cancelled');

-- Leadership for maintenance (rescuing leases, pruning; crons later): one row per role, held
-- by the process whose lease has not expired. A lease row rather than an advisory lock works
-- the same on both stores, survives connection churn, and fails over by expiry, on the
-- database clock, when its holder dies.
CREATE TABLE dray_leaders (
    name       text PRIMARY KEY,
    holder     text NOT NULL,
    expires_at timestamptz NOT NULL
);
