#!/usr/bin/env bash
# Installs everything imagefs and its tests need on Debian 12, as root. Idempotent: a second run
# installs nothing new. Leaves a virtualenv with imagefs in .venv/ of the checkout.
# Arguments name more Debian packages to install the same way (bench/setup.sh uses that).
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: FUSE (runtime + headers to build pyfuse3), the registry and image tools the tests
# talk to, busybox-static for test images, openssl/htpasswd for TLS and basic-auth registries,
# crun/iproute2 for the launcher's peers and network namespaces.
PACKAGES=(python3 python3-venv python3-dev gcc pkg-config fuse3 libfuse3-dev docker-registry skopeo umoci
          busybox-static openssl apache2-utils iproute2 crun util-linux procps ca-certificates "$@")
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's docker-registry package starts a registry on :5000 where an init system runs; ours start
# their own on free loopback ports, so that one is not needed (and not touched here).

if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv .venv
fi
stamp=.venv/.imagefs-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    # pip's output goes to a log, shown only if it fails: CI logs stay readable.
    if ! { .venv/bin/pip install --upgrade pip && .venv/bin/pip install -e '.[test]'; } >.venv/pip.log 2>&1; then
        cat .venv/pip.log >&2
        exit 1
    fi
    touch "$stamp"
fi
