-- Dray schema version 4 on SQLite: no index names the columns a claim writes.
--
-- SQLite rewrites an index entry on UPDATE only for indexes whose key or predicate names a
-- changed column. Every index here used to name `state` in its predicate, so a claim deleted
-- the row's claim-index entry and inserted a lease-index entry, and a completion deleted that
-- lease-index entry and inserted a finished-index entry: four index writes per job, all on the
-- one writer connection. From here on the predicates say "unfinished" and "finished" through
-- `finished_at`, which only a job's end (and a re-drive) changes, and no index lists running
-- rows by lease end: a claim, a lease extension and a progress report write no index entry, and
-- a completion writes two.
--
-- "Finished" is `finished_at IS NOT NULL`: every statement of the store that sets a terminal
-- state (completed, dead, cancelled) sets `finished_at`, and every one that makes a row pending
-- or running again clears it. (PostgreSQL checks this with a constraint; SQLite cannot add one
-- to an existing table without rebuilding it.)
--
-- The claim index holds running rows too (claims pass over them by state). Its order key
-- `rank` is the negated priority as a generated column, so that every key column ascends: the
-- expired-lease sweep, which walks the unfinished rows in bounded windows, starts each window
-- with one row-value comparison on the whole key, which SQLite turns into an index range only
-- over plain ascending columns.

ALTER TABLE dray_jobs ADD COLUMN rank INTEGER GENERATED ALWAYS AS (-priority) VIRTUAL;

CREATE INDEX dray_jobs_unfinished_idx ON dray_jobs (queue, rank, run_at, id)
    WHERE finished_at IS NULL;
DROP INDEX dray_jobs_claim_idx;
DROP INDEX dray_jobs_lease_idx;

CREATE UNIQUE INDEX dray_jobs_unfinished_key_idx ON dray_jobs (queue, key)
    WHERE key IS NOT NULL AND finished_at IS NULL;
DROP INDEX dray_jobs_key_idx;

CREATE INDEX dray_jobs_finished_at_idx ON dray_jobs (finished_at) WHERE finished_at IS NOT NULL;
DROP INDEX dray_jobs_finished_idx;

CREATE INDEX dray_jobs_callback_due_idx ON dray_jobs (callback_next_at)
    WHERE callback_url IS NOT NULL AND callback_done_at IS NULL AND finished_at IS NOT NULL;
DROP INDEX dray_jobs_callback_idx;
