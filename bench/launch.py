"""2. Warm start and 4. shared rootfs: tasks on an image that is already here.

Warm start, `/bin/true` to exit: `imagefs run REF -- /bin/true` (image pulled and its mount up
from an untimed first run) against `crun run` of the unpacked rootfs (read-only bind) and `bwrap`.

Shared rootfs, N = 1, 10, 100 tasks started at once on one image, each `sh -c 'echo up; read x'`
(up until we close its stdin): start latency is from the common start to each task's "up"; p50
and p99 per run. The peer is containerd's overlay-snapshotter model: per task a kernel overlayfs
(fresh upper) over the extracted layers, and `crun run` on it. Extra disk per task: what the task's
directories hold (upper, work, bundle). imagefs' mount server memory: the RSS of its servers.
"""

from __future__ import annotations

import logging
import os
import statistics
import subprocess
import threading
import time
from pathlib import Path

from bench.cold import PENDING_RUN
from bench.context import Context
from bench.peers import Crun, bwrap_argv, crun_config, missing_tools
from bench.results import Row
from bench.system import du, has_imagefs_run, run as run_cmd, timed

log = logging.getLogger("bench")

UP_CMD = ["/bin/sh", "-c", "echo up; read x"]
# `imagefs run` gives a task /dev/null for stdin (as Mesos does), where `read x` returns at once and
# the task would end as soon as it is up: its tasks wait on a FIFO in their sandbox instead.
SANDBOX_UP_CMD = ["/bin/sh", "-c", "mkfifo /mnt/mesos/sandbox/go && echo up && read x < /mnt/mesos/sandbox/go"]


def run(ctx: Context) -> None:
    missing = missing_tools("crun", "bwrap")
    if missing:
        ctx.note("launch", f"not installed: {', '.join(missing)}; warm-start rows skipped.")
        return
    warm(ctx)
    shared(ctx)


def warm(ctx: Context) -> None:
    image = ctx.image()
    rootfs = ctx.cache.merged(image)
    crun = Crun(ctx.workdir / "crun-state")
    bundle = ctx.fresh_dir("warm-bundle")
    crun_config(bundle, ["/bin/true"], rootfs)
    crun.run(bundle)  # untimed first run: binaries and rootfs in cache
    crun_t = [timed(lambda: crun.run(bundle)) for _ in range(ctx.mode.warm_runs)]
    argv = bwrap_argv(rootfs, ["/bin/true"])
    run_cmd(*argv)
    bwrap_t = [timed(lambda: run_cmd(*argv)) for _ in range(ctx.mode.warm_runs)]
    what = f"warm start to task exit: `/bin/true` on `{image.tag}`"
    if has_imagefs_run():
        cli = ctx.fresh_imagefs("warm-imagefs")
        cli("pull", image.ref)
        cli("run", "--network", "none", image.ref, "--", "/bin/true")
        ifs = [timed(lambda: cli("run", "--network", "none", image.ref, "--", "/bin/true"))
               for _ in range(ctx.mode.warm_runs)]
        ctx.unmount_below(cli.store.parent)
        pending = None
    else:
        ifs, pending = [], PENDING_RUN
    ctx.add(Row("launch", what, "imagefs run", ifs, "crun run (rootfs unpacked, read-only bind)", crun_t,
                pending=pending))
    ctx.add(Row("launch", what, "imagefs run", ifs, "bwrap (rootfs unpacked, read-only bind)", bwrap_t,
                pending=pending))
    ctx.note("launch", "crun runs in a private mount namespace with cgroup2 mounted at /sys/fs/cgroup and "
                       "`--cgroup-manager=disabled` (crun 1.8 refuses the hybrid cgroup layout here, and its "
                       "own cgroup setup fails on RLIMIT_MEMLOCK); the unshare + sh wrapper adds ~2 ms.")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[k]


def shared(ctx: Context) -> None:
    image = ctx.image()
    lowers = ctx.cache.extracted(image)
    can_run = has_imagefs_run()
    for n in ctx.mode.shared_n:
        peer_p50, peer_p99, peer_disk = [], [], []
        ifs_p50, ifs_p99, ifs_disk, ifs_mem = [], [], [], []
        for _ in range(ctx.mode.runs):
            lat, disk = _peer_tasks(ctx, lowers, n)
            peer_p50.append(_percentile(lat, 0.5))
            peer_p99.append(_percentile(lat, 0.99))
            peer_disk.append(disk)
            if can_run:
                lat, disk, mem = _imagefs_tasks(ctx, n)
                ifs_p50.append(_percentile(lat, 0.5))
                ifs_p99.append(_percentile(lat, 0.99))
                ifs_disk.append(disk)
                ifs_mem.append(mem)
        log.info("shared N=%d: crun+overlay p50 %.3f s p99 %.3f s, %.0f B/task", n,
                 statistics.median(peer_p50), statistics.median(peer_p99), statistics.median(peer_disk))
        pending = None if can_run else PENDING_RUN
        what = f"N = {n} tasks at once on `{image.tag}`"
        peer = "crun run + a kernel overlayfs per task"
        ctx.add(Row("shared", f"{what}: start latency p50", "imagefs run", ifs_p50, peer, peer_p50, pending=pending))
        ctx.add(Row("shared", f"{what}: start latency p99", "imagefs run", ifs_p99, peer, peer_p99, pending=pending))
        ctx.add(Row("shared", f"{what}: extra disk per task", "imagefs run", ifs_disk, peer, peer_disk, unit="B",
                    pending=pending))
        ctx.add(Row("shared", f"{what}: mount server memory (RSS)", "imagefs run", ifs_mem, "", [], unit="B",
                    pending=pending, note="the peer has no server"))


def _start_all(n: int, launch) -> tuple[list[float], list[subprocess.Popen]]:
    """Start *n* tasks from *n* threads at once; each *launch(i)* returns a Popen whose stdout says
    "up". Returns the latencies and the processes (still running)."""
    barrier = threading.Barrier(n + 1)
    latencies: list[float | None] = [None] * n
    procs: list[subprocess.Popen | None] = [None] * n
    errors: list[BaseException] = []
    t0 = [0.0]

    def one(i: int) -> None:
        barrier.wait()
        try:
            proc = procs[i] = launch(i)
            line = proc.stdout.readline() if proc.stdout else b""
            if line.strip() != b"up":
                raise RuntimeError(f"task {i} did not come up: {line!r}")
            latencies[i] = time.perf_counter() - t0[0]
        except BaseException as e:  # reported below, after every thread is done
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    t0[0] = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    started = [p for p in procs if p is not None]
    if errors:
        _finish(started)
        raise errors[0]
    return [x for x in latencies if x is not None], started


def _finish(procs: list[subprocess.Popen]) -> None:
    """End tasks started by _start_all: close their stdin (the task's `read` returns), wait."""
    for p in procs:
        if p.stdin:
            try:
                p.stdin.close()
            except OSError:
                pass
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p.stdout:
            p.stdout.close()


def _release_sandboxes(work: Path) -> None:
    """Let the tasks waiting on their sandbox FIFO (SANDBOX_UP_CMD) end."""
    for fifo in work.glob("containers/*/sandbox/go"):
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            continue  # no reader: that task is gone already
        try:
            os.write(fd, b"\n")
        finally:
            os.close(fd)


def _peer_tasks(ctx: Context, lowers: list[Path], n: int) -> tuple[list[float], float]:
    crun = Crun(ctx.workdir / "crun-state")
    base = ctx.fresh_dir(f"shared-{n}")
    lock = threading.Lock()
    points: list[Path] = []

    def launch(i: int) -> subprocess.Popen:
        d = base / f"task-{i}"
        mp = d / "rootfs"
        with lock:  # Mounts is single-threaded
            ctx.mounts.overlay_rw(lowers, d / "upper", d / "work", mp)
            points.append(mp)
        crun_config(d / "bundle", UP_CMD, mp, readonly=False)
        return crun.popen(d / "bundle", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    procs: list[subprocess.Popen] = []
    try:
        latencies, procs = _start_all(n, launch)
        disk = sum(du(base / f"task-{i}" / part) for i in range(n) for part in ("upper", "work", "bundle")) / n
    finally:
        _finish(procs)
        for mp in points:
            ctx.mounts.umount(mp)
    ctx.discard(base)
    return latencies, disk


def _imagefs_tasks(ctx: Context, n: int) -> tuple[list[float], float, float]:
    import psutil

    image = ctx.image()
    cli = ctx.fresh_imagefs(f"shared-imagefs-{n}")
    cli("pull", image.ref)
    cli("run", "--network", "none", image.ref, "--", "/bin/true")  # the shared mount is up
    before = du(cli.work)

    def launch(i: int) -> subprocess.Popen:
        return subprocess.Popen(cli.argv("run", "--network", "none", image.ref, "--", *SANDBOX_UP_CMD),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    procs: list[subprocess.Popen] = []
    try:
        latencies, procs = _start_all(n, launch)
        disk = (du(cli.work) - before) / n
        mem = 0.0
        # The store's mount servers (a standby waiting for a job included): found by command line,
        # because a server's record is written by whichever launcher started it, maybe later.
        for p in psutil.process_iter(["cmdline"]):
            argv = p.info["cmdline"] or []
            if "mount" in argv and "--foreground" in argv and str(cli.work) in argv:
                try:
                    mem += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
    finally:
        _release_sandboxes(cli.work)
        _finish(procs)
        ctx.unmount_below(cli.store.parent)
    ctx.discard(cli.store.parent)
    return latencies, disk, mem
