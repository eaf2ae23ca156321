-- walcast canonical outbox table (plain). The column names are walcast's
-- defaults ([outbox.columns]); walcast relays `id` (header `id`),
-- `aggregatetype` (topic), `aggregateid` (key), `type` (header `type`) and
-- `payload` (value); with the route in crates/outbox/walcast.toml also
-- `correlation_id` (header `correlation_id`) and `tracingspancontext` (the W3C
-- traceparent, header `traceparent`; Debezium's column name). `created_at` is
-- what `walcast outbox prune --older-than` compares.
CREATE TABLE IF NOT EXISTS outbox (
    id uuid PRIMARY KEY,
    aggregatetype text NOT NULL,
    aggregateid text NOT NULL,
    type text NOT NULL,
    payload jsonb NOT NULL,
    correlation_id text,
    tracingspancontext text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS outbox_created_at_idx ON outbox (created_at);
