-- Dray schema version 5: claims, heartbeats and progress as HOT updates.
--
-- PostgreSQL can update a row in place on its page, adding no index entry (a HOT update), only
-- when no column that any index names changes, in its key or in its predicate. Until now every
-- index's predicate named `state`, so every transition, the claim above all, wrote a new row
-- version into every index whose predicate it met (the primary key and the lease index for a
-- claim). From here on no index names `state`, `attempt`, `leased_until` or `leased_by`: the
-- predicates say "unfinished" or "finished" through `finished_at`, which only the end of a
-- job's life (and a re-drive) changes. A claim, a lease extension and a progress report then
-- stay on their page; a job costs one non-HOT update (its completion) instead of two.
--
-- The price: there is no index of running rows by lease end. The expired-lease sweep walks the
-- unfinished rows through the claim index instead, in bounded windows (see the store's sweep).
--
-- Built inside the migration's transaction: writes to dray_jobs wait while it builds.

-- What the predicates below rely on: a row is finished exactly when it has a finished_at.
ALTER TABLE dray_jobs ADD CONSTRAINT dray_jobs_finished_check
    CHECK ((finished_at IS NULL) = (state IN ('scheduled', 'available', 'retryable', 'running')));

-- The claim index, now over every unfinished row: a claimed (running) row stays in it, so the
-- claim's state change is not an index change. Claims skip running rows by their state; a
-- claim that starts from its cursor does not even walk them.
CREATE INDEX dray_jobs_unfinished_idx ON dray_jobs (queue, (-(priority::int4)), run_at, id)
    WHERE finished_at IS NULL;
DROP INDEX dray_jobs_claim_cursor_idx;
DROP INDEX dray_jobs_lease_idx;

-- At most one unfinished message per (queue, key): the same rows as before.
CREATE UNIQUE INDEX dray_jobs_unfinished_key_idx ON dray_jobs (queue, key)
    WHERE key IS NOT NULL AND finished_at IS NULL;
DROP INDEX dray_jobs_key_idx;

-- Pruning (terminal rows, oldest first).
CREATE INDEX dray_jobs_finished_at_idx ON dray_jobs (finished_at) WHERE finished_at IS NOT NULL;
DROP INDEX dray_jobs_finished_idx;

-- Pending callback deliveries.
CREATE INDEX dray_jobs_callback_due_idx ON dray_jobs (callback_next_at NULLS FIRST)
    WHERE callback_url IS NOT NULL AND callback_done_at IS NULL AND finished_at IS NOT NULL;
DROP INDEX dray_jobs_callback_idx;

-- Room for a claimed version of every row beside the row itself: a claim batch updates every
-- row of the pages it takes in one transaction, so none of them can be pruned to make room
-- before it commits. (Applies to pages filled from now on.)
ALTER TABLE dray_jobs SET (fillfactor = 50);
