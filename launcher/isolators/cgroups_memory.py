"""cgroups/mem: the memory limit, memory usage, and OOM kills as a Mesos memory limitation.

v1: memory.limit_in_bytes, and memory.memsw.limit_in_bytes (memory + swap) when swap accounting
offers it, at the same value, so swap cannot dodge the limit. OOM kills are counted in
memory.oom_control's `oom_kill` (Linux 4.13+); older kernels only give `under_oom` and
memory.failcnt, which we read as a heuristic.
v2: memory.max, and memory.swap.max = 0 when it exists; OOM kills from memory.events `oom_kill`
(it counts the whole subtree).

Reading OOM kills: watch() polls the counter every WATCH_INTERVAL seconds while the container runs.
This is a watch on a kernel counter, not synchronisation. After the processes are gone,
oom_killed() checks once. Call it before cleanup: on v2 the isolators share one directory, and
whichever cleans up first removes it. A positive answer is kept in state, so it survives that.

Concurrency: as launcher.isolators.base. watch() awaits trio.sleep between reads; the others are a
few cgroupfs reads or writes, except cleanup(), which waits (bounded) for killed processes to exit.
"""

from __future__ import annotations

from launcher.isolators.base import Limitation
from launcher.isolators.cgroup_isolator import CgroupIsolator
from launcher.linux.cgroups import CgroupError, CgroupSet
from launcher.spec import Resources

WATCH_INTERVAL = 0.5
REASON_MEMORY = "REASON_CONTAINER_LIMITATION_MEMORY"
_V1_UNLIMITED = 1 << 62   # v1 reports "no limit" as a page-rounded LONG_MAX


class CgroupsMemoryIsolator(CgroupIsolator):
    name = "cgroups/mem"
    controllers = ("memory",)

    @staticmethod
    def limit_of(resources: Resources) -> int | None:
        return resources.mem_bytes

    @staticmethod
    def apply(cg: CgroupSet, limit: int | None) -> None:
        if cg.version == "v2":
            cg.write("memory", "memory.max", "max" if limit is None else limit)
            if cg.has("memory", "memory.swap.max"):
                cg.write("memory", "memory.swap.max", "max" if limit is None else 0)
            return
        value = -1 if limit is None else limit
        if not cg.has("memory", "memory.memsw.limit_in_bytes"):
            cg.write("memory", "memory.limit_in_bytes", value)
            return
        # The kernel insists memsw >= limit at every moment: raise memsw first when the limit grows,
        # lower it last when the limit shrinks.
        current = int(cg.read("memory", "memory.limit_in_bytes"))
        files = ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
        if value == -1 or value > current:
            files.reverse()
        for file in files:
            cg.write("memory", file, value)

    # -- OOM ----------------------------------------------------------------------------------

    def _oom_kills(self, cg: CgroupSet) -> int | None:
        """OOM kills counted in the cgroup, or None if the cgroup is gone."""
        try:
            if cg.version == "v2":
                return cg.read_keyed("memory", "memory.events").get("oom_kill", 0)
            control = cg.read_keyed("memory", "memory.oom_control")
            if "oom_kill" in control:
                return control["oom_kill"]
            # Before 4.13 there is no counter. Under OOM now, or the limit was hit (failcnt), is
            # the best guess: hitting the limit usually reclaims, so this can over-report.
            hit = control.get("under_oom", 0) > 0 or int(cg.read("memory", "memory.failcnt")) > 0
            return 1 if hit else 0
        except CgroupError:
            if not cg.exists():
                return None
            raise

    def oom_killed(self) -> bool:
        """Whether the kernel OOM-killed a process of the container; for after it exited."""
        cg = self._cg()
        kills = self._oom_kills(cg) if cg is not None else None
        if kills:
            self.state["oom_killed"] = True
        return bool(self.state.get("oom_killed", False))

    async def watch(self) -> Limitation:
        import trio

        while True:
            cg = self._cg()
            kills = self._oom_kills(cg) if cg is not None else None
            if cg is None or kills is None:
                await trio.sleep_forever()   # no cgroup (any more): nothing to watch
                raise AssertionError("unreachable")
            if kills:
                self.state["oom_killed"] = True
                limit = self._limit(cg)
                return Limitation(REASON_MEMORY, f"Memory limit exceeded: the OOM killer killed "
                                                 f"{kills} process(es) of a container limited to "
                                                 f"{limit if limit is not None else 'no'} bytes")
            await trio.sleep(WATCH_INTERVAL)

    # -- usage --------------------------------------------------------------------------------

    @staticmethod
    def _limit(cg: CgroupSet) -> int | None:
        try:
            if cg.version == "v2":
                text = cg.read("memory", "memory.max")
                return None if text == "max" else int(text)
            value = int(cg.read("memory", "memory.limit_in_bytes"))
            return None if value >= _V1_UNLIMITED else value
        except CgroupError:
            return None

    def usage(self) -> dict[str, float]:
        """Mesos ResourceStatistics names, plus mem_peak_bytes and mem_oom_kills."""
        cg = self._required()
        out: dict[str, float] = {}
        if cg.version == "v2":
            out["mem_total_bytes"] = int(cg.read("memory", "memory.current"))
            if cg.has("memory", "memory.peak"):              # Linux 5.19+
                out["mem_peak_bytes"] = int(cg.read("memory", "memory.peak"))
            stat = cg.read_keyed("memory", "memory.stat")
            out["mem_rss_bytes"] = stat.get("anon", 0)
            out["mem_cache_bytes"] = stat.get("file", 0)
            if cg.has("memory", "memory.swap.current"):
                out["mem_swap_bytes"] = int(cg.read("memory", "memory.swap.current"))
        else:
            out["mem_total_bytes"] = int(cg.read("memory", "memory.usage_in_bytes"))
            out["mem_peak_bytes"] = int(cg.read("memory", "memory.max_usage_in_bytes"))
            stat = cg.read_keyed("memory", "memory.stat")
            # total_*: this cgroup and its descendants (the container may nest cgroups).
            out["mem_rss_bytes"] = stat.get("total_rss", stat.get("rss", 0))
            out["mem_cache_bytes"] = stat.get("total_cache", stat.get("cache", 0))
            if "total_swap" in stat:
                out["mem_swap_bytes"] = stat["total_swap"]
        limit = self._limit(cg)
        if limit is not None:
            out["mem_limit_bytes"] = limit
        kills = self._oom_kills(cg)
        if kills is not None:
            out["mem_oom_kills"] = kills
        return out

    def cleanup(self) -> None:
        if self._cg() is not None:
            self.oom_killed()   # keep the verdict in state before the counter disappears
        super().cleanup()
