-- docker-compose.yml: the demo schema, on the postgres service's first start.
-- /docker-entrypoint-initdb.d runs this with psql after 10-walcast.sql
-- (scripts/env/postgres/init.sql: roles walcast and app, database
-- walcast_demo). The schema itself is scripts/env/demo/demo.sql, the same
-- file `scripts/dev demo` runs, created by its owner app.
\connect walcast_demo app
\i /walcast/demo.sql
