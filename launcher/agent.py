"""`imagefs agent`: a resident launcher for one store and work dir, as the Mesos agent is one.

Every `imagefs run` on its own pays for a Python start and the imports of the pull, the launcher
and trio (~0.3 s before its first request on a cold page cache), and starts a mount server that
pays for its own imports while the pull runs. An agent pays for them once: it keeps the imports,
keeps a standby mount server ready (imagefs/fuse/daemon.py; a new one is started as soon as a
launch takes it), and runs each `imagefs run` that connects (launcher/agent_client.py has the
wire) in a thread of its own, the task's output going straight to the client's stdout and stderr.

What a run does is the CLI's (the `prepare` callable given to `Agent`): the agent owns the socket,
the threads and the standby. It serves only its own user (SO_PEERCRED), through a socket only
that user can open, and one agent serves a work dir at a time (an flock). Ended with SIGTERM,
SIGINT or SIGHUP, it stops accepting, dismisses its standby and exits; containers it launched
keep running, as they do when an `imagefs run` dies, and `imagefs recover` (which an agent runs
when it starts) finds them.

Concurrency: the accepting loop runs in the main thread (signals end it); each connection is
served in a daemon thread; the standby slot is guarded by a lock.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import socket
import struct
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio

from imagefs.errors import InputError
from launcher.agent_client import FORWARDED, LOCK_NAME, SOCKET_NAME, Messages, run_dir, send_message, via_dir_fd
from launcher.run import TaskIO

if TYPE_CHECKING:
    from imagefs.fuse.daemon import Standby

log = logging.getLogger("imagefs.agent")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Refused(Exception):
    """A request this agent does not serve; the client runs the task itself instead."""


# prepare(request) -> a function running the request's task with the client's I/O, returning its
# exit status; raises Refused when the request is not for this agent.
Prepare = Callable[[dict], Callable[[TaskIO], int]]


class _Stop(Exception):
    pass


class StandbyPool:
    """One standby mount server kept ready for the next launch, started again when taken.
    *spawn()* starts one: daemon.spawn_standby with *prefix*, the command line it runs under,
    which a launch compares with its own before it takes one."""

    def __init__(self, prefix: list[str], spawn: Callable[[], Standby | None]) -> None:
        self.prefix = prefix
        self._spawn = spawn
        self._lock = threading.Lock()
        self._ready: Standby | None = None
        self._closed = False

    def refill(self) -> None:
        """Start a standby if none is ready, in the calling thread; *spawn* may wait for the slot
        of the one taken last (one standby a work dir), so the pool's lock is not held meanwhile."""
        with self._lock:
            if self._closed or self._ready is not None:
                return
        try:
            standby = self._spawn()
        except OSError as e:
            log.warning("agent: no standby mount server: %s", e)
            return
        with self._lock:
            if not self._closed and self._ready is None:
                self._ready, standby = standby, None
        if standby is not None:
            standby.dismiss()

    def take(self) -> Standby | None:
        """The ready standby (None if there is none), and a new one started in the background."""
        with self._lock:
            standby, self._ready = self._ready, None
        threading.Thread(target=self.refill, name="imagefs-standby-refill", daemon=True).start()
        return standby

    def close(self) -> None:
        with self._lock:
            self._closed = True
            standby, self._ready = self._ready, None
        if standby is not None:
            standby.dismiss()


class Agent:
    def __init__(self, work_dir: str, prepare: Prepare, standbys: StandbyPool) -> None:
        self.work_dir = work_dir
        self._prepare = prepare
        self.standbys = standbys

    def serve(self, ready: Callable[[], None] = lambda: None, start: Callable[[], None] = lambda: None) -> int:
        """Serve until a stop signal. *start* runs once this agent holds the work dir (recovery,
        imports), before it listens; *ready* once connections are accepted."""
        directory = run_dir(self.work_dir)
        os.makedirs(directory, exist_ok=True)
        lock = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        listener = None
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InputError("agent", f"another agent serves {self.work_dir} already") from None
            start()
            path = via_dir_fd(dir_fd, SOCKET_NAME)
            try:
                os.unlink(path)   # an agent that died left it; the lock says none serves now
            except FileNotFoundError:
                pass
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            umask = os.umask(0o177)   # 0600: whoever may connect may run containers as us
            try:
                listener.bind(path)
            finally:
                os.umask(umask)
            listener.listen(64)
            self.standbys.refill()
            previous = {sig: signal.signal(sig, _raise_stop) for sig in STOP_SIGNALS}
            try:
                ready()
                while True:
                    conn, _ = listener.accept()
                    threading.Thread(target=self._serve_one, args=(conn,), name="imagefs-agent-run",
                                     daemon=True).start()
            except _Stop:
                log.info("agent: stopping")
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        finally:
            if listener is not None:
                listener.close()
                try:
                    os.unlink(via_dir_fd(dir_fd, SOCKET_NAME))
                except FileNotFoundError:
                    pass
            self.standbys.close()
            os.close(dir_fd)
            os.close(lock)
        return 0

    def _serve_one(self, conn: socket.socket) -> None:
        messages = Messages(conn)
        stream = iter(messages)
        with conn:
            try:
                pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                     struct.calcsize("3i")))
                request = next(stream, None)
                if request is None or uid != os.geteuid() or len(messages.fds) != 2:
                    log.warning("agent: dropped a connection from pid %d (uid %d): not a run request of ours",
                                pid, uid)
                    return
                try:
                    task = self._prepare(request)
                except Refused as e:
                    log.info("agent: refused a run for pid %d: %s", pid, e)
                    send_message(conn, {"refused": str(e)})
                    return
                log.info("agent: a run for pid %d", pid)
                send_message(conn, {"accepted": True})
                with open(messages.fds.pop(0), "wb", buffering=0) as out, \
                        open(messages.fds.pop(0), "wb", buffering=0) as err:
                    io = TaskIO(out, err, lambda: _client_signals(stream))
                    try:
                        code = task(io)
                    except Exception as e:   # a bug: the client gets one line, the log the rest
                        log.exception("agent: run failed")
                        io.say(f"imagefs: internal error: {type(e).__name__}: {e}")
                        code = 125
                send_message(conn, {"exit": code})
            except (OSError, ValueError) as e:
                if getattr(e, "errno", None) != errno.EPIPE:
                    log.warning("agent: a client connection failed: %s", e)
            finally:
                for fd in messages.fds:
                    os.close(fd)
                try:
                    conn.shutdown(socket.SHUT_RDWR)   # wakes the thread still reading the client's signals
                except OSError:
                    pass


@asynccontextmanager
async def _client_signals(stream) -> AsyncIterator[AsyncIterator[int]]:
    """The signals the client relays, as trio.open_signal_receiver gives a process's own."""
    async def signals() -> AsyncIterator[int]:
        while True:
            # Abandoned on cancel: the blocking read ends when the connection is shut down.
            message = await trio.to_thread.run_sync(next, stream, None, abandon_on_cancel=True)
            if message is None:
                return   # the client is gone: its task runs on
            sig = message.get("signal")
            if isinstance(sig, int) and sig in FORWARDED:
                yield sig
    yield signals()


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signum)
