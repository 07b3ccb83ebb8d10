-- Dray schema version 10: durable workflows. A run is a row of dray_workflow_runs driven by the
-- job of the same id in dray_jobs; its history is dray_workflow_steps, the signals sent to it
-- dray_workflow_signals, its query state dray_workflow_state.
-- Runs with search_path set to Dray's schema, inside one transaction.

CREATE TABLE dray_workflow_runs (
    id                  uuid        PRIMARY KEY,          -- also the id of the driving job
    name                text        NOT NULL,
    version             integer     NOT NULL,
    workflow_id         text        NOT NULL,
    queue               text        NOT NULL,
    input               jsonb       NOT NULL,
    status              text        NOT NULL,
    end_reason          text,                              -- why it compensates
    output              jsonb,
    error               text,
    wait_signal         text,                              -- what a waiting run waits for
    note                text,                              -- why it does not progress
    deadline            timestamptz,                       -- the whole-run timeout
    cancel_requested_at timestamptz,
    parent_id           uuid,
    restarted_from      uuid,
    superseded_by       uuid,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz,
    CONSTRAINT dray_workflow_runs_status_check CHECK (status IN ('queued', 'sleeping', 'waiting',
        'completed', 'failed', 'cancelled', 'timed_out', 'compensating', 'compensated')),
    CONSTRAINT dray_workflow_runs_end_check CHECK (end_reason IS NULL
        OR end_reason IN ('failed', 'cancelled', 'timed_out'))
) WITH (fillfactor = 90);

-- A stable workflow id names one current run per workflow (a restart moves it to the new run).
CREATE UNIQUE INDEX dray_workflow_runs_wid_idx ON dray_workflow_runs (name, workflow_id)
    WHERE superseded_by IS NULL;
CREATE INDEX dray_workflow_runs_parent_idx ON dray_workflow_runs (parent_id)
    WHERE parent_id IS NOT NULL;
CREATE INDEX dray_workflow_runs_finished_idx ON dray_workflow_runs (finished_at)
    WHERE finished_at IS NOT NULL;

CREATE TABLE dray_workflow_steps (
    run_id         uuid        NOT NULL,
    seq            integer     NOT NULL,
    kind           text        NOT NULL,
    name           text        NOT NULL,
    status         text        NOT NULL,
    output         jsonb,
    error          text,
    attempts       integer     NOT NULL DEFAULT 0,
    started_at     timestamptz,
    finished_at    timestamptz,
    wake_at        timestamptz,
    compensated_at timestamptz,
    PRIMARY KEY (run_id, seq),
    CONSTRAINT dray_workflow_steps_status_check CHECK (status IN
        ('pending', 'running', 'completed', 'failed')),
    CONSTRAINT dray_workflow_steps_kind_check CHECK (kind IN
        ('step', 'sleep', 'signal', 'child', 'child_result'))
);

CREATE TABLE dray_workflow_signals (
    id           uuid        PRIMARY KEY,                  -- UUIDv7: sending order
    run_id       uuid        NOT NULL,
    name         text        NOT NULL,
    payload      jsonb       NOT NULL,
    sent_at      timestamptz NOT NULL DEFAULT now(),
    consumed_seq integer                                   -- the wait that took it
);
CREATE INDEX dray_workflow_signals_pending_idx ON dray_workflow_signals (run_id, id)
    WHERE consumed_seq IS NULL;
CREATE INDEX dray_workflow_signals_run_idx ON dray_workflow_signals (run_id);

CREATE TABLE dray_workflow_state (
    run_id     uuid        NOT NULL,
    key        text        NOT NULL,
    value      jsonb       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, key)
);
