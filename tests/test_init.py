"""The container init and its isolators, end to end: real namespaces, mounts and pivot_root.

Each test extracts the busybox test layer into its own rootfs under tmp_path, starts the init with
launcher/launch.py and checks what busybox commands see inside, through the sandbox's stdout file.
Waiting is on events only: the container's exit, or a FIFO in the sandbox the task writes to when
it is ready. Every fixture checks on the way out that no mount under tmp_path is left on the host.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

from imagefs.errors import ImagefsError, InputError
from launcher.init import InitConfig, LaunchError
from launcher.isolators.filesystem import FilesystemLinuxIsolator
from launcher.isolators.namespaces import (IpcNamespaceIsolator, NetworkHostIsolator, NetworkNoneIsolator,
                                           PidNamespaceIsolator, UtsNamespaceIsolator)
from launcher.isolators.volumes import VolumeHostPathIsolator, volume_mount
from launcher.launch import ExitStatus, InitProcess, init_config, spawn_init, start_init, wait_pid
from launcher.spec import SANDBOX_PATH, ContainerConfig, TaskSpec, Volume
from tests.support.images import busybox_members, layer_tar

ALL_NAMESPACES = ["pid", "mnt", "uts", "ipc", "net"]


def _namespaces_work() -> str | None:
    """None if this machine lets us make the namespaces; else why not."""
    if os.geteuid() != 0:
        return "needs root (namespaces, mounts, pivot_root)"
    if not os.path.exists("/bin/busybox"):
        return "needs busybox-static"
    probe = ("from launcher.linux import syscalls as s; "
             "s.unshare(s.namespace_flags(['mnt','uts','ipc','net','pid']))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parent.parent)
    return None if r.returncode == 0 else f"cannot create namespaces here: {r.stderr.strip()[-200:]}"


_why_not = _namespaces_work()


def needs_namespaces(test: Any) -> Any:
    return pytest.mark.root(pytest.mark.skipif(_why_not is not None, reason=_why_not or "")(test))


@dataclass
class Run:
    status: ExitStatus
    stdout: str
    stderr: str


class Box:
    """One container's directories, and the inits started in them (closed by the fixture)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.dir = tmp_path / "container"
        self.rootfs = self.dir / "rootfs"
        self.sandbox = self.dir / "sandbox"
        self.rootfs.mkdir(parents=True)
        self.sandbox.mkdir()
        with tarfile.open(fileobj=io.BytesIO(layer_tar(busybox_members()))) as tar:
            tar.extractall(self.rootfs)
        self.inits: list[InitProcess] = []

    def config(self, argv: list[str], **overrides: Any) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "rootfs": str(self.rootfs), "sandbox": str(self.sandbox), "argv": argv,
            "env": {"PATH": "/bin", "HOME": "/root"}, "workdir": "/", "uid": 0, "gid": 0,
            "hostname": "box", "namespaces": list(ALL_NAMESPACES), "loopback_up": True, "mounts": [],
        }
        cfg.update(overrides)
        return cfg

    async def spawn(self, config: dict[str, Any]) -> InitProcess:
        init = await spawn_init(config, self.dir)
        self.inits.append(init)
        return init

    def output(self) -> tuple[str, str]:
        return (self.sandbox / "stdout").read_text(), (self.sandbox / "stderr").read_text()

    async def run(self, argv: list[str], **overrides: Any) -> Run:
        init = await self.spawn(self.config(argv, **overrides))
        await init.go()
        status = await init.wait()
        return Run(status, *self.output())

    async def sh(self, script: str, **overrides: Any) -> Run:
        return await self.run(["sh", "-c", script], **overrides)

    def fifo(self, name: str = "ready") -> Path:
        path = self.sandbox / name
        os.mkfifo(path)
        return path

    async def wait_ready(self, init: InitProcess, fifo: Path) -> None:
        """Wait until the task writes to *fifo*; fail (not hang) if the container ends first.
        Open the FIFO before go(): the task's open for writing blocks until a reader exists."""
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            async with trio.open_nursery() as nursery:
                async def ended() -> None:
                    status = await init.wait()
                    raise AssertionError(f"container ended before it was ready: {status} {self.output()}")

                nursery.start_soon(ended)
                await trio.lowlevel.wait_readable(fd)
                nursery.cancel_scope.cancel()
        finally:
            os.close(fd)


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if str(path) in line]


@pytest.fixture
async def box(tmp_path: Path) -> AsyncIterator[Box]:
    if _why_not is not None:
        pytest.skip(_why_not)
    b = Box(tmp_path)
    try:
        yield b
    finally:
        for init in b.inits:
            await init.aclose()
    assert _mounts_under(tmp_path) == [], "mounts leaked to the host"
    # The mounts lived in the container's namespace only: the rootfs on the host is untouched.
    for d in ("proc", "sys", "dev"):
        assert list((b.rootfs / d).iterdir()) == [], f"/{d} of the rootfs was written to"


def _host_pids_in_pid_ns(ns: str) -> list[int]:
    """Live processes in the pid namespace *ns*. A zombie is left out: it is dead, and an init
    whose monitor was killed is reaped by the host's init, on its own time."""
    found = []
    for pid in psutil.pids():
        try:
            if os.readlink(f"/proc/{pid}/ns/pid") == ns and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                found.append(pid)
        except (OSError, psutil.Error):
            pass
    return found


# ---- what the task sees ---------------------------------------------------------------------------

@needs_namespaces
async def test_task_runs_under_our_pid1(box: Box) -> None:
    r = await box.sh("echo $$; cat /proc/1/cmdline; echo; ls /proc")
    assert r.status == ExitStatus(0, None, None), r
    lines = r.stdout.splitlines()
    assert int(lines[0]) == 2                  # the task: the init's first child
    assert "launcher.init" in lines[1]         # PID 1 is the init
    pids = sorted(int(p) for p in lines[2:] if p.isdigit())
    assert pids[0] == 1 and max(pids) < 10     # a pid namespace of its own


@needs_namespaces
async def test_hostname_and_network_none(box: Box) -> None:
    before = socket.gethostname()
    r = await box.sh("hostname; ls /sys/class/net; ip link", hostname="box1")
    assert r.status.exit_code == 0, r
    lines = r.stdout.splitlines()
    assert lines[0] == "box1"
    assert lines[1] == "lo"
    links = [line for line in lines[2:] if line[:1].isdigit()]
    assert len(links) == 1 and links[0].startswith("1: lo:") and ",UP" in links[0], r.stdout
    assert socket.gethostname() == before


@needs_namespaces
async def test_network_host_sees_host_interfaces(box: Box) -> None:
    r = await box.sh("ls /sys/class/net", namespaces=["pid", "mnt", "uts", "ipc"], loopback_up=False)
    assert r.status.exit_code == 0, r
    assert sorted(r.stdout.split()) == sorted(os.listdir("/sys/class/net"))


@needs_namespaces
async def test_dev_is_minimal_and_works(box: Box) -> None:
    script = ("ls /dev; echo x > /dev/null && echo null-ok; head -c 5 /dev/zero | wc -c; "
              "head -c 3 /dev/urandom | wc -c; readlink /dev/fd; readlink /dev/ptmx; "
              "test -c /dev/pts/ptmx && echo pts-ok; test -e /dev/vda || echo no-host-disks; "
              "touch /dev/shm/x && echo shm-ok")
    r = await box.sh(script)
    assert r.status.exit_code == 0, r
    out = r.stdout.split()
    for name in ("null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm",
                 "fd", "stdin", "stdout", "stderr"):
        assert name in out, name
    for expected in ("null-ok", "5", "3", "/proc/self/fd", "pts/ptmx", "pts-ok", "no-host-disks", "shm-ok"):
        assert expected in out, expected


@needs_namespaces
async def test_sys_and_proc_sys_are_read_only(box: Box) -> None:
    r = await box.sh("touch /sys/x 2>/dev/null && echo sys-writable || echo sys-ro; "
                     "echo h > /proc/sys/kernel/hostname 2>/dev/null && echo procsys-writable || echo procsys-ro; "
                     "touch /tmp/x && echo rootfs-rw")
    assert r.stdout.split() == ["sys-ro", "procsys-ro", "rootfs-rw"], r


@needs_namespaces
async def test_sandbox_is_mounted_read_write(box: Box) -> None:
    r = await box.sh(f"echo hi > {SANDBOX_PATH}/out; echo err >&2; pwd", workdir=SANDBOX_PATH)
    assert r.status.exit_code == 0, r
    assert (box.sandbox / "out").read_text() == "hi\n"
    assert r.stdout == f"{SANDBOX_PATH}\n" and r.stderr == "err\n"


@needs_namespaces
async def test_runs_as_the_given_user(box: Box) -> None:
    r = await box.sh("id -u; id -g; id -G; touch /root/x 2>/dev/null || echo denied",
                     uid=65534, gid=65534, groups=[65534, 100])
    assert r.stdout.split() == ["65534", "65534", "65534", "100", "denied"], r


# ---- volumes ----------------------------------------------------------------------------------------

def _bind(source: Path, target: str, read_only: bool = False) -> dict[str, Any]:
    return {"source": str(source), "target": target, "read_only": read_only, "is_dir": source.is_dir()}


@needs_namespaces
async def test_volumes_ro_rw_and_file(box: Box, tmp_path: Path) -> None:
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    (ro / "given").write_text("from host\n")
    conf = tmp_path / "host.conf"
    conf.write_text("key=value\n")
    mounts = [_bind(ro, "/data/ro", True), _bind(rw, "/data/rw"), _bind(conf, "/etc/host.conf", True)]
    r = await box.sh("cat /data/ro/given; touch /data/ro/new 2>/dev/null && echo ro-writable || echo ro-refused; "
                     "echo w > /data/rw/written && echo rw-ok; cat /etc/host.conf; "
                     "echo x >> /etc/host.conf 2>/dev/null && echo file-writable || echo file-refused",
                     mounts=mounts)
    assert r.stdout.split() == ["from", "host", "ro-refused", "rw-ok", "key=value", "file-refused"], r
    assert sorted(os.listdir(ro)) == ["given"]
    assert (rw / "written").read_text() == "w\n"
    assert conf.read_text() == "key=value\n"


@needs_namespaces
async def test_volume_targets_through_symlinks_stay_in_rootfs(box: Box, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (box.rootfs / "escape").symlink_to("/../../..")
    (box.rootfs / "up").symlink_to("../..")            # on the host: tmp_path
    (box.rootfs / "abs").symlink_to(str(outside))     # an absolute host path
    vols = {name: tmp_path / f"vol-{name}" for name in ("escape", "up", "abs")}
    for v in vols.values():
        v.mkdir()
    mounts = [_bind(vols["escape"], "/escape/v1"), _bind(vols["up"], "/up/v2"), _bind(vols["abs"], "/abs/v3")]
    r = await box.sh("echo 1 > /escape/v1/f && echo 2 > /up/v2/f && echo 3 > /abs/v3/f && echo ok", mounts=mounts)
    assert r.stdout == "ok\n", r
    assert [(v / "f").read_text() for v in vols.values()] == ["1\n", "2\n", "3\n"]
    # The mount points were made inside the rootfs, where the links lead with the rootfs as "/".
    assert (box.rootfs / "v1").is_dir() and (box.rootfs / "v2").is_dir()
    assert Path(str(box.rootfs) + str(outside) + "/v3").is_dir()
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "v2").exists() and not (box.dir / "v2").exists()
    assert not os.path.exists("/v1")


@needs_namespaces
async def test_bad_mount_is_a_launch_failure(box: Box, tmp_path: Path) -> None:
    r = await box.run(["true"], mounts=[{"source": str(tmp_path / "missing"), "target": "/data", "is_dir": True}])
    assert r.status.exit_code == 125 and r.status.signal is None
    assert "mount" in r.status.error and "missing" in r.status.error, r


# ---- exit statuses --------------------------------------------------------------------------------

@needs_namespaces
async def test_exit_codes(box: Box) -> None:
    (box.rootfs / "bin" / "plain").write_text("#!/bin/sh\necho hi\n")   # mode 0644: not executable
    assert (await box.run(["false"])).status == ExitStatus(1, None, None)
    assert (await box.sh("exit 3")).status == ExitStatus(3, None, None)

    missing = await box.run(["/bin/nope"])
    assert missing.status.exit_code == 127 and "not found" in missing.status.error
    assert "not found" in missing.stderr
    on_path = await box.run(["nope"])
    assert on_path.status.exit_code == 127 and "nope" in on_path.status.error

    plain = await box.run(["/bin/plain"])
    assert plain.status.exit_code == 126 and "not executable" in plain.status.error
    directory = await box.run(["/bin"])
    assert directory.status.exit_code == 126

    workdir = await box.run(["true"], workdir="/no/such/dir")
    assert workdir.status.exit_code == 125 and "workdir /no/such/dir" in workdir.status.error


@needs_namespaces
async def test_task_killed_by_sigkill(box: Box) -> None:
    r = await box.sh("kill -KILL $$")
    assert r.status == ExitStatus(137, 9, None)


@needs_namespaces
async def test_abort_before_go(box: Box) -> None:
    init = await box.spawn(box.config(["sh", "-c", f"echo ran > {SANDBOX_PATH}/ran"]))
    init.abort()
    status = await init.wait()
    assert status.exit_code == 125 and "aborted" in status.error
    assert not (box.sandbox / "ran").exists()


# ---- signals, orphans, teardown ---------------------------------------------------------------------

@needs_namespaces
async def test_sigterm_is_forwarded_to_the_task(box: Box) -> None:
    fifo = box.fifo()
    script = (f'trap "exit 42" TERM; echo ready > {SANDBOX_PATH}/ready; '
              "while :; do sleep 1000 & wait $!; done")
    init = await box.spawn(box.config(["sh", "-c", script]))
    await init.go()
    await box.wait_ready(init, fifo)
    init.send_signal(signal.SIGTERM)
    assert await init.wait() == ExitStatus(42, None, None)


@needs_namespaces
async def test_sigterm_default_kills_the_task(box: Box) -> None:
    fifo = box.fifo()
    init = await box.spawn(box.config(["sh", "-c", f"echo ready > {SANDBOX_PATH}/ready; exec sleep 1000"]))
    await init.go()
    await box.wait_ready(init, fifo)
    init.send_signal(signal.SIGTERM)
    assert await init.wait() == ExitStatus(128 + 15, 15, None)


@needs_namespaces
async def test_orphans_are_reaped(box: Box) -> None:
    # Each subshell starts `true` in the background and exits at once: `true` is orphaned, moves to
    # PID 1, and stays a zombie (its /proc entry remains) until PID 1 reaps it. The spin is bounded.
    script = ("for i in 1 2 3 4 5; do (true & echo $! >> /tmp/orphans); done; "
              "for p in $(cat /tmp/orphans); do n=0; "
              "while [ -e /proc/$p ] && [ $n -lt 200000 ]; do n=$((n+1)); done; "
              "[ -e /proc/$p ] && echo lingering $p $(cat /proc/$p/stat); done; echo checked")
    r = await box.sh(script)
    assert r.status.exit_code == 0, r
    assert r.stdout == "checked\n", r.stdout


@needs_namespaces
async def test_killing_the_monitor_takes_the_container_down(box: Box) -> None:
    fifo = box.fifo()
    script = (f"readlink /proc/self/ns/pid > {SANDBOX_PATH}/ns; sleep 1000 & "
              f"echo ready > {SANDBOX_PATH}/ready; wait")
    init = await box.spawn(box.config(["sh", "-c", script]))
    await init.go()
    await box.wait_ready(init, fifo)
    ns = (box.sandbox / "ns").read_text().strip()
    assert len(_host_pids_in_pid_ns(ns)) == 3          # init, sh, sleep
    container_init = psutil.Process(init.pid).children()[0].pid

    init.send_signal(signal.SIGKILL)
    # No status file: the monitor had no chance to write one; the status comes from its own death.
    assert await init.wait() == ExitStatus(137, 9, None)
    # The container init is not our child: wait for it through a pidfd, as recover does.
    with trio.fail_after(60):
        await wait_pid(container_init)
    assert _host_pids_in_pid_ns(ns) == []


@needs_namespaces
async def test_orphans_do_not_outlive_the_task(box: Box) -> None:
    r = await box.sh(f"readlink /proc/self/ns/pid > {SANDBOX_PATH}/ns; sleep 1000 & exit 0")
    assert r.status == ExitStatus(0, None, None)
    assert _host_pids_in_pid_ns((box.sandbox / "ns").read_text().strip()) == []


# ---- isolators ------------------------------------------------------------------------------------

def _container(box: Box, spec: TaskSpec, argv: list[str]) -> ContainerConfig:
    return ContainerConfig(container_id="c1", spec=spec, rootfs=str(box.rootfs), sandbox=str(box.sandbox),
                           argv=argv, env={"PATH": "/bin"}, workdir="/", uid=0, gid=0)


ISOLATORS = (FilesystemLinuxIsolator, PidNamespaceIsolator, IpcNamespaceIsolator, UtsNamespaceIsolator,
             NetworkNoneIsolator, VolumeHostPathIsolator)


@needs_namespaces
async def test_isolators_end_to_end(box: Box, tmp_path: Path) -> None:
    etc = tmp_path / "hostetc"
    etc.mkdir()
    (etc / "motd").write_text("hello\n")
    spec = TaskSpec(image="busybox", hostname="iso",
                    volumes=(Volume("scratch", "/scratch"), Volume(str(etc), "/etc/hostconf", read_only=True)))
    config = _container(box, spec, ["sh", "-c", "hostname; cat /etc/hostconf/motd; echo s > /scratch/f; "
                                                "ls /sys/class/net; touch /etc/hostconf/x || echo ro"])
    infos = [cls("c1", {}).prepare(config) for cls in ISOLATORS]
    init = await box.spawn(init_config(config, infos, status_path=box.dir / "status.json"))
    await init.go()
    status = await init.wait()
    out, err = box.output()
    assert status == ExitStatus(0, None, None), (out, err)
    assert out.split() == ["iso", "hello", "lo", "ro"]
    assert (box.sandbox / "scratch" / "f").read_text() == "s\n"


def test_init_config_merges_launch_infos(tmp_path: Path) -> None:
    spec = TaskSpec(image="x", network="host")
    config = ContainerConfig("c2", spec, rootfs=str(tmp_path), sandbox=str(tmp_path), argv=["true"],
                             env={}, workdir="/", uid=1, gid=2, groups=[3])
    infos = [PidNamespaceIsolator("c2", {}).prepare(config), UtsNamespaceIsolator("c2", {}).prepare(config),
             NetworkHostIsolator("c2", {}).prepare(config)]
    doc = init_config(config, infos, status_path=tmp_path / "s.json")
    assert doc["namespaces"] == ["pid", "uts", "mnt"]
    assert doc["hostname"] == "c2" and doc["loopback_up"] is False
    assert (doc["uid"], doc["gid"], doc["groups"]) == (1, 2, [3])
    with pytest.raises(ValueError):
        NetworkNoneIsolator("c2", {}).prepare(config)


def test_volume_validation(tmp_path: Path) -> None:
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    with pytest.raises(InputError, match="absolute"):
        volume_mount(Volume("x", "relative/path"), str(sandbox))
    with pytest.raises(InputError, match="does not exist"):
        volume_mount(Volume(str(tmp_path / "missing"), "/data"), str(sandbox))
    with pytest.raises(InputError, match="inside the sandbox"):
        volume_mount(Volume("../escape", "/data"), str(sandbox))
    with pytest.raises(InputError, match="root"):
        volume_mount(Volume("x", "/"), str(sandbox))
    # Relative: created in the sandbox, even through a symlink that points out of it.
    (sandbox / "link").symlink_to("/")
    m = volume_mount(Volume("link/made/here", "/data"), str(sandbox))
    assert m["source"] == str(sandbox.resolve() / "made/here") and os.path.isdir(m["source"])
    assert not os.path.exists("/made")
    (tmp_path / "f").write_text("")
    m = volume_mount(Volume(str(tmp_path / "f"), "/etc/f", read_only=True), str(sandbox))
    assert m == {"source": str((tmp_path / "f").resolve()), "target": "/etc/f", "type": "bind",
                 "read_only": True, "is_dir": False}


def test_filesystem_isolator_checks_the_rootfs(tmp_path: Path) -> None:
    spec = TaskSpec(image="x")
    ok = ContainerConfig("c3", spec, rootfs=str(tmp_path), sandbox=str(tmp_path), argv=["true"], env={},
                         workdir="/", uid=0, gid=0)
    assert FilesystemLinuxIsolator("c3", {}).prepare(ok).clone_namespaces == ("mnt",)
    for rootfs in (str(tmp_path / "missing"), "/"):
        bad = ContainerConfig("c3", spec, rootfs=rootfs, sandbox=str(tmp_path), argv=["true"], env={},
                              workdir="/", uid=0, gid=0)
        with pytest.raises(ImagefsError):
            FilesystemLinuxIsolator("c3", {}).prepare(bad)


def test_init_config_refuses_host_changes_without_namespaces() -> None:
    base = {"argv": ["true"], "status_path": "/nonexistent/status.json"}
    assert InitConfig.from_dict(base).namespaces == []
    cases = [({"hostname": "h"}, "'uts'"), ({"loopback_up": True}, "'net'"), ({"rootfs": "/r"}, "'mnt'"),
             ({"rootfs": "/r", "namespaces": ["mnt"], "mounts": [{"source": "rel", "target": "/x"}]}, "absolute"),
             ({"namespaces": ["user"]}, "unknown namespace"), ({"argv": []}, "argv"), ({"bogus": 1}, "unknown keys"),
             ({"env": {"A": 1}}, "env")]
    for extra, message in cases:
        with pytest.raises(LaunchError, match=message):
            InitConfig.from_dict({**base, **extra})


# ---- start-up: what the init imports and when it reads its config -----------------------------------

def test_init_imports_only_the_standard_library_and_launcher() -> None:
    """The init runs with `python -S` (no site-packages) and must stay cheap to start: no pyroute2,
    argparse, dataclasses or typing, and no `ldconfig -p` (ctypes.util.find_library)."""
    probe = ("import sys; import launcher.init, launcher.linux.netdev; "
             "print(' '.join(sorted(m for m in sys.modules)))")
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-S", "-P", "-c", probe], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONPATH": str(root)}, cwd="/")
    loaded = set(r.stdout.split())
    for heavy in ("pyroute2", "argparse", "dataclasses", "typing", "subprocess", "ctypes.util", "socket"):
        assert heavy not in loaded, heavy
    assert not any(name.startswith(("trio", "psutil", "imagefs", "stores")) for name in loaded)


def test_sandbox_path_is_the_specs() -> None:
    import launcher.init
    import launcher.spec

    assert launcher.init.SANDBOX_PATH == launcher.spec.SANDBOX_PATH


def test_init_command_line() -> None:
    from launcher.init import _parse_args

    assert _parse_args(["c.json", "--sync-fd", "7"]) == ("c.json", 7)
    assert _parse_args(["--sync-fd=3", "c.json"]) == ("c.json", 3)
    assert _parse_args(["c.json"]) == ("c.json", None)
    for bad in ([], ["--sync-fd", "3"], ["a", "b"], ["c.json", "--frobnicate"], ["c.json", "--sync-fd", "x"]):
        with pytest.raises(ValueError):
            _parse_args(bad)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a network namespace)")
def test_link_up_in_a_new_network_namespace() -> None:
    probe = ("import errno; from launcher.linux import netdev\n"
             "assert not netdev.is_up('lo'); netdev.link_up('lo'); assert netdev.is_up('lo')\n"
             "netdev.link_up('lo')  # idempotent\n"
             "for name in ('nosuch0', 'x' * 20):\n"
             "    try: netdev.link_up(name)\n"
             "    except OSError as e: assert e.errno == errno.ENODEV, e\n"
             "    else: raise AssertionError(name)\n"
             "import socket; s = socket.create_server(('127.0.0.1', 0)); socket.create_connection(s.getsockname())\n")
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run(["unshare", "--net", sys.executable, "-c", probe], capture_output=True, text=True,
                       cwd=root)
    assert r.returncode == 0, r.stderr


@needs_namespaces
async def test_init_started_before_its_config(box: Box) -> None:
    """start_init, as the containerizer does before the pull: the config comes later, before go."""
    init = await start_init(box.dir, log_dir=box.sandbox)
    box.inits.append(init)
    assert not (box.dir / "init.json").exists()
    with pytest.raises(RuntimeError, match="configure"):
        await init.go()
    init.configure(box.config(["sh", "-c", "echo configured late"]))
    await init.go()
    assert await init.wait() == ExitStatus(0, None, None)
    assert box.output()[0] == "configured late\n"


@needs_namespaces
async def test_abort_before_the_config_exists(box: Box) -> None:
    (box.dir / "init.json").write_text(json.dumps(box.config(["true"], status_path=str(box.dir / "old.json"))))
    init = await start_init(box.dir, log_dir=box.sandbox)
    box.inits.append(init)
    init.abort()
    status = await init.wait()
    # No config to say where: no status file; the exit code says the launch failed.
    assert status.exit_code == 125
    assert not (box.dir / "status.json").exists() and not (box.dir / "old.json").exists()
    assert "aborted" in box.output()[1]
