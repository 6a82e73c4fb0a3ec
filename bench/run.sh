#!/usr/bin/env bash
# One command for the benchmarks: install what they need, then run them and write
# docs/benchmarks.md.   bench/run.sh [--quick | --smoke] [--rev REV] [--only SUITES] [--output FILE]
# Uses $PYTHON if set, else the checkout's .venv (bench/setup.sh makes it through scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench/run.sh: run as root (mounts, network namespaces, drop_caches)" >&2; exit 2; }
bash bench/setup.sh
PYTHON=${PYTHON:-.venv/bin/python}
BENCH_COMMAND="bench/run.sh${*:+ $*}" exec "$PYTHON" -m bench "$@"
