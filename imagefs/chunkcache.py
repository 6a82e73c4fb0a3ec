"""A sparse local copy of one remote layer blob, filled chunk by chunk, every chunk verified.

    STORE/chunks/<layer-hex>/data          the blob's bytes at their own offsets (a sparse file)
    STORE/chunks/<layer-hex>/present.<N>   one byte per chunk of N bytes: 1 once that chunk's
                                           data is durable

The presence map is per chunk size: the index a layer is read through decides the chunk size, and
a layer's index can change (re-indexed with profile points, published by another imagefs with
other defaults) while the data stays valid, so one map per size keeps two processes reading one
layer through indexes of different chunk sizes from reading each other's bytes as their own
chunks. (A map of one size read as another would mark absent bytes present: holes served as data.)

A read names a byte range of the compressed blob; the chunks it touches that are missing are
fetched (neighbouring misses coalesced into one range request, at most `max_run` chunks each,
`RUN_BYTES` by default),
checked against the index's per-chunk sha256, written, fsynced, and only then marked present, so a
crash never leaves a chunk marked that was not written. (An eStargz layer has no compressed chunk
digests: its data is checked once decompressed, and `forget_range` drops what failed.) A chunk that fails its digest is fetched
once more and then reported as `ChunkCorrupt`: wrong bytes are never served.

Concurrency: `read` is called from many worker threads. A chunk being fetched by one thread is
waited on by the others (never fetched twice). Several processes may share a cache directory: a
process fetching chunks holds a lock (fcntl) on their bytes of the present file, so another that
wants them waits, then finds them present on disk instead of fetching them again.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import struct
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from imagefs.errors import RuntimeFailure

Fetch = Callable[[int, int], bytes]  # (start, length) -> exactly length bytes of the blob
# The most one range request asks for: big enough that a round trip is small beside the transfer
# on a fast link, small enough that one request does not hold up the reads queued behind it.
RUN_BYTES = 4 << 20


def present_file(directory: Path, chunk_size: int) -> Path:
    """The presence map of the cache in *directory* for chunks of *chunk_size* bytes."""
    return directory / f"present.{chunk_size}"


class ChunkCorrupt(RuntimeFailure):
    """A fetched range did not match the chunk digests in the index (twice)."""


class ChunkCache:
    def __init__(self, directory: Path, size: int, chunk_size: int, digests: Sequence[bytes] | None,
                 fetch: Fetch, *, max_run: int | None = None, what: str = "layer") -> None:
        self.size = size
        self.chunk_size = chunk_size
        self.nchunks = (size + chunk_size - 1) // chunk_size
        if digests is not None and len(digests) != self.nchunks:
            raise ValueError(f"{len(digests)} chunk digests for {self.nchunks} chunks")
        self.digests = digests
        self.max_run = max_run or max(1, RUN_BYTES // chunk_size)
        self.what = what
        self._fetch = fetch
        directory.mkdir(parents=True, exist_ok=True)
        self.data_path = directory / "data"
        self._data = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.present_path = present_file(directory, chunk_size)
        self._present_fd = os.open(self.present_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if os.fstat(self._data).st_size != size:
            os.ftruncate(self._data, size)
        present = os.pread(self._present_fd, self.nchunks, 0)
        self._present = bytearray(present.ljust(self.nchunks, b"\0"))
        self._lock = threading.Lock()
        self._inflight: dict[int, threading.Event] = {}
        self.fetched_bytes = 0  # network bytes this object fetched (for stats and tests)

    def close(self) -> None:
        os.close(self._data)
        os.close(self._present_fd)

    def present_count(self) -> int:
        with self._lock:
            return sum(self._present)

    def complete(self) -> bool:
        return self.present_count() == self.nchunks

    def has(self, first: int, last: int) -> bool:
        """Whether chunks [first, last) are all present."""
        with self._lock:
            return all(self._present[first:last])

    def forget(self) -> None:
        """Mark every chunk missing (the whole layer failed its digest: refetch it all)."""
        self.forget_range(0, self.size)

    def forget_range(self, start: int, end: int) -> None:
        """Mark the chunks holding blob bytes [start, end) missing: they decoded to data that failed
        a digest checked after decompression (eStargz), so they are fetched again."""
        first, last = start // self.chunk_size, min(-(-end // self.chunk_size), self.nchunks)
        if first >= last:
            return
        with self._lock:
            self._present[first:last] = bytes(last - first)
            os.pwrite(self._present_fd, bytes(last - first), first)

    def read(self, start: int, length: int) -> bytes:
        """Bytes [start, start+length) of the blob (clamped to its end), fetching what is missing."""
        end = min(start + length, self.size)
        if start >= end:
            return b""
        self.ensure(start // self.chunk_size, (end - 1) // self.chunk_size + 1)
        data = os.pread(self._data, end - start, start)
        if len(data) != end - start:
            raise RuntimeFailure(self.what, "chunk cache file shorter than the blob")
        return data

    def ensure(self, first: int, last: int) -> None:
        """Make chunks [first, last) present."""
        while True:
            mine: list[int] = []
            waits: list[threading.Event] = []
            with self._lock:
                for c in range(first, last):
                    if self._present[c]:
                        continue
                    event = self._inflight.get(c)
                    if event is None:
                        self._inflight[c] = threading.Event()
                        mine.append(c)
                    else:
                        waits.append(event)
            if mine:
                try:
                    for run in _runs(mine, self.max_run):
                        self._fetch_run(run[0], run[-1] + 1)
                finally:
                    with self._lock:
                        for c in mine:
                            self._inflight.pop(c).set()
            for event in waits:
                event.wait()
            if not waits:
                return
            # Someone else fetched those: loop to check they succeeded (or fetch them ourselves).

    def _fetch_run(self, first: int, last: int) -> None:
        # Another process may be filling the same cache (a launcher fetching an image's profile
        # while its mount server reads): a lock on these chunks' bytes of the present file makes
        # one fetch of each, and what the other process finished meanwhile is taken as it is.
        locked = _lock_range(self._present_fd, first, last - first)
        try:
            on_disk = os.pread(self._present_fd, last - first, first).ljust(last - first, b"\0")
            with self._lock:
                for i, flag in enumerate(on_disk):
                    if flag:
                        self._present[first + i] = 1
            for run in _runs([first + i for i, flag in enumerate(on_disk) if not flag], self.max_run):
                self._fetch_chunks(run[0], run[-1] + 1)
        finally:
            if locked:
                _unlock_range(self._present_fd, first, last - first)

    def _fetch_chunks(self, first: int, last: int) -> None:
        start = first * self.chunk_size
        end = min(last * self.chunk_size, self.size)
        for attempt in (1, 2):
            data = self._fetch(start, end - start)
            with self._lock:
                self.fetched_bytes += len(data)
            if len(data) != end - start:
                raise RuntimeFailure(self.what, f"short range read at {start}: {len(data)} of {end - start} bytes")
            bad = self._bad_chunks(first, data)
            if not bad:
                break
            if attempt == 2:
                raise ChunkCorrupt(self.what, f"chunk {bad[0]} does not match its digest in the index")
        os.pwrite(self._data, data, start)
        os.fdatasync(self._data)
        os.pwrite(self._present_fd, b"\1" * (last - first), first)
        with self._lock:
            for c in range(first, last):
                self._present[c] = 1

    def _bad_chunks(self, first: int, data: bytes) -> list[int]:
        if self.digests is None:
            return []
        bad = []
        view = memoryview(data)
        for i in range(0, len(data), self.chunk_size):
            c = first + i // self.chunk_size
            if hashlib.sha256(view[i:i + self.chunk_size]).digest() != self.digests[c]:
                bad.append(c)
        return bad


# Open-file-description locks, not POSIX record locks: those belong to the whole process, so two
# processes whose threads wait on each other's ranges look deadlocked to the kernel (EDEADLK) when
# each thread only waits; an OFD lock belongs to the open file, and no thread holds one lock while
# it waits for another. struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks).
_FLOCK = struct.Struct("hhqqi4x")


def _lock_range(fd: int, start: int, length: int) -> bool:
    """Wait for, then take, a write lock on [start, start+length) of *fd*; False if the kernel
    refuses one (the fetch then goes ahead unlocked: at worst a chunk is fetched twice)."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, length, 0))
        return True
    except OSError:
        return False


def _unlock_range(fd: int, start: int, length: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, start, length, 0))


def _runs(chunks: list[int], max_run: int) -> list[list[int]]:
    """Split sorted chunk numbers into runs of consecutive numbers, each at most *max_run* long."""
    runs: list[list[int]] = []
    for c in chunks:
        if runs and runs[-1][-1] == c - 1 and len(runs[-1]) < max_run:
            runs[-1].append(c)
        else:
            runs.append([c])
    return runs
