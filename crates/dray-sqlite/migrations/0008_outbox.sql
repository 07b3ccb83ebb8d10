-- Dray schema version 8 on SQLite: the transactional outbox and the inbox (PostgreSQL's schema
-- version 12).

CREATE TABLE dray_outbox (
    id           BLOB    NOT NULL PRIMARY KEY CHECK (length(id) = 16),
    outbox       TEXT    NOT NULL,
    event_type   TEXT    NOT NULL,
    event_id     TEXT    NOT NULL,
    payload      TEXT    NOT NULL CHECK (json_valid(payload)),
    ordering_key TEXT,
    occurred_at  INTEGER NOT NULL,
    status       TEXT    NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'processing', 'published', 'failed')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    available_at INTEGER NOT NULL,
    claimed_at   INTEGER,
    claimed_by   TEXT,
    published_at INTEGER,
    last_error   TEXT
);
CREATE UNIQUE INDEX dray_outbox_event_idx ON dray_outbox (outbox, event_id);
CREATE INDEX dray_outbox_pending_idx ON dray_outbox (outbox, id) WHERE status = 'pending';
CREATE INDEX dray_outbox_processing_idx ON dray_outbox (outbox, claimed_at) WHERE status = 'processing';
CREATE INDEX dray_outbox_published_idx ON dray_outbox (published_at) WHERE status = 'published';

CREATE TABLE dray_inbox (
    inbox      TEXT    NOT NULL,
    message_id TEXT    NOT NULL,
    seen_at    INTEGER NOT NULL,
    PRIMARY KEY (inbox, message_id)
) WITHOUT ROWID;
CREATE INDEX dray_inbox_seen_idx ON dray_inbox (seen_at);
