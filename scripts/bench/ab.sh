#!/usr/bin/env bash
# A/B of two netswap-server builds with one load generator: for RUNS rounds, starts A,
# runs `netswap-bench load ARGS...` against it, stops it, then the same for B
# (alternating), and prints ops/s and p99 per run, then the medians.
# Usage: scripts/bench/ab.sh A_SERVER_BINARY B_SERVER_BINARY RUNS [load args...]
# Example: scripts/bench/ab.sh /tmp/old/netswap-server target/release/netswap-server 5 \
#            --op read -d 64 -c 50 -P 16 --keys 1000000 --duration 4
# With `hol ARGS...` instead of load arguments it runs `netswap-bench hol ARGS...` and
# compares the p99 of the small reads (lower is better) instead of ops/s, e.g.
#   scripts/bench/ab.sh A B 7 hol --big 67108864 --direction write --reads 200
# AB_THREADS=N runs both servers with --threads N (default 1); AB_A_THREADS /
# AB_B_THREADS set it for one side.
# AB_A_ARGS / AB_B_ARGS: more server flags for A / B (the same binary twice compares
# two settings), e.g. AB_B_ARGS="--redis-read-cache 65536".
# AB_STORE=redis-cluster://HOST:PORT,... runs both as gateways on that cluster (start
# one with scripts/redis-cluster.sh), each run under a fresh key prefix, e.g.
#   AB_STORE=redis-cluster://127.0.0.1:18500 scripts/bench/ab.sh A B 8 \
#     --op read -d 64 -c 50 -P 16 --keys 1000 --duration 4
# AB_FLUSH=1 (with AB_STORE) empties the cluster (`FLUSHALL` on every primary) before
# each run: each run creates its --keys records, so without it the side that runs
# second finds more keys in Redis, which cost it 2.5-5% in runs of 100,000 records
# (docs/BENCHMARKS.md, "Records picked by Zipf's law").
set -euo pipefail
cd "$(dirname "$0")/../.."
a=$1 b=$2 runs=$3
shift 3
mode=load
if [ "${1:-}" = hol ]; then
  mode=hol
  shift
fi
cargo build --release --quiet -p netswap-cli
bench=target/release/netswap-bench
tmp=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$tmp"' EXIT
pid=
source scripts/bench/lib.sh
for run in $(seq "$runs"); do
  for side in A B; do
    bin=$a extra=${AB_A_ARGS:-} threads=${AB_A_THREADS:-${AB_THREADS:-1}}
    [ "$side" = B ] && bin=$b extra=${AB_B_ARGS:-} threads=${AB_B_THREADS:-${AB_THREADS:-1}}
    store=()
    if [ -n "${AB_STORE:-}" ]; then
      [ -f "$tmp/key" ] || head -c 32 /dev/urandom >"$tmp/key"
      store=(--store "$AB_STORE" --identity-key "$tmp/key" --redis-prefix "ab$RANDOM$RANDOM")
      if [ "${AB_FLUSH:-0}" = 1 ]; then
        first=${AB_STORE#redis-cluster://}
        first=${first%%,*}
        redis-cli -h "${first%:*}" -p "${first##*:}" CLUSTER NODES |
          awk '$3 ~ /master/ && $3 !~ /fail/ {split($2, a, "@"); print a[1]}' |
          while read -r node; do
            redis-cli -h "${node%:*}" -p "${node##*:}" FLUSHALL >/dev/null
          done
      fi
    fi
    start "$bin" --listen 127.0.0.1:0 --threads "$threads" --quota-records 100000000 \
      --quota-bytes 68719476736 "${store[@]}" $extra
    "$bench" -s "$addr" --json "$mode" "$@" >"$tmp/r.json"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    python3 - "$side" "$run" "$tmp/r.json" >>"$tmp/all" <<'EOF'
import json, sys
r = json.load(open(sys.argv[3]))
if r["mode"] == "hol":
    print(sys.argv[1], sys.argv[2], r["p99_us"], r["max_us"], r["transfer_seconds"])
else:
    print(sys.argv[1], sys.argv[2], int(r["ops_per_sec"]), r.get("p99_us", ""))
EOF
    tail -1 "$tmp/all"
  done
done
python3 - "$tmp/all" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
unit = "us p99 of the small reads (lower is better)" if len(rows[0]) == 5 else "ops/s"
for side in "AB":
    ops = [float(r[2]) for r in rows if r[0] == side]
    print(f"{side} median {statistics.median(ops):,.0f} {unit} over {len(ops)} runs")
a = statistics.median(float(r[2]) for r in rows if r[0] == "A")
b = statistics.median(float(r[2]) for r in rows if r[0] == "B")
print(f"B / A = {b / a:.3f}")
EOF
