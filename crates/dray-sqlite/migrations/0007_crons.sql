-- Dray schema version 7 on SQLite: cron schedules and the record of their ticks (PostgreSQL's
-- schema version 11). Times are INTEGER milliseconds since the Unix epoch.

CREATE TABLE dray_cron_schedules (
    name           TEXT    NOT NULL PRIMARY KEY,
    expression     TEXT    NOT NULL,
    timezone       TEXT    NOT NULL,
    target         TEXT    NOT NULL CHECK (json_valid(target)),
    payload        TEXT    NOT NULL DEFAULT 'null' CHECK (json_valid(payload)),
    queue          TEXT    NOT NULL,
    max_attempts   INTEGER NOT NULL CHECK (max_attempts >= 1),
    catch_up       INTEGER NOT NULL DEFAULT 0,
    catch_up_limit INTEGER NOT NULL DEFAULT 1 CHECK (catch_up_limit >= 0),
    overlap        TEXT    NOT NULL DEFAULT 'skip' CHECK (overlap IN ('skip', 'allow')),
    source         TEXT    NOT NULL CHECK (source IN ('code', 'api')),
    enabled        INTEGER NOT NULL DEFAULT 1,
    paused         INTEGER NOT NULL DEFAULT 0,
    last_tick      INTEGER NOT NULL,
    last_job       BLOB,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
);

CREATE TABLE dray_cron_ticks (
    schedule    TEXT    NOT NULL,
    tick_at     INTEGER NOT NULL,
    status      TEXT    NOT NULL CHECK (status IN ('fired', 'skipped', 'triggered')),
    reason      TEXT,
    job_id      BLOB,
    recorded_at INTEGER NOT NULL,
    PRIMARY KEY (schedule, tick_at)
) WITHOUT ROWID;
CREATE INDEX dray_cron_ticks_at_idx ON dray_cron_ticks (tick_at);
