# Shared by the benchmark scripts (source it). Needs $tmp (a scratch directory).

# Runs a server command in the background (pid in $pid) and sets $addr to the
# loopback address it prints on start.
start() {
  "$@" >"$tmp/out" 2>/dev/null &
  pid=$!
  for _ in $(seq 100); do
    addr=$(grep -oE '127\.0\.0\.1:[0-9]+' "$tmp/out" | head -1 || true)
    [ -n "$addr" ] && return
    sleep 0.05
  done
  echo "no address from $*" >&2
  exit 1
}
