"""3. Reads: one big file (sequential, random 4 KiB) and a tree walk, first and second pass.

Backends, all over the same image (the mode's reads image: the workload image plus a data layer):
imagefs (a fresh mount server of a store holding the indexes; layer bytes come from the local OCI
layout, so no network), kernel overlayfs and fuse-overlayfs over the layers extracted in overlay
format, and the plain merged directory. Each sample: mount fresh, drop caches, pass one, pass two,
unmount. The backends take turns within each run so drift on the machine hits them alike.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from bench.context import Context
from bench.results import Row
from bench.system import timed

log = logging.getLogger("bench")

PEERS = ("kernel overlayfs", "fuse-overlayfs", "plain directory")


def _sequential(path: Path) -> Callable[[], object]:
    def go() -> int:
        buf = bytearray(1 << 20)
        total = 0
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
        return total
    return go


def _random(path: Path, count: int) -> Callable[[], object]:
    size = os.path.getsize(path)
    rng = random.Random(4096)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(count)]

    def go() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            for off in offsets:
                os.pread(fd, 4096, off)
        finally:
            os.close(fd)
    return go


def _walk(root: Path) -> Callable[[], object]:
    def go() -> None:
        subprocess.run(["find", str(root), "-printf", "%p %s %m %T@\n"], stdout=subprocess.DEVNULL, check=True)
    return go


def ensure_local_store(ctx: Context) -> None:
    if ctx.local_store is None:
        cli = ctx.fresh_imagefs("reads-store")
        cli("pull", ctx.image(ctx.mode.reads_image).ref)
        ctx.local_store = cli


def run(ctx: Context) -> None:
    image = ctx.image(ctx.mode.reads_image)
    lowers = ctx.cache.extracted(image)
    merged = ctx.cache.merged(image)
    ensure_local_store(ctx)
    assert ctx.local_store is not None
    data_rel = next(p for p in (merged / "data").iterdir()).relative_to(merged)
    size_mib = (merged / data_rel).stat().st_size >> 20
    file_label = f"{size_mib} MiB file" if size_mib < 1024 else f"{size_mib >> 10} GiB file"

    backends = {"imagefs": lambda mp: ctx.mounts.imagefs(ctx.local_store, image.ref, mp),
                "kernel overlayfs": lambda mp: ctx.mounts.overlay(lowers, mp),
                "fuse-overlayfs": lambda mp: ctx.mounts.fuse_overlayfs(lowers, mp),
                "plain directory": None}
    if shutil.which("fuse-overlayfs") is None:
        del backends["fuse-overlayfs"]
        ctx.note("reads", "fuse-overlayfs is not installed (apt-get install fuse-overlayfs): its rows are missing.")

    tests = [("sequential read", f"sequential read of a {file_label} (1 MiB reads)", lambda r: _sequential(r / data_rel)),
             ("random read", f"{ctx.mode.random_reads} random 4 KiB reads of the {file_label}",
              lambda r: _random(r / data_rel, ctx.mode.random_reads)),
             ("tree walk", "tree walk, `find -printf` (stat of every entry)", lambda r: _walk(r))]
    for key, label, make in tests:
        samples: dict[str, list[list[float]]] = {b: [[], []] for b in backends}
        for i in range(ctx.mode.runs):
            for name, mount in backends.items():
                mp = ctx.fresh_dir("mnt")
                root = mount(mp) if mount else merged
                try:
                    work = make(root)
                    ctx.cold()
                    first = timed(work)
                    second = timed(work)
                finally:
                    if mount:
                        ctx.mounts.umount(mp)
                samples[name][0].append(first)
                samples[name][1].append(second)
                log.info("reads: %s, %s, run %d: %.3f s / %.3f s", key, name, i + 1, first, second)
        for p, pass_name in enumerate(("first pass", "second pass")):
            for peer in PEERS:
                if peer in backends:
                    ctx.add(Row("reads", f"{label}, {pass_name}", "imagefs", samples["imagefs"][p], peer,
                                samples[peer][p]))
    entries = sum(len(d) + len(f) for _, d, f in os.walk(merged))
    ctx.note("reads", f"The image: `{image.tag}`, {len(image.layers)} layers, "
                      f"{image.tar_size / 1e6:.0f} MB unpacked ({image.compressed_size / 1e6:.0f} MB gzip); "
                      f"the tree walk visits all {entries} entries.")
