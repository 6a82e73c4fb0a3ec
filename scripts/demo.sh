#!/usr/bin/env bash
# The main job, from nothing on a fresh Debian 12 machine (as root): install, start a local
# registry on 127.0.0.1, push a demo image to it, pull it lazily with imagefs, look inside it
# through a lazy mount, and run tasks in it (each on its own overlay above one shared mount).
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
cleanup() {
    imagefs umount "$DEMO_DIR/mnt" 2>/dev/null || true
    imagefs recover >/dev/null 2>&1 || true
    kill $registry_pid 2>/dev/null; wait $registry_pid 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 100); do
    .venv/bin/python -c "import httpx,sys; httpx.get('http://127.0.0.1:$port/v2/', timeout=1)" 2>/dev/null && break
    kill -0 $registry_pid || { cat "$reg/log"; exit 1; }
    sleep 0.1
done

ref="docker://127.0.0.1:$port/demo/busybox:latest"
echo "== registry on 127.0.0.1:$port; pushing the demo image"
PYTHONPATH="$PWD" .venv/bin/python scripts/demo_image.py "$DEMO_DIR/layout" "$ref"
echo "== imagefs pull $ref"
imagefs pull "$ref"
echo "== imagefs images"
imagefs images
echo "== imagefs inspect"
imagefs inspect "$ref"
echo "== imagefs mount (lazy, read-only): what is inside"
mkdir -p "$DEMO_DIR/mnt"
imagefs mount "$ref" "$DEMO_DIR/mnt"
ls -l "$DEMO_DIR/mnt" "$DEMO_DIR/mnt/app"
cat "$DEMO_DIR/mnt/etc/motd"
imagefs umount "$DEMO_DIR/mnt"
echo "== imagefs run: the image's own command, then one of ours with limits"
imagefs run --hostname demo-task "$ref"
imagefs run --hostname demo-task --memory 64m --cpus 0.5 --pids 32 "$ref" -- \
    sh -c 'echo "pid $$ on $(hostname)"; ls /sys/class/net; cat /etc/motd; echo saved > $MESOS_SANDBOX/out'
imagefs ps
echo "== bytes of the image's layers on this machine (lazily fetched):"
imagefs inspect "$ref" | grep -E '^Size'
