#!/usr/bin/env bash
# Installs the C library under a temporary prefix (scripts/install-c.sh), then builds the
# README's example (examples/c/hello.c) in another folder with exactly the documented
# commands, once against the shared library and once statically, and runs both against
# a real server. Called by scripts/test.sh.
#
# Usage: examples/c/test.sh SERVER_BIN
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
server_bin=$(realpath "$1")
work=$(mktemp -d /tmp/netswap-c-install.XXXXXX)
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT

"$root/scripts/install-c.sh" "$work/prefix" >/dev/null
export PKG_CONFIG_PATH="$work/prefix/lib/pkgconfig"
mkdir "$work/app"
cp "$here/hello.c" "$work/app/"
cd "$work/app"
# shellcheck disable=SC2046 # word splitting of pkg-config's output is the point
cc hello.c $(pkg-config --cflags --libs netswap) -o hello
# shellcheck disable=SC2046
cc hello.c $(pkg-config --cflags --libs netswap-static) -o hello-static
if ldd hello-static | grep -q libnetswap; then
  echo "hello-static links libnetswap dynamically" >&2
  exit 1
fi

"$server_bin" --listen 127.0.0.1:0 --threads 1 >"$work/server.out" 2>/dev/null &
server=$!
for _ in $(seq 50); do grep -q listening "$work/server.out" && break; sleep 0.1; done
address=$(sed -n 's/^netswap-server listening on //p' "$work/server.out")
for exe in hello hello-static; do
  out=$(NETSWAP_SERVER=$address LD_LIBRARY_PATH="$work/prefix/lib" "./$exe")
  if ! echo "$out" | grep -qE '^pointer [0-9a-f]{16}$' ||
     [ "$(echo "$out" | sed -n 2,3p)" != $'hello\nversion 1, 5 bytes' ]; then
    echo "$exe printed:" >&2
    echo "$out" >&2
    exit 1
  fi
  echo "examples/c/hello.c as $exe: ok (built outside the repository with pkg-config)"
done
