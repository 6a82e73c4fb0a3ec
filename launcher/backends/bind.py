"""The bind backend: a single-layer image's layer, extracted once, bind-mounted read-only.

    STORE/layers/<layer-hex>[.flat]/       the extracted layer (shared with the overlay backend)
    WORK/containers/<id>/backends/bind/rootfses/<rootfs-id>/rootfs   a read-only bind mount of it

For images of one layer that tasks only read (Mesos's bind backend): no copy, no overlay. An image
of more layers is refused: merging them takes the imagefs, overlay or copy backend. The layer is
extracted without overlayfs whiteouts when it has any (`.flat`): alone, a 0/0 device would show.

Concurrency: as the overlay backend's layer cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imagefs.errors import InputError
from launcher import backends
from launcher.backends import ROOTFS
from launcher.backends.overlay import LayerCache
from stores.store import ImageRecord


class Backend(backends.Backend):
    name = "bind"

    def __init__(self, ctx: backends.Context) -> None:
        super().__init__(ctx)
        self.cache = LayerCache(ctx)

    def check(self, record: ImageRecord) -> None:
        n = len(record.image.layers)
        if n != 1:
            name = record.refs[0] if record.refs else record.id[:12]
            raise InputError(f"image {name}", f"has {n} layers; the bind backend takes a single-layer image "
                                              "(use the imagefs, overlay or copy backend)")

    def provision(self, container_id: str, record: ImageRecord, rootfs_dir: Path) -> dict[str, Any]:
        self.check(record)
        (layer,) = self.cache.layer_dirs(record, flat=True)
        rootfs = rootfs_dir / ROOTFS
        rootfs.mkdir()
        backends.bind_readonly(layer, rootfs)
        return {"layers": [layer.name]}
