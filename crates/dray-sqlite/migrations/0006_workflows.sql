-- Dray schema version 6 on SQLite: durable workflows, the same shape as PostgreSQL's (schema
-- version 10 there). Ids are 16-byte BLOBs, times INTEGER milliseconds since the Unix epoch,
-- JSON is TEXT checked with json_valid.

CREATE TABLE dray_workflow_runs (
    id                  BLOB    NOT NULL PRIMARY KEY CHECK (length(id) = 16),
    name                TEXT    NOT NULL,
    version             INTEGER NOT NULL,
    workflow_id         TEXT    NOT NULL,
    queue               TEXT    NOT NULL,
    input               TEXT    NOT NULL CHECK (json_valid(input)),
    status              TEXT    NOT NULL CHECK (status IN ('queued', 'sleeping', 'waiting',
        'completed', 'failed', 'cancelled', 'timed_out', 'compensating', 'compensated')),
    end_reason          TEXT    CHECK (end_reason IS NULL
        OR end_reason IN ('failed', 'cancelled', 'timed_out')),
    output              TEXT    CHECK (output IS NULL OR json_valid(output)),
    error               TEXT,
    wait_signal         TEXT,
    note                TEXT,
    deadline            INTEGER,
    cancel_requested_at INTEGER,
    parent_id           BLOB,
    restarted_from      BLOB,
    superseded_by       BLOB,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    finished_at         INTEGER
);
CREATE UNIQUE INDEX dray_workflow_runs_wid_idx ON dray_workflow_runs (name, workflow_id)
    WHERE superseded_by IS NULL;
CREATE INDEX dray_workflow_runs_parent_idx ON dray_workflow_runs (parent_id)
    WHERE parent_id IS NOT NULL;
CREATE INDEX dray_workflow_runs_finished_idx ON dray_workflow_runs (finished_at)
    WHERE finished_at IS NOT NULL;

CREATE TABLE dray_workflow_steps (
    run_id         BLOB    NOT NULL,
    seq            INTEGER NOT NULL,
    kind           TEXT    NOT NULL CHECK (kind IN
        ('step', 'sleep', 'signal', 'child', 'child_result')),
    name           TEXT    NOT NULL,
    status         TEXT    NOT NULL CHECK (status IN ('pending', 'running', 'completed', 'failed')),
    output         TEXT    CHECK (output IS NULL OR json_valid(output)),
    error          TEXT,
    attempts       INTEGER NOT NULL DEFAULT 0,
    started_at     INTEGER,
    finished_at    INTEGER,
    wake_at        INTEGER,
    compensated_at INTEGER,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;

CREATE TABLE dray_workflow_signals (
    id           BLOB    NOT NULL PRIMARY KEY CHECK (length(id) = 16),
    run_id       BLOB    NOT NULL,
    name         TEXT    NOT NULL,
    payload      TEXT    NOT NULL CHECK (json_valid(payload)),
    sent_at      INTEGER NOT NULL,
    consumed_seq INTEGER
);
CREATE INDEX dray_workflow_signals_run_idx ON dray_workflow_signals (run_id, id);

CREATE TABLE dray_workflow_state (
    run_id     BLOB    NOT NULL,
    key        TEXT    NOT NULL,
    value      TEXT    NOT NULL CHECK (json_valid(value)),
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (run_id, key)
) WITHOUT ROWID;
