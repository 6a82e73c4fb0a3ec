"""Path resolution inside a rootfs (launcher/linux/rootfs.py): pure, no root, no mounts.

Every case builds a small tree in tmp_path with symlinks that would lead outside the rootfs if the
kernel resolved them on the host, and checks the result stays inside and means what the same path
would mean with the rootfs as "/".
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from launcher.linux.rootfs import ensure_mount_target, pinned, resolve_in_root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "rootfs"
    for d in ("bin", "etc", "usr/lib", "var/tmp"):
        (r / d).mkdir(parents=True)
    (r / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\n")
    return r.resolve()


def test_plain_paths(root: Path) -> None:
    assert resolve_in_root(str(root), "/") == str(root)
    assert resolve_in_root(str(root), "") == str(root)
    assert resolve_in_root(str(root), "/etc/passwd") == str(root / "etc/passwd")
    assert resolve_in_root(str(root), "etc//./passwd") == str(root / "etc/passwd")
    assert resolve_in_root(str(root), "/missing/deeper/x") == str(root / "missing/deeper/x")


def test_dotdot_never_climbs_above_root(root: Path) -> None:
    assert resolve_in_root(str(root), "/../../..") == str(root)
    assert resolve_in_root(str(root), "/../../etc/passwd") == str(root / "etc/passwd")
    assert resolve_in_root(str(root), "/usr/lib/../../../../etc") == str(root / "etc")


def test_absolute_symlink_restarts_at_root(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "etclink").symlink_to("/etc")
    (root / "hostlink").symlink_to(str(outside))    # an absolute host path: means root/<that path>
    assert resolve_in_root(str(root), "/etclink/passwd") == str(root / "etc/passwd")
    assert resolve_in_root(str(root), "/hostlink/x") == str(root) + str(outside) + "/x"


def test_relative_symlinks_climbing_out(root: Path) -> None:
    (root / "usr/lib/up").symlink_to("../../../../../..")
    (root / "escape").symlink_to("/../../..")
    assert resolve_in_root(str(root), "/usr/lib/up") == str(root)
    assert resolve_in_root(str(root), "/usr/lib/up/etc/passwd") == str(root / "etc/passwd")
    assert resolve_in_root(str(root), "/escape/target") == str(root / "target")


def test_dotdot_after_symlink_is_physical(root: Path) -> None:
    # var/l -> /usr/lib; "/var/l/.." is /usr (where the link points), not /var.
    (root / "var/l").symlink_to("/usr/lib")
    assert resolve_in_root(str(root), "/var/l/..") == str(root / "usr")


def test_nested_links(root: Path) -> None:
    (root / "a").symlink_to("b/c")
    (root / "b").symlink_to("/usr")
    (root / "usr/c").symlink_to("lib")
    (root / "usr/lib/final").symlink_to("../../etc/passwd")
    assert resolve_in_root(str(root), "/a") == str(root / "usr/lib")
    assert resolve_in_root(str(root), "/a/final") == str(root / "etc/passwd")
    # A dangling final link resolves to where it points, so it can be created there.
    (root / "dangling").symlink_to("/nowhere/file")
    assert resolve_in_root(str(root), "/dangling") == str(root / "nowhere/file")
    assert resolve_in_root(str(root), "/dangling", follow_final=False) == str(root / "dangling")


def test_loops_are_eloop(root: Path) -> None:
    (root / "loop1").symlink_to("loop2")
    (root / "loop2").symlink_to("/loop1")
    (root / "self").symlink_to("self/x")
    for path in ("/loop1", "/loop2/x", "/self"):
        with pytest.raises(OSError) as info:
            resolve_in_root(str(root), path)
        assert info.value.errno == errno.ELOOP


def test_long_chain_within_limit(root: Path) -> None:
    for i in range(39):
        (root / f"l{i}").symlink_to(f"l{i + 1}")
    (root / "l39").symlink_to("/etc")
    assert resolve_in_root(str(root), "/l0/passwd") == str(root / "etc/passwd")
    (root / "l39").unlink()
    (root / "l39").symlink_to("l40")
    (root / "l40").symlink_to("/etc")
    with pytest.raises(OSError) as info:
        resolve_in_root(str(root), "/l0/passwd")
    assert info.value.errno == errno.ELOOP


def test_root_given_through_a_symlink(root: Path, tmp_path: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(root)
    (root / "abs").symlink_to("/etc")
    assert resolve_in_root(str(alias), "/abs/passwd") == str(root / "etc/passwd")


def test_ensure_mount_target_creates_inside_only(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "escape").symlink_to("/../../..")
    (root / "hostlink").symlink_to(str(outside))
    (root / "up").symlink_to("../..")

    d = ensure_mount_target(str(root), "/escape/mnt/vol", is_dir=True)
    assert d == str(root / "mnt/vol") and os.path.isdir(d)
    f = ensure_mount_target(str(root), "/hostlink/conf/file", is_dir=False)
    assert f == str(root) + str(outside) + "/conf/file"
    assert os.path.isfile(f) and os.path.getsize(f) == 0
    u = ensure_mount_target(str(root), "/up/x", is_dir=True)
    assert u == str(root / "x")
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "x").exists() and not (tmp_path / "mnt").exists()


def test_ensure_mount_target_existing_and_kind_mismatch(root: Path) -> None:
    assert ensure_mount_target(str(root), "/etc", is_dir=True) == str(root / "etc")
    assert ensure_mount_target(str(root), "/etc/passwd", is_dir=False) == str(root / "etc/passwd")
    with pytest.raises(OSError) as info:
        ensure_mount_target(str(root), "/etc", is_dir=False)
    assert info.value.errno == errno.EISDIR
    with pytest.raises(OSError) as info:
        ensure_mount_target(str(root), "/etc/passwd", is_dir=True)
    assert info.value.errno == errno.ENOTDIR
    with pytest.raises(OSError):   # below a regular file: mkdir fails, nothing is created
        ensure_mount_target(str(root), "/etc/passwd/sub", is_dir=True)
    assert (root / "etc/passwd").read_text().startswith("root:")


def test_pinned_refuses_paths_outside(root: Path, tmp_path: Path) -> None:
    with pinned(str(root), str(root / "etc")) as fd_path:
        assert os.path.realpath(fd_path) == str(root / "etc")
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(OSError) as info:
        with pinned(str(root), str(tmp_path / "elsewhere")):
            pass
    assert info.value.errno == errno.EXDEV
    # A final symlink (swapped in after resolution) is refused, never followed.
    (root / "link").symlink_to(str(tmp_path / "elsewhere"))
    with pytest.raises(OSError) as info:
        with pinned(str(root), str(root / "link")):
            pass
    assert info.value.errno == errno.ELOOP
