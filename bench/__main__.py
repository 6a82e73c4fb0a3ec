"""python -m bench [--smoke | --quick] [--output FILE] [--only SUITE,...]: run and write the report.

Modes: full (the Debian+numpy image, 100 Mbit/s and 1 Gbit/s, < 30 min once the cache is built),
--quick (the Debian+python image, 1 Gbit/s only, < 3 min), --smoke (busybox, a loopback registry,
one run: for tests/test_bench_smoke.py). Results go to docs/benchmarks.md (--output to change) and,
raw, to bench/.cache/last-results.json. Needs root (mounts, namespaces, drop_caches).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shlex
import signal
import sys
import time
from pathlib import Path

from bench.context import MODES, Context
from bench.images import Cache
from bench.report import now, render
from bench.system import REPO, code_state, machine, tool_versions, use_rev

log = logging.getLogger("bench")

SUITES = ("index", "reads", "cold", "launch")


def _suite(name: str):
    if name == "index":
        from bench import index_bench as module
    elif name == "reads":
        from bench import reads as module
    elif name == "cold":
        from bench import cold as module
    else:
        from bench import launch as module
    return module


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_const", dest="mode", const="quick")
    g.add_argument("--smoke", action="store_const", dest="mode", const="smoke")
    p.set_defaults(mode="full")
    p.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    p.add_argument("--cache", type=Path, default=None, help="image cache (default bench/.cache)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch space (default a new /var/tmp/imagefs-bench-*)")
    p.add_argument("--only", default=",".join(SUITES), help=f"comma-separated subset of {','.join(SUITES)}")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory afterwards")
    p.add_argument("--rev", default=None,
                   help="measure this git revision (exported with git archive) instead of the working tree")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="bench %(relativeCreated)6.0fms: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if os.geteuid() != 0:
        print("bench: needs root (mounts, network namespaces, drop_caches)", file=sys.stderr)
        return 2
    mode = MODES[args.mode]
    suites = [s for s in args.only.split(",") if s]
    unknown = set(suites) - set(SUITES)
    if unknown:
        print(f"bench: unknown suite(s) {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    cache = Cache(args.cache) if args.cache else Cache()
    command = os.environ.get("BENCH_COMMAND") or "python -m bench " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    load_before = os.getloadavg()
    started = time.monotonic()
    # Build what the mode needs before timing anything.
    for tag in (mode.image, mode.reads_image):
        image = cache.image(tag)
        cache.merged(image)
    ctx = Context.create(mode, cache, args.workdir)
    ctx.keep_workdir = args.keep
    # SIGTERM/SIGHUP unwind like Ctrl-C, so the finally below cleans up.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    # Container cgroups of this run go below a root of its own (beneath our own cgroup), removed
    # at the end: a run never leaves an imagefs cgroup behind.
    os.environ["IMAGEFS_CGROUP_ROOT"] = f"imagefs-bench-{secrets.token_hex(4)}"
    try:
        if args.rev:
            use_rev(args.rev, ctx.workdir / "code")
        code_before = code_state()
        for name in SUITES:
            if name in suites:
                log.info("== %s", name)
                _suite(name).run(ctx)
        link = ctx.link
        link_text = _link_text(mode, link)
    finally:
        ctx.close()
        _remove_cgroup_root(os.environ.pop("IMAGEFS_CGROUP_ROOT"))
    code_after = code_state()
    code = code_before if code_after == code_before else f"at the start {code_before}; at the end {code_after}"
    meta = {"date": now(), "machine": machine(), "command": command, "mode": mode.name, "runs": mode.runs,
            "elapsed": time.monotonic() - started, "link": link_text, "tools": tool_versions(),
            "images": _images_text(cache, mode), "code": code,
            "load": f"{load_before[0]:.2f} when it started"}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(meta, ctx.rows, ctx.notes))
    raw = cache.root / f"last-results-{mode.name}.json"
    raw.write_text(json.dumps({"meta": meta, "rows": [r.to_json() for r in ctx.rows], "notes": ctx.notes},
                              indent=1))
    log.info("wrote %s (raw: %s) in %.0f s", args.output, raw, time.monotonic() - started)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _link_text(mode, link) -> str:
    if link is None:
        return "not used"
    if not mode.slow_link:
        return "docker-registry on 127.0.0.1 behind the counting proxy; no rate limit, no delay (smoke)"
    from bench.link import SlowLink

    assert isinstance(link, SlowLink)
    rates = ", ".join(r for r in mode.rates if r)
    return (f"docker-registry (distribution 2.8) in network namespace `imagefs-bench-…`, over a veth pair "
            f"in a private /30 of 198.18.0.0/15, `tbf` at {rates} on both ends; a TCP proxy on 127.0.0.1 "
            f"adds {mode.rtt * 1000:.0f} ms round-trip time and counts bytes")


def _images_text(cache: Cache, mode) -> str:
    parts = []
    for tag in (mode.image, mode.reads_image):
        image = cache.image(tag)
        layers = ", ".join(f"{l.size / 1e6:.1f}/{l.tar_size / 1e6:.0f}" for l in image.layers)
        parts.append(f"`{tag}` {len(image.layers)} gzip layers, {image.compressed_size / 1e6:.0f} MB gzip / "
                     f"{image.tar_size / 1e6:.0f} MB tar (per layer MB gzip/tar: {layers})")
    return "; ".join(parts) + ". Debian bookworm minbase from debootstrap, python3 and python3-numpy by apt in " \
                              "a chroot, one layer per stage; busybox from tests/support; data layers generated."


def _remove_cgroup_root(name: str) -> None:
    """rmdir the run's (empty) container cgroups and their root, deepest first."""
    from launcher.linux.cgroups import CgroupRoot, detect_layout

    try:
        root = CgroupRoot.resolve(detect_layout(), name)
    except Exception:  # no cgroups on this machine: nothing was made
        return
    for directory in set(root.dirs.values()):
        for dirpath, _, _ in sorted(os.walk(directory), key=lambda w: -len(w[0])):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main())

