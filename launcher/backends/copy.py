"""The copy backend: the merged image extracted into the container's rootfs (Mesos's default).

    WORK/containers/<id>/backends/copy/rootfses/<rootfs-id>/rootfs    the container's own copy

Slow to start and costly in space (a full copy per container), but the result is a plain
directory: no mount to keep alive, nothing shared. The copy is made from the image's tree and
layer readers (imagefs.extract.extract_view), lazily fetching what a registry image lacks locally.

Concurrency: each provision writes only its own rootfs directory; the store's shared lock is held
while reading, so a gc does not delete the blobs being read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher import backends
from launcher.backends import ROOTFS
from stores.store import ImageRecord


class Backend(backends.Backend):
    name = "copy"

    def provision(self, container_id: str, record: ImageRecord, rootfs_dir: Path) -> dict[str, Any]:
        from imagefs.extract import extract_view   # here: see overlay.LayerCache._ensure

        with self.ctx.store.using():
            view = self.ctx.open_view(record)
            try:
                extract_view(view, rootfs_dir / ROOTFS)
            finally:
                view.close()
        return {}
