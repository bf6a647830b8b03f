#!/usr/bin/env bash
# Starts (or stops) a local Redis Cluster for tests and benchmarks: PRIMARIES
# primaries with one replica each, on 127.0.0.1 ports BASE.. (and BASE+10000.. for
# the cluster bus), in DIR, from Debian's redis-server.
#
#   scripts/redis-cluster.sh start DIR [BASE] [PRIMARIES]   prints host:port,... on stdout
#   scripts/redis-cluster.sh stop DIR
set -euo pipefail
cmd=${1:?start or stop}
dir=${2:?a directory}
case $cmd in
  start)
    base=${3:-7000}
    primaries=${4:-3}
    n=$((primaries * 2))
    mkdir -p "$dir"
    nodes=()
    for ((i = 0; i < n; i++)); do
      port=$((base + i))
      mkdir -p "$dir/$port"
      redis-server --port "$port" --bind 127.0.0.1 --daemonize yes \
        --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 1500 \
        --appendonly no --save '' --dir "$dir/$port" --logfile "$dir/$port/log.txt" \
        --pidfile "$dir/$port/redis.pid" >/dev/null
      nodes+=("127.0.0.1:$port")
    done
    for node in "${nodes[@]}"; do
      for _ in $(seq 1 100); do
        redis-cli -p "${node#*:}" PING 2>/dev/null | grep -q PONG && break
        sleep 0.1
      done
    done
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >"$dir/create.log" 2>&1
    # Ready when, in one pass over every node, each sees the whole cluster (all nodes,
    # all primaries, state ok) and each replica is linked to its primary (checked
    # node by node, an early node could pass before a later one was ready and then
    # change its mind).
    ready=0
    for _ in $(seq 1 600); do
      ready=1
      for node in "${nodes[@]}"; do
        info=$(redis-cli -p "${node#*:}" CLUSTER INFO 2>/dev/null || true)
        repl=$(redis-cli -p "${node#*:}" INFO replication 2>/dev/null || true)
        if ! { grep -q cluster_state:ok <<<"$info" &&
          grep -q "cluster_size:$primaries" <<<"$info" &&
          grep -q "cluster_known_nodes:$n" <<<"$info" &&
          { grep -q role:master <<<"$repl" || grep -q master_link_status:up <<<"$repl"; }; }; then
          ready=0
          break
        fi
      done
      [ "$ready" = 1 ] && break
      sleep 0.1
    done
    if [ "$ready" != 1 ]; then
      echo "redis-cluster.sh: the cluster in $dir did not become ready within 60 s" >&2
      exit 1
    fi
    (IFS=,; echo "${nodes[*]}")
    ;;
  stop)
    # SIGTERM, then wait for every node to exit (a node writes nodes.conf on its
    # way out, so removing DIR before that races with it); SIGKILL after 10 s.
    pids=()
    for f in "$dir"/*/redis.pid; do
      [ -f "$f" ] || continue
      pid=$(cat "$f")
      kill "$pid" 2>/dev/null && pids+=("$pid")
    done
    for pid in "${pids[@]}"; do
      for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
      done
      kill -9 "$pid" 2>/dev/null || true
    done
    ;;
  *) echo "usage: $0 start DIR [BASE] [PRIMARIES] | stop DIR" >&2; exit 2 ;;
esac
