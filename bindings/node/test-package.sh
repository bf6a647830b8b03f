#!/usr/bin/env bash
# Installs the npm packages as a user would, in a fresh folder outside the repository:
# `npm pack` of `netswap` and of its platform package `netswap-linux-x64-gnu`, then
# `npm install` of both tarballs, then runs the README's examples (examples/quickstart.mjs
# as ESM, examples/quickstart.cjs as CommonJS) against a real server and type-checks a
# TypeScript consumer (strict, module nodenext, without @types/node). Called by
# scripts/test.sh after the addon is built.
#
# Usage: bindings/node/test-package.sh SERVER_BIN
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
server_bin=$(realpath "$1")
work=$(mktemp -d /tmp/netswap-node-package.XXXXXX)
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT

size=$(stat -c %s "$here/netswap.linux-x64-gnu.node")
echo "addon: $size bytes (stripped)"
if [ "$size" -gt 8000000 ]; then
  echo "the addon is $size bytes: it should be stripped (napi build --strip)" >&2
  exit 1
fi

# As the release step does (napi pre-publish): the platform package gets the binary,
# and the main package lists the platform packages as optional dependencies (they are
# not in the repository's package.json: they are not on the registry yet, and `npm ci`
# would look for them).
mkdir -p "$work/pkgs" "$work/app" "$work/stage"
cp -r "$here/npm/linux-x64-gnu" "$work/stage/platform"
cp "$here/netswap.linux-x64-gnu.node" "$work/stage/platform/"
mkdir "$work/stage/main"
(cd "$here" && cp package.json README.md netswap.cjs netswap.mjs netswap.d.ts index.js index.d.ts "$work/stage/main/")
node -e '
  const fs = require("fs"); const p = process.argv[1]; const pkg = JSON.parse(fs.readFileSync(p));
  pkg.optionalDependencies = { "netswap-linux-x64-gnu": pkg.version };
  fs.writeFileSync(p, JSON.stringify(pkg, null, 2) + "\n");' "$work/stage/main/package.json"
(cd "$work/stage/main" && npm pack --silent --pack-destination "$work/pkgs" >/dev/null)
(cd "$work/stage/platform" && npm pack --silent --pack-destination "$work/pkgs" >/dev/null)

cd "$work/app"
npm init -y >/dev/null
npm install --no-audit --no-fund --loglevel=error \
  "$work/pkgs/netswap-linux-x64-gnu-0.1.0.tgz" "$work/pkgs/netswap-0.1.0.tgz" >/dev/null
test ! -e node_modules/netswap/netswap.linux-x64-gnu.node # the binary comes from the platform package
cp "$here/examples/quickstart.mjs" "$here/examples/quickstart.cjs" .

"$server_bin" --listen 127.0.0.1:0 --threads 1 >"$work/server.out" 2>"$work/server.err" &
server=$!
for _ in $(seq 50); do grep -q listening "$work/server.out" && break; sleep 0.1; done
address=$(sed -n 's/^netswap-server listening on //p' "$work/server.out")

expected='level 1
conflict: the record is at version 2
watch: changed 3n
mirror: level 3'
for example in quickstart.mjs quickstart.cjs; do
  out=$(NETSWAP_SERVER=$address node "$example")
  got=$(echo "$out" | grep -v '^pointer: ')
  if [ "$got" != "$expected" ]; then
    echo "$example printed:" >&2
    echo "$out" >&2
    exit 1
  fi
  echo "$out" | grep -qE '^pointer: [0-9a-f]{16}$'
  echo "examples/$example: ok (outside the repository, installed from the packed tarballs)"
done

# A TypeScript consumer, strict, without @types/node, resolving the package's exports.
cat >consumer.mts <<'EOF'
import { Client, ErrorCode, Pointer, type NetswapError } from 'netswap'
export async function main(): Promise<string> {
  const c = await Client.connect('127.0.0.1:7420')
  const p = await c.create(Uint8Array.of(1), { read: true })
  try {
    await c.replaceIf(p, 9n, Uint8Array.of(2))
  } catch (e) {
    if ((e as NetswapError).code === ErrorCode.CONFLICT) return Pointer.toHex(p)
  }
  return ''
}
EOF
cat >consumer.cts <<'EOF'
import netswap = require('netswap')
export async function main(): Promise<bigint> {
  const c = await netswap.Client.connect('127.0.0.1:7420')
  return c.create(Uint8Array.of(1))
}
EOF
cat >tsconfig.json <<'EOF'
{
  "compilerOptions": {
    "strict": true, "noEmit": true, "target": "es2022", "module": "nodenext",
    "moduleResolution": "nodenext", "types": [], "skipLibCheck": false
  },
  "files": ["consumer.mts", "consumer.cts"]
}
EOF
node "$here/node_modules/typescript/bin/tsc" -p tsconfig.json
echo "TypeScript consumer (import and require, strict, no @types/node): ok"
