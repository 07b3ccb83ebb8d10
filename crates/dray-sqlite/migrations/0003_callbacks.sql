-- Dray schema version 3 on SQLite: HTTP completion callbacks (see the PostgreSQL migration).

ALTER TABLE dray_jobs ADD COLUMN callback_url TEXT;
ALTER TABLE dray_jobs ADD COLUMN callback_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE dray_jobs ADD COLUMN callback_next_at INTEGER;
ALTER TABLE dray_jobs ADD COLUMN callback_done_at INTEGER;
ALTER TABLE dray_jobs ADD COLUMN callback_error TEXT;

CREATE INDEX dray_jobs_callback_idx ON dray_jobs (callback_next_at)
    WHERE callback_url IS NOT NULL AND callback_done_at IS NULL
      AND state IN ('completed', 'dead', 'cancelled');
