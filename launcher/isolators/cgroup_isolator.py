"""What the cgroups/* isolators share: one container cgroup, checkpointed before it is made.

A subclass names its controllers, how to read its limit from Resources (`limit_of`) and how to
write it (`apply`); creating, joining, updating, killing and removing the cgroup are the same for
all. Several of them may share one CgroupSet (v2, or v1 co-mounts): create and destroy are
idempotent.

Concurrency: as launcher.isolators.base; a few cgroupfs reads and writes, except cleanup(), which
waits (bounded) for killed processes to exit.
"""

from __future__ import annotations

from typing import Any

from launcher.isolators.base import Isolator, LaunchInfo
from launcher.linux.cgroups import CgroupRoot, CgroupSet, container_cgroup, detect_layout
from launcher.spec import ContainerConfig, Resources


class CgroupIsolator(Isolator):
    """`root`: where container cgroups go (from --cgroup-root); None: the default under our own."""

    controllers: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()

    def __init__(self, container_id: str, state: dict[str, Any], *, root: CgroupRoot | None = None) -> None:
        super().__init__(container_id, state)
        self._root = root
        self._cgroup: CgroupSet | None = None

    @staticmethod
    def limit_of(resources: Resources) -> Any:
        raise NotImplementedError

    @staticmethod
    def apply(cg: CgroupSet, limit: Any) -> None:
        raise NotImplementedError

    def _cg(self) -> CgroupSet | None:
        if self._cgroup is None and "cgroup" in self.state:
            self._cgroup = CgroupSet.from_state(self.state["cgroup"])
        return self._cgroup

    def _required(self) -> CgroupSet:
        cg = self._cg()
        if cg is None:
            raise RuntimeError(f"{self.name}: used before prepare() or recover()")
        return cg

    def prepare(self, config: ContainerConfig) -> LaunchInfo | None:
        root = self._root or CgroupRoot.resolve(detect_layout())
        cg = container_cgroup(self.container_id, root, list(self.controllers), optional=list(self.optional))
        self.state["cgroup"] = cg.to_state()  # checkpoint first: cleanup must find what may exist
        self._cgroup = cg
        cg.create()
        self.apply(cg, self.limit_of(config.spec.resources))
        return None

    def isolate(self, pid: int) -> None:
        self._required().add_pid(pid)

    def update(self, resources: Resources) -> None:
        self.apply(self._required(), self.limit_of(resources))

    def cleanup(self) -> None:
        cg = self._cg()
        if cg is not None:
            cg.kill_all()
            cg.destroy()

    def recover(self) -> None:
        self._cg()
