-- Dray schema version 10 on SQLite: outbox events carry headers, a JSON object of strings (the
-- W3C trace context of the span that staged them, and any the application set); PostgreSQL's
-- schema version 14.

ALTER TABLE dray_outbox ADD COLUMN headers TEXT NOT NULL DEFAULT '{}';
