#!/usr/bin/env bash
# Rebuilds third_party/redis: the `redis` crate as published on crates.io, with the
# patches in third_party/patches/ applied (third_party/README.md says why). Run it
# when moving to a new release of the crate, or with --check to verify that the
# committed copy is exactly the published crate plus the patches.
#
#   scripts/vendor-redis.sh          # download, verify, strip, patch, replace the copy
#   scripts/vendor-redis.sh --check  # the same into a temporary directory, then diff
set -euo pipefail

VERSION=1.8.2
# The checksum crates.io publishes for redis 1.8.2 (the one Cargo.lock had for it).
SHA256=4bef8fa589dd53a8a379a7856de1365d0a1be50c6b8aebb5c01c1ec441a2c509

root=$(cd "$(dirname "$0")/.." && pwd)
dest=$root/third_party/redis
check=0
if [[ ${1:-} == --check ]]; then check=1; fi

work=$(mktemp -d /tmp/netswap-vendor-redis.XXXXXX)
trap 'rm -rf "$work"' EXIT

curl -fsSL -o "$work/redis.crate" "https://static.crates.io/crates/redis/redis-$VERSION.crate"
echo "$SHA256  $work/redis.crate" | sha256sum -c --quiet -
tar xzf "$work/redis.crate" -C "$work"
src=$work/redis-$VERSION
out=$work/redis
mkdir -p "$out"
cp -r "$src/src" "$src/LICENSE" "$src/README.md" "$out/"

# The crate's tests, benches and examples are not shipped here: drop their targets
# and the dev-dependencies they need from the manifest, keep everything else as is.
python3 - "$src/Cargo.toml" "$out/Cargo.toml" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
# Split into sections at each table header; keep the preamble.
parts = re.split(r'(?m)^(?=\[)', text)
dropped = re.compile(r'^\[\[(example|test|bench)\]\]|^\[dev-dependencies[.\]]|^\[target\.[^\]]*\.dev-dependencies')
kept = [p for p in parts if not dropped.match(p)]
open(sys.argv[2], 'w').write(''.join(kept))
EOF

for patch in "$root"/third_party/patches/redis-*.patch; do
    patch --quiet -p1 -d "$out" < "$patch"
done

if (( check )); then
    diff -r "$out" "$dest" && echo "third_party/redis is redis $VERSION plus third_party/patches"
else
    rm -rf "$dest"
    cp -r "$out" "$dest"
    echo "third_party/redis: redis $VERSION plus $(ls "$root"/third_party/patches/redis-*.patch | wc -l) patch(es)"
fi
