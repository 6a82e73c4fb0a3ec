"""disk/du: the sandbox's disk usage, measured du-style, and a disk quota as a Mesos limitation.

After Mesos' posix/disk isolator: every `interval` seconds (15 by default, as Mesos'
--container_disk_watch_interval) watch() measures the sandbox; when the task's disk resource is set
and usage exceeds it, watch() returns REASON_CONTAINER_LIMITATION_DISK and the containerizer kills
the task. Nothing stops writes in between: this is accounting, not a file system quota.

How usage is counted (`disk_usage`), as `du -sx` would:
- allocated space, st_blocks * 512, so sparse files count what they occupy, not their length;
- each inode once, so hard links are not counted twice;
- symlinks are not followed (the link itself counts);
- mount points are not crossed: a volume bind-mounted into the sandbox from elsewhere is not the
  task's usage. A different st_dev marks most mounts; a bind mount of the same file system keeps
  st_dev, so mount points are also read from /proc/self/mountinfo (overridable for tests).
Files vanish while the task runs; the walk skips what disappears or cannot be read.

Concurrency: as launcher.isolators.base. watch() runs each walk in a worker thread
(trio.to_thread), so a large sandbox never blocks the containerizer's event loop. usage() returns
the last measurement, or walks once (blocking) when none was made in this process.
"""

from __future__ import annotations

import os
import re
import stat
from typing import Any

from launcher.isolators.base import Isolator, LaunchInfo, Limitation
from launcher.spec import ContainerConfig, Resources

WATCH_INTERVAL = 15.0
REASON_DISK = "REASON_CONTAINER_LIMITATION_DISK"
MOUNTINFO = "/proc/self/mountinfo"

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
_SKIPPED_ERRORS = (FileNotFoundError, NotADirectoryError, PermissionError)


def _unescape_mountinfo(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in mount points as \040, \011, \012, \134.
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def mount_points_under(root: str, mountinfo: str = MOUNTINFO) -> set[str]:
    """Mount points strictly below *root* (a real path), from a mountinfo file; empty if unreadable."""
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    prefix = root.rstrip("/") + "/"
    points = set()
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 4:
            point = _unescape_mountinfo(fields[4])
            if point.startswith(prefix):
                points.add(point.rstrip("/"))
    return points


def disk_usage(root: str, *, mountinfo: str = MOUNTINFO) -> int:
    """Bytes allocated to the tree at *root*, du-style (see the module docstring).

    FileNotFoundError if *root* itself is missing; anything below it that vanishes is skipped."""
    root = os.path.realpath(root)
    top = os.lstat(root)
    skip = mount_points_under(root, mountinfo)
    seen: set[tuple[int, int]] = set()   # (dev, ino) of multiply-linked files already counted
    total = top.st_blocks * 512
    stack = [root]
    while stack:   # iterative: a deep tree must not exhaust the recursion limit
        directory = stack.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except _SKIPPED_ERRORS:
                        continue
                    if st.st_dev != top.st_dev or entry.path in skip:
                        continue   # a mount point: neither it nor anything below it is ours
                    if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                        key = (st.st_dev, st.st_ino)
                        if key in seen:
                            continue
                        seen.add(key)
                    total += st.st_blocks * 512
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(entry.path)
        except _SKIPPED_ERRORS:
            continue   # removed, replaced by a file, or unreadable since we saw it
    return total


class DiskIsolator(Isolator):
    """`interval`: seconds between measurements in watch()."""

    name = "disk/du"

    def __init__(self, container_id: str, state: dict[str, Any], *,
                 interval: float = WATCH_INTERVAL, mountinfo: str = MOUNTINFO) -> None:
        super().__init__(container_id, state)
        self.interval = interval
        self._mountinfo = mountinfo
        self._used: int | None = None   # the last measurement made by this process

    def prepare(self, config: ContainerConfig) -> LaunchInfo | None:
        self.state["sandbox"] = config.sandbox
        self.state["limit"] = config.spec.resources.disk_bytes
        return None

    def update(self, resources: Resources) -> None:
        self.state["limit"] = resources.disk_bytes

    def _limit(self) -> int | None:
        limit = self.state.get("limit")
        return int(limit) if limit is not None else None

    def _measure(self) -> int:
        self._used = disk_usage(self.state["sandbox"], mountinfo=self._mountinfo)
        return self._used

    async def watch(self) -> Limitation:
        import trio

        while True:
            if "sandbox" not in self.state:
                break
            try:
                # abandon_on_cancel: a long walk must not delay the container's teardown; the
                # abandoned thread only reads and finishes on its own.
                used = await trio.to_thread.run_sync(self._measure, abandon_on_cancel=True)
            except FileNotFoundError:
                break   # the sandbox is gone: nothing to watch any more
            limit = self._limit()
            if limit is not None and used > limit:
                return Limitation(REASON_DISK, f"disk usage {used} exceeds limit {limit} "
                                               f"(bytes, in the sandbox {self.state['sandbox']})")
            await trio.sleep(self.interval)
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    def usage(self) -> dict[str, float]:
        """Mesos ResourceStatistics names; disk_limit_bytes only when a limit is set."""
        if "sandbox" not in self.state:
            raise RuntimeError(f"{self.name}: used before prepare() or recover()")
        used = self._used
        if used is None:
            try:
                used = self._measure()
            except FileNotFoundError:
                used = 0
        out: dict[str, float] = {"disk_used_bytes": used}
        limit = self._limit()
        if limit is not None:
            out["disk_limit_bytes"] = limit
        return out

    def recover(self) -> None:
        return None   # everything it needs (sandbox, limit) is in self.state
