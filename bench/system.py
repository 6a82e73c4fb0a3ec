"""The benchmarks' dealings with the machine: caches, mounts, the imagefs CLI, timing, machine facts.

Every mount is made below the run's own work directory and recorded in a `Mounts`, whose `close`
unmounts them all (lazily if busy) and ends the serving processes by the PIDs that were started;
the runner calls it on every path out. Nothing here touches a mount, process or cgroup it did not
make.

`drop_caches` writes 3 to /proc/sys/vm/drop_caches: it empties the page, dentry and inode caches of
the whole machine (harmless, but other work on the machine gets slower for a moment).

Concurrency: none; call from one thread.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parent.parent


class _Code:
    """Which imagefs the CLI calls run: the checkout (default) or a revision exported by `use_rev`."""

    dir: Path = REPO
    rev: str | None = None

    @classmethod
    def env(cls) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(cls.dir)}


CODE = _Code


def use_rev(rev: str, into: Path) -> None:
    """Measure *rev* of this repository instead of the working tree: `git archive` it to *into*
    and run every imagefs command from there."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    CODE.dir, CODE.rev = into, rev
    has_imagefs_run.cache_clear()
    has_index_push.cache_clear()
    has_agent.cache_clear()
    mount_prefetch_default.cache_clear()


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(*argv: str | os.PathLike, timeout: float = 1800, **kw) -> subprocess.CompletedProcess:
    """Run a command; its output is captured and shown only when it fails."""
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {r.returncode}: {r.stderr.strip()[-1500:]}")
    return r


@dataclass
class Imagefs:
    """The imagefs CLI on one store and work dir (`python -m imagefs`, the interpreter we run under)."""

    store: Path
    work: Path

    def argv(self, *args: str | os.PathLike) -> list[str]:
        return [sys.executable, "-m", "imagefs", "--store", str(self.store), "--work-dir", str(self.work),
                "-q", *map(str, args)]

    def __call__(self, *args: str | os.PathLike, timeout: float = 1800) -> subprocess.CompletedProcess:
        return run(*self.argv(*args), timeout=timeout, cwd=CODE.dir, env=CODE.env())

    @contextlib.contextmanager
    def agent(self, log: Path | None = None) -> Iterator[None]:
        """`imagefs agent` serving this store and work dir while the block runs (its start is not
        part of what the block measures, as a resident agent's is not part of a task's start);
        ended by its PID afterwards. *log*: where its -vv log goes."""
        argv = self.argv("-vv", "agent") if log else self.argv("agent")
        with open(log or os.devnull, "w") as err:
            proc = subprocess.Popen(argv, cwd=CODE.dir, env=CODE.env(), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=err if log else subprocess.PIPE, text=True)
        try:
            ready = proc.stdout.readline()   # written once it accepts connections
            if not ready.startswith("imagefs agent: serving"):
                why = proc.stderr.read()[-1500:] if proc.stderr else log.read_text()[-1500:]
                raise RuntimeError(f"imagefs agent did not start: {why}")
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            if proc.stderr:
                proc.stderr.close()

    def server(self, mountpoint: Path) -> tuple[int, float] | None:
        """(pid, create time) of the server of *mountpoint*, from its record."""
        from imagefs.fuse.daemon import load_record

        record = load_record(str(self.work), os.path.realpath(mountpoint))
        return (record.pid, record.create_time) if record else None


@functools.cache
def has_imagefs_run() -> bool:
    """Whether this checkout's CLI has the `run` command yet."""
    r = subprocess.run([sys.executable, "-m", "imagefs", "run", "--help"], capture_output=True, cwd=CODE.dir,
                       env=CODE.env(), stdin=subprocess.DEVNULL)
    return r.returncode == 0


@functools.cache
def mount_prefetch_default() -> str | None:
    """The default of `imagefs mount --prefetch`, or None if the CLI has no such option."""
    r = subprocess.run([sys.executable, "-m", "imagefs", "mount", "--help"], capture_output=True, text=True,
                       cwd=CODE.dir, env=CODE.env(), stdin=subprocess.DEVNULL)
    if r.returncode != 0 or "--prefetch" not in r.stdout:
        return None
    import re

    m = re.search(r"--prefetch[^\n]*?(?:\n[^-\n][^\n]*)*?default:? ?([a-z]+)", r.stdout)
    return m.group(1) if m else "?"


@functools.cache
def has_agent() -> bool:
    """Whether this checkout's CLI has `imagefs agent` (a resident launcher `imagefs run` uses)."""
    r = subprocess.run([sys.executable, "-m", "imagefs", "agent", "--help"], capture_output=True, cwd=CODE.dir,
                       env=CODE.env(), stdin=subprocess.DEVNULL)
    return r.returncode == 0


@functools.cache
def has_index_push() -> bool:
    """Whether this checkout's CLI can publish indexes (`imagefs index --push`)."""
    r = subprocess.run([sys.executable, "-m", "imagefs", "index", "--help"], capture_output=True, text=True,
                       cwd=CODE.dir, env=CODE.env(), stdin=subprocess.DEVNULL)
    return r.returncode == 0 and "--push" in r.stdout


def code_state() -> str:
    """The commit measured, and whether the working tree differed from it."""
    head = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %s", CODE.rev or "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    if CODE.rev is not None:
        return f"{head} (`--rev {CODE.rev}`, exported with git archive)"
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                            "--", "imagefs", "stores", "launcher"], capture_output=True, text=True).stdout.split("\n")
    changed = [line[3:] for line in dirty if line.strip()]
    if changed:
        return f"{head}, plus uncommitted changes (new or modified): {', '.join(changed)}"
    return head


def mount_points() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4] for line in f}


def wait_mounted(path: Path, proc: subprocess.Popen | None = None, timeout: float = 30) -> None:
    target = os.path.realpath(path)
    deadline = time.monotonic() + timeout
    while target not in mount_points():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited {proc.returncode} before mounting {path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} not mounted after {timeout} s")
        time.sleep(0.01)


class Mounts:
    """Mounts made by the benchmarks, each with how to undo it."""

    def __init__(self) -> None:
        self._made: list[tuple[Path, str, object]] = []  # (mountpoint, kind, Imagefs | Popen | None)

    def overlay(self, lowers: list[Path], mountpoint: Path) -> Path:
        """Kernel overlayfs, read-only: *lowers* bottom first."""
        mountpoint.mkdir(parents=True, exist_ok=True)
        lowerdir = ":".join(str(p) for p in reversed(lowers))
        run("mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lowerdir}", mountpoint)
        self._made.append((mountpoint, "kernel", None))
        return mountpoint

    def overlay_rw(self, lowers: list[Path], upper: Path, work: Path, mountpoint: Path) -> Path:
        """Kernel overlayfs with a writable upper dir (what a container runtime gives a task)."""
        for d in (upper, work, mountpoint):
            d.mkdir(parents=True, exist_ok=True)
        lowerdir = ":".join(str(p) for p in reversed(lowers))
        run("mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lowerdir},upperdir={upper},workdir={work}",
            mountpoint)
        self._made.append((mountpoint, "kernel", None))
        return mountpoint

    def fuse_overlayfs(self, lowers: list[Path], mountpoint: Path) -> Path:
        mountpoint.mkdir(parents=True, exist_ok=True)
        lowerdir = ":".join(str(p) for p in reversed(lowers))
        proc = subprocess.Popen(["fuse-overlayfs", "-f", "-o", f"lowerdir={lowerdir}", str(mountpoint)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._made.append((mountpoint, "fuse-overlayfs", proc))
        wait_mounted(mountpoint, proc)
        return mountpoint

    def imagefs(self, cli: Imagefs, ref: str, mountpoint: Path, *options: str) -> Path:
        mountpoint.mkdir(parents=True, exist_ok=True)
        self._made.append((mountpoint, "imagefs", cli))
        cli("mount", *options, ref, mountpoint)
        return mountpoint

    def umount(self, mountpoint: Path) -> None:
        for i, (point, kind, owner) in enumerate(self._made):
            if point == mountpoint:
                del self._made[i]
                self._undo(point, kind, owner)
                return
        raise KeyError(mountpoint)

    def _undo(self, point: Path, kind: str, owner: object) -> None:
        mounted = os.path.realpath(point) in mount_points()
        if kind == "imagefs":
            # `imagefs umount` less its wait for the server's exit: an exited server lingers as a
            # zombie until PID 1 reaps it (seconds on this VM), and that wait is not imagefs' cost.
            cli: Imagefs = owner  # type: ignore[assignment]
            server = cli.server(point)
            if mounted:
                r = subprocess.run(["fusermount3", "-u", str(point)], capture_output=True)
                if r.returncode != 0:
                    subprocess.run(["fusermount3", "-u", "-z", str(point)], capture_output=True)
            if server is not None:
                wait_exit(*server)
            return
        if mounted:
            r = subprocess.run(["umount", str(point)], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", str(point)], capture_output=True)
        if isinstance(owner, subprocess.Popen):
            try:
                owner.wait(10)
            except subprocess.TimeoutExpired:
                owner.kill()
                owner.wait()

    def close(self) -> None:
        while self._made:
            point, kind, owner = self._made.pop()
            try:
                self._undo(point, kind, owner)
            except Exception as e:  # keep undoing the rest
                log.warning("could not undo mount %s: %s", point, e)


def wait_exit(pid: int, create_time: float | None = None, timeout: float = 20.0) -> None:
    """Wait until *pid* has exited (a zombie counts), then end it by that PID if it has not. With
    *create_time* (as recorded when it started), a different process that reused the PID is left
    alone."""
    import psutil

    deadline = time.monotonic() + timeout
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 0.05:
            return  # not the process we started: it has exited and its PID was reused
        while time.monotonic() < deadline:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return
            time.sleep(0.01)
    except psutil.NoSuchProcess:
        return
    end_process(proc)


def end_process(proc) -> None:
    import psutil

    try:
        proc.terminate()
        proc.wait(10)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        proc.kill()


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {"kernel": platform.release(), "cpu": cpu, "cpus": str(os.cpu_count()),
            "memory": f"{mem_kib / 1024 / 1024:.0f} GiB", "python": platform.python_version()}


def tool_versions() -> dict[str, str]:
    versions = {}
    for name, argv in {"skopeo": ["skopeo", "--version"], "umoci": ["umoci", "--version"],
                       "crun": ["crun", "--version"], "fuse-overlayfs": ["fuse-overlayfs", "--version"],
                       "bwrap": ["bwrap", "--version"]}.items():
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
            versions[name] = out.splitlines()[0].strip() if out else "?"
        except (OSError, subprocess.TimeoutExpired):
            versions[name] = "not installed"
    return versions


def du(path: Path) -> int:
    """Bytes of disk *path* uses (allocated blocks; symlinks not followed; mounts below not entered)."""
    try:
        dev = os.lstat(path).st_dev
    except FileNotFoundError:
        return 0
    total = 0
    seen: set[int] = set()
    for dirpath, dirnames, filenames in os.walk(path):
        keep = []
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            if st.st_dev != dev:
                continue  # a mount point: another file system's bytes
            if name in dirnames:
                keep.append(name)
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
            total += st.st_blocks * 512
        dirnames[:] = [d for d in dirnames if d in keep]
    return total
