#!/usr/bin/env bash
# How much of the gap to the framing-only ceiling is the records' memory: READ at
# pipeline 16 against netswap-server --threads 1 with 100, 10,000 and 100,000 distinct
# records, and against `netswap-bench ceiling` (one canned value), for 64 B and 1 KiB
# values. Usage: scripts/bench/keyspace.sh [RUNS] (default 3; prints one line per run).
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-3}
cargo build --release --quiet -p netswap-server -p netswap-cli
bin=target/release
ops() { python3 -c 'import json,sys; print(int(json.load(sys.stdin)["ops_per_sec"]))'; }
source scripts/bench/lib.sh
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for size in 64 1024; do
  for run in $(seq "$runs"); do
    for keys in 100 10000 100000; do
      start "$bin/netswap-server" --listen 127.0.0.1:0 --threads 1 \
        --quota-records 100000000 --quota-bytes 68719476736
      n=$("$bin/netswap-bench" -s "$addr" --json load --op read -d "$size" -c 50 -P 16 \
        --keys "$keys" --duration 4 | ops)
      kill "$pid"; wait "$pid" 2>/dev/null || true
      echo "size=$size run=$run netswap keys=$keys $n ops/s"
    done
    start "$bin/netswap-bench" ceiling --listen 127.0.0.1:0 -d "$size"
    n=$("$bin/netswap-bench" -s "$addr" --json load --op read -d "$size" -c 50 -P 16 \
      --keys 10000 --duration 4 | ops)
    kill "$pid"; wait "$pid" 2>/dev/null || true
    echo "size=$size run=$run ceiling $n ops/s"
  done
done
