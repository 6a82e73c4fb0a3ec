"""python -m bench.devloop: a few cold `imagefs run` starts over the slow link, for quick A/B work.

Not a benchmark (nothing is written to docs/): the cold suite's set-up (full mode's image and
link) without its peers, so that a change to the start path can be tried in a minute or two.

    python -m bench.devloop [--variant published,profile,estargz-prio] [--runs 3] [--rate 100mbit]
                            [--workload print42] [--log-dir DIR] [--agent]

Variants: `published` (indexes published with `imagefs index --push`), `profile` (indexes and an
access profile recorded by one untimed run), `estargz` / `estargz-prio` (the layers rewritten as
eStargz, plain / with the recorded profile as prioritized files). Runs alternate between the
variants. With --log-dir each run's `-vv` output is kept there (the timings then include the
logging). Needs root, like the bench; undoes everything it set up.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.__main__ import _remove_cgroup_root
from bench.cold import _recorded_profile, floor
from bench.context import MODES, Context
from bench.images import Cache
from bench.system import CODE
from bench.workload import WORKLOADS, Trace

log = logging.getLogger("bench")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.devloop", description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="published,profile")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rate", default="100mbit")
    p.add_argument("--workload", default="print42", choices=sorted(WORKLOADS))
    p.add_argument("--log-dir", type=Path, default=None)
    p.add_argument("--agent", action="store_true", help="each run through an `imagefs agent` started before it")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="devloop %(relativeCreated)6.0fms: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    mode = MODES["full"]
    cache = Cache()
    image = cache.image(mode.image)
    merged = cache.merged(image)
    workload = WORKLOADS[args.workload]
    trace = Trace.load_or_make(cache, image, merged, workload)
    variants = [v for v in args.variant.split(",") if v]
    ctx = Context.create(mode, cache)
    os.environ["IMAGEFS_CGROUP_ROOT"] = f"imagefs-devloop-{secrets.token_hex(4)}"
    try:
        link = ctx.get_link()
        link.set_rate(None)
        repos = _prepare(ctx, image, workload, variants)
        f_seconds, f_bytes = floor(ctx, trace, args.rate)
        link.set_rate(args.rate)
        samples: dict[str, list[tuple[float, int]]] = {v: [] for v in variants}
        for i in range(args.runs):
            for variant in variants:
                cli = ctx.fresh_imagefs(f"run-{variant}")
                argv = cli.argv(*(["-vv"] if args.log_dir else []), "run", "--network", "none",
                                link.ref(repos[variant]), "--", *workload.argv)
                agent_log = args.log_dir / f"{variant}-{i + 1}-agent.log" if args.log_dir else None
                if agent_log:
                    args.log_dir.mkdir(parents=True, exist_ok=True)
                with cli.agent(agent_log) if args.agent else contextlib.nullcontext():
                    ctx.cold()
                    before = link.counters()
                    start = time.perf_counter()
                    r = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=CODE.dir,
                                       env=CODE.env(), timeout=600)
                    elapsed = time.perf_counter() - start
                down = (link.counters() - before).down
                if r.returncode != 0:
                    log.warning("%s run %d: exit %d: %s", variant, i + 1, r.returncode, r.stderr[-2000:])
                if args.log_dir:
                    args.log_dir.mkdir(parents=True, exist_ok=True)
                    (args.log_dir / f"{variant}-{i + 1}.log").write_text(r.stderr)
                    for server_log in cli.work.glob("run/mounts/*.log"):  # the mount servers' own
                        (args.log_dir / f"{variant}-{i + 1}-{server_log.name}").write_bytes(server_log.read_bytes())
                samples[variant].append((elapsed, down))
                log.info("%s run %d: %.3f s %.2f MB", variant, i + 1, elapsed, down / 1e6)
                ctx.unmount_below(cli.store.parent)
                ctx.discard(cli.store.parent)
        print(f"floor: {f_seconds:.3f} s {f_bytes / 1e6:.2f} MB ({args.workload}, {args.rate})")
        for variant, got in samples.items():
            t = statistics.median(s for s, _ in got)
            b = statistics.median(b for _, b in got)
            print(f"{variant:14} median {t:.3f} s ({min(s for s, _ in got):.3f}-{max(s for s, _ in got):.3f}) "
                  f"{b / 1e6:.2f} MB = {b / f_bytes:.2f} floors (bytes), {t / f_seconds:.2f} floors (time)")
    finally:
        ctx.close()
        _remove_cgroup_root(os.environ.pop("IMAGEFS_CGROUP_ROOT"))
    return 0


def _prepare(ctx: Context, image, workload, variants: list[str]) -> dict[str, str]:
    """Push what the variants need (untimed); returns variant -> tag or repository to run."""
    link = ctx.get_link()
    repos: dict[str, str] = {}
    profile: list[str] = []
    if any(v in ("profile", "estargz-prio") for v in variants):
        repo = f"{image.tag}-profiled-{workload.name}"
        link.push(ctx.cache.layout, image.tag, repo=repo)
        recorder = ctx.fresh_imagefs("record")
        recorder("run", "--network", "none", link.ref(repo), "--", *workload.argv)
        ctx.unmount_below(recorder.store.parent)
        recorder("index", "--push", link.ref(repo))
        profile = _recorded_profile(recorder)
        ctx.discard(recorder.store.parent)
        repos["profile"] = repo
    if "published" in variants:
        ctx.pushed(image.tag)
        ctx.fresh_imagefs("publish")("index", "--push", link.ref(image.tag))
        repos["published"] = image.tag
    if "estargz" in variants:
        plain = ctx.cache.estargz(image, f"{image.tag}-estargz")
        link.push(ctx.cache.layout, plain.tag)
        repos["estargz"] = plain.tag
    if "estargz-prio" in variants:
        tag = f"{image.tag}-estargz-{workload.name}"
        ctx.cache.estargz(image, tag, profile)
        link.push(ctx.cache.layout, tag)
        repos["estargz-prio"] = tag
    unknown = set(variants) - set(repos)
    if unknown:
        raise SystemExit(f"devloop: unknown variant(s) {', '.join(sorted(unknown))}")
    return repos


if __name__ == "__main__":
    sys.exit(main())
