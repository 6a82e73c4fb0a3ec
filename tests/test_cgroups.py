"""cgroups: layout parsing and v2 file logic on synthetic roots; limits, OOM kills, fork bounds,
kills and cleanup on this machine's real cgroups.

Real cgroups are made only below a unique `imagefs-test-<hex>` root inside this process's own
cgroup (per hierarchy). The fixtures SIGKILL the process groups the test started and then remove
every directory below that root, children first, even when the test fails.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from launcher.isolators.cgroups_cpu import (CgroupsCpuIsolator, cpu_quota_us, cpu_shares,
                                            shares_to_weight)
from launcher.isolators.cgroups_memory import REASON_MEMORY, CgroupsMemoryIsolator
from launcher.isolators.cgroups_pids import CgroupsPidsIsolator
from launcher.linux.cgroups import (UNIFIED, CgroupError, CgroupRoot, CgroupSet, Layout,
                                    container_cgroup, detect_layout, parse_mountinfo,
                                    parse_proc_cgroup)
from launcher.spec import ContainerConfig, Resources, TaskSpec

MiB = 1 << 20


def config(container_id: str, **resources: object) -> ContainerConfig:
    spec = TaskSpec(image="oci:unused", resources=Resources(**resources))  # type: ignore[arg-type]
    return ContainerConfig(container_id=container_id, spec=spec, rootfs="/", sandbox="/tmp",
                           argv=["true"], env={}, workdir="/", uid=0, gid=0)


# =============================================================================================
# Synthetic layouts: parsing and path logic

# This machine kind: v1 controllers, memory in a per-session cgroup, a controller-less `unified`.
HYBRID_MOUNTINFO = """\
22 1 0:20 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_CGROUP = """\
9:name=systemd:/
8:pids:/
6:freezer:/
4:memory:/process_api/abc
3:cpuset:/
2:cpuacct:/
1:cpu:/
0::/
"""

# A systemd-style v1 inside a container: cpu,cpuacct co-mounted, memory bind-mounted from
# /docker/abc (mount root), a second mount of the same hierarchy, and an escaped space.
CONTAINER_V1_MOUNTINFO = """\
50 40 0:40 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro,nosuid - cgroup cgroup rw,cpu,cpuacct
51 40 0:41 /docker/abc /sys/fs/cgroup/memory rw,nosuid shared:9 - cgroup cgroup rw,memory
52 40 0:42 /docker/abc /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
53 40 0:41 /docker/abc /mnt/again\\040here rw - cgroup cgroup rw,memory
54 40 0:43 /docker/abc /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
"""
CONTAINER_V1_CGROUP = """\
12:pids:/docker/abc/sub
4:cpu,cpuacct:/docker/abc/sub
3:memory:/docker/abc/sub
1:name=systemd:/docker/abc
"""

V2_MOUNTINFO = "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
V2_OWN = "/system.slice/imagefs.service"


def fake_proc(tmp: Path, mountinfo: str, cgroup: str) -> str:
    (tmp / "proc" / "self").mkdir(parents=True)
    (tmp / "proc" / "self" / "mountinfo").write_text(mountinfo)
    (tmp / "proc" / "self" / "cgroup").write_text(cgroup)
    return str(tmp / "proc")


def test_parsers() -> None:
    mounts = parse_mountinfo(CONTAINER_V1_MOUNTINFO + HYBRID_MOUNTINFO)
    assert [m.fstype for m in mounts].count("cgroup2") == 1
    assert mounts[3].mountpoint == "/mnt/again here" and mounts[0].root == "/docker/abc"
    own = parse_proc_cgroup(CONTAINER_V1_CGROUP + "0::/x (deleted)\n")
    assert own == {"pids": "/docker/abc/sub", "cpu": "/docker/abc/sub", "cpuacct": "/docker/abc/sub",
                   "memory": "/docker/abc/sub", "": "/x"}


def test_hybrid_is_v1_with_the_unified_mount_aside(tmp_path: Path) -> None:
    fs = tmp_path / "fs"
    layout = detect_layout(fake_proc(tmp_path, HYBRID_MOUNTINFO, HYBRID_CGROUP), str(fs))
    assert layout.version == "v1"
    assert {"cpu", "cpuacct", "memory", "pids", "freezer"} <= layout.controllers
    assert "systemd" not in layout.controllers and layout.unified is not None
    assert layout.unified.version == 2 and layout.unified.controllers == frozenset()
    cg = f"{fs}/sys/fs/cgroup"
    assert layout.hierarchy("memory").own_dir == f"{cg}/memory/process_api/abc"

    root = CgroupRoot.resolve(layout)   # default: <own cgroup>/imagefs, per hierarchy
    assert root.dirs["memory"] == f"{cg}/memory/process_api/abc/imagefs"
    assert root.dirs["cpu"] == f"{cg}/cpu/imagefs"
    cpu = container_cgroup("c1", root, ["cpu"], optional=["cpuacct"])
    assert dict(cpu.dirs) == {"cpu": f"{cg}/cpu/imagefs/c1", "cpuacct": f"{cg}/cpuacct/imagefs/c1",
                              "freezer": f"{cg}/freezer/imagefs/c1"}
    mem = container_cgroup("c1", root, ["memory"])
    assert mem.path("memory") == f"{cg}/memory/process_api/abc/imagefs/c1"
    with pytest.raises(CgroupError):
        mem.path("cpu")

    absolute = CgroupRoot.resolve(layout, "/imagefs-x/y")
    assert absolute.dirs["memory"] == f"{cg}/memory/imagefs-x/y"
    for bad in ("../escape", "a/../b", "/"):
        with pytest.raises(CgroupError):
            CgroupRoot.resolve(layout, bad)
    with pytest.raises(CgroupError):
        container_cgroup("a/b", root, ["memory"])
    with pytest.raises(CgroupError, match="not mounted"):
        container_cgroup("c1", root, ["rdma"])


def test_comounted_bind_mounted_v1(tmp_path: Path) -> None:
    fs = tmp_path / "fs"
    layout = detect_layout(fake_proc(tmp_path, CONTAINER_V1_MOUNTINFO, CONTAINER_V1_CGROUP), str(fs))
    assert layout.version == "v1" and layout.unified is None
    cpu = layout.hierarchy("cpuacct")
    assert cpu.controllers == {"cpu", "cpuacct"}
    # The mount shows /docker/abc, so our /docker/abc/sub is "sub" below the mount point.
    assert cpu.own_dir == f"{fs}/sys/fs/cgroup/cpu,cpuacct/sub"
    assert layout.hierarchy("memory").mountpoint == f"{fs}/sys/fs/cgroup/memory"   # first mount wins
    cg = container_cgroup("c1", CgroupRoot.resolve(layout), ["cpu"], optional=["cpuacct"])
    assert cg.directories == [f"{fs}/sys/fs/cgroup/cpu,cpuacct/sub/imagefs/c1"]   # one dir, no freezer
    with pytest.raises(CgroupError, match="not visible"):
        cpu.dir_of("/elsewhere")


def test_no_cgroup_fs(tmp_path: Path) -> None:
    procfs = fake_proc(tmp_path, "22 1 0:20 / /proc rw - proc proc rw\n", "0::/\n")
    with pytest.raises(CgroupError, match="no cgroup"):
        detect_layout(procfs, str(tmp_path))


def test_cpu_arithmetic() -> None:
    assert cpu_shares(0.5) == 512 and cpu_shares(0.001) == 2 and cpu_shares(4) == 4096
    assert cpu_quota_us(0.5) == 50_000 and cpu_quota_us(0.001) == 1_000 and cpu_quota_us(2) == 200_000
    assert shares_to_weight(2) == 1 and shares_to_weight(262144) == 10000
    assert shares_to_weight(1024) == 39


def test_state_round_trip() -> None:
    cg = CgroupSet("v1", {"memory": "/sys/fs/cgroup/memory/x/c1", "freezer": "/sys/fs/cgroup/freezer/x/c1"},
                   ("memory",))
    assert CgroupSet.from_state(json.loads(json.dumps(cg.to_state()))) == cg
    for bad in ({}, {"version": "v3", "dirs": {}}, {"version": "v1", "dirs": {"memory": "relative"}}):
        with pytest.raises(CgroupError):
            CgroupSet.from_state(bad)


# -- a synthetic v2 machine: the files the kernel would show ---------------------------------

V2_FILES = {
    "cgroup.controllers": "cpu memory pids\n", "cgroup.subtree_control": "", "cgroup.procs": "",
    "cgroup.events": "populated 0\nfrozen 0\n", "cgroup.freeze": "0\n", "cgroup.kill": "",
    "cpu.weight": "100\n", "cpu.max": "max 100000\n",
    "cpu.stat": "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\nnr_periods 7\n"
                "nr_throttled 3\nthrottled_usec 1500\n",
    "memory.max": "max\n", "memory.swap.max": "max\n", "memory.current": "4096\n",
    "memory.peak": "8192\n", "memory.stat": "anon 3000\nfile 1000\nkernel 96\n",
    "memory.events": "low 0\nhigh 0\nmax 4\noom 1\noom_kill 0\n",
    "pids.max": "max\n", "pids.current": "3\n", "pids.events": "max 2\n",
}


@dataclass
class FakeV2:
    procfs: str
    fsroot: str
    top: Path     # the cgroup2 mount point
    own: Path     # this "process's" cgroup

    def cgroup(self, rel: str, **override: str) -> Path:
        """A cgroup directory below `own`, with the files the kernel would make."""
        d = self.own / rel
        d.mkdir(parents=True, exist_ok=True)
        for name, text in {**V2_FILES, **override}.items():
            (d / name).write_text(text)
        return d

    def layout(self) -> Layout:
        return detect_layout(self.procfs, self.fsroot)


@pytest.fixture
def fake_v2(tmp_path: Path) -> FakeV2:
    fs = tmp_path / "fs"
    top = fs / "sys" / "fs" / "cgroup"
    top.mkdir(parents=True)
    (top / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (top / "cgroup.subtree_control").write_text("cpu memory pids\n")
    fake = FakeV2(fake_proc(tmp_path, V2_MOUNTINFO, f"0::{V2_OWN}\n"), str(fs), top,
                  top / V2_OWN.lstrip("/"))
    fake.cgroup(".")
    return fake


def test_v2_layout_and_root(fake_v2: FakeV2) -> None:
    layout = fake_v2.layout()
    assert layout.version == "v2" and layout.unified is layout.hierarchies[0]
    assert layout.controllers == {"cpuset", "cpu", "io", "memory", "pids"}
    root = CgroupRoot.resolve(layout)
    assert root.dirs == {UNIFIED: str(fake_v2.own / "imagefs")} and root.enable_from == str(fake_v2.own)
    cg = container_cgroup("c1", root, ["memory"], optional=["cpuacct"])
    assert cg.directories == [str(fake_v2.own / "imagefs" / "c1")] and cg.controllers == ("memory",)
    assert cg.path("memory") == cg.path("anything") == str(fake_v2.own / "imagefs" / "c1")


def test_v2_cpu_isolator_files(fake_v2: FakeV2) -> None:
    fake_v2.cgroup("imagefs")
    leaf = fake_v2.cgroup("imagefs/c1")
    iso = CgroupsCpuIsolator("c1", {}, root=CgroupRoot.resolve(fake_v2.layout()))
    iso.prepare(config("c1", cpus=0.5))
    # Enabled from our own cgroup down to the leaf's parent; never in the leaf, whose processes
    # would make it an "internal" cgroup.
    assert (fake_v2.own / "cgroup.subtree_control").read_text() == "+cpu"
    assert (fake_v2.own / "imagefs" / "cgroup.subtree_control").read_text() == "+cpu"
    assert (leaf / "cgroup.subtree_control").read_text() == ""
    assert (leaf / "cpu.weight").read_text() == str(shares_to_weight(512))
    assert (leaf / "cpu.max").read_text() == "50000 100000"
    iso.update(Resources())
    assert (leaf / "cpu.max").read_text() == "max 100000" and (leaf / "cpu.weight").read_text() == "100"
    assert iso.usage() == {"cpus_user_time_secs": 2.0, "cpus_system_time_secs": 0.5,
                           "cpus_total_time_secs": 2.5, "cpus_nr_periods": 7, "cpus_nr_throttled": 3,
                           "cpus_throttled_time_secs": 0.0015}
    iso.isolate(4242)
    assert (leaf / "cgroup.procs").read_text() == "4242"


async def test_v2_memory_isolator_files_and_oom(fake_v2: FakeV2) -> None:
    fake_v2.cgroup("imagefs", **{"cgroup.subtree_control": "memory\n"})   # already enabled there
    leaf = fake_v2.cgroup("imagefs/c1")
    iso = CgroupsMemoryIsolator("c1", {}, root=CgroupRoot.resolve(fake_v2.layout()))
    iso.prepare(config("c1", mem_bytes=32 * MiB))
    assert (fake_v2.own / "cgroup.subtree_control").read_text() == "+memory"
    assert (fake_v2.own / "imagefs" / "cgroup.subtree_control").read_text() == "memory\n"  # untouched
    assert (leaf / "memory.max").read_text() == str(32 * MiB)
    assert (leaf / "memory.swap.max").read_text() == "0"
    assert not iso.oom_killed()
    assert iso.usage() == {"mem_total_bytes": 4096, "mem_peak_bytes": 8192, "mem_rss_bytes": 3000,
                           "mem_cache_bytes": 1000, "mem_limit_bytes": 32 * MiB, "mem_oom_kills": 0}
    (leaf / "memory.events").write_text("max 9\noom 2\noom_kill 2\n")
    with trio.fail_after(30):   # a hang guard, not a timing assertion: the counter is already set
        limitation = await iso.watch()
    assert limitation.reason == REASON_MEMORY and "2 process(es)" in limitation.message
    assert iso.oom_killed() and iso.state["oom_killed"] is True
    iso.update(Resources())
    assert (leaf / "memory.max").read_text() == "max" and (leaf / "memory.swap.max").read_text() == "max"


def test_v2_pids_isolator_files(fake_v2: FakeV2) -> None:
    fake_v2.cgroup("imagefs")
    leaf = fake_v2.cgroup("imagefs/c1", **{"cgroup.procs": "10\n11\n"})
    fake_v2.cgroup("imagefs/c1/nested", **{"cgroup.procs": "12\n"})
    iso = CgroupsPidsIsolator("c1", {}, root=CgroupRoot.resolve(fake_v2.layout()))
    iso.prepare(config("c1", pids=5))
    assert (leaf / "pids.max").read_text() == "5"
    assert iso.usage() == {"threads": 3, "processes": 3, "pids_limit": 5, "pids_fork_failures": 2}


def test_v2_controller_not_delegated(fake_v2: FakeV2) -> None:
    fake_v2.cgroup(".", **{"cgroup.controllers": "cpu pids\n"})
    fake_v2.cgroup("imagefs/c1")
    iso = CgroupsMemoryIsolator("c1", {}, root=CgroupRoot.resolve(fake_v2.layout()))
    with pytest.raises(CgroupError, match="not delegated"):
        iso.prepare(config("c1", mem_bytes=MiB))
    assert (fake_v2.own / "cgroup.subtree_control").read_text() == ""


def test_cleanup_without_prepare_is_a_no_op() -> None:
    for cls in (CgroupsCpuIsolator, CgroupsMemoryIsolator, CgroupsPidsIsolator):
        iso = cls("never-prepared", {})
        iso.cleanup()
        iso.recover()
    assert not CgroupsMemoryIsolator("never-prepared", {}).oom_killed()


# =============================================================================================
# Real cgroups


def _pids_in(directory: str) -> set[int]:
    try:
        with open(os.path.join(directory, "cgroup.procs")) as f:
            return {int(p) for p in f.read().split()}
    except FileNotFoundError:
        return set()


def _remove_test_root(root: CgroupRoot) -> list[str]:
    """Remove everything below a test root, children first; returns what could not be removed.

    Written independently of CgroupSet.destroy, so a bug there cannot hide a leak. Processes still
    inside are ones this test started (the root is unique to it) that outlived their process group
    kill (e.g. reparented children): wait for them through pidfds, SIGKILLing them if need be."""
    failures = []
    for top in sorted(set(root.dirs.values())):
        if not os.path.isdir(top):
            continue
        for d, _, _ in sorted(os.walk(top), key=lambda w: w[0].count("/"), reverse=True):
            fds = []
            for pid in _pids_in(d):
                try:
                    fds.append(os.pidfd_open(pid))
                except ProcessLookupError:
                    continue
                signal.pidfd_send_signal(fds[-1], signal.SIGKILL)
            for fd in fds:
                select.select([fd], [], [], 10)   # readable once the process has exited
                os.close(fd)
            try:
                os.rmdir(d)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    failures.append(f"{d}: {e.strerror}")
    return failures


def _real_layout() -> Layout:
    if os.geteuid() != 0:
        pytest.skip("real cgroup tests need root")
    try:
        return detect_layout()
    except CgroupError as e:
        pytest.skip(f"no cgroup file system: {e}")


@pytest.fixture
def make_root() -> Iterator:
    """make_root(layout, controllers) → a fresh `imagefs-test-<hex>` root below our own cgroups."""
    made: list[CgroupRoot] = []

    def make(layout: Layout, controllers: tuple[str, ...] = ()) -> CgroupRoot:
        missing = set(controllers) - layout.controllers
        if missing:
            pytest.skip(f"cgroup controllers {sorted(missing)} are not mounted")
        if layout.version == "v2" and controllers:
            # Enabling controllers would write our own cgroup's subtree_control: only run where
            # that is already done for us (a cgroup we did not create is not ours to change).
            own = layout.hierarchies[0].own_dir
            with open(os.path.join(own, "cgroup.subtree_control")) as f:
                if missing := set(controllers) - set(f.read().split()):
                    pytest.skip(f"v2 controllers {sorted(missing)} are not enabled below {own}")
        root = CgroupRoot.resolve(layout, f"imagefs-test-{secrets.token_hex(4)}")
        made.append(root)
        return root

    try:
        yield make
    finally:
        failures = [f for root in made for f in _remove_test_root(root)]
        assert not failures, f"test cgroups left behind: {failures}"


# A child that waits for one line on stdin (so the test can move it into a cgroup first), then
# runs the code in argv[1].
GATE = "import sys; sys.stdin.readline(); exec(sys.argv[1])"


class Children:
    """Children of the test, each the leader of its own process group; close() kills the groups."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, code: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([sys.executable, "-c", GATE, code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.procs.append(p)
        return p

    @staticmethod
    def go(p: subprocess.Popen[bytes]) -> None:
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        p.stdin.flush()

    def close(self) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)   # the group we started: the child and its forks
            except ProcessLookupError:
                pass
            p.wait()
            for stream in (p.stdin, p.stdout, p.stderr):
                if stream is not None:
                    stream.close()


@pytest.fixture
def children(make_root: object) -> Iterator[Children]:
    # Depends on make_root so that its teardown (kill) runs before the cgroups are removed.
    kids = Children()
    try:
        yield kids
    finally:
        kids.close()


def _name() -> str:
    return f"c-{secrets.token_hex(3)}"


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def test_real_default_root_is_below_our_own_cgroup() -> None:
    layout = _real_layout()
    root = CgroupRoot.resolve(layout)   # computed only; nothing is created
    for h in layout.hierarchies:
        for c in h.controllers:
            assert root.dirs.get(c, root.dirs.get(UNIFIED)) == os.path.join(h.own_dir, "imagefs")


async def test_real_memory_limit_oom_kill(make_root, children: Children) -> None:
    root = make_root(_real_layout(), ("memory",))
    cid = _name()
    iso = CgroupsMemoryIsolator(cid, {}, root=root)
    iso.prepare(config(cid, mem_bytes=32 * MiB))
    cg = CgroupSet.from_state(iso.state["cgroup"])
    if cg.version == "v1":
        assert int(cg.read("memory", "memory.limit_in_bytes")) == 32 * MiB
        if cg.has("memory", "memory.memsw.limit_in_bytes"):   # swap cannot dodge the limit
            assert int(cg.read("memory", "memory.memsw.limit_in_bytes")) == 32 * MiB
    else:
        assert cg.read("memory", "memory.max") == str(32 * MiB)
    assert not iso.oom_killed()

    # b"\x01" * n touches every page (bytes(n) would be lazily zero-mapped and never charged).
    p = children.start("x = b'\\x01' * (200 << 20); print('survived', flush=True)")
    iso.isolate(p.pid)
    children.go(p)
    assert p.wait(timeout=120) == -signal.SIGKILL
    assert p.stdout is not None and b"survived" not in p.stdout.read()
    assert iso.oom_killed()
    with trio.fail_after(30):   # a hang guard: the counter is already set, so watch returns at once
        limitation = await iso.watch()
    assert limitation.reason == REASON_MEMORY
    usage = iso.usage()
    assert usage["mem_oom_kills"] >= 1 and usage["mem_limit_bytes"] == 32 * MiB
    iso.cleanup()
    assert not cg.exists() and iso.oom_killed()   # the verdict outlives the cgroup


FORK_BOMB = """
import os, signal, sys
kids = fails = 0
for _ in range(20):
    try:
        pid = os.fork()
    except BlockingIOError:          # EAGAIN: pids.max refused the fork
        fails += 1
        continue
    if pid == 0:
        signal.pause()               # children wait to be killed
        os._exit(0)
    kids += 1
print(kids, fails, flush=True)
sys.stdin.readline()
"""


def test_real_pids_limit_bounds_a_fork_bomb(make_root, children: Children) -> None:
    root = make_root(_real_layout(), ("pids",))
    cid = _name()
    iso = CgroupsPidsIsolator(cid, {}, root=root)
    iso.prepare(config(cid, pids=5))
    cg = CgroupSet.from_state(iso.state["cgroup"])
    assert cg.read("pids", "pids.max") == "5"

    p = children.start(FORK_BOMB)
    iso.isolate(p.pid)
    children.go(p)
    assert p.stdout is not None
    kids, fails = map(int, p.stdout.readline().split())
    assert kids <= 4 and fails >= 16 and kids + fails == 20
    assert int(cg.read("pids", "pids.current")) <= 5
    assert len(cg.pids()) == kids + 1
    usage = iso.usage()
    assert usage["threads"] <= 5 and usage["pids_limit"] == 5 and usage["pids_fork_failures"] >= fails

    cg.kill_all()
    assert cg.pids() == set()
    assert p.wait(timeout=30) == -signal.SIGKILL
    iso.cleanup()
    assert not cg.exists()


FORK_FOREVER = """
import os, sys
print('forking', flush=True)
while True:                          # every process forks for ever; only pids.max bounds them
    try:
        os.fork()
    except OSError:
        pass
"""


def test_real_kill_all_stops_a_live_fork_bomb(make_root, children: Children) -> None:
    root = make_root(_real_layout(), ("pids",))
    cid = _name()
    iso = CgroupsPidsIsolator(cid, {}, root=root)
    iso.prepare(config(cid, pids=16))
    cg = CgroupSet.from_state(iso.state["cgroup"])
    if cg.version == "v1" and "freezer" not in cg.dirs:
        pytest.skip("without a freezer, killing a live fork bomb is a race")
    p = children.start(FORK_FOREVER)
    iso.isolate(p.pid)
    children.go(p)
    assert p.stdout is not None and p.stdout.readline() == b"forking\n"
    iso.cleanup()                    # freezes (or cgroup.kill), so nothing forks while it kills
    assert p.wait(timeout=30) == -signal.SIGKILL
    assert not cg.exists()


def test_real_cpu_limits_and_usage(make_root, children: Children) -> None:
    root = make_root(_real_layout(), ("cpu",))
    cid = _name()
    iso = CgroupsCpuIsolator(cid, {}, root=root)
    iso.prepare(config(cid, cpus=0.5))
    cg = CgroupSet.from_state(iso.state["cgroup"])

    def limits() -> tuple[str, ...]:
        if cg.version == "v1":
            return tuple(cg.read("cpu", f) for f in ("cpu.shares", "cpu.cfs_period_us", "cpu.cfs_quota_us"))
        return cg.read("cpu", "cpu.weight"), cg.read("cpu", "cpu.max")

    v1 = cg.version == "v1"
    assert limits() == (("512", "100000", "50000") if v1 else (str(shares_to_weight(512)), "50000 100000"))
    iso.update(Resources(cpus=0.001))   # the kernel's floors
    assert limits() == (("2", "100000", "1000") if v1 else ("1", "1000 100000"))
    iso.update(Resources(cpus=2))
    assert limits() == (("2048", "100000", "200000") if v1 else (str(shares_to_weight(2048)), "200000 100000"))
    assert iso.usage()["cpus_limit"] == 2

    p = children.start("sum(range(20_000_000))")   # a fixed amount of work, however long it takes
    iso.isolate(p.pid)
    children.go(p)
    assert p.wait(timeout=300) == 0
    usage = iso.usage()
    assert usage["cpus_total_time_secs"] > 0
    assert usage["cpus_user_time_secs"] + usage["cpus_system_time_secs"] > 0
    iso.cleanup()
    assert not cg.exists()


def test_real_cleanup_kills_and_removes_and_is_idempotent(make_root, children: Children) -> None:
    root = make_root(_real_layout(), ("cpu", "memory", "pids"))
    cid = _name()
    isolators = [cls(cid, {}, root=root)
                 for cls in (CgroupsCpuIsolator, CgroupsMemoryIsolator, CgroupsPidsIsolator)]
    for iso in isolators:
        iso.prepare(config(cid, cpus=1, mem_bytes=256 * MiB, pids=50))
    sets = [CgroupSet.from_state(iso.state["cgroup"]) for iso in isolators]
    # The isolators agree on the path: one name in every hierarchy (one directory on v2).
    assert len({os.path.basename(d) for s in sets for d in s.directories}) == 1

    p = children.start("sys.stdin.readline()")   # blocks until killed
    for iso in isolators:
        iso.isolate(p.pid)
    children.go(p)
    assert all(p.pid in s.pids() for s in sets)
    # A cgroup the container made inside its own: cleanup must remove it first.
    nested = CgroupSet(sets[1].version, {k: os.path.join(v, "nested") for k, v in sets[1].dirs.items()})
    nested.create()

    for iso in reversed(isolators):   # the containerizer's order: reverse of prepare
        iso.cleanup()
    assert p.wait(timeout=30) == -signal.SIGKILL
    assert not any(s.exists() for s in sets) and not nested.exists()
    for iso in isolators:
        iso.cleanup()                 # idempotent
    assert root.remove()


def test_real_recover_then_cleanup(make_root, children: Children) -> None:
    root = make_root(_real_layout(), ("memory",))
    cid = _name()
    first = CgroupsMemoryIsolator(cid, {}, root=root)
    first.prepare(config(cid, mem_bytes=64 * MiB))
    p = children.start("sys.stdin.readline()")
    first.isolate(p.pid)
    children.go(p)

    saved = json.loads(json.dumps({"isolators": {first.name: first.state}}))  # as in state.json
    again = CgroupsMemoryIsolator(cid, saved["isolators"]["cgroups/mem"])  # no root: all from state
    again.recover()
    assert again.usage()["mem_limit_bytes"] == 64 * MiB
    assert not again.oom_killed()
    again.cleanup()
    assert p.wait(timeout=30) == -signal.SIGKILL
    assert not CgroupSet.from_state(again.state["cgroup"]).exists()


def test_real_kill_all_reaches_nested_cgroups(make_root, children: Children) -> None:
    root = make_root(_real_layout(), ("pids",))
    outer = container_cgroup(_name(), root, ["pids"])
    outer.create()
    inner = CgroupSet(outer.version, {k: os.path.join(v, "inner") for k, v in outer.dirs.items()})
    inner.create()
    a, b = children.start("sys.stdin.readline()"), children.start("sys.stdin.readline()")
    outer.add_pid(a.pid)
    inner.add_pid(b.pid)
    assert outer.pids() == {a.pid, b.pid} and inner.pids() == {b.pid}
    outer.kill_all()
    assert outer.pids() == set()
    assert a.wait(timeout=30) == b.wait(timeout=30) == -signal.SIGKILL
    outer.destroy()
    assert not outer.exists() and not inner.exists()
    outer.destroy()   # idempotent


@pytest.mark.parametrize("use_kill_file", [True, False], ids=["cgroup.kill", "freeze-and-signal"])
def test_real_v2_core_on_the_unified_mount(make_root, children: Children, use_kill_file: bool) -> None:
    """The v2 code paths on a real cgroup2 mount: on a hybrid machine the `unified` mount has no
    controllers of ours, but membership, cgroup.freeze, cgroup.kill and rmdir are the real thing."""
    layout = _real_layout()
    if layout.unified is None:
        pytest.skip("no cgroup2 mount")
    v2 = layout.v2_view()
    root = make_root(v2)
    cg = container_cgroup(_name(), root, [])
    cg.create()
    if not os.path.exists(os.path.join(cg.dirs[UNIFIED], "cgroup.freeze")):
        pytest.skip("cgroup.freeze needs Linux 5.2+")
    p = children.start(FORK_BOMB)    # no pids limit here: all 20 forks succeed
    cg.add_pid(p.pid)
    children.go(p)
    assert p.stdout is not None
    assert p.stdout.readline().split() == [b"20", b"0"]
    assert len(cg.pids()) == 21
    assert cg.freeze()
    assert "frozen 1" in _read(os.path.join(cg.dirs[UNIFIED], "cgroup.events"))
    cg.thaw()
    cg.kill_all(use_kill_file=use_kill_file)
    assert cg.pids() == set()
    assert p.wait(timeout=30) == -signal.SIGKILL
    cg.destroy()
    assert not cg.exists()
