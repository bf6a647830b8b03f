#!/usr/bin/env bash
# The soak against gateways on a Redis Cluster that fails over and reshards under them
# (docs/RELIABILITY.md, "The soak under failovers and resharding"). Starts a 3+3
# cluster on loopback, runs `soak --store` (two gateways sharing the cluster, each
# client's connections going to one and the next in turn; `--redis-wait-replicas 1` so
# that a failover cannot lose an acknowledged write; leases of 5 s) and, during its
# first round:
#   at  8 s  SIGKILL a primary; its replica takes over; the node is started again
#            5 s later and rejoins as a replica;
#   at ~20 s reshard 1,000 slots from one primary to another while the load runs;
#   at ~24 s SIGKILL the primary that received them, started again 5 s later;
#   at ~31 s reshard 1,000 slots back;
#   at  38 s SIGKILL the second gateway; its clients carry on through the first, and it
#            is started again 3 s later. Its leases run out at ~43 s: the identities
#            it served are connected through the other gateway, so nothing may be
#            reaped;
#   at ~45 s every primary closes its subscribers' connections (CLIENT KILL TYPE
#            pubsub): a blip of the gateways' connections for subscriptions, no
#            failover.
# Beside the soak's 300 clients, 40 records are written through one gateway and
# followed through the other: 20 by mirrors (data watches), 20 by watches. And 4
# records are each written by 8 clients at once, through both gateways (writes of one
# record that queue on a gateway are committed together): no two writes may get one
# version, and each record must end with the write acknowledged at its version.
# The soak then checks every record it was told was written holds exactly its last
# acknowledged bytes and version, that every follower reaches its record's last state,
# and that every record is reaped after the grace.
#
# Usage: ./scripts/chaos-cluster.sh [SECONDS] [ROUNDS]   (SECONDS >= 60)
# NETSWAP_CHAOS_WAIT_REPLICAS=0 runs the gateways without `WAIT` (Redis's asynchronous
# replication may then lose acknowledged writes in a failover: mismatches expected).
# NETSWAP_CHAOS_GATEWAYS=1 runs one gateway (and kills none).
# NETSWAP_CHAOS_READ_CACHE=N runs the gateways with --redis-read-cache N (reads served
# from the cache must stay exact through the failovers and the resharding).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
rounds=${2:-1}
cargo build --release --quiet -p netswap-server
cargo build --release --quiet -p netswap-hardening --bin soak
work=$(mktemp -d /tmp/netswap-chaos.XXXXXX)
base=18300
nodes=$(scripts/redis-cluster.sh start "$work/cluster" $base 3)
# The gateways' log (both append to it), and the reshards', are kept when the soak fails.
export NETSWAP_SERVER_LOG=$work/gateway.log
trap 'scripts/redis-cluster.sh stop "$work/cluster"; [ "${rc:-1}" = 0 ] && rm -rf "$work" || echo "kept $work"' EXIT
log() { echo "chaos $(date +%T): $*"; }
# "id port slots" of every primary, most slots first.
primaries() {
  redis-cli -p "$1" CLUSTER NODES | awk '$3 ~ /master/ && $3 !~ /fail/ {
    n = 0
    for (i = 9; i <= NF; i++) {
      if ($i ~ /^\[/) continue
      k = split($i, r, "-")
      n += (k == 1 ? 1 : r[2] - r[1] + 1)
    }
    split($2, a, "[:@]")
    print $1, a[2], n
  }' | sort -k3 -nr
}
# Any node that answers.
alive() {
  for ((p = base; p < base + 6; p++)); do
    redis-cli -p $p PING 2>/dev/null | grep -q PONG && { echo $p; return; }
  done
}
start_node() {
  local port=$1
  redis-server --port "$port" --bind 127.0.0.1 --daemonize yes \
    --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 1500 \
    --appendonly no --save '' --dir "$work/cluster/$port" --logfile "$work/cluster/$port/log.txt" \
    --pidfile "$work/cluster/$port/redis.pid" >/dev/null
}
# SIGKILLs the primary on `port`, waits until another primary serves all slots, and
# starts the node again 5 s after the kill.
kill_primary() {
  local port=$1
  log "SIGKILL primary :$port"
  kill -9 "$(cat "$work/cluster/$port/redis.pid")"
  local t0=$SECONDS
  # Until three other primaries serve the slots and the cluster says ok.
  for _ in $(seq 1 300); do
    local other
    other=$(alive)
    if [ "$(primaries "$other" | awk -v p="$port" '$2 != p' | wc -l)" = 3 ] &&
      redis-cli -p "$other" CLUSTER INFO | grep -q cluster_state:ok; then break; fi
    sleep 0.1
  done
  log "a replica took over after $((SECONDS - t0)) s"
  sleep $((5 - (SECONDS - t0) > 0 ? 5 - (SECONDS - t0) : 0))
  start_node "$port"
  log "started :$port again"
}
reshard() {
  local from=$1 to=$2 at
  at=$(alive)
  log "reshard 1000 slots ${from:0:8} -> ${to:0:8}"
  local t0=$SECONDS
  redis-cli --cluster reshard "127.0.0.1:$at" --cluster-from "$from" --cluster-to "$to" \
    --cluster-slots 1000 --cluster-yes >"$work/reshard.$from.log" 2>&1 ||
    log "reshard failed: $(tail -3 "$work/reshard.$from.log")"
  log "reshard done in $((SECONDS - t0)) s: $(grep -c '^Moving slot' "$work/reshard.$from.log") slots moved"
}
# Moves 1000 slots from the primary with the most to the one with the fewest.
rebalance_some() {
  local at
  at=$(alive)
  mapfile -t ps < <(primaries "$at")
  reshard "$(cut -d' ' -f1 <<<"${ps[0]}")" "$(cut -d' ' -f1 <<<"${ps[-1]}")"
}
chaos() {
  sleep 8
  kill_primary "$(primaries "$base" | head -1 | cut -d' ' -f2)"
  sleep 7
  rebalance_some
  sleep 4
  # The primary with the most slots: the one that just received them.
  kill_primary "$(primaries "$(alive)" | head -1 | cut -d' ' -f2)"
  sleep 2
  rebalance_some
  sleep 6
  # A blip: every primary closes the connections of its subscribers (the gateways'
  # connections for subscriptions), and stays up.
  for p in $(primaries "$(alive)" | cut -d' ' -f2); do
    log "CLIENT KILL TYPE pubsub on :$p: $(redis-cli -p "$p" CLIENT KILL TYPE pubsub) closed"
  done
  log "done"
  # Where the gateways' subscriptions are, by the role of each node (a gateway
  # subscribes on the primary of the record's slot), ~6 s after the blip and after the
  # SIGKILLed gateway's watchers are back (expect 60: two channels for each of the 20
  # mirrored records, one for each of the 20 watched ones).
  sleep 6
  for ((p = base; p < base + 6; p++)); do
    log ":$p $(redis-cli -p $p ROLE 2>/dev/null | head -1): $(redis-cli -p $p PUBSUB SHARDCHANNELS 2>/dev/null | grep -c . || true) shard channels subscribed"
  done
}
chaos &
chaos_pid=$!
gateways=${NETSWAP_CHAOS_GATEWAYS:-2}
kill_gateway=()
[ "$gateways" -gt 1 ] && kill_gateway=(--kill-gateway-after 38)
read_cache=()
[ -n "${NETSWAP_CHAOS_READ_CACHE:-}" ] &&
  read_cache=(--server-arg=--redis-read-cache --server-arg="$NETSWAP_CHAOS_READ_CACHE")
rc=0
./target/release/soak --store "redis-cluster://$nodes" --seconds "$secs" --rounds "$rounds" \
  --gateways "$gateways" "${kill_gateway[@]}" --mirrors 40 --hot 4 --server-arg=--lease-ttl --server-arg=5 \
  --server-arg=--redis-wait-replicas --server-arg="${NETSWAP_CHAOS_WAIT_REPLICAS:-1}" \
  "${read_cache[@]}" || rc=$?
wait $chaos_pid || true
cp "$work/gateway.log" "${TMPDIR:-/tmp}/netswap-chaos-gateway.log"
echo "gateways' log: ${TMPDIR:-/tmp}/netswap-chaos-gateway.log"
echo "gateways: $(grep -c 'stopped answering while the cluster answers a new one' "$work/gateway.log" || true) connection(s) to the cluster replaced (at: $(grep 'stopped answering while' "$work/gateway.log" | cut -c12-19 | tr '\n' ' '))"
echo "gateways: $(grep -c 'fewer of this gateway.s subscriptions than its watches need' "$work/gateway.log" || true) renewal(s) of the subscriptions for subscriptions found missing, $(grep -c "the cluster's primaries changed; subscribed again" "$work/gateway.log" || true) for changed primaries"
grep -E "read cache|the gateway's counts" "$work/gateway.log" | sed 's/^/gateways: /' || true
exit $rc
