"""pyfuse3 operations over an ImageView: translation only (STYLE rule 1).

Inodes and bytes in, EntryAttributes or FUSEError out. The image never changes, so every reply
tells the kernel to cache it for a long time (entries, attributes, negative lookups, file pages
with keep_cache). Every write operation answers EROFS.

Concurrency: handlers run as trio tasks on one event loop. Tree lookups are in-memory and run
inline; `read` goes to a worker thread because it may decompress, hash or wait on the network.
Errors are mapped in one place (`_errors`): only FUSEError leaves a handler.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from imagefs.errors import ImagefsError
from imagefs.union import Inode, Node
from imagefs.view import ImageView

log = logging.getLogger(__name__)

CACHE_SECONDS = 24 * 3600.0  # images are immutable: the kernel may keep what we told it
BLOCK = 4096

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _errors(fn: F) -> F:
    @functools.wraps(fn)
    async def wrapper(*args: Any) -> Any:
        try:
            return await fn(*args)
        except pyfuse3.FUSEError:
            raise
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except NotADirectoryError:
            raise pyfuse3.FUSEError(errno.ENOTDIR) from None
        except ImagefsError as e:
            log.error("%s: %s", fn.__name__, e)  # "what: why"; the log format adds "imagefs: "
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper  # type: ignore[return-value]


async def _erofs(*_: Any) -> None:
    raise pyfuse3.FUSEError(errno.EROFS)


class ImageOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, view: ImageView) -> None:
        super().__init__()
        self.view = view
        self.tree = view.tree

    def _attrs(self, ino: Inode, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = CACHE_SECONDS
        a.attr_timeout = CACHE_SECONDS
        a.st_mode = node.st_mode
        a.st_nlink = node.nlink
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_rdev = node.rdev
        a.st_size = len(node.target) if stat.S_ISLNK(node.st_mode) else node.size
        a.st_blksize = BLOCK
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.mtime_ns
        return a

    @_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        ino = self.tree.lookup(Inode(parent_inode), bytes(name))
        if ino is None:
            # A negative entry the kernel may cache: nothing will ever appear here.
            a = pyfuse3.EntryAttributes()
            a.st_ino = 0
            a.entry_timeout = CACHE_SECONDS
            return a
        return self._attrs(ino, self.tree.node(ino))

    @_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attrs(Inode(inode), self.tree.node(Inode(inode)))

    @_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        node = self.tree.node(Inode(inode))
        if not stat.S_ISLNK(node.st_mode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target

    @_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        if not stat.S_ISDIR(self.tree.node(Inode(inode)).st_mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        children = self.tree.children(Inode(fh))
        for i in range(start_id, len(children)):
            name, ino = children[i]
            if not pyfuse3.readdir_reply(token, name, self._attrs(ino, self.tree.node(ino)), i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    @_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        node = self.tree.node(Inode(inode))
        if stat.S_ISDIR(node.st_mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        self.view.opened(Inode(inode))
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await trio.to_thread.run_sync(self.view.read, Inode(fh), off, size)

    async def release(self, fh: int) -> None:
        return None

    @_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        value = self.tree.node(Inode(inode)).xattrs.get(bytes(name))
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return list(self.tree.node(Inode(inode)).xattrs)

    @_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = BLOCK
        s.f_blocks = (self.tree.total_size + BLOCK - 1) // BLOCK
        s.f_bfree = s.f_bavail = 0
        s.f_files = self.tree.total_files
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    @_errors
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True

    async def forget(self, inode_list: Any) -> None:
        return None  # inodes are fixed for the life of the mount: nothing to release

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _erofs  # type: ignore[assignment]
    create = write = setxattr = removexattr = _erofs  # type: ignore[assignment]

    async def flush(self, fh: int) -> None:
        return None

    async def fsync(self, fh: int, datasync: bool) -> None:
        return None
