-- Dray schema version 4: the claim index in one sort direction, so a claim can start where the
-- previous one ended.
--
-- Every claim changes a row's state, so its entry in the (partial) claim index goes dead. Dead
-- entries stay until VACUUM; a claim that starts at the head of the queue walks every one of
-- them, and under a backlog that walk grows with everything claimed since the last vacuum. With
-- every key column ascending, a claim can instead start just past the last row it claimed
-- (`(queue, -priority, run_at, id) > cursor`, one B-tree descent). The store still scans from the
-- head regularly, so rows that sort before the cursor (a higher priority enqueued later, a
-- rescued lease) are never left behind. `-priority` is computed in int4 because smallint's
-- minimum has no negation in smallint.
--
-- Built inside the migration's transaction: writes to dray_jobs wait while it builds (a second
-- or so per million pending rows).

CREATE INDEX dray_jobs_claim_cursor_idx ON dray_jobs (queue, (-(priority::int4)), run_at, id)
    WHERE state IN ('scheduled', 'available', 'retryable');

DROP INDEX dray_jobs_claim_idx;

-- The expired-lease index, keyed the same but with a predicate that the fenced lease writes
-- (complete, fail, ack, extend: `state = 'running' AND id = …`) do not imply. With
-- `WHERE state = 'running'` the planner could read the whole index of running rows for them,
-- estimating it nearly empty from statistics taken when nothing ran, and then filter by id: a
-- cost that grows with the number of jobs in flight. Only running rows have a lease end
-- (`dray_jobs_lease_check` and every transition out of running clears it), so the rows indexed
-- are the same; the rescue's `leased_until <= now()` still implies the new predicate.
CREATE INDEX dray_jobs_lease_end_idx ON dray_jobs (leased_until) WHERE leased_until IS NOT NULL;

DROP INDEX dray_jobs_lease_idx;
