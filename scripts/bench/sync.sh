#!/usr/bin/env bash
# State sync: many watchers keep an exact copy of one 4 KiB record that a writer
# changes 64 bytes at a time, 60 times a second (docs/BENCHMARKS.md, "State sync").
# Three ways, alternating in each round, measured by one tool (netswap-bench sync):
#   notify-read  netswap v1 watch + READ of the whole record on each NOTIFY
#   delta        netswap data watch (the NOTIFY carries the changed bytes)
#   redis        SETRANGE + PUBLISH; each subscriber GETs the key on each message
# Prints the median of the rounds for each way and watcher count, and a table.
#
# Usage: ./scripts/bench/sync.sh [ROUNDS] [UPDATES]     (defaults: 3 rounds, 600 updates)
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
updates=${2:-600}

command -v redis-server >/dev/null || { echo "needs redis-server (apt-get install redis-server)" >&2; exit 2; }
cargo build --release --quiet -p netswap-server -p netswap-cli
work=$(mktemp -d /tmp/netswap-sync.XXXXXX)
port=7471
rport=7472
./target/release/netswap-server --listen 127.0.0.1:$port --threads 1 2>"$work/server.log" >/dev/null &
server=$!
redis-server --port $rport --bind 127.0.0.1 --protected-mode no --save '' --appendonly no \
  --maxclients 10000 >"$work/redis.log" 2>&1 &
redis=$!
trap 'kill $server $redis 2>/dev/null || true; rm -rf "$work"' EXIT
sleep 0.5

for watchers in 50 1000; do
  for round in $(seq "$rounds"); do
    for how in notify-read delta redis; do
      ./target/release/netswap-bench -s 127.0.0.1:$port --json sync --how $how -w "$watchers" \
        --updates "$updates" --redis 127.0.0.1:$rport >>"$work/results.jsonl"
    done
  done
done

python3 - "$work/results.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'watchers':>8} {'how':<12} {'bytes/update/watcher':>21} {'p50 ms':>8} {'p99 ms':>8}  runs (p99 ms)")
table = {}
for w in sorted({r["watchers"] for r in rows}):
    for how in ["notify-read", "delta", "redis"]:
        rs = [r for r in rows if r["watchers"] == w and r["how"] == how]
        med = lambda k: statistics.median(r[k] for r in rs)
        table[(w, how)] = (med("bytes_per_update_per_watcher"), med("p50_us") / 1000, med("p99_us") / 1000)
        assert all(r["copies_exact"] == w for r in rs), "a copy differed"
        b, p50, p99 = table[(w, how)]
        print(f"{w:>8} {how:<12} {b:>21.1f} {p50:>8.2f} {p99:>8.2f}  {[round(r['p99_us'] / 1000, 2) for r in rs]}")
for w in sorted({r["watchers"] for r in rows}):
    d, a, c = table[(w, "delta")], table[(w, "notify-read")], table[(w, "redis")]
    print(f"{w} watchers: delta uses {a[0] / d[0]:.1f}x fewer bytes than notify-read and "
          f"{c[0] / d[0]:.1f}x fewer than Redis; its p99 is {d[2] / a[2]:.2f}x notify-read's "
          f"and {d[2] / c[2]:.2f}x Redis's")
EOF
