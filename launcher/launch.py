"""The launcher's side of the container init (launcher/init.py): build its config, start it, let it
go, wait for it, and wait again for one started by an earlier launcher process (recover).

    init = await start_init(container_dir, log_dir=sandbox)   # Python starts; blocked on "go"
    ...                                              # meanwhile: pull, mount, isolators prepare
    init.configure(init_config(container_config, launch_infos, status_path=container_dir / "status.json"))
    for isolator in isolators: isolator.isolate(init.pid)   # e.g. move it into cgroups
    await init.go()
    status = await init.wait()                       # ExitStatus(exit_code, signal, error)

(`spawn_init(config, container_dir)` is start_init and configure in one.) The init is started before
its config exists because its start-up (a Python interpreter and its imports, tens of ms) is on the
critical path of every launch otherwise; it reads the config only after "go".

The init's stdout and stderr (and so the task's) go to `stdout` and `stderr` in the sandbox, as
Mesos does; `status.json` in the container directory, outside the sandbox, where the task cannot
forge it.

Concurrency: trio. Only `wait`, `wait_pid` and `aclose` block (on the process, via pidfd); the rest
does small file writes inline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

import launcher
from launcher.init import EXIT_LAUNCH_FAILED, GO
from launcher.isolators.base import LaunchInfo
from launcher.spec import ContainerConfig

CONFIG_NAME = "init.json"
STATUS_NAME = "status.json"
_PACKAGE_ROOT = str(Path(launcher.__file__).resolve().parent.parent)


@dataclass(frozen=True)
class ExitStatus:
    """How a container ended. `exit_code` is what `imagefs run` returns (128+N when killed by
    signal N, 125/126/127 for launch failures); `error` says why a launch failed."""

    exit_code: int | None
    signal: int | None = None
    error: str | None = None


def init_config(config: ContainerConfig, infos: Iterable[LaunchInfo | None], *,
                status_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The init's config (see launcher/init.py) from a container and its isolators' LaunchInfos,
    merged in isolator order: namespaces united, mounts concatenated, the last hostname wins."""
    namespaces: list[str] = []
    mounts: list[dict[str, Any]] = []
    hostname: str | None = None
    loopback_up = False
    for info in infos:
        if info is None:
            continue
        namespaces += [n for n in info.clone_namespaces if n not in namespaces]
        mounts += [dict(m) for m in info.mounts]
        hostname = info.hostname if info.hostname is not None else hostname
        loopback_up = loopback_up or info.loopback_up
    if "mnt" not in namespaces:
        namespaces.append("mnt")   # a rootfs cannot exist without its own mount namespace
    return {
        "container_id": config.container_id,
        "rootfs": config.rootfs,
        "sandbox": config.sandbox,
        "argv": list(config.argv),
        "env": dict(config.env),
        "workdir": config.workdir,
        "uid": config.uid,
        "gid": config.gid,
        "groups": list(config.groups),
        "hostname": hostname,
        "namespaces": namespaces,
        "loopback_up": loopback_up,
        "mounts": mounts,
        "status_path": os.fspath(status_path),
    }


def read_status(status_path: str | os.PathLike[str], returncode: int | None) -> ExitStatus:
    """The status the monitor wrote; without one (the monitor was killed), derive it from the
    monitor's own returncode (negative: killed by that signal), if known."""
    try:
        with open(status_path, encoding="utf-8") as f:
            doc = json.load(f)
        return ExitStatus(doc.get("exit_code"), doc.get("signal"), doc.get("error"))
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        return ExitStatus(EXIT_LAUNCH_FAILED, None, f"unreadable status file: {e}")
    if returncode is None:
        return ExitStatus(None, None, "the container ended without a status")
    if returncode < 0:
        return ExitStatus(128 - returncode, -returncode, None)
    return ExitStatus(returncode, None, "the container ended without a status")


def _write_atomic(path: Path, data: bytes) -> None:
    # No fsync: the init reads the file once, right away, and nothing reads it after a crash.
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _open_log(directory: Path, name: str) -> int:
    # O_NOFOLLOW: the sandbox is writable by earlier tasks; a planted symlink must not make the
    # launcher append to a host file.
    return os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


class InitProcess:
    """A spawned init: blocked until `go()` (after `configure()`); `wait()` gives its ExitStatus
    (and reaps it)."""

    def __init__(self, process: trio.Process, sync_fd: int | None, status_path: Path,
                 config_path: Path | None = None) -> None:
        self._process = process
        self._sync_fd = sync_fd
        self.status_path = status_path
        self.config_path = config_path
        self.pid = process.pid
        self._status: ExitStatus | None = None
        self._configured = False

    def configure(self, config: dict[str, Any]) -> None:
        """Write the init's config (before `go()`). `status_path` defaults to the container
        directory's status.json; a stale status file is removed."""
        if self._sync_fd is None or self.config_path is None:
            raise RuntimeError("configure() after go() or abort()")
        config = dict(config)
        self.status_path = Path(config.setdefault("status_path", str(self.status_path)))
        self.status_path.unlink(missing_ok=True)
        _write_atomic(self.config_path, json.dumps(config, indent=1).encode())
        self._configured = True

    def _close_sync(self) -> None:
        if self._sync_fd is not None:
            os.close(self._sync_fd)
            self._sync_fd = None

    async def go(self) -> None:
        """Let the init proceed (after it was put into its cgroups)."""
        if self._sync_fd is None:
            raise RuntimeError("go() called twice or after abort()")
        if not self._configured:
            raise RuntimeError("go() before configure()")
        try:
            os.write(self._sync_fd, GO)   # two bytes into an empty pipe: never blocks
        except BrokenPipeError:
            pass   # the init is gone already; wait() says why
        finally:
            self._close_sync()

    def abort(self) -> None:
        """Tell an init that has not had `go()` to give up: it exits 125 without starting."""
        self._close_sync()

    def send_signal(self, sig: int) -> None:
        """Signal the monitor; it forwards TERM, INT, HUP, USR1, USR2 and QUIT to the task."""
        if self._process.returncode is None:
            self._process.send_signal(sig)

    async def wait(self) -> ExitStatus:
        if self._status is None:
            returncode = await self._process.wait()
            self._close_sync()
            self._status = read_status(self.status_path, returncode)
        return self._status

    async def aclose(self) -> None:
        """Make sure the container is gone: SIGKILL the monitor if it still runs (the container
        init dies with it, and the kernel kills the rest of its pid namespace), then reap it."""
        self._close_sync()
        with trio.CancelScope(shield=True):
            if self._process.returncode is None:
                self._process.send_signal(signal.SIGKILL)
            await self._process.wait()


async def start_init(container_dir: Path, *, log_dir: Path | None = None) -> InitProcess:
    """Start the init for *container_dir*, blocked on its sync fd until `configure()` and `go()`.
    Its stdout and stderr are appended to `stdout` and `stderr` in *log_dir* (the sandbox; by
    default the container directory)."""
    container_dir = Path(container_dir)
    config_path = container_dir / CONFIG_NAME
    status_path = container_dir / STATUS_NAME
    # Stale files of an earlier init in this directory: an abort before configure() must not find
    # that one's config (it would write a status there).
    config_path.unlink(missing_ok=True)
    status_path.unlink(missing_ok=True)
    log_dir = Path(log_dir) if log_dir is not None else container_dir
    out_fd = _open_log(log_dir, "stdout")
    err_fd = _open_log(log_dir, "stderr")
    sync_r, sync_w = os.pipe()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    try:
        # -S: no site (the init needs only the standard library and this package, on PYTHONPATH;
        # site and the venv's .pth files cost ~10 ms). -P: never put the cwd on sys.path.
        # start_new_session: the container outlives a launcher killed from its terminal, and is
        # found again by recover (wait_pid).
        process = await trio.lowlevel.open_process(
            [sys.executable, "-S", "-P", "-m", "launcher.init", str(config_path), "--sync-fd", str(sync_r)],
            stdin=subprocess.DEVNULL, stdout=out_fd, stderr=err_fd, pass_fds=(sync_r,),
            start_new_session=True, cwd=str(container_dir), env=env)
    except BaseException:
        os.close(sync_w)
        raise
    finally:
        os.close(sync_r)
        os.close(out_fd)
        os.close(err_fd)
    return InitProcess(process, sync_w, status_path, config_path)


async def spawn_init(config: dict[str, Any], container_dir: Path) -> InitProcess:
    """Start an init on *config* (written to container_dir/init.json), blocked on its sync fd until
    `go()`. Its output goes to the config's sandbox, else to the container directory."""
    init = await start_init(container_dir, log_dir=Path(config["sandbox"]) if config.get("sandbox") else None)
    try:
        init.configure(config)
    except BaseException:
        init.abort()
        with trio.CancelScope(shield=True):
            await init.aclose()
        raise
    return init


async def wait_pid(pid: int) -> None:
    """Return once process *pid* has exited, whether or not it is our child (a container started by
    an earlier launcher process). Does not reap it. Returns at once if there is no such process."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


async def wait_recovered(pid: int, status_path: str | os.PathLike[str]) -> ExitStatus:
    """Wait for an init found again after a launcher restart and read its status. Check the pid is
    still that init (e.g. its start time from state.json) before calling: pids are reused."""
    await wait_pid(pid)
    return read_status(status_path, None)
