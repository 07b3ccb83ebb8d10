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

