-- Dray schema version 13: what the HTTP API (dray serve) keeps: bearer tokens, stored only as
-- the SHA-256 of their secret, and the answers of POSTs sent with an Idempotency-Key.
-- Runs with search_path set to Dray's schema, inside one transaction.

CREATE TABLE dray_tokens (
    id         uuid        PRIMARY KEY,
    name       text        NOT NULL,
    scopes     text        NOT NULL,
    hash       text        NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz,
    revoked_at timestamptz
);
-- A name names one live token; a revoked token's name may be used again.
CREATE UNIQUE INDEX dray_tokens_live_name_idx ON dray_tokens (name) WHERE revoked_at IS NULL;

CREATE TABLE dray_idempotency (
    scope       text        NOT NULL,
    key         text        NOT NULL,
    fingerprint text        NOT NULL,
    status      integer,
    body        text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key)
);
CREATE INDEX dray_idempotency_created_idx ON dray_idempotency (created_at);
