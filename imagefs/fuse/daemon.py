"""Mount servers as background processes: start, find, stop, and clean up after a crash.

`start` runs `imagefs mount --foreground` in a new session with a pipe on which the child says
"ready" once it answers; `stop` unmounts (lazily when busy or when the server died) and waits for
that server to exit. Each server is recorded in WORK/run/mounts/<key>.json (pid and start time) so
`imagefs umount` ends exactly the process it started, never another one that reused the pid.

Start times are psutil's create_time(), computed the same way from /proc (as
launcher/linux/procfs.py does for the launcher), and servers are waited for and signalled through
pidfds: this module is on the start-up path of every mount and `imagefs run`, and importing psutil
cost ~10 ms of it in both the caller and the server.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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


def create_time(pid: int) -> float:
    """psutil's Process.create_time() of *pid*: its start in clock ticks after boot (the 22nd field
    of /proc/PID/stat) over SC_CLK_TCK, plus the boot time. ProcessLookupError if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open("/proc/stat", "rb") as f:
            btime = next(line for line in f if line.startswith(b"btime")).split()[1]
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    return float(stat[stat.rfind(b")") + 2:].split()[19]) / os.sysconf("SC_CLK_TCK") + float(btime)


def _process(record: ServerRecord):  # -> psutil.Process | None
    """The recorded server as a psutil.Process if it is still the same process (pid and start
    time both match); for tests and tools, so psutil is imported here only."""
    import psutil

    try:
        p = psutil.Process(record.pid)
        if abs(p.create_time() - record.create_time) < 0.01:
            return p
    except psutil.Error:
        pass
    return None


def _open_server(record: ServerRecord) -> int | None:
    """A pidfd of the recorded server if it is still that process (pid and start time both
    match). Checked after opening: a pid reused later cannot be signalled through the fd."""
    try:
        fd = os.pidfd_open(record.pid)
    except ProcessLookupError:
        return None
    try:
        if abs(create_time(record.pid) - record.create_time) < 0.01:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _exited(pidfd: int, timeout: float) -> bool:
    """Wait up to *timeout* seconds for the process to exit (a zombie has); whether it did."""
    return bool(select.select([pidfd], [], [], timeout)[0])


def _wait_reaped(record: ServerRecord, timeout: float) -> None:
    """Until the exited server is reaped by its parent (not us), as psutil's wait() did: whoever
    stops a server may expect its pid to be gone."""
    deadline = time.monotonic() + timeout
    delay = 0.0001
    while time.monotonic() < deadline:
        try:
            if abs(create_time(record.pid) - record.create_time) >= 0.01:
                return   # the pid is another process's already
        except OSError:
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.04)


def _signal(pidfd: int, sig: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        pass   # exited (and reaped) meanwhile


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


def log_path(work_dir: str, mountpoint: str) -> Path:
    """Where the server of *mountpoint* writes its stdout and stderr (appended to)."""
    return _state_dir(work_dir) / f"{_key(mountpoint)}.log"


def start(cli_prefix: list[str], ref: str, mountpoint: str, work_dir: str, image_id: str,
          mount_options: list[str] = (), *, standby: Standby | None = None) -> ServerRecord:
    """Start a server for *ref* at *mountpoint*; return once the mount answers. *mount_options*
    are `imagefs mount` options (e.g. --prefetch) for the server. A *standby* (`spawn_standby`),
    if still unused, is given the job instead of starting a new process."""
    state = _state_dir(work_dir)
    state.mkdir(parents=True, exist_ok=True)
    log = log_path(work_dir, mountpoint)
    handed = standby.hand_over(ref, mountpoint, list(mount_options)) if standby is not None else None
    if handed is not None:
        proc, read_fd = handed
    else:
        proc, read_fd = _spawn(cli_prefix, ref, mountpoint, list(mount_options), log)
    with os.fdopen(read_fd, "rb") as pipe:
        said = pipe.read()  # EOF when the child is ready (it closes the fd) or dies
    if said.strip() != b"ready":
        status = proc.wait()
        lines = [l for l in log.read_text(errors="replace").splitlines() if l.strip()] if log.exists() else []
        why = lines[-1].removeprefix("imagefs: ") if lines else f"server exited with status {status}"
        raise RuntimeFailure(mountpoint, f"mount failed: {why}")
    os.statvfs(mountpoint)  # a barrier: returns once the server answers
    _keep_child(proc)
    record = ServerRecord(proc.pid, create_time(proc.pid), mountpoint, image_id, str(log))
    atomic_write(record_path(work_dir, mountpoint), json.dumps(asdict(record)).encode())
    return record


def _spawn(cli_prefix: list[str], ref: str, mountpoint: str, mount_options: list[str],
           log: Path) -> tuple[subprocess.Popen, int]:
    """A new `imagefs mount --foreground` process; (it, the read end of its ready pipe)."""
    read_fd, write_fd = os.pipe()
    try:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [*cli_prefix, "mount", "--foreground", "--ready-fd", str(write_fd), *mount_options, ref, mountpoint],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, pass_fds=(write_fd,),
                start_new_session=True, close_fds=True)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return proc, read_fd


def _keep_child(proc: subprocess.Popen) -> None:
    """Keep *proc* in _children until it has exited (reaping those that have)."""
    for pid, child in list(_children.items()):
        if child.poll() is not None:
            del _children[pid]
    _children[proc.pid] = proc


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
    pidfd = _open_server(record) if record else None
    if pidfd is not None:
        try:
            if not _exited(pidfd, timeout):
                _signal(pidfd, signal.SIGTERM)
                if not _exited(pidfd, 5):
                    _signal(pidfd, signal.SIGKILL)
                    if not _exited(pidfd, 5):
                        raise RuntimeFailure(mountpoint, f"server {record.pid} does not exit, even killed")
        finally:
            os.close(pidfd)
    if record is not None:
        child = _children.pop(record.pid, None)
        if child is not None and pidfd is not None:
            child.wait()  # exited (waited for above): reap it
        elif pidfd is not None:
            _wait_reaped(record, timeout)
        record_path(work_dir, mountpoint).unlink(missing_ok=True)


# ---- standby servers ----------------------------------------------------------------------------
#
# A server's start-up is mostly Python's: the interpreter and the imports serving takes (trio,
# pyfuse3, the read path), ~150 ms before it can mount anything. `spawn_standby` starts one first
# thing, before the caller knows what it will mount (the image is maybe not even pulled yet): it
# imports, then waits on a pipe for its job. `start(..., standby=)` hands it the job, so that
# start-up overlaps the caller's own imports and pull instead of following them.
#
# One standby at a time per work dir (a flock held while it waits): many launchers starting at once
# on one image must not start as many servers when one mount serves them all. An unused standby is
# dismissed (EOF on its pipe: it exits), as it is when the caller dies.

STANDBY_LOG = "standby.log"   # a standby's output until it has its job (then its mount's log)
_STANDBY_SLOT = "standby.lock"


@dataclass(frozen=True)
class Job:
    """What a standby server is to mount: as `imagefs mount [MOUNT_OPTIONS] REF MOUNTPOINT`."""

    ref: str
    mountpoint: str
    mount_options: list[str]

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def read(cls, fd: int) -> Job | None:
        """The job from the caller's pipe, or None if it closed the pipe without one."""
        with os.fdopen(fd, "rb") as pipe:
            data = pipe.read()
        return cls(**json.loads(data)) if data else None


class Standby:
    """A server waiting for its job (see above). Thread-safe; used at most once."""

    def __init__(self, proc: subprocess.Popen, job_fd: int, ready_fd: int, slot_fd: int) -> None:
        self.proc = proc
        self._fds = {"job": job_fd, "ready": ready_fd, "slot": slot_fd}
        self._lock = threading.Lock()

    def _take(self) -> dict[str, int] | None:
        with self._lock:
            if not self._fds:
                return None
            fds, self._fds = self._fds, {}
        os.close(fds.pop("slot"))   # free the slot: this one waits no longer
        return fds

    def hand_over(self, ref: str, mountpoint: str, mount_options: list[str]) -> tuple[subprocess.Popen, int] | None:
        """Give the server its job: (the process, the read end of its ready pipe), as a new one
        would be; None if this standby was used or dismissed already, or has died."""
        fds = self._take()
        if fds is None:
            return None
        try:
            # Small, into an empty pipe: never blocks. The server reads to EOF.
            os.write(fds["job"], Job(ref, mountpoint, mount_options).encode())
        except BrokenPipeError:   # it died (its log says why): start one the usual way
            os.close(fds["ready"])
            _keep_child(self.proc)
            return None
        finally:
            os.close(fds["job"])
        return self.proc, fds["ready"]

    def dismiss(self) -> None:
        """If unused, tell the server to exit (EOF on its job pipe). Idempotent; does not wait."""
        fds = self._take()
        if fds is not None:
            for fd in fds.values():
                os.close(fd)
            _keep_child(self.proc)

    def __enter__(self) -> Standby:
        return self

    def __exit__(self, *exc: object) -> None:
        self.dismiss()


def spawn_standby(cli_prefix: list[str], work_dir: str, *, wait: bool = False) -> Standby | None:
    """Start a standby server (see above); None if another one of this work dir is waiting, or
    with *wait*, once that one has its job or is dismissed (an agent's next standby)."""
    state = _state_dir(work_dir)
    state.mkdir(parents=True, exist_ok=True)
    slot = os.open(state / _STANDBY_SLOT, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(slot, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(slot)
        return None
    job_r, job_w = os.pipe()
    ready_r, ready_w = os.pipe()
    try:
        with open(state / STANDBY_LOG, "ab") as out:
            proc = subprocess.Popen(
                [*cli_prefix, "mount", "--foreground", "--standby-fd", str(job_r), "--ready-fd", str(ready_w),
                 "-", "-"],   # REF and MOUNTPOINT come with the job
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, pass_fds=(job_r, ready_w),
                start_new_session=True, close_fds=True)
    except BaseException:
        for fd in (slot, job_w, ready_r):
            os.close(fd)
        raise
    finally:
        os.close(job_r)
        os.close(ready_w)
    return Standby(proc, job_w, ready_r, slot)


def redirect_output(path: Path) -> None:
    """Append this process's stdout and stderr (fds 1 and 2) to *path*: a standby server, once
    it has its job, logs where a server of that mount point does."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def cli_prefix(store: str, work_dir: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "imagefs", "--store", store, "--work-dir", work_dir, *extra]
