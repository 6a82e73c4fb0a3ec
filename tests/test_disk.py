"""disk/du (launcher/isolators/disk.py): du-style sandbox usage and the disk limitation.

Trees are built in tmp_path. Expected usage is the allocated blocks of the inodes the test made,
and, where coreutils is present, what `du -sx` says. Mount tests need root; every mount is under
tmp_path and unmounted in a finally.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from launcher.isolators.base import Limitation
from launcher.isolators.disk import REASON_DISK, DiskIsolator, disk_usage, mount_points_under
from launcher.linux import syscalls
from launcher.spec import ContainerConfig, Resources, TaskSpec

MIB = 1 << 20


def allocated(*paths: Path) -> int:
    """Bytes allocated to these paths' inodes, each inode once."""
    inodes = {}
    for p in paths:
        st = os.lstat(p)
        inodes[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    return sum(inodes.values())


def du(path: Path) -> int | None:
    """`du -sx` in bytes, or None without coreutils' du."""
    if shutil.which("du") is None:
        return None
    out = subprocess.run(["du", "-s", "-x", "-B1", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def write(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())   # so st_blocks shows the allocation on any file system
    return path


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    s = tmp_path / "sandbox"
    s.mkdir()
    return s


def test_files_and_directories(sandbox: Path) -> None:
    a = write(sandbox / "a", 100_000)
    b = write(sandbox / "sub" / "deeper" / "b", 3 * MIB)
    empty = sandbox / "empty"
    empty.touch()
    expected = allocated(sandbox, a, sandbox / "sub", sandbox / "sub" / "deeper", b, empty)
    assert disk_usage(str(sandbox)) == expected >= 3 * MIB
    assert du(sandbox) in (None, expected)


def test_hardlinks_count_once(sandbox: Path) -> None:
    big = write(sandbox / "big", 2 * MIB)
    (sandbox / "dir").mkdir()
    os.link(big, sandbox / "link1")
    os.link(big, sandbox / "dir" / "link2")
    expected = allocated(sandbox, sandbox / "dir", big)
    assert disk_usage(str(sandbox)) == expected < 3 * MIB
    assert du(sandbox) in (None, expected)


def test_sparse_file_counts_its_blocks(sandbox: Path) -> None:
    sparse = sandbox / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(1 << 30)
        f.seek(512 * MIB)
        f.write(b"x" * 4096)
        os.fsync(f.fileno())
    assert sparse.stat().st_size == 1 << 30
    assert disk_usage(str(sandbox)) == allocated(sandbox, sparse) < MIB


def test_symlinks_are_not_followed(sandbox: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside / "big", 4 * MIB)
    (sandbox / "to-file").symlink_to(outside / "big")
    (sandbox / "to-dir").symlink_to(outside)
    (sandbox / "dangling").symlink_to(tmp_path / "missing")
    expected = allocated(sandbox, sandbox / "to-file", sandbox / "to-dir", sandbox / "dangling")
    assert disk_usage(str(sandbox)) == expected < MIB
    # The sandbox path itself may be a symlink (the walk starts from where it points).
    (tmp_path / "via-link").symlink_to(sandbox)
    assert disk_usage(str(tmp_path / "via-link")) == expected


def test_missing_root_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        disk_usage(str(tmp_path / "nope"))


def test_files_vanishing_mid_walk(sandbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file deleted after it was listed, and a directory deleted before it was read, are skipped."""
    keep = write(sandbox / "keep", 10_000)
    write(sandbox / "gone-file", 10_000)
    write(sandbox / "gone-dir" / "x", 10_000)
    # gone-dir is stat'ed (so counted) before it disappears; its contents never are.
    expected = allocated(sandbox, keep, sandbox / "gone-dir")
    real_scandir = os.scandir
    root = os.path.realpath(sandbox)

    class Listing:
        def __init__(self, entries: list[os.DirEntry[str]]) -> None:
            self.entries = entries

        def __enter__(self) -> Iterator[os.DirEntry[str]]:
            return iter(self.entries)

        def __exit__(self, *exc: Any) -> None:
            return None

    def racing_scandir(path: str) -> Listing:
        if os.path.basename(path) == "gone-dir":
            os.unlink(os.path.join(path, "x"))  # removed between being listed and being read
            os.rmdir(path)
        with real_scandir(path) as it:
            entries = list(it)
        if path == root:
            os.unlink(sandbox / "gone-file")    # removed between readdir and stat
        return Listing(entries)

    monkeypatch.setattr(os, "scandir", racing_scandir)
    used = disk_usage(str(sandbox))
    monkeypatch.undo()
    assert not (sandbox / "gone-dir").exists() and not (sandbox / "gone-file").exists()
    assert used == expected


# -- mount points -----------------------------------------------------------------------------------

def test_mount_points_from_mountinfo(sandbox: Path, tmp_path: Path) -> None:
    """A mount point listed in mountinfo is not crossed, even on the same device (as a bind mount of
    the same file system is); octal escapes in mountinfo are decoded."""
    vol = sandbox / "my vol"
    write(vol / "data", 2 * MIB)
    other = sandbox / "other"
    write(other / "data", 100_000)
    mountinfo = tmp_path / "mountinfo"
    escaped = str(vol).replace(" ", "\\040")
    mountinfo.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        f"99 22 8:1 /srv {escaped} rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        f"98 22 0:5 / {sandbox}x rw - tmpfs tmpfs rw\n")   # a sibling with the same prefix
    assert mount_points_under(str(sandbox), str(mountinfo)) == {str(vol)}
    used = disk_usage(str(sandbox), mountinfo=str(mountinfo))
    assert used == allocated(sandbox, other, other / "data")
    assert disk_usage(str(sandbox), mountinfo=str(tmp_path / "absent")) == \
        allocated(sandbox, other, other / "data", vol, vol / "data")


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts)")
def test_bind_and_tmpfs_mounts_are_not_crossed(sandbox: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside / "big", 4 * MIB)
    bind_point, tmpfs_point = sandbox / "vol", sandbox / "tmp"
    bind_point.mkdir()
    tmpfs_point.mkdir()
    own = write(sandbox / "own", 50_000)
    mounted: list[Path] = []
    try:
        try:
            syscalls.mount(str(outside), str(bind_point), None, syscalls.MS_BIND)
            mounted.append(bind_point)
            syscalls.mount("tmpfs", str(tmpfs_point), "tmpfs", 0, "size=16m")
            mounted.append(tmpfs_point)
        except PermissionError as e:
            pytest.skip(f"cannot mount here: {e}")
        write(tmpfs_point / "big", 4 * MIB)
        assert (bind_point / "big").exists()
        # A mount point and everything under it are not the sandbox's (as with du -x).
        assert disk_usage(str(sandbox)) == allocated(sandbox, own)
        # Same device: only mountinfo tells the bind mount apart; without it the bind is counted,
        # while the tmpfs (another device) is still skipped.
        assert disk_usage(str(sandbox), mountinfo=str(tmp_path / "absent")) == \
            allocated(sandbox, own, outside, outside / "big")
    finally:
        for point in reversed(mounted):
            syscalls.umount2(str(point), syscalls.MNT_DETACH)


# -- the isolator -----------------------------------------------------------------------------------

def config(sandbox: Path, disk_bytes: int | None) -> ContainerConfig:
    spec = TaskSpec(image="busybox", resources=Resources(disk_bytes=disk_bytes))
    return ContainerConfig(container_id="c1", spec=spec, rootfs="/", sandbox=str(sandbox),
                           argv=["true"], env={}, workdir="/", uid=0, gid=0)


def test_usage_and_update(sandbox: Path) -> None:
    write(sandbox / "f", 100_000)
    state: dict[str, Any] = {}
    iso = DiskIsolator("c1", state)
    assert iso.prepare(config(sandbox, None)) is None
    assert iso.usage() == {"disk_used_bytes": disk_usage(str(sandbox))}
    iso.update(Resources(disk_bytes=5 * MIB))
    assert iso.usage()["disk_limit_bytes"] == 5 * MIB
    # Another process, from the checkpointed state alone.
    again = DiskIsolator("c1", dict(state))
    again.recover()
    assert again.usage() == {"disk_used_bytes": disk_usage(str(sandbox)), "disk_limit_bytes": 5 * MIB}


async def test_watch_returns_a_disk_limitation(sandbox: Path) -> None:
    iso = DiskIsolator("c1", {}, interval=0.05)
    iso.prepare(config(sandbox, 1 * MIB))
    write(sandbox / "small", 100_000)
    with trio.move_on_after(0.5) as under:   # several measurements under the limit: no limitation
        await iso.watch()
    assert under.cancelled_caught
    write(sandbox / "big", 2 * MIB)
    with trio.fail_after(30):                # a guard against a hang, not a timing assertion
        limitation = await iso.watch()
    assert isinstance(limitation, Limitation) and limitation.reason == REASON_DISK
    used = iso.usage()["disk_used_bytes"]
    assert used > MIB and limitation.message.startswith(f"disk usage {used} exceeds limit {MIB}")


async def test_watch_without_limit_or_sandbox_never_returns(sandbox: Path, tmp_path: Path) -> None:
    write(sandbox / "big", 2 * MIB)
    unlimited = DiskIsolator("c1", {}, interval=0.05)
    unlimited.prepare(config(sandbox, None))
    gone = DiskIsolator("c2", {}, interval=0.05)
    gone.prepare(config(tmp_path / "removed", 1))
    with trio.move_on_after(0.3) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(unlimited.watch)
            nursery.start_soon(gone.watch)
    assert scope.cancelled_caught
