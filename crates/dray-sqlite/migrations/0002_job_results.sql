-- Dray schema version 2 on SQLite: job results, attempt errors, progress, cancellation, and
-- leadership (see the PostgreSQL migration for the reasons).

ALTER TABLE dray_jobs ADD COLUMN result TEXT CHECK (result IS NULL OR json_valid(result));
ALTER TABLE dray_jobs ADD COLUMN errors TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(errors) AND json_type(errors) = 'array');
ALTER TABLE dray_jobs ADD COLUMN progress INTEGER CHECK (progress BETWEEN 0 AND 100);
ALTER TABLE dray_jobs ADD COLUMN progress_message TEXT;
ALTER TABLE dray_jobs ADD COLUMN cancel_requested_at INTEGER;

CREATE INDEX dray_jobs_finished_idx ON dray_jobs (finished_at)
    WHERE state IN ('completed', 'dead', 'cancelled');

CREATE TABLE dray_leaders (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
