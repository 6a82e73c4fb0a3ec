"""The containerizer: the Mesos lifecycle (launch, wait, destroy, usage, update, recover) on trio.

    launch   checkpoint → spawn init (blocked; its start-up overlaps what follows) → pull
             → provision the rootfs → isolators prepare → the init's config
             → isolators isolate (cgroups) → "go" → the task runs
    wait     until the init exits or an isolator reports a limitation (which kills it); then
             destroy, and the Termination says how it ended and why
    destroy  kill what runs, isolators clean up in reverse order, the provisioner removes the rootfs
    recover  in a new process: containers still running are left to run (wait/kill/stats work on
             them through state.json), ones that died meanwhile are destroyed, orphans removed

Every step that makes something to undo is preceded by a checkpoint of state.json, so a launcher
killed at any point leaves enough for `recover` to undo it.

Concurrency: one trio task per call. Blocking work (pulls, provisioning, which mounts, and cgroup
clean-up, which waits for processes) runs in worker threads. A per-container flock makes the
destroy of one container happen once even when several processes race to do it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from imagefs.errors import ImagefsError, InputError, NotFound, RuntimeFailure
from launcher.isolation import IsolatorFactory, isolation_for
from launcher.isolators.base import Isolator, LaunchInfo, Limitation
from launcher.launch import ExitStatus, InitProcess, init_config, read_status, start_init, wait_pid
from launcher.linux import procfs
from launcher.provisioner import Provisioner
from launcher.spec import SANDBOX_PATH, ContainerConfig, Resources, TaskSpec
from launcher.state import (DESTROYING, PREPARING, RUNNING, TERMINATED, ContainerDirs,
                            ContainerState, check_container_id)
from launcher.users import resolve_user
from stores.fsutil import locked
from stores.pull import SourceOptions, find_or_pull
from stores.store import ImageRecord, Store

if TYPE_CHECKING:
    from concurrent.futures import Future

    import psutil   # only `usage` needs it: imported there, off the launch path

    from imagefs.fuse.daemon import Standby

log = logging.getLogger(__name__)

EXIT_LAUNCH_FAILED = 125
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
REASON_DESTROYED = "REASON_CONTAINER_DESTROYED"
REASON_LAUNCH_FAILED = "REASON_CONTAINER_LAUNCH_FAILED"
REASON_MEMORY = "REASON_CONTAINER_LIMITATION_MEMORY"


@dataclass(frozen=True)
class Termination:
    exit_code: int | None
    signal: int | None = None
    reason: str | None = None
    message: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"exit_code": self.exit_code, "signal": self.signal, "reason": self.reason, "message": self.message}


@dataclass
class _Live:
    """A container this process launched: its init handle and isolator objects (None until they
    are all prepared: a failed launch makes them again from state.json to clean up)."""

    state: ContainerState
    init: InitProcess
    isolators: list[Isolator] | None
    limitation: Limitation | None = None
    killed: bool = False


@dataclass
class RecoverReport:
    running: list[str] = field(default_factory=list)
    destroyed: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)


class LaunchFailed(RuntimeFailure):
    """The container could not be started; `exit_code` is 125, 126 or 127."""

    def __init__(self, what: str, why: str, exit_code: int = EXIT_LAUNCH_FAILED) -> None:
        super().__init__(what, why)
        self.exit_code = exit_code


def compose_command(spec: TaskSpec, record: ImageRecord) -> list[str]:
    """Docker's rules: the task's arguments replace the image's Cmd after its Entrypoint; a shell
    command (Mesos' shell=true) runs with /bin/sh -c and ignores both."""
    runtime = record.image.runtime
    if spec.shell:
        return ["/bin/sh", "-c", " ".join(spec.argv)]
    argv = list(runtime.entrypoint) + (list(spec.argv) if spec.argv else list(runtime.cmd))
    if not argv:
        raise InputError(spec.image, "no command given and the image has neither Entrypoint nor Cmd")
    return argv


def compose_env(spec: TaskSpec, record: ImageRecord) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in record.image.runtime.env:
        key, _, value = item.partition("=")
        env[key] = value
    env.setdefault("PATH", DEFAULT_PATH)
    env.update(dict(spec.env))
    env["MESOS_SANDBOX"] = SANDBOX_PATH
    return env


class Containerizer:
    def __init__(self, store: Store, work_dir: str | os.PathLike[str], *,
                 source_options: SourceOptions | None = None, source_flags: list[str] | None = None,
                 cgroup_root: str | None = None, disk_interval: float = 15.0,
                 mount_standby: Standby | None = None) -> None:
        """*mount_standby*: a mount server started ahead (imagefs/fuse/daemon.py) for the first
        launch's image, if its mount is not up by then; dismissed after that launch's provision."""
        self.store = store
        self.work_dir = Path(work_dir)
        self.dirs = ContainerDirs(work_dir)
        self.source_options = source_options or SourceOptions()
        self.provisioner = Provisioner(store, self.work_dir, source_flags=list(source_flags or []),
                                       source_options=self.source_options, mount_standby=mount_standby)
        self.factory = IsolatorFactory(cgroup_root, disk_interval)
        self._live: dict[str, _Live] = {}

    # -- launch ------------------------------------------------------------------------------
    async def launch(self, spec: TaskSpec, *, image: Future[ImageRecord] | None = None) -> str:
        """Start a container for *spec*; returns its id once the task runs. On failure everything
        made so far is destroyed and LaunchFailed (or the ImagefsError at fault) is raised.
        *image*: find_or_pull of spec.image, started by the caller ahead of time (`imagefs run`
        does, before its own imports); its failure fails the launch as a pull here would."""
        container_id = check_container_id(spec.name) if spec.name else secrets.token_hex(6)
        directory = self.dirs.dir(container_id)
        try:
            directory.mkdir(parents=True)
        except FileExistsError:
            raise InputError(container_id, "a container with this id exists (imagefs ps)") from None
        self.dirs.sandbox(container_id).mkdir()
        state = ContainerState(container_id, spec)
        self.dirs.save(state)
        try:
            return await self._launch(state, image)
        except BaseException as e:
            message = e.line() if isinstance(e, ImagefsError) else f"{type(e).__name__}: {e}"
            code = e.exit_code if isinstance(e, LaunchFailed) else EXIT_LAUNCH_FAILED
            with trio.CancelScope(shield=True):
                live = self._live.pop(container_id, None)
                if live is not None:
                    await live.init.aclose()
                await self._destroy(state, Termination(code, None, REASON_LAUNCH_FAILED, message),
                                    live.isolators if live is not None else None)
            raise

    async def _launch(self, state: ContainerState, image: Future[ImageRecord] | None) -> str:
        spec = state.spec
        directory = self.dirs.dir(state.id)
        # The init first: its start-up (a Python interpreter, tens of ms) then overlaps the pull
        # and the mount. It waits for its config and "go"; until then it runs nothing, and a
        # failed launch (or destroy, or recover) kills it like any init. Its pid is checkpointed
        # with the image below: an init whose launcher died before that exits by itself (EOF on
        # its sync pipe, before it did anything).
        init = await start_init(directory, log_dir=self.dirs.sandbox(state.id))
        live = _Live(state, init, None)
        self._live[state.id] = live
        state.pid = init.pid
        state.pid_start = _start_time(init.pid)

        if image is not None:
            record = await trio.to_thread.run_sync(image.result)
        else:
            record = await trio.to_thread.run_sync(find_or_pull, self.store, spec.image, self.source_options)
        state.image_id = record.id
        state.isolation = isolation_for(spec)
        self.dirs.save(state)
        rootfs = await trio.to_thread.run_sync(self.provisioner.provision, state.id, record, spec.backend)
        state.rootfs = rootfs.state
        state.status = PREPARING
        self.dirs.save(state)

        user = resolve_user(rootfs.path, spec.user if spec.user is not None else record.image.runtime.user)
        config = ContainerConfig(
            container_id=state.id, spec=spec, rootfs=rootfs.path, sandbox=str(self.dirs.sandbox(state.id)),
            argv=compose_command(spec, record), env=compose_env(spec, record),
            workdir=spec.workdir or record.image.runtime.workdir or "/",
            uid=user.uid, gid=user.gid, groups=list(user.groups))
        isolators = self.factory.make_all(state.isolation, state.id, state.isolators)
        infos: list[LaunchInfo | None] = []
        for isolator in isolators:
            before = json.dumps(isolator.state, sort_keys=True)
            try:
                infos.append(isolator.prepare(config))
            except ImagefsError:
                raise
            except (ValueError, OSError) as e:
                raise LaunchFailed(isolator.name, str(e)) from None
            finally:
                # Isolators record what they made in their state. Most make nothing (namespaces,
                # the rootfs): a checkpoint of what is already on disk would only cost an fsync.
                if json.dumps(isolator.state, sort_keys=True) != before:
                    self.dirs.save(state)
        live.isolators = isolators

        init.configure(init_config(config, infos, status_path=directory / "status.json"))
        for isolator in isolators:
            isolator.isolate(init.pid)
        await init.go()
        state.status = RUNNING
        self.dirs.save(state)
        return state.id

    # -- wait and destroy --------------------------------------------------------------------
    async def wait(self, container_id: str) -> Termination:
        """Until the container ends (or hits a limit, which kills it); then destroy it."""
        live = self._live.get(container_id)
        state = live.state if live else self.dirs.load(container_id)
        if state.status == TERMINATED:
            return Termination(**state.termination) if state.termination else Termination(None)
        if live is not None and live.isolators is not None:
            isolators = live.isolators
        else:
            isolators = self.factory.make_all(state.isolation, state.id, state.isolators)
            for isolator in isolators:
                isolator.recover()
        limitation: list[Limitation] = []
        async with trio.open_nursery() as nursery:
            for isolator in isolators:
                nursery.start_soon(self._watch, isolator, state, limitation)
            status = await self._wait_init(state, live)
            nursery.cancel_scope.cancel()
        termination = self._termination(status, isolators, limitation[0] if limitation else None,
                                        killed=bool(live and live.killed))
        with trio.CancelScope(shield=True):
            if live is not None:
                await live.init.aclose()
                self._live.pop(container_id, None)
            await self._destroy(state, termination, isolators)
        return termination

    async def _wait_init(self, state: ContainerState, live: _Live | None) -> ExitStatus:
        if live is not None:
            return await live.init.wait()
        if state.pid is not None and _same_process(state.pid, state.pid_start):
            await wait_pid(state.pid)
        status = read_status(self.dirs.dir(state.id) / "status.json", None)
        if status.exit_code is None:
            # The monitor writes a status however the task ends; only a SIGKILL of the monitor
            # itself (kill ID, or destroy) leaves none, and its init died with it.
            return ExitStatus(128 + signal.SIGKILL, signal.SIGKILL, None)
        return status

    async def _watch(self, isolator: Isolator, state: ContainerState, found: list[Limitation]) -> None:
        limitation = await isolator.watch()
        found.append(limitation)
        log.info("container %s: %s", state.id, limitation.message)
        self._kill_process(state, signal.SIGKILL)

    def _termination(self, status: ExitStatus, isolators: list[Isolator], limitation: Limitation | None,
                     killed: bool) -> Termination:
        if limitation is None:
            for isolator in isolators:
                oom = getattr(isolator, "oom_killed", None)
                if oom is not None and oom():
                    limitation = Limitation(REASON_MEMORY, "the task was killed for exceeding its memory limit")
        if limitation is not None:
            return Termination(status.exit_code, status.signal, limitation.reason, limitation.message)
        if status.error:
            return Termination(status.exit_code, status.signal, REASON_LAUNCH_FAILED, status.error)
        if killed:
            return Termination(status.exit_code, status.signal, REASON_DESTROYED, "killed")
        return Termination(status.exit_code, status.signal)

    async def destroy(self, container_id: str) -> Termination:
        """Kill the container if it runs, then clean it up."""
        live = self._live.get(container_id)
        state = live.state if live else self.dirs.load(container_id)
        if state.status == TERMINATED:
            return Termination(**state.termination) if state.termination else Termination(None)
        if live:
            live.killed = True
        self._kill_process(state, signal.SIGKILL)
        return await self.wait(container_id)

    async def _destroy(self, state: ContainerState, termination: Termination,
                       isolators: list[Isolator] | None) -> None:
        await trio.to_thread.run_sync(self._destroy_sync, state, termination, isolators)

    def _destroy_sync(self, state: ContainerState, termination: Termination,
                      isolators: list[Isolator] | None) -> None:
        directory = self.dirs.dir(state.id)
        with locked(directory / "lock"):
            try:
                current = self.dirs.load(state.id)
            except NotFound:
                return
            if current.status == TERMINATED:
                return
            state.status = DESTROYING
            self.dirs.save(state)
            if state.pid is not None and _same_process(state.pid, state.pid_start):
                # Only the monitor we started: the container's init dies with it.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(state.pid, signal.SIGKILL)
                procfs.wait_gone(state.pid, state.pid_start, 30)
            if isolators is None:
                isolators = self.factory.make_all(state.isolation, state.id, state.isolators)
                for isolator in isolators:
                    with contextlib.suppress(Exception):
                        isolator.recover()
            errors = []
            for isolator in reversed(isolators):
                try:
                    isolator.cleanup()
                except Exception as e:  # keep cleaning: one stuck isolator must not leak the rest
                    errors.append(f"{isolator.name}: {e}")
            if state.rootfs is not None:
                try:
                    self.provisioner.destroy(state.id, state.rootfs)
                except Exception as e:
                    errors.append(f"rootfs: {e}")
            state.termination = termination.to_json()
            if errors:
                log.error("container %s: clean-up incomplete: %s", state.id, "; ".join(errors))
                state.status = DESTROYING  # recover will try again
                self.dirs.save(state)
                raise RuntimeFailure(state.id, "clean-up incomplete: " + "; ".join(errors))
            state.status = TERMINATED
            self.dirs.save(state)

    # -- signals, usage, update --------------------------------------------------------------
    def kill(self, container_id: str, sig: int = signal.SIGKILL) -> None:
        live = self._live.get(container_id)
        state = live.state if live else self.dirs.load(container_id)
        if state.status != RUNNING or not self._kill_process(state, sig):
            raise InputError(container_id, f"not running ({state.status})")
        if live and sig == signal.SIGKILL:
            live.killed = True

    def _kill_process(self, state: ContainerState, sig: int) -> bool:
        live = self._live.get(state.id)
        if live is not None:
            live.init.send_signal(sig)
            return True
        if state.pid is None or not _same_process(state.pid, state.pid_start):
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(state.pid, sig)
        return True

    def usage(self, container_id: str) -> dict[str, float]:
        state = self.dirs.load(container_id)
        stats: dict[str, float] = {}
        isolators = self.factory.make_all(state.isolation, state.id, state.isolators)
        for isolator in isolators:
            with contextlib.suppress(Exception):
                isolator.recover()
                stats.update(isolator.usage())
        if state.status == RUNNING and state.pid and _same_process(state.pid, state.pid_start):
            # psutil where cgroups say nothing (an isolation without cgroups/mem, say)
            import psutil

            procs = [psutil.Process(state.pid)]
            with contextlib.suppress(psutil.Error):
                procs += procs[0].children(recursive=True)
            if "mem_rss_bytes" not in stats:
                stats["mem_rss_bytes"] = float(sum(_rss(p) for p in procs))
            stats.setdefault("processes", float(len(procs)))
        return stats

    def update(self, container_id: str, resources: Resources) -> None:
        state = self.dirs.load(container_id)
        if state.status != RUNNING:
            raise InputError(container_id, f"not running ({state.status})")
        isolators = self.factory.make_all(state.isolation, state.id, state.isolators)
        for isolator in isolators:
            isolator.recover()
            isolator.update(resources)
        from dataclasses import replace

        state.spec = replace(state.spec, resources=resources)
        self.dirs.save(state)

    def list(self) -> list[ContainerState]:
        out = []
        for container_id in self.dirs.ids():
            with contextlib.suppress(ImagefsError):
                out.append(self.dirs.load(container_id))
        return out

    def is_running(self, state: ContainerState) -> bool:
        return state.status == RUNNING and state.pid is not None and _same_process(state.pid, state.pid_start)

    # -- recover -----------------------------------------------------------------------------
    async def recover(self) -> RecoverReport:
        report = RecoverReport()
        live: set[str] = set()
        for container_id in self.dirs.ids():
            try:
                state = self.dirs.load(container_id)
            except ImagefsError:
                report.orphans.append(container_id)  # crashed before its first checkpoint
                continue
            if state.status == TERMINATED:
                continue
            if self.is_running(state):
                live.add(container_id)
                report.running.append(container_id)
                continue
            status = read_status(self.dirs.dir(container_id) / "status.json", None)
            termination = Termination(status.exit_code, status.signal,
                                      REASON_DESTROYED if status.exit_code is None else None,
                                      status.error or ("the launcher died" if status.exit_code is None else None))
            await self._destroy(state, termination, None)
            report.destroyed.append(container_id)
        # Rootfses and shared image mounts of containers that no longer run.
        await trio.to_thread.run_sync(self.provisioner.recover, live)
        for container_id in report.orphans:
            shutil.rmtree(self.dirs.dir(container_id), ignore_errors=True)
        await trio.to_thread.run_sync(self._remove_orphan_cgroups, live)
        if not live:
            with contextlib.suppress(Exception):
                self.factory.cgroup_root().remove()  # only empty directories go
        return report

    def _remove_orphan_cgroups(self, live: set[str]) -> None:
        """Cgroups under our root that no container we know of owns (made before a checkpoint)."""
        from launcher.linux.cgroups import container_cgroup

        try:
            root = self.factory.cgroup_root()
        except Exception:  # no cgroups here: nothing to remove
            return
        known = set(self.dirs.ids())
        for controller, directory in root.dirs.items():
            if not os.path.isdir(directory):
                continue
            for name in os.listdir(directory):
                if os.path.isdir(os.path.join(directory, name)) and name not in known:
                    cg = container_cgroup(name, root, [controller])
                    with contextlib.suppress(Exception):
                        cg.kill_all()
                        cg.destroy()


def _start_time(pid: int) -> float | None:
    try:
        return procfs.start_time(pid)
    except OSError:
        return None


def _same_process(pid: int, start: float | None) -> bool:
    """Is *pid* still the process we recorded? Pids are reused: the start time must match too."""
    return procfs.is_running(pid, start)


def _rss(p: psutil.Process) -> int:
    import psutil

    try:
        return p.memory_info().rss
    except psutil.Error:
        return 0
