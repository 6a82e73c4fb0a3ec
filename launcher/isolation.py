"""Which isolators a container gets, and how to make them (again, from state.json).

`--isolation` names isolators as Mesos does; "network" stands for network/none or network/host
as the task asks. The defaults give every container its own pid, mount, uts, ipc and network
namespaces, the image as its root file system, volumes, cgroup limits and disk accounting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from imagefs.errors import InputError
from launcher.isolators.base import Isolator
from launcher.isolators.cgroups_cpu import CgroupsCpuIsolator
from launcher.isolators.cgroups_memory import CgroupsMemoryIsolator
from launcher.isolators.cgroups_pids import CgroupsPidsIsolator
from launcher.isolators.disk import DiskIsolator
from launcher.isolators.filesystem import FilesystemLinuxIsolator
from launcher.isolators.namespaces import ISOLATORS as NAMESPACE_ISOLATORS
from launcher.isolators.volumes import VolumeHostPathIsolator
from launcher.linux.cgroups import CgroupRoot, detect_layout
from launcher.spec import TaskSpec

DEFAULT_ISOLATION = ("filesystem/linux", "volume/host_path", "namespaces/pid", "namespaces/ipc",
                     "namespaces/uts", "network", "cgroups/cpu", "cgroups/mem", "cgroups/pids", "disk/du")
# Needed whatever --isolation says: without them there is no container.
REQUIRED = ("filesystem/linux", "namespaces/pid")

_CGROUP_ISOLATORS = {cls.name: cls for cls in (CgroupsCpuIsolator, CgroupsMemoryIsolator, CgroupsPidsIsolator)}
_PLAIN = {**NAMESPACE_ISOLATORS, FilesystemLinuxIsolator.name: FilesystemLinuxIsolator,
          VolumeHostPathIsolator.name: VolumeHostPathIsolator}
KNOWN = sorted({*_CGROUP_ISOLATORS, *_PLAIN, DiskIsolator.name, "network"})


def isolation_for(spec: TaskSpec) -> list[str]:
    names = list(spec.isolation) if spec.isolation is not None else list(DEFAULT_ISOLATION)
    for name in names:
        if name not in KNOWN:
            raise InputError(f"isolator {name}", f"unknown (known: {', '.join(KNOWN)})")
    names = [f"network/{spec.network}" if n == "network" else n for n in names]
    for name in REQUIRED:
        if name not in names:
            names.insert(0, name)
    if not any(n.startswith("network/") for n in names):
        names.append(f"network/{spec.network}")
    return list(dict.fromkeys(names))


class IsolatorFactory:
    """Makes isolator objects by name, sharing one cgroup root (resolved once, lazily)."""

    def __init__(self, cgroup_root: str | None = None, disk_interval: float = 15.0) -> None:
        self._cgroup_spec = cgroup_root
        self._root: CgroupRoot | None = None
        self.disk_interval = disk_interval

    def cgroup_root(self) -> CgroupRoot:
        if self._root is None:
            self._root = CgroupRoot.resolve(detect_layout(), self._cgroup_spec)
        return self._root

    def make(self, name: str, container_id: str, state: dict[str, Any]) -> Isolator:
        if name in _CGROUP_ISOLATORS:
            return _CGROUP_ISOLATORS[name](container_id, state, root=self.cgroup_root())
        if name == DiskIsolator.name:
            return DiskIsolator(container_id, state, interval=self.disk_interval)
        cls: Callable[..., Isolator] | None = _PLAIN.get(name)
        if cls is None:
            raise InputError(f"isolator {name}", "unknown")
        return cls(container_id, state)

    def make_all(self, names: Sequence[str], container_id: str,
                 states: dict[str, dict[str, Any]]) -> list[Isolator]:
        return [self.make(n, container_id, states.setdefault(n, {})) for n in names]
