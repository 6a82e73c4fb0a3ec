"""Write an image into plain directories, without FUSE: the merged tree, or one layer for overlayfs.

Both products come from the model (imagefs/union.py) and the layer readers, never from a mount:

- `extract_tree(tree, read, dest)`: the merged image as `umoci unpack` lays it out (the copy
  backend's rootfs). `extract_view(view, dest)` does the same for an `ImageView`.
- `extract_layer(index, read, dest, lower=...)`: ONE layer as an overlayfs lower directory (the
  overlay and bind backends' layer cache). The layer's entries apply in tar order (the same path
  twice: the last wins; whiteouts first, as the union does). OCI whiteouts become overlayfs ones:
  ``D/.wh.NAME`` is a character device 0/0 named ``D/NAME`` (or, when the layer itself makes a
  directory NAME, that directory made opaque), ``D/.wh..wh..opq`` is the xattr
  ``trusted.overlay.opaque=y`` on D. Image xattrs named
  ``trusted.overlay.*`` are dropped with a warning: overlayfs would obey them.

A layer is usually a function of its own entries; two things make it depend on the layers below
(`needs_lower` says which layers):

- a hardlink to a file the layer does not contain. One inode cannot span two layer directories, so
  the lower file is copied into this layer, under *every* name the union gives that inode (so the
  names still share one inode, with the union's link count); the caller passes the lower layers'
  entries and a way to read their bytes (`Lower`).
- a directory the layer needs (a parent of one of its paths, or the directory of a whiteout) but
  does not describe. overlayfs shows a directory with the metadata of its topmost copy, so the copy
  made here must carry the metadata the union has for it (the lower one's), not a default.
A cache of extracted layers must therefore key such a layer by its lower layers too.
One difference from the merged tree remains under overlayfs: when a later layer replaces or whites
out one name of a lower hardlinked file, the other names keep the lower inode's link count (the
union counts only the names left); names, contents and all other metadata agree.

Safety: every name written is one path component (checked, whatever the tree says), every
directory is entered by a file descriptor opened O_NOFOLLOW and every file created O_EXCL|O_NOFOLLOW
relative to it, so nothing in an image (symlinks included) can make a write land outside *dest*.

Atomicity: the result is built in ``<dest>.tmp-XXXXXXXX`` (mode 0700 while it is built) and renamed
onto *dest* (absent, or an empty directory) at the end; a failure removes it. A half-written tree
is never at *dest*. With ``sync=True`` the file system is synced before the rename, for caches that
must survive a power cut.

Metadata is applied in the order the kernel requires: data, lchown (which clears set-id bits and
security.capability), chmod, xattrs, then mtimes (os.utime in nanoseconds, never following
symlinks); a directory's metadata is applied after its children are written. Xattrs the file
system refuses are skipped with one warning per xattr name; so are device nodes when mknod is
not permitted (an unprivileged caller). Other failures raise RuntimeFailure naming the path.

Concurrency: synchronous, blocking I/O on the calling thread (callers run it in a worker thread).
Two calls must not extract to the same *dest* at once (the caller holds a lock); *read* is called
from the calling thread only.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

from imagefs.entry import Entry, EntryType
from imagefs.errors import InputError, RuntimeFailure
from imagefs.index import LayerIndex
from imagefs.union import OPAQUE_WHITEOUT, ROOT_INODE, WHITEOUT_PREFIX, Inode, Node, Tree
from stores.fsutil import fsync_dir

if TYPE_CHECKING:
    from imagefs.view import ImageView

__all__ = ["Lower", "extract_layer", "extract_tree", "extract_view", "needs_lower"]

log = logging.getLogger(__name__)

FileRead = Callable[[int, int], bytes]              # (offset in the file, length) -> bytes
TreeRead = Callable[[Inode, int, int], bytes]       # ImageView.read: (inode, offset, length)
LayerRead = Callable[[int, int], bytes]             # LayerReader.read: (uncompressed offset, length)
LowerRead = Callable[[int, int, int], bytes]        # (layer position, uncompressed offset, length)

OVERLAY_OPAQUE = (b"trusted.overlay.opaque", b"y")
_OVERLAY_XATTRS = b"trusted.overlay."
_AUFS_META = b".wh..wh."
_CHUNK = 1 << 20
# What a file system says when it will not store an xattr: not supported, not allowed (user.* on a
# symlink), unknown namespace, too big, out of xattr space.
_XATTR_REFUSED = frozenset({errno.EOPNOTSUPP, errno.EPERM, errno.EACCES, errno.EINVAL, errno.E2BIG,
                            errno.ERANGE, errno.ENOSPC})
_FORMAT = {EntryType.CHAR: stat.S_IFCHR, EntryType.BLOCK: stat.S_IFBLK, EntryType.FIFO: stat.S_IFIFO}
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_WHITEOUT = Node(EntryType.CHAR, 0)  # overlayfs whiteout: char 0/0; nlink 0, so never hardlinked


def _show(path: bytes) -> str:
    return "'" + path.decode("utf-8", "backslashreplace") + "'"


# ---- the plan: what to write, as directories of leaves ----------------------------------------

class _Leaf(NamedTuple):
    node: Node
    read: FileRead | None = None  # regular files only


class _DirLike(Protocol):
    node: Node
    opaque: bool

    def items(self) -> Iterable[tuple[bytes, _DirLike | _Leaf]]: ...


class _TreeDir:
    """A directory of a built Tree, read lazily (no copy of the tree is made)."""

    __slots__ = ("tree", "ino", "read", "node")
    opaque = False

    def __init__(self, tree: Tree, ino: Inode, read: TreeRead) -> None:
        self.tree, self.ino, self.read = tree, ino, read
        self.node = tree.node(ino)

    def items(self) -> Iterator[tuple[bytes, _TreeDir | _Leaf]]:
        for name, ino in self.tree.children(self.ino):
            node = self.tree.node(ino)
            if node.type == EntryType.DIR:
                yield name, _TreeDir(self.tree, ino, self.read)
            else:
                yield name, _Leaf(node, functools.partial(self.read, ino) if node.type == EntryType.FILE else None)


class _PlanDir:
    """A directory of a layer's plan, built and then changed (whiteouts, copied lower files)."""

    __slots__ = ("node", "kids", "opaque")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.kids: dict[bytes, _PlanDir | _Leaf] = {}
        self.opaque = False

    def items(self) -> list[tuple[bytes, _PlanDir | _Leaf]]:
        return sorted(self.kids.items())


# ---- the writer -------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)  # this process's own libc (find_library forks ldconfig)


def _syncfs(fd: int) -> None:
    # Python has no os.syncfs; one syncfs is far cheaper than an fsync per extracted file.
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class _Writer:
    """Writes a plan below the directory open as *root_fd* (see the module docstring)."""

    def __init__(self, dest: Path, root_fd: int, what: str, *, drop_xattr: bytes | None) -> None:
        self.dest = dest  # for messages: paths are shown where they will end up
        self.root_fd = root_fd
        self.what = what
        self.drop_xattr = drop_xattr
        self.first_name: dict[Node, bytes] = {}  # Node hashes by identity: one entry per inode
        self.skipped: dict[str, tuple[int, bytes]] = {}  # reason -> (count, first path)

    def _skip(self, reason: str, path: bytes) -> None:
        count, first = self.skipped.get(reason, (0, path))
        self.skipped[reason] = (count + 1, first)

    def report(self, warn: Callable[[str], None]) -> None:
        for reason, (count, first) in self.skipped.items():
            warn(f"{self.what}: {reason} on {count} entr{'y' if count == 1 else 'ies'} "
                 f"(first {_show(first)}): skipped")

    def _fail(self, path: bytes, e: OSError) -> RuntimeFailure:
        shown = os.fsdecode(os.path.join(os.fsencode(self.dest), path)) if path else str(self.dest)
        return RuntimeFailure(shown, e.strerror or str(e))

    def write(self, top: _DirLike) -> None:
        # Depth first with an explicit stack (an image may nest deeper than Python's recursion
        # limit); each open directory holds one fd until its metadata is applied.
        stack: list[tuple[int, Iterator[tuple[bytes, _DirLike | _Leaf]], _DirLike, bytes]] = [
            (self.root_fd, iter(top.items()), top, b"")]
        try:
            while stack:
                fd, kids, d, rel = stack[-1]
                for name, child in kids:
                    path = rel + b"/" + name if rel else name
                    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
                        raise InputError(f"{self.what}: {_show(path)}",
                                         "not a single path component: refusing to write outside the destination")
                    try:
                        if isinstance(child, _Leaf):
                            self._leaf(fd, name, path, child)
                            continue
                        os.mkdir(name, 0o700, dir_fd=fd)
                        sub = os.open(name, _OPEN_DIR, dir_fd=fd)
                    except OSError as e:
                        raise self._fail(path, e) from None
                    stack.append((sub, iter(child.items()), child, path))
                    break
                else:
                    stack.pop()
                    try:
                        self._finish_dir(fd, d, rel)
                    except OSError as e:
                        raise self._fail(rel, e) from None
                    finally:
                        if fd != self.root_fd:
                            os.close(fd)
        finally:
            for fd, *_ in stack:
                if fd != self.root_fd:
                    os.close(fd)

    def _finish_dir(self, fd: int, d: _DirLike, rel: bytes) -> None:
        n = d.node
        os.fchown(fd, n.uid, n.gid)
        os.fchmod(fd, n.mode)
        self._xattrs(fd, n, rel)
        if d.opaque:  # not optional: without it the layers below would show through
            os.setxattr(fd, *OVERLAY_OPAQUE)
        os.utime(fd, ns=(n.mtime_ns, n.mtime_ns))

    def _leaf(self, fd: int, name: bytes, path: bytes, leaf: _Leaf) -> None:
        n = leaf.node
        first = self.first_name.get(n) if n.nlink > 1 else None
        if first is not None:  # another name of an inode already written
            os.link(first, name, src_dir_fd=self.root_fd, dst_dir_fd=fd, follow_symlinks=False)
            return
        if n.type == EntryType.FILE:
            self._file(fd, name, path, leaf)
        elif not self._special(fd, name, path, n):
            return
        if n.nlink > 1:
            self.first_name[n] = path

    def _special(self, fd: int, name: bytes, path: bytes, n: Node) -> bool:
        """A symlink, device node or fifo; False if it was skipped."""
        if n.type == EntryType.SYMLINK:
            os.symlink(n.target, name, dir_fd=fd)
        else:
            try:
                os.mknod(name, _FORMAT[n.type] | 0o600, n.rdev, dir_fd=fd)
            except PermissionError:
                if n is _WHITEOUT or n.type == EntryType.FIFO:
                    raise
                self._skip("device nodes not permitted here (mknod: EPERM)", path)
                return False
        os.chown(name, n.uid, n.gid, dir_fd=fd, follow_symlinks=False)
        if n.type != EntryType.SYMLINK:
            # Follows a symlink, but *name* is the node made just above, in a 0700 tree of ours.
            os.chmod(name, n.mode, dir_fd=fd)
        # No fd for symlinks and device nodes (opening a fifo or device has side effects): reach
        # the name through our directory's fd, without following it.
        self._xattrs(b"/proc/self/fd/%d/%s" % (fd, name), n, path)
        os.utime(name, ns=(n.mtime_ns, n.mtime_ns), dir_fd=fd, follow_symlinks=False)
        return True

    def _file(self, dir_fd: int, name: bytes, path: bytes, leaf: _Leaf) -> None:
        n = leaf.node
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)
        read = leaf.read or (lambda offset, length: b"")
        try:
            offset = 0
            while offset < n.size:
                data = read(offset, min(_CHUNK, n.size - offset))
                if not data:
                    raise RuntimeFailure(f"{self.what}: {_show(path)}",
                                         f"short read: {offset} of {n.size} bytes")
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                offset += len(data)
            os.fchown(fd, n.uid, n.gid)
            os.fchmod(fd, n.mode)
            self._xattrs(fd, n, path)
            os.utime(fd, ns=(n.mtime_ns, n.mtime_ns))
        finally:
            os.close(fd)

    def _xattrs(self, target: int | bytes, n: Node, path: bytes) -> None:
        for key, value in n.xattrs.items():
            if self.drop_xattr is not None and key.startswith(self.drop_xattr):
                self._skip(f"xattr {key.decode(errors='replace')} would steer overlayfs", path)
                continue
            try:
                os.setxattr(target, key, value, follow_symlinks=isinstance(target, int))
            except OSError as e:
                if e.errno not in _XATTR_REFUSED:
                    raise
                self._skip(f"xattr {key.decode(errors='replace')} refused by the file system "
                           f"({errno.errorcode.get(e.errno or 0, e.errno)})", path)


def _extract(top: _DirLike, dest: Path, *, what: str, drop_xattr: bytes | None, sync: bool,
             warn: Callable[[str], None]) -> None:
    dest = Path(dest)
    if dest.is_symlink() or dest.exists() and not dest.is_dir():
        raise InputError(str(dest), "extraction destination is not a directory")
    if dest.is_dir():
        with os.scandir(dest) as listing:
            if any(listing):
                raise InputError(str(dest), "extraction destination is not empty")
    if not dest.parent.is_dir():
        raise InputError(str(dest.parent), "extraction destination's parent directory does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f"{dest.name}.tmp-", dir=dest.parent))
    try:
        root_fd = os.open(tmp, _OPEN_DIR)
        try:
            writer = _Writer(dest, root_fd, what, drop_xattr=drop_xattr)
            writer.write(top)
            if sync:
                _syncfs(root_fd)
        finally:
            os.close(root_fd)
        try:
            os.rename(tmp, dest)  # replaces an empty directory, never a full one
        except OSError as e:
            why = "is not empty" if e.errno in (errno.ENOTEMPTY, errno.EEXIST) else e.strerror
            raise RuntimeFailure(str(dest), f"cannot move the extracted tree into place: {why}") from None
        if sync:
            fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    writer.report(warn)


# ---- the merged image -------------------------------------------------------------------------

def extract_tree(tree: Tree, read: TreeRead, dest: str | os.PathLike[str], *, sync: bool = False,
                 warn: Callable[[str], None] = log.warning, what: str = "image") -> None:
    """Write the merged image *tree* into *dest* (absent or empty); *read* is `ImageView.read`."""
    _extract(_TreeDir(tree, ROOT_INODE, read), Path(dest), what=what, drop_xattr=None, sync=sync, warn=warn)


def extract_view(view: ImageView, dest: str | os.PathLike[str], *, sync: bool = False,
                 warn: Callable[[str], None] = log.warning) -> None:
    """`extract_tree` of an opened image."""
    extract_tree(view.tree, view.read, dest, sync=sync, warn=warn, what=f"image {view.record.id[:12]}")


# ---- one layer for overlayfs ------------------------------------------------------------------

@dataclass(frozen=True)
class Lower:
    """The layers beneath the one being extracted: their entries (bottom first, as in their
    indexes) and a way to read their files' bytes (`LowerRead`: position in *entries*,
    offset in that layer's uncompressed tar, length)."""

    entries: Sequence[Sequence[Entry]]
    read: LowerRead


class _Scan(NamedTuple):
    """What a layer's entries say before anything is merged."""

    entries: list[Entry]                     # visible entries, whiteouts excluded
    cross_links: list[Entry]                 # hardlinks to files the layer does not contain
                                             # (those no later entry undoes)
    whiteouts: list[tuple[bytes, bytes | None]]  # (directory, name) or (directory, None): opaque
    explicit_dirs: set[bytes]
    implicit_dirs: bool                      # a needed directory the layer does not describe


def _scan(entries: Sequence[Entry]) -> _Scan:
    visible: list[Entry] = []
    cross: list[Entry] = []
    whiteouts: list[tuple[bytes, bytes | None]] = []
    seen: set[bytes] = set()
    explicit = {b""} | {e.path for e in entries if e.type == EntryType.DIR}
    needed: set[bytes] = set()
    for e in entries:
        head, _, name = e.path.rpartition(b"/")
        if head.startswith(WHITEOUT_PREFIX) or b"/.wh." in head:
            continue  # beneath aufs metadata or a whiteout: never visible (as in the union)
        needed.add(head)
        if name.startswith(WHITEOUT_PREFIX):
            if name == OPAQUE_WHITEOUT:
                whiteouts.append((head, None))
            elif name != WHITEOUT_PREFIX and not name.startswith(_AUFS_META):
                whiteouts.append((head, name[len(WHITEOUT_PREFIX):]))
            continue
        if e.type == EntryType.HARDLINK and e.linkname not in seen:
            cross.append(e)  # resolved against the layers below, not in this layer's own tree
            continue
        visible.append(e)
        seen.add(e.path)
    implicit = False
    cross = _surviving(entries, cross)
    for d in needed:
        while d and not implicit:
            if d not in explicit:
                implicit = True
            d = d.rpartition(b"/")[0]
    return _Scan(visible, cross, whiteouts, explicit, implicit)


def _ancestors(path: bytes) -> Iterator[bytes]:
    while path:
        path = path.rpartition(b"/")[0]
        yield path


def _surviving(entries: Sequence[Entry], links: list[Entry]) -> list[Entry]:
    """The *links* no later entry of the layer undoes: the same path again, a path below it
    (which makes it a directory) or a non-directory over one of its parents."""
    if not links:
        return links
    wanted = {id(e) for e in links}
    later: set[bytes] = set()  # paths of later entries, and their parents
    later_files: set[bytes] = set()  # paths of later non-directories
    kept: list[Entry] = []
    for e in reversed(entries):
        if e.path.rpartition(b"/")[2].startswith(WHITEOUT_PREFIX):
            continue  # whiteouts apply before every entry of their layer
        if id(e) in wanted and e.path not in later and later_files.isdisjoint(_ancestors(e.path)):
            kept.append(e)
        if e.path not in later:
            later.add(e.path)
            later.update(_ancestors(e.path))
        if e.type != EntryType.DIR:
            later_files.add(e.path)
    return kept[::-1]


def needs_lower(entries: Sequence[Entry]) -> bool:
    """Whether extracting a layer with these entries depends on the layers below it (hardlinks
    to files it lacks, or directories it needs but does not describe): see the module docstring."""
    scan = _scan(entries)
    return bool(scan.cross_links) or scan.implicit_dirs


def _plan_of(tree: Tree, read: LayerRead) -> _PlanDir:
    """A mutable copy of a one-layer tree; files read from that layer at their offsets."""
    top = _PlanDir(tree.node(ROOT_INODE))
    todo = [(top, ROOT_INODE)]
    while todo:
        d, ino = todo.pop()
        for name, kid in tree.children(ino):
            node = tree.node(kid)
            if node.type == EntryType.DIR:
                sub = _PlanDir(node)
                d.kids[name] = sub
                todo.append((sub, kid))
            else:
                d.kids[name] = _Leaf(node, _reader(read, node) if node.type == EntryType.FILE else None)
    return top


def _reader(read: LayerRead, node: Node) -> FileRead:
    return lambda offset, length: read(node.offset + offset, length)


def _lower_reader(read: LowerRead, node: Node) -> FileRead:
    return lambda offset, length: read(node.layer, node.offset + offset, length)


class _LayerPlanner:
    """Turns one layer (and, when it needs them, the layers below) into a plan to write."""

    def __init__(self, index: LayerIndex, read: LayerRead, lower: Lower | None, *, whiteouts: bool,
                 warn: Callable[[str], None]) -> None:
        self.what = f"layer {index.digest}"
        self.warn = warn
        self.lower = lower
        self.scan = _scan(index.entries)
        # The layer's own entries merged alone. Its warnings were given when the image was
        # indexed and merged; here they would only repeat (or be wrong: cross links are not lost).
        own = Tree.build([self.scan.entries], warn=lambda msg: log.debug("%s: %s", self.what, msg))
        self.top = _plan_of(own, read)
        self.union: Tree | None = None
        if lower is not None and (self.scan.cross_links or self.scan.implicit_dirs):
            # The union of the layers below and this one: what every name is at this level.
            self.union = Tree.build([*lower.entries, index.entries],
                                    warn=lambda msg: log.debug("%s: %s", self.what, msg))
        self.want_whiteouts = whiteouts

    def plan(self) -> _PlanDir:
        if self.union is not None and self.scan.implicit_dirs:
            self._lower_dir_metadata(self.top, b"")
        self._copy_cross_links()
        if self.want_whiteouts:
            self._whiteouts()
        return self.top

    def _lower_dir_metadata(self, d: _PlanDir, rel: bytes) -> None:
        """Directories this layer needs but does not describe take the union's metadata."""
        assert self.union is not None
        todo = [(d, rel)]
        while todo:
            d, rel = todo.pop()
            if rel not in self.scan.explicit_dirs:
                ino = self.union.resolve(rel)
                if ino is not None and self.union.node(ino).type == EntryType.DIR:
                    d.node = self.union.node(ino)
            for name, kid in d.kids.items():
                if isinstance(kid, _PlanDir):
                    todo.append((kid, rel + b"/" + name if rel else name))

    def _dir(self, path: bytes) -> _PlanDir | None:
        """The plan's directory at *path*, made (with the union's metadata) if the union has a
        directory there; None if it has not, or something else is in the way."""
        d = self.top
        rel = b""
        for name in path.split(b"/") if path else ():
            rel = rel + b"/" + name if rel else name
            kid = d.kids.get(name)
            if kid is None:
                ino = self.union.resolve(rel) if self.union is not None else None
                if ino is None or self.union.node(ino).type != EntryType.DIR:  # type: ignore[union-attr]
                    return None
                kid = d.kids[name] = _PlanDir(self.union.node(ino))  # type: ignore[union-attr]
            if not isinstance(kid, _PlanDir):
                return None
            d = kid
        return d

    def _copy_cross_links(self) -> None:
        """A hardlink to a lower file: copy that file into this layer under all its names."""
        copied: set[Node] = set()
        for e in self.scan.cross_links:
            ino = self.union.resolve(e.path) if self.union is not None else None
            if ino is None:
                self.warn(f"{self.what}: {_show(e.path)}: hardlink target {_show(e.linkname)} is no file of this "
                          f"layer{' or those below' if self.lower is not None else ''}, link dropped")
                continue
            assert self.union is not None
            copied.add(self.union.node(ino))  # a lower inode: no later entry of ours undid the link
        if not copied:
            return
        assert self.union is not None and self.lower is not None
        for path, ino in self.union.walk():
            node = self.union.node(ino)
            if node in copied:
                head, _, name = path.rpartition(b"/")
                d = self._dir(head)  # the union has this path, so it has its parents
                if d is not None:
                    read = _lower_reader(self.lower.read, node) if node.type == EntryType.FILE else None
                    d.kids[name] = _Leaf(node, read)

    def _whiteouts(self) -> None:
        for head, name in self.scan.whiteouts:
            d = self._dir(head)
            if d is None:
                continue  # nothing there to hide (or the layer put a non-directory there)
            kid = d.kids.get(name) if name is not None else d
            if kid is None:
                d.kids[name] = _Leaf(_WHITEOUT)  # type: ignore[index]
            elif isinstance(kid, _PlanDir):
                # Opaque, or whited out and made again by this layer: a directory here would
                # merge with the lower one, whose contents the union dropped.
                kid.opaque = True
            # else: the layer's own non-directory at NAME hides the lower one already


def extract_layer(index: LayerIndex, read: LayerRead, dest: str | os.PathLike[str], *,
                  lower: Lower | None = None, whiteouts: bool = True, sync: bool = False,
                  warn: Callable[[str], None] = log.warning) -> None:
    """Write one layer into *dest* (absent or empty) as an overlayfs lower directory.

    *read* reads this layer's uncompressed tar (`LayerReader.read`). *lower* is the layers beneath
    (None: there are none); it is consulted only when `needs_lower(index.entries)`. With
    ``whiteouts=False`` whiteouts and opaque markers are left out: for a layer used alone (the bind
    backend), where there is nothing below to hide and a 0/0 device would be visible.
    """
    top = _LayerPlanner(index, read, lower, whiteouts=whiteouts, warn=warn).plan()
    _extract(top, Path(dest), what=f"layer {index.digest}", drop_xattr=_OVERLAY_XATTRS, sync=sync, warn=warn)
