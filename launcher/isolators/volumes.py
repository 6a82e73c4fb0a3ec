"""volume/host_path: host directories and files mounted into the container (Mesos' host_path volumes).

prepare() checks each Volume and turns it into a bind mount for the container init:
- container_path must be absolute (it is resolved inside the rootfs by the init, symlinks and all,
  so it can never land outside; see launcher/linux/rootfs.resolve_in_root);
- a relative host_path is inside the sandbox (resolved the same way, so it cannot leave it) and is
  created as a directory if missing; an absolute host_path must exist, file or directory.
The mounts live in the container's mount namespace and vanish with it: nothing to clean up.

Concurrency: as launcher.isolators.base; prepare() stats and may mkdir a few paths.
"""

from __future__ import annotations

import os
from typing import Any

from imagefs.errors import InputError
from launcher.isolators.base import Isolator, LaunchInfo
from launcher.linux.rootfs import ensure_mount_target, resolve_in_root
from launcher.spec import ContainerConfig, Volume


def volume_mount(volume: Volume, sandbox: str) -> dict[str, Any]:
    """The init's mount entry for *volume* (see launcher/init.py, config key "mounts")."""
    what = f"volume {volume.host_path}:{volume.container_path}"
    if not os.path.isabs(volume.container_path):
        raise InputError(what, "container path must be absolute")
    if os.path.normpath(volume.container_path) == "/":
        raise InputError(what, "cannot mount over the container's root")
    if os.path.isabs(volume.host_path):
        if not os.path.exists(volume.host_path):
            raise InputError(what, "host path does not exist")
        source = os.path.realpath(volume.host_path)
    else:
        if os.path.normpath(volume.host_path).split("/")[0] == "..":
            raise InputError(what, "a relative host path must stay inside the sandbox")
        source = resolve_in_root(sandbox, volume.host_path)
        if not os.path.exists(source):
            try:
                source = ensure_mount_target(sandbox, volume.host_path, is_dir=True)
            except OSError as e:
                raise InputError(what, f"cannot create it in the sandbox: {e.strerror}") from e
    return {"source": source, "target": volume.container_path, "type": "bind",
            "read_only": volume.read_only, "is_dir": os.path.isdir(source)}


class VolumeHostPathIsolator(Isolator):
    name = "volume/host_path"

    def prepare(self, config: ContainerConfig) -> LaunchInfo | None:
        if not config.spec.volumes:
            return None
        mounts = tuple(volume_mount(v, config.sandbox) for v in config.spec.volumes)
        return LaunchInfo(clone_namespaces=("mnt",), mounts=mounts)
