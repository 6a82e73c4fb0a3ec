"""The client half of `imagefs agent` (launcher/agent.py): `imagefs run` hands its command line to
the agent serving its work dir, when one does, and waits there for the task's status.

The wire is newline-delimited JSON over a unix stream socket, WORK/run/agent.sock (mode 0600):

    client -> agent   {"run": ARGV, "store": DIR, "work_dir": DIR, "cgroup_root": ..., "cwd": DIR,
                       "env": {...}}, with the client's stdout and stderr passed along (SCM_RIGHTS);
                      then {"signal": N} for each SIGINT, SIGTERM or SIGHUP the client gets
    agent -> client   {"accepted": true}, or {"refused": WHY} (the client then runs the task
                      itself, as without an agent); then {"exit": N} once the container is gone

The task's output goes straight to the passed descriptors; the client only relays signals. A
client that goes away leaves its task running, as a detached one (imagefs wait / kill).

Stdlib only, and small: this runs at the start of every `imagefs run`.
"""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import sys
from collections.abc import Iterator

SOCKET_NAME = "agent.sock"
LOCK_NAME = "agent.lock"
MAX_MESSAGE = 1 << 20
# What a request's sources depend on besides its command line: an agent whose own values differ
# refuses the request, so the task is started with the caller's, by the caller.
SOURCE_ENV = ("IMAGEFS_INSECURE_REGISTRIES", "IMAGEFS_CA_FILE", "IMAGEFS_AUTH_FILE", "IMAGEFS_APPC_DISCOVERY",
              "HOME", "DOCKER_CONFIG")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def run_dir(work_dir: str) -> str:
    return os.path.join(work_dir, "run")


def via_dir_fd(dir_fd: int, name: str) -> str:
    """A short path to *name* in the directory open as *dir_fd*: unix socket paths are limited to
    108 bytes, a work dir's need not be."""
    return f"/proc/self/fd/{dir_fd}/{name}"


def send_message(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode() + b"\n"
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(data)


class Messages:
    """The JSON messages arriving on a blocking socket, one a line; descriptors that come with
    them (SCM_RIGHTS) are collected in `fds`."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""
        self.fds: list[int] = []

    def __iter__(self) -> Iterator[dict]:
        while True:
            while b"\n" not in self._buf:
                if len(self._buf) > MAX_MESSAGE:
                    raise ValueError("message too long")
                data = self._receive()
                if not data:
                    return
                self._buf += data
            line, self._buf = self._buf.split(b"\n", 1)
            message = json.loads(line)
            if not isinstance(message, dict):
                raise ValueError("message is not an object")
            yield message

    def _receive(self) -> bytes:
        fds = array.array("i")
        data, ancillary, _flags, _addr = self._sock.recvmsg(65536, socket.CMSG_SPACE(16 * fds.itemsize))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        for fd in fds:
            os.set_inheritable(fd, False)
        self.fds.extend(fds)
        return data


def connect(work_dir: str) -> socket.socket | None:
    """A connection to the agent serving *work_dir*, or None if none does."""
    try:
        dir_fd = os.open(run_dir(work_dir), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(via_dir_fd(dir_fd, SOCKET_NAME))
    except OSError:   # no socket, or nobody listening on it (an agent that died)
        sock.close()
        return None
    finally:
        os.close(dir_fd)
    return sock


def delegate(work_dir: str, store: str, cgroup_root: str | None, argv: list[str]) -> int | None:
    """Run `imagefs ARGV` (a `run` command) through the agent of *work_dir*; its exit status, or
    None if no agent serves it or the agent refused (the caller runs it itself then)."""
    sock = connect(work_dir)
    if sock is None:
        return None
    with sock:
        request = {"run": argv, "store": os.path.realpath(store), "work_dir": os.path.realpath(work_dir),
                   "cgroup_root": cgroup_root, "cwd": os.getcwd(), "env": dict(os.environ)}
        try:
            send_message(sock, request, [sys.stdout.fileno(), sys.stderr.fileno()])
            messages = iter(Messages(sock))
            answer = next(messages, None)
        except (OSError, ValueError):
            return None
        if answer is None or not answer.get("accepted"):
            return None   # refused (answer["refused"] says why): run here, as without an agent

        def forward(signum: int, frame: object) -> None:
            try:
                send_message(sock, {"signal": signum})
            except OSError:
                pass
        previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
        try:
            for message in messages:
                if "exit" in message:
                    return int(message["exit"])
        except (OSError, ValueError):
            pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    print("imagefs: agent: the connection ended before the task did; it runs on (imagefs ps, wait, kill)",
          file=sys.stderr)
    return 125
