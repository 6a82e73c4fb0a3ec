#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine (as root) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -ra "$@"
