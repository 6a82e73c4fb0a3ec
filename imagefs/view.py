"""An image's merged, read-only filesystem: the union tree plus one reader per layer.

This is everything the FUSE front serves, with no FUSE in it. Where a layer's bytes come from is
decided here, once per layer, in order of preference:

1. the whole blob in the store (pulled with --all-layers): pread on the local file;
2. a source whose blobs are files on this machine (OCI layout, docker archive): its read_range;
3. a remote source (registry): the verified chunk cache, filled by HTTP range reads.

Concurrency: `read` is synchronous and thread-safe; the FUSE front calls it from worker threads
(trio.to_thread) because decompression, hashing and network reads would stall the event loop.
Everything else (tree lookups) is pure memory and may run on the event loop.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from imagefs.chunkcache import ChunkCache
from imagefs.index import LayerIndex
from imagefs.layerread import LayerReader
from imagefs.union import Inode, Tree
from stores.model import Layer
from stores.reference import DockerReference, parse_reference
from stores.source import Source
from stores.store import ImageRecord, Store

log = logging.getLogger(__name__)

SourceOpener = Callable[[], Source]


class _LazySource:
    """Opens the source on first use, once, so a mount of a fully local image never dials out."""

    def __init__(self, reference: str, opener: SourceOpener) -> None:
        self.reference = reference
        self._opener = opener
        self._source: Source | None = None
        self._lock = threading.Lock()

    def get(self) -> Source:
        with self._lock:
            if self._source is None:
                self._source = self._opener()
            return self._source

    def close(self) -> None:
        with self._lock:
            if self._source is not None:
                self._source.close()
                self._source = None


@dataclass
class LayerData:
    """Where one layer's compressed bytes come from, and what has been fetched so far."""

    layer: Layer
    fetch: Callable[[int, int], bytes]
    cache: ChunkCache | None = None
    fd: int | None = None

    def close(self) -> None:
        if self.cache:
            self.cache.close()
        if self.fd is not None:
            os.close(self.fd)


def _pread_exact(fd: int, what: str) -> Callable[[int, int], bytes]:
    def fetch(start: int, length: int) -> bytes:
        data = os.pread(fd, length, start)
        if len(data) != length:
            raise OSError(f"{what}: short read at {start}")
        return data
    return fetch


class ImageView:
    def __init__(self, record: ImageRecord, tree: Tree, readers: list[LayerReader], data: list[LayerData],
                 source: _LazySource) -> None:
        self.record = record
        self.tree = tree
        self.readers = readers
        self.data = data
        self._source = source
        self.on_read: Callable[[Inode], None] | None = None  # e.g. the access-profile recorder
        self.last_read = time.monotonic()  # when a task last read: background work yields to it

    @classmethod
    def open(cls, store: Store, record: ImageRecord, opener: SourceOpener) -> ImageView:
        source = _LazySource(record.source, opener)
        indexes = [LayerIndex.from_bytes(store.read_index(layer.digest), layer.digest)
                   for layer in record.image.layers]
        tree = Tree.build([ix.entries for ix in indexes],
                          warn=lambda msg: log.warning("image %s: %s", record.id[:12], msg))
        data = [cls._layer_data(store, layer, ix, source) for layer, ix in zip(record.image.layers, indexes)]
        readers = [LayerReader(ix, d.fetch) for ix, d in zip(indexes, data)]
        return cls(record, tree, readers, data, source)

    @staticmethod
    def _layer_data(store: Store, layer: Layer, index: LayerIndex, source: _LazySource) -> LayerData:
        if store.has_blob(layer.digest):
            fd = os.open(store.blob_path(layer.digest), os.O_RDONLY | os.O_CLOEXEC)
            return LayerData(layer, _pread_exact(fd, layer.digest), fd=fd)

        def remote(start: int, length: int) -> bytes:
            return source.get().read_range(layer.digest, start, length)

        if not isinstance(parse_reference(source.reference), DockerReference):
            # OCI layouts, docker archives and ACIs are files here already: no second copy.
            return LayerData(layer, remote)
        cache = ChunkCache(store.chunks_dir(layer.digest), layer.size, index.chunk_size,
                           index.chunk_digests, remote, what=f"layer {layer.digest}")
        return LayerData(layer, cache.read, cache=cache)

    def read(self, ino: Inode, offset: int, size: int) -> bytes:
        """Up to *size* bytes of regular file *ino* from *offset* (short only at end of file)."""
        location = self.tree.node(ino).location
        if location is None or offset >= location.size:
            return b""
        self.last_read = time.monotonic()
        if self.on_read is not None:
            self.on_read(ino)
        n = min(size, location.size - offset)
        return self.readers[location.layer].read(location.offset + offset, n)

    def close(self) -> None:
        for d in self.data:
            d.close()
        self._source.close()
