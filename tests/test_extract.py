"""Extraction without FUSE: the merged tree (copy backend) and single layers for overlayfs.

The model is checked against `umoci unpack` of a smaller tricky image (every union case, a 3 MiB
file across gzip spans instead of 64 MiB, 1000 files instead of 20 000), plus focused cases on
in-memory layers. Root is needed (lchown, mknod, trusted.* xattrs, overlay mounts).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from imagefs.entry import EntryType
from imagefs.errors import InputError, RuntimeFailure
from imagefs.extract import Lower, extract_layer, extract_tree, needs_lower
from imagefs.index import LayerIndex, build_index
from imagefs.layerread import LayerReader
from imagefs.union import ROOT_INODE, Inode, Node, Tree
from tests.mounts import diff, snapshot
from tests.support.images import Member, OciLayout, compress, layer_tar
from tests.support.tricky import CAP, layer_base, layer_changes, layer_many

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (lchown, mknod, trusted.* xattrs)")

SMALL_BIG = 3 << 20
CONFIG = {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]}


def layer_extra() -> list[Member]:
    """Cases the tricky image lacks that matter once layers are separate directories: a directory
    the layer needs but does not describe (it must keep the lower, private metadata), and a
    hardlink to a lower file one of whose lower names this layer whites out."""
    return [
        Member("priv/new", data=b"added below a private directory\n"),
        Member("hl2/.wh.b"),
        Member("hl2/c", "hardlink", linkname="hl2/a"),
    ]


def small_tricky_members() -> list[list[Member]]:
    base = [m if m.path != "big" else Member("big", data=random.Random(1).randbytes(SMALL_BIG)) for m in layer_base()]
    base += [Member("priv", "dir", mode=0o700, uid=5, gid=6), Member("priv/old", data=b"old\n", mode=0o600),
             Member("hl2", "dir"), Member("hl2/a", data=b"two names\n", uid=7), Member("hl2/b", "hardlink", linkname="hl2/a")]
    return [base, layer_changes(), layer_many(1000), layer_extra()]


def small_tricky_layers(compressions: tuple[str, ...] = ("gzip", "none", "gzip", "gzip")) -> list[tuple[bytes, str]]:
    """The tricky image, smaller, plus `layer_extra`: (tar bytes, compression) per layer."""
    fmts = (tarfile.PAX_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT)
    return [(layer_tar(members, fmt), c) for members, fmt, c in zip(small_tricky_members(), fmts, compressions)]


def umoci_snapshot(layout: OciLayout, tag: str, bundle: Path) -> dict:
    if shutil.which("umoci") is None:
        pytest.skip("needs umoci")
    subprocess.run(["umoci", "unpack", "--image", f"{layout.path}:{tag}", str(bundle)], check=True, capture_output=True)
    try:
        return snapshot(bundle / "rootfs")
    finally:
        shutil.rmtree(bundle, ignore_errors=True)


# ---- in-memory layers ---------------------------------------------------------------------------

class Layers:
    """Layers indexed in memory, with readers over their blobs: what an ImageView holds."""

    def __init__(self, layers: list[tuple[bytes, str]]) -> None:
        self.indexes: list[LayerIndex] = []
        self.readers: list[LayerReader] = []
        for tar_bytes, compression in layers:
            blob = compress(tar_bytes, compression)
            digest = "sha256:" + hashlib.sha256(blob).hexdigest()
            index = build_index([blob], digest=digest, size=len(blob), compression=compression)  # type: ignore[arg-type]
            self.indexes.append(index)
            self.readers.append(LayerReader(index, lambda start, n, blob=blob: blob[start:start + n]))
        self.tree = Tree.build([ix.entries for ix in self.indexes])

    def read(self, ino: Inode, offset: int, size: int) -> bytes:
        loc = self.tree.node(ino).location
        assert loc is not None
        return self.readers[loc.layer].read(loc.offset + offset, min(size, loc.size - offset))

    def lower(self, position: int) -> Lower:
        return Lower([ix.entries for ix in self.indexes[:position]],
                     lambda layer, offset, n: self.readers[layer].read(offset, n))

    def extract_layers(self, root: Path) -> list[Path]:
        dirs = []
        for i, (index, reader) in enumerate(zip(self.indexes, self.readers)):
            dirs.append(root / f"layer{i}")
            extract_layer(index, reader.read, dirs[-1], lower=self.lower(i))
        return dirs


def members(*ms: Member) -> list[tuple[bytes, str]]:
    return [(layer_tar(list(ms)), "none")]


@pytest.fixture(scope="module")
def tricky(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract-tricky")
    layout = OciLayout(root / "layout")
    layers = small_tricky_layers()
    layout.add_image(layers, tag="small", config=CONFIG)
    return {"layers": Layers(layers), "expected": umoci_snapshot(layout, "small", root / "bundle")}


@pytest.fixture
def overlay_mounts():
    """Kernel overlays made by a test: unmounted (lazily as a last resort) even if it fails."""
    made: list[Path] = []
    yield made
    for mp in reversed(made):
        if subprocess.run(["umount", str(mp)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mp)], capture_output=True)


# ---- against umoci ------------------------------------------------------------------------------

def test_extract_tree_matches_umoci(tricky, tmp_path):
    layers = tricky["layers"]
    dest = tmp_path / "rootfs"
    heard: list[str] = []
    extract_tree(layers.tree, layers.read, dest, warn=heard.append)
    problems = diff(tricky["expected"], snapshot(dest))
    assert not problems, "\n".join(problems)
    assert heard == []
    assert os.getxattr(dest / "xattrs", "security.capability") == CAP
    assert stat.S_IMODE(os.stat(dest / "suid").st_mode) == 0o4755  # set-id bits survive lchown
    assert os.stat(dest / "frac").st_mtime_ns == 1_700_000_000_500_000_000
    assert os.lstat(dest / "abs").st_mtime_ns == 1_700_000_000 * 10**9  # symlink times, not followed
    assert [p.name for p in tmp_path.iterdir()] == ["rootfs"]  # no temporary directory left


def test_layers_under_kernel_overlay_match_umoci(tricky, tmp_path, overlay_mounts):
    layers = tricky["layers"]
    dirs = layers.extract_layers(tmp_path)
    merged = tmp_path / "merged"
    merged.mkdir()
    lowerdir = ":".join(str(d) for d in reversed(dirs))
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lowerdir}", str(merged)], check=True)
    overlay_mounts.append(merged)
    problems = diff(tricky["expected"], snapshot(merged))
    assert not problems, "\n".join(problems)


def test_layer_directories_hold_overlay_whiteouts(tricky, tmp_path):
    layers = tricky["layers"]
    base, changes, many, extra = layers.extract_layers(tmp_path)
    for gone in ("whiteme", "whitedir"):
        st = os.lstat(changes / gone)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(changes / "opq", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(changes / "opq")) == ["upper"]
    assert not (many / "recreated").is_char_device()  # whited out and recreated in one layer: the file
    assert (many / "recreated").read_bytes() == b"new\n"
    assert (base / "dup").read_bytes() == b"second, wins\n"  # the same path twice: the last wins
    # a hardlink to a lower file: copied into the layer under every name the union gives it
    names = [changes / "hl" / n for n in ("target", "same_layer", "cross_layer")]
    assert len({os.stat(p).st_ino for p in names}) == 1 and os.stat(names[0]).st_nlink == 3
    assert names[2].read_bytes() == b"shared bytes\n" and os.stat(names[2]).st_uid == 1000
    # ... but not under a name this layer whites out
    assert sorted(os.listdir(extra / "hl2")) == ["a", "b", "c"] and (extra / "hl2" / "b").is_char_device()
    assert os.stat(extra / "hl2" / "a").st_nlink == 2
    # a directory the layer needs but does not describe keeps the lower metadata
    st = os.stat(extra / "priv")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o700, 5, 6)
    assert sorted(os.listdir(extra / "priv")) == ["new"]


EDGES = {
    "link to a lower symlink": [[Member("t", "symlink", linkname="x")], [Member("l", "hardlink", linkname="t")]],
    "link undone by a later entry": [[Member("t", data=b"t")],
                                     [Member("l", "hardlink", linkname="t"), Member("l", data=b"own")]],
    "link made a directory by a later entry": [[Member("t", data=b"t")],
                                               [Member("l", "hardlink", linkname="t"), Member("l/c", data=b"c")]],
    "link to a link to a lower file": [[Member("t", data=b"t", uid=3)],
                                       [Member("a", "hardlink", linkname="t"), Member("b", "hardlink", linkname="a")]],
    "implicit directories under a private one": [[Member("p", "dir", mode=0o700, uid=3)],
                                                 [Member("p/q/r", data=b"r")]],
    "directory whited out and made again": [[Member("d", "dir"), Member("d/x", data=b"x")],
                                            [Member(".wh.d"), Member("d", "dir", mode=0o711), Member("d/y", data=b"y")]],
    "opaque directory with lower subdirectories": [[Member("o", "dir"), Member("o/a"), Member("o/s", "dir"), Member("o/s/b")],
                                                   [Member("o/.wh..wh..opq"), Member("o/c")]],
    "file over a lower directory": [[Member("r", "dir"), Member("r/x")], [Member("r", data=b"r")]],
    "link over a name whited out in between": [[Member("t", data=b"t"), Member("u", "hardlink", linkname="t")],
                                               [Member(".wh.u")], [Member("v", "hardlink", linkname="t")]],
}


@pytest.mark.parametrize("case", EDGES)
def test_layers_under_overlay_equal_the_merged_tree(case, tmp_path, overlay_mounts):
    layers = Layers([(layer_tar(ms), "none") for ms in EDGES[case]])
    extract_tree(layers.tree, layers.read, tmp_path / "tree")
    dirs = layers.extract_layers(tmp_path)
    merged = tmp_path / "merged"
    merged.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={':'.join(str(d) for d in reversed(dirs))}",
                    str(merged)], check=True)
    overlay_mounts.append(merged)
    problems = diff(snapshot(tmp_path / "tree"), snapshot(merged))
    assert not problems, "\n".join(problems)


def test_needs_lower(tricky):
    base, changes, many, extra = (ix.entries for ix in tricky["layers"].indexes)
    assert not needs_lower(base) and not needs_lower(many)
    assert needs_lower(changes) and needs_lower(extra)


# ---- focused cases ------------------------------------------------------------------------------

def test_bottom_layer_alone_and_without_whiteouts(tmp_path):
    layers = Layers(members(Member("d", "dir"), Member("d/.wh.x"), Member("d/.wh..wh..opq"),
                            Member("d/f", data=b"f"), Member("i/implicit", data=b"i")))
    index, reader = layers.indexes[0], layers.readers[0]
    extract_layer(index, reader.read, tmp_path / "plain")
    assert (tmp_path / "plain/d/x").is_char_device() and os.getxattr(tmp_path / "plain/d", "trusted.overlay.opaque") == b"y"
    assert stat.S_IMODE(os.stat(tmp_path / "plain/i").st_mode) == 0o755  # nothing below: the default
    extract_layer(index, reader.read, tmp_path / "flat", whiteouts=False)
    assert sorted(os.listdir(tmp_path / "flat/d")) == ["f"] and os.listxattr(tmp_path / "flat/d") == []


def test_hardlink_to_missing_target_is_dropped_with_a_warning(tmp_path):
    layers = Layers(members(Member("f", data=b"x"), Member("link", "hardlink", linkname="nowhere")))
    heard: list[str] = []
    extract_layer(layers.indexes[0], layers.readers[0].read, tmp_path / "l", warn=heard.append)
    assert os.listdir(tmp_path / "l") == ["f"]
    assert len(heard) == 1 and "'link'" in heard[0] and "'nowhere'" in heard[0]


def test_overlay_xattrs_from_the_image_are_dropped(tmp_path):
    layers = Layers(members(Member("d", "dir", xattrs={"trusted.overlay.opaque": b"y", "user.keep": b"1"})))
    heard: list[str] = []
    extract_layer(layers.indexes[0], layers.readers[0].read, tmp_path / "l", warn=heard.append)
    assert os.listxattr(tmp_path / "l/d") == ["user.keep"]
    assert len(heard) == 1 and "trusted.overlay.opaque" in heard[0]
    # the merged tree (no overlayfs involved) keeps it
    extract_tree(layers.tree, layers.read, tmp_path / "t")
    assert os.getxattr(tmp_path / "t/d", "trusted.overlay.opaque") == b"y"


def test_refused_xattrs_are_skipped_with_one_warning(tmp_path):
    # user.* xattrs are not allowed on symlinks or device nodes: the file system refuses them
    layers = Layers(members(*(Member(f"s{i}", "symlink", linkname="t", xattrs={"user.x": b"1"}) for i in range(3)),
                            Member("f", data=b"f", xattrs={"user.x": b"1"})))
    heard: list[str] = []
    extract_tree(layers.tree, layers.read, tmp_path / "t", warn=heard.append)
    assert os.getxattr(tmp_path / "t/f", "user.x") == b"1"
    assert all(os.readlink(tmp_path / f"t/s{i}") == "t" for i in range(3))
    assert len(heard) == 1 and "user.x" in heard[0] and "3 entries" in heard[0]


def test_symlinks_in_the_image_never_redirect_writes(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    layers = Layers(members(Member("evil", "symlink", linkname=str(outside)))
                    + members(Member("evil/planted", data=b"x"), Member("up", "symlink", linkname="..")))
    dest = tmp_path / "rootfs"
    extract_tree(layers.tree, layers.read, dest)
    assert list(outside.iterdir()) == []
    assert (dest / "evil").is_dir() and not (dest / "evil").is_symlink()
    assert (dest / "evil/planted").read_bytes() == b"x"


def _tree_with_child(name: bytes) -> Tree:
    nodes: list[Node | None] = [None, Node(EntryType.DIR, 0o755, nlink=2, ino=ROOT_INODE),
                                Node(EntryType.FILE, 0o644, nlink=1, ino=Inode(2))]
    return Tree(nodes, {1: ((name, Inode(2)),)}, {1: {name: Inode(2)}})


@pytest.mark.parametrize("name", [b"..", b"../escaped", b"a/b", b"", b"."])
def test_names_that_are_not_one_component_are_refused(tmp_path, name):
    dest = tmp_path / "box" / "rootfs"
    dest.parent.mkdir()
    with pytest.raises(InputError) as e:
        extract_tree(_tree_with_child(name), lambda ino, off, n: b"", dest)
    assert "single path component" in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["box"]  # nothing written, no temp dir left


def test_destination_must_be_empty_and_failures_leave_nothing(tmp_path):
    layers = Layers(members(Member("a", data=b"a" * 100)))
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        extract_tree(layers.tree, layers.read, full)
    empty = tmp_path / "empty"
    empty.mkdir()
    extract_tree(layers.tree, layers.read, empty)  # an empty directory is replaced
    assert (empty / "a").read_bytes() == b"a" * 100

    def failing(ino: Inode, offset: int, n: int) -> bytes:
        raise OSError(5, "Input/output error")

    with pytest.raises(RuntimeFailure) as e:
        extract_tree(layers.tree, failing, tmp_path / "never")
    assert str(tmp_path / "never" / "a") in str(e.value)
    short: Callable[[Inode, int, int], bytes] = lambda ino, offset, n: b""  # noqa: E731
    with pytest.raises(RuntimeFailure, match="short read"):
        extract_tree(layers.tree, short, tmp_path / "never")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "full"]
