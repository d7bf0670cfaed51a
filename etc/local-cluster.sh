#!/usr/bin/env bash
# A local 3-node dqid cluster on loopback (n1, n2, n3), for trying things out.
#
#   etc/local-cluster.sh start            start all three nodes
#   etc/local-cluster.sh start-node n1    start one node (e.g. a replacement)
#   etc/local-cluster.sh kill n1          kill -9 one node (by its PID)
#   etc/local-cluster.sh stop             SIGTERM every node
#   etc/local-cluster.sh status           show each node's /ready
#
# Node nI serves HTTP on port BASE+I-1 and AMP on port BASE+100+I-1.
# The nodes prove a shared key to each other: RUN/cluster.key, made (mode
# 0600, 32 random bytes) the first time a node starts.
# Every node reads the options they share from DQID_CONFIG (etc/dqid.toml
# beside this script); the command line below, and DQID_ARGS, win over it.
# Environment: DQID_BASE_PORT (8081), DQID_RUN_DIR (./dqid-run: logs, PID
# files, the key), TWISTD (twistd on PATH), DQID_CONFIG (a TOML file of
# options), DQID_ARGS (extra options, e.g. "--min-copies=2 --size=10000").
set -euo pipefail

BASE=${DQID_BASE_PORT:-8081}
RUN=${DQID_RUN_DIR:-./dqid-run}
TWISTD=${TWISTD:-twistd}
CONFIG=${DQID_CONFIG:-$(dirname "$0")/dqid.toml}
NODES=(n1 n2 n3)

http_port() { echo $((BASE + ${1#n} - 1)); }
amp_port() { echo $((BASE + 100 + ${1#n} - 1)); }

start_node() {
    local node=$1 peers=()
    for other in "${NODES[@]}"; do
        [ "$other" = "$node" ] || peers+=("--peer=$other=127.0.0.1:$(amp_port "$other")")
    done
    mkdir -p "$RUN"
    if [ ! -s "$RUN/cluster.key" ]; then
        (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$RUN/cluster.key")
    fi
    # shellcheck disable=SC2086
    "$TWISTD" -n --pidfile= --logfile="$RUN/$node.log" dqid \
        --config="$CONFIG" \
        --node-id="$node" \
        --http="tcp:$(http_port "$node"):interface=127.0.0.1" \
        --amp="tcp:$(amp_port "$node"):interface=127.0.0.1" \
        --cluster-key-file="$RUN/cluster.key" \
        "${peers[@]}" ${DQID_ARGS:-} >>"$RUN/$node.out" 2>&1 &
    echo $! >"$RUN/$node.pid"
    echo "$node: pid $!, http 127.0.0.1:$(http_port "$node"), amp 127.0.0.1:$(amp_port "$node")"
}

signal_node() {
    local node=$1 sig=$2 pidfile="$RUN/$1.pid"
    [ -f "$pidfile" ] || { echo "$node: not started here" >&2; return 0; }
    local pid; pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill "-$sig" "$pid"
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    fi
    rm -f "$pidfile"
    echo "$node: stopped (SIG$sig)"
}

case "${1:-}" in
    start) for node in "${NODES[@]}"; do start_node "$node"; done ;;
    start-node) start_node "${2:?which node}" ;;
    kill) signal_node "${2:?which node}" KILL ;;
    stop) for node in "${NODES[@]}"; do signal_node "$node" TERM; done ;;
    status)
        for node in "${NODES[@]}"; do
            printf '%s: ' "$node"
            curl -s "127.0.0.1:$(http_port "$node")/ready" || printf 'down'
            echo
        done ;;
    *) sed -n '2,19p' "$0"; exit 2 ;;
esac
