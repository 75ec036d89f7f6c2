#!/usr/bin/env bash
# A real multi-node Ray cluster on this one machine, nodes on 127.0.0.1: a head node and K worker
# nodes, each its own raylet, so that `sacfleet train --address 127.0.0.1:PORT` can be tried and tested
# without a second host.
#
#   deploy/local_cluster.sh start [--workers K] [--cpus-per-node C] [--head-cpus H] [--port P]
#   deploy/local_cluster.sh status [--port P]
#   deploy/local_cluster.sh stop [--port P]
#   deploy/local_cluster.sh kill-node --node N [--port P]   SIGKILL worker node N (1..K) and all its processes,
#                                                          as a lost machine: for fault-recovery drills
#
# Environment: RAY (the ray executable; default .venv/bin/ray when present, else ray on PATH),
# SACFLEET_CLUSTER_PORT (default 6390). `stop` stops only this cluster's processes, never another
# Ray running on the machine.
#
# Ports: the head's GCS listens on P; node N (0 is the head) takes P+100+10N .. P+105+10N. `start`
# checks them all before starting anything. Pick P below the kernel's ephemeral range (32768 and up on
# Linux) and outside Ray's worker ports (10002-19999), or an outgoing connection can take one of them.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${RAY:-}" ]]; then
  if [[ -x "$here/.venv/bin/ray" ]]; then RAY="$here/.venv/bin/ray"; else RAY=ray; fi
fi

command="${1:-}"
[[ $# -gt 0 ]] && shift
workers=1
cpus=1
head_cpus=""
port="${SACFLEET_CLUSTER_PORT:-6390}"
node=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --node) node="$2"; shift 2 ;;
    --head-cpus) head_cpus="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --cpus-per-node) cpus="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    *) echo "local_cluster.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[[ "$workers" =~ ^[0-9]+$ ]] || { echo "local_cluster.sh: --workers must be a number >= 0, got $workers" >&2; exit 2; }
[[ "$port" =~ ^[0-9]+$ ]] || { echo "local_cluster.sh: --port must be a number, got $port" >&2; exit 2; }

export RAY_AUTH_MODE=token  # see `start`

# Short on purpose: Ray's unix socket paths must stay under about 100 characters.
state="/tmp/sfc-$port"
address="127.0.0.1:$port"

tree() {  # $1 and all its descendants
  local pid="$1" child
  echo "$pid"
  for child in $(pgrep -P "$pid" || true); do tree "$child"; done
}

node_pids() {  # every process of this cluster
  # Ray's daemons name our temp dir on their command lines; the head's client server names the port;
  # the dashboard and runtime-env agents retitle themselves (ray::DashboardAgent), but are children
  # of a raylet.
  local roots pid
  roots="$( { pgrep -f -- "$state/"; pgrep -f -- "ray\.util\.client\.server --address=[^ ]*:$port( |$)"; } || true)"
  for pid in $roots; do tree "$pid"; done | sort -un
}

alive() {  # those of the pids given that still run
  local pid
  for pid in "$@"; do kill -0 "$pid" 2>/dev/null && echo "$pid"; done || true
}

node_ports() {  # $1: node number (0 is the head); its dashboard-agent, agent gRPC, runtime-env agent,
  # metrics, node manager and object manager ports, in that order
  local base=$((port + 100 + 10 * $1))
  echo $((base)) $((base + 1)) $((base + 2)) $((base + 3)) $((base + 4)) $((base + 5))
}

busy_ports() {  # those of the ports given that a socket holds, by binding them as Ray's gRPC servers do
  # (SO_REUSEADDR: a port whose old connections linger in TIME_WAIT is free to them, one that a listening
  # socket or a live outgoing connection holds is not)
  local py
  py="$(dirname "$(command -v "$RAY")")/python"
  [[ -x "$py" ]] || py=python3
  "$py" - "$@" <<'PY'
import socket, sys
for port in sys.argv[1:]:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", int(port)))
        except OSError:
            print(port)
PY
}

start_node() {  # $1: node number (0 is the head)
  local n="$1" agent grpc runtime_env metrics manager objects
  read -r agent grpc runtime_env metrics manager objects <<< "$(node_ports "$n")"
  local node_cpus="$cpus"
  [[ "$n" == 0 && -n "$head_cpus" ]] && node_cpus="$head_cpus"  # 0: the head holds no actors
  local common=(--node-ip-address=127.0.0.1 --num-cpus="$node_cpus" --disable-usage-stats
                --dashboard-agent-listen-port="$agent" --dashboard-agent-grpc-port="$grpc"
                --runtime-env-agent-port="$runtime_env" --metrics-export-port="$metrics"
                --node-manager-port="$manager" --object-manager-port="$objects")
  if [[ "$n" == 0 ]]; then
    "$RAY" start --head --port="$port" --include-dashboard=false --temp-dir="$state" "${common[@]}" \
      > "$state.log" 2>&1
  else
    "$RAY" start --address="$address" "${common[@]}" >> "$state.log" 2>&1
  fi
}

node_raylet() {  # $1: worker node number; its raylet's pid, if it runs
  local manager
  manager="$(node_ports "$1" | cut -d ' ' -f 5)"
  pgrep -f -- "raylet.*$state/.*--node_manager_port=$manager( |$)" || true
}

stop_processes() {  # every process of this cluster: SIGTERM, then SIGKILL for what is left
  local pids
  pids="$(node_pids)"
  [[ -z "$pids" ]] && return 0
  # SIGTERM lets the raylets take their workers down. The list is taken first: once a raylet is gone
  # its agents are orphans that no longer look like ours.
  kill $pids 2>/dev/null || true
  for _ in $(seq 50); do [[ -z "$(alive $pids)$(node_pids)" ]] && break; sleep 0.2; done
  pids="$(alive $pids) $(node_pids)"
  [[ -n "${pids// /}" ]] && kill -9 $pids 2>/dev/null || true
}

active_nodes() {  # how many nodes `ray status` lists as active
  "$RAY" status --address="$address" 2>/dev/null | awk '/^Active:/ {on = 1; next} /^[A-Z]/ {on = 0} on && / node_/ {n++} END {print n + 0}'
}

fail_start() {  # $1: what failed. Shows the end of the log, stops what did start, keeps the logs.
  {
    echo "local_cluster.sh: $1"
    echo "--- the end of $state.log (Ray's own logs: $state/session_latest/logs):"
    tail -n 15 "$state.log" 2>/dev/null || true
    # A raylet that cannot bind a port dies with a fatal line naming it.
    grep -h -E "Check failed|Address already in use" "$state"/session_latest/logs/raylet*.out 2>/dev/null \
      | cut -c 1-400 | tail -n 4 | sed 's/^/raylet: /' || true
  } >&2
  stop_processes
  exit 1
}

case "$command" in
  start)
    if [[ -n "$(node_pids)" ]]; then
      echo "local_cluster.sh: a cluster on port $port is already running; stop it first" >&2
      exit 1
    fi
    busy=()
    for p in $(busy_ports "$port"); do busy+=("$p (node 0, GCS)"); done
    for ((i = 0; i <= workers; i++)); do
      for p in $(busy_ports $(node_ports "$i")); do busy+=("$p (node $i)"); done
    done
    if [[ ${#busy[@]} -gt 0 ]]; then
      echo "local_cluster.sh: ports in use: ${busy[*]}; nothing was started. Choose another --port" \
           "(node N takes --port+100+10N .. +105+10N; see the header of $0)" >&2
      exit 1
    fi
    mkdir -p "$state"
    # Every node must agree on Ray's token authentication: use it, with the user's token
    # (~/.ray/auth_token, created if missing), which drivers on this machine also find.
    "$RAY" get-auth-token --generate > /dev/null
    start_node 0 || fail_start "the head node failed to start"
    for ((i = 1; i <= workers; i++)); do
      if ! start_node "$i"; then
        # `ray start` gives a raylet 30 s to register, which a loaded machine can miss: try once more,
        # from scratch, so that a late raylet does not join as a second node.
        echo "local_cluster.sh: worker node $i did not start; trying it once more" >&2
        raylet="$(node_raylet "$i")"
        [[ -n "$raylet" ]] && kill -9 $(tree "$raylet") 2>/dev/null || true
        for _ in $(seq 50); do [[ -z "$(busy_ports $(node_ports "$i"))" ]] && break; sleep 0.2; done
        start_node "$i" || fail_start "worker node $i failed to start, twice"
      fi
    done
    # Wait until every node has registered, so that the cluster is usable when this returns.
    for _ in $(seq 120); do
      nodes="$(active_nodes)"
      [[ "$nodes" -ge $((workers + 1)) ]] && break
      sleep 0.5
    done
    [[ "$nodes" -ge $((workers + 1)) ]] || fail_start "only $nodes of $((workers + 1)) nodes registered within 60 s"
    echo "local Ray cluster: head (${head_cpus:-$cpus} CPU) + $workers worker node(s) ($cpus CPU each) at $address"
    echo "train on it:  sacfleet train --address $address ...      stop it:  $0 stop --port $port"
    ;;
  status)
    if [[ -z "$(node_pids)" ]]; then echo "no local cluster on port $port"; exit 1; fi
    "$RAY" status --address="$address"
    ;;
  stop)
    if [[ -z "$(node_pids)" ]]; then echo "no local cluster on port $port"; exit 0; fi
    stop_processes
    rm -rf "$state" "$state.log"
    echo "stopped the local cluster on port $port"
    ;;
  kill-node)
    [[ "$node" =~ ^[1-9][0-9]*$ ]] || { echo "local_cluster.sh: kill-node needs --node N, a worker node (1, 2, ...), got '$node'" >&2; exit 2; }
    raylet="$(node_raylet "$node")"
    if [[ -z "$raylet" ]]; then echo "local_cluster.sh: no worker node $node in the cluster on port $port" >&2; exit 1; fi
    pids="$(tree "$raylet")"
    kill -9 $pids 2>/dev/null || true
    echo "killed worker node $node of the cluster on port $port ($(echo $pids | wc -w) processes)"
    ;;
  *)
    echo "usage: $0 start [--workers K] [--cpus-per-node C] [--head-cpus H] [--port P] | status [--port P] | stop [--port P]" \
         "| kill-node --node N [--port P]" >&2
    exit 2
    ;;
esac
