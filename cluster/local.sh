#!/usr/bin/env bash
# A Ray cluster on this machine for kdray: a head whose dashboard serves the Jobs API that
# `kdray submit` and `ray job submit` talk to, every Ray port of it listening on 127.0.0.1 only.
#
#   cluster/local.sh start                 # head: dashboard and Jobs API at http://127.0.0.1:8265
#   export RAY_AUTH_MODE=token             # the cluster uses Ray's token authentication (see usage)
#   kdray submit jobs/small_data.yaml --address http://127.0.0.1:8265
#   cluster/local.sh status
#   cluster/local.sh stop                  # this cluster's processes, and no other Ray's
#
# More worker nodes on this machine (to try multi-node placement): start the head with MULTI_NODE=1,
# then `cluster/local.sh worker` once per node. Ray then gives every node the machine's network
# address and its internal ports listen on all interfaces (the dashboard stays on 127.0.0.1, and the
# token guards the rest): Ray joins nodes by network address and rewrites 127.0.0.1 to it.
#
# Each node is `ray start --block` in its own process group, its pid kept in $KDRAY_RAY_DIR/nodes, so
# `stop` ends exactly this cluster; `ray stop` would end every Ray on the machine (a notebook's, a
# test session's). Jobs run the `python` first on this script's PATH; the repository's .venv, when
# there is one, goes first, so a job's `python -m kdray run` finds kdray and its dependencies.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
if [[ -x "$repo/.venv/bin/ray" ]]; then
    export PATH="$repo/.venv/bin:$PATH"
fi

HOST=127.0.0.1
RAY_PORT="${RAY_PORT:-6379}"                     # GCS: the address nodes and drivers join
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"         # dashboard and Jobs API
NUM_CPUS="${NUM_CPUS:-}"                         # the head's logical CPUs (default: all cores)
MULTI_NODE="${MULTI_NODE:-0}"                    # 1: the head accepts `worker` nodes (see above)
WORKER_CPUS="${WORKER_CPUS:-2}"                  # each worker node's logical CPUs
KDRAY_RAY_DIR="${KDRAY_RAY_DIR:-/tmp/kdray-ray}" # Ray's session files and logs, the nodes' pids
START_TIMEOUT="${START_TIMEOUT:-120}"            # seconds to wait for the dashboard
STOP_TIMEOUT="${STOP_TIMEOUT:-60}"               # seconds to wait before killing what is left
RAY="${RAY:-ray}"
PYTHON="${PYTHON:-python3}"
NODES="$KDRAY_RAY_DIR/nodes"
if [[ "$MULTI_NODE" != 0 && "$MULTI_NODE" != 1 ]]; then
    echo "MULTI_NODE must be 0 or 1, not '$MULTI_NODE'" >&2
    exit 2
fi

# Token authentication, Ray 2.60's default for a new cluster; RAY_AUTH_MODE=disabled turns it off.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
# A stopping node otherwise waits up to 30 s for Ray Serve replicas to drain; kdray runs no Serve.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"
export RAY_USAGE_STATS_ENABLED=0

usage() {
    cat <<EOF
usage: cluster/local.sh start|worker|status|stop

  start    start the head on $HOST: GCS port RAY_PORT ($RAY_PORT), dashboard and Jobs API at
           http://$HOST:DASHBOARD_PORT ($DASHBOARD_PORT), NUM_CPUS logical CPUs (${NUM_CPUS:-all cores})
  worker   add a worker node of WORKER_CPUS ($WORKER_CPUS) CPUs; needs a head started with MULTI_NODE=1
  status   the cluster's nodes and resources (ray status)
  stop     stop this cluster's nodes, and nothing else

Settings come from the environment (current values in brackets); session files, logs and pids go
to KDRAY_RAY_DIR ($KDRAY_RAY_DIR). Token authentication is on (RAY_AUTH_MODE=$RAY_AUTH_MODE): the
token is RAY_AUTH_TOKEN, else ~/.ray/auth_token (created by the first start). Clients need
'export RAY_AUTH_MODE=token' too. Then:

  kdray submit CONFIG --address http://$HOST:$DASHBOARD_PORT
  ray job submit --address http://$HOST:$DASHBOARD_PORT --working-dir . -- python -m kdray run CONFIG

A driver on this machine joins the cluster by its GCS address instead (kdray run, sweep, evaluate,
predict, data synth and data inspect take it):

  kdray run CONFIG --address $HOST:$RAY_PORT
EOF
}

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Ports Ray would otherwise take at fixed defaults (agent 52365, client server 10001, workers from
# 10002): free ones, so this cluster starts next to another Ray on the same machine.
node_ports() {
    local option
    for option in node-manager-port object-manager-port dashboard-agent-listen-port dashboard-agent-grpc-port \
                  runtime-env-agent-port metrics-export-port; do
        printf -- '--%s=%s ' "$option" "$(free_port)"
    done
    printf -- '--min-worker-port=0 --max-worker-port=0'  # 0: each worker takes a port the OS assigns
}

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Whether process group $1 has a running member (zombies, dead but not yet reaped, do not count).
group_running() { ps -A -o pgid=,stat= | awk -v group="$1" '$1 == group && $2 !~ /^Z/ {found = 1} END {exit !found}'; }

# Whoever reads the token can run code on the cluster, and Ray writes it with the caller's umask
# (readable by every user by default): generated under umask 077, and any token file made 0600.
ensure_token() {
    local token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
    if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" \
          && ! -s "$token_file" ]]; then
        (umask 077 && "$RAY" get-auth-token --generate >/dev/null)
    fi
    if [[ -f "$token_file" ]]; then
        chmod 600 "$token_file"
    fi
}

# `ray start ... --block` in the background as its own process group (job control on); pid into $1.
launch() {
    local pidfile="$1" log="$2"
    shift 2
    set -m
    # Ray on Linux rewrites a node address of 127.0.0.1 to the machine's network address unless told
    # the cluster is this one machine (what it assumes on macOS, whence the variable's name).
    # RAY_ADDRESS: Ray code that looks a cluster up without an address (Ray Train's placement-group
    # cleaner, the state API) finds this one, not "multiple active Ray instances" on the machine.
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="$MULTI_NODE" RAY_ADDRESS="$HOST:$RAY_PORT" \
        "$RAY" start --block --node-ip-address="$HOST" --disable-usage-stats "$@" </dev/null >"$log" 2>&1 &
    echo $! >"$pidfile"
    set +m
}

wait_for_dashboard() {
    "$PYTHON" - "http://$HOST:$DASHBOARD_PORT/api/version" "$START_TIMEOUT" "$NODES/head.pid" <<'EOF'
import os, sys, time, urllib.error, urllib.request
url, timeout, pidfile = sys.argv[1], float(sys.argv[2]), sys.argv[3]
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    try:
        urllib.request.urlopen(url, timeout=2)
        sys.exit(0)
    except urllib.error.HTTPError:  # 401 without a token: up, and authenticating
        sys.exit(0)
    except OSError:
        try:
            os.kill(int(open(pidfile).read()), 0)
        except ProcessLookupError:
            sys.exit("the head exited; its log says why")
        time.sleep(0.5)
sys.exit(f"no dashboard at {url} after {timeout:.0f} s")
EOF
}

start_head() {
    mkdir -p "$NODES"
    if alive "$NODES/head.pid"; then
        echo "a head is already running (pid $(cat "$NODES/head.pid")); cluster/local.sh stop first" >&2
        exit 1
    fi
    ensure_token
    local ports
    read -r -a ports <<<"$(node_ports)"
    launch "$NODES/head.pid" "$KDRAY_RAY_DIR/head.log" --head --port="$RAY_PORT" \
        --include-dashboard=true --dashboard-host="$HOST" --dashboard-port="$DASHBOARD_PORT" \
        --ray-client-server-port="$(free_port)" --temp-dir="$KDRAY_RAY_DIR" \
        ${NUM_CPUS:+--num-cpus="$NUM_CPUS"} "${ports[@]}"
    echo "$MULTI_NODE" >"$NODES/multi-node"
    if ! wait_for_dashboard; then
        tail -n 20 "$KDRAY_RAY_DIR/head.log" >&2
        exit 1
    fi
    echo "Ray head on $HOST:$RAY_PORT; dashboard and Jobs API: http://$HOST:$DASHBOARD_PORT" \
         "(log: $KDRAY_RAY_DIR/head.log)"
}

start_worker() {
    if ! alive "$NODES/head.pid"; then
        echo "no head running; cluster/local.sh start first" >&2
        exit 1
    fi
    if [[ "$(cat "$NODES/multi-node")" != 1 ]]; then
        echo "the head runs single-machine (all on $HOST);" \
             "cluster/local.sh stop, then MULTI_NODE=1 cluster/local.sh start" >&2
        exit 1
    fi
    MULTI_NODE=1
    local ports name
    read -r -a ports <<<"$(node_ports)"
    name="worker-$(date +%s)-$RANDOM"
    launch "$NODES/$name.pid" "$KDRAY_RAY_DIR/$name.log" --address="$HOST:$RAY_PORT" \
        --num-cpus="$WORKER_CPUS" --temp-dir="$KDRAY_RAY_DIR" "${ports[@]}"
    echo "started $name (log: $KDRAY_RAY_DIR/$name.log); cluster/local.sh status lists the nodes"
}

# SIGTERM makes `ray start --block` shut its node down; what is left after STOP_TIMEOUT is killed.
stop_nodes() {
    local pidfile pid deadline pidfiles
    shopt -s nullglob
    pidfiles=("$NODES"/worker-*.pid "$NODES"/head.pid)
    for pidfile in "${pidfiles[@]}"; do
        pid="$(cat "$pidfile")"
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid"
            deadline=$((SECONDS + STOP_TIMEOUT))
            while group_running "$pid" && ((SECONDS < deadline)); do sleep 0.5; done
            kill -KILL -- "-$pid" 2>/dev/null || true
            echo "stopped $(basename "$pidfile" .pid) (pid $pid)"
        fi
        rm -f "$pidfile"
    done
}

case "${1:-}" in
    start) start_head ;;
    worker) start_worker ;;
    status) RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "$RAY" status --address="$HOST:$RAY_PORT" ;;  # 127.0.0.1 as given
    stop) stop_nodes ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
esac
