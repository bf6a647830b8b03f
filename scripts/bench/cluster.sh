#!/usr/bin/env bash
# One netswap gateway on a Redis Cluster vs the cluster itself (docs/BENCHMARKS.md,
# "Redis Cluster gateway"). Starts a 3+3 cluster on loopback and one gateway
# (--threads 1), then for each row alternates three measurements of RUNS runs each:
#   gateway   netswap-bench load (netswap protocol) against the gateway;
#   cluster   netswap-bench load --protocol resp-cluster against the cluster (GET/SET,
#             each connection on one primary with the keys of its slots): the same
#             load generator, so the ratio compares the servers, not two tools;
#   second    redis-benchmark --cluster (a second opinion on the cluster, another tool).
# For writes, two more columns by the same load generator: the cluster's own
# versioned write (each key a hash of value and version; a write replaces the value
# and raises the version atomically, as a REPLACE does), with MULTI/HSET/HINCRBY/EXEC
# and as one Lua script (`--resp-layout versioned-multi` / `versioned-script`).
# Same value size, connections, pipeline and key count everywhere. Prints medians,
# the gateway's p99, and the CPU time per operation (from /proc: the gateway's, and
# the six Redis nodes' together) for the first two.
#
# Usage: ./scripts/bench/cluster.sh [RUNS] [SECONDS]
# NETSWAP_GATEWAY_FEATURES=mimalloc builds the gateway with that feature.
# NETSWAP_GATEWAY_THREADS=N runs the gateway with N worker threads (default 1).
# NETSWAP_GATEWAY_ARGS="..." gives the gateway more flags (e.g. --redis-read-cache 65536).
# NETSWAP_BENCH_PIN=1 gives the cluster a core of its own: the six Redis nodes on CPU 0,
# the gateway and every load generator on CPU 1 (`taskset`), so that the cluster has
# the same CPU in both columns and the ratio is Redis's cost per operation through
# the gateway against its cost per GET/SET (the gateway still shares its core with
# the load generator).
# NETSWAP_BENCH_PIN=gateway gives the gateway cores of its own, as a gateway on a host
# of its own in front of the cluster: the gateway on NETSWAP_BENCH_GATEWAY_CPUS
# (default 0), the six Redis nodes and every load generator on
# NETSWAP_BENCH_CLUSTER_CPUS (default 1), so that Redis and the load generator have the
# same cores in both columns and the gateway adds its own (taskset CPU lists; on a
# larger host e.g. NETSWAP_BENCH_GATEWAY_CPUS=0-3 NETSWAP_BENCH_CLUSTER_CPUS=4-15
# NETSWAP_GATEWAY_THREADS=4).
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-3}
secs=${2:-5}
features=${NETSWAP_GATEWAY_FEATURES:-}
threads=${NETSWAP_GATEWAY_THREADS:-1}
cargo build --release --quiet -p netswap-cli
cargo build --release --quiet -p netswap-server ${features:+--features "$features"}
bin=target/release
work=$(mktemp -d /tmp/netswap-clusterbench.XXXXXX)
cp $bin/netswap-server "$work/gateway"
nodes=$(scripts/redis-cluster.sh start "$work/cluster" 18000 3)
head -c 32 /dev/urandom >"$work/key"
"$work/gateway" --listen 127.0.0.1:7480 --threads "$threads" --store "redis-cluster://$nodes" \
  --identity-key "$work/key" --quota-records 100000000 ${NETSWAP_GATEWAY_ARGS:-} 2>"$work/gw.log" >/dev/null &
gw=$!
trap 'kill $gw 2>/dev/null; scripts/redis-cluster.sh stop "$work/cluster"; rm -rf "$work"' EXIT
sleep 1
redis_pids=$(cat "$work"/cluster/*/redis.pid)
pin=()
if [ "${NETSWAP_BENCH_PIN:-0}" = 1 ]; then
  for p in $redis_pids; do taskset -a -p -c 0 "$p" >/dev/null; done
  taskset -a -p -c 1 "$gw" >/dev/null
  pin=(taskset -c 1)
elif [ "${NETSWAP_BENCH_PIN:-0}" = gateway ]; then
  gw_cpus=${NETSWAP_BENCH_GATEWAY_CPUS:-0} cluster_cpus=${NETSWAP_BENCH_CLUSTER_CPUS:-1}
  for p in $redis_pids; do taskset -a -p -c "$cluster_cpus" "$p" >/dev/null; done
  taskset -a -p -c "$gw_cpus" "$gw" >/dev/null
  pin=(taskset -c "$cluster_cpus")
fi
tick=$(getconf CLK_TCK)
# CPU ticks (user + system) of the given processes.
ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)[\"$1\"])"; }
echo "gateway build: ${features:-default}; threads: $threads; flags: ${NETSWAP_GATEWAY_ARGS:-none}; pinned: ${NETSWAP_BENCH_PIN:-0}; $runs runs of $secs s per column; CPU in us per op"
for row in "64 1" "64 16" "1024 1" "1024 16"; do
  set -- $row
  size=$1 pipe=$2
  for op in read replace; do
    ns=() nsp99=() nsgw=() nsrd=() cl=() clp99=() clrd=() rb=() vm=() vmrd=() vs=() vsrd=()
    for ((r = 0; r < runs; r++)); do
      g0=$(ticks $gw) r0=$(ticks $redis_pids)
      out=$("${pin[@]}" $bin/netswap-bench load -s 127.0.0.1:7480 -c 50 -P "$pipe" -d "$size" --op "$op" --keys 1000 --duration "$secs" --json)
      g1=$(ticks $gw) r1=$(ticks $redis_pids)
      ops=$(field ops <<<"$out")
      ns+=("$(field ops_per_sec <<<"$out")")
      nsp99+=("$(field p99_us <<<"$out")")
      nsgw+=("$(python3 -c "print(($g1-$g0)/$tick*1e6/$ops)")")
      nsrd+=("$(python3 -c "print(($r1-$r0)/$tick*1e6/$ops)")")

      r0=$(ticks $redis_pids)
      out=$("${pin[@]}" $bin/netswap-bench load --protocol resp-cluster -s 127.0.0.1:18000 -c 50 -P "$pipe" -d "$size" --op "$op" --keys 1000 --duration "$secs" --json)
      r1=$(ticks $redis_pids)
      ops=$(field ops <<<"$out")
      cl+=("$(field ops_per_sec <<<"$out")")
      clp99+=("$(field p99_us <<<"$out")")
      clrd+=("$(python3 -c "print(($r1-$r0)/$tick*1e6/$ops)")")

      if [ "$op" = replace ]; then
        for layout in versioned-multi versioned-script; do
          r0=$(ticks $redis_pids)
          out=$("${pin[@]}" $bin/netswap-bench load --protocol resp-cluster --resp-layout $layout -s 127.0.0.1:18000 -c 50 -P "$pipe" -d "$size" --op "$op" --keys 1000 --duration "$secs" --json)
          r1=$(ticks $redis_pids)
          ops=$(field ops <<<"$out")
          rd=$(python3 -c "print(($r1-$r0)/$tick*1e6/$ops)")
          if [ $layout = versioned-multi ]; then
            vm+=("$(field ops_per_sec <<<"$out")") vmrd+=("$rd")
          else
            vs+=("$(field ops_per_sec <<<"$out")") vsrd+=("$rd")
          fi
        done
      fi

      t=$([ "$op" = read ] && echo get || echo set)
      n=$((pipe == 1 ? 200000 : 2000000))
      out=$("${pin[@]}" redis-benchmark -h 127.0.0.1 -p 18000 --cluster -c 50 -P "$pipe" -d "$size" -t "$t" -n $n -r 1000 -q 2>/dev/null | tr '\r' '\n' | grep -E "requests per second" | tail -1)
      rb+=("$(awk '{for(i=1;i<=NF;i++) if ($(i+1)=="requests") print $i}' <<<"$out")")
    done
    m() { printf '%s\n' "$@" | median; }
    a=$(m "${ns[@]}") b=$(m "${cl[@]}") c=$(m "${rb[@]}")
    printf '%-7s %4s B P%-2s | gateway %7.0f/s p99 %6.0f us, CPU gw %4.1f + redis %4.1f | cluster %7.0f/s p99 %6.0f us, CPU redis %4.1f | ratio %.2f | redis-benchmark %7.0f/s (ratio %.2f)\n' \
      "$op" "$size" "$pipe" "$a" "$(m "${nsp99[@]}")" "$(m "${nsgw[@]}")" "$(m "${nsrd[@]}")" \
      "$b" "$(m "${clp99[@]}")" "$(m "${clrd[@]}")" "$(python3 -c "print($a/$b)")" "$c" "$(python3 -c "print($a/$c)")"
    if [ "$op" = replace ]; then
      d=$(m "${vm[@]}") e=$(m "${vs[@]}")
      printf '%-7s %4s B P%-2s | cluster versioned write: MULTI %7.0f/s, CPU redis %4.1f (ratio %.2f) | script %7.0f/s, CPU redis %4.1f (ratio %.2f)\n' \
        "$op" "$size" "$pipe" "$d" "$(m "${vmrd[@]}")" "$(python3 -c "print($a/$d)")" "$e" "$(m "${vsrd[@]}")" "$(python3 -c "print($a/$e)")"
    fi
  done
done
