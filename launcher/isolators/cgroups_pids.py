"""cgroups/pids: a ceiling on the container's tasks (pids.max) and its use (pids.current).

pids.max counts tasks, meaning threads as well as processes. A fork or clone past the limit fails
with EAGAIN inside the container, and pids.events `max` counts those refusals. The files are the same
on v1 and v2.

Concurrency: as launcher.isolators.base; every method is a few cgroupfs reads or writes, except
cleanup(), which waits (bounded) for killed processes to exit.
"""

from __future__ import annotations

from typing import Any

from launcher.isolators.base import Isolator, LaunchInfo
from launcher.linux.cgroups import CgroupRoot, CgroupSet, container_cgroup, detect_layout
from launcher.spec import ContainerConfig, Resources


class CgroupsPidsIsolator(Isolator):
    """`root`: where container cgroups go (from --cgroup-root); None: the default under our own."""

    name = "cgroups/pids"

    def __init__(self, container_id: str, state: dict[str, Any], *, root: CgroupRoot | None = None) -> None:
        super().__init__(container_id, state)
        self._root = root
        self._cgroup: CgroupSet | None = None

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
        cg = container_cgroup(self.container_id, root, ["pids"])
        self.state["cgroup"] = cg.to_state()  # checkpoint first: cleanup must find what may exist
        self._cgroup = cg
        cg.create()
        self._apply(cg, config.spec.resources.pids)
        return None

    def isolate(self, pid: int) -> None:
        self._required().add_pid(pid)

    def update(self, resources: Resources) -> None:
        self._apply(self._required(), resources.pids)

    @staticmethod
    def _apply(cg: CgroupSet, limit: int | None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"pids limit must be at least 1, not {limit}")
        cg.write("pids", "pids.max", "max" if limit is None else limit)

    def usage(self) -> dict[str, float]:
        """`threads` (pids.current counts tasks), `processes`, `pids_limit`, `pids_fork_failures`."""
        cg = self._required()
        out: dict[str, float] = {
            "threads": int(cg.read("pids", "pids.current")),
            "processes": len(cg.pids()),
        }
        limit = cg.read("pids", "pids.max")
        if limit != "max":
            out["pids_limit"] = int(limit)
        if cg.has("pids", "pids.events"):
            out["pids_fork_failures"] = cg.read_keyed("pids", "pids.events").get("max", 0)
        return out

    def cleanup(self) -> None:
        cg = self._cg()
        if cg is not None:
            cg.kill_all()
            cg.destroy()

    def recover(self) -> None:
        self._cg()
