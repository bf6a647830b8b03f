#!/usr/bin/env bash
# Small-read latency while snapshots are being written (docs/BENCHMARKS.md, "Snapshots").
#
# For each case: start a release server with --data-dir, fill it, then measure 64-byte
# reads (netswap-bench load) for SECONDS without snapshots and for SECONDS while
# snapshots are written back to back (SIGUSR1 as soon as the previous one is done).
# Prints the snapshot durations and the read latencies of both runs.
#
# Usage: ./scripts/bench/snapshot.sh [SECONDS] [CASE...]   (cases: records, large)
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-10}
shift || true
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(records large)

cargo build --release --quiet -p netswap-server -p netswap-cli
bin=target/release
work=$(mktemp -d /var/tmp/netswap-snapbench.XXXXXX)
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
port=7461
load=(-c 10 -P 1 -d 64 --op read)

run_case() {
  local name=$1; shift
  local log=$work/$name.log
  $bin/netswap-server --listen 127.0.0.1:$port --threads 1 --snapshot-interval 0 \
    --data-dir "$work/$name" --identity-key "$work/key" \
    --quota-bytes 17179869184 --quota-records 100000000 2>"$log" >/dev/null &
  server=$!
  sleep 0.5
  echo "== $name: filling ($*)"
  $bin/netswap-bench fill -s 127.0.0.1:$port "$@" | sed 's/^/   /'
  echo "== $name: reads without snapshots"
  $bin/netswap-bench load -s 127.0.0.1:$port "${load[@]}" --duration "$seconds" | sed 's/^/   /'
  echo "== $name: reads while snapshots are written back to back"
  $bin/netswap-bench load -s 127.0.0.1:$port "${load[@]}" --duration "$seconds" > "$work/during.txt" &
  local reader=$!
  local done_before
  while kill -0 $reader 2>/dev/null; do
    done_before=$(grep -c "snapshot written" "$log" || true)
    kill -USR1 $server
    while kill -0 $reader 2>/dev/null && [ "$(grep -c "snapshot written" "$log" || true)" -le "$done_before" ]; do
      sleep 0.05
    done
  done
  wait $reader
  sed 's/^/   /' "$work/during.txt"
  echo "   snapshots written during the run (seconds each, records, bytes):"
  grep "snapshot written" "$log" | sed -E 's/.*records=([0-9]+) bytes=([0-9]+) seconds=([0-9.]+).*/     \3 s  \1 records  \2 bytes/' | head -20
  grep -E "snapshot (written|failed)" "$log" | tail -3 | sed "s/^/   log: /"
  ls -l "$work/$name/netswap.snapshot" | awk '{print "   snapshot file: " $5 " bytes"}'
  kill $server; wait $server 2>/dev/null || true
}

for c in "${cases[@]}"; do
  case $c in
    records) run_case records --records 1000000 -d 64 ;;
    large) run_case large --records 4096 -d 1048576 -c 4 -P 4 ;;
    *) echo "unknown case $c" >&2; exit 2 ;;
  esac
done
