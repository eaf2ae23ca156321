#!/usr/bin/env bash
# The withdrawal example in one command: environment up, walcast and the
# example built, a fresh database, walcast started on it, then the example
# records withdrawals and runs the two consumers until every withdrawal was
# synced and notified exactly once. Usage: examples/withdrawals/run.sh [COUNT]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
repo="$(cd "$here/../.." && pwd -P)"
dev="$repo/scripts/dev"
count="${1:-1000}"

"$dev" env up pg kafka
eval "$("$dev" env print)"
cd "$repo"
echo "==> building walcast and the example"
cargo build -p walcast -p walcast-example-withdrawals
bin="$repo/target/debug"
dir="$WALCAST_DEV_DIR/example-withdrawals"
mkdir -p "$dir"
db=walcast_withdrawals
export PGPASSWORD="$WALCAST_PG_ADMIN_PASSWORD"
psql -X -q -h "$WALCAST_PG_HOST" -p "$WALCAST_PG_PORT" -U "$WALCAST_PG_ADMIN_USER" -d postgres \
  -c "CREATE DATABASE $db" 2>/dev/null || true
pg="host=$WALCAST_PG_HOST port=$WALCAST_PG_PORT dbname=$db user=$WALCAST_PG_ADMIN_USER password=$WALCAST_PG_ADMIN_PASSWORD"
# The schema (outbox, processed_events, publication) first, so walcast finds it.
"$bin/walcast-example-withdrawals" --pg "$pg" --kafka "$WALCAST_KAFKA_BOOTSTRAP" --count 0 --timeout-s 1 >/dev/null

cat >"$dir/walcast.toml" <<TOML
[postgres]
host = "$WALCAST_PG_HOST"
port = $WALCAST_PG_PORT
database = "$db"
user = "$WALCAST_PG_REPL_USER"
password = "$WALCAST_PG_REPL_PASSWORD"
slot = "walcast_withdrawals"
publication = "walcast_outbox"
create_publication = false

[kafka]
bootstrap_servers = "$WALCAST_KAFKA_BOOTSTRAP"

[pipeline]
state_dir = "$dir/state"
TOML
# The writer's routes (correlation id and traceparent headers, table-less mode).
cat "$repo/crates/outbox/walcast.toml" >>"$dir/walcast.toml"
echo "==> starting walcast (log: $dir/walcast.log)"
"$bin/walcast" run --config "$dir/walcast.toml" >"$dir/walcast.log" 2>&1 &
wpid=$!
trap 'kill -TERM "$wpid" 2>/dev/null || true; wait "$wpid" 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  grep -q "streaming from the slot" "$dir/walcast.log" && break
  kill -0 "$wpid" 2>/dev/null || { tail -n 40 "$dir/walcast.log" >&2; exit 1; }
  sleep 0.2
done
echo "==> $count withdrawals, consumers partner-sync and notification"
"$bin/walcast-example-withdrawals" --pg "$pg" --kafka "$WALCAST_KAFKA_BOOTSTRAP" --count "$count"
