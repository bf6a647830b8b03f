#!/usr/bin/env bash
# One netswap gateway on a Redis Cluster vs the cluster itself (docs/BENCHMARKS.md,
# "Redis Cluster gateway"). Starts a 3+3 cluster on loopback, then for each row
# alternates: netswap-bench against one gateway (--threads 1), and redis-benchmark
# --cluster against the cluster (GET/SET with the same value size, connections and
# pipeline). Prints medians of RUNS runs.
#
# Usage: ./scripts/bench/cluster.sh [RUNS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-3}
secs=${2:-5}
cargo build --release --quiet -p netswap-server -p netswap-cli
bin=target/release
work=$(mktemp -d /tmp/netswap-clusterbench.XXXXXX)
nodes=$(scripts/redis-cluster.sh start "$work/cluster" 18000 3)
head -c 32 /dev/urandom >"$work/key"
$bin/netswap-server --listen 127.0.0.1:7480 --threads 1 --store "redis-cluster://$nodes" \
  --identity-key "$work/key" --quota-records 100000000 2>"$work/gw.log" >/dev/null &
gw=$!
trap 'kill $gw 2>/dev/null; scripts/redis-cluster.sh stop "$work/cluster"; rm -rf "$work"' EXIT
sleep 1
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for row in "64 1" "64 16" "1024 1" "1024 16"; do
  set -- $row
  size=$1 pipe=$2
  for op in read replace; do
    ns=() rb=() nsp99=()
    for ((r = 0; r < runs; r++)); do
      out=$($bin/netswap-bench load -s 127.0.0.1:7480 -c 50 -P "$pipe" -d "$size" --op "$op" --keys 1000 --duration "$secs" --json)
      ns+=("$(python3 -c 'import json,sys; print(json.load(sys.stdin)["ops_per_sec"])' <<<"$out")")
      nsp99+=("$(python3 -c 'import json,sys; print(json.load(sys.stdin)["p99_us"])' <<<"$out")")
      t=$([ "$op" = read ] && echo get || echo set)
      n=$((pipe == 1 ? 100000 : 1000000))
      out=$(redis-benchmark -h 127.0.0.1 -p 18000 --cluster -c 50 -P "$pipe" -d "$size" -t "$t" -n $n -r 1000 -q 2>/dev/null | tr '\r' '\n' | grep -E "requests per second" | tail -1)
      rb+=("$(awk '{for(i=1;i<=NF;i++) if ($(i+1)=="requests") print $i}' <<<"$out")")
    done
    a=$(printf '%s\n' "${ns[@]}" | median)
    b=$(printf '%s\n' "${rb[@]}" | median)
    p=$(printf '%s\n' "${nsp99[@]}" | median)
    printf '%-8s %5s B  P%-3s gateway %10.0f ops/s (p99 %6.0f us)  cluster (redis-benchmark) %10.0f ops/s  ratio %.2f\n' \
      "$op" "$size" "$pipe" "$a" "$p" "$b" "$(python3 -c "print($a/$b)")"
  done
done
