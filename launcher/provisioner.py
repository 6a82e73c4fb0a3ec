"""The provisioner: an image becomes a container's root file system, and goes away again.

After the Mesos provisioner. `provision` makes a rootfs with one of the backends
(launcher/backends/: imagefs, overlay, copy, bind) in

    WORK/containers/<id>/backends/<backend>/rootfses/<rootfs-id>/
        rootfs.json    the marker: {"version": 1, container_id, backend, rootfs_id, image_id}
        rootfs/        the root file system the container gets
        upper/ work/   the overlay-based backends' writable layer

and returns it with a JSON-able `state` that the containerizer checkpoints (state.json) before
using the rootfs. The provisioner does not rely on that checkpoint: it writes the marker before
the backend does anything that needs undoing, and the backends record what they share (mount
references) on disk before acting. So after a crash at any point, `destroy` and `recover` find
everything from the disk alone; `state` only saves them a search.

`recover(live)` after a launcher restart destroys the rootfses of containers not in *live*
(orphans) and lets the backends drop what those held (shared image mounts: unmounted once unused,
served again if still used and their server died).

Marker format versions: 1 — first version.

Concurrency: synchronous and blocking (call it from a worker thread). Calls for different
containers may run at once, from threads or processes; calls for one container must not (the
containerizer orders them). What containers share is guarded by flocks in the backends.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagefs.errors import ImagefsError, InputError, RuntimeFailure
from launcher import backends
from launcher.backends import ROOTFS
from stores.fsutil import atomic_write
from stores.pull import SourceOptions
from stores.store import ImageRecord, Store

if TYPE_CHECKING:
    from imagefs.fuse.daemon import Standby

log = logging.getLogger(__name__)

MARKER = "rootfs.json"
MARKER_VERSION = 1
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_IMAGE_ID = re.compile(r"[0-9a-f]{64}")


@dataclass
class ProvisionedRootfs:
    path: str                # the root file system directory (a str, as in ContainerConfig)
    backend: str
    rootfs_id: str
    state: dict[str, Any] = field(default_factory=dict)  # JSON-able; give it back to `destroy`


def _check_container_id(container_id: str) -> None:
    if not _CONTAINER_ID.fullmatch(container_id):
        raise InputError(f"container id {container_id!r}",
                         "not a valid id (letters, digits, '_', '.', '-'; at most 128; not starting with a symbol)")


def _read_marker(rootfs_dir: Path) -> dict[str, Any]:
    try:
        marker = json.loads((rootfs_dir / MARKER).read_text())
    except (OSError, ValueError):
        return {}  # a crash before the marker was written: nothing was mounted or referenced yet
    return marker if isinstance(marker, dict) else {}


def _prune(d: Path, *, stop: Path) -> None:
    """Remove *d* and its parents up to (not including) *stop* while they are empty: the
    container dir goes only if nothing else (state.json, sandbox/: not ours) is in it."""
    while d != stop and stop in d.parents:
        try:
            d.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            return
        d = d.parent


class Provisioner:
    def __init__(self, store: Store, work_dir: str | os.PathLike[str], *, source_flags: Sequence[str] = (),
                 source_options: SourceOptions | None = None, mount_standby: Standby | None = None) -> None:
        """*mount_standby*: a mount server started ahead (imagefs/fuse/daemon.py), for the next
        `provision` only (dismissed after it, used or not)."""
        # Resolved paths: mount points are compared with the kernel's (canonical) ones.
        self.work_dir = Path(os.path.realpath(work_dir))
        self._ctx = ctx = backends.Context(Store(os.path.realpath(store.root)), self.work_dir, tuple(source_flags),
                                           source_options or SourceOptions(), mount_standby)
        self._backends = {name: backends.backend_class(name)(ctx) for name in backends.NAMES}

    def _backend(self, name: str) -> backends.Backend:
        if name not in self._backends:
            backends.backend_class(name)  # raises the one-line error naming it
        return self._backends[name]

    def _container_dir(self, container_id: str) -> Path:
        return self.work_dir / "containers" / container_id

    # -- provision ---------------------------------------------------------------------------
    def provision(self, container_id: str, record: ImageRecord, backend: str = backends.DEFAULT) -> ProvisionedRootfs:
        """Make a root file system of *record* for *container_id* with *backend*."""
        _check_container_id(container_id)
        if not _IMAGE_ID.fullmatch(record.id):
            raise InputError(f"image {record.id!r}", "not an image id (64 hex digits)")
        b = self._backend(backend)
        b.check(record)
        rootfs_id = uuid.uuid4().hex
        rootfs_dir = self._container_dir(container_id) / "backends" / backend / "rootfses" / rootfs_id
        marker = {"version": MARKER_VERSION, "container_id": container_id, "backend": backend,
                  "rootfs_id": rootfs_id, "image_id": record.id}
        try:
            rootfs_dir.mkdir(parents=True)
            atomic_write(rootfs_dir / MARKER, json.dumps(marker).encode())
            try:
                extra = b.provision(container_id, record, rootfs_dir)
            finally:
                if self._ctx.mount_standby is not None:
                    self._ctx.mount_standby.dismiss()   # used by now, or not needed
        except BaseException as e:
            try:
                self._destroy_rootfs(b, container_id, rootfs_dir, marker)
                if record.id not in self._images_used(container_id, backend):
                    b.release(container_id, {record.id})
                _prune(rootfs_dir.parent, stop=self.work_dir / "containers")
            except Exception as undo:  # the original error matters more; recover() retries this
                log.warning("container %s: undoing a failed provision: %s", container_id, undo)
            if isinstance(e, OSError):
                raise RuntimeFailure(str(e.filename or rootfs_dir), e.strerror or str(e)) from None
            raise
        path = str(rootfs_dir / ROOTFS)
        return ProvisionedRootfs(path, backend, rootfs_id, {**marker, **extra, "rootfs": path})

    def _images_used(self, container_id: str, backend: str) -> set[str]:
        """The images of the container's remaining rootfses with *backend*."""
        rootfses = self._container_dir(container_id) / "backends" / backend / "rootfses"
        return {_read_marker(d).get("image_id", "") for d in rootfses.glob("*")}

    # -- destroy -----------------------------------------------------------------------------
    def destroy(self, container_id: str, state: dict[str, Any] | None = None) -> None:
        """Unmount and remove every rootfs of *container_id* and release what it held.

        Idempotent, and complete without *state* (everything is found on disk); *state* (from
        `provision`) adds the image to release in case an interrupted destroy removed the
        rootfs directory but did not get to release it."""
        _check_container_id(container_id)
        state = state or {}
        problems: list[str] = []
        container_dir = self._container_dir(container_id)
        backends_dir = container_dir / "backends"
        by_backend: dict[str, set[str]] = {name: set() for name in self._backends}
        if state.get("backend") in by_backend and isinstance(state.get("image_id"), str):
            by_backend[state["backend"]].add(state["image_id"])
        for backend_dir in sorted(backends_dir.iterdir()) if backends_dir.is_dir() else []:
            b = self._backends.get(backend_dir.name)
            for rootfs_dir in sorted((backend_dir / "rootfses").glob("*")):
                marker = _read_marker(rootfs_dir)
                if b is not None and isinstance(marker.get("image_id"), str):
                    by_backend[b.name].add(marker["image_id"])
                try:
                    self._destroy_rootfs(b, container_id, rootfs_dir, marker)
                except ImagefsError as e:
                    problems.append(str(e))
            if not backends.mounts_below(backend_dir):
                try:
                    shutil.rmtree(backend_dir)
                except OSError as e:
                    problems.append(f"{e.filename or backend_dir}: cannot remove: {e.strerror}")
        for name, image_ids in by_backend.items():  # after every rootfs of the container is gone
            try:
                self._backends[name].release(container_id, {i for i in image_ids if _IMAGE_ID.fullmatch(i)})
            except ImagefsError as e:
                problems.append(str(e))
        _prune(backends_dir, stop=container_dir.parent)
        if problems:
            raise RuntimeFailure(f"container {container_id}", "; ".join(problems))

    def _destroy_rootfs(self, b: backends.Backend | None, container_id: str, rootfs_dir: Path,
                        marker: dict[str, Any]) -> None:
        if b is not None:
            b.destroy(container_id, rootfs_dir, marker)
        for point in reversed(backends.mounts_below(rootfs_dir)):  # whatever else is still there
            backends.unmount(Path(point))
        if backends.mounts_below(rootfs_dir):  # never delete through a mount into other data
            raise RuntimeFailure(str(rootfs_dir), "still mounted: not removed")
        try:
            shutil.rmtree(rootfs_dir)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise RuntimeFailure(str(e.filename or rootfs_dir), f"cannot remove: {e.strerror}") from None

    # -- recover -----------------------------------------------------------------------------
    def recover(self, live: set[str]) -> None:
        """After a restart: destroy the rootfses of containers not in *live*, and let backends
        drop what those held (see the module docstring). Raises RuntimeFailure listing what
        could not be cleaned (after trying everything)."""
        problems: list[str] = []
        containers = self.work_dir / "containers"
        for container_dir in sorted(containers.iterdir()) if containers.is_dir() else []:
            if container_dir.name in live or not (container_dir / "backends").is_dir():
                continue
            if not _CONTAINER_ID.fullmatch(container_dir.name):
                problems.append(f"{container_dir}: not a container id, left alone")
                continue
            log.info("destroying the rootfs of orphan container %s", container_dir.name)
            try:
                self.destroy(container_dir.name)
            except ImagefsError as e:
                problems.append(str(e))
        for b in self._backends.values():
            problems += b.recover(live)
        if problems:
            raise RuntimeFailure("provisioner recovery", "; ".join(problems))
