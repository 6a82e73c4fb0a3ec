"""Background prefetch and access profiles: make a lazily mounted image fully local over time,
fetching first what tasks read first.

The mount server runs one `Prefetcher` thread after it answers. It fetches missing chunks of each
remote layer through the same chunk caches the read path uses (so a chunk is never fetched twice,
and demand reads are served meanwhile by their own requests), one run of chunks at a time:

    none     nothing
    profile  the chunks holding the files in the image's access profile, then stop
    all      (default) the profile first, then every other missing chunk, at low priority: only
             once tasks have paused reading for QUIET_SECONDS, so it never competes with a start

When a layer's cache is complete its whole sha256 is checked against the layer digest and the
data is linked into STORE/blobs/sha256/, so later mounts read it as a local blob: the image then
survives the loss of its registry.

An access profile (STORE/images/<id>/profile.json, the paths in first-read order; the format is
stores/store.py's) is recorded by `ProfileRecorder` while the first tasks run (as Slacker and
stargz's prioritised files do), and written when recording ends; the next mount fetches them first.
`imagefs index --push` publishes it beside the image with the layer indexes, and a pull on any other
machine that takes those indexes takes the profile too (imagefs/publish.py).

Concurrency: the prefetcher is one plain thread; it stops between runs when `stop` is set. The
recorder is called from read worker threads and guards its state with a lock.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

from imagefs.chunkcache import ChunkCache
from imagefs.errors import ImagefsError
from imagefs.union import Inode
from imagefs.view import ImageView
from stores.fsutil import fsync_dir
from stores.store import Store

log = logging.getLogger(__name__)

PrefetchMode = Literal["none", "profile", "all"]
PREFETCH_MODES = ("none", "profile", "all")
RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)  # after a failed fetch; waits on `stop`, so exit is prompt
# The "all" phase is low priority: it waits until tasks have not read for this long, so a start-up
# burst of reads has the link to itself (measured: sharing it made cold starts 2x slower).
QUIET_SECONDS = 1.0
PROFILE_THREADS = 4  # range requests in flight while the profile is fetched
PROFILE_PIECE = 256 << 10  # bytes per request then


def profile_path(store: Store, image_id: str) -> Path:
    return store.profile_path(image_id)


def load_profile(store: Store, image_id: str) -> list[bytes]:
    """The image's profile as tree paths; empty when it has none or a damaged one (the next mount
    then records a new one: a profile only orders prefetching, it is never needed)."""
    try:
        paths = store.read_profile(image_id)
    except ImagefsError as e:
        log.warning("%s: ignored: %s", e.what, e.why)
        return []
    return [os.fsencode(p) for p in paths or ()]


class ProfileRecorder:
    """Records which files are read, in first-read order, for *seconds* after the mount starts."""

    def __init__(self, store: Store, view: ImageView, seconds: float = 30.0, limit: int = 10_000) -> None:
        self._store = store
        self._view = view
        self._until = time.monotonic() + seconds
        self._limit = limit
        self._lock = threading.Lock()
        self._seen: dict[Inode, None] = {}
        self._saved = False

    def read(self, ino: Inode) -> None:
        if self._saved or ino in self._seen:
            return
        with self._lock:
            over = time.monotonic() > self._until or len(self._seen) >= self._limit
            if not over:
                self._seen.setdefault(ino, None)
        if over:
            self.save()

    def save(self) -> None:
        """Write the profile (once); paths are the first name of each inode read."""
        with self._lock:
            if self._saved or not self._seen:
                return
            self._saved = True
            wanted = set(self._seen)
        names: dict[Inode, bytes] = {}
        for path, ino in self._view.tree.walk():
            if ino in wanted and ino not in names:
                names[ino] = path
        paths = [os.fsdecode(names[i]) for i in self._seen if i in names]
        self._store.put_profile(self._view.record.id, paths)


class Prefetcher:
    def __init__(self, store: Store, view: ImageView, mode: PrefetchMode = "all", *,
                 stop: threading.Event | None = None, max_run: int | None = None,
                 quiet: float = QUIET_SECONDS) -> None:
        if mode not in PREFETCH_MODES:
            raise ValueError(mode)
        self.store = store
        self.view = view
        self.mode = mode
        self.stop = stop or threading.Event()
        self.max_run = max_run  # chunks per request; None: the chunk cache's own (RUN_BYTES)
        self.quiet = quiet
        self.done = threading.Event()  # set when the prefetch finished (or gave up because of stop)

    def run(self) -> None:
        try:
            if self.mode != "none":
                self._prefetch_paths(load_profile(self.store, self.view.record.id))
                if self.mode == "all":
                    for position in range(len(self.view.data)):
                        self._fetch_layer(position)
        except Exception:  # a bug here must not take the mount down: reads still work
            log.exception("prefetch failed")
        finally:
            self.done.set()

    def _prefetch_paths(self, paths: Iterable[bytes]) -> None:
        """Fetch the profile's files, several requests at once (a profile is what a start reads
        one file after another: fetched in parallel it is one transfer, not a chain of round
        trips), in profile order; before any of their chunks, the windows their reads may restart
        from: every region a profiled file spans, not only its first (a task maps a big binary
        and touches its pages out of order, and each jump into a new region waited a round trip
        for that region's window)."""
        windows: list[Callable[[], object]] = []
        jobs: list[Callable[[], object]] = []
        wanted: set[tuple[int, int]] = set()
        for path in paths:
            ino = self.view.tree.resolve(path)
            location = self.view.tree.node(ino).location if ino is not None else None
            if location is None or location.size == 0:
                continue
            cache = self.view.data[location.layer].cache
            if cache is None:
                continue
            reader = self.view.readers[location.layer]
            for restart in reader.restarts(location.offset, location.size):
                if (location.layer, restart) not in wanted and reader.needs_window(restart):
                    wanted.add((location.layer, restart))
                    windows.append(lambda r=reader, o=restart: r.window_at(o))
            start, end = reader.readahead_extent(location.offset, location.size)
            size = cache.chunk_size
            step = max(1, PROFILE_PIECE // size)  # small pieces in order: a file's start comes first
            for first in range(start // size, (end - 1) // size + 1, step):
                jobs.append(lambda c=cache, f=first, l=min(first + step, (end - 1) // size + 1): c.ensure(f, l))
        if not jobs:
            return
        with ThreadPoolExecutor(PROFILE_THREADS, thread_name_prefix="imagefs-profile") as pool:
            # Every window before any chunk: a file's chunks present then mean its windows are
            # here too, so it reads without the registry. (`imagefs run` fetches the chunks
            # meanwhile: imagefs/prioritized.py.)
            for phase in (windows, jobs):
                for future in [pool.submit(self._retrying, job) for job in phase]:
                    future.result()

    def _fetch_layer(self, position: int) -> None:
        data = self.view.data[position]
        cache = data.cache
        if cache is None:
            return
        digest = data.layer.digest
        if not (self.store.has_full_index(digest) or self.store.has_toc(digest)):  # every window, offline
            self._yield_to_reads()
            from imagefs.publish import fetch_full_index  # here: not on the mount's start-up path

            self._retrying(lambda: fetch_full_index(self.store, self.view.source(), data.layer))
        step = self.max_run or cache.max_run
        for first in range(0, cache.nchunks, step):
            self._yield_to_reads()
            if self.stop.is_set():
                return
            self._ensure(cache, first, min(first + step, cache.nchunks))
        if cache.complete() and not self.stop.is_set():
            self._promote(data.layer.digest, cache)

    def _yield_to_reads(self) -> None:
        while not self.stop.is_set():
            idle = time.monotonic() - self.view.last_read
            if idle >= self.quiet:
                return
            self.stop.wait(self.quiet - idle)

    def _ensure(self, cache: ChunkCache, first: int, last: int) -> None:
        self._retrying(lambda: cache.ensure(first, last))

    def _retrying(self, fetch: Callable[[], object]) -> None:
        for delay in (*RETRY_DELAYS, None):
            if self.stop.is_set():
                return
            try:
                fetch()
                return
            except ImagefsError as e:
                if delay is None:
                    log.warning("prefetch gave up on %s: %s", e.what, e.why)
                    return
                self.stop.wait(delay)  # the registry may come back; stop ends the wait at once

    def _promote(self, digest: str, cache: ChunkCache) -> None:
        """All chunks are here: check the whole layer and keep it as a local blob."""
        blob = self.store.blob_path(digest)
        if blob.exists():
            return
        h = hashlib.sha256()
        with open(cache.data_path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        actual = "sha256:" + h.hexdigest()
        if actual != digest:
            log.error("layer %s: complete chunk cache has digest %s; discarding it", digest, actual)
            cache.forget()
            return
        with self.store.blob_lock(digest):
            if not blob.exists():
                blob.parent.mkdir(parents=True, exist_ok=True)
                tmp = blob.with_name(blob.name + ".link")
                tmp.unlink(missing_ok=True)
                os.link(cache.data_path, tmp)
                os.rename(tmp, blob)
                fsync_dir(blob.parent)
        log.info("layer %s is now local", digest)
