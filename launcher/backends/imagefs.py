"""The imagefs backend: one shared lazy mount per image, a kernel overlay per container.

    WORK/mounts/<image-id>/lock              flock: serialises everything below, across processes
    WORK/mounts/<image-id>/refs/<container>  one per container using the mount (its reference)
    WORK/mounts/<image-id>/rootfs            the image's read-only imagefs mount
    WORK/containers/<id>/backends/imagefs/rootfses/<rootfs-id>/{upper,work,rootfs}
                                             the container's overlay: the mount as lowerdir

The mount server is the one `imagefs mount` runs (imagefs.fuse.daemon.start: a background process
in its own session, recorded with its pid and start time under WORK/run/mounts/). A container's
reference file is written under the lock *before* the server is started, so two provisions of one
image start one server, and a crash at any point leaves a record that `recover` can act on. The
last reference going (under the lock) unmounts the image and ends its server; 100 containers on
one image share one mount and one server.

Where the provisioner was handed a standby server (imagefs/fuse/daemon.py: started by `imagefs run`
before its own imports), `_serve` gives the job to it instead of starting a process: the same
server, its start-up already done. The lock and reference protocol is unchanged.

A server that died leaves its mount dead (ENOTCONN). `acquire` and `recover` serve such a mount
again at the same path (the new server replaces the dead mount), so new containers work. Overlays
made on the dead mount keep it as their lower and stay broken: keeping running containers alive
across a server crash needs the FUSE connection handed to the new server (not done yet).

Concurrency: any thread or process may call anything; the per-image flock orders them. The lock
file is removed with the image's directory when the last reference goes, so a locker checks,
once it holds the lock, that the file it locked is still the one at the path (else it retries).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imagefs.errors import ImagefsError, RuntimeFailure
from imagefs.fuse import daemon
from launcher import backends
from launcher.backends import ROOTFS, UPPER, WORK
from stores.fsutil import atomic_write, fsync_dir
from stores.store import ImageRecord

log = logging.getLogger(__name__)


def mountpoint(work_dir: str | os.PathLike[str], image_id: str) -> Path:
    """Where the image's shared mount is (see the module docstring)."""
    return Path(work_dir) / "mounts" / image_id / "rootfs"


def is_served(work_dir: str | os.PathLike[str], image_id: str) -> bool:
    """Whether the image's shared mount is up and answering (a hint: no lock is taken)."""
    mp = str(mountpoint(work_dir, image_id))
    kind = daemon.mount_type(mp)
    return kind is not None and kind.startswith("fuse") and not daemon.is_stale(mp)


@contextlib.contextmanager
def _locked(image_dir: Path) -> Iterator[None]:
    """Hold WORK/mounts/<image-id>/lock, made if missing (see the module docstring)."""
    lock = image_dir / "lock"
    while True:
        image_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            continue  # the directory was removed between mkdir and open
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                now = os.stat(lock)
            except FileNotFoundError:
                continue
            if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
                continue  # removed (and maybe made again) while we waited: lock the current one
            yield
            return
        finally:
            os.close(fd)


class SharedMounts:
    """The per-image shared imagefs mounts and their references (see the module docstring)."""

    def __init__(self, ctx: backends.Context) -> None:
        self.ctx = ctx
        self.root = ctx.work_dir / "mounts"

    def mountpoint(self, image_id: str) -> Path:
        return mountpoint(self.ctx.work_dir, image_id)

    def acquire(self, image_id: str, container_id: str) -> Path:
        """Reference the image's mount for *container_id*, serving it if it is not; its path."""
        d = self.root / image_id
        with _locked(d):
            ref = d / "refs" / container_id
            atomic_write(ref, b"")  # first: a crash from here on leaves a reference to find
            try:
                self._serve(image_id)
            except BaseException:
                ref.unlink(missing_ok=True)
                self._shutdown_if_unused(d)
                raise
        return self.mountpoint(image_id)

    def release(self, image_id: str, container_id: str) -> None:
        """Drop *container_id*'s reference (idempotent); the last one unmounts the image."""
        d = self.root / image_id
        if not d.is_dir():
            return
        with _locked(d):
            (d / "refs" / container_id).unlink(missing_ok=True)
            self._shutdown_if_unused(d)

    def recover(self, live: set[str]) -> list[str]:
        """Drop references of containers not in *live*; unmount images nobody uses; serve again
        the mounts of used images whose server died. Returns the problems met, one line each."""
        problems = []
        for d in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            try:
                with _locked(d):
                    refs = d / "refs"
                    for ref in sorted(refs.iterdir()) if refs.is_dir() else []:
                        if ref.name not in live:
                            ref.unlink()
                    if not self._shutdown_if_unused(d):
                        self._serve(d.name)
            except ImagefsError as e:
                problems.append(str(e))
            except OSError as e:
                problems.append(f"{e.filename or d}: {e.strerror}")
        return problems

    # -- under the image's lock ------------------------------------------------------------
    def _serve(self, image_id: str) -> None:
        mp = self.mountpoint(image_id)
        mp.mkdir(exist_ok=True)
        kind = daemon.mount_type(str(mp))
        if kind is not None and not kind.startswith("fuse"):
            raise RuntimeFailure(str(mp), f"something else is mounted here ({kind})")
        if kind is not None and not daemon.is_stale(str(mp)):
            return  # served
        # Not mounted, or dead: `imagefs mount` replaces a dead mount (daemon.prepare_mountpoint).
        # The server is given the image id; one the store lacks it would take for a Docker Hub
        # name and try to pull it: refuse here, in one line, without going near a network.
        self.ctx.store.load(image_id)
        store, work = str(self.ctx.store.root), str(self.ctx.work_dir)
        daemon.start(daemon.cli_prefix(store, work, list(self.ctx.source_flags)), image_id, str(mp), work, image_id,
                     standby=self.ctx.mount_standby)

    def _shutdown_if_unused(self, d: Path) -> bool:
        """If no reference is left: unmount, end the server, remove the directory. Whether it did."""
        refs = d / "refs"
        if refs.is_dir() and any(refs.iterdir()):
            return False
        mp = str(d / "rootfs")
        if daemon.mount_type(mp) is not None or daemon.load_record(str(self.ctx.work_dir), mp) is not None:
            daemon.stop(str(self.ctx.work_dir), mp)
        for p in (refs, d / "rootfs"):
            with contextlib.suppress(FileNotFoundError):
                p.rmdir()
        (d / "lock").unlink(missing_ok=True)  # we hold it: later lockers notice and retry
        with contextlib.suppress(FileNotFoundError, OSError):
            d.rmdir()  # fails harmlessly if a new locker already made a lock file in it
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(self.root)
        return True


class Backend(backends.Backend):
    name = "imagefs"

    def __init__(self, ctx: backends.Context) -> None:
        super().__init__(ctx)
        self.mounts = SharedMounts(ctx)

    def provision(self, container_id: str, record: ImageRecord, rootfs_dir: Path) -> dict[str, Any]:
        upper, work, rootfs = (rootfs_dir / n for n in (UPPER, WORK, ROOTFS))
        for p in (upper, work, rootfs):
            p.mkdir()
        lower = self.mounts.acquire(record.id, container_id)
        backends.copy_root_attributes(lower, upper)
        backends.mount_overlay([lower], upper, work, rootfs, what=f"image {record.id[:12]}")
        return {"mount": str(lower)}

    def release(self, container_id: str, image_ids: set[str]) -> None:
        for image_id in sorted(image_ids):
            self.mounts.release(image_id, container_id)

    def recover(self, live: set[str]) -> list[str]:
        return self.mounts.recover(live)
