#!/usr/bin/env bash
# scripts/dev bench [walcast-bench run options]: walcast side by side with
# Debezium, a polling relay and the hardware limits. See benches/README.md.
#
# Runs in its OWN environment (dev dir and ports below), never in the test
# environment of scripts/dev test, so benchmarks and test runs can overlap:
#   WALCAST_BENCH_DEV_DIR               default <repo>/target/bench-env
#   WALCAST_BENCH_PG_PORT               default 26315
#   WALCAST_BENCH_PG17_PORT             default 26317 (not started)
#   WALCAST_BENCH_KAFKA_PORT            default 30192
#   WALCAST_BENCH_KAFKA_CONTROLLER_PORT default 30193
#   WALCAST_BENCH_KEEP_ENV=1            leave the services running afterwards
set -euo pipefail
shopt -s inherit_errexit

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
repo="$(cd "$here/.." && pwd -P)"
dev="$repo/scripts/dev"

export WALCAST_DEV_DIR="${WALCAST_BENCH_DEV_DIR:-$repo/target/bench-env}"
export WALCAST_PG_PORT="${WALCAST_BENCH_PG_PORT:-26315}"
export WALCAST_PG17_PORT="${WALCAST_BENCH_PG17_PORT:-26317}"
export WALCAST_KAFKA_PORT="${WALCAST_BENCH_KAFKA_PORT:-30192}"
export WALCAST_KAFKA_CONTROLLER_PORT="${WALCAST_BENCH_KAFKA_CONTROLLER_PORT:-30193}"

# the helpers of scripts/dev (pg_running, kafka_running, ensure_java, ensure_mvn, ...)
# shellcheck source=scripts/env/lib/common.sh
source "$repo/scripts/env/lib/common.sh"
# shellcheck source=scripts/env/lib/postgres.sh
source "$repo/scripts/env/lib/postgres.sh"
# shellcheck source=scripts/env/lib/kafka.sh
source "$repo/scripts/env/lib/kafka.sh"

case "${1:-}" in
  -h | --help | help)
    cat <<'EOF'
usage: scripts/dev bench [--quick] [walcast-bench run options]

Starts the bench environment (PostgreSQL 15 + Kafka on their own ports and
dev dir), resolves Kafka Connect + Debezium with benches/debezium/pom.xml,
builds walcast and the harness (release), runs every workload against
walcast, Debezium, the polling relay and the hardware limits, and writes
bench-report/<date>-<time>/{report.md,results.json,*.svg}.

  --quick            small sizes, short windows (a smoke test, ~2 minutes)
  --events N         backlog events per configuration (default 200000;
                     --events 1000000 for the issue's full size, ~1 hour)
  more: target/release/walcast-bench run --help
EOF
    exit 0
    ;;
esac

mkdir -p "$WALCAST_DEV_DIR"
started=()
pg_running pg || started+=(pg)
kafka_running || started+=(kafka)
cleanup() {
  local rc=$?
  trap - EXIT
  if ((${#started[@]})) && [[ "${WALCAST_BENCH_KEEP_ENV:-0}" != 1 ]]; then
    info "stopping what 'scripts/dev bench' started: ${started[*]}"
    "$dev" env stop "${started[@]}" || warn "stopping ${started[*]} failed"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

info "bench environment: $WALCAST_DEV_DIR (PostgreSQL :$WALCAST_PG_PORT, Kafka :$WALCAST_KAFKA_PORT)"
"$dev" env up pg kafka
eval "$("$dev" env print)"

# Kafka Connect + Debezium jars, resolved once per pom into the cache (the
# marker holds the pom's sha256, so editing the pom re-resolves)
pom="$here/debezium/pom.xml"
dbz_version="$(sed -n 's:.*<debezium.version>\(.*\)</debezium.version>.*:\1:p' "$pom")"
connect_version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom")"
dbz_dir="$WALCAST_CACHE_DIR/debezium-$dbz_version-connect-$connect_version"
dbz_sum="$(sha256sum "$pom" | cut -d' ' -f1)"
ensure_java
if [[ "$(cat "$dbz_dir/.walcast-complete" 2>/dev/null)" != "$dbz_sum" ]]; then
  ensure_mvn
  info "resolving Kafka Connect $connect_version + Debezium $dbz_version into $dbz_dir (Maven)"
  rm -rf "$dbz_dir"
  mkdir -p "$dbz_dir"
  if ! mvn -q -B -f "$pom" dependency:copy-dependencies -DincludeScope=runtime \
    -DoutputDirectory="$dbz_dir/libs" >"$dbz_dir/mvn.log" 2>&1; then
    show_log_tail "$dbz_dir/mvn.log" 40
    die "could not resolve the Debezium jars (Maven needs the package registry)"
  fi
  printf '%s\n' "$dbz_sum" >"$dbz_dir/.walcast-complete"
fi
export WALCAST_BENCH_DEBEZIUM_LIBS="$dbz_dir/libs"

cd "$repo"
info "building walcast and walcast-bench (cargo build --release)"
cargo build --release -p walcast -p walcast-benches
target="${CARGO_TARGET_DIR:-$repo/target}"
[[ "$target" == /* ]] || target="$repo/$target"

rc=0
"$target/release/walcast-bench" run --java "$JAVA" --walcast-bin "$target/release/walcast" "$@" || rc=$?
exit "$rc"
