-- walcast canonical outbox table, hash-partitioned by aggregate id (4
-- partitions; change MODULUS and the partition list together). walcast's
-- publication must publish via the root (walcast creates it so). Columns as
-- in 0001_outbox.sql.
CREATE TABLE IF NOT EXISTS outbox (
    id uuid NOT NULL,
    aggregatetype text NOT NULL,
    aggregateid text NOT NULL,
    type text NOT NULL,
    payload jsonb NOT NULL,
    correlation_id text,
    tracingspancontext text,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregateid, id)
) PARTITION BY HASH (aggregateid);
CREATE TABLE IF NOT EXISTS outbox_p0 PARTITION OF outbox FOR VALUES WITH (MODULUS 4, REMAINDER 0);
CREATE TABLE IF NOT EXISTS outbox_p1 PARTITION OF outbox FOR VALUES WITH (MODULUS 4, REMAINDER 1);
CREATE TABLE IF NOT EXISTS outbox_p2 PARTITION OF outbox FOR VALUES WITH (MODULUS 4, REMAINDER 2);
CREATE TABLE IF NOT EXISTS outbox_p3 PARTITION OF outbox FOR VALUES WITH (MODULUS 4, REMAINDER 3);
CREATE INDEX IF NOT EXISTS outbox_created_at_idx ON outbox (created_at);
