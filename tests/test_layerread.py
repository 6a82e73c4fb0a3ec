"""LayerReader: random-access reads of the uncompressed tar through the index, compared byte for
byte with the tar itself; its cache, its threads, and its handling of bad data."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import pytest

from imagefs.entry import EntryType
from imagefs.errors import InputError, RuntimeFailure
from imagefs.index import LayerIndex
from imagefs.layerread import GZIP_PIECE, LayerReader, verify_chunk
from tests.test_index import KINDS, big_tar, build, compress

SPAN = 64 << 10


@pytest.fixture(scope="module")
def tar() -> bytes:
    return big_tar(random.Random(21), 5 << 20)


class Blob:
    """fetch() over a blob in memory, counting calls and bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.calls = 0
        self.bytes = 0
        self._lock = threading.Lock()

    def fetch(self, start: int, length: int) -> bytes:
        assert 0 <= start and start + length <= len(self.data), "fetch past the end of the blob"
        with self._lock:
            self.calls += 1
            self.bytes += length
        return self.data[start:start + length]


def reader_for(tar: bytes, kind: str, **kw) -> tuple[LayerReader, Blob, LayerIndex]:
    blob, compression = compress(tar, kind)
    index = build(blob, compression, span=SPAN)
    index = LayerIndex.from_bytes(index.to_bytes(), index.digest)  # read through what the store keeps
    source = Blob(blob)
    return LayerReader(index, source.fetch, **kw), source, index


@pytest.mark.parametrize("kind", KINDS)
def test_random_reads_match_the_tar(tar: bytes, kind: str) -> None:
    reader, _, index = reader_for(tar, kind, cache_bytes=1 << 20)
    if kind.startswith("gzip"):
        assert len(index.points) > 40 and any(p.bits for p in index.points)
    rng = random.Random(kind)
    for _ in range(400):
        off = rng.randrange(len(tar))
        n = rng.choice([1, 100, 4096, 131072, 700_000])
        assert reader.read(off, n) == tar[off:off + n], (off, n)
    for off, n in ((0, len(tar)), (len(tar) - 5, 100), (len(tar), 10), (len(tar) + 99, 10), (7, 0)):
        assert reader.read(off, n) == tar[off:off + n]
    for p in index.points[1:6]:  # exactly at and just around seek points
        for off in (p.uoffset - 1, p.uoffset, p.uoffset + 1):
            assert reader.read(off, 3) == tar[off:off + 3]
    with pytest.raises(ValueError):
        reader.read(-1, 5)
    reader.close()


@pytest.mark.parametrize("kind", ["gzip", "gzip-multi", "zstd", "zstd-multi"])
def test_sequential_reads_decode_each_piece_once(tar: bytes, kind: str) -> None:
    reader, source, index = reader_for(tar, kind)
    out = [reader.read(off, 128 << 10) for off in range(0, len(tar), 128 << 10)]
    assert b"".join(out) == tar
    piece = GZIP_PIECE if kind.startswith("gzip") else SPAN
    assert reader.decoded == sum(-(-(b - a) // piece) for a, b in zip(
        [p.uoffset for p in index.points], [p.uoffset for p in index.points[1:]] + [len(tar)]))
    assert source.bytes <= len(source.data) + 2 * len(index.points)  # each compressed byte once


def test_gzip_read_fetches_only_as_far_as_it_needs(tar: bytes) -> None:
    """A small read just past a seek point fetches the compressed bytes up to it (to a chunk end),
    not its whole region: what makes a small file cheap over the network."""
    blob, compression = compress(tar, "gzip")
    index = build(blob, compression, span=2 << 20, chunk_size=16 << 10)
    source = Blob(blob)
    reader = LayerReader(index, source.fetch)
    p, nxt = index.points[1], index.points[2]
    off = p.uoffset + 1000
    assert reader.read(off, 100) == tar[off:off + 100]
    assert 0 < source.bytes < (nxt.coffset - p.coffset) / 4
    off = p.uoffset + 900_000  # further on: the parked cursor continues (its fetches growing, as a
    assert reader.read(off, 100) == tar[off:off + 100]  # sequential reader's would), within its region
    assert source.bytes <= nxt.coffset - p.coffset + 1
    reader.close()


def test_zstd_single_frame_read_from_the_start(tar: bytes) -> None:
    reader, source, index = reader_for(tar, "zstd", cache_bytes=0)
    assert len(index.points) == 1
    off = len(tar) - 3 * SPAN
    assert reader.read(off, 10) == tar[off:off + 10]
    assert source.bytes > len(source.data) * 0.9  # the whole stream up to there was decoded
    assert reader.read(off + SPAN, 10) == tar[off + SPAN:off + SPAN + 10]  # the parked cursor goes on
    assert source.bytes <= len(source.data)
    assert reader.read(off, 10) == tar[off:off + 10]  # behind the cursor, nothing cached: from 0
    assert source.bytes > len(source.data) * 1.8


@pytest.mark.parametrize("kind", ["gzip", "zstd-multi"])
def test_cache_is_bounded(tar: bytes, kind: str) -> None:
    reader, _, _ = reader_for(tar, kind, cache_bytes=300_000)
    rng = random.Random(5)
    for _ in range(100):
        off = rng.randrange(len(tar))
        assert reader.read(off, 5000) == tar[off:off + 5000]
        assert 0 < reader.cached_bytes <= 300_000
    big, _, _ = reader_for(tar, kind)
    for _ in range(100):
        big.read(rng.randrange(len(tar)), 5000)
    assert big.cached_bytes > 300_000  # the bound above is what kept it small


@pytest.mark.parametrize("kind", ["gzip", "zstd", "zstd-multi", "none"])
def test_concurrent_readers(tar: bytes, kind: str) -> None:
    reader, _, _ = reader_for(tar, kind, cache_bytes=2 << 20)
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            start.wait()
            for _ in range(60):
                off = rng.randrange(len(tar))
                n = rng.choice([4096, 131072, 300_000])
                assert reader.read(off, n) == tar[off:off + n]
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_one_span_decoded_once_under_contention(tar: bytes) -> None:
    gate = threading.Event()
    reader, source, _ = reader_for(tar, "gzip")
    plain_fetch = source.fetch

    def slow_fetch(start: int, length: int) -> bytes:
        gate.wait()
        return plain_fetch(start, length)

    reader._fetch = slow_fetch  # type: ignore[assignment]  # hold the first decoder at its fetch
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(reader.read(1000, 100))) for _ in range(6)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert results == [tar[1000:1100]] * 6 and reader.decoded == 1


def test_read_entry_clamps(tar: bytes) -> None:
    reader, _, index = reader_for(tar, "gzip")
    files = [e for e in index.entries if e.type == EntryType.FILE and e.size > 10]
    assert files
    for e in files[:20]:
        data = tar[e.offset:e.offset + e.size]
        assert reader.read_entry(e, 0, e.size + 1000) == data
        assert reader.read_entry(e, e.size - 3, 100) == data[-3:]
        assert reader.read_entry(e, e.size, 10) == b"" and reader.read_entry(e, 5, 0) == b""
        assert reader.read_entry(e, 7, 3) == data[7:10]


def test_verify_chunk(tar: bytes) -> None:
    blob, compression = compress(tar, "gzip")
    index = build(blob, compression, chunk_size=100_000)
    n = len(index.chunk_digests)
    chunks = [blob[i * 100_000:(i + 1) * 100_000] for i in range(n)]
    assert all(verify_chunk(index, i, c) for i, c in enumerate(chunks))
    assert len(chunks[-1]) < 100_000
    flipped = bytearray(chunks[3])
    flipped[500] ^= 4
    assert not verify_chunk(index, 3, bytes(flipped))
    assert not verify_chunk(index, 3, chunks[3][:-1])
    assert not verify_chunk(index, 3, chunks[4])
    assert not verify_chunk(index, n, b"") and not verify_chunk(index, -1, chunks[0])


def test_windows_fetched_by_range_only_when_used(tar: bytes) -> None:
    blob, compression = compress(tar, "gzip")
    serialised = build(blob, compression, span=SPAN).to_bytes()
    head = LayerIndex.meta_length(serialised[:20])
    meta = LayerIndex.from_meta(serialised[:head], "sha256:" + __import__("hashlib").sha256(blob).hexdigest())
    ranges: list[tuple[int, int]] = []

    def fetch_index(start: int, length: int) -> bytes:
        ranges.append((start, length))
        return serialised[start:start + length]

    with pytest.raises(ValueError):
        LayerReader(meta, Blob(blob).fetch)
    reader = LayerReader(meta, Blob(blob).fetch, fetch_index=fetch_index)
    off = meta.points[10].uoffset + 5
    assert reader.read(off, 1000) == tar[off:off + 1000]
    assert ranges == [meta.window_range(10)]


def _reader(tar: bytes, kind: str, fetch: Callable[[Blob], Callable[[int, int], bytes]]) -> LayerReader:
    blob, compression = compress(tar, kind)
    index = build(blob, compression, span=SPAN)
    return LayerReader(index, fetch(Blob(blob)))


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_bad_compressed_data_is_an_input_error(tar: bytes, kind: str) -> None:
    reader = _reader(tar, kind, lambda b: lambda s, n: b"\xff" * n)
    with pytest.raises(InputError, match="does not (inflate|decompress)"):
        reader.read(len(tar) // 2, 10)


@pytest.mark.parametrize("kind", ["none", "gzip", "zstd"])
def test_short_fetch_is_reported(tar: bytes, kind: str) -> None:
    reader = _reader(tar, kind, lambda b: lambda s, n: b.fetch(s, n)[:-1])
    with pytest.raises(RuntimeFailure, match="short read"):
        reader.read(len(tar) // 2, 10)


def test_concurrent_reads_in_one_region_share_its_cursor(tar: bytes) -> None:
    """The kernel's read-ahead asks for consecutive pieces at once: they must wait for the region's
    one cursor, not each decode the region from its seek point (every compressed byte fetched and
    inflated once)."""
    from concurrent.futures import ThreadPoolExecutor

    blob, compression = compress(tar, "gzip")
    index = build(blob, compression, span=1 << 20)
    source = Blob(blob)
    reader = LayerReader(index, source.fetch)
    offsets = range(0, len(tar), GZIP_PIECE)
    with ThreadPoolExecutor(12) as pool:
        pieces = list(pool.map(lambda off: reader.read(off, GZIP_PIECE), offsets))
    assert b"".join(pieces) == tar
    assert source.bytes <= len(blob) + 2 * len(index.points)
    reader.close()
