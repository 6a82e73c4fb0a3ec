#!/usr/bin/env bash
# Installs what the benchmarks need beyond the tests, on Debian 12, as root. Idempotent.
# debootstrap builds the Debian image; fuse-overlayfs and bubblewrap are peers; strace traces the
# workloads. The rest (skopeo, umoci, crun, docker-registry, the venv) comes with scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash scripts/setup.sh debootstrap fuse-overlayfs bubblewrap strace tar gzip findutils
