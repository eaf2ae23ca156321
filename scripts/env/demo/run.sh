#!/usr/bin/env bash
# scripts/dev demo: environment up, walcast built and started, demo business
# transactions committed, the resulting Kafka records shown as they arrive.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
repo="$(cd "$here/../../.." && pwd -P)"
dev="$repo/scripts/dev"

"$dev" env up pg kafka
eval "$("$dev" env print)"
cd "$repo"
echo "==> building walcast (cargo build --release -p walcast)"
cargo build --release -p walcast
bin="$repo/target/release/walcast"

demo_dir="$WALCAST_DEV_DIR/demo"
mkdir -p "$demo_dir"
export PGPASSWORD="$WALCAST_PG_APP_PASSWORD"
psql_app() { psql -X -q -v ON_ERROR_STOP=1 -h "$WALCAST_PG_HOST" -p "$WALCAST_PG_PORT" -U "$WALCAST_PG_APP_USER" -d "$WALCAST_PG_DATABASE" "$@"; }
echo "==> creating the demo schema (orders, outbox, publication walcast_outbox) as $WALCAST_PG_APP_USER"
psql_app -f "$here/demo.sql"

cat >"$demo_dir/walcast.toml" <<TOML
# The demo's configuration (see README: Configuration).
[postgres]
host = "$WALCAST_PG_HOST"
port = $WALCAST_PG_PORT
database = "$WALCAST_PG_DATABASE"
user = "$WALCAST_PG_REPL_USER"
password_file = "$demo_dir/pgpass"
slot = "walcast_demo"
publication = "walcast_outbox"
create_publication = false

[outbox]
tables = ["public.outbox"]

[kafka]
bootstrap_servers = "$WALCAST_KAFKA_BOOTSTRAP"

[pipeline]
state_dir = "$demo_dir/state"
TOML
printf '%s\n' "$WALCAST_PG_REPL_PASSWORD" >"$demo_dir/pgpass"
chmod 600 "$demo_dir/pgpass"

if [[ -f "$demo_dir/walcast.pid" ]] && kill -0 "$(cat "$demo_dir/walcast.pid")" 2>/dev/null; then
  kill -TERM "$(cat "$demo_dir/walcast.pid")" || true
  sleep 1
fi
echo "==> starting walcast (log: $demo_dir/walcast.log)"
"$bin" run --config "$demo_dir/walcast.toml" >"$demo_dir/walcast.log" 2>&1 &
wpid=$!
echo "$wpid" >"$demo_dir/walcast.pid"
cleanup() {
  if kill -0 "$wpid" 2>/dev/null; then
    echo "==> stopping walcast (SIGTERM, pid $wpid)"
    kill -TERM "$wpid" 2>/dev/null || true
    wait "$wpid" 2>/dev/null || true
  fi
  rm -f "$demo_dir/walcast.pid"
}
trap cleanup EXIT
for _ in $(seq 1 300); do
  grep -q "streaming from the slot" "$demo_dir/walcast.log" && break
  if ! kill -0 "$wpid" 2>/dev/null; then
    echo "walcast exited:" >&2
    tail -n 40 "$demo_dir/walcast.log" >&2
    exit 1
  fi
  sleep 0.2
done
grep "streaming from the slot" "$demo_dir/walcast.log"

echo "==> committing demo business transactions (orders + outbox rows in one transaction each; one rolled back)"
psql_app -f "$here/transactions.sql"

echo "==> Kafka records as they arrive (walcast tail: topic, partition, offset, key, headers, value)"
"$bin" tail --config "$demo_dir/walcast.toml" --idle-timeout-ms 8000
echo "==> done. The walcast log is in $demo_dir/walcast.log; 'scripts/dev env down' stops Postgres and Kafka."
