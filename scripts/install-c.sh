#!/usr/bin/env bash
# Installs the C library under a prefix, the way Rust-built C libraries install (as
# cargo-c's `cargo cinstall` lays them out):
#
#   PREFIX/include/netswap/netswap.h
#   PREFIX/lib/libnetswap.so.0.1.0, libnetswap.so.0 and libnetswap.so (soname libnetswap.so.0)
#   PREFIX/lib/libnetswap.a
#   PREFIX/lib/pkgconfig/netswap.pc          shared; Libs.private for `pkg-config --static`
#   PREFIX/lib/pkgconfig/netswap-static.pc   links libnetswap.a and what it needs
#
# Then, from any folder:
#   cc app.c $(pkg-config --cflags --libs netswap)          # shared
#   cc app.c $(pkg-config --cflags --libs netswap-static)   # static
# (with PKG_CONFIG_PATH=PREFIX/lib/pkgconfig when PREFIX is not a system prefix).
#
# Usage: scripts/install-c.sh PREFIX        (DESTDIR is honoured, for packagers)
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=${1:?usage: scripts/install-c.sh PREFIX}
case "$prefix" in /*) ;; *) prefix="$(pwd)/$prefix" ;; esac
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
major=${version%%.*}
dest="${DESTDIR:-}$prefix"

# The shared library carries its soname (flags for this crate only: the dependencies
# of the release build are reused); rustc says what the static library needs.
cargo rustc --release --quiet -p netswap-ffi --lib --crate-type cdylib -- \
  -C "link-arg=-Wl,-soname,libnetswap.so.$major"
cp target/release/libnetswap.so target/release/libnetswap.so.install
# Put back the library as cargo builds it (no soname): the C tests of `cargo test
# --release` link against target/release/libnetswap.so, and with the soname they
# looked for a libnetswap.so.0 that is not there.
cargo build --release --quiet -p netswap-ffi --lib
libs_private=$(cargo rustc --release --quiet -p netswap-ffi --lib --crate-type staticlib -- \
  --print native-static-libs 2>&1 | sed -n 's/.*native-static-libs: //p' | tail -1)
[ -n "$libs_private" ] || { echo "rustc did not say what the static library needs" >&2; exit 1; }

install -d "$dest/include/netswap" "$dest/lib/pkgconfig"
install -m 0644 include/netswap.h "$dest/include/netswap/netswap.h"
install -m 0755 target/release/libnetswap.so.install "$dest/lib/libnetswap.so.$version"
rm target/release/libnetswap.so.install
ln -sf "libnetswap.so.$version" "$dest/lib/libnetswap.so.$major"
ln -sf "libnetswap.so.$major" "$dest/lib/libnetswap.so"
install -m 0644 target/release/libnetswap.a "$dest/lib/libnetswap.a"

cat >"$dest/lib/pkgconfig/netswap.pc" <<EOF
prefix=$prefix
exec_prefix=\${prefix}
libdir=\${exec_prefix}/lib
includedir=\${prefix}/include

Name: netswap
Description: C client of netswap, swap space over the network
Version: $version
Libs: -L\${libdir} -lnetswap
Libs.private: $libs_private
Cflags: -I\${includedir}/netswap
EOF
cat >"$dest/lib/pkgconfig/netswap-static.pc" <<EOF
prefix=$prefix
exec_prefix=\${prefix}
libdir=\${exec_prefix}/lib
includedir=\${prefix}/include

Name: netswap-static
Description: C client of netswap, swap space over the network (linked statically)
Version: $version
Libs: \${libdir}/libnetswap.a $libs_private
Cflags: -I\${includedir}/netswap
EOF
echo "installed netswap $version under $dest (pkg-config: netswap, netswap-static)"
