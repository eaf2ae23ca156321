-- walcast canonical outbox table (plain). The column names are walcast's
-- defaults ([outbox.columns]); walcast relays `id` (header `id`),
-- `aggregatetype` (topic), `aggregateid` (key), `type` (header `type`) and
-- `payload` (value). `headers` carries correlation id, traceparent and the
-- application's own headers; `created_at` is what `walcast outbox prune
-- --older-than` compares.
CREATE TABLE IF NOT EXISTS outbox (
    id uuid PRIMARY KEY,
    aggregatetype text NOT NULL,
    aggregateid text NOT NULL,
    type text NOT NULL,
    payload jsonb NOT NULL,
    headers jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS outbox_created_at_idx ON outbox (created_at);
