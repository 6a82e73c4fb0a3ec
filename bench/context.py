"""One benchmark run's settings and resources, shared by the suites.

`Mode` is what --smoke / --quick / full choose (images, link rates, runs, sizes). `Context`
owns what the run creates — its work directory, mounts, the link — and `close` undoes all of it;
the runner calls that in a `finally`, so every way out cleans up.

Concurrency: none.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.images import BenchImage, Cache
from bench.link import LoopbackLink, SlowLink
from bench.results import Row, SECTIONS
from bench.system import Imagefs, Mounts, drop_caches
from bench.workload import WORKLOADS, Workload

log = logging.getLogger("bench")


@dataclass(frozen=True)
class Mode:
    name: str
    image: str                    # the workload image's tag
    reads_image: str              # the image with the big data file
    workloads: tuple[str, ...]
    rates: tuple[str | None, ...]  # tc rates; None: no limit (loopback)
    rtt: float
    runs: int
    random_reads: int
    warm_runs: int
    shared_n: tuple[int, ...]
    slow_link: bool = True


MODES = {
    "smoke": Mode("smoke", "busybox", "busybox-reads", ("true",), (None,), 0.0, 1, 100, 2, (2,),
                  slow_link=False),
    "quick": Mode("quick", "python", "python-reads", ("print42",), ("1gbit",), 0.02, 3, 500, 5, (1, 10)),
    "full": Mode("full", "numpy", "numpy-reads", ("print42", "numpy"), ("100mbit", "1gbit"), 0.02, 3, 2000,
                 20, (1, 10, 100)),
}


@dataclass
class Context:
    mode: Mode
    cache: Cache
    workdir: Path
    keep_workdir: bool = False
    rows: list[Row] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    mounts: Mounts = field(default_factory=Mounts)
    link: SlowLink | LoopbackLink | None = None
    local_store: Imagefs | None = None  # an imagefs store holding the reads image's indexes
    _pushed: set[str] = field(default_factory=set)
    _n: int = 0

    @classmethod
    def create(cls, mode: Mode, cache: Cache, workdir: Path | None = None) -> Context:
        if workdir is None:
            return cls(mode, cache, Path(tempfile.mkdtemp(prefix="imagefs-bench-", dir="/var/tmp")))
        workdir.mkdir(parents=True, exist_ok=True)
        return cls(mode, cache, Path(tempfile.mkdtemp(prefix="run-", dir=workdir)))

    # -- things the suites share

    def image(self, tag: str | None = None) -> BenchImage:
        return self.cache.image(tag or self.mode.image)

    def workloads(self) -> list[Workload]:
        return [WORKLOADS[w] for w in self.mode.workloads]

    def fresh_dir(self, what: str) -> Path:
        self._n += 1
        path = self.workdir / f"{what}-{self._n}"
        path.mkdir(parents=True)
        return path

    def fresh_imagefs(self, what: str) -> Imagefs:
        d = self.fresh_dir(what)
        return Imagefs(d / "store", d / "work")

    def discard(self, path: Path) -> None:
        if self._mount_points_below(path):
            log.warning("not deleting %s: something is still mounted below it", path)
            return
        shutil.rmtree(path, ignore_errors=True)

    def unmount_below(self, path: Path) -> None:
        """Unmount what imagefs commands of ours left mounted below *path* (our own directory), and
        see the mount servers they recorded there exit (ended by their recorded PIDs if not)."""
        import json
        import subprocess

        from bench.system import wait_exit

        servers = []
        for record in path.glob("**/run/mounts/*.json"):
            try:
                doc = json.loads(record.read_text())
                servers.append((int(doc["pid"]), float(doc["create_time"])))
            except (OSError, ValueError, KeyError):
                pass
        for point in sorted(self._mount_points_below(path), reverse=True):
            r = subprocess.run(["fusermount3", "-u", "-z", point], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True)
        for pid, create_time in servers:
            wait_exit(pid, create_time)

    def cold(self) -> None:
        """Before a first-pass or cold-start sample: drop the (machine-wide) caches."""
        drop_caches()

    def get_link(self) -> SlowLink | LoopbackLink:
        if self.link is None:
            path = self.workdir / "link"
            link = SlowLink(path, self.mode.rtt) if self.mode.slow_link else LoopbackLink(path, self.mode.rtt)
            self.link = link.__enter__()
        return self.link

    def pushed(self, tag: str) -> str:
        """*tag* pushed to the link's registry (once, before any rate limit); returns nothing useful."""
        link = self.get_link()
        if tag not in self._pushed:
            rate = link.rate
            link.set_rate(None)
            log.info("pushing %s to the bench registry", tag)
            link.push(self.cache.layout, tag)
            link.set_rate(rate)
            self._pushed.add(tag)
        return tag

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def note(self, section: str, text: str) -> None:
        assert section in SECTIONS, section
        self.notes.setdefault(section, []).append(text)

    def close(self) -> None:
        self.mounts.close()
        if self.link is not None:
            self.link.close()
            self.link = None
        if not self.keep_workdir:
            leftovers = [p for p in self._mount_points_below()]
            if leftovers:
                log.warning("not deleting %s: still mounted: %s", self.workdir, leftovers)
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _mount_points_below(self, path: Path | None = None) -> list[str]:
        from bench.system import mount_points

        prefix = str((path or self.workdir).resolve()) + "/"
        return [p for p in mount_points() if p.startswith(prefix)]
