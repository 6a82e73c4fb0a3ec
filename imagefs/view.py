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
from concurrent.futures import ThreadPoolExecutor
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
Fetch = Callable[[int, int], bytes]

# Read-ahead on open: a file opened is nearly always read whole (binaries, libraries, modules), and
# its reads arrive one after another, each a round trip. Fetching its compressed bytes at open, in
# parallel requests of READAHEAD_PIECE, turns that chain of round trips into one transfer.
READAHEAD_BYTES = 32 << 20  # at most this much of one file's compressed data
READAHEAD_PIECE = 256 << 10
READAHEAD_THREADS = 4


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
        self._readahead: ThreadPoolExecutor | None = None
        self._readahead_lock = threading.Lock()

    @classmethod
    def open(cls, store: Store, record: ImageRecord, opener: SourceOpener) -> ImageView:
        source = _LazySource(record.source, opener)
        indexes, window_fetches = [], []
        for layer in record.image.layers:
            index, fetch_index = cls._load_index(store, layer, source)
            indexes.append(index)
            window_fetches.append(fetch_index)
        tree = Tree.build([ix.entries for ix in indexes],
                          warn=lambda msg: log.warning("image %s: %s", record.id[:12], msg))
        data = [cls._layer_data(store, layer, ix, source) for layer, ix in zip(record.image.layers, indexes)]
        readers = [LayerReader(ix, d.fetch, fetch_index=f, forget=d.cache.forget_range if d.cache else None)
                   for ix, d, f in zip(indexes, data, window_fetches)]
        return cls(record, tree, readers, data, source)

    @staticmethod
    def _load_index(store: Store, layer: Layer, source: _LazySource) -> tuple[LayerIndex, Fetch | None]:
        """The layer's index, and for one held only as metadata, how to range-read its windows:
        from the whole index once the store has it (the prefetcher fetches it), else from the
        published blob in the registry (each window is checked against the metadata)."""
        if layer.toc_digest and store.has_toc(layer.digest):
            # First: an eStargz layer looks the same whichever index the store holds for it (a
            # full index of its tar would show its landmark and TOC files).
            made = store.read_toc_index(layer.digest)
            if made is not None:
                return LayerIndex.from_bytes(made, layer.digest), None
            from imagefs.estargz import index_from_toc

            warn = lambda msg: log.warning("layer %s: %s", layer.digest[:19], msg)  # noqa: E731
            return index_from_toc(store.read_toc(layer.digest), digest=layer.digest, size=layer.size,
                                  toc_digest=layer.toc_digest, warn=warn), None
        if store.has_full_index(layer.digest):
            return LayerIndex.from_bytes(store.read_index(layer.digest), layer.digest), None
        meta, remote = store.read_index_meta(layer.digest)
        index = LayerIndex.from_meta(meta, layer.digest)
        blob = remote.get("digest", "")
        whole = store.index_path(layer.digest)
        same: dict[tuple[int, int], bool] = {}   # (inode, mtime) of a whole index -> is it this one

        def fetch_window(start: int, length: int) -> bytes:
            # The store's whole copy of the index, once the prefetcher has it, unless it is another
            # index of the layer (`index --push` re-indexes layers with profile seek points):
            # this view's windows are where its own metadata says, in the blob it came from.
            try:
                with open(whole, "rb") as f:
                    st = os.fstat(f.fileno())
                    key = (st.st_ino, st.st_mtime_ns)
                    if key not in same:
                        same[key] = os.pread(f.fileno(), len(meta), 0) == meta
                    if same[key]:
                        return os.pread(f.fileno(), length, start)
            except FileNotFoundError:
                pass
            return source.get().read_range(blob, start, length)
        return index, fetch_window

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
        # An eStargz index has no compressed chunk digests: its reader checks each region once
        # decompressed, and drops (forget_range) what failed.
        digests = index.chunk_digests if index.region_digests is None else None
        cache = ChunkCache(store.chunks_dir(layer.digest), layer.size, index.chunk_size,
                           digests, remote, what=f"layer {layer.digest}")
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

    def source(self) -> Source:
        """The image's source (opened on first use)."""
        return self._source.get()

    def opened(self, ino: Inode) -> None:
        """File *ino* was opened: start fetching the chunks its reads will want (see
        READAHEAD_BYTES). Returns at once; failures are left to the reads, which fetch again."""
        location = self.tree.node(ino).location
        if location is None or location.size == 0:
            return
        cache = self.data[location.layer].cache
        if cache is None:
            return
        reader = self.readers[location.layer]
        start, end = reader.readahead_extent(location.offset, location.size)
        end = min(end, start + READAHEAD_BYTES)
        size = cache.chunk_size
        first, last = start // size, min((end - 1) // size + 1, cache.nchunks)
        if cache.has(first, last):
            return
        self.last_read = time.monotonic()
        step = max(1, READAHEAD_PIECE // size)
        with self._readahead_lock:
            if self._readahead is None:
                self._readahead = ThreadPoolExecutor(READAHEAD_THREADS, thread_name_prefix="readahead")
            if reader.needs_window(location.offset):  # its seek point's window, alongside the data
                self._readahead.submit(self._window_ahead, reader, location.offset)
            for f in range(first, last, step):
                self._readahead.submit(self._fetch_ahead, cache, f, min(f + step, last))

    @staticmethod
    def _fetch_ahead(cache: ChunkCache, first: int, last: int) -> None:
        try:
            cache.ensure(first, last)
        except Exception as e:  # noqa: BLE001 - the read that wants these chunks reports it
            log.debug("read-ahead of %s chunks %d-%d: %s", cache.what, first, last, e)

    @staticmethod
    def _window_ahead(reader: LayerReader, uoffset: int) -> None:
        try:
            reader.window_at(uoffset)
        except Exception as e:  # noqa: BLE001 - the read that wants it reports it
            log.debug("read-ahead of a window of %s: %s", reader.index.digest, e)

    def close(self) -> None:
        with self._readahead_lock:
            pool, self._readahead = self._readahead, None
        if pool is not None:  # before the caches close: its threads write into them
            pool.shutdown(wait=True, cancel_futures=True)
        for d in self.data:
            d.close()
        self._source.close()
