#!/usr/bin/env bash
# Assembles the Unity package (UPM) com.netswap.client into DEST: the committed template
# (package.json, the .asmdef, import settings), the C# sources of bindings/csharp/src
# (one copy of the code: they are copied here, not kept twice), and the native library
# under Plugins/x86_64 with import settings for the Linux editor and players. Then checks
# what Unity will read: the manifest and the .asmdef parse, every asset has a .meta with
# a unique GUID, the plugin is enabled for Linux x86_64, and the sources compile as the
# assembly the .asmdef defines (unsafe code on, no UnityEngine reference).
#
# Usage: bindings/unity/assemble.sh DEST [NATIVE_LIB]   (default: target/release/libnetswap.so)
# In Unity: Package Manager > Add package from disk > DEST/package.json.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
dest=$1
lib=${2:-$root/target/release/libnetswap.so}
[ -f "$lib" ] || { echo "no native library at $lib: cargo build --release -p netswap-ffi" >&2; exit 1; }

rm -rf "$dest"
mkdir -p "$dest"
cp -r "$here/template/." "$dest/"
cp "$here/README.md" "$dest/README.md"
for f in "$root"/bindings/csharp/src/*.cs; do
  name=$(basename "$f")
  cp "$f" "$dest/Runtime/$name"
  # A stable GUID per file, so that re-assembling does not break references.
  guid=$(printf 'com.netswap.client/Runtime/%s' "$name" | md5sum | cut -c1-32)
  printf 'fileFormatVersion: 2\nguid: %s\nMonoImporter:\n  externalObjects: {}\n  serializedVersion: 2\n  defaultReferences: []\n  executionOrder: 0\n  icon: {instanceID: 0}\n  userData:\n  assetBundleName:\n  assetBundleVariant:\n' "$guid" >"$dest/Runtime/$name.meta"
done
guid=$(printf 'com.netswap.client/README.md' | md5sum | cut -c1-32)
printf 'fileFormatVersion: 2\nguid: %s\nTextScriptImporter:\n  externalObjects: {}\n  userData:\n  assetBundleName:\n  assetBundleVariant:\n' "$guid" >"$dest/README.md.meta"
cp "$lib" "$dest/Plugins/x86_64/libnetswap.so"

python3 - "$dest" <<'PY'
import json, pathlib, re, sys
dest = pathlib.Path(sys.argv[1])
manifest = json.loads((dest / "package.json").read_text())
assert re.fullmatch(r"com\.[a-z0-9-]+\.[a-z0-9.-]+", manifest["name"]), manifest["name"]
assert re.fullmatch(r"\d+\.\d+\.\d+", manifest["version"])
assert re.fullmatch(r"\d{4}\.\d", manifest["unity"])
asmdef = json.loads((dest / "Runtime/Netswap.asmdef").read_text())
assert asmdef["allowUnsafeCode"] is True and asmdef["name"] == "Netswap"
guids = {}
for p in sorted(dest.rglob("*")):
    if p.suffix == ".meta":
        continue
    meta = p.with_name(p.name + ".meta")
    assert meta.exists(), f"{p.relative_to(dest)} has no .meta"
    guid = re.search(r"^guid: ([0-9a-f]{32})$", meta.read_text(), re.M).group(1)
    assert guid not in guids, f"GUID of {p} repeats {guids.get(guid)}"
    guids[guid] = p
plugin = (dest / "Plugins/x86_64/libnetswap.so.meta").read_text()
assert re.search(r"Standalone: Linux64\n    second:\n      enabled: 1", plugin), "not enabled for Linux players"
assert re.search(r"Editor: Editor\n    second:\n      enabled: 1", plugin), "not enabled for the editor"
print(f"Unity package: {len(guids)} assets with .meta, manifest {manifest['name']}@{manifest['version']}")
PY
mcs -target:library -langversion:7.2 -unsafe -warnaserror \
    -out:"$(mktemp -d)/Netswap.dll" "$dest"/Runtime/*.cs
echo "Unity package assembled in $dest (its sources compile as the Netswap assembly)"
