#!/usr/bin/env bash
# Regenerate the eStargz fixture in tests/data/estargz/ with the reference converter
# (`ctr-remote image convert --estargz`, Debian package stargz-snapshotter) run against a
# private, throw-away containerd. One-off generator for a dev machine; CI uses the committed
# output. Needs: apt-get install -y containerd stargz-snapshotter (and root).
#
#   bash tests/data/estargz/make.sh
#
# Output (replaced wholesale): layout/ (OCI image layout, tag "1"), toc-layer<N>.json.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
PY=/usr/bin/python3
NS=fixture
SRC_REF=example.com/src:1
DST_REF=example.com/estargz:1
CHUNK=65536

for tool in containerd ctr ctr-remote tar "$PY"; do
    command -v "$tool" >/dev/null || { echo "make.sh: missing $tool (apt-get install -y containerd stargz-snapshotter)" >&2; exit 1; }
done

T=$(mktemp -d /tmp/estargz-fixture.XXXXXX)
CPID=""
cleanup() {
    local rc=$?
    set +e
    if [ -n "$CPID" ] && kill -0 "$CPID" 2>/dev/null; then
        kill -TERM "$CPID"
        for _ in $(seq 100); do kill -0 "$CPID" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$CPID" 2>/dev/null && kill -KILL "$CPID"
        wait "$CPID" 2>/dev/null
    fi
    # containerd should mount nothing for import (--no-unpack), convert and export; be safe anyway.
    grep -F " $T/" /proc/self/mounts | awk '{print $2}' | sort -r | while read -r mnt; do umount -l "$mnt"; done
    rm -rf "$T"
    if [ "$rc" -ne 0 ]; then
        echo "make.sh: failed (rc=$rc)" >&2
        [ -f "$T.log" ] && tail -n 30 "$T.log" >&2
    fi
    rm -f "$T.log"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 1. Source image: an OCI layout with two plain gzip layers, built with tests/support/images.py.
mkdir "$T/src"
PYTHONPATH="$REPO" "$PY" - "$T/src" <<'PYEOF'
import random, sys, types
from pathlib import Path
try:
    import zstandard  # noqa: F401  (images.py imports it; only its zstd path uses it)
except ImportError:
    sys.modules["zstandard"] = types.ModuleType("zstandard")
from tests.support.images import FIXED_MTIME, Member, OciLayout, layer_tar

big = random.Random(7).randbytes(300 * 1024)
text = b"".join(b"line %05d: the quick brown fox jumps over the lazy dog\n" % i for i in range(3700))
layer1 = [
    Member("etc", "dir"),
    Member("etc/hostname", data=b"fixture\n"),
    Member("etc/empty"),
    Member("etc/owned.conf", data=b"owner=1000\n", uid=1000, gid=1000, mode=0o640,
           mtime=FIXED_MTIME + 0.5, uname="user", gname="user"),
    Member("etc/xattr.txt", data=b"has an xattr\n", xattrs={"user.test": b"hello"}),
    Member("etc/fifo", "fifo"),
    Member("bin", "dir"),
    Member("bin/hello", data=b"#!/bin/sh\necho hello from estargz\n", mode=0o755),
    Member("usr", "dir"),
    Member("usr/lib", "dir"),
    Member("usr/lib/big.bin", data=big),
    Member("usr/lib/text.txt", data=text),
    Member("usr/lib/link", "symlink", linkname="text.txt"),
    Member("usr/lib/hard", "hardlink", linkname="usr/lib/text.txt"),
    Member("var", "dir"),
    Member("var/cache", "dir"),
    Member("var/cache/old.txt", data=b"hidden by the opaque dir in layer 2\n"),
]
layer2 = [
    Member("etc", "dir"),
    Member("etc/.wh.hostname"),
    Member("etc/new.txt", data=b"added in layer 2\n"),
    Member("var", "dir"),
    Member("var/cache", "dir"),
    Member("var/cache/.wh..wh..opq"),
    Member("var/cache/fresh.txt", data=b"only file left in var/cache\n"),
]
layout = OciLayout(Path(sys.argv[1]))
layout.add_image([(layer_tar(layer1), "gzip"), (layer_tar(layer2), "gzip")], tag="1",
                 config={"Cmd": ["/bin/hello"]})
PYEOF
tar -C "$T/src" -cf "$T/src.tar" .

# 2. A private containerd: own root, state, socket and config; nothing from /etc/containerd.
cat > "$T/config.toml" <<EOF2
version = 2
root = "$T/root"
state = "$T/state"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]
[grpc]
  address = "$T/c.sock"
EOF2
containerd --config "$T/config.toml" --root "$T/root" --state "$T/state" --address "$T/c.sock" >"$T.log" 2>&1 &
CPID=$!
CTR=(ctr --address "$T/c.sock" --namespace "$NS")
ready=""
for _ in $(seq 100); do
    if ctr --address "$T/c.sock" version >/dev/null 2>&1; then ready=1; break; fi
    kill -0 "$CPID" 2>/dev/null || { echo "make.sh: containerd exited" >&2; exit 1; }
    sleep 0.1
done
[ -n "$ready" ] || { echo "make.sh: containerd socket never answered" >&2; exit 1; }

# 3. Import (no unpack: no snapshots, no mounts), convert, export.
"${CTR[@]}" images import --no-unpack --base-name "${SRC_REF%:*}" "$T/src.tar"
"${CTR[@]}" images ls
ctr-remote --address "$T/c.sock" --namespace "$NS" image convert --oci --estargz \
    --estargz-chunk-size "$CHUNK" "$SRC_REF" "$DST_REF"
"${CTR[@]}" images export --skip-manifest-json "$T/out.tar" "$DST_REF"

# 4. Replace layout/ with the exported archive and write the TOC dumps.
rm -rf "$HERE/layout" "$HERE"/toc-layer*.json
mkdir "$HERE/layout"
tar -C "$HERE/layout" -xf "$T/out.tar"
rm -f "$HERE/layout/manifest.json"  # docker-style extra: ctr 1.6.20 writes it despite --skip-manifest-json
chmod -R u+w,go-w "$HERE/layout"
"$PY" "$HERE/check.py" "$HERE/layout" 1 "$HERE"

# 5. Stop containerd now (the trap would too) and prove nothing is left mounted.
kill -TERM "$CPID"; wait "$CPID" || true; CPID=""
if grep -F "$T" /proc/self/mounts; then echo "make.sh: mounts left under $T" >&2; exit 1; fi
echo "make.sh: fixture written to $HERE"
