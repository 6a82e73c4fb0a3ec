"""filesystem/linux: the container sees its provisioned rootfs, not the host's file system.

After Mesos' filesystem/linux isolator: prepare() checks the rootfs and the sandbox and asks for a
mount namespace; the container init (launcher/init.py) then binds the rootfs onto itself, mounts a
fresh /proc, a minimal /dev, /sys read-only and the sandbox at SANDBOX_PATH inside it, and pivots
into it (launcher/linux/rootfs.py). Every mount lives in the container's mount namespace and goes
with it, so there is nothing to clean up; the rootfs itself belongs to the provisioner.

Concurrency: as launcher.isolators.base; prepare() stats two directories.
"""

from __future__ import annotations

import os

from imagefs.errors import RuntimeFailure
from launcher.isolators.base import Isolator, LaunchInfo
from launcher.spec import ContainerConfig


class FilesystemLinuxIsolator(Isolator):
    name = "filesystem/linux"

    def prepare(self, config: ContainerConfig) -> LaunchInfo | None:
        if not os.path.isdir(config.rootfs):
            raise RuntimeFailure(config.rootfs, "container rootfs is not a directory")
        if os.path.realpath(config.rootfs) == "/":
            raise RuntimeFailure(config.rootfs, "container rootfs is the host's root")
        if not os.path.isdir(config.sandbox):
            raise RuntimeFailure(config.sandbox, "container sandbox is not a directory")
        return LaunchInfo(clone_namespaces=("mnt",))
