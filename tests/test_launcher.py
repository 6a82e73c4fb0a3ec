"""imagefs run end to end: real cgroups, namespaces, FUSE and overlayfs, through the CLI.

Each test gets its own store, work dir and cgroup root (a unique name below this process's own
cgroup); the fixture runs `imagefs recover` and removes the cgroup root whatever happened, and the
module checks that nothing is left: no mount under its temp dirs, no cgroup, no process.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.mounts import Cli, needs_fuse
from tests.support.aci import aci_manifest, publish
from tests.support.images import Member, OciLayout, busybox_members, layer_tar, push, wait_until

pytestmark = needs_fuse


@pytest.fixture(scope="module")
def image(tmp_path_factory, registry):
    layout = OciLayout(tmp_path_factory.mktemp("launcher") / "layout")
    app = [Member("app", "dir"), Member("app/hello", data=b"hello from the image\n"),
           Member("app/notexec", data=b"#!/bin/sh\necho no\n", mode=0o644),
           Member("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home:/bin/sh\n"),
           Member("etc/group", data=b"root:x:0:\nusers:x:1000:user\n")]
    layout.add_image([(layer_tar(busybox_members()), "gzip"), (layer_tar(app), "gzip")], tag="t",
                     config={"Cmd": ["/bin/sh", "-c", "echo default-cmd"], "Env": ["PATH=/bin", "FROM_IMAGE=yes"],
                             "WorkingDir": "/app"})
    ref = registry.ref("launcher/busybox:1")
    push(layout.path, "t", ref)
    return ref


def mounts_under(path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if str(path) in line]


class Launcher:
    def __init__(self, tmp: Path) -> None:
        self.cli = Cli(tmp / "store", tmp / "work")
        self.cgroup_root = f"imagefs-test-{secrets.token_hex(4)}"
        self.tmp = tmp

    def run(self, *args: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.cli.run("--cgroup-root", self.cgroup_root, *args, check=check, timeout=timeout)

    def popen(self, *args: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "imagefs", "--store", str(self.cli.store), "--work-dir", str(self.cli.work),
               "--cgroup-root", self.cgroup_root, *args]
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def cleanup(self) -> None:
        self.run("recover")
        from launcher.linux.cgroups import CgroupRoot, detect_layout

        root = CgroupRoot.resolve(detect_layout(), self.cgroup_root)
        for d in root.dirs.values():
            if os.path.isdir(d):
                for child in os.listdir(d):
                    path = os.path.join(d, child)
                    if os.path.isdir(path):
                        os.rmdir(path)
        root.remove()


@pytest.fixture
def launcher(tmp_path):
    lx = Launcher(tmp_path)
    try:
        yield lx
    finally:
        lx.cleanup()
        leftovers = mounts_under(tmp_path)
        assert not leftovers, leftovers


def sh(launcher: Launcher, image: str, script: str, *opts: str) -> subprocess.CompletedProcess:
    return launcher.run("run", *opts, image, "--", "sh", "-c", script)


def test_pid1_hostname_network_sandbox(launcher, image):
    r = sh(launcher, image, "echo pid=$$; cat /proc/1/cmdline | tr '\\0' ' '; echo; hostname; "
           "ls /sys/class/net; echo $MESOS_SANDBOX; echo data > /mnt/mesos/sandbox/out; pwd; echo $FROM_IMAGE",
           "--hostname", "box1", "--name", "c1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "pid=2"  # the task; PID 1 is the container's init
    assert "launcher.init" in lines[1]
    assert lines[2] == "box1"
    assert lines[3:4] == ["lo"]
    assert lines[4] == "/mnt/mesos/sandbox"
    assert lines[5] == "/app" and lines[6] == "yes"  # WorkingDir and Env from the image config
    sandbox = launcher.cli.work / "containers" / "c1" / "sandbox"
    assert (sandbox / "out").read_text() == "data\n"
    assert "pid=2" in (sandbox / "stdout").read_text()


def test_exit_status_and_launch_failures(launcher, image):
    assert sh(launcher, image, "exit 3").returncode == 3
    r = launcher.run("run", image, "--", "/no/such/binary")
    assert r.returncode == 127 and "not found" in r.stderr.lower()
    r = launcher.run("run", image, "--", "/app/notexec")
    assert r.returncode == 126
    r = sh(launcher, image, "kill -9 $$")
    assert r.returncode == 137
    r = launcher.run("run", "docker://127.0.0.1:1/nothing:here", "--", "true")
    assert r.returncode == 125 and r.stderr.count("\n") == 1
    r = launcher.run("run", "--memory", "lots", image, "--", "true")
    assert r.returncode == 125 and "--memory" in r.stderr
    r = launcher.run("run", image)  # the image's Cmd
    assert r.returncode == 0 and r.stdout == "default-cmd\n"


def test_rootfs_writes_are_private_and_vanish(launcher, image):
    r = sh(launcher, image, "echo changed > /app/hello; rm /bin/true; echo new > /newfile; cat /app/hello",
           "--name", "w1")
    assert r.returncode == 0 and r.stdout == "changed\n"
    r = sh(launcher, image, "cat /app/hello; ls /newfile 2>&1; test -e /bin/true && echo true-is-back")
    assert r.stdout.splitlines()[0] == "hello from the image"
    assert "true-is-back" in r.stdout and "No such file" in r.stdout
    backends = launcher.cli.work / "containers" / "w1" / "backends"
    assert not any(backends.rglob("newfile")), "the first container's upper dir survived it"


def test_volumes_ro_rw_and_user(launcher, image, tmp_path):
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    rw.chmod(0o777)  # the task runs as uid 1000
    (ro / "f").write_text("host file\n")
    r = sh(launcher, image, "cat /ro/f; echo x > /ro/g 2>/dev/null || echo ro-refused; echo y > /rw/g; id -u",
           "--volume", f"{ro}:/ro:ro", "--volume", f"{rw}:/rw", "--user", "user")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["host file", "ro-refused", "1000"]
    assert (rw / "g").read_text() == "y\n" and not (ro / "g").exists()


def test_cgroup_limits(launcher, image):
    # memory: an OOM kill is reported as the reason
    r = sh(launcher, image, "x=$(yes | head -c 200000000 | tr -d '\\n'); echo survived", "--memory", "32m")
    assert r.returncode == 137
    assert "REASON_CONTAINER_LIMITATION_MEMORY" in r.stderr
    # pids: forks beyond the limit fail (busybox sh gives up with "can't fork", status 2)
    fork_ten = "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 30 & done; echo all-started"
    r = sh(launcher, image, fork_ten, "--pids", "5")
    assert r.returncode == 2 and "can't fork" in r.stderr and "all-started" not in r.stdout
    r = sh(launcher, image, fork_ten, "--pids", "50")
    assert r.returncode == 0 and "all-started" in r.stdout
    # cpu: quota and shares from --cpus, read from the container's own cgroup by stats
    p = launcher.popen("run", "--cpus", "0.5", "--name", "cpu1", image, "--", "sleep", "60")
    try:
        state = launcher.cli.work / "containers" / "cpu1" / "state.json"
        wait_until(lambda: state.exists() and json.loads(state.read_text())["status"] == "running", 60, "running")
        cg = json.loads(state.read_text())["isolators"]["cgroups/cpu"]["cgroup"]
        cpu_dir = next(d for c, d in cg["dirs"].items() if c == "cpu") if "dirs" in cg else None
        if cpu_dir:
            assert Path(cpu_dir, "cpu.cfs_quota_us").read_text().strip() == "50000"
        stats = json.loads(launcher.run("stats", "--json", "cpu1", check=True).stdout)
        assert "cpus_user_time_secs" in stats
        launcher.run("kill", "cpu1", check=True)
        assert p.wait(60) == 137
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_two_tasks_share_one_image_mount(launcher, image):
    procs = [launcher.popen("run", "--name", f"s{i}", image, "--", "sleep", "60") for i in range(2)]
    try:
        states = [launcher.cli.work / "containers" / f"s{i}" / "state.json" for i in range(2)]
        wait_until(lambda: all(s.exists() and json.loads(s.read_text())["status"] == "running" for s in states),
                   60, "both running")
        fuse = [line for line in mounts_under(launcher.cli.work) if "fuse" in line]
        assert len(fuse) == 1, fuse
        ps = launcher.run("ps", check=True).stdout
        assert "s0" in ps and "s1" in ps and "running" in ps
        for i in range(2):
            launcher.run("kill", f"s{i}", "TERM", check=True)
        assert [p.wait(60) for p in procs] == [143, 143]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert not mounts_under(launcher.cli.work)


def test_launcher_killed_then_recover_cleans_up(launcher, image):
    p = launcher.popen("run", "--name", "orphan", image, "--", "sleep", "300")
    state_path = launcher.cli.work / "containers" / "orphan" / "state.json"
    wait_until(lambda: state_path.exists() and json.loads(state_path.read_text())["status"] == "running", 60, "running")
    p.kill()  # kill -9 of the launcher mid-task
    p.wait()
    state = json.loads(state_path.read_text())
    monitor = state["pid"]
    assert psutil.pid_exists(monitor)  # the container outlives its launcher
    r = launcher.run("recover", check=True)
    assert "running: 1" in r.stdout  # still running: left alone, reattachable
    launcher.run("kill", "orphan", check=True)
    wait_until(lambda: not psutil.pid_exists(monitor) or psutil.Process(monitor).status() == psutil.STATUS_ZOMBIE,
               30, "monitor exit")
    r = launcher.run("recover", check=True)
    assert "destroyed orphan" in r.stdout
    assert json.loads(state_path.read_text())["status"] == "terminated"
    assert not mounts_under(launcher.cli.work)
    cg = state["isolators"]["cgroups/mem"]["cgroup"]
    for d in (cg.get("dirs") or {}).values():
        assert not os.path.exists(d)


def test_detach_wait(launcher, image):
    r = launcher.run("run", "-d", "--name", "bg", image, "--", "sh", "-c", "exit 7", check=True)
    assert r.stdout.strip() == "bg"
    r = launcher.run("wait", "bg")
    assert r.returncode == 7 and r.stdout.strip() == "7"


def test_seed_appc_task_with_five_volumes(launcher, tmp_path):
    """The seed talk's task: an Appc image found by simple discovery (name + version label) and
    the five volumes (one sandbox-relative, /etc read-only)."""
    discovery = tmp_path / "acis"
    manifest = aci_manifest("acme.biz/appc/ubuntu1510", {"version": "0.0.1"}, exec_=["/bin/sh"])
    publish(discovery, manifest, busybox_members())
    task = {
        "name": "seed", "command": {"value": "cat /etc/hostname >/dev/null && test -d /root && "
                                            "test -d /var/run && echo ok > /tmp/from-task; "
                                            "touch /etc/x 2>/dev/null && echo etc-writable || echo etc-read-only", "shell": True},
        "resources": {"cpus": 0.5, "mem": 64},
        "container": {"type": "MESOS", "mesos": {"image": {"type": "APPC", "appc": {
            "name": "acme.biz/appc/ubuntu1510", "labels": {"labels": [{"key": "version", "value": "0.0.1"}]}}}},
            "volumes": [
                {"container_path": "/tmp", "host_path": "tmp", "mode": "RW"},
                {"container_path": "/root", "host_path": "/root", "mode": "RW"},
                {"container_path": "/etc", "host_path": "/etc", "mode": "RO"},
                {"container_path": "/var/run", "host_path": "/var/run", "mode": "RW"},
                {"container_path": "/var/tmp", "host_path": "/var/tmp", "mode": "RW"}]}}
    path = tmp_path / "task.json"
    path.write_text(json.dumps(task))
    r = launcher.run("--appc-discovery", str(discovery), "run", "--task", str(path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "etc-read-only"
    sandbox = launcher.cli.work / "containers" / "seed" / "sandbox"
    assert (sandbox / "tmp" / "from-task").read_text() == "ok\n"


def test_gc_keeps_images_running_containers_use(launcher, image):
    launcher.run("run", "-d", "--name", "gc1", image, "--", "sleep", "60", check=True)
    indexes = launcher.cli.store / "indexes"
    before = set(os.listdir(indexes))
    launcher.run("rmi", image, check=True)
    assert "removed 0 images" in launcher.run("gc", check=True).stdout
    assert set(os.listdir(indexes)) == before
    launcher.run("kill", "gc1", check=True)
    assert launcher.run("wait", "gc1").returncode == 137
    assert "removed 1 images" in launcher.run("gc", check=True).stdout
    assert os.listdir(indexes) == []


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(text in a for a in p.info["cmdline"] or []):
                found.append(p.pid)
        except psutil.Error:
            pass
    return found


def test_launcher_killed_while_pulling_leaves_nothing(launcher):
    """The init (and a standby mount server) start before the pull: a launcher killed while the
    registry keeps it waiting leaves them to end by themselves, and recover to clean up the rest."""
    import socket

    with socket.create_server(("127.0.0.1", 0), backlog=8) as silent:  # accepts, never answers
        ref = f"docker://127.0.0.1:{silent.getsockname()[1]}/hang/here:1"
        p = launcher.popen("run", "--name", "early", ref, "--", "true")
        work = str(launcher.cli.work)
        try:
            wait_until(lambda: any("launcher.init" in " ".join(psutil.Process(pid).cmdline())
                                   for pid in _processes_mentioning(work)), 60, "the init started")
        finally:
            p.kill()  # kill -9 of the launcher mid-pull
            p.wait()
        wait_until(lambda: not _processes_mentioning(work), 60, "the init and standby server exit")
    r = launcher.run("recover", check=True)
    assert "destroyed early" in r.stdout
    state = json.loads((launcher.cli.work / "containers" / "early" / "state.json").read_text())
    assert state["status"] == "terminated"


def test_procfs_start_times_are_psutils(tmp_path):
    from launcher.linux import procfs

    child = subprocess.Popen(["sleep", "60"])
    try:
        for pid in (1, os.getpid(), child.pid):
            assert procfs.start_time(pid) == psutil.Process(pid).create_time()
        start = procfs.start_time(child.pid)
        assert procfs.is_running(child.pid, start)
        assert not procfs.is_running(child.pid, start - 5) and not procfs.is_running(child.pid, None)
        assert not procfs.wait_gone(child.pid, start, 0.05)   # still running
        child.kill()
        assert procfs.wait_exit(child.pid, 10)
        assert not procfs.is_running(child.pid, start)   # a zombie is no longer running
        assert procfs.wait_gone(child.pid, start, 10)    # our zombie: we reap it ourselves
    finally:
        child.kill()
        child.wait()
    with pytest.raises(ProcessLookupError):
        procfs.start_time(child.pid)
    assert procfs.wait_exit(child.pid, 0) and not procfs.is_running(child.pid, start)
    # Not our child: gone once its parent (here a shell) has reaped it.
    shell = subprocess.Popen(["sh", "-c", "sleep 0.2 & echo $!; wait; sleep 60"], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(shell.stdout.readline())
        started = procfs.start_time(grandchild)
        assert procfs.wait_gone(grandchild, started, 10)
        assert not procfs.is_running(grandchild, started)
        with pytest.raises(ProcessLookupError):   # reaped: no zombie left (pids are not reused so soon)
            procfs.start_time(grandchild)
    finally:
        shell.kill()
        shell.wait()
        shell.stdout.close()
