"""Mount servers as background processes: start, find, stop, and clean up after a crash.

`start` runs `imagefs mount --foreground` in a new session with a pipe on which the child says
"ready" once it answers; `stop` unmounts (lazily when busy or when the server died) and waits for
that server to exit. Each server is recorded in WORK/run/mounts/<key>.json (pid and start time) so
`imagefs umount` ends exactly the process it started, never another one that reused the pid.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from imagefs.errors import InputError, NotFound, RuntimeFailure
from stores.fsutil import atomic_write

FUSE_TYPES = ("fuse.imagefs", "fuse")

# Servers started by this process, kept until they have exited: a Popen dropped while its child
# runs warns (ResourceWarning) and leaves reaping to chance. (Matters to long-lived callers such
# as the launcher; the CLI exits right after `start`.)
_children: dict[int, subprocess.Popen] = {}


@dataclass
class ServerRecord:
    pid: int
    create_time: float
    mountpoint: str
    image: str
    log: str


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    return field.encode().decode("unicode_escape").encode("latin-1").decode("utf-8", "surrogateescape")


def mount_type(path: str) -> str | None:
    """The file system type mounted exactly at *path*, or None."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) >= 5 and _unescape(fields[4]) == path:
            found = right.split()[0]  # the last mount at a path is the visible one
    return found


def is_stale(path: str) -> bool:
    """A FUSE mount whose server is gone answers every request with ENOTCONN (statfs, because
    the kernel answers stat from its attribute cache without asking the server.)"""
    try:
        os.statvfs(path)
    except OSError as e:
        # ECONNABORTED when the request met the connection while the dying server's threads
        # were still closing it.
        return e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def _state_dir(work_dir: str) -> Path:
    return Path(work_dir) / "run" / "mounts"


def _key(mountpoint: str) -> str:
    return hashlib.sha256(mountpoint.encode()).hexdigest()[:16]


def record_path(work_dir: str, mountpoint: str) -> Path:
    return _state_dir(work_dir) / f"{_key(mountpoint)}.json"


def load_record(work_dir: str, mountpoint: str) -> ServerRecord | None:
    try:
        return ServerRecord(**json.loads(record_path(work_dir, mountpoint).read_text()))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None


def _process(record: ServerRecord) -> psutil.Process | None:
    """The recorded server if it is still the same process (pid and start time both match)."""
    try:
        p = psutil.Process(record.pid)
        if abs(p.create_time() - record.create_time) < 0.01:
            return p
    except psutil.Error:
        pass
    return None


def unmount(path: str, *, lazy: bool = False) -> None:
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [path]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeFailure(path, f"unmount failed: {r.stderr.strip() or r.returncode}")


def prepare_mountpoint(path: str) -> None:
    """Refuse a live mount; clear a dead one (its server was killed) so it can be mounted again."""
    if is_stale(path):
        unmount(path, lazy=True)
    elif mount_type(path) is not None and mount_type(path).startswith("fuse"):
        raise InputError(path, "already mounted (imagefs umount it first)")
    if not os.path.isdir(path):
        raise InputError(path, "mount point is not a directory")


def start(cli_prefix: list[str], ref: str, mountpoint: str, work_dir: str, image_id: str,
          mount_options: list[str] = ()) -> ServerRecord:
    """Start a server for *ref* at *mountpoint*; return once the mount answers. *mount_options*
    are `imagefs mount` options (e.g. --prefetch) for the server."""
    state = _state_dir(work_dir)
    state.mkdir(parents=True, exist_ok=True)
    log_path = state / f"{_key(mountpoint)}.log"
    read_fd, write_fd = os.pipe()
    try:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [*cli_prefix, "mount", "--foreground", "--ready-fd", str(write_fd), *mount_options, ref, mountpoint],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(write_fd,),
                start_new_session=True, close_fds=True)
        os.close(write_fd)
        write_fd = -1
        with os.fdopen(read_fd, "rb") as pipe:
            read_fd = -1
            said = pipe.read()  # EOF when the child is ready (it closes the fd) or dies
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
    if said.strip() != b"ready":
        status = proc.wait()
        lines = [l for l in Path(log_path).read_text(errors="replace").splitlines() if l.strip()]
        why = lines[-1].removeprefix("imagefs: ") if lines else f"server exited with status {status}"
        raise RuntimeFailure(mountpoint, f"mount failed: {why}")
    os.statvfs(mountpoint)  # a barrier: returns once the server answers
    for pid, child in list(_children.items()):
        if child.poll() is not None:
            del _children[pid]
    _children[proc.pid] = proc
    record = ServerRecord(proc.pid, psutil.Process(proc.pid).create_time(), mountpoint, image_id, str(log_path))
    atomic_write(record_path(work_dir, mountpoint), json.dumps(asdict(record)).encode())
    return record


def stop(work_dir: str, mountpoint: str, *, timeout: float = 20.0) -> None:
    """Unmount *mountpoint* and make sure its server has exited."""
    record = load_record(work_dir, mountpoint)
    kind = mount_type(mountpoint)
    if kind is None and record is None:
        raise NotFound(mountpoint, "not mounted")
    if kind is not None:
        if not kind.startswith("fuse"):
            raise InputError(mountpoint, f"not an imagefs mount ({kind})")
        try:
            unmount(mountpoint, lazy=is_stale(mountpoint))
        except RuntimeFailure:
            unmount(mountpoint, lazy=True)  # busy: detach now, the kernel finishes when unused
    proc = _process(record) if record else None
    if proc is not None:
        try:
            proc.wait(timeout)
        except psutil.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(5)
            except psutil.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    if record is not None:
        child = _children.pop(record.pid, None)
        if child is not None and proc is not None:
            child.wait()  # exited (waited for above): reap it if psutil did not
        record_path(work_dir, mountpoint).unlink(missing_ok=True)


def cli_prefix(store: str, work_dir: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "imagefs", "--store", store, "--work-dir", work_dir, *extra]
