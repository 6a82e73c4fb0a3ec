"""Benchmarks: imagefs beside the tools people use today (see bench/README.md; run python -m bench)."""
