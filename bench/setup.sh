#!/usr/bin/env bash
# Installs what the benchmarks need beyond scripts/setup.sh, on Debian 12, as root. Idempotent.
# debootstrap builds the Debian image; fuse-overlayfs and bubblewrap are peers; strace traces the
# workloads; skopeo, umoci, crun and docker-registry are shared with the tests.
set -euo pipefail
PACKAGES=(debootstrap fuse-overlayfs bubblewrap strace skopeo umoci crun docker-registry iproute2 fuse3 tar gzip findutils util-linux)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "bench/setup.sh: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
