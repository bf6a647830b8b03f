#!/usr/bin/env bash
# Builds the C# client and its NUnit tests with Mono's mcs and runs them under mono
# against a real netswap server. Called by scripts/test.sh (which builds the native
# library and the server first); usable alone after `cargo build --release`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}/release"
build="$here/build"
mkdir -p "$build"

# (That src/NativeMethods.g.cs is what csbindgen generates now is checked by
# `cargo test -p netswap-ffi`.)
mcs -target:library -langversion:7.2 -unsafe -warnaserror -doc:"$build/Netswap.xml" \
    -out:"$build/Netswap.dll" "$here"/src/*.cs
# shellcheck disable=SC2046
mcs -target:library -langversion:7.2 -unsafe -r:"$build/Netswap.dll" -r:System.Net.Http \
    $(pkg-config --libs nunit) -out:"$build/Netswap.Tests.dll" "$here"/tests/*.cs
# The README's example, compiled as a user of the library would.
mcs -langversion:7.2 -warnaserror -r:"$build/Netswap.dll" -out:"$build/Quickstart.exe" \
    "$here/examples/Quickstart.cs"
cp "$target/libnetswap.so" "$build/"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$target/netswap-server" --listen "127.0.0.1:$port" --threads 1 \
    --max-record-bytes 1600000 --quota-bytes 2000000 >"$build/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 50); do grep -q listening "$build/server.log" && break; sleep 0.1; done

cd "$build"
status=0
NETSWAP_TEST_SERVER="127.0.0.1:$port" NETSWAP_VECTORS="$root/tests/vectors" \
  NETSWAP_SERVER_BIN="$target/netswap-server" \
  LD_LIBRARY_PATH="$build${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  nunit-console -nologo -labels Netswap.Tests.dll || status=$?
# The example against the same server: what the README says it prints.
out=$(cd "$build" && NETSWAP_SERVER="127.0.0.1:$port" LD_LIBRARY_PATH="$build" mono Quickstart.exe)
expected='level 1
conflict: the record is at version 2 (2)
mirror: level 3'
got=$(echo "$out" | grep -v -e '^pointer: ' -e '^watch: ')
if [ "$got" != "$expected" ] || ! echo "$out" | grep -qE '^watch: Changed [0-9a-f]{16} version 3$'; then
  echo "examples/Quickstart.cs printed:" >&2
  echo "$out" >&2
  status=1
else
  echo "examples/Quickstart.cs: ok"
fi
# The Unity package, assembled and checked.
"$root/bindings/unity/assemble.sh" "$build/com.netswap.client" "$target/libnetswap.so" || status=1
# NUnit 2.6's summary is not a standard one: print ours.
python3 - "$build/TestResult.xml" <<'PY'
import sys, xml.etree.ElementTree as ET
r = ET.parse(sys.argv[1]).getroot()
total, failures, errors = int(r.get("total")), int(r.get("failures")), int(r.get("errors"))
skipped = int(r.get("not-run", 0))
print(f"C#: {total - failures - errors} passed, {failures + errors} failed, {skipped} skipped")
PY
exit $status
