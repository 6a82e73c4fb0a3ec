"""Helpers for tests that mount: run the CLI, mount with guaranteed cleanup, snapshot a tree."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                reason="needs root and /dev/fuse (apt-get install fuse3)")


@dataclass
class Cli:
    store: Path
    work: Path
    env: dict = field(default_factory=dict)

    def run(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "imagefs", "--store", str(self.store), "--work-dir", str(self.work), *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                           env={**os.environ, **self.env})
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {r.returncode}: {r.stderr}")
        return r


class Mounts:
    """Mounts made by one test; `cleanup` unmounts and ends their servers even if the test failed."""

    def __init__(self, cli: Cli) -> None:
        self.cli = cli
        self.points: list[Path] = []

    def mount(self, ref: str, mountpoint: Path, *extra: str) -> Path:
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.points.append(mountpoint)
        self.cli.run("mount", *extra, ref, str(mountpoint))
        return mountpoint

    def server_pid(self, mountpoint: Path) -> int:
        from imagefs.fuse.daemon import load_record

        record = load_record(str(self.cli.work), os.path.realpath(mountpoint))
        assert record is not None
        return record.pid

    def cleanup(self) -> None:
        from imagefs.fuse import daemon

        for mp in reversed(self.points):
            path = os.path.realpath(mp)
            record = daemon.load_record(str(self.cli.work), path)
            if daemon.mount_type(path) is not None:
                subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)
            if record is not None:
                proc = daemon._process(record)
                if proc is not None:
                    proc.kill()
                    proc.wait(10)


def snapshot(root: Path, *, hash_big: bool = True) -> dict[bytes, tuple]:
    """Every path under *root* (not following symlinks) with what a user could observe of it."""
    out: dict[bytes, tuple] = {}
    groups: dict[int, list[bytes]] = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, base)
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            content = None
            if stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(full, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
                content = h.hexdigest()
                if st.st_nlink > 1:
                    groups.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(full)
            xattrs = tuple(sorted((n, os.getxattr(full, n, follow_symlinks=False))
                                  for n in os.listxattr(full, follow_symlinks=False)))
            rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                        st.st_size if not stat.S_ISDIR(st.st_mode) else 0, content, xattrs, rdev,
                        st.st_mtime_ns if not stat.S_ISDIR(st.st_mode) else None)
    for paths in groups.values():
        key = tuple(sorted(paths))
        for p in paths:
            out[p] = out[p] + (key,)
    return out


def diff(expected: dict, actual: dict, limit: int = 20) -> list[str]:
    problems = []
    for path in sorted(set(expected) | set(actual)):
        e, a = expected.get(path), actual.get(path)
        if e != a:
            problems.append(f"{path!r}: expected {e!r}\n{' ' * 8}got {a!r}")
    return problems[:limit]
