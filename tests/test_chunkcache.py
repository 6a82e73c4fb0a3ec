"""The chunk cache: fetch only what is read, coalesce, never fetch twice, never serve bad bytes."""

from __future__ import annotations

import hashlib
import os
import random
import threading

import pytest

from imagefs.chunkcache import ChunkCache, ChunkCorrupt, present_file
from imagefs.errors import RuntimeFailure

CHUNK = 4096


class Remote:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.calls: list[tuple[int, int]] = []
        self.corrupt_next = 0
        self.lock = threading.Lock()
        self.gate: threading.Event | None = None

    def fetch(self, start: int, length: int) -> bytes:
        with self.lock:
            self.calls.append((start, length))
        if self.gate:
            self.gate.wait(10)
        out = bytearray(self.data[start:start + length])
        if self.corrupt_next:
            self.corrupt_next -= 1
            out[0] ^= 0xFF
        return bytes(out)


def digests(data: bytes, size: int = CHUNK) -> list[bytes]:
    return [hashlib.sha256(data[i:i + size]).digest() for i in range(0, len(data), size)]


@pytest.fixture
def blob():
    return random.Random(7).randbytes(CHUNK * 20 + 123)


def test_reads_fetch_only_touched_chunks_and_coalesce(tmp_path, blob):
    remote = Remote(blob)
    cache = ChunkCache(tmp_path, len(blob), CHUNK, digests(blob), remote.fetch, max_run=4)
    assert cache.read(CHUNK * 2 + 10, 100) == blob[CHUNK * 2 + 10:CHUNK * 2 + 110]
    assert remote.calls == [(CHUNK * 2, CHUNK)]
    assert cache.read(CHUNK, CHUNK * 6) == blob[CHUNK:CHUNK * 7]  # chunk 2 present: runs 1, then 3-6
    assert remote.calls[1:] == [(CHUNK, CHUNK), (CHUNK * 3, CHUNK * 4)]
    assert cache.read(len(blob) - 50, 500) == blob[-50:]  # clamped at the end, short last chunk
    cache.close()
    # a new cache object on the same directory (a new server) reuses what is present
    remote2 = Remote(blob)
    cache2 = ChunkCache(tmp_path, len(blob), CHUNK, digests(blob), remote2.fetch)
    assert cache2.read(CHUNK, CHUNK * 6) == blob[CHUNK:CHUNK * 7]
    assert remote2.calls == []
    cache2.close()


def test_corrupt_range_is_refetched_then_refused(tmp_path, blob):
    remote = Remote(blob)
    cache = ChunkCache(tmp_path, len(blob), CHUNK, digests(blob), remote.fetch)
    remote.corrupt_next = 1
    assert cache.read(0, 10) == blob[:10]
    assert len(remote.calls) == 2
    remote.corrupt_next = 2
    with pytest.raises(ChunkCorrupt):
        cache.read(CHUNK * 5, 10)
    assert cache.present_count() == 1  # the bad chunk was not marked present
    assert cache.read(CHUNK * 5, 10) == blob[CHUNK * 5:CHUNK * 5 + 10]  # and recovers later
    cache.close()


def test_short_fetch_is_an_error(tmp_path, blob):
    cache = ChunkCache(tmp_path, len(blob), CHUNK, None, lambda s, n: blob[s:s + n - 1])
    with pytest.raises(RuntimeFailure, match="short range read"):
        cache.read(0, 1)
    cache.close()


def test_concurrent_readers_fetch_a_chunk_once(tmp_path, blob):
    remote = Remote(blob)
    remote.gate = threading.Event()
    cache = ChunkCache(tmp_path, len(blob), CHUNK, digests(blob), remote.fetch)
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(cache.read(CHUNK * 3, CHUNK))) for _ in range(8)]
    for t in threads:
        t.start()
    # every thread is either fetching or waiting on the fetcher's event before the gate opens
    from tests.support.images import wait_until
    wait_until(lambda: len(remote.calls) == 1 and len(cache._inflight) == 1, what="one fetch in flight")
    remote.gate.set()
    for t in threads:
        t.join(10)
    assert results == [blob[CHUNK * 3:CHUNK * 4]] * 8
    assert remote.calls == [(CHUNK * 3, CHUNK)]
    cache.close()


def test_failed_fetch_leaves_chunk_missing(tmp_path, blob):
    def broken(start, length):
        raise RuntimeFailure("registry", "down")
    cache = ChunkCache(tmp_path, len(blob), CHUNK, digests(blob), broken)
    with pytest.raises(RuntimeFailure):
        cache.read(0, 10)
    assert cache.present_count() == 0
    assert os.path.getsize(tmp_path / "data") == len(blob)
    cache.close()


def test_a_chunk_another_process_is_fetching_is_waited_for_not_fetched_again(tmp_path, blob):
    """A launcher prefetching into the store's cache and its mount server reading the same chunks
    are two processes: the second waits on the first's lock, then finds the chunks on disk."""
    from tests.support.images import wait_until

    started_r, started_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the other process: its fetch holds chunks 2-4 until the parent says go
        try:
            def slow(start: int, length: int) -> bytes:
                os.write(started_w, b"x")
                os.read(go_r, 1)
                return blob[start:start + length]
            ChunkCache(tmp_path / "c", len(blob), CHUNK, digests(blob), slow).ensure(2, 5)
            os._exit(0)
        except BaseException:
            os._exit(1)
    try:
        assert os.read(started_r, 1) == b"x"
        remote = Remote(blob)
        cache = ChunkCache(tmp_path / "c", len(blob), CHUNK, digests(blob), remote.fetch)
        done = threading.Event()
        reader = threading.Thread(target=lambda: (cache.ensure(3, 6), done.set()))
        reader.start()

        present = os.stat(cache.present_path).st_ino

        def waiting_on_a_lock() -> bool:  # /proc/locks lists a blocked request as "-> ..."
            with open("/proc/locks") as locks:
                return any("->" in line and f":{present} " in line for line in locks)
        wait_until(waiting_on_a_lock, 10, "the reader to wait on the other process's lock")
        assert not done.is_set()
        os.write(go_w, b"g")
        reader.join(10)
        assert done.is_set()
        assert remote.calls == [(5 * CHUNK, CHUNK)]  # only the chunk the other process did not fetch
        assert cache.read(2 * CHUNK, 4 * CHUNK) == blob[2 * CHUNK:6 * CHUNK]
    finally:
        os.write(go_w, b"g")
        _, status = os.waitpid(pid, 0)
        for fd in (started_r, started_w, go_r, go_w):
            os.close(fd)
    assert status == 0


def test_a_cache_read_through_another_chunk_size_trusts_none_of_the_first_ones_chunks(tmp_path):
    """A layer re-indexed with another chunk size (a profile's seek points, another publisher's
    defaults) keeps its cache directory: what the first size marked present must not be taken for
    chunks of the second (those bytes may be holes), and neither size's map is disturbed."""
    blob = random.Random(7).randbytes(10 * CHUNK)
    big = ChunkCache(tmp_path / "c", len(blob), 2 * CHUNK, digests(blob, 2 * CHUNK), Remote(blob).fetch)
    big.ensure(1, 2)   # bytes [2 CHUNK, 4 CHUNK): the second chunk of the big size only
    small_remote = Remote(blob)
    small = ChunkCache(tmp_path / "c", len(blob), CHUNK, digests(blob), small_remote.fetch)
    assert not small.has(0, small.nchunks)
    assert small.read(0, 2 * CHUNK) == blob[:2 * CHUNK]   # fetched: not holes from the big map's "1"
    assert small_remote.calls
    assert big.has(1, 2) and not big.has(0, 1)
    assert present_file(tmp_path / "c", CHUNK) != present_file(tmp_path / "c", 2 * CHUNK)
    big.close()
    small.close()
