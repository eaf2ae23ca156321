# shellcheck shell=bash
# Apache Kafka (KRaft, combined broker+controller) for scripts/dev.
# Sourced after common.sh.
#
# Jars: resolved by Maven from scripts/env/kafka/pom.xml into
#   $WALCAST_CACHE_DIR/kafka-<version>/libs   (marker .walcast-complete = pom sha256)
#
# Layout ($WALCAST_DEV_DIR/kafka):
#   cluster.id            the KRaft cluster id (formatted once)
#   format.conf           node count and ports the storage was formatted with
#   node-<n>/server.properties, node-<n>/data (log.dirs),
#   node-<n>/logs/server.log (log4j2), node-<n>/logs/kafka.out (JVM stdout/err),
#   node-<n>/kafka.pid    the recorded pid
#
# Everything is per node <n> (node.id = n). WALCAST_KAFKA_NODES (1-5, default
# 1) nodes run, each broker + controller; one node is formatted --standalone,
# several with --initial-controllers (all nodes are voters), and the
# replication factors are min(nodes, 3) with min.insync.replicas = factor - 1
# (3 nodes: RF 3, min ISR 2).
# Ports of node n (B = WALCAST_KAFKA_PORT + 10*(n-1)):
#   B                                          PLAINTEXT listener (advertised as is)
#   WALCAST_KAFKA_CONTROLLER_PORT + 10*(n-1)   CONTROLLER listener
#   B + 2                                      PROXIED listener, advertised as 127.0.0.1:B+3
# Nothing listens on B+3 unless a test runs its fault proxy there (forwarding
# to B+2): clients that bootstrap from B+3 then reach every broker through
# the proxies (tests/src/proxy.rs).

WALCAST_KAFKA_NODES="${WALCAST_KAFKA_NODES:-1}"
WALCAST_KAFKA_HEAP_OPTS="${WALCAST_KAFKA_HEAP_OPTS:--Xmx1g -Xms256m}"
KAFKA_POM="$WALCAST_ENV_DIR/kafka/pom.xml"
KAFKA_LOG4J="$WALCAST_ENV_DIR/kafka/log4j2.properties"
KAFKA_TEMPLATE="$WALCAST_ENV_DIR/kafka/server.properties.in"
KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$KAFKA_POM" | head -n1)"
WALCAST_KAFKA_LIBS="$WALCAST_CACHE_DIR/kafka-$KAFKA_VERSION/libs"
KAFKA_BASE="$WALCAST_DEV_DIR/kafka"
KAFKA_READY_PATTERN='Kafka Server started|Transition from STARTING to STARTED'

kafka_check_config() {
  [[ -n "$KAFKA_VERSION" ]] || die "cannot read <kafka.version> from $KAFKA_POM"
  [[ "$WALCAST_KAFKA_NODES" =~ ^[1-5]$ ]] ||
    die "WALCAST_KAFKA_NODES=$WALCAST_KAFKA_NODES: expected a node count from 1 to 5"
  check_port_number WALCAST_KAFKA_PORT "$WALCAST_KAFKA_PORT"
  check_port_number WALCAST_KAFKA_CONTROLLER_PORT "$WALCAST_KAFKA_CONTROLLER_PORT"
  # every port of every node must be distinct
  local n p seen=" "
  for n in $(kafka_nodes); do
    for p in "$(kafka_broker_port "$n")" "$(kafka_proxied_port "$n")" "$(kafka_proxy_front_port "$n")" "$(kafka_controller_port "$n")"; do
      check_port_number "a Kafka port of node $n" "$p"
      [[ "$seen" != *" $p "* ]] ||
        die "Kafka ports collide at $p (node $n): keep WALCAST_KAFKA_CONTROLLER_PORT away from WALCAST_KAFKA_PORT + {0,2,3} + 10*k"
      seen+="$p "
    done
  done
}

kafka_nodes() { seq 1 "$WALCAST_KAFKA_NODES"; }
kafka_broker_port() { echo $((WALCAST_KAFKA_PORT + 10 * ($1 - 1))); }
kafka_proxied_port() { echo $((WALCAST_KAFKA_PORT + 10 * ($1 - 1) + 2)); }
kafka_proxy_front_port() { echo $((WALCAST_KAFKA_PORT + 10 * ($1 - 1) + 3)); }
kafka_controller_port() { echo $((WALCAST_KAFKA_CONTROLLER_PORT + 10 * ($1 - 1))); }

# "SERVICE" or "SERVICE:N" arguments to node numbers: kafka = every node,
# kafka:N = node N
kafka_select() { # <arg> -> node numbers, one per line
  case "$1" in
    kafka) kafka_nodes ;;
    kafka:*)
      local n="${1#kafka:}"
      if ! [[ "$n" =~ ^[0-9]+$ ]] || ((n < 1 || n > WALCAST_KAFKA_NODES)); then
        die "$1: no such Kafka node (WALCAST_KAFKA_NODES=$WALCAST_KAFKA_NODES)"
      fi
      echo "$n"
      ;;
    *) die "not a Kafka service: $1" ;;
  esac
}

# "<listener port>:<advertised proxy port>" of every node, comma-separated
# (scripts/dev env print: WALCAST_KAFKA_PROXIED_PORTS)
kafka_proxied_ports() {
  local n out=()
  for n in $(kafka_nodes); do out+=("$(kafka_proxied_port "$n"):$(kafka_proxy_front_port "$n")"); done
  (
    IFS=,
    echo "${out[*]}"
  )
}
kafka_node_dir() { echo "$KAFKA_BASE/node-$1"; }
kafka_node_log() { echo "$KAFKA_BASE/node-$1/logs/server.log"; }
kafka_node_out() { echo "$KAFKA_BASE/node-$1/logs/kafka.out"; }
kafka_pid_file() { echo "$KAFKA_BASE/node-$1/kafka.pid"; }

kafka_bootstrap() { # comma-separated broker list
  local n out=()
  for n in $(kafka_nodes); do out+=("127.0.0.1:$(kafka_broker_port "$n")"); done
  (
    IFS=,
    echo "${out[*]}"
  )
}

kafka_quorum_bootstrap() {
  local n out=()
  for n in $(kafka_nodes); do out+=("127.0.0.1:$(kafka_controller_port "$n")"); done
  (
    IFS=,
    echo "${out[*]}"
  )
}

# ------------------------------------------------------------------ jars ----

kafka_pom_sum() { sha256sum "$KAFKA_POM" | cut -d' ' -f1; }

ensure_kafka_libs() {
  kafka_check_config
  local root="$WALCAST_CACHE_DIR/kafka-$KAFKA_VERSION" sum tmp
  sum="$(kafka_pom_sum)"
  if [[ -f "$root/.walcast-complete" && "$(cat "$root/.walcast-complete")" == "$sum" && -d "$WALCAST_KAFKA_LIBS" ]]; then
    return 0
  fi
  ensure_mvn
  info "resolving Apache Kafka $KAFKA_VERSION jars with Maven into $WALCAST_KAFKA_LIBS"
  mkdir -p "$root"
  tmp="$(mktemp -d "$root/.resolve.XXXXXX")"
  if ! mvn -q -B -f "$KAFKA_POM" dependency:copy-dependencies \
    -DoutputDirectory="$tmp/libs" >"$tmp/mvn.log" 2>&1; then
    err "Maven could not resolve the Kafka jars"
    show_log_tail "$tmp/mvn.log"
    rm -rf "$tmp"
    exit 1
  fi
  ls "$tmp"/libs/kafka_2.13-*.jar >/dev/null 2>&1 || die "Maven ran but no kafka_2.13 jar was copied"
  rm -rf "$WALCAST_KAFKA_LIBS"
  mv "$tmp/libs" "$WALCAST_KAFKA_LIBS"
  rm -rf "$tmp"
  echo "$sum" >"$root/.walcast-complete"
}

# run a Kafka class from the jar dir in the foreground (tools, StorageTool)
kafka_java() { # <main class> [args...]
  "$JAVA" -Xmx512m -Dlog4j2.configurationFile="$KAFKA_LOG4J" -Dkafka.logs.dir="$KAFKA_BASE/tool-logs" \
    -cp "$WALCAST_KAFKA_LIBS/*" "$@" 9>&-
}

# ------------------------------------------------------------------- pid ----

# recorded pid of node <n>, only when alive and running this node's config
kafka_pid() { # <n>
  local pid cmd
  pid="$(read_pid_file "$(kafka_pid_file "$1")")" || return 1
  pid_alive "$pid" || return 1
  cmd="$(pid_cmdline "$pid")"
  [[ "$cmd" == *kafka.Kafka* && "$cmd" == *"$(kafka_node_dir "$1")/server.properties"* ]] || return 1
  echo "$pid"
}

# the state letter of /proc/<pid>/stat (R, S, T = stopped by SIGSTOP, ...)
pid_state() { # <pid>
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
  stat="${stat##*) }"
  echo "${stat%% *}"
}

# ------------------------------------------------------------ formatting ----

kafka_render_properties() { # <n>
  local n="$1" dir rf min_isr
  dir="$(kafka_node_dir "$n")"
  rf=$((WALCAST_KAFKA_NODES < 3 ? WALCAST_KAFKA_NODES : 3))
  min_isr=$((rf > 1 ? rf - 1 : 1))
  sed -e "s|@NODE_ID@|$n|g" \
    -e "s|@BROKER_PORT@|$(kafka_broker_port "$n")|g" \
    -e "s|@PROXIED_PORT@|$(kafka_proxied_port "$n")|g" \
    -e "s|@PROXY_FRONT_PORT@|$(kafka_proxy_front_port "$n")|g" \
    -e "s|@CONTROLLER_PORT@|$(kafka_controller_port "$n")|g" \
    -e "s|@QUORUM_BOOTSTRAP@|$(kafka_quorum_bootstrap)|g" \
    -e "s|@LOG_DIRS@|$dir/data|g" \
    -e "s|@REPLICATION_FACTOR@|$rf|g" \
    -e "s|@MIN_ISR@|$min_isr|g" \
    "$KAFKA_TEMPLATE" >"$dir/server.properties"
}

kafka_format_conf() {
  echo "nodes=$WALCAST_KAFKA_NODES broker_port=$WALCAST_KAFKA_PORT controller_port=$WALCAST_KAFKA_CONTROLLER_PORT"
}

# a KRaft cluster id: 16 random bytes, URL-safe base64 without padding (the
# format kafka.tools.StorageTool random-uuid prints; saves a JVM start)
kafka_new_cluster_id() {
  local id
  while true; do
    id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    [[ "$id" != -* && ${#id} -eq 22 ]] && break
  done
  echo "$id"
}

# the directory id of node <n>'s metadata log dir (needed up front by
# --initial-controllers; kept in node-<n>/directory.id until formatted)
kafka_directory_id() { # <n>
  local f
  f="$(kafka_node_dir "$1")/directory.id"
  [[ -s "$f" ]] || kafka_new_cluster_id >"$f"
  cat "$f"
}

# id@host:port:directory-id of every voter (all nodes)
kafka_initial_controllers() {
  local n out=()
  for n in $(kafka_nodes); do
    out+=("$n@127.0.0.1:$(kafka_controller_port "$n"):$(kafka_directory_id "$n")")
  done
  (
    IFS=,
    echo "${out[*]}"
  )
}

kafka_format() {
  local n dir cid quorum=()
  mkdir -p "$KAFKA_BASE"
  if [[ -f "$KAFKA_BASE/format.conf" ]]; then
    if [[ "$(cat "$KAFKA_BASE/format.conf")" != "$(kafka_format_conf)" ]]; then
      die "Kafka storage in $KAFKA_BASE was formatted with '$(cat "$KAFKA_BASE/format.conf")' but the settings are now '$(kafka_format_conf)'; run 'scripts/dev env wipe' (or rm -rf $KAFKA_BASE while Kafka is stopped)"
    fi
  fi
  [[ -s "$KAFKA_BASE/cluster.id" ]] || kafka_new_cluster_id >"$KAFKA_BASE/cluster.id"
  cid="$(cat "$KAFKA_BASE/cluster.id")"
  for n in $(kafka_nodes); do mkdir -p "$(kafka_node_dir "$n")/logs"; done
  # one node: --standalone makes it the only voter; several: every node is
  # an initial voter (KIP-853), so a majority must run for the cluster to work
  if ((WALCAST_KAFKA_NODES == 1)); then
    quorum=(--standalone)
  else
    quorum=(--initial-controllers "$(kafka_initial_controllers)")
  fi
  for n in $(kafka_nodes); do
    dir="$(kafka_node_dir "$n")"
    kafka_render_properties "$n"
    [[ -f "$dir/data/meta.properties" ]] && continue
    info "kafka: formatting KRaft storage of node $n (cluster id $cid)"
    rm -rf "$dir/data"
    if ! kafka_java kafka.tools.StorageTool format "${quorum[@]}" -t "$cid" \
      -c "$dir/server.properties" >"$dir/logs/format.log" 2>&1; then
      err "kafka: formatting the storage of node $n failed"
      show_log_tail "$dir/logs/format.log"
      exit 1
    fi
  done
  kafka_format_conf >"$KAFKA_BASE/format.conf"
}

# ---------------------------------------------------------------- start ----

# set by kafka_launch, used by kafka_wait_ready: "<node>:<pid>:<log offset>"
KAFKA_LAUNCHED=()

# Readiness: the node's process is alive, its broker port accepts TCP
# connections, and server.log has logged "Kafka Server started" (or the
# broker's "Transition from STARTING to STARTED") since our launch. The
# broker only logs that after it caught up with the metadata log and was
# unfenced, i.e. it serves produce/fetch/metadata requests.
kafka_node_ready() { # <n> <log offset>
  local n="$1" offset="$2" log size
  port_open "$(kafka_broker_port "$n")" || return 1
  log="$(kafka_node_log "$n")"
  [[ -f "$log" ]] || return 1
  size="$(stat -c %s "$log")"
  ((size >= offset)) || offset=0 # rotated meanwhile
  tail -c "+$((offset + 1))" "$log" | grep -Eq "$KAFKA_READY_PATTERN"
}

kafka_launch() { # [node...] (default: every node)
  ensure_kafka_libs
  ensure_java
  KAFKA_LAUNCHED=()
  local n pid dir log offset pidfile port nodes=("$@")
  ((${#nodes[@]})) || mapfile -t nodes < <(kafka_nodes)
  mkdir -p "$KAFKA_BASE"
  # nodes already running are reused
  local to_start=()
  for n in "${nodes[@]}"; do
    if pid="$(kafka_pid "$n")"; then
      if port_open "$(kafka_broker_port "$n")"; then
        info "kafka: node $n already running (pid $pid, 127.0.0.1:$(kafka_broker_port "$n"))"
      else
        # still starting (or hung): wait for any "started" line in its log
        KAFKA_LAUNCHED+=("$n:$pid:0")
      fi
      continue
    fi
    pidfile="$(kafka_pid_file "$n")"
    if [[ -f "$pidfile" ]]; then
      info "kafka: removing stale pid file of node $n (pid $(cat "$pidfile") is no longer running it)"
      rm -f "$pidfile"
    fi
    for port in "$(kafka_broker_port "$n")" "$(kafka_controller_port "$n")" "$(kafka_proxied_port "$n")"; do
      if port_open "$port"; then
        die "kafka: port 127.0.0.1:$port is used by a process that is not this dev env's Kafka (set WALCAST_KAFKA_PORT / WALCAST_KAFKA_CONTROLLER_PORT)"
      fi
    done
    to_start+=("$n")
  done
  ((${#to_start[@]})) || return 0
  kafka_format
  for n in "${to_start[@]}"; do
    dir="$(kafka_node_dir "$n")"
    log="$(kafka_node_log "$n")"
    pidfile="$(kafka_pid_file "$n")"
    offset=0
    [[ -f "$log" ]] && offset="$(stat -c %s "$log")"
    rm -f "$pidfile"
    # JVM stdout/stderr of this launch only (one previous kept)
    if [[ -s "$(kafka_node_out "$n")" ]]; then mv -f "$(kafka_node_out "$n")" "$(kafka_node_out "$n").1"; fi
    info "kafka: starting node $n (Kafka $KAFKA_VERSION, 127.0.0.1:$(kafka_broker_port "$n"))"
    # the inner bash records its own pid and then becomes java (exec), so the
    # pid file holds the JVM's pid; setsid detaches it from our terminal
    # shellcheck disable=SC2086,SC2016 # heap opts are words; $$ is for the inner shell
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" \
      "$JAVA" $WALCAST_KAFKA_HEAP_OPTS -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
      -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
      -Dlog4j2.configurationFile="$KAFKA_LOG4J" -Dkafka.logs.dir="$dir/logs" \
      -cp "$WALCAST_KAFKA_LIBS/*" kafka.Kafka "$dir/server.properties" \
      </dev/null >>"$(kafka_node_out "$n")" 2>&1 9>&- &
    local deadline=$(($(now) + 10))
    until pid="$(read_pid_file "$pidfile")"; do
      (($(now) < deadline)) || die "kafka: node $n did not record its pid"
      sleep 0.05
    done
    KAFKA_LAUNCHED+=("$n:$pid:$offset")
  done
}

kafka_wait_ready() {
  local entry n pid offset
  for entry in "${KAFKA_LAUNCHED[@]}"; do
    IFS=: read -r n pid offset <<<"$entry"
    if ! wait_until "kafka node $n (pid $pid)" "$WALCAST_START_TIMEOUT" "$pid" "$(kafka_node_log "$n")" \
      kafka_node_ready "$n" "$offset"; then
      if [[ -s "$(kafka_node_out "$n")" ]]; then show_log_tail "$(kafka_node_out "$n")" 20; fi
      exit 1
    fi
    info "kafka: node $n ready (pid $pid, 127.0.0.1:$(kafka_broker_port "$n"))"
  done
  KAFKA_LAUNCHED=()
}

kafka_start() { # [node...]
  kafka_launch "$@"
  kafka_wait_ready
}

# ----------------------------------------------------------- stop / kill ----

kafka_stop() { # [node...] (default: every node)
  kafka_check_config
  local n pid any=0 nodes=("$@")
  ((${#nodes[@]})) || mapfile -t nodes < <(kafka_nodes)
  for n in "${nodes[@]}"; do
    if pid="$(kafka_pid "$n")"; then
      # a paused node would never handle SIGTERM
      kill -CONT "$pid" 2>/dev/null || true
      any=1
      info "kafka: stopping node $n (pid $pid)"
      terminate_pid "$pid" "kafka node $n"
    fi
    rm -f "$(kafka_pid_file "$n")"
  done
  ((any)) || info "kafka: not running"
}

# SIGKILL (a crash); the pid file stays behind like after a real crash and
# the next start cleans it up
kafka_kill() { # [node...] (default: every node)
  kafka_check_config
  local n pid any=0 nodes=("$@")
  ((${#nodes[@]})) || mapfile -t nodes < <(kafka_nodes)
  for n in "${nodes[@]}"; do
    if pid="$(kafka_pid "$n")"; then
      any=1
      info "kafka: SIGKILL node $n (pid $pid)"
      kill -KILL "$pid"
      wait_pid_exit "$pid" 10 || die "kafka node $n (pid $pid) survived SIGKILL"
    fi
  done
  ((any)) || info "kafka: not running"
}

# SIGSTOP / SIGCONT (a hung JVM: connections stay open, nothing answers)
kafka_signal() { # <STOP|CONT> [node...]
  kafka_check_config
  local sig="$1" n pid nodes
  shift
  nodes=("$@")
  ((${#nodes[@]})) || mapfile -t nodes < <(kafka_nodes)
  local tries
  for n in "${nodes[@]}"; do
    if pid="$(kafka_pid "$n")"; then
      info "kafka: SIG$sig node $n (pid $pid)"
      kill -"$sig" "$pid"
      # a resume that did not take would leave a hung broker behind and a
      # test waiting for it: make sure the JVM left the stopped state
      if [[ "$sig" == CONT ]]; then
        tries=0
        while [[ "$(pid_state "$pid")" == T ]]; do
          ((++tries <= 40)) || die "kafka node $n (pid $pid) is still stopped (state T) 10 s after SIGCONT"
          kill -CONT "$pid" 2>/dev/null || true
          sleep 0.25
        done
      fi
    elif [[ "$sig" == CONT ]]; then
      die "kafka: cannot resume node $n: no running node with the pid in $(kafka_pid_file "$n")"
    else
      info "kafka: node $n is not running"
    fi
  done
}

kafka_running() {
  local n
  for n in $(kafka_nodes); do kafka_pid "$n" >/dev/null || return 1; done
}

kafka_status_line() {
  local n pid state
  for n in $(kafka_nodes); do
    if pid="$(kafka_pid "$n")"; then
      if [[ "$(pid_state "$pid")" == T ]]; then
        state="paused"
      elif port_open "$(kafka_broker_port "$n")"; then state="running"; else state="starting"; fi
      printf '%-7s %-8s pid %-8s 127.0.0.1:%-6s Kafka %s node %s  data %s  log %s\n' \
        kafka "$state" "$pid" "$(kafka_broker_port "$n")" "$KAFKA_VERSION" "$n" \
        "$(kafka_node_dir "$n")/data" "$(kafka_node_log "$n")"
    elif [[ -f "$(kafka_pid_file "$n")" ]]; then
      printf '%-7s %-8s (stale pid file: crashed; the next start cleans up)  log %s\n' kafka stopped "$(kafka_node_log "$n")"
    elif [[ -f "$(kafka_node_dir "$n")/data/meta.properties" ]]; then
      printf '%-7s %-8s 127.0.0.1:%s  data %s\n' kafka stopped "$(kafka_broker_port "$n")" "$(kafka_node_dir "$n")/data"
    else
      printf '%-7s %-8s (never started)\n' kafka absent
    fi
  done
}
