#!/usr/bin/env bash
# A Ray cluster of one head and two worker nodes on this machine, with `ray start`: to try the
# multi-node runtime (shards spread over nodes, a node lost) without a cluster.
#
#   cluster/local.sh up      # head + 2 workers; prints the address to use
#   mmsb-dist --address 127.0.0.1:$MMSB_LOCAL_PORT start --shards 2
#   cluster/local.sh down    # stops these three nodes (and nothing else: never `ray stop`)
#
# Every node has its own ports and the resource "mmsb_node_<i>" (head: 0, workers: 1 and 2) to tell
# them apart, since all of them share the IP 127.0.0.1. Settings (environment):
#   MMSB_LOCAL_PORT      GCS port of the head (6390)           MMSB_LOCAL_DASHBOARD  dashboard port (8266)
#   MMSB_LOCAL_TEMP_DIR  session files of all three nodes (/tmp/mmsb-local); `down` finds them by it
#   MMSB_LOCAL_HEAD_CPUS / MMSB_LOCAL_WORKER_CPUS  logical CPUs (1 / 1): each NumPy shard takes one,
#                        so with head 0 CPUs the shards land on the workers
#   MMSB_LOCAL_OBJECT_STORE_BYTES  object store per node (100 MB: small, it is one machine)
#   MMSB_LOCAL_DASHBOARD_ON        true/false (false): the dashboard costs ~200 MB and a core-second
#   MMSB_LOCAL_BASE_PORT  first of the ports the nodes use (46600; 3 x 100 ports from there)
set -euo pipefail

PORT=${MMSB_LOCAL_PORT:-6390}
DASHBOARD=${MMSB_LOCAL_DASHBOARD:-8266}
DASHBOARD_ON=${MMSB_LOCAL_DASHBOARD_ON:-false}
TEMP_DIR=${MMSB_LOCAL_TEMP_DIR:-/tmp/mmsb-local}
HEAD_CPUS=${MMSB_LOCAL_HEAD_CPUS:-1}
WORKER_CPUS=${MMSB_LOCAL_WORKER_CPUS:-1}
STORE=${MMSB_LOCAL_OBJECT_STORE_BYTES:-100000000}
BASE=${MMSB_LOCAL_BASE_PORT:-46600}
PY=${PYTHON:-python3}
RAY=("$PY" -m ray.scripts.scripts)
ADDRESS="127.0.0.1:$PORT"

# Per-node ports: node i uses BASE + 100*i + (0: node manager, 1: object manager, 2: dashboard
# agent http, 3: dashboard agent grpc, 4: runtime env agent, 5: metrics, 10..60: workers).
node_ports() {
  local b=$((BASE + 100 * $1))
  echo --node-manager-port $b --object-manager-port $((b + 1)) \
       --dashboard-agent-listen-port $((b + 2)) --dashboard-agent-grpc-port $((b + 3)) \
       --runtime-env-agent-port $((b + 4)) --metrics-export-port $((b + 5)) \
       --min-worker-port $((b + 10)) --max-worker-port $((b + 60))
}

up() {
  mkdir -p "$TEMP_DIR"
  # shellcheck disable=SC2046
  RAY_USAGE_STATS_ENABLED=0 "${RAY[@]}" start --head --disable-usage-stats \
    --node-ip-address 127.0.0.1 --port "$PORT" --temp-dir "$TEMP_DIR" \
    --ray-client-server-port $((BASE + 90)) --include-dashboard "$DASHBOARD_ON" \
    --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD" \
    --num-cpus "$HEAD_CPUS" --object-store-memory "$STORE" \
    --resources '{"mmsb_node_0": 1}' $(node_ports 0) >/dev/null
  # A head started by `ray start` turns token authentication on (Ray >= 2.59): nodes joining it
  # and drivers connecting to it must ask for it (the token is in ~/.ray/auth_token).
  export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
  for i in 1 2; do
    # shellcheck disable=SC2046
    RAY_USAGE_STATS_ENABLED=0 "${RAY[@]}" start --address "$ADDRESS" --disable-usage-stats \
      --node-ip-address 127.0.0.1 --temp-dir "$TEMP_DIR" \
      --num-cpus "$WORKER_CPUS" --object-store-memory "$STORE" \
      --resources "{\"mmsb_node_$i\": 1}" $(node_ports "$i") >/dev/null
  done
  echo "local Ray cluster up: head + 2 workers at $ADDRESS (temp dir $TEMP_DIR)"
  echo "  export RAY_ADDRESS=$ADDRESS RAY_AUTH_MODE=$RAY_AUTH_MODE"
  echo "  mmsb-dist --address $ADDRESS start --shards 2"
}

down() {
  # The nodes' processes, found by the temp dir on their command lines (and their children), by pid.
  "$PY" -c "import sys; from mmsb_dist.localray import stop_nodes; \
print(f'stopped {stop_nodes(sys.argv[1], int(sys.argv[2]))} processes')" "$TEMP_DIR" "$PORT"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
