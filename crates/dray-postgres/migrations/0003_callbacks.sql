-- Dray schema version 3: HTTP completion callbacks. A job enqueued with a callback URL gets one
-- delivery per terminal state, made by any worker's dispatcher and retried until the endpoint
-- answers 2xx. The columns below are the delivery's durable state.

ALTER TABLE dray_jobs
    ADD COLUMN callback_url      text,
    ADD COLUMN callback_attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN callback_next_at  timestamptz,   -- next try (also the lease of a try in flight)
    ADD COLUMN callback_done_at  timestamptz,   -- delivered (2xx) at
    ADD COLUMN callback_error    text;          -- what the last failed try saw

-- Pending deliveries only: finished jobs with a URL and no successful delivery yet.
CREATE INDEX dray_jobs_callback_idx ON dray_jobs (callback_next_at NULLS FIRST)
    WHERE callback_url IS NOT NULL AND callback_done_at IS NULL
      AND state IN ('completed', 'dead', 'cancelled');
