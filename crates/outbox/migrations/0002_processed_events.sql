-- The idempotent consumer's deduplication table (walcast-consumer): one row
-- per (consumer group, event id), inserted in the same transaction as the
-- handler's side effects. A redelivered event finds its row and is skipped.
CREATE TABLE IF NOT EXISTS processed_events (
    consumer_group text NOT NULL,
    event_id text NOT NULL,
    topic text NOT NULL,
    kafka_partition integer NOT NULL,
    kafka_offset bigint NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, event_id)
);
CREATE INDEX IF NOT EXISTS processed_events_processed_at_idx ON processed_events (processed_at);
