"""Fetch an eStargz image's prioritized files while the rest of its start goes on.

An eStargz layer puts the files its image's first run reads (its prioritized files) first, before
a `.prefetch.landmark`, so their data is one byte range at the start of the blob, known as soon as
the layer's TOC is. `imagefs run` hands a `PrioritizedFetch` to the pull, which calls `layer` with
each TOC as it arrives: that layer's range is then fetched into the store's chunk cache (PIECE per
request, THREADS at once, in order) while the pull builds the indexes, the mount server starts and
the launcher builds the container; the mount's own prefetcher would start only once the mount is
up. The two processes share the cache (imagefs/chunkcache.py locks what each is fetching), so
nothing is fetched twice and a read of a chunk being fetched here waits for it.

Concurrency: `layer` may be called from several threads (the pull's, one per layer); `finish`
once, at the end. Failures are logged and left to the mount, whose reads fetch what is missing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from imagefs.chunkcache import ChunkCache
from imagefs.index import DEFAULT_CHUNK_SIZE
from stores.model import Layer
from stores.source import Source
from stores.store import Store

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
                if self._source is None:
                    self._source = self._open_source()
                    self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="imagefs-prioritized")
                source, pool = self._source, self._pool
                assert pool is not None
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
