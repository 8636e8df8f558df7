#!/usr/bin/env bash
# A single-node Ray head on this machine: token auth on, and every port it opens on 127.0.0.1 only (GCS, Ray
# Client, dashboard + Jobs API, dashboard agent, raylet, object manager, workers).
#
#   cluster/local_head.sh start    # start it, wait until the Jobs API answers, print the addresses
#   cluster/local_head.sh status   # is it up? which addresses?
#   cluster/local_head.sh stop     # stop exactly what `start` started (by PID), nothing else
#
# Then submit work to it, either way (clients send the head's token; `start` prints these lines):
#   export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/tmp/personalize-ray-$USER/auth_token
#   personalize --address http://127.0.0.1:8265 run --config configs/demo.yaml data.root=outputs/toy
#   ray job submit --address http://127.0.0.1:8265 --working-dir . \
#       --runtime-env cluster/runtime_env.yaml -- personalize run --config configs/demo.yaml data.root=outputs/toy
#
# Why `ray start --block` in the background rather than plain `ray start`: the blocking process owns every Ray
# process of this head (they share its process group and die with it), so stopping is "signal one PID we wrote
# down" - never `ray stop`, which kills every Ray on the machine, including other people's.
#
# Settings (environment variables; defaults in brackets):
#   RAY_HEAD_DIR        state folder: pid file, log, Ray's --temp-dir  [/tmp/personalize-ray-$USER]
#                       (keep it short: Ray puts unix sockets under it and socket paths max out near 100 chars)
#   RAY_HEAD_PORT       GCS port                                        [6390]
#   RAY_DASHBOARD_PORT  dashboard + Jobs API port                       [8265]
#   RAY_CLIENT_PORT     Ray Client (ray://) port                        [10001]
#   RAY_AGENT_PORT      dashboard agent HTTP port                       [52365]
#   RAY_METRICS_PORT    Prometheus metrics export port (scrape it)      [Ray picks one]
#   RAY_HEAD_NUM_CPUS   CPUs the head offers                            [all cores]
#   RAY_HEAD_NUM_GPUS   GPUs the head offers                            [Ray detects them]
#   RAY_AUTH_MODE       `token` (default) or `disabled` (anyone on this machine could then run code as you).
#                       The token: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else RAY_HEAD_DIR/auth_token
#                       (made at the first start, 64 hex chars, mode 600). Clients (personalize --address,
#                       ray job submit) send it: `export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=<that file>`.
#
# Why 127.0.0.1 everywhere: Ray binds its gRPC servers, agents and the Ray Client server to the node IP when that is
# loopback, else to every interface. `ray start` turns --node-ip-address 127.0.0.1 into the host's address unless
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray's single-machine mode, the default on macOS), so this script sets it.
# No other machine can join this head; a multi-node cluster is cluster/cluster.yaml or cluster/kuberay/.
#   RAY_BIN             the `ray` executable                            [.venv/bin/ray, else `ray` on PATH]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HEAD_DIR="${RAY_HEAD_DIR:-/tmp/personalize-ray-${USER:-$(id -un)}}"
HEAD_PORT="${RAY_HEAD_PORT:-6390}"
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
CLIENT_PORT="${RAY_CLIENT_PORT:-10001}"
AGENT_PORT="${RAY_AGENT_PORT:-52365}"
NUM_CPUS="${RAY_HEAD_NUM_CPUS:-$(nproc)}"
PID_FILE="$HEAD_DIR/head.pid"
LOG_FILE="$HEAD_DIR/head.log"
URL="http://127.0.0.1:$DASHBOARD_PORT"

if [[ -n "${RAY_BIN:-}" ]]; then
  RAY="$RAY_BIN"
elif [[ -x "$ROOT/.venv/bin/ray" ]]; then
  RAY="$ROOT/.venv/bin/ray"
  # Jobs run their entrypoint with the head's environment: put the venv's `personalize` and `python` first.
  export PATH="$ROOT/.venv/bin:$PATH"
else
  RAY="ray"
fi

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# glibc malloc settings for torch on CPU, inherited by every Ray process (pipelines/local_ray.py MALLOC_TUNABLES says
# why); one already set, even empty, is kept.
export GLIBC_TUNABLES="${GLIBC_TUNABLES-glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824:glibc.malloc.arena_max=1}"
TOKEN_HOW=""
if [[ "$RAY_AUTH_MODE" == "token" ]]; then
  if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
    TOKEN_HOW="export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<the token you gave this script>"
  else
    export RAY_AUTH_TOKEN_PATH="${RAY_AUTH_TOKEN_PATH:-$HEAD_DIR/auth_token}"
    TOKEN_HOW="export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
  fi
fi

make_state_dir() {
  # Yours alone: the token file lives here, and a folder someone else made in /tmp must not be used.
  (umask 077 && mkdir -p "$HEAD_DIR")
  if [[ ! -O "$HEAD_DIR" ]]; then
    echo "$HEAD_DIR belongs to another user; set RAY_HEAD_DIR to a folder of yours" >&2
    return 1
  fi
  chmod 700 "$HEAD_DIR"
  mkdir -p "$HEAD_DIR/ray"
  if [[ "$RAY_AUTH_MODE" == "token" && -z "${RAY_AUTH_TOKEN:-}" && ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
    [[ "$RAY_AUTH_TOKEN_PATH" == "$HEAD_DIR/auth_token" ]] || {
      echo "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH: no such file (or empty); unset it to have one made" >&2
      return 1
    }
    (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$RAY_AUTH_TOKEN_PATH")
    echo "made a new token in $RAY_AUTH_TOKEN_PATH (mode 600)"
  fi
}

auth_header() {
  # The header on stdin for `curl -H @-`: a token on curl's command line would show in `ps` to every user.
  local token="${RAY_AUTH_TOKEN:-}"
  [[ -z "$token" && -n "${RAY_AUTH_TOKEN_PATH:-}" && -r "$RAY_AUTH_TOKEN_PATH" ]] && token="$(<"$RAY_AUTH_TOKEN_PATH")"
  [[ "$RAY_AUTH_MODE" == "token" && -n "$token" ]] && printf 'Authorization: Bearer %s\n' "$token"
  return 0
}

head_pid() {
  # The PID we recorded, if that process still runs and is still our `ray start` (guards against PID reuse).
  [[ -f "$PID_FILE" ]] || return 1
  local pid
  pid="$(cat "$PID_FILE")"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q -- "--temp-dir $HEAD_DIR/ray" || return 1
  echo "$pid"
}

descendants() {
  # All PIDs below $1 in the process tree (children, grandchildren, ...).
  local parent child
  for parent in "$@"; do
    for child in $(ps -o pid= --ppid "$parent" 2>/dev/null); do
      echo "$child"
      descendants "$child"
    done
  done
}

ray_folder_processes() {
  # PIDs of live processes whose command line names this head's Ray folder (--temp-dir): Ray's processes of this
  # head, and nothing of anyone else's (the folder is this head's own).
  local proc cmd
  for proc in /proc/[0-9]*; do
    cmd="$(tr '\0' ' ' 2>/dev/null <"$proc/cmdline")" || continue
    case "$cmd" in *"$HEAD_DIR/ray"*) echo "${proc#/proc/}" ;; esac
  done
}

jobs_api_up() {
  auth_header | curl -s -o /dev/null -m 2 -w '%{http_code}' -H @- "$URL/api/version" | grep -q '^200$'
}

print_addresses() {
  echo "Ray head (auth: $RAY_AUTH_MODE, cpus: $NUM_CPUS, state: $HEAD_DIR; every port on 127.0.0.1)"
  if [[ "$RAY_AUTH_MODE" == "token" ]]; then
    echo "  token for clients:  $TOKEN_HOW"
  else
    echo "  WARNING: auth disabled: any user of this machine can run code as you through these ports"
  fi
  echo "  dashboard:          $URL   (from another machine: ssh -L $DASHBOARD_PORT:127.0.0.1:$DASHBOARD_PORT this-host)"
  echo "  job submit address: $URL"
  echo "  driver address:     127.0.0.1:$HEAD_PORT   (ray.init(address=...) on this machine, with the token set)"
  echo "  submit:  personalize --address $URL run --config configs/demo.yaml data.root=outputs/toy"
  echo "      or:  $RAY job submit --address $URL --working-dir . --runtime-env cluster/runtime_env.yaml -- personalize run ..."
}

start() {
  if pid="$(head_pid)"; then
    echo "already running (pid $pid)"
    print_addresses
    return 0
  fi
  make_state_dir
  # setsid: the head gets its own session and process group (= its PID), so `stop` can sweep exactly it.
  setsid "$RAY" start --head --block \
    --node-ip-address 127.0.0.1 \
    --port "$HEAD_PORT" \
    --ray-client-server-port "$CLIENT_PORT" \
    --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
    --dashboard-agent-listen-port "$AGENT_PORT" \
    ${RAY_METRICS_PORT:+--metrics-export-port "$RAY_METRICS_PORT"} \
    --num-cpus "$NUM_CPUS" ${RAY_HEAD_NUM_GPUS:+--num-gpus "$RAY_HEAD_NUM_GPUS"} \
    --temp-dir "$HEAD_DIR/ray" \
    --disable-usage-stats \
    >"$LOG_FILE" 2>&1 </dev/null &
  echo $! >"$PID_FILE"
  for _ in $(seq 1 120); do
    if jobs_api_up; then
      print_addresses
      return 0
    fi
    if ! kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
      echo "the Ray head exited while starting; its log ($LOG_FILE) ends with:" >&2
      tail -n 20 "$LOG_FILE" >&2
      rm -f "$PID_FILE"
      return 1
    fi
    sleep 1
  done
  echo "the Ray head did not answer on $URL within 120 s; see $LOG_FILE; stopping it" >&2
  stop
  return 1
}

stop() {
  local pid
  if ! pid="$(head_pid)"; then
    echo "no head of ours is running (pid file: $PID_FILE)"
    rm -f "$PID_FILE"
    return 0
  fi
  # Ray workers put themselves in their own process groups: note every descendant now, while the tree is intact.
  local tree
  tree="$(descendants "$pid")"
  # SIGTERM to `ray start --block` makes it shut down every process it started, gracefully.
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 10); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  # Stragglers (workers mid-task) are still in the head's process group: sweep that group only.
  if kill -0 -- "-$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || true
    sleep 2
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  # Then any noted descendant still alive that still belongs to this head (its command line names our folder).
  local child
  for child in $tree; do
    if tr '\0' ' ' 2>/dev/null <"/proc/$child/cmdline" | grep -q -- "$HEAD_DIR"; then
      kill -KILL "$child" 2>/dev/null || true
    fi
  done
  # Last, until none is left (at most 10 s): a worker the head started while shutting down is in neither the tree
  # noted above nor the head's group, and on a busy machine a killed process can take a moment to go.
  local left
  for _ in $(seq 1 20); do
    left="$(ray_folder_processes)"
    [ -z "$left" ] && break
    kill -KILL $left 2>/dev/null || true
    sleep 0.5
  done
  left="$(ray_folder_processes)"
  if [ -n "$left" ]; then
    echo "warning: processes of this head still alive after 10 s: $left" >&2
  fi
  rm -f "$PID_FILE"
  echo "stopped the Ray head (pid $pid)"
}

status() {
  local pid
  if pid="$(head_pid)"; then
    if jobs_api_up; then echo "running (pid $pid), Jobs API answering"; else echo "running (pid $pid), Jobs API not answering yet"; fi
    print_addresses
  else
    echo "not running (no live head recorded in $PID_FILE)"
    return 3
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *)
    echo "usage: $0 start|stop|status   (settings: see the comments at the top of this file)" >&2
    exit 2
    ;;
esac
