"""`imagefs run`, `wait` and `ps` on top of the containerizer: the foreground behaviour a user sees.

`run` launches, copies the task's stdout and stderr from the sandbox files to its own as they grow
(the files stay, as Mesos keeps them), forwards SIGINT/SIGTERM/SIGHUP to the task, and exits with
the task's status once the container is destroyed. With --detach it prints the id and leaves the
container to `imagefs wait`, `kill` and `recover`.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import trio

from imagefs.errors import InputError
from launcher.containerizer import Containerizer, Termination
from launcher.spec import TaskSpec
from launcher.state import RUNNING, TERMINATED

if TYPE_CHECKING:
    from concurrent.futures import Future

    from stores.store import ImageRecord

FOLLOW_INTERVAL = 0.05  # how often the output files are checked for growth


def parse_signal(text: str) -> int:
    name = text.upper()
    if name.isdigit():
        number = int(name)
        if 0 < number < signal.NSIG:
            return number
    else:
        name = name if name.startswith("SIG") else f"SIG{name}"
        sig = getattr(signal.Signals, name, None) if name in signal.Signals.__members__ else None
        if sig is not None:
            return int(sig)
    raise InputError(text, "not a signal name or number")


@dataclass
class TaskIO:
    """Where a foreground run's output goes and where the signals it forwards come from: this
    process's own stdout, stderr and signals (`console`), or a client's (launcher/agent.py)."""

    out: BinaryIO
    err: BinaryIO
    signals: Callable[[], AbstractAsyncContextManager[AsyncIterator[int]]]

    @classmethod
    def console(cls) -> TaskIO:
        return cls(sys.stdout.buffer, sys.stderr.buffer, _console_signals)

    def say(self, line: str) -> None:
        self.err.write(line.encode(errors="replace") + b"\n")
        self.err.flush()


FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@asynccontextmanager
async def _console_signals() -> AsyncIterator[AsyncIterator[int]]:
    with trio.open_signal_receiver(*FORWARDED) as receiver:
        yield receiver


async def _follow(path: Path, out: BinaryIO | None, done: trio.Event) -> None:
    """Copy what is appended to *path* to *out* until *done*, then the rest."""
    with open(path, "rb") as f:
        while True:
            finished = done.is_set()
            while out is not None and (block := f.read(65536)):
                try:
                    out.write(block)
                    out.flush()
                except BrokenPipeError:   # nobody reads it any more: the task runs on regardless
                    out = None
            if finished:
                return
            with trio.move_on_after(FOLLOW_INTERVAL):
                await done.wait()


def report(container_id: str, termination: Termination, io: TaskIO | None = None) -> None:
    if termination.reason and termination.message:
        line = f"imagefs: {container_id}: {termination.message} ({termination.reason})"
        (io or TaskIO.console()).say(line)


def exit_code(termination: Termination) -> int:
    if termination.exit_code is not None:
        return termination.exit_code
    return 128 + termination.signal if termination.signal else 125


def run_task(containerizer: Containerizer, spec: TaskSpec, *, detach: bool = False,
             image: Future[ImageRecord] | None = None, io: TaskIO | None = None) -> int:
    """*image*: spec.image pulled ahead by the caller (see Containerizer.launch). *io*: this
    process's console unless given."""
    return trio.run(_run, containerizer, spec, detach, image, io or TaskIO.console())


async def _run(containerizer: Containerizer, spec: TaskSpec, detach: bool, image: Future[ImageRecord] | None,
               io: TaskIO) -> int:
    async with io.signals() as signals:
        container_id = await containerizer.launch(spec, image=image)
        if detach:
            io.out.write(f"{container_id}\n".encode())
            io.out.flush()
            return 0
        sandbox = containerizer.dirs.sandbox(container_id)
        done = trio.Event()

        async def forward() -> None:
            async for sig in signals:
                containerizer.kill(container_id, sig)

        async with trio.open_nursery() as outer:
            outer.start_soon(forward)
            async with trio.open_nursery() as followers:
                followers.start_soon(_follow, sandbox / "stdout", io.out, done)
                followers.start_soon(_follow, sandbox / "stderr", io.err, done)
                termination = await containerizer.wait(container_id)
                done.set()  # the followers copy what is left and return
            outer.cancel_scope.cancel()
    report(container_id, termination, io)
    return exit_code(termination)


def wait_task(containerizer: Containerizer, container_id: str) -> int:
    termination = trio.run(containerizer.wait, container_id)
    report(container_id, termination)
    code = exit_code(termination)
    print(code)
    return code


def format_ps(containerizer: Containerizer) -> str:
    rows = [("CONTAINER ID", "IMAGE", "STATUS", "CREATED", "COMMAND")]
    for state in containerizer.list():
        if state.status == RUNNING and containerizer.is_running(state):
            status = f"running (pid {state.pid})"
        elif state.status == TERMINATED and state.termination:
            t = state.termination
            status = f"exited {t.get('exit_code')}" + (f" ({t['reason']})" if t.get("reason") else "")
        elif state.status == RUNNING:
            status = "ended (imagefs wait or recover to clean up)"
        else:
            status = state.status
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state.created))
        command = " ".join(state.spec.argv) or "(image default)"
        rows.append((state.id, state.spec.image, status, created, command[:40]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n" for row in rows)
