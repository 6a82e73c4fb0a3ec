"""cgroups/cpu: CPU weight and quota from Resources.cpus; CPU time for `imagefs stats`.

v1: cpu.shares = 1024 * cpus (at least 2), cpu.cfs_period_us = 100000, cpu.cfs_quota_us = cpus *
period (at least 1000); usage from cpuacct (its own hierarchy, or co-mounted with cpu).
v2: cpu.weight from the same shares, mapped onto 1..10000 as systemd and runc do, and cpu.max
"QUOTA PERIOD"; usage from cpu.stat.

Concurrency: as launcher.isolators.base; every method is a few cgroupfs reads or writes, except
cleanup(), which waits (bounded) for the killed processes to exit.
"""

from __future__ import annotations

import os
from launcher.isolators.cgroup_isolator import CgroupIsolator
from launcher.linux.cgroups import CgroupSet
from launcher.spec import Resources

CFS_PERIOD_US = 100_000
MIN_QUOTA_US = 1_000      # the kernel refuses quotas under 1 ms
MIN_SHARES = 2            # the kernel's floor for cpu.shares
DEFAULT_SHARES = 1024     # the kernel's default (one full CPU's weight)
DEFAULT_WEIGHT = 100      # the v2 default weight


def cpu_shares(cpus: float) -> int:
    return max(MIN_SHARES, int(1024 * cpus))


def cpu_quota_us(cpus: float) -> int:
    return max(MIN_QUOTA_US, int(cpus * CFS_PERIOD_US))


def shares_to_weight(shares: int) -> int:
    """v1 shares (2..262144) onto v2 weight (1..10000), the conversion systemd and runc use."""
    return 1 + ((shares - 2) * 9999) // 262142


class CgroupsCpuIsolator(CgroupIsolator):
    name = "cgroups/cpu"
    controllers = ("cpu",)
    optional = ("cpuacct",)

    @staticmethod
    def limit_of(resources: Resources) -> float | None:
        return resources.cpus

    @staticmethod
    def apply(cg: CgroupSet, cpus: float | None) -> None:
        if cg.version == "v1":
            cg.write("cpu", "cpu.shares", DEFAULT_SHARES if cpus is None else cpu_shares(cpus))
            cg.write("cpu", "cpu.cfs_period_us", CFS_PERIOD_US)   # period before the quota it scales
            cg.write("cpu", "cpu.cfs_quota_us", -1 if cpus is None else cpu_quota_us(cpus))
        else:
            cg.write("cpu", "cpu.weight",
                     DEFAULT_WEIGHT if cpus is None else shares_to_weight(cpu_shares(cpus)))
            quota = "max" if cpus is None else str(cpu_quota_us(cpus))
            cg.write("cpu", "cpu.max", f"{quota} {CFS_PERIOD_US}")

    def usage(self) -> dict[str, float]:
        """Mesos ResourceStatistics names; cpus_total_time_secs is the exact (ns/µs) total."""
        cg = self._required()
        out: dict[str, float] = {}
        if cg.version == "v1":
            if cg.has("cpuacct", "cpuacct.stat"):
                ticks = cg.read_keyed("cpuacct", "cpuacct.stat")      # USER_HZ ticks
                hz = os.sysconf("SC_CLK_TCK")
                out["cpus_user_time_secs"] = ticks.get("user", 0) / hz
                out["cpus_system_time_secs"] = ticks.get("system", 0) / hz
                out["cpus_total_time_secs"] = int(cg.read("cpuacct", "cpuacct.usage")) / 1e9
            stat = cg.read_keyed("cpu", "cpu.stat")
            throttled = stat.get("throttled_time", 0) / 1e9           # ns
            quota = int(cg.read("cpu", "cpu.cfs_quota_us"))
            limit = quota / int(cg.read("cpu", "cpu.cfs_period_us")) if quota > 0 else None
        else:
            stat = cg.read_keyed("cpu", "cpu.stat")                    # µs
            out["cpus_user_time_secs"] = stat.get("user_usec", 0) / 1e6
            out["cpus_system_time_secs"] = stat.get("system_usec", 0) / 1e6
            out["cpus_total_time_secs"] = stat.get("usage_usec", 0) / 1e6
            throttled = stat.get("throttled_usec", 0) / 1e6
            quota_s, _, period_s = cg.read("cpu", "cpu.max").partition(" ")
            limit = int(quota_s) / int(period_s) if quota_s != "max" else None
        out["cpus_nr_periods"] = stat.get("nr_periods", 0)
        out["cpus_nr_throttled"] = stat.get("nr_throttled", 0)
        out["cpus_throttled_time_secs"] = throttled
        if limit is not None:
            out["cpus_limit"] = limit
        return out
