"""imagefs mount end to end: real registry, real FUSE, checked against `umoci unpack`."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.mounts import Cli, Mounts, diff, needs_fuse, snapshot
from tests.support.images import OciLayout, docker_save_archive, push, wait_until
from tests.support.tricky import BIG, CAP, tricky_layers

pytestmark = needs_fuse


@pytest.fixture(scope="module")
def tricky(tmp_path_factory, registry):
    """The tricky image as a layout (gzip/plain/gzip, tag `tricky`) and its zstd twin (tag `zstd`),
    pushed to the registry, plus the umoci unpack of the gzip one."""
    root = tmp_path_factory.mktemp("tricky")
    layout = OciLayout(root / "layout")
    cfg = {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]}
    layout.add_image(tricky_layers(("gzip", "none", "gzip")), tag="tricky", config=cfg)
    zstd_layout = OciLayout(root / "zstd-layout")
    zstd_layout.add_image(tricky_layers(("zstd", "gzip", "none")), tag="zstd", config=cfg)
    push(layout.path, "tricky", registry.ref("test/tricky:1"))
    push(zstd_layout.path, "zstd", registry.ref("test/tricky:zstd"))
    bundle = root / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout.path}:tricky", str(bundle)], check=True,
                   capture_output=True)
    expected = snapshot(bundle / "rootfs")
    yield {"layout": layout, "zstd_layout": zstd_layout, "expected": expected, "root": root}
    subprocess.run(["rm", "-rf", str(bundle)], check=False)


@pytest.fixture
def env(tmp_path):
    cli = Cli(tmp_path / "store", tmp_path / "work")
    mounts = Mounts(cli)
    try:
        yield cli, mounts, tmp_path
    finally:
        mounts.cleanup()


def test_lazy_registry_mount_matches_umoci(tricky, registry, env):
    cli, mounts, tmp = env
    ref = registry.ref("test/tricky:1")
    cli.run("pull", ref)
    assert not list((tmp / "store" / "blobs" / "sha256").glob("*")) or all(
        p.stat().st_size < 1 << 20 for p in (tmp / "store" / "blobs" / "sha256").iterdir()), "layers were kept"
    mp = mounts.mount(ref, tmp / "mnt")
    actual = snapshot(mp)
    problems = diff(tricky["expected"], actual)
    assert not problems, "\n".join(problems)
    # the bytes came through the chunk cache, by range reads
    assert list((tmp / "store" / "chunks").iterdir())


def test_zstd_and_plain_layers_match_their_gzip_twin(tricky, registry, env):
    cli, mounts, tmp = env
    mp = mounts.mount(registry.ref("test/tricky:zstd"), tmp / "mnt")
    problems = diff(tricky["expected"], snapshot(mp))
    assert not problems, "\n".join(problems)


def test_specific_semantics(tricky, registry, env):
    cli, mounts, tmp = env
    mp = mounts.mount(registry.ref("test/tricky:1"), tmp / "mnt")
    assert not (mp / "whiteme").exists() and not (mp / "whitedir").exists()
    assert sorted(os.listdir(mp / "opq")) == ["upper"]
    assert (mp / "replace_dir").read_bytes() == b"now a file\n"
    assert (mp / "becomes_dir" / "inside").read_bytes() == b"inside\n"
    a, b, c = (os.stat(mp / "hl" / n) for n in ("target", "same_layer", "cross_layer"))
    assert a.st_ino == b.st_ino == c.st_ino and a.st_nlink == 3
    assert (mp / "dup").read_bytes() == b"second, wins\n"
    assert (mp / "recreated").read_bytes() == b"new\n"
    assert os.getxattr(mp / "xattrs", "security.capability") == CAP
    assert os.readlink(mp / "abs") == "/etc/passwd"
    with pytest.raises(OSError) as e:
        (mp / "loop1").read_bytes()
    assert e.value.errno == errno.ELOOP
    assert os.stat(mp / "big").st_size == BIG
    assert not any(n.startswith(".wh.") for _, ds, fs in os.walk(mp) for n in ds + fs)


def test_read_only_and_permissions(tricky, registry, env):
    cli, mounts, tmp = env
    mp = mounts.mount(registry.ref("test/tricky:1"), tmp / "mnt")
    with pytest.raises(OSError) as e:
        (mp / "new").write_text("x")
    assert e.value.errno == errno.EROFS
    with pytest.raises(OSError) as e:
        os.unlink(mp / "empty")
    assert e.value.errno == errno.EROFS
    # default_permissions: the kernel enforces the image's modes for other users
    # (cwd is entered as root: the test's temp dirs above the mount are root-only)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat"]
    r = subprocess.run([*nobody, "private"], capture_output=True, text=True, cwd=mp)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = subprocess.run([*nobody, "a/b/file1"], capture_output=True, text=True, cwd=mp)
    assert r.returncode == 0 and r.stdout == "version two\n"
    st = os.statvfs(mp)
    assert st.f_files > 20_000 and st.f_blocks * st.f_frsize >= BIG


def test_local_sources_mount(tricky, env):
    cli, mounts, tmp = env
    layout = tricky["layout"]
    mp = mounts.mount(f"oci:{layout.path}:tricky", tmp / "oci")
    assert not diff(tricky["expected"], snapshot(mp))
    import json
    desc = json.loads((layout.path / "index.json").read_text())["manifests"][0]
    archive = tmp / "image.tar"
    docker_save_archive(layout, desc, archive, "test/tricky:1")
    mp2 = mounts.mount(f"docker-archive:{archive}", tmp / "archive")
    assert not diff(tricky["expected"], snapshot(mp2))
    assert not (tmp / "store" / "chunks").exists() or not list((tmp / "store" / "chunks").iterdir())


def test_overlay_with_imagefs_lower(tricky, registry, env):
    cli, mounts, tmp = env
    lower = mounts.mount(registry.ref("test/tricky:1"), tmp / "lower")
    upper, work, merged = tmp / "upper", tmp / "ovl-work", tmp / "merged"
    for d in (upper, work, merged):
        d.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)], check=True)
    try:
        (merged / "written").write_text("mine")
        os.unlink(merged / "empty")
        (merged / "a/b/file1").write_text("changed")
        assert (upper / "written").read_text() == "mine"
        assert os.stat(upper / "empty").st_rdev == 0 and not (merged / "empty").exists()  # whiteout
        assert (lower / "a/b/file1").read_text() == "version two\n"
        assert (merged / "bin/busybox").read_bytes() == Path("/bin/busybox").read_bytes()
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_umount_stops_server_and_crash_recovers(tricky, registry, env):
    cli, mounts, tmp = env
    ref = registry.ref("test/tricky:1")
    mp = mounts.mount(ref, tmp / "mnt")
    pid = mounts.server_pid(mp)
    cli.run("umount", str(mp))
    assert not os.path.ismount(mp)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    # killed hard: the mount is left dead; umount cleans it, mount works again
    mounts.mount(ref, mp)
    pid = mounts.server_pid(mp)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: _dead(pid), what="server death")
    with pytest.raises(OSError) as e:
        os.statvfs(mp)
    assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)  # the dead mount is left behind
    cli.run("umount", str(mp))
    assert not os.path.ismount(mp)
    # and a mount over a dead one (no umount in between) works too
    mounts.mount(ref, mp)
    pid = mounts.server_pid(mp)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: _dead(pid), what="server death")
    mounts.mount(ref, mp)
    assert (mp / "a/b/file1").read_text() == "version two\n"
    cli.run("umount", str(mp))
    r = cli.run("umount", str(mp), check=False)
    assert r.returncode == 2 and "not mounted" in r.stderr


def test_mount_errors_are_one_line(registry, env):
    cli, mounts, tmp = env
    r = cli.run("mount", registry.ref("test/nothing:here"), str(tmp), check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "test/nothing" in r.stderr
    r = cli.run("mount", registry.ref("test/tricky:1"), str(tmp / "missing-dir"), check=False)
    assert r.returncode == 2 and "not a directory" in r.stderr


def test_standby_server_takes_its_job_then_serves(tricky, registry, env):
    """A standby server (imported, waiting on its pipe) mounts what it is handed, as a new server
    would; one waits per work dir at a time; a dismissed one exits without mounting."""
    from imagefs.fuse import daemon

    cli, mounts, tmp = env
    ref = registry.ref("test/tricky:1")
    cli.run("pull", ref)
    image_id = json.loads(cli.run("inspect", "--json", ref).stdout)["id"]
    prefix = daemon.cli_prefix(str(cli.store), str(cli.work), [])
    mp = tmp / "mnt"
    mp.mkdir()
    mounts.points.append(mp)
    standby = daemon.spawn_standby(prefix, str(cli.work))
    assert standby is not None
    assert daemon.spawn_standby(prefix, str(cli.work)) is None   # the slot is taken
    record = daemon.start(prefix, image_id, str(mp), str(cli.work), image_id, standby=standby)
    assert record.pid == standby.proc.pid
    assert record.create_time == psutil.Process(record.pid).create_time() == daemon.create_time(record.pid)
    assert (mp / "a/b/file1").read_text() == "version two\n"
    assert standby.hand_over(image_id, str(mp), []) is None     # used once
    standby.dismiss()                                           # a no-op now
    # Its job's log is the mount's, as any server's; the slot is free again.
    assert daemon.log_path(str(cli.work), str(mp)) == Path(record.log)
    other = daemon.spawn_standby(prefix, str(cli.work))
    assert other is not None
    other.dismiss()
    assert other.proc.wait(60) == 0
    daemon.stop(str(cli.work), str(mp))
    assert not os.path.ismount(mp)
    with pytest.raises(ProcessLookupError):
        os.kill(record.pid, 0)
    logs = cli.work / "run" / "mounts"
    assert (logs / daemon.STANDBY_LOG).read_text() == ""
