"""What to run and how: the container description every launcher part reads.

`TaskSpec` is built from `imagefs run` flags or a Mesos-style task JSON (launcher/task.py); the
containerizer turns it into a `ContainerConfig` once the image is provisioned. Pure data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SANDBOX_PATH = "/mnt/mesos/sandbox"


@dataclass(frozen=True)
class Volume:
    """A host path mounted into the container. A relative host_path is inside the sandbox."""

    host_path: str
    container_path: str
    read_only: bool = False


@dataclass(frozen=True)
class Resources:
    cpus: float | None = None        # --cpus: quota = cpus * period, shares/weight from cpus
    mem_bytes: int | None = None     # memory limit
    pids: int | None = None          # pids.max
    disk_bytes: int | None = None    # sandbox disk quota (enforced by the disk isolator)


@dataclass(frozen=True)
class TaskSpec:
    image: str                                    # an image reference (stores/reference.py)
    argv: tuple[str, ...] = ()                    # empty: the image's entrypoint + cmd
    shell: bool = False                           # Mesos command.shell: run argv[0] with /bin/sh -c
    env: tuple[tuple[str, str], ...] = ()         # added to / overriding the image's Env
    workdir: str | None = None                    # default: image WorkingDir, else /
    user: str | None = None                       # default: image User, else root
    hostname: str | None = None
    network: Literal["none", "host"] = "none"
    volumes: tuple[Volume, ...] = ()
    resources: Resources = field(default_factory=Resources)
    backend: Literal["imagefs", "overlay", "copy", "bind"] = "imagefs"
    name: str | None = None                       # container id; generated if absent
    isolation: tuple[str, ...] | None = None      # isolator names; None: the defaults


@dataclass
class ContainerConfig:
    """A container about to be launched: the spec plus what preparation decided."""

    container_id: str
    spec: TaskSpec
    rootfs: str               # the provisioned root file system (a directory)
    sandbox: str              # host directory mounted at SANDBOX_PATH
    argv: list[str]           # final command line
    env: dict[str, str]       # final environment
    workdir: str
    uid: int
    gid: int
    groups: list[int] = field(default_factory=list)
