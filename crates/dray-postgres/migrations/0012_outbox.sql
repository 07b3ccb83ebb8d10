-- Dray schema version 12: the transactional outbox and the inbox.
-- Runs with search_path set to Dray's schema, inside one transaction.

CREATE TABLE dray_outbox (
    id           uuid        PRIMARY KEY,            -- UUIDv7: staging order
    outbox       text        NOT NULL,
    event_type   text        NOT NULL,
    event_id     text        NOT NULL,
    payload      jsonb       NOT NULL,
    ordering_key text,
    occurred_at  timestamptz NOT NULL,
    status       text        NOT NULL DEFAULT 'pending',
    attempts     integer     NOT NULL DEFAULT 0,
    available_at timestamptz NOT NULL DEFAULT now(),
    claimed_at   timestamptz,
    claimed_by   text,
    published_at timestamptz,
    last_error   text,
    CONSTRAINT dray_outbox_status_check CHECK (status IN ('pending', 'processing', 'published', 'failed'))
) WITH (fillfactor = 80);
-- An event id once per outbox: a second staging of it is dropped.
CREATE UNIQUE INDEX dray_outbox_event_idx ON dray_outbox (outbox, event_id);
-- The claim: pending rows of an outbox in staging order.
CREATE INDEX dray_outbox_pending_idx ON dray_outbox (outbox, id) WHERE status = 'pending';
CREATE INDEX dray_outbox_processing_idx ON dray_outbox (outbox, claimed_at) WHERE status = 'processing';
CREATE INDEX dray_outbox_published_idx ON dray_outbox (published_at) WHERE status = 'published';

CREATE TABLE dray_inbox (
    inbox      text        NOT NULL,
    message_id text        NOT NULL,
    seen_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (inbox, message_id)
);
CREATE INDEX dray_inbox_seen_idx ON dray_inbox (seen_at);
