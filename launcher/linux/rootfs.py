"""Build a container's root file system view: resolve paths inside it, mount into it, pivot to it.

Two parts:

- Path resolution, pure and testable without root: `resolve_in_root` follows symlinks as if the
  rootfs were "/", so an image (or a volume) holding `evil -> /../../..` or `abs -> /etc` can never
  make a mount land outside the rootfs. `ensure_mount_target` creates missing mount points through it.
- Mount steps for the in-container init (launcher/init.py), called in a private mount namespace in
  this order: `bind_self`, `mount_proc`, `mount_dev`, `mount_sys`, `mount_at` (sandbox, volumes),
  then `pivot`. Every target inside the rootfs is resolved with `resolve_in_root` and then pinned:
  opened O_PATH and checked to be inside the rootfs, and the mount is made on /proc/self/fd/N, so
  nothing swapped in between resolving and mounting can redirect it.

Concurrency: blocking and single-threaded; only the init process (before the task exists) calls the
mount steps, so nothing inside the container can race them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator

from launcher.linux import syscalls as sc

MAX_SYMLINKS = 40   # the kernel's MAXSYMLINKS: a longer chain is ELOOP

# Host device nodes bind-mounted into the container's /dev. Binding the host's nodes (instead of
# mknod) works the same everywhere and needs no device-cgroup or mknod policy exceptions.
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_SYMLINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
                "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx"}
# Parts of /proc that change the host kernel: read-only in the container, as runc does.
PROC_READONLY = ("sys", "sysrq-trigger", "irq", "bus")


# ---- path resolution (pure) -------------------------------------------------------------------

def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def resolve_in_root(root: str, path: str, *, follow_final: bool = True) -> str:
    """The host path of container path *path* in the rootfs *root*, symlinks resolved as if *root*
    were "/": absolute targets restart at root and ".." stops at root. Components that do not exist
    are kept as written (so the result can be created); the result is always inside root.

    Raises OSError(ELOOP) after MAX_SYMLINKS links, like the kernel."""
    root = os.path.realpath(root)
    pending = [p for p in reversed(path.split("/"))]   # a stack: the next component is last
    resolved: list[str] = []
    links = 0
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, name)
        try:
            st = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            resolved.append(name)   # missing: later components cannot exist either
            continue
        if stat.S_ISLNK(st.st_mode) and (pending or follow_final):
            links += 1
            if links > MAX_SYMLINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), os.path.join("/", path))
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            pending.extend(reversed(target.split("/")))
            continue
        resolved.append(name)
    result = os.path.join(root, *resolved)
    if not _inside(root, result):   # cannot happen by construction; a cheap guard all the same
        raise OSError(errno.EXDEV, "path resolved outside the rootfs", result)
    return result


def ensure_mount_target(root: str, container_path: str, is_dir: bool) -> str:
    """Resolve *container_path* inside *root* and create what is missing: directories, and for a
    file bind an empty regular file. Returns the host path. Creation never follows a symlink
    (mkdir and O_EXCL|O_NOFOLLOW fail on one), and the path is resolved again afterwards to prove
    it did not move."""
    root = os.path.realpath(root)
    target = resolve_in_root(root, container_path)
    rel = os.path.relpath(target, root)
    parts = [] if rel == "." else rel.split("/")
    current = root
    for i, name in enumerate(parts):
        current = os.path.join(current, name)
        last = i == len(parts) - 1
        if os.path.lexists(current):
            continue
        if last and not is_dir:
            os.close(os.open(current, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))
        else:
            os.mkdir(current, 0o755)
    if resolve_in_root(root, container_path) != target:
        raise OSError(errno.EXDEV, "mount target changed while it was created", container_path)
    st = os.lstat(target)
    if is_dir and not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, "mount target is not a directory", container_path)
    if not is_dir and stat.S_ISDIR(st.st_mode):
        raise OSError(errno.EISDIR, "mount target is a directory, the source a file", container_path)
    return target


@contextlib.contextmanager
def pinned(root: str, host_path: str) -> Iterator[str]:
    """Yield a /proc/self/fd path for *host_path*, opened without following a final symlink and
    checked to be inside *root* and not a symlink: a mount made on it lands on exactly the checked
    inode, whatever happens to the path meanwhile."""
    fd = os.open(host_path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            raise OSError(errno.ELOOP, "mount target is a symlink", host_path)
        actual = os.readlink(f"/proc/self/fd/{fd}")
        if not _inside(os.path.realpath(root), actual):
            raise OSError(errno.EXDEV, "mount target is outside the rootfs", actual)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


# ---- mount steps (in the container's private mount namespace) ----------------------------------

def make_private() -> None:
    """Stop mount events from propagating to the host (systemd makes / shared)."""
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)


def make_readonly(path: str) -> None:
    """Read-only for the mount at *path* and every mount below it."""
    try:
        sc.mount_setattr(path, sc.MOUNT_ATTR_RDONLY, recursive=True)
    except OSError as e:
        if e.errno != errno.ENOSYS:
            raise
        # Before Linux 5.12: only the top mount can be made read-only this way.
        sc.mount(None, path, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY)


def bind_self(root: str) -> None:
    """pivot_root needs the new root to be a mount point: bind the rootfs onto itself."""
    root = os.path.realpath(root)
    sc.mount(root, root, None, sc.MS_BIND | sc.MS_REC)


def mount_at(root: str, container_path: str, source: str, *, fstype: str = "bind", flags: int = 0,
             data: str | None = None, read_only: bool = False, is_dir: bool | None = None) -> None:
    """Mount *source* (a host path for a bind, else a file system source) at *container_path*."""
    if fstype == "bind":
        if is_dir is None:
            is_dir = os.path.isdir(source)
        target = ensure_mount_target(root, container_path, is_dir)
        with pinned(root, target) as fd_path:
            sc.mount(source, fd_path, None, sc.MS_BIND | sc.MS_REC | flags)
        if read_only:
            with pinned(root, target) as fd_path:   # the fd path now names the mounted tree
                make_readonly(fd_path)
        return
    target = ensure_mount_target(root, container_path, True)
    with pinned(root, target) as fd_path:
        sc.mount(source, fd_path, fstype, flags | (sc.MS_RDONLY if read_only else 0), data)


def mount_proc(root: str) -> None:
    """A fresh proc: in a new pid namespace it shows only the container's processes."""
    target = ensure_mount_target(root, "/proc", True)
    with pinned(root, target) as fd_path:
        sc.mount("proc", fd_path, "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    for name in PROC_READONLY:
        path = os.path.join(target, name)
        if os.path.exists(path):
            sc.mount(path, path, None, sc.MS_BIND | sc.MS_REC)
            make_readonly(path)


def mount_dev(root: str) -> None:
    """A minimal /dev on a tmpfs: host nodes bound in, a private devpts, /dev/shm, the symlinks."""
    target = ensure_mount_target(root, "/dev", True)
    with pinned(root, target) as fd_path:
        sc.mount("tmpfs", fd_path, "tmpfs", sc.MS_NOSUID | sc.MS_STRICTATIME, "mode=755,size=65536k")
    # From here on paths under target are on our own fresh tmpfs: nothing in the image can be there.
    for name in DEV_NODES:
        host = f"/dev/{name}"
        if not os.path.exists(host):
            continue
        node = os.path.join(target, name)
        os.close(os.open(node, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        sc.mount(host, node, None, sc.MS_BIND)
    pts = os.path.join(target, "pts")
    os.mkdir(pts, 0o755)
    # newinstance: the container's ptys are its own, not the host's.
    sc.mount("devpts", pts, "devpts", sc.MS_NOSUID | sc.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
    shm = os.path.join(target, "shm")
    os.mkdir(shm, 0o1777)
    sc.mount("shm", shm, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, "mode=1777,size=65536k")
    for name, link in DEV_SYMLINKS.items():
        os.symlink(link, os.path.join(target, name))


def mount_sys(root: str) -> None:
    """/sys read-only. A fresh sysfs is preferred over a bind of the host's: sysfs shows the network
    devices of the namespace it was mounted in, so a bind would show the host's interfaces inside a
    network-isolated container. Where mounting sysfs is refused (EPERM in a user namespace that does
    not own the network namespace), bind the host's recursively and make it all read-only."""
    target = ensure_mount_target(root, "/sys", True)
    with pinned(root, target) as fd_path:
        try:
            sc.mount("sysfs", fd_path, "sysfs", sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
            return
        except OSError as e:
            if e.errno != errno.EPERM:
                raise
        sc.mount("/sys", fd_path, None, sc.MS_BIND | sc.MS_REC)
    with pinned(root, target) as fd_path:
        make_readonly(fd_path)


def pivot(root: str) -> None:
    """Make *root* the root of this mount namespace and drop the old root entirely (no chroot: a
    chroot can be left with a second chroot; a detached old root cannot be reached at all).

    pivot_root(".", ".") stacks the old root on top of the new one, so no directory has to be
    created in the rootfs (which may be read-only); unmounting "." afterwards removes the old root."""
    old = os.open("/", os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    new = os.open(os.path.realpath(root), os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fchdir(new)
        sc.pivot_root(".", ".")
        # The kernel leaves the cwd unspecified after pivot_root: go to the old root explicitly.
        os.fchdir(old)
        # Slave, so the unmount below cannot propagate anywhere even if make_private was skipped.
        sc.mount(None, ".", None, sc.MS_SLAVE | sc.MS_REC)
        sc.umount2(".", sc.MNT_DETACH)
    finally:
        os.close(old)
        os.close(new)
    os.chdir("/")
