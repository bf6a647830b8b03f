#!/usr/bin/env bash
# What the read cache costs writes: REPLACE 64 B at pipeline 16 through one gateway
# without the cache, while K = 0, 1, 3 other gateways with `--redis-read-cache` run on
# the same prefix (idle: they read none of the records written), three rounds
# alternating K. Prints REPLACEs/s and Redis's CPU per REPLACE (all nodes, from /proc).
# docs/BENCHMARKS.md, "The read cache" and "Tracking what a gateway read".
# Usage: [GW=netswap-server] scripts/bench/read-cache-write-cost.sh CLUSTER_DIR PORT
#   (a cluster from `scripts/redis-cluster.sh start CLUSTER_DIR PORT 3`; GW: the
#   gateway binary to measure, default this checkout's release build)
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=$1 port=$2
cargo build --release --quiet -p netswap-server -p netswap-cli
gw=${GW:-./target/release/netswap-server}
S=redis-cluster://127.0.0.1:$port
key=$(mktemp)
head -c 32 /dev/urandom >"$key"
trap 'rm -f "$key"' EXIT
pids=$(cat "$dir"/*/redis.pid)
ticks() { local t=0 p; for p in $pids; do t=$((t + $(awk '{print $14 + $15}' /proc/$p/stat))); done; echo $t; }
for round in 1 2 3; do
for k in 0 1 3; do
  pre=gc$RANDOM$RANDOM
  others=()
  for i in $(seq $k); do
    "$gw" --listen 127.0.0.1:0 --identity-key "$key" --store $S --redis-prefix $pre --threads 1 --redis-read-cache 65536 >/dev/null 2>&1 & others+=($!)
  done
  "$gw" --listen 127.0.0.1:7432 --identity-key "$key" --store $S --redis-prefix $pre --threads 1 --quota-records 100000000 >/dev/null 2>&1 & A=$!
  sleep 1.5
  t0=$(ticks)
  out=$(./target/release/netswap-bench -s 127.0.0.1:7432 --json load -c 50 -P 16 -d 64 --op replace --keys 1000 --duration 4)
  t1=$(ticks)
  ops=$(echo "$out" | python3 -c "import json,sys; r=json.load(sys.stdin); print(int(r['ops_per_sec']), int(r['ops']))")
  set -- $ops
  echo "round $round k=$k ops/s=$1 redis_us_per_op=$(python3 -c "print(round(($t1-$t0)/$(getconf CLK_TCK)*1e6/$2,2))")"
  kill "$A" "${others[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
done
done
