-- walcast demo schema, run as the application's owner role (app).
-- The outbox table uses the Debezium Outbox EventRouter column names.
CREATE TABLE IF NOT EXISTS orders (
    id bigserial PRIMARY KEY,
    customer text NOT NULL,
    total_cents bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS outbox (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregatetype text NOT NULL,
    aggregateid text NOT NULL,
    type text NOT NULL,
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- The publication is created by the tables' owner; walcast only needs REPLICATION.
SELECT 'CREATE PUBLICATION walcast_outbox FOR TABLE public.outbox WITH (publish = ''insert'', publish_via_partition_root = true)'
WHERE NOT EXISTS (SELECT FROM pg_publication WHERE pubname = 'walcast_outbox')
\gexec
