-- Dray schema version 11: cron schedules and the record of their ticks. A tick is recorded
-- under (schedule, tick_at) in the transaction that enqueues its job, so no tick can fire twice.
-- Runs with search_path set to Dray's schema, inside one transaction.

CREATE TABLE dray_cron_schedules (
    name           text        PRIMARY KEY,
    expression     text        NOT NULL,
    timezone       text        NOT NULL,
    target         jsonb       NOT NULL,                 -- handler, job kind or workflow
    payload        jsonb       NOT NULL DEFAULT 'null',
    queue          text        NOT NULL,
    max_attempts   integer     NOT NULL,
    catch_up       boolean     NOT NULL DEFAULT false,
    catch_up_limit integer     NOT NULL DEFAULT 1,
    overlap        text        NOT NULL DEFAULT 'skip',
    source         text        NOT NULL,                 -- code (register_cron) or api
    enabled        boolean     NOT NULL DEFAULT true,    -- false once no worker declares it
    paused         boolean     NOT NULL DEFAULT false,
    last_tick      timestamptz NOT NULL DEFAULT now(),   -- the next tick is after it
    last_job       uuid,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT dray_cron_schedules_overlap_check CHECK (overlap IN ('skip', 'allow')),
    CONSTRAINT dray_cron_schedules_source_check CHECK (source IN ('code', 'api')),
    CONSTRAINT dray_cron_schedules_attempts_check CHECK (max_attempts >= 1 AND catch_up_limit >= 0)
);

CREATE TABLE dray_cron_ticks (
    schedule    text        NOT NULL,
    tick_at     timestamptz NOT NULL,
    status      text        NOT NULL,
    reason      text,
    job_id      uuid,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule, tick_at),
    CONSTRAINT dray_cron_ticks_status_check CHECK (status IN ('fired', 'skipped', 'triggered'))
);
CREATE INDEX dray_cron_ticks_at_idx ON dray_cron_ticks (tick_at);
