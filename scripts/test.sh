#!/usr/bin/env bash
# Runs every netswap test. On a fresh machine it first installs what is missing
# (Mono and NUnit from Debian for the C# tests; npm packages for the Node addon),
# then builds everything and runs the Rust, C, C# and Node.js tests and the checks CI
# applies (vectors current, rustfmt, clippy with warnings as errors).
# Usage: ./scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

step() { printf '\n==> %s\n' "$*"; }

# Some tests hold thousands of connections at once (a gateway with many identities):
# as many descriptors as the machine allows.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

apt_install() {
  # Installs Debian packages as root (CI) or through sudo.
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq -o DPkg::Lock::Timeout=600 "$@" >/dev/null
}

step "prerequisites"
missing=()
command -v mcs >/dev/null && command -v mono >/dev/null || missing+=(mono-devel)
command -v nunit-console >/dev/null || missing+=(nunit-console)
[ -d /usr/lib/cli/nunit.framework-2.6.3 ] || missing+=(libnunit-cil-dev)
command -v valgrind >/dev/null || missing+=(valgrind)
command -v pkg-config >/dev/null || missing+=(pkg-config)
command -v node >/dev/null && command -v npm >/dev/null || missing+=(nodejs npm)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
command -v prometheus >/dev/null || missing+=(prometheus)
command -v script >/dev/null || missing+=(bsdutils)
command -v openssl >/dev/null || missing+=(openssl)   # certificates of the TLS cluster test
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing from Debian: ${missing[*]}"
  apt_install "${missing[@]}"
else
  echo "all present"
fi

step "test vectors are current (scripts/gen_vectors.py --check); README examples are their files"
python3 scripts/gen_vectors.py --check
python3 scripts/check_readme_examples.py README.md bindings/node/README.md bindings/csharp/README.md

step "the client library does not depend on what only the binaries need"
if cargo tree -p netswap-client -e normal --prefix none | grep -E '^(clap|hdrhistogram|serde_json) '; then
  echo "netswap-client depends on a binary-only crate (above)"; exit 1
fi

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The server binary with glibc's malloc instead of the default mimalloc must keep compiling.
cargo clippy -p netswap-server --bins --no-default-features --quiet -- -D warnings

step "API docs build without warnings (broken links, missing docs)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet \
  -p netswap-proto -p netswap-client -p netswap-server -p netswap-ffi
# The internals' docs too (their links went stale unnoticed).
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet --document-private-items \
  -p netswap-proto -p netswap-client -p netswap-server

step "Redis Cluster for the gateway tests (3 primaries + 3 replicas on loopback)"
cluster_dir=$(mktemp -d /tmp/netswap-test-cluster.XXXXXX)
# The clean-up must not change the run's result (a failing `rm` under `set -e` in an
# EXIT trap would turn a passed run into exit 1), so it keeps the status it found.
stop_cluster() {
  local status=$?
  scripts/redis-cluster.sh stop "$cluster_dir" || echo "warning: stopping the test cluster failed" >&2
  rm -rf "$cluster_dir" || echo "warning: could not remove $cluster_dir" >&2
  exit "$status"
}
trap stop_cluster EXIT
# A free base port (the tests' own clusters pick free ones at random in 12000-21999,
# which skip those in use).
base=17000
while redis-cli -p $base PING >/dev/null 2>&1; do base=$((base + 10)); done
NETSWAP_TEST_REDIS_CLUSTER=$(scripts/redis-cluster.sh start "$cluster_dir" $base 3)
export NETSWAP_TEST_REDIS_CLUSTER
echo "cluster: $NETSWAP_TEST_REDIS_CLUSTER"

step "Rust tests (unit, property, vectors, server on both backends, gateways on Redis Cluster, client, CLI, and the C tests incl. valgrind)"
# The C tests link against the cdylib cargo builds with the rlib they test
# (target/debug/deps, netswap-ffi/tests/c_api.rs).
cargo test --workspace --quiet

step "release build (server, CLI, bench, C library)"
cargo build --release --quiet -p netswap-server -p netswap-cli -p netswap-ffi

step "C library installed with pkg-config files; the README's C example built outside the repository, shared and static"
./examples/c/test.sh target/release/netswap-server

step "C# tests (Mono)"
./bindings/csharp/test.sh

step "Node.js addon (npm ci, napi build, types, node --test, the packages installed outside the repository)"
(
  cd bindings/node
  npm ci --no-audit --no-fund --loglevel=error
  npx napi build --platform --release --strip --js index.js --dts index.d.ts
  if git -C "$root" rev-parse --git-dir >/dev/null 2>&1 &&
     ! git -C "$root" diff --quiet -- bindings/node/index.js bindings/node/index.d.ts; then
    echo "bindings/node/index.js or index.d.ts is stale: commit what 'npm run build' generated" >&2
    git -C "$root" diff --stat -- bindings/node/index.js bindings/node/index.d.ts >&2
    exit 1
  fi
  npx tsc -p tsconfig.json            # the published types stand alone (no @types/node)
  npx tsc -p tsconfig.nodetypes.json  # and agree with @types/node
  NETSWAP_SERVER_BIN="$root/target/release/netswap-server" node --test __test__/
  ./test-package.sh "$root/target/release/netswap-server"
)

step "benchmarks compile"
cargo bench --workspace --no-run --quiet

step "all tests passed"
