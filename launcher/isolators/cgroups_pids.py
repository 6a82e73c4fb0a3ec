"""cgroups/pids: a ceiling on the container's tasks (pids.max) and its use (pids.current).

pids.max counts tasks, meaning threads as well as processes. A fork or clone past the limit fails
with EAGAIN inside the container, and pids.events `max` counts those refusals. The files are the same
on v1 and v2.

Concurrency: as launcher.isolators.base; every method is a few cgroupfs reads or writes, except
cleanup(), which waits (bounded) for killed processes to exit.
"""

from __future__ import annotations

from launcher.isolators.cgroup_isolator import CgroupIsolator
from launcher.linux.cgroups import CgroupSet
from launcher.spec import Resources


class CgroupsPidsIsolator(CgroupIsolator):
    name = "cgroups/pids"
    controllers = ("pids",)

    @staticmethod
    def limit_of(resources: Resources) -> int | None:
        return resources.pids

    @staticmethod
    def apply(cg: CgroupSet, limit: int | None) -> None:
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
