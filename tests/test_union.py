"""The union of layers (imagefs.union), on hand-built entries; no FUSE, no root.

The last tests unpack the same layers with `umoci` (skipped where it is missing) and compare.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from imagefs.entry import Entry, EntryType
from imagefs.union import ROOT_INODE, DataLocation, Inode, Node, Tree

# --- building entries by hand -------------------------------------------------------------------

_offset = [512]


def _b(s: str | bytes) -> bytes:
    return s.encode() if isinstance(s, str) else s


def F(path: str | bytes, mode: int = 0o644, **kw: object) -> Entry:
    """A regular file; each gets a distinct data offset unless one is given."""
    if "offset" not in kw:
        _offset[0] += 1024
        kw["offset"] = _offset[0]
    kw.setdefault("size", 10)
    return Entry(_b(path), EntryType.FILE, mode, **kw)  # type: ignore[arg-type]


def D(path: str | bytes, mode: int = 0o755, **kw: object) -> Entry:
    return Entry(_b(path), EntryType.DIR, mode, **kw)  # type: ignore[arg-type]


def S(path: str | bytes, target: str | bytes, **kw: object) -> Entry:
    kw["linkname"] = _b(target)
    return Entry(_b(path), EntryType.SYMLINK, 0o777, **kw)  # type: ignore[arg-type]


def H(path: str | bytes, target: str | bytes, mode: int = 0o644, **kw: object) -> Entry:
    kw["linkname"] = _b(target)
    return Entry(_b(path), EntryType.HARDLINK, mode, **kw)  # type: ignore[arg-type]


def WH(path: str | bytes) -> Entry:
    """The whiteout of `path`."""
    head, _, name = _b(path).rpartition(b"/")
    return F((head + b"/" if head else b"") + b".wh." + name, size=0)


def OPQ(directory: str | bytes) -> Entry:
    d = _b(directory)
    return F((d + b"/" if d else b"") + b".wh..wh..opq", size=0)


def build(*layers: list[Entry], heard: list[str] | None = None) -> Tree:
    """Build a tree; warnings go to `heard`, and without it there must be none."""
    got: list[str] = [] if heard is None else heard
    tree = Tree.build(layers, warn=got.append)
    if heard is None:
        assert got == []
    return tree


def at(tree: Tree, path: str | bytes) -> Node:
    ino = tree.resolve(_b(path))
    assert ino is not None, f"{path!r} missing"
    return tree.node(ino)


def ino_of(tree: Tree, path: str | bytes) -> Inode:
    ino = tree.resolve(_b(path))
    assert ino is not None, f"{path!r} missing"
    return ino


def paths(tree: Tree) -> list[bytes]:
    return [p for p, _ in tree.walk()]


def snapshot(tree: Tree) -> list[tuple[bytes, int, tuple[object, ...]]]:
    """Every path, inode and attribute: equal snapshots mean equal trees, numbering included."""
    out = []
    for p, ino in tree.walk():
        n = tree.node(ino)
        attrs = (n.type, n.mode, n.uid, n.gid, n.size, n.mtime_ns, n.rdev, dict(n.xattrs),
                 n.target, n.location, n.nlink, n.ino)
        out.append((p, ino, attrs))
    return out


# --- whiteouts ----------------------------------------------------------------------------------


def test_whiteout_removes_a_file_only() -> None:
    tree = build([D("a"), F("a/x"), F("a/y")], [WH("a/x")])
    assert tree.resolve(b"a/x") is None
    assert paths(tree) == [b"", b"a", b"a/y"]


def test_whiteout_removes_a_directory_subtree() -> None:
    tree = build([D("a"), D("a/b"), D("a/b/c"), F("a/b/c/f"), F("a/keep")], [WH("a/b")])
    assert tree.resolve(b"a/b") is None
    assert tree.resolve(b"a/b/c/f") is None
    assert paths(tree) == [b"", b"a", b"a/keep"]
    assert at(tree, "a").nlink == 2  # its only subdirectory went


def test_whiteout_does_not_touch_its_own_layer() -> None:
    # A whiteout and a new entry of the same name in one layer: the new entry stays, in either
    # tar order; the lower one is gone.
    for order in ([F("a/x", mode=0o600), WH("a/x")], [WH("a/x"), F("a/x", mode=0o600)]):
        tree = build([D("a"), F("a/x", uid=7)], order)
        x = at(tree, "a/x")
        assert (x.mode, x.uid, x.location.layer) == (0o600, 0, 1)  # type: ignore[union-attr]


def test_whiteout_and_recreate_a_directory_drops_lower_children() -> None:
    tree = build([D("d"), F("d/old")], [WH("d"), D("d", mode=0o700), F("d/new")])
    assert paths(tree) == [b"", b"d", b"d/new"]
    assert at(tree, "d").mode == 0o700


def test_whiteout_of_missing_path_changes_nothing() -> None:
    tree = build([F("f")], [WH("no/such/x"), WH("nothing"), WH("f/below-a-file")])
    assert paths(tree) == [b"", b"f"]  # no parent made for a whiteout


def test_opaque_directory() -> None:
    tree = build(
        [D("d"), F("d/lower"), D("d/sub"), F("d/sub/z"), F("outside")],
        # the same-layer child before and after the marker: both stay
        [D("d", mode=0o700), F("d/before"), OPQ("d"), F("d/after")],
        [F("d/upper")],
    )
    assert [n for n, _ in tree.children(ino_of(tree, "d"))] == [b"after", b"before", b"upper"]
    assert at(tree, "d").mode == 0o700
    assert at(tree, "d").nlink == 2
    assert tree.resolve(b"d/sub/z") is None
    assert tree.resolve(b"outside") is not None


def test_opaque_at_root_and_on_missing_dir() -> None:
    tree = build([F("a"), D("b"), F("b/c")], [OPQ(""), F("new"), OPQ("x/y")])
    assert paths(tree) == [b"", b"new"]


def test_whiteout_and_aufs_entries_are_never_visible() -> None:
    tree = build(
        [D("d"), F("d/x")],
        [
            WH("d/x"), OPQ("d"), WH("d/not-there"),
            F(".wh..wh.aufs"), D(".wh..wh.plnk", mode=0o700), F(".wh..wh.plnk/123.456"),
            D(".wh..wh.orph"), F("d/.wh..wh.orph/q"),
        ],
    )
    assert paths(tree) == [b"", b"d"]
    assert all(b".wh." not in p for p in paths(tree))


def test_whiteout_without_name_warns() -> None:
    heard: list[str] = []
    tree = build([F("x")], [F("d/.wh.")], heard=heard)
    assert paths(tree) == [b"", b"x"]
    assert len(heard) == 1 and "whiteout without a name" in heard[0]


# --- replacing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("upper", [F("d"), S("d", "/elsewhere"), H("d", "f")])
def test_non_directory_replaces_directory_and_subtree(upper: Entry) -> None:
    tree = build([F("f"), D("d"), D("d/s"), F("d/s/y"), F("d/x")], [upper])
    assert at(tree, "d").type != EntryType.DIR
    assert tree.resolve(b"d/x") is None and tree.resolve(b"d/s/y") is None
    assert paths(tree) == [b"", b"d", b"f"]
    assert tree.total_files == 3 - (upper.type == EntryType.HARDLINK)  # root, d, f


def test_directory_replaces_file() -> None:
    tree = build([F("a", mode=0o600)], [D("a", mode=0o700, uid=5), F("a/x")])
    a = at(tree, "a")
    assert (a.type, a.mode, a.uid, a.location) == (EntryType.DIR, 0o700, 5, None)
    assert paths(tree) == [b"", b"a", b"a/x"]


def test_directory_over_directory_merges_children_and_takes_upper_metadata() -> None:
    tree = build(
        [D("d", uid=1, gid=1, mtime_ns=1, xattrs={b"user.low": b"1"}), F("d/x")],
        [D("d", mode=0o750, uid=2, gid=3, mtime_ns=2, xattrs={b"user.up": b"2"}), F("d/y")],
    )
    d = at(tree, "d")
    assert (d.mode, d.uid, d.gid, d.mtime_ns) == (0o750, 2, 3, 2)
    assert dict(d.xattrs) == {b"user.up": b"2"}  # replaced, not merged
    assert [n for n, _ in tree.children(ino_of(tree, "d"))] == [b"x", b"y"]


def test_same_path_twice_in_one_layer_last_wins() -> None:
    tree = build([F("f", mode=0o600, offset=1000), F("f", mode=0o640, offset=3000, size=3)])
    assert at(tree, "f").mode == 0o640
    assert at(tree, "f").location == DataLocation(0, 3000, 3)
    assert tree.total_files == 2
    # dir then file: the file wins, the same layer's children under the dir go with it
    tree = build([D("a"), F("a/x"), F("a")])
    assert paths(tree) == [b"", b"a"] and at(tree, "a").type == EntryType.FILE
    # dir twice: children kept, the second entry's metadata
    tree = build([D("a", mode=0o700), F("a/x"), D("a", mode=0o711)])
    assert paths(tree) == [b"", b"a", b"a/x"] and at(tree, "a").mode == 0o711


def test_entries_after_a_directory_was_replaced_land_in_a_new_directory() -> None:
    # same layer: a/x, then a file "a", then a/y: a/y needs a fresh implicit a, x stays gone
    tree = build([D("a", mode=0o700), F("a/x"), F("a"), F("a/y")])
    assert paths(tree) == [b"", b"a", b"a/y"]
    assert at(tree, "a").mode == 0o755
    # a whiteout of a directory used by the layer below, then entries under its name
    tree = build([D("a"), D("a/b"), F("a/b/x")], [WH("a"), F("a/b/z")], [OPQ("a/b"), F("a/b/w")])
    assert paths(tree) == [b"", b"a", b"a/b", b"a/b/w"]


# --- implicit parents -----------------------------------------------------------------------------


def test_missing_parents_are_implicit_directories() -> None:
    tree = build([F("a/b/c", uid=9, mtime_ns=5)])
    for p in ("a", "a/b"):
        n = at(tree, p)
        assert (n.type, n.mode, n.uid, n.gid, n.mtime_ns) == (EntryType.DIR, 0o755, 0, 0, 0)
    assert at(tree, "a/b/c").uid == 9


def test_explicit_entry_after_implicit_parent_sets_metadata() -> None:
    tree = build([F("a/b/c"), D("a", mode=0o700, mtime_ns=3)], [D("a/b", mode=0o711, uid=4)])
    assert (at(tree, "a").mode, at(tree, "a").mtime_ns) == (0o700, 3)
    assert (at(tree, "a/b").mode, at(tree, "a/b").uid) == (0o711, 4)
    assert tree.resolve(b"a/b/c") is not None


@pytest.mark.parametrize("lower", [F("a"), S("a", "d")])
def test_path_through_lower_non_directory_replaces_it(lower: Entry) -> None:
    # A symlink on the way is not followed (umoci would write d/b): it is replaced.
    tree = build([D("d"), lower], [F("a/b")])
    a = at(tree, "a")
    assert (a.type, a.mode, a.uid, a.mtime_ns) == (EntryType.DIR, 0o755, 0, 0)
    assert paths(tree) == [b"", b"a", b"a/b", b"d"]


# --- hardlinks ------------------------------------------------------------------------------------


def test_hardlink_in_same_layer_shares_the_inode() -> None:
    tree = build([F("t", mode=0o600, uid=3, offset=4096, size=5), D("x"),
                  H("x/l", "t", mode=0o777)])
    t, l = at(tree, "t"), at(tree, "x/l")
    assert ino_of(tree, "t") == ino_of(tree, "x/l")
    assert t is l
    assert (t.nlink, l.mode, l.uid, l.type) == (2, 0o600, 3, EntryType.FILE)
    assert l.location == DataLocation(0, 4096, 5)
    assert tree.total_files == 3  # root, x, one file inode


def test_hardlink_to_a_lower_layer_uses_the_lower_data() -> None:
    tree = build([F("t", mode=0o600, mtime_ns=5, offset=8192, size=7)],
                 [H("l", "t", mode=0o777, mtime_ns=9)])
    l = at(tree, "l")
    assert ino_of(tree, "l") == ino_of(tree, "t")
    assert (l.nlink, l.mode, l.mtime_ns) == (2, 0o600, 5)  # the link header's metadata is ignored
    assert l.location == DataLocation(0, 8192, 7)


def test_hardlink_after_target_whited_out_in_same_layer_is_dropped() -> None:
    # Whiteouts apply before the layer's entries, so the target is gone in either tar order
    # (umoci, applying whiteouts in tar order, keeps the link in the second case).
    for layer in ([WH("t"), H("l", "t")], [H("l", "t"), WH("t")]):
        heard: list[str] = []
        tree = build([F("t")], layer, heard=heard)
        assert paths(tree) == [b""]
        assert len(heard) == 1 and "'l'" in heard[0] and "missing" in heard[0]


def test_hardlink_after_target_whited_out_below_is_dropped() -> None:
    heard: list[str] = []
    tree = build([F("t")], [WH("t")], [H("l", "t")], heard=heard)
    assert paths(tree) == [b""] and len(heard) == 1


def test_hardlink_to_target_recreated_in_same_layer() -> None:
    tree = build([F("t", offset=100)], [WH("t"), F("t", offset=200), H("l", "t")])
    assert ino_of(tree, "l") == ino_of(tree, "t")
    assert at(tree, "l").location == DataLocation(1, 200, 10)


def test_hardlink_keeps_inode_when_target_name_later_whited_out() -> None:
    tree = build([F("t", offset=777), H("l", "t")], [WH("t")])
    assert tree.resolve(b"t") is None
    assert (at(tree, "l").nlink, at(tree, "l").location) == (1, DataLocation(0, 777, 10))


def test_hardlink_keeps_old_inode_when_target_overwritten_later_in_layer() -> None:
    tree = build([F("t", offset=100)], [H("l", "t"), F("t", offset=200)])
    assert ino_of(tree, "l") != ino_of(tree, "t")
    assert at(tree, "l").location == DataLocation(0, 100, 10)
    assert at(tree, "t").location == DataLocation(1, 200, 10)
    assert at(tree, "l").nlink == at(tree, "t").nlink == 1


def test_overwriting_one_hardlinked_name() -> None:
    tree = build([F("t", offset=100), H("l", "t"), H("m", "t")], [F("l", offset=300)])
    assert ino_of(tree, "t") == ino_of(tree, "m") != ino_of(tree, "l")
    assert at(tree, "t").nlink == 2
    assert (at(tree, "l").nlink, at(tree, "l").location) == (1, DataLocation(1, 300, 10))


def test_hardlink_chain_and_to_symlink_and_device() -> None:
    dev = Entry(b"dev", EntryType.CHAR, 0o600, devmajor=1, devminor=3)
    tree = build([F("t"), H("l", "t"), H("m", "l"), S("s", "/nowhere"), H("s2", "s"),
                  dev, H("dev2", "dev")])
    assert ino_of(tree, "t") == ino_of(tree, "l") == ino_of(tree, "m")
    assert at(tree, "t").nlink == 3
    assert at(tree, "s2").type == EntryType.SYMLINK and at(tree, "s2").target == b"/nowhere"
    assert at(tree, "s").nlink == 2
    assert at(tree, "dev2").rdev == os.makedev(1, 3)


def test_hardlink_to_missing_or_directory_is_dropped_with_a_warning() -> None:
    heard: list[str] = []
    links = [H("p/q/l", "nope"), H("l2", "d"), H("l3", ""), H("l4", b"caf\xe9/x")]
    tree = build([D("d"), F(b"caf\xe9")], links, heard=heard)
    assert paths(tree) == [b"", b"caf\xe9", b"d"]  # no parents made for a dropped link
    assert len(heard) == 4
    assert "missing" in heard[0] and "directory" in heard[1] and "directory" in heard[2]
    assert "caf\\xe9" in heard[3]


def test_hardlink_does_not_follow_symlinks_in_target_path() -> None:
    heard: list[str] = []
    tree = build([D("real"), F("real/f"), S("link", "real")], [H("l", "link/f")], heard=heard)
    assert tree.resolve(b"l") is None and len(heard) == 1


# --- symlinks, devices, attributes ----------------------------------------------------------------


def test_symlinks_are_data() -> None:
    tree = build([S("loop", "loop"), S("abs", "/etc/passwd"), S("up", "../../..")], [F("abs/x")])
    loop = at(tree, "loop")
    assert (loop.type, loop.target, loop.size) == (EntryType.SYMLINK, b"loop", 4)
    assert loop.location is None
    odd = build([Entry(b"s", EntryType.SYMLINK, 0o644, linkname=b"x")])
    assert at(odd, "s").mode == 0o777  # as lstat shows any symlink
    assert stat.S_ISLNK(loop.st_mode)
    assert at(tree, "up").target == b"../../.."
    assert at(tree, "abs").type == EntryType.DIR  # replaced on the way to abs/x, not followed


def test_nodes_have_no_instance_dict() -> None:
    assert not hasattr(Node(EntryType.FILE, 0o644), "__dict__")  # 100k+ of them: slots only


def test_node_attributes() -> None:
    tree = build([
        Entry(b"blk", EntryType.BLOCK, 0o660, uid=1, gid=6, devmajor=8, devminor=1,
              mtime_ns=1_500_000_001),
        Entry(b"fifo", EntryType.FIFO, 0o644),
        F("suid", mode=0o4755, size=123, xattrs={b"security.capability": b"\x01\x00"}),
    ])
    blk = at(tree, "blk")
    assert (blk.rdev, blk.gid, blk.mtime_ns) == (os.makedev(8, 1), 6, 1_500_000_001)
    assert blk.location is None
    assert stat.S_ISBLK(blk.st_mode) and stat.S_IMODE(blk.st_mode) == 0o660
    assert stat.S_ISFIFO(at(tree, "fifo").st_mode)
    suid = at(tree, "suid")
    assert suid.st_mode == stat.S_IFREG | 0o4755
    assert dict(suid.xattrs) == {b"security.capability": b"\x01\x00"}
    assert dict(blk.xattrs) == {}
    assert tree.total_size == 123


def test_root_attributes() -> None:
    tree = build([F("x")])
    root = tree.node(ROOT_INODE)
    assert (root.type, root.mode, root.uid, root.gid) == (EntryType.DIR, 0o755, 0, 0)
    assert (root.mtime_ns, root.ino, root.nlink) == (0, 1, 2)
    tree = build([D("", mode=0o700, mtime_ns=5), F("x")], [D(".", mode=0o750, uid=1)], [F("y")])
    root = tree.node(ROOT_INODE)
    assert (root.mode, root.uid, root.mtime_ns) == (0o750, 1, 0)
    assert paths(tree) == [b"", b"x", b"y"]
    heard: list[str] = []
    tree = build([D("", mode=0o700)], [F("")], heard=heard)
    assert tree.node(ROOT_INODE).mode == 0o700 and len(heard) == 1


# --- inodes, nlink, readdir -----------------------------------------------------------------------


def _image() -> list[list[Entry]]:
    return [
        [D("etc"), F("etc/passwd", offset=1), F("etc/group", offset=2), D("bin"),
         F("bin/sh", offset=3), H("bin/ash", "bin/sh"), D("usr"), D("usr/lib"),
         F("usr/lib/a", offset=4), S("lib", "usr/lib")],
        [D("etc", mode=0o700), F("etc/hosts", offset=5), WH("usr/lib"), F("usr/bin/x", offset=6)],
        [F("var/log/y", offset=7), H("var/z", "bin/sh")],
    ]


def test_inode_numbers_are_a_function_of_the_image() -> None:
    first = snapshot(Tree.build(_image()))
    assert snapshot(Tree.build(_image())) == first
    # root 1, then breadth-first, each directory's children in byte order
    tree = Tree.build(_image())
    assert [n for n, _ in tree.children(ROOT_INODE)] == [b"bin", b"etc", b"lib", b"usr", b"var"]
    assert [i for _, i in tree.children(ROOT_INODE)] == [2, 3, 4, 5, 6]
    assert [i for _, i in tree.children(ino_of(tree, "bin"))] == [7, 7]  # ash, sh: one inode
    assert ino_of(tree, "var/z") == 7 and at(tree, "bin/sh").nlink == 3


def test_inode_numbers_do_not_depend_on_entry_order_where_order_does_not_matter() -> None:
    layers = _image()
    flat = [e for e in layers[0] if e.type != EntryType.HARDLINK]
    reference = snapshot(Tree.build([flat, layers[1]]))
    rng = random.Random(4)
    for _ in range(5):
        shuffled = flat[:]
        rng.shuffle(shuffled)  # children may now come before their explicit parent entry
        upper = layers[1][:]
        rng.shuffle(upper)
        assert snapshot(Tree.build([shuffled, upper])) == reference


def test_directory_nlink() -> None:
    tree = build([D("a"), D("a/b"), D("a/c"), F("a/f"), S("a/s", "b"), D("a/b/d")], [WH("a/c")])
    assert tree.node(ROOT_INODE).nlink == 3
    assert at(tree, "a").nlink == 3  # b only, c is gone; files and symlinks don't count
    assert at(tree, "a/b").nlink == 3 and at(tree, "a/b/d").nlink == 2
    assert at(tree, "a/f").nlink == 1


def test_readdir_order_is_bytes_order_and_stable() -> None:
    names = [b"b", b"B", b"a-", b"a.b", b"a", b"\xff", b"\x01", b"caf\xc3\xa9", b"z" * 255]
    tree = build([F(n) for n in names])
    listed = tree.children(ROOT_INODE)
    assert [n for n, _ in listed] == sorted(names)
    assert tree.children(ROOT_INODE) is listed
    for i, (name, ino) in enumerate(listed):  # an offset token indexes straight into the list
        assert tree.lookup(ROOT_INODE, name) == ino == tree.children(ROOT_INODE)[i][1]
    assert tree.lookup(ROOT_INODE, b"nope") is None


def test_non_utf8_names() -> None:
    tree = build([D(b"\xff\xfe"), F(b"\xff\xfe/caf\xe9"), S(b"l\x80", b"\xff\xfe/caf\xe9")],
                 [H(b"h\xe9", b"\xff\xfe/caf\xe9")])
    assert ino_of(tree, b"h\xe9") == ino_of(tree, b"\xff\xfe/caf\xe9")
    assert at(tree, b"l\x80").target == b"\xff\xfe/caf\xe9"
    assert paths(tree) == [b"", b"h\xe9", b"l\x80", b"\xff\xfe", b"\xff\xfe/caf\xe9"]


def test_unknown_inodes_and_non_directories() -> None:
    tree = build([F("f")])
    f = ino_of(tree, "f")
    for bad in (0, -1, 3, 10**9):
        with pytest.raises(KeyError):
            tree.node(Inode(bad))
        with pytest.raises(KeyError):
            tree.children(Inode(bad))
        with pytest.raises(KeyError):
            tree.lookup(Inode(bad), b"f")
    with pytest.raises(NotADirectoryError):
        tree.children(f)
    with pytest.raises(NotADirectoryError):
        tree.lookup(f, b"x")
    assert tree.resolve(b"f/x") is None and tree.resolve(b"g") is None
    assert tree.resolve(b"") == ROOT_INODE


def test_walk_lists_hardlinks_under_each_name_and_totals_count_inodes_once() -> None:
    tree = build([D("d"), F("d/t", size=100), H("d/l", "d/t"), H("top", "d/t"),
                  D("e"), F("e/u", size=1)])
    walked = dict(tree.walk())
    assert list(walked) == [b"", b"d", b"d/l", b"d/t", b"e", b"e/u", b"top"]
    assert walked[b"d/l"] == walked[b"d/t"] == walked[b"top"]
    assert (tree.total_files, tree.total_size) == (5, 101)


# --- size -----------------------------------------------------------------------------------------


def _big_layer(n: int, seed: int, dirs: int = 200) -> list[Entry]:
    layer = [D(f"d{i:03}") for i in range(dirs)]
    layer += [F(f"d{i % dirs:03}/f{seed}-{i:06}", offset=i * 1024, size=i) for i in range(n)]
    return layer


def test_layer_of_20000_files() -> None:
    layer = _big_layer(20_000, 0)
    tree = build(layer)
    assert tree.total_files == 1 + 200 + 20_000
    assert tree.total_size == sum(range(20_000))
    assert len(tree.children(ino_of(tree, "d007"))) == 100
    assert at(tree, "d123/f0-012323").location == DataLocation(0, 12323 * 1024, 12323)
    assert sorted(tree.node(i).ino for _, i in tree.walk()) == list(range(1, tree.total_files + 1))


def test_five_layers_of_20000_entries() -> None:
    # Speed is a benchmark's business (~0.3 s measured); this checks the counts at that scale.
    layers = [_big_layer(20_000, s) for s in range(5)]
    layers[4] += [OPQ("d000")] + [WH(f"d001/f3-{i:06}") for i in range(1, 20_000, 200)]
    tree = build(*layers)
    assert tree.total_files == 1 + 200 + 5 * 20_000 - 4 * 100 - 100


# --- against umoci --------------------------------------------------------------------------------

UMOCI = shutil.which("umoci")
_TAR_TYPES = {"f": tarfile.REGTYPE, "d": tarfile.DIRTYPE, "l": tarfile.SYMTYPE,
              "h": tarfile.LNKTYPE}
_ENTRY_TYPES = {tarfile.REGTYPE: EntryType.FILE, tarfile.DIRTYPE: EntryType.DIR,
                tarfile.SYMTYPE: EntryType.SYMLINK, tarfile.LNKTYPE: EntryType.HARDLINK}
Member = tuple[tarfile.TarInfo, bytes]


def _m(name: str, kind: str = "f", data: bytes = b"", mode: int = 0o644, mtime: int = 1000,
       link: str = "", uid: int = 0) -> Member:
    ti = tarfile.TarInfo(name)
    ti.mode, ti.mtime, ti.uid, ti.gid, ti.linkname = mode, mtime, uid, uid, link
    ti.type = _TAR_TYPES[kind]
    ti.size = len(data) if kind == "f" else 0
    return ti, data


def _tar(members: list[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for ti, data in members:
            t.addfile(ti, io.BytesIO(data) if ti.size else None)
    return buf.getvalue()


def _norm(path: str) -> bytes:
    return os.path.normpath("/" + path).lstrip("/").encode()


def _entries(blob: bytes) -> list[Entry]:
    """A stand-in for the index builder, enough for these layers."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(blob)) as t:
        for ti in t:
            kind = _ENTRY_TYPES[ti.type]
            link = _norm(ti.linkname) if kind == EntryType.HARDLINK else ti.linkname.encode()
            out.append(Entry(_norm(ti.name), kind, ti.mode, ti.uid, ti.gid, ti.size,
                             int(ti.mtime) * 10**9, link, offset=ti.offset_data))
    return out


def _umoci_unpack(blobs: list[bytes], where: Path) -> Path:
    """Unpack `blobs` as the layers of an OCI image with umoci; returns the rootfs."""
    layout = where / "oci"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def put(media_type: str, data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (layout / "blobs" / "sha256" / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": "sha256:" + digest, "size": len(data)}

    oci = "application/vnd.oci.image."
    layers = [put(oci + "layer.v1.tar", b) for b in blobs]
    rootfs = {"type": "layers", "diff_ids": [d["digest"] for d in layers]}
    config = {"architecture": "amd64", "os": "linux", "config": {}, "rootfs": rootfs}
    config_desc = put(oci + "config.v1+json", json.dumps(config).encode())
    manifest = {"schemaVersion": 2, "mediaType": oci + "manifest.v1+json",
                "config": config_desc, "layers": layers}
    ref = put(oci + "manifest.v1+json", json.dumps(manifest).encode())
    ref["annotations"] = {"org.opencontainers.image.ref.name": "t"}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [ref]}))
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    assert UMOCI is not None
    subprocess.run([UMOCI, "unpack", *rootless, "--image", f"{layout}:t", str(where / "bundle")],
                   check=True, capture_output=True)
    return where / "bundle" / "rootfs"


# Only cases where we and umoci 0.4.7 agree (see imagefs/union.py for where we differ).
SCENARIOS: dict[str, list[list[Member]]] = {
    "whiteouts": [
        [_m("d", "d"), _m("d/x", data=b"x"), _m("d/s", "d"), _m("d/s/y", data=b"y"), _m("d/k")],
        [_m("d/.wh.x"), _m("d/.wh.s")],
    ],
    "opaque": [
        [_m("d", "d"), _m("d/lo", data=b"1"), _m("d/sub", "d"), _m("d/sub/z")],
        [_m("d", "d", mode=0o700, mtime=5), _m("d/.wh..wh..opq"), _m("d/new", data=b"2")],
        [_m("d/up", data=b"3")],
    ],
    "recreate": [
        [_m("a", data=b"low"), _m("b", data=b"low")],
        [_m("a", data=b"new a", mode=0o600), _m(".wh.a"), _m(".wh.b"), _m("b", data=b"new b")],
    ],
    "replace": [
        [_m("d", "d"), _m("d/x", data=b"1"), _m("f", data=b"f")],
        [_m("d", data=b"now a file"), _m("f", "d", mode=0o711), _m("f/in", data=b"2")],
    ],
    "dir_over_dir": [
        [_m("d", "d", mtime=1, uid=3), _m("d/x", data=b"1")],
        [_m("d", "d", mode=0o700, mtime=2)],
    ],
    "hardlinks": [
        [_m("t", data=b"target", mode=0o600, mtime=5), _m("l", "h", link="t"),
         _m("m", "h", link="t"), _m("w", data=b"w"), _m("wl", "h", link="w")],
        [_m("up", "h", link="t", mode=0o777), _m("m", data=b"m over"), _m(".wh.w")],
    ],
    "hardlink_forward": [[_m("t", data=b"low")], [_m("l", "h", link="t"), _m("t", data=b"up")]],
    "duplicates_and_root": [
        [_m("./", "d", mode=0o700, mtime=77), _m("f", data=b"1", mode=0o600),
         _m("f", data=b"22", mode=0o640), _m("s", "l", link="/abs/loop")],
    ],
    "implicit_parents": [[_m("a/b/c", data=b"deep")], [_m("a/b/d", data=b"d")]],
}


@pytest.mark.skipif(UMOCI is None, reason="umoci not installed")
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_same_tree_as_umoci(name: str, tmp_path: Path) -> None:
    blobs = [_tar(members) for members in SCENARIOS[name]]
    top = os.fsencode(_umoci_unpack(blobs, tmp_path))
    tree = build(*[_entries(b) for b in blobs])
    seen: list[bytes] = []
    pairing: dict[int, int] = {}  # umoci's inode -> ours: hardlinks must group the same way
    for dirpath, dirnames, filenames in os.walk(top):
        here = [dirpath] if dirpath == top else []
        for full in here + [os.path.join(dirpath, n) for n in dirnames + filenames]:
            rel = os.path.relpath(full, top)
            rel = b"" if rel == b"." else rel
            seen.append(rel)
            st = os.lstat(full)
            node = at(tree, rel)
            assert (node.st_mode, node.nlink) == (st.st_mode, st.st_nlink), rel
            assert pairing.setdefault(st.st_ino, node.ino) == node.ino, rel
            if os.geteuid() == 0:
                assert (node.uid, node.gid) == (st.st_uid, st.st_gid), rel
            if not (node.type == EntryType.DIR and node.mtime_ns == 0):  # umoci: implicit = "now"
                assert node.mtime_ns == st.st_mtime_ns, rel
            if node.type == EntryType.SYMLINK:
                assert node.target == os.readlink(full), rel
            if node.type == EntryType.FILE:
                loc = node.location
                assert loc is not None
                with open(full, "rb") as f:
                    assert blobs[loc.layer][loc.offset : loc.offset + loc.size] == f.read(), rel
    assert len(set(pairing.values())) == len(pairing)
    assert sorted(seen) == sorted(paths(tree))
