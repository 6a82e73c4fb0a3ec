"""The isolator interface, after the Mesos containerizer's (include/mesos/slave/isolator.hpp).

Lifecycle for one container, driven by the containerizer:

    prepare(config)   before the container's init exists: create cgroups, decide mounts
    isolate(pid)      init exists but has not exec'd the task yet: move it into cgroups
    watch()           returns when a limit is hit (OOM, disk quota), with the reason
    update(resources) change limits of a running container
    usage()           counters for `imagefs stats`
    cleanup()         after the container's processes are gone; in reverse order of prepare
    recover(state)    after a launcher restart: reattach to what `prepare` made, from state.json

Isolators checkpoint what they made through `state` (a dict saved in state.json before anything
that would need undoing), so `cleanup` works in a new process after a crash.

Concurrency: methods are called from the containerizer's trio task; `watch` is awaited in its own
task and may await; the others must return promptly (file writes to cgroupfs are fine).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

from launcher.spec import ContainerConfig, Resources


@dataclass(frozen=True)
class Limitation:
    """A limit the container hit; the containerizer kills it and reports this reason."""

    reason: str      # e.g. "REASON_CONTAINER_LIMITATION_MEMORY" (Mesos' names)
    message: str


@dataclass(frozen=True)
class LaunchInfo:
    """What an isolator asks the in-container init to do (Mesos' ContainerLaunchInfo)."""

    clone_namespaces: tuple[str, ...] = ()     # "pid", "mnt", "uts", "ipc", "net"
    hostname: str | None = None
    loopback_up: bool = False
    mounts: tuple[dict[str, Any], ...] = ()   # {"source","target","type","flags","data","read_only"}


class Isolator(abc.ABC):
    name: str = ""

    def __init__(self, container_id: str, state: dict[str, Any]) -> None:
        self.container_id = container_id
        self.state = state  # this isolator's part of state.json; mutate, then the caller saves

    def prepare(self, config: ContainerConfig) -> LaunchInfo | None:
        return None

    def isolate(self, pid: int) -> None:
        return None

    async def watch(self) -> Limitation:
        import trio

        await trio.sleep_forever()
        raise AssertionError("unreachable")

    def update(self, resources: Resources) -> None:
        return None

    def usage(self) -> dict[str, float]:
        return {}

    def cleanup(self) -> None:
        return None

    def recover(self) -> None:
        """Reattach to what prepare made, from self.state (another process made it)."""
        return None
