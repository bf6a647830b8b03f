#!/usr/bin/env bash
# Side-by-side benchmark of netswap, Redis and memcached on loopback, in one run.
# Installs redis-server, redis-tools and memcached from Debian if
# missing, builds netswap in release mode, then runs scripts/bench/compare.py (which
# starts and stops every server itself). Arguments go to compare.py, e.g. --quick.
set -euo pipefail
cd "$(dirname "$0")/../.."
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-benchmark >/dev/null || missing+=(redis-tools)
command -v memcached >/dev/null || missing+=(memcached)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null
fi
cargo build --release --quiet -p netswap-server -p netswap-cli
exec python3 scripts/bench/compare.py "$@"
