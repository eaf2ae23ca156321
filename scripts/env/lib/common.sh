# shellcheck shell=bash
# shellcheck disable=SC2034 # config variables are used by the other libs
# Shared helpers for scripts/dev. Sourced, never executed.
#
# Conventions:
#   - every function that starts a long-running daemon closes fd 9 (the
#     dev-dir lock) for it, so the daemon never inherits the lock;
#   - processes are only ever signalled by a pid that we recorded (our own pid
#     file, or PostgreSQL's postmaster.pid in our data dir) and only after
#     checking that the pid still belongs to that service (see *_pid_is_ours).

# ---------------------------------------------------------------- config ----

# always the checkout this script lives in (an exported WALCAST_REPO_DIR from
# `env print` of another checkout must not redirect us)
WALCAST_REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd -P)"
WALCAST_DEV_DIR="${WALCAST_DEV_DIR:-$WALCAST_REPO_DIR/.walcast}"
# canonical, so recorded paths (pid checks compare command lines) always match
if [[ -d "$(dirname "$WALCAST_DEV_DIR")" ]]; then
  WALCAST_DEV_DIR="$(cd "$(dirname "$WALCAST_DEV_DIR")" && pwd -P)/$(basename "$WALCAST_DEV_DIR")"
elif [[ "$WALCAST_DEV_DIR" != /* ]]; then
  WALCAST_DEV_DIR="$PWD/$WALCAST_DEV_DIR"
fi
_walcast_home="${HOME:-}"
if [[ -z "$_walcast_home" ]]; then
  _walcast_home="$(getent passwd "$(id -u)" | cut -d: -f6 || true)"
  _walcast_home="${_walcast_home:-/tmp}"
fi
WALCAST_CACHE_DIR="${WALCAST_CACHE_DIR:-$_walcast_home/.cache/walcast}"
[[ "$WALCAST_CACHE_DIR" == /* ]] || WALCAST_CACHE_DIR="$PWD/$WALCAST_CACHE_DIR"
unset _walcast_home

# Every default port is below 32768, outside Linux's ephemeral range
# (/proc/sys/net/ipv4/ip_local_port_range, 32768-60999 by default): a port in
# that range can be taken as the local port of some client connection while
# its service is down (a kill or restart test), or a client retrying it can
# connect to itself, and the service then cannot bind it again.
WALCAST_PG_PORT="${WALCAST_PG_PORT:-25315}"
WALCAST_PG17_PORT="${WALCAST_PG17_PORT:-25317}"
WALCAST_KAFKA_PORT="${WALCAST_KAFKA_PORT:-29192}"
WALCAST_KAFKA_CONTROLLER_PORT="${WALCAST_KAFKA_CONTROLLER_PORT:-29193}"

WALCAST_START_TIMEOUT="${WALCAST_START_TIMEOUT:-120}" # seconds, per service
WALCAST_STOP_TIMEOUT="${WALCAST_STOP_TIMEOUT:-30}"    # seconds before SIGKILL

WALCAST_ENV_DIR="$WALCAST_REPO_DIR/scripts/env"

# credentials created by scripts/env/postgres/init.sql (keep in sync)
WALCAST_PG_ADMIN_USER=postgres
WALCAST_PG_ADMIN_PASSWORD=postgres
WALCAST_PG_REPL_USER=walcast
WALCAST_PG_REPL_PASSWORD=walcast
WALCAST_PG_APP_USER=app
WALCAST_PG_APP_PASSWORD=app
WALCAST_PG_DATABASE=walcast_demo

# --------------------------------------------------------------- logging ----

if [[ -t 2 && -z "${NO_COLOR:-}" ]]; then
  _c_info=$'\e[1;34m' _c_warn=$'\e[1;33m' _c_err=$'\e[1;31m' _c_off=$'\e[0m'
else
  _c_info='' _c_warn='' _c_err='' _c_off=''
fi

info() { printf '%s==>%s %s\n' "$_c_info" "$_c_off" "$*" >&2; }
warn() { printf '%swarning:%s %s\n' "$_c_warn" "$_c_off" "$*" >&2; }
err() { printf '%serror:%s %s\n' "$_c_err" "$_c_off" "$*" >&2; }
die() {
  err "$*"
  exit 1
}

# print the last lines of a log file to stderr (used on every failure)
show_log_tail() { # <file> [lines]
  local file="$1" lines="${2:-40}"
  if [[ -r "$file" ]]; then
    printf -- '----- last %s lines of %s -----\n' "$lines" "$file" >&2
    tail -n "$lines" -- "$file" >&2 || true
    printf -- '----- end of %s -----\n' "$file" >&2
  else
    printf -- '(no log file at %s)\n' "$file" >&2
  fi
}

now() { date +%s; }

# ------------------------------------------------------------- processes ----

# true when the pid exists and is not a zombie (a zombie left behind by an
# init that does not reap must not count as "running")
pid_alive() { # <pid>
  local pid="$1" stat state
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [[ -r "/proc/$pid/stat" ]] || return 1
  stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
  [[ -n "$stat" ]] || return 1
  state="${stat##*) }"
  state="${state%% *}"
  [[ "$state" != Z && "$state" != X ]]
}

pid_cmdline() { # <pid>
  tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null || true
}

read_pid_file() { # <file> -> first line if it is a number
  local file="$1" pid=""
  [[ -f "$file" ]] || return 1
  read -r pid <"$file" || true
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  printf '%s\n' "$pid"
}

wait_pid_exit() { # <pid> <timeout-seconds>; 0 when gone
  local pid="$1" deadline=$(($(now) + $2))
  while pid_alive "$pid"; do
    (($(now) < deadline)) || return 1
    sleep 0.2
  done
}

# SIGTERM a recorded pid, wait, then SIGKILL. The caller has verified the pid.
terminate_pid() { # <pid> <name> [timeout]
  local pid="$1" name="$2" timeout="${3:-$WALCAST_STOP_TIMEOUT}"
  pid_alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_pid_exit "$pid" "$timeout"; then
    warn "$name (pid $pid) did not stop within ${timeout}s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait_pid_exit "$pid" 10 || die "$name (pid $pid) survived SIGKILL"
  fi
}

# ----------------------------------------------------------------- ports ----

# true when something accepts TCP connections on 127.0.0.1:<port>
port_open() { # <port>
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

_ports_warned=" "
check_port_number() { # <name> <value>
  if ! [[ "$2" =~ ^[0-9]+$ ]] || (($2 < 1 || $2 > 65535)); then
    die "$1 must be a TCP port number, got '$2'"
  fi
  local lo hi
  if [[ "$_ports_warned" != *" $2 "* ]] && read -r lo hi </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null &&
    (($2 >= lo && $2 <= hi)); then
    _ports_warned+="$2 "
    warn "$1 ($2) is inside the kernel's ephemeral port range ($lo-$hi): a client connection can take it while the service is down and a restart then fails with 'Address already in use'; choose a port below $lo"
  fi
}

# ---------------------------------------------------------------- waiting ----

# Poll <check...> once per 0.25 s until it succeeds. Fails early when <pid>
# (if given, non-empty) dies; on any failure prints the last 40 log lines.
wait_until() { # <what> <timeout> <pid-or-empty> <logfile> <check...>
  local what="$1" timeout="$2" pid="$3" log="$4" deadline
  shift 4
  deadline=$(($(now) + timeout))
  while true; do
    if "$@"; then
      return 0
    fi
    if [[ -n "$pid" ]] && ! pid_alive "$pid"; then
      err "$what: process $pid exited during startup"
      show_log_tail "$log"
      return 1
    fi
    if (($(now) >= deadline)); then
      err "$what: not ready after ${timeout}s"
      show_log_tail "$log"
      return 1
    fi
    sleep 0.25
  done
}

# ------------------------------------------------------------ dev dir/lock ----

DEV_MARKER_NAME=".walcast-dev-dir"

ensure_dev_dir() {
  if [[ -d "$WALCAST_DEV_DIR" && ! -e "$WALCAST_DEV_DIR/$DEV_MARKER_NAME" ]] &&
    [[ -n "$(ls -A "$WALCAST_DEV_DIR" 2>/dev/null)" ]]; then
    die "WALCAST_DEV_DIR=$WALCAST_DEV_DIR exists, is not empty and was not created by scripts/dev; choose another directory"
  fi
  mkdir -p "$WALCAST_DEV_DIR"
  chmod 755 "$WALCAST_DEV_DIR"
  [[ -e "$WALCAST_DEV_DIR/$DEV_MARKER_NAME" ]] ||
    echo "walcast dev environment (scripts/dev); safe to delete with 'scripts/dev env wipe'" >"$WALCAST_DEV_DIR/$DEV_MARKER_NAME"
}

# Serialise mutating commands on one dev dir (fd 9; daemons get 9>&-).
_lock_held=0
take_lock() {
  ((_lock_held)) && return 0
  ensure_dev_dir
  exec 9>"$WALCAST_DEV_DIR/.lock"
  if ! flock -w 300 9; then
    die "another scripts/dev command holds $WALCAST_DEV_DIR/.lock for more than 300s"
  fi
  _lock_held=1
}

# ------------------------------------------------------------- installing ----

_apt_updated=0
apt_install() { # <package...>
  command -v apt-get >/dev/null || die "cannot install $* : apt-get not found; install it by hand"
  local sudo=()
  if [[ $EUID -ne 0 ]]; then
    command -v sudo >/dev/null || die "need root (or sudo) to install $*"
    sudo=(sudo)
  fi
  if ((!_apt_updated)); then
    info "apt-get update"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    _apt_updated=1
  fi
  info "apt-get install $*"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

find_psql() {
  local p
  for p in psql /usr/lib/postgresql/15/bin/psql; do
    if command -v "$p" >/dev/null 2>&1; then
      command -v "$p"
      return 0
    fi
  done
  return 1
}

ensure_psql() {
  if ! PSQL="$(find_psql)"; then
    apt_install postgresql-client-15
    PSQL="$(find_psql)" || die "psql still not found after installing postgresql-client-15"
  fi
  PG_ISREADY="$(dirname "$PSQL")/pg_isready"
  [[ -x "$PG_ISREADY" ]] || PG_ISREADY="$(command -v pg_isready || echo /usr/lib/postgresql/15/bin/pg_isready)"
}

java_bin() {
  if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
    echo "$JAVA_HOME/bin/java"
  else
    command -v java || true
  fi
}

ensure_java() {
  JAVA="$(java_bin)"
  if [[ -z "$JAVA" ]]; then
    apt_install openjdk-17-jre-headless
    JAVA="$(java_bin)"
  fi
  [[ -n "$JAVA" ]] || die "java not found (need Java 17+)"
  local v
  v="$("$JAVA" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java\.specification\.version = //p' | head -n1)"
  if ! [[ "${v%%.*}" =~ ^[0-9]+$ ]] || ((${v%%.*} < 17)); then
    die "$JAVA is Java '$v'; Kafka 4 needs Java 17+ (set JAVA_HOME)"
  fi
}

ensure_mvn() {
  command -v mvn >/dev/null || apt_install maven
  command -v mvn >/dev/null || die "mvn not found"
}

ensure_npm() {
  if ! command -v npm >/dev/null || ! command -v node >/dev/null; then
    die "node and npm are needed to fetch PostgreSQL 17 (the base image has Node 20)"
  fi
}
