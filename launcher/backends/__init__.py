"""Provisioner backends: how an image becomes a container's root file system directory.

After the Mesos provisioner: each backend turns an image into `<rootfs-dir>/rootfs`, where
<rootfs-dir> is WORK/containers/<id>/backends/<backend>/rootfses/<rootfs-id>/ (made, with its
marker, by launcher/provisioner.py before the backend runs), and undoes that idempotently.

- ``imagefs`` (default): the image's one shared, lazily reading imagefs mount as the lower
  directory of a per-container kernel overlay (upper and work beside it).
- ``overlay``: every layer extracted once into STORE/layers/, a kernel overlay of them.
- ``copy``: the merged image extracted into the rootfs directory (Mesos's default).
- ``bind``: a single-layer image's extracted layer bind-mounted read-only.

This module holds the interface (`Backend`, `Context`) and the mount helpers they share; the
syscalls themselves are in launcher/linux/syscalls.py.

Concurrency: every method is synchronous and blocking (the containerizer calls the provisioner
from worker threads). Backends keep no state in memory: what must be shared between threads and
processes (a shared mount, an extracted layer) is on disk, guarded by flocks.
"""

from __future__ import annotations

import abc
import errno
import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from imagefs.errors import InputError, RuntimeFailure
from imagefs.fuse import daemon
from launcher.linux import syscalls as sc
from stores.pull import SourceOptions
from stores.store import ImageRecord, Store

if TYPE_CHECKING:
    # Only the backends that read the image in-process (overlay, copy, bind) open views: the
    # default one, imagefs, leaves that to its mount server, so `imagefs run` does not import the
    # read path (indexes, zran, union; ~40 ms).
    from imagefs.view import ImageView

NAMES = ("imagefs", "overlay", "copy", "bind")
DEFAULT = "imagefs"

ROOTFS = "rootfs"  # inside a rootfs dir: the container's root file system
UPPER = "upper"    # overlay-based backends: the container's writes
WORK = "work"      # overlay's work directory (same file system as upper)


@dataclass(frozen=True)
class Context:
    """What every backend may use: the store, the work dir, and how to reach image sources."""

    store: Store
    work_dir: Path                       # resolved: mount points are compared with /proc's paths
    source_flags: tuple[str, ...] = ()   # for mount servers (`imagefs mount` flags)
    source_options: SourceOptions = field(default_factory=SourceOptions)  # for reads in-process
    mount_standby: daemon.Standby | None = None   # a mount server started ahead (Provisioner)

    def open_view(self, record: ImageRecord) -> ImageView:
        """The image's tree and layer readers (close it after use)."""
        from imagefs.view import ImageView

        return ImageView.open(self.store, record, lambda: self.source_options.open(record.source))


class Backend(abc.ABC):
    """One way to provision a rootfs. Instances are shared by all containers and threads."""

    name: ClassVar[str]

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def check(self, record: ImageRecord) -> None:
        """Refuse (InputError) an image this backend cannot provision, before anything is made."""

    @abc.abstractmethod
    def provision(self, container_id: str, record: ImageRecord, rootfs_dir: Path) -> dict[str, Any]:
        """Make `rootfs_dir/ROOTFS` the image's root file system; return JSON-able state.

        On failure, whatever was done is undone by `destroy` (and `release`), which the
        provisioner calls: record what needs undoing on disk before doing it."""

    def destroy(self, container_id: str, rootfs_dir: Path, marker: dict[str, Any]) -> None:
        """Undo `provision` for one rootfs dir (idempotent); the provisioner then removes the
        directory. *marker* is what the provisioner recorded (possibly empty after a crash)."""
        unmount(rootfs_dir / ROOTFS)

    def release(self, container_id: str, image_ids: set[str]) -> None:
        """Called once the container's rootfses of this backend are gone (idempotent): drop
        whatever the container held that outlives a rootfs dir."""

    def recover(self, live: set[str]) -> list[str]:
        """After a restart: release what containers not in *live* held; problems as lines."""
        return []


def backend_class(name: str) -> type[Backend]:
    if name not in NAMES:
        raise InputError(f"backend {name!r}", f"unknown provisioner backend (one of {', '.join(NAMES)})")
    cls = importlib.import_module(f"launcher.backends.{name}").Backend
    assert issubclass(cls, Backend) and cls.name == name
    return cls


# ---- mounts ----------------------------------------------------------------------------------

def mounts_below(path: Path) -> list[str]:
    """Mount points at or below *path*, deepest last (the order they were mounted in)."""
    top = str(path)
    with open("/proc/self/mountinfo") as f:
        points = [daemon._unescape(line.split()[4]) for line in f]  # undoes mountinfo's escapes
    return [p for p in points if p == top or p.startswith(top.rstrip("/") + "/")]


def unmount(path: Path) -> None:
    """Unmount everything mounted at *path* (mounts may be stacked there); a busy mount is
    detached (MNT_DETACH: gone from the tree now, freed once its last user goes)."""
    target = str(path)
    for _ in range(16):
        if daemon.mount_type(target) is None:
            return
        try:
            sc.umount2(target, sc.UMOUNT_NOFOLLOW)
        except OSError as e:
            if e.errno == errno.EINVAL:  # not a mount point (any more)
                return
            if e.errno != errno.EBUSY:
                raise RuntimeFailure(target, f"unmount failed: {e.strerror}") from None
            try:
                sc.umount2(target, sc.MNT_DETACH | sc.UMOUNT_NOFOLLOW)
            except OSError as e2:
                raise RuntimeFailure(target, f"unmount failed: {e2.strerror}") from None
    raise RuntimeFailure(target, "still mounted after 16 unmounts")


def _escape(path: Path) -> str:
    # overlayfs splits its options at "," and lowerdir at ":"; a backslash escapes either.
    return str(path).replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def overlay_options(lowers: Sequence[Path], upper: Path, work: Path) -> str:
    """The overlay mount data; *lowers* topmost first, as overlayfs wants them."""
    return f"lowerdir={':'.join(_escape(p) for p in lowers)},upperdir={_escape(upper)},workdir={_escape(work)}"


def mount_overlay(lowers: Sequence[Path], upper: Path, work: Path, target: Path, *, what: str) -> None:
    """Mount a kernel overlay at *target*. The kernel copies at most one page of mount data and
    drops the rest, so longer options (~30 layers with long store paths) are refused here."""
    data = overlay_options(lowers, upper, work)
    limit = os.sysconf("SC_PAGE_SIZE") - 1
    if len(data.encode()) > limit:
        raise RuntimeFailure(what, f"{len(lowers)} layers make overlay mount options of {len(data.encode())} bytes, "
                                   f"over the kernel's {limit}: use the imagefs or copy backend")
    try:
        sc.mount("overlay", str(target), "overlay", 0, data)
    except OSError as e:
        why = "the kernel has no overlay file system" if e.errno == errno.ENODEV else e.strerror
        raise RuntimeFailure(str(target), f"overlay mount failed: {why}") from None


def bind_readonly(source: Path, target: Path) -> None:
    try:
        sc.mount(str(source), str(target), None, sc.MS_BIND)
    except OSError as e:
        raise RuntimeFailure(str(target), f"bind mount failed: {e.strerror}") from None
    try:  # a bind mount takes MS_RDONLY only on a remount
        sc.mount(None, str(target), None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY)
    except OSError as e:
        unmount(target)
        raise RuntimeFailure(str(target), f"read-only remount failed: {e.strerror}") from None


def copy_root_attributes(source: Path, upper: Path) -> None:
    """overlayfs shows the root directory with the upper directory's owner and mode: give it
    the image's."""
    st = os.stat(source)
    os.chown(upper, st.st_uid, st.st_gid)
    os.chmod(upper, st.st_mode & 0o7777)
