#!/usr/bin/env bash
# A local allam-serve cluster as plain processes on loopback: one etcd member, N worker groups
# (default 2, CPU) and one router, the topology of deploy/docker-compose.yml without Docker.
#
#   scripts/local-cluster.sh start --bin PATH [--dir DIR] [options]
#       Starts everything, waits until etcd is healthy, every worker group is registered in
#       etcd and the router answers HTTP /ready, then prints ONE line on stdout:
#         ALLAM_CLUSTER http=127.0.0.1:PORT grpc=127.0.0.1:PORT etcd=http://127.0.0.1:PORT dir=DIR
#       (progress and errors go to stderr). Exit status 0 = ready; otherwise everything it
#       started is stopped again and the tails of the logs are printed.
#   scripts/local-cluster.sh stop --dir DIR [--keep] [--stop-timeout SECS]
#       SIGTERM to router and workers (SIGKILL after --stop-timeout, default 30), then etcd.
#       Then removes what start created in DIR (and DIR if that empties it), unless --keep.
#   scripts/local-cluster.sh status --dir DIR
#       One line per process: name, pid, running|dead. Exit 1 if any is dead.
#
# start options:
#   --bin PATH          the `allam` binary (or env ALLAM_BIN)
#   --dir DIR           state directory (created; default: a new mktemp -d). Holds
#                       pids, cluster.env, logs/<name>.log, etcd/ and model/ (demo model).
#   --model DIR         model directory for router and workers (default: `allam demo-model`)
#   --workers N         worker groups (default 2), named w0, w1, ...
#   --device DEV        worker device (default cpu)
#   --http-port P, --grpc-port P, --etcd-port P
#                       fixed ports (default: free ports chosen at start)
#   --router-arg ARG, --worker-arg ARG
#                       extra argument for the router / every worker (repeatable)
#   --worker-metrics    give each worker --metrics-addr on a free port (ALLAM_WORKER_<i>_METRICS)
#   --etcd-bin PATH     default: etcd on PATH (Debian etcd-server, v3.4+)
#   --timeout SECS      readiness deadline (default 120)
#
# DIR/cluster.env holds ALLAM_HTTP_ADDR, ALLAM_GRPC_ADDR, ALLAM_ETCD, ALLAM_CLUSTER_DIR,
# ALLAM_MODEL_DIR and ALLAM_WORKER_<i>_ADDR (+ _METRICS) as KEY=VALUE lines.
#
# The `allam` CLI this script relies on (crates/allam/main.rs):
#   allam demo-model --out DIR
#   allam router --etcd URL --grpc-addr ADDR --http-addr ADDR --model DIR   (HTTP /ready: 200 when
#                it can serve)
#   allam worker --etcd URL --group NAME --listen ADDR --advertise-addr HOST:PORT --model DIR
#                --device cpu --shutdown-timeout S [--metrics-addr ADDR, with --worker-metrics]
#                (registers under /allam/v1/workers/<group>; SIGTERM: deregister, drain, exit)
set -euo pipefail

die() { printf 'local-cluster: %s\n' "$*" >&2; exit 1; }
log() { printf 'local-cluster: %s\n' "$*" >&2; }

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }

# ---- process bookkeeping ----------------------------------------------------------------------
# DIR/pids: "name pid starttime" per line. starttime (field 22 of /proc/PID/stat) guards against
# signalling a recycled PID that now belongs to someone else.
proc_starttime() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || { echo "-"; return; }
  stat="${stat##*) }"
  # shellcheck disable=SC2086
  set -- $stat
  echo "${20}"
}

is_ours() { # pid starttime
  kill -0 "$1" 2>/dev/null || return 1
  [[ "$2" == "-" || ! -d /proc ]] && return 0
  [[ "$(proc_starttime "$1")" == "$2" ]]
}

# Alive and not a zombie (an exited child of a parent that has not reaped it yet).
running() {
  kill -0 "$1" 2>/dev/null || return 1
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
  stat="${stat##*) }"
  [[ "${stat:0:1}" != Z ]]
}

spawn() { # name cmd...
  local name="$1"
  shift
  local launcher=()
  # Own session: no terminal signals, and the caller's process group can exit freely.
  command -v setsid >/dev/null && launcher=(setsid)
  "${launcher[@]}" "$@" </dev/null >"$dir/logs/$name.log" 2>&1 &
  local pid=$!
  echo "$name $pid $(proc_starttime "$pid")" >>"$dir/pids"
}

stop_all() { # dir timeout
  local d="$1" timeout="$2" name pid st
  [[ -f "$d/pids" ]] || return 0
  local -a first=() last=()
  while read -r name pid st; do
    is_ours "$pid" "$st" || continue
    # etcd goes last: workers revoke their leases in it while they shut down.
    if [[ "$name" == etcd ]]; then last+=("$pid"); else first+=("$pid"); fi
  done <"$d/pids"
  local group
  for group in first last; do
    local -n pids="$group"
    [[ ${#pids[@]} -gt 0 ]] || continue
    kill -TERM "${pids[@]}" 2>/dev/null || true
    local deadline=$((SECONDS + timeout)) alive
    while :; do
      alive=()
      for pid in "${pids[@]}"; do running "$pid" && alive+=("$pid"); done
      [[ ${#alive[@]} -eq 0 ]] && break
      if ((SECONDS >= deadline)); then
        log "SIGKILL after ${timeout}s: ${alive[*]}"
        kill -KILL "${alive[@]}" 2>/dev/null || true
        break
      fi
      sleep 0.1
    done
    unset -n pids
  done
  rm -f "$d/pids"
}

# ---- ports ------------------------------------------------------------------------------------
# Prints N distinct free TCP ports on 127.0.0.1. Python binds them all at once so they are
# distinct; another process may still take one before we use it (start then fails loudly).
free_ports() {
  local n="$1"
  if command -v python3 >/dev/null; then
    python3 - "$n" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
    return
  fi
  local -a ports=()
  local p
  while [[ ${#ports[@]} -lt $n ]]; do
    p=$((20000 + RANDOM % 40000))
    [[ " ${ports[*]} " == *" $p "* ]] && continue
    # Connection refused = nobody listens there.
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then ports+=("$p"); fi
  done
  echo "${ports[*]}"
}

# ---- readiness --------------------------------------------------------------------------------
dead=""
print_logs() {
  local f name
  for f in "$dir"/logs/*.log; do
    [[ -s "$f" ]] || continue
    name="$(basename "$f" .log)"
    # The process that died first, in full; the others briefly.
    if [[ "$name" == "$dead" ]]; then continue; fi
    printf -- '---- %s (last 10 lines)\n' "$f" >&2
    tail -n 10 "$f" >&2
  done
  if [[ -n "$dead" && -f "$dir/logs/$dead.log" ]]; then
    printf -- '---- %s (exited; last 60 lines)\n' "$dir/logs/$dead.log" >&2
    tail -n 60 "$dir/logs/$dead.log" >&2
  fi
  log "logs kept in $dir/logs"
}

check_alive() {
  local name pid st
  while read -r name pid st; do
    if ! is_ours "$pid" "$st" || ! running "$pid"; then
      dead="$name"
      log "$name (pid $pid) exited; see $dir/logs/$name.log"
      return 1
    fi
  done <"$dir/pids"
}

# Registered groups, from etcd (etcdctl when present, else the v3 JSON gateway).
registered() {
  local group="$1" keys
  if command -v etcdctl >/dev/null; then
    keys="$(ETCDCTL_API=3 etcdctl --endpoints="$etcd_url" --command-timeout=2s \
      get --prefix --keys-only /allam/v1/workers/ 2>/dev/null)" || return 1
  else
    keys="$(curl -fsS --max-time 2 -X POST "$etcd_url/v3/kv/range" \
      -d "{\"key\":\"$(printf '/allam/v1/workers/' | base64)\",\"range_end\":\"$(printf '/allam/v1/workers0' | base64)\",\"keys_only\":true}" 2>/dev/null |
      grep -o '"key":"[^"]*"' | sed 's/"key":"\(.*\)"/\1/' | while read -r k; do printf '%s\n' "$k" | base64 -d; echo; done)" || return 1
  fi
  grep -qE "^/allam/v1/workers/${group}(/|$)" <<<"$keys"
}

wait_until() { # description command...
  local what="$1"
  shift
  until "$@"; do
    check_alive || return 1
    if ((SECONDS >= deadline)); then
      log "timed out after ${timeout}s waiting for $what"
      return 1
    fi
    sleep 0.2
  done
}

etcd_healthy() { curl -fsS --max-time 2 "$etcd_url/health" 2>/dev/null | grep -q '"health":"true"'; }
router_ready() { curl -fsS --max-time 2 -o /dev/null "http://$http_addr/ready" 2>/dev/null; }

# ---- commands ---------------------------------------------------------------------------------
cmd_start() {
  local bin="${ALLAM_BIN:-}" model="" workers=2 device=cpu etcd_bin=etcd worker_metrics=0
  local http_port="" grpc_port="" etcd_port=""
  local -a router_args=() worker_args=()
  dir=""
  timeout=120
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --bin) bin="$2"; shift 2 ;;
      --dir) dir="$2"; shift 2 ;;
      --model) model="$2"; shift 2 ;;
      --workers) workers="$2"; shift 2 ;;
      --device) device="$2"; shift 2 ;;
      --http-port) http_port="$2"; shift 2 ;;
      --grpc-port) grpc_port="$2"; shift 2 ;;
      --etcd-port) etcd_port="$2"; shift 2 ;;
      --router-arg) router_args+=("$2"); shift 2 ;;
      --worker-arg) worker_args+=("$2"); shift 2 ;;
      --worker-metrics) worker_metrics=1; shift ;;
      --etcd-bin) etcd_bin="$2"; shift 2 ;;
      --timeout) timeout="$2"; shift 2 ;;
      -h | --help) usage 0 ;;
      *) die "start: unknown option $1 (see --help)" ;;
    esac
  done
  [[ -n "$bin" ]] || die "start: --bin PATH (the allam binary) is required"
  [[ -x "$bin" ]] || die "start: $bin is not an executable file"
  bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
  [[ "$workers" =~ ^[1-9][0-9]*$ ]] || die "start: --workers must be a positive integer"
  command -v "$etcd_bin" >/dev/null || die "start: $etcd_bin not found (apt-get install etcd-server, or --etcd-bin)"
  command -v curl >/dev/null || die "start: curl not found"
  if [[ -z "$dir" ]]; then
    dir="$(mktemp -d "${TMPDIR:-/tmp}/allam-cluster.XXXXXX")"
  else
    mkdir -p "$dir"
    [[ -f "$dir/pids" ]] && die "start: $dir/pids exists: a cluster may be running there (stop --dir $dir)"
  fi
  dir="$(cd "$dir" && pwd)"
  # A data dir left by an earlier run would keep that run's peer URL.
  rm -rf "$dir/etcd"
  mkdir -p "$dir/logs"
  : >"$dir/pids"
  deadline=$((SECONDS + timeout))
  trap 'log "start failed"; print_logs; stop_all "$dir" 10' ERR
  set -E

  # 4 fixed-purpose ports + 2 per worker (gRPC, metrics).
  local -a ports
  read -r -a ports <<<"$(free_ports $((4 + 2 * workers)))"
  etcd_port="${etcd_port:-${ports[0]}}"
  local peer_port="${ports[1]}"
  http_port="${http_port:-${ports[2]}}"
  grpc_port="${grpc_port:-${ports[3]}}"
  etcd_url="http://127.0.0.1:$etcd_port"
  http_addr="127.0.0.1:$http_port"
  local grpc_addr="127.0.0.1:$grpc_port"

  if [[ -z "$model" ]]; then
    model="$dir/model"
    if [[ ! -f "$model/config.json" ]]; then
      log "writing the demo model to $model"
      "$bin" demo-model --out "$model" >"$dir/logs/demo-model.log" 2>&1 ||
        { log "allam demo-model failed"; false; }
      : >"$model/.written-by-local-cluster"
    fi
  fi
  [[ -d "$model" ]] || { log "model directory $model does not exist"; false; }
  model="$(cd "$model" && pwd)"

  log "etcd on $etcd_url"
  spawn etcd "$etcd_bin" --name local --data-dir "$dir/etcd" \
    --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "local=http://127.0.0.1:$peer_port"
  wait_until "etcd health" etcd_healthy

  local i env_lines=()
  for ((i = 0; i < workers; i++)); do
    local wport="${ports[$((4 + 2 * i))]}" mport="${ports[$((5 + 2 * i))]}"
    local -a metrics=()
    env_lines+=("ALLAM_WORKER_${i}_ADDR=127.0.0.1:$wport")
    if [[ $worker_metrics -eq 1 ]]; then
      metrics=(--metrics-addr "127.0.0.1:$mport")
      env_lines+=("ALLAM_WORKER_${i}_METRICS=127.0.0.1:$mport")
    fi
    log "worker w$i on 127.0.0.1:$wport"
    spawn "w$i" "$bin" worker --etcd "$etcd_url" --group "w$i" \
      --listen "127.0.0.1:$wport" --advertise-addr "127.0.0.1:$wport" \
      --model "$model" --device "$device" --shutdown-timeout 10 \
      ${metrics[@]+"${metrics[@]}"} ${worker_args[@]+"${worker_args[@]}"}
  done
  log "router on http://$http_addr (gRPC $grpc_addr)"
  spawn router "$bin" router --etcd "$etcd_url" --grpc-addr "$grpc_addr" --http-addr "$http_addr" \
    --model "$model" ${router_args[@]+"${router_args[@]}"}

  for ((i = 0; i < workers; i++)); do
    wait_until "worker group w$i to register in etcd" registered "w$i"
  done
  wait_until "router /ready" router_ready

  {
    echo "ALLAM_HTTP_ADDR=$http_addr"
    echo "ALLAM_GRPC_ADDR=$grpc_addr"
    echo "ALLAM_ETCD=$etcd_url"
    echo "ALLAM_CLUSTER_DIR=$dir"
    echo "ALLAM_MODEL_DIR=$model"
    printf '%s\n' "${env_lines[@]}"
  } >"$dir/cluster.env"
  trap - ERR
  log "ready in ${SECONDS}s; stop with: $0 stop --dir $dir"
  echo "ALLAM_CLUSTER http=$http_addr grpc=$grpc_addr etcd=$etcd_url dir=$dir"
}

cmd_stop() {
  local keep=0 stop_timeout=30
  dir=""
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --dir) dir="$2"; shift 2 ;;
      --keep) keep=1; shift ;;
      --stop-timeout) stop_timeout="$2"; shift 2 ;;
      -h | --help) usage 0 ;;
      *) die "stop: unknown option $1" ;;
    esac
  done
  [[ -n "$dir" ]] || die "stop: --dir DIR is required"
  [[ -d "$dir" ]] || die "stop: $dir does not exist"
  stop_all "$dir" "$stop_timeout"
  if [[ $keep -eq 0 ]]; then
    # Only what start created; the directory itself goes only if that leaves it empty.
    [[ -f "$dir/model/.written-by-local-cluster" ]] && rm -rf "$dir/model"
    rm -rf "$dir/etcd" "$dir/logs" "$dir/cluster.env"
    rmdir "$dir" 2>/dev/null || true
  fi
  log "stopped"
}

cmd_status() {
  dir=""
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --dir) dir="$2"; shift 2 ;;
      *) die "status: unknown option $1" ;;
    esac
  done
  [[ -f "${dir:-}/pids" ]] || die "status: no $dir/pids (not started, or stopped)"
  local name pid st rc=0
  while read -r name pid st; do
    if is_ours "$pid" "$st"; then echo "$name $pid running"; else echo "$name $pid dead"; rc=1; fi
  done <"$dir/pids"
  return $rc
}

[[ $# -ge 1 ]] || usage
command="$1"
shift
case "$command" in
  start) cmd_start "$@" ;;
  stop) cmd_stop "$@" ;;
  status) cmd_status "$@" ;;
  -h | --help | help) usage 0 ;;
  *) die "unknown command $command (start | stop | status)" ;;
esac
