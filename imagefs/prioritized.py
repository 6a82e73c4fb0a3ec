"""Fetch an image's prioritized files while the rest of its start goes on: an eStargz image's, and
the files of an access profile published with the indexes.

An eStargz layer puts the files its image's first run reads (its prioritized files) first, before
a `.prefetch.landmark`, so their data is one byte range at the start of the blob, known as soon as
the layer's TOC is. `imagefs run` hands a `PrioritizedFetch` to the pull, which calls `layer` with
each TOC as it arrives: that layer's range is then fetched into the store's chunk cache (PIECE per
request, THREADS at once, in order) while the pull builds the indexes, the mount server starts and
the launcher builds the container; the mount's own prefetcher would start only once the mount is
up. The two processes share the cache (imagefs/chunkcache.py locks what each is fetching), so
nothing is fetched twice and a read of a chunk being fetched here waits for it.

An image whose indexes and access profile were published (imagefs/publish.py) is fetched the
same way once the pull is done (`profile`): the profile's files are looked up in the layer indexes
the pull kept, and the compressed ranges their reads will start with (from the seek point before
each file, as the mount's read-ahead computes them) go into the chunk caches, each chunk checked
against its digest, in profile order. Only the chunks: the 32 KiB windows those reads restart from
stay with the mount, which keeps them in memory and would fetch them again (the prefetcher there
fetches them first; the chunks it then asks for are here, or being fetched here and waited for).

Concurrency: `layer` and `profile` may be called from several threads (the pull's, one per layer); `finish`
once, at the end. Failures are logged and left to the mount, whose reads fetch what is missing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from imagefs.chunkcache import ChunkCache
from imagefs.errors import ImagefsError
from imagefs.index import DEFAULT_CHUNK_SIZE, LayerIndex
from stores.model import Layer
from stores.source import Source
from stores.store import ImageRecord, Store

log = logging.getLogger(__name__)

PIECE = 256 << 10
THREADS = 4


class PrioritizedFetch:
    def __init__(self, store: Store, open_source: Callable[[], Source]) -> None:
        self._store = store
        self._open_source = open_source
        self._source: Source | None = None
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._jobs: list[Future[None]] = []
        self._caches: list[ChunkCache] = []
        self.bytes = 0  # prioritized bytes asked for (fetched, or found in the cache)

    def layer(self, layer: Layer, toc: bytes) -> None:
        """The TOC of eStargz *layer* has arrived (verified): start fetching its prioritized range."""
        from imagefs.estargz import prioritized_extent

        try:
            extent = min(prioritized_extent(toc, toc_digest=layer.toc_digest, what=f"layer {layer.digest}"),
                         layer.size)
            if not extent or self._store.has_blob(layer.digest):
                return
            with self._lock:
                source, pool = self._started()
                # The chunk size the mount's cache uses for an index made from a TOC (estargz.py).
                cache = ChunkCache(self._store.chunks_dir(layer.digest), layer.size, DEFAULT_CHUNK_SIZE, None,
                                   lambda start, n: source.read_range(layer.digest, start, n),
                                   what=f"layer {layer.digest}")
                self._caches.append(cache)
                self.bytes += extent
                last, step = -(-extent // cache.chunk_size), max(1, PIECE // cache.chunk_size)
                self._jobs += [pool.submit(cache.ensure, first, min(first + step, last))
                               for first in range(0, last, step)]
            log.info("layer %s: fetching its prioritized files (%d bytes)", layer.digest[:19], extent)
        except Exception as e:  # noqa: BLE001 - only a head start: the mount fetches what is missing
            log.debug("layer %s: no early fetch of prioritized files: %s", layer.digest[:19], e)

    def profile(self, record: ImageRecord) -> None:
        """The pull of *record* is done: start fetching its access profile's files, unless an
        eStargz layer's prioritized files (the same files, where an image has both) are on their way."""
        try:
            with self._lock:
                if self._jobs:
                    return
            paths = self._store.read_profile(record.id)
            ranges = profile_ranges(self._store, record, paths) if paths else []
            if not ranges:
                return
            with self._lock:
                source, pool = self._started()
                caches: dict[str, ChunkCache] = {}
                for layer, index, start, end in ranges:
                    cache = caches.get(layer.digest)
                    if cache is None:
                        cache = caches[layer.digest] = ChunkCache(
                            self._store.chunks_dir(layer.digest), layer.size, index.chunk_size, index.chunk_digests,
                            lambda first, n, d=layer.digest: source.read_range(d, first, n),
                            what=f"layer {layer.digest}")
                        self._caches.append(cache)
                    self.bytes += end - start
                    size, step = cache.chunk_size, max(1, PIECE // cache.chunk_size)
                    last = (end - 1) // size + 1
                    self._jobs += [pool.submit(cache.ensure, first, min(first + step, last))
                                   for first in range(start // size, last, step)]
            log.info("image %s: fetching the files of its access profile (%d bytes)", record.id[:12], self.bytes)
        except Exception as e:  # noqa: BLE001 - only a head start: the mount fetches what is missing
            log.debug("image %s: no early fetch of its profile: %s", record.id[:12], e)

    def _started(self) -> tuple[Source, ThreadPoolExecutor]:
        """The source and the pool, opened on first use (call with the lock held)."""
        if self._source is None:
            self._source = self._open_source()
            self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="imagefs-prioritized")
        assert self._pool is not None
        return self._source, self._pool

    def finish(self) -> None:
        """Wait for what was started, then let go of the caches and the source."""
        with self._lock:
            jobs, pool, source, caches = self._jobs, self._pool, self._source, self._caches
            self._jobs, self._pool, self._source, self._caches = [], None, None, []
        for job in jobs:
            try:
                job.result()
            except Exception as e:  # noqa: BLE001 - see layer()
                log.debug("early fetch of prioritized files: %s", e)
        if pool is not None:
            pool.shutdown()
        for cache in caches:
            cache.close()
        if source is not None:
            source.close()
        if jobs:
            log.info("prioritized files fetched")


def profile_ranges(store: Store, record: ImageRecord, paths: list[str]) -> list[tuple[Layer, LayerIndex, int, int]]:
    """(layer, its index, compressed start, end) of each of *paths* (an access profile) that a
    remote layer serves, in profile order, as the mount's read-ahead on opening it would fetch
    (LayerReader.readahead_extent); which layer serves a path is the union's answer
    (profile_points.profiled_files). Layers held whole are left out, and so is an image with a
    layer lacking a gzip or zstd index of its own (an eStargz TOC: `layer` handles those)."""
    from imagefs.layerread import LayerReader
    from imagefs.profile_points import profiled_files

    layers = record.image.layers
    indexes = [_published_index(store, layer) for layer in layers]
    if any(index is None for index in indexes):
        return []
    readers: dict[int, LayerReader] = {}
    ranges = []
    for position, offset, size in profiled_files(indexes, paths):
        layer, index = layers[position], indexes[position]
        if index.compression == "none" or store.has_blob(layer.digest):
            continue
        reader = readers.get(position)
        if reader is None:
            reader = readers[position] = LayerReader(index, _no_fetch, fetch_index=_no_fetch)
        start, end = reader.readahead_extent(offset, size)
        ranges.append((layer, index, start, end))
    return ranges


def _published_index(store: Store, layer: Layer) -> LayerIndex | None:
    """The metadata of *layer*'s index as the pull left it (its windows are not needed here)."""
    if layer.toc_digest and store.has_toc(layer.digest):
        return None
    try:
        if store.has_full_index(layer.digest):   # its metadata part only, not its windows
            with open(store.index_path(layer.digest), "rb") as f:
                head = f.read(20)
                return LayerIndex.from_meta(head + f.read(LayerIndex.meta_length(head, layer.digest) - 20),
                                            layer.digest)
        meta, _remote = store.read_index_meta(layer.digest)
        return LayerIndex.from_meta(meta, layer.digest)
    except (ImagefsError, OSError, ValueError):
        return None


def _no_fetch(start: int, length: int) -> bytes:
    raise AssertionError("profile_ranges reads nothing")
