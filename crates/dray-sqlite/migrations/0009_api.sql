-- Dray schema version 9 on SQLite: bearer tokens of the HTTP API (only their SHA-256) and the
-- answers of POSTs sent with an Idempotency-Key (PostgreSQL's schema version 13).

CREATE TABLE dray_tokens (
    id         BLOB    NOT NULL PRIMARY KEY CHECK (length(id) = 16),
    name       TEXT    NOT NULL,
    scopes     TEXT    NOT NULL,
    hash       TEXT    NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    revoked_at INTEGER
);
CREATE UNIQUE INDEX dray_tokens_live_name_idx ON dray_tokens (name) WHERE revoked_at IS NULL;

CREATE TABLE dray_idempotency (
    scope       TEXT    NOT NULL,
    key         TEXT    NOT NULL,
    fingerprint TEXT    NOT NULL,
    status      INTEGER,
    body        TEXT,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX dray_idempotency_created_idx ON dray_idempotency (created_at);
