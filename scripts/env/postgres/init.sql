-- walcast development roles and database.
--
-- Shared by scripts/dev (run once per cluster, as the superuser "postgres",
-- with psql) and docker-compose.yml (mounted into
-- /docker-entrypoint-initdb.d, which the image runs with psql as
-- POSTGRES_USER on first start). Idempotent. Uses psql's \gexec, so it must
-- be run by psql.
--
--   postgres / postgres  superuser: the test harness's admin connection
--   walcast  / walcast   LOGIN REPLICATION, nothing else: the connector
--   app      / app       owner of database walcast_demo: the demo app schema
--
-- Keep the names and passwords in sync with scripts/env/lib/common.sh
-- (WALCAST_PG_*_USER / _PASSWORD) and docs/environment.md.
-- The walcast role deliberately gets no grants here; the connector's own
-- documentation says which grants (publication ownership, SELECT on the
-- outbox table) an operator gives it.

SET password_encryption = 'scram-sha-256';

SELECT 'CREATE ROLE walcast' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'walcast')
\gexec
ALTER ROLE walcast WITH LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD 'walcast';

SELECT 'CREATE ROLE app' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app')
\gexec
ALTER ROLE app WITH LOGIN NOREPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD 'app';

ALTER ROLE postgres WITH PASSWORD 'postgres';

SELECT 'CREATE DATABASE walcast_demo OWNER app' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'walcast_demo')
\gexec
