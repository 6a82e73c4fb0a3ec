"""Seek points at the files of an image's access profile, for the indexes `index --push` publishes.

A read of a file in a gzip layer restarts decompression at the last seek point before the file's
data and fetches everything from there: with points every 1 MiB of output that lead-in is half a
span on average (~180 KB of gzip), about as much again as the files a start reads. When the store
has the image's access profile (the files its first run read, imagefs/prefetch.py), the layers
holding those files are indexed once more with an extra seek point at or just before each file's
data and one at or just after its end (`build_index(wanted=..., ends=...)`, `zran.GzipScanner`;
files less than `zran.MIN_LEAD` apart count as one), so a profiled start fetches little more than
the files themselves (and one window each): at most a deflate block on either side.

Which layer and offset serve a path is the union's answer (imagefs/union.py: the topmost layer
that has the path after whiteouts; a hardlink has its target's data). The rebuilt index replaces
the store's (atomically), and depends on the layer and the profile only: the same image with the
same profile gives the same bytes on any machine. A layer whose index has extra points the
profile no longer asks for is rebuilt too, without them. Zstd and plain layers are left alone
(zstd restarts only at frame starts).

Concurrency: synchronous; streams whole layers (from the local blob, else from the source), so run
it where that may take a while (the `index` command).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack

from imagefs import zran
from imagefs.errors import ImagefsError
from imagefs.index import LayerIndex, build_index
from imagefs.union import Tree
from stores.model import Image, Layer
from stores.source import Source
from stores.store import Store

log = logging.getLogger(__name__)

_READ = 1 << 20  # bytes per read of a local blob


def profiled_files(indexes: list[LayerIndex], paths: list[str]) -> list[tuple[int, int, int]]:
    """(layer position, data offset, size) of each of *paths* that the union of *indexes* (one per
    image layer, bottom first) serves as a non-empty regular file, in profile order, each once."""
    tree = Tree.build([ix.entries for ix in indexes], warn=lambda msg: None)  # said when it was pulled
    files: dict[tuple[int, int, int], None] = {}
    for path in paths:
        ino = tree.resolve(os.fsencode(path))
        location = tree.node(ino).location if ino is not None else None
        if location is not None and location.size > 0:
            files.setdefault((location.layer, location.offset, location.size), None)
    return list(files)


def profile_extents(image: Image, indexes: list[LayerIndex], paths: list[str],
                    gap: int = zran.MIN_LEAD) -> dict[str, list[tuple[int, int]]]:
    """Layer digest -> the [start, end) extents of its uncompressed tar holding the data of the
    profiled regular files the union of *indexes* (one per image layer, bottom first) serves from
    it, sorted; files less than *gap* apart (tar headers, small unprofiled files) make one extent,
    read in one go rather than restarted between them."""
    files: dict[str, set[tuple[int, int]]] = {layer.digest: set() for layer in image.layers}
    for position, offset, size in profiled_files(indexes, paths):
        files[image.layers[position].digest].add((offset, offset + size))
    out: dict[str, list[tuple[int, int]]] = {}
    for digest, spans in files.items():
        merged: list[tuple[int, int]] = []
        for start, end in sorted(spans):
            if merged and start - merged[-1][1] < gap:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        out[digest] = merged
    return out


def has_extra_points(index: LayerIndex) -> bool:
    """Whether *index* has seek points besides its regular ones. The regular points are exactly
    those of a scan without wanted offsets (zran.GzipScanner): the first at 0, then each the first
    point at least `span` past the previous regular one; any other point is an extra one."""
    if index.compression != "gzip" or index.region_digests is not None:
        return False
    last = 0
    for p in index.points[1:]:
        if p.uoffset - last < index.span:
            return True
        last = p.uoffset
    return False


def add_profile_points(store: Store, image: Image, open_source: Callable[[], AbstractContextManager[Source]]) -> list[str]:
    """Re-index the gzip layers of *image* that hold files of its access profile in *store*, with a
    seek point at each such file (module docstring), replacing the store's indexes; layers with
    extra points from an older profile are re-indexed without them. Every layer's whole index must
    be in the store. Returns the digests of the layers re-indexed."""
    try:
        paths = store.read_profile(image.id) or []
    except ImagefsError:
        paths = []  # not published either (imagefs/publish.py stored_profile says why)
    indexes = [LayerIndex.from_bytes(store.read_index(layer.digest), layer.digest) for layer in image.layers]
    wanted = profile_extents(image, indexes, paths) if paths else {}
    todo: dict[str, tuple[Layer, list[tuple[int, int]]]] = {}
    for layer, index in zip(image.layers, indexes):
        extents = wanted.get(layer.digest, [])
        if layer.compression == "gzip" and (extents or has_extra_points(index)):
            todo[layer.digest] = (layer, extents)
    done: list[str] = []
    with ExitStack() as stack:
        source: Source | None = None
        for layer, extents in todo.values():
            if store.has_blob(layer.digest):
                chunks: Iterator[bytes] = _read_file(store, layer)
            else:
                if source is None:
                    source = stack.enter_context(open_source())
                chunks = iter(source.open_blob(layer.digest, layer.size))
            warn = lambda msg, d=layer.digest: log.warning("layer %s: %s", d[:19], msg)  # noqa: E731
            index = build_index(chunks, digest=layer.digest, size=layer.size, compression=layer.compression,
                                root=layer.root, warn=warn, wanted=[a for a, _ in extents],
                                ends=[b for _, b in extents])
            store.put_index(layer.digest, index.to_bytes())
            log.info("layer %s: re-indexed with %d seek point(s) for %d extent(s) of profiled files",
                     layer.digest, len(index.points), len(extents))
            done.append(layer.digest)
    return done


def _read_file(store: Store, layer: Layer) -> Iterator[bytes]:
    with open(store.blob_path(layer.digest), "rb") as f:
        while block := f.read(_READ):
            yield block
