"""The overlay backend: each layer extracted once into the store, a kernel overlay per container.

    STORE/layers/<layer-hex>/                 a layer as an overlayfs lower directory
    STORE/layers/<layer-hex>.<lower-chain>/   ... for a layer that depends on the layers below it
    STORE/layers/<layer-hex>.flat/            ... without whiteouts, for use alone (bind backend)
    STORE/layers/<name>.tmp-XXXXXXXX/         an extraction in progress (or interrupted)
    STORE/locks/layer-<name>.lock             flock held while <name> is extracted
    WORK/containers/<id>/backends/overlay/rootfses/<rootfs-id>/{upper,work,rootfs}

A layer is extracted by imagefs.extract.extract_layer (whiteouts as overlayfs whiteouts). Most
layers are a function of their own entries and are shared by every image that has them. A layer
with a hardlink to a lower layer's file, or a directory it needs but does not describe, depends on
the layers below (see imagefs/extract.py): it is stored under its digest plus a digest of the
layers below (`<lower-chain>`, the first 128 bits of sha256 over their digests), so another
image with the same layer on different parents gets its own copy. Every name starts with the
layer's hex digest, so "is this layer still referenced" is one lookup for gc.

The kernel copies one page of mount options: with store paths of ~60 bytes, about 30 layers fit.
Longer images fail with a clear error (use the imagefs or copy backend).

A provision whose layers are all there opens nothing (a stat per layer); otherwise the image is
opened (its indexes and union tree, `ImageView`) to read the missing layers, fetching lazily what
a registry image lacks locally.

Concurrency: the first container to need a layer extracts it under the layer's flock (others wait
and then use it); extraction goes to a temporary directory renamed into place after a syncfs, so
a layer directory that exists is complete, also after a crash. The store's shared lock is held
while extracting, so a gc does not delete the blobs being read.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher import backends
from launcher.backends import ROOTFS, UPPER, WORK
from stores.digest import hex_of
from stores.fsutil import locked
from stores.store import ImageRecord

if TYPE_CHECKING:
    from imagefs.view import ImageView

log = logging.getLogger(__name__)

FLAT = "flat"


def _chain(digests: list[str]) -> str:
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()[:32]


class LayerCache:
    """STORE/layers/: layers extracted once, shared by all containers (module docstring)."""

    def __init__(self, ctx: backends.Context) -> None:
        self.ctx = ctx
        self.root = ctx.store.root / "layers"

    def layer_dirs(self, record: ImageRecord, *, flat: bool = False) -> list[Path]:
        """The image's layers as directories, bottom first, extracting those not there yet.
        *flat*: for a one-layer image used alone, whiteouts left out."""
        layers = record.image.layers
        view: ImageView | None = None
        out: list[Path] = []
        try:
            for i, layer in enumerate(layers):
                hexd = hex_of(layer.digest)
                # Without opening the image: a plain name exists only for a self-contained layer,
                # a chained one only for a dependent layer on these very lowers. (A flat layer's
                # name depends on whether it has whiteouts: that takes its index.)
                known = [] if flat else [hexd, f"{hexd}.{_chain([lower.digest for lower in layers[:i]])}"]
                found = next((self.root / n for n in known if (self.root / n).is_dir()), None)
                if found is None:
                    view = view or self.ctx.open_view(record)
                    found = self._ensure(view, i, flat=flat)
                out.append(found)
        finally:
            if view is not None:
                view.close()
        return out

    def _ensure(self, view: ImageView, i: int, *, flat: bool) -> Path:
        """Layer *i* of the opened image as a directory: extracted unless it is there."""
        # Imported here: the provisioner makes every backend, and `imagefs run` with the default
        # (imagefs) backend should not pay for the extraction code's imports.
        from imagefs.extract import Lower, extract_layer, needs_lower
        from imagefs.union import WHITEOUT_PREFIX

        layers = view.record.image.layers
        index = view.readers[i].index
        hexd = hex_of(layers[i].digest)
        if flat and any(e.path.rpartition(b"/")[2].startswith(WHITEOUT_PREFIX) for e in index.entries):
            name = f"{hexd}.{FLAT}"
        elif needs_lower(index.entries):
            name = f"{hexd}.{_chain([lower.digest for lower in layers[:i]])}"
        else:
            name = hexd
        dest = self.root / name
        if dest.is_dir():
            return dest
        self.root.mkdir(parents=True, exist_ok=True)
        with self.ctx.store.using(), locked(self.ctx.store.root / "locks" / f"layer-{name}.lock"):
            if dest.is_dir():  # extracted by another container while we waited
                return dest
            for stale in self.root.glob(f"{name}.tmp-*"):  # an interrupted extraction
                shutil.rmtree(stale)
            readers = view.readers
            lower = Lower([r.index.entries for r in readers[:i]], lambda j, off, n: readers[j].read(off, n))
            log.info("extracting layer %s into %s", layers[i].digest, dest)
            extract_layer(index, readers[i].read, dest, lower=lower if i else None,
                          whiteouts=not name.endswith(FLAT), sync=True)
        return dest


class Backend(backends.Backend):
    name = "overlay"

    def __init__(self, ctx: backends.Context) -> None:
        super().__init__(ctx)
        self.cache = LayerCache(ctx)

    def provision(self, container_id: str, record: ImageRecord, rootfs_dir: Path) -> dict[str, Any]:
        lowers = self.cache.layer_dirs(record)
        upper, work, rootfs = (rootfs_dir / n for n in (UPPER, WORK, ROOTFS))
        for p in (upper, work, rootfs):
            p.mkdir()
        # The root's attributes: the top layer's (exact unless a lower layer alone has a root entry).
        backends.copy_root_attributes(lowers[-1], upper)
        backends.mount_overlay(lowers[::-1], upper, work, rootfs, what=f"image {record.id[:12]}")
        return {"layers": [p.name for p in lowers]}
