-- Dray schema version 14: outbox events carry headers (the W3C trace context of the span that
-- staged them, and any the application set), delivered with the event by every sink.
-- A constant default: PostgreSQL adds the column without rewriting the table.

ALTER TABLE dray_outbox ADD COLUMN headers jsonb NOT NULL DEFAULT '{}'::jsonb;
