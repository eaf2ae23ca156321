-- Upgrades an outbox table created by an earlier 0001 (which had a `headers
-- jsonb` column instead): adds the columns the writer fills and walcast's
-- route reads (crates/outbox/walcast.toml). A no-op on a table created by
-- the current 0001. The old `headers` column is no longer written; drop it
-- when nothing reads it (ALTER TABLE outbox DROP COLUMN headers).
ALTER TABLE IF EXISTS outbox
    ADD COLUMN IF NOT EXISTS correlation_id text,
    ADD COLUMN IF NOT EXISTS tracingspancontext text;
