"""Process identity and exit from /proc and pidfds: the little of psutil the launcher needs on every
container start (psutil's import alone costs ~10 ms of `imagefs run`; `usage` still uses psutil).

`start_time` is psutil's `Process.create_time()`, computed the same way (the process's start in
clock ticks after boot, over SC_CLK_TCK, plus /proc/stat's btime, read afresh each time as psutil
does), so start times recorded in state.json by either compare equal. Pids are reused: a (pid,
start time) pair is what names a process over time.

Concurrency: plain reads of /proc and a select() on a pidfd; any thread.
"""

from __future__ import annotations

import os
import select
import time

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[bytes]:
    """The fields of /proc/PID/stat after the command name (which may hold spaces and parens):
    [0] is the state, [19] the start time in clock ticks. ProcessLookupError if there is no PID."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    return data[data.rfind(b")") + 2:].split()


def boot_time() -> float:
    """The system's boot time in seconds since the epoch (/proc/stat btime)."""
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime"):
                return float(line.split()[1])
    raise OSError("/proc/stat has no btime line")


def start_time(pid: int) -> float:
    """When process *pid* started, in seconds since the epoch, as psutil's create_time() says.
    ProcessLookupError if there is no such process."""
    return float(_stat_fields(pid)[19]) / _CLK_TCK + boot_time()


def is_running(pid: int, start: float | None, *, tolerance: float = 0.01) -> bool:
    """Is *pid* still the process that started at *start* (and not a zombie)?"""
    if start is None:
        return False
    try:
        fields = _stat_fields(pid)
        return fields[0] != b"Z" and abs(float(fields[19]) / _CLK_TCK + boot_time() - start) < tolerance
    except (ProcessLookupError, PermissionError):
        return False


def wait_gone(pid: int, start: float | None, timeout: float) -> bool:
    """Wait up to *timeout* seconds for the process (*pid*, started at *start*) to be gone: exited
    and reaped, as psutil's Process.wait() waits for a process that is not our child (its parent
    reaps it; a child of ours counts as gone once it has exited: we reap our own). Whether it is."""
    deadline = time.monotonic() + timeout
    if not wait_exit(pid, timeout):
        return False
    delay = 0.0001
    while True:
        try:
            fields = _stat_fields(pid)
        except ProcessLookupError:
            return True
        if int(fields[1]) == os.getpid() or start is None or \
                abs(float(fields[19]) / _CLK_TCK + boot_time() - start) >= 0.01:
            return True   # our zombie, or the pid is another process's already
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))   # a zombie: its parent reaps it on SIGCHLD
        delay = min(delay * 2, 0.04)


def wait_exit(pid: int, timeout: float | None) -> bool:
    """Wait up to *timeout* seconds (None: forever) for process *pid* to exit, whether or not it is
    our child; a zombie has exited. Does not reap it. Whether it exited (True if there is none)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)
