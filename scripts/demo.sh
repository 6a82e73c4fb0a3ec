#!/usr/bin/env bash
# The main job, from nothing on a fresh Debian 12 machine (as root): install, start a local
# registry on 127.0.0.1, push a demo image to it, pull it with imagefs and show it.
# Everything it starts is stopped on exit; its store stays in $DEMO_DIR for a look afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DEMO_DIR=${DEMO_DIR:-/var/tmp/imagefs-demo}
mkdir -p "$DEMO_DIR"
imagefs() { .venv/bin/imagefs --store "$DEMO_DIR/store" --work-dir "$DEMO_DIR/work" "$@"; }

port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
reg="$DEMO_DIR/registry"
rm -rf "$reg" "$DEMO_DIR/layout"
mkdir -p "$reg"
cat > "$reg/config.yml" <<YAML
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $reg/storage}}
http: {addr: "127.0.0.1:$port", secret: imagefs-demo}
YAML
/usr/bin/docker-registry serve "$reg/config.yml" >"$reg/log" 2>&1 &
registry_pid=$!
trap 'kill $registry_pid 2>/dev/null; wait $registry_pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    .venv/bin/python -c "import httpx,sys; httpx.get('http://127.0.0.1:$port/v2/', timeout=1)" 2>/dev/null && break
    kill -0 $registry_pid || { cat "$reg/log"; exit 1; }
    sleep 0.1
done

ref="docker://127.0.0.1:$port/demo/busybox:latest"
echo "== registry on 127.0.0.1:$port; pushing the demo image"
.venv/bin/python scripts/demo_image.py "$DEMO_DIR/layout" "$ref"
echo "== imagefs pull $ref"
imagefs pull "$ref"
echo "== imagefs images"
imagefs images
echo "== imagefs inspect"
imagefs inspect "$ref"
