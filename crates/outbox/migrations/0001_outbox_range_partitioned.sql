-- walcast canonical outbox table, range-partitioned by created_at: one
-- partition per UTC day, named outbox_pYYYYMMDD, so old events go away by
-- dropping whole partitions (`walcast outbox rotate`, which also creates
-- partitions ahead). Columns as in 0001_outbox.sql. There is no DEFAULT
-- partition: an INSERT whose created_at has no partition fails, so run
-- `walcast outbox rotate` at least daily (it keeps --ahead days ready; this
-- file creates today and the next 3 days). walcast's publication must publish
-- via the root (walcast creates it so).
CREATE TABLE IF NOT EXISTS outbox (
    id uuid NOT NULL,
    aggregatetype text NOT NULL,
    aggregateid text NOT NULL,
    type text NOT NULL,
    payload jsonb NOT NULL,
    correlation_id text,
    tracingspancontext text,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
DO $$
DECLARE
    d date;
BEGIN
    FOR i IN 0..3 LOOP
        d := (now() AT TIME ZONE 'UTC')::date + i;
        EXECUTE format(
            'CREATE TABLE IF NOT EXISTS %I PARTITION OF outbox FOR VALUES FROM (%L) TO (%L)',
            'outbox_p' || to_char(d, 'YYYYMMDD'),
            to_char(d, 'YYYY-MM-DD') || ' 00:00:00+00',
            to_char(d + 1, 'YYYY-MM-DD') || ' 00:00:00+00');
    END LOOP;
END
$$;
