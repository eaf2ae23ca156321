# shellcheck shell=bash
# Kafka Connect + the Debezium PostgreSQL connector, resolved with Maven from
# benches/debezium/pom.xml into the cache, once per version of the pom (the
# same directory and marker as benches/run.sh):
#   $WALCAST_CACHE_DIR/debezium-<debezium>-connect-<kafka>/libs  (.walcast-complete = pom sha256)
# Sourced by scripts/dev, never executed.

# prints the libs directory, resolving it first when needed
ensure_debezium_libs() {
  local pom="$WALCAST_REPO_DIR/benches/debezium/pom.xml" dbz connect dir sum
  dbz="$(sed -n 's:.*<debezium.version>\(.*\)</debezium.version>.*:\1:p' "$pom")"
  connect="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom")"
  dir="$WALCAST_CACHE_DIR/debezium-$dbz-connect-$connect"
  sum="$(sha256sum "$pom" | cut -d' ' -f1)"
  if [[ "$(cat "$dir/.walcast-complete" 2>/dev/null)" != "$sum" ]]; then
    ensure_java >&2
    ensure_mvn >&2
    mkdir -p "$WALCAST_CACHE_DIR"
    exec 8>"$WALCAST_CACHE_DIR/.debezium.lock"
    flock 8
    if [[ "$(cat "$dir/.walcast-complete" 2>/dev/null)" != "$sum" ]]; then
      info "resolving Kafka Connect $connect + Debezium $dbz into $dir (Maven)"
      rm -rf "$dir"
      mkdir -p "$dir"
      if ! mvn -q -B -f "$pom" dependency:copy-dependencies -DincludeScope=runtime \
        -DoutputDirectory="$dir/libs" >"$dir/mvn.log" 2>&1; then
        show_log_tail "$dir/mvn.log" 40 >&2
        die "could not resolve the Debezium jars (Maven needs the package registry)"
      fi
      printf '%s\n' "$sum" >"$dir/.walcast-complete"
    fi
    exec 8>&-
  fi
  echo "$dir/libs"
}
