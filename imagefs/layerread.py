"""Random-access reads of a layer's uncompressed tar stream, through its index.

`LayerReader.read(uoffset, length)` returns bytes of the *uncompressed* tar; `fetch(start, length)`
supplies bytes of the *compressed* blob (a local file, a verified chunk cache, HTTP range reads:
the caller decides, and verifies with `verify_chunk`).

- none: uncompressed offsets are blob offsets; reads go straight to fetch.
- gzip and zstd: the region between two seek points is decoded sequentially by a cursor (an
  `zran.Inflater` restarted at the seek point with its window, or a zstd stream reader that
  continues across frames) and cached in pieces (`GZIP_PIECE`, or `index.span` for zstd). A gzip
  cursor fetches compressed bytes only as far as the piece it must produce (estimated from the
  region's compression ratio, topped up when short), so a small file costs the bytes from its seek
  point to its end, not the whole region. An idle cursor is kept to continue from where it
  stopped, so sequential reads decompress once; a read behind every cursor restarts from the
  region's seek point. A single-frame zstd layer has one region: it is read from its beginning.
- eStargz (an index with `region_digests`, imagefs/estargz.py): each region is one chunk in a gzip
  member of its own; it is decoded whole and checked against its digest before any of it is
  cached or returned. Data that fails is dropped (`forget`) and fetched once more, then refused.

Concurrency: every method is thread-safe (worker threads call `read` at once). One lock guards the
cache, the in-flight table and the idle cursors; decompression and fetches run outside it (libz
and zstd release the GIL), and a piece being decoded by one thread is waited for by the others,
never decoded twice at once. The cache holds at most `cache_bytes` of decompressed data (a piece
larger than that is returned without being cached).
"""

from __future__ import annotations

import bisect
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable

import zstandard

from imagefs import zran
from imagefs.entry import Entry
from imagefs.errors import InputError, RuntimeFailure
from imagefs.index import LayerIndex

Fetch = Callable[[int, int], bytes]  # (start, length) -> exactly length bytes
_Key = tuple[int, int]  # (seek point, piece within its region)

DEFAULT_CACHE_BYTES = 64 << 20
# Gzip pieces: the unit of caching and of the compressed bytes fetched beyond what a read needs.
# Small, because a lazy read of a small file pays for every byte fetched past its end.
GZIP_PIECE = 128 << 10
_MIN_FETCH = 32 << 10  # a gzip cursor's smallest top-up fetch
_MAX_WINDOWS = 256  # range-fetched windows kept per layer (32 KiB each at most)


def verify_chunk(index: LayerIndex, chunk_no: int, data: bytes) -> bool:
    """Whether *data* is chunk *chunk_no* of the layer blob (length and sha256 both right)."""
    if not 0 <= chunk_no < len(index.chunk_digests):
        return False
    expected = min(index.chunk_size, index.compressed_size - chunk_no * index.chunk_size)
    return len(data) == expected and hashlib.sha256(data).digest() == index.chunk_digests[chunk_no]


class _FetchStream:
    """A read-only file over fetch(), from *start* to *end* of the blob, for zstd's stream_reader."""

    def __init__(self, fetch: Fetch, start: int, end: int, what: str) -> None:
        self._fetch, self._pos, self._end, self._what = fetch, start, end, what

    def read(self, n: int = -1) -> bytes:
        n = self._end - self._pos if n < 0 else min(n, self._end - self._pos)
        if n <= 0:
            return b""
        data = self._fetch(self._pos, n)
        if len(data) != n:
            raise RuntimeFailure(self._what, f"short read at {self._pos}: {len(data)} of {n} bytes")
        self._pos += n
        return data


class _ZstdCursor:
    """A zstd decompressor positioned at uncompressed offset `pos` inside region `region`."""

    def __init__(self, fetch: Fetch, index: LayerIndex, region: int, what: str) -> None:
        point = index.points[region]
        self.region, self.pos = region, point.uoffset
        # Regions end at frame starts: never fetch (read ahead) past the region's last frame.
        end = index.points[region + 1].coffset if region + 1 < len(index.points) else index.compressed_size
        src = _FetchStream(fetch, point.coffset, end, what)
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            src, read_size=index.chunk_size, read_across_frames=True)

    def read_exact(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            data = self._reader.read(n - got)
            if not data:
                raise zstandard.ZstdError(f"data ended {n - got} bytes early")
            parts.append(data)
            got += len(data)
        self.pos += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        self._reader.close()


def _region(index: LayerIndex, i: int) -> tuple[int, int, float]:
    """Region *i*'s compressed end (the next seek point's coffset, or the blob's end), its
    uncompressed end, and its compression ratio (compressed bytes per output byte)."""
    point = index.points[i]
    if i + 1 < len(index.points):
        nxt = index.points[i + 1]
        cend, uend = nxt.coffset, nxt.uoffset
    else:
        cend, uend = index.compressed_size, index.uncompressed_size
    return cend, uend, (cend - point.coffset) / max(uend - point.uoffset, 1)


class _GzipCursor:
    """An inflater positioned at uncompressed offset `pos` inside region `region`, fetching the
    region's compressed bytes as it goes (see the module docstring)."""

    def __init__(self, fetch: Fetch, index: LayerIndex, region: int, window: bytes, what: str) -> None:
        point = index.points[region]
        self.region, self.pos = region, point.uoffset
        self._fetch, self._what = fetch, what
        self._cpos = point.coffset - zran.lead_bytes(point.bits)
        self._cend, _, self._ratio = _region(index, region)
        self._chunk = index.chunk_size
        self._grow = 1
        self._inflater = zran.Inflater(bits=point.bits, window=window)

    def read_exact(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            data = self._inflater.read(n - got)
            if data:
                parts.append(data)
                got += len(data)
            elif self._inflater.needs_input:
                self._top_up(n - got)
        self.pos += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _top_up(self, wanted: int) -> None:
        """Fetch the compressed bytes that *wanted* more output probably needs, to a chunk end."""
        if self._cpos >= self._cend:
            raise zran.ZlibError("gzip: compressed data ended early")
        # Each top-up of one cursor is twice the last (to the region's end at most): a cursor
        # that keeps going is a sequential reader, better served by few large fetches.
        guess = self._cpos + max(int(wanted * self._ratio * 1.1), _MIN_FETCH) * self._grow
        self._grow = min(self._grow * 2, 32)
        stop = min(-(-guess // self._chunk) * self._chunk, self._cend)
        data = self._fetch(self._cpos, stop - self._cpos)
        if len(data) != stop - self._cpos:
            raise RuntimeFailure(self._what, f"short read at {self._cpos}")
        self._inflater.feed(data)
        self._cpos = stop

    def close(self) -> None:
        self._inflater.close()


_Cursor = _ZstdCursor | _GzipCursor


class LayerReader:
    """Reads of one layer's uncompressed tar stream (see the module docstring)."""

    def __init__(self, index: LayerIndex, fetch: Fetch, *, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 fetch_index: Fetch | None = None, max_cursors: int = 8,
                 forget: Callable[[int, int], None] | None = None) -> None:
        """*fetch_index* range-reads the serialised index; needed only when *index* came from
        `LayerIndex.from_meta` (windows not in memory) and the layer is gzip. *forget(start, end)*
        drops compressed bytes that decoded to data failing its region digest (eStargz), so they
        are fetched again; without it such a region fails at once."""
        if index.windows is None and fetch_index is None and index.compression == "gzip":
            raise ValueError("index has no windows section: pass fetch_index")
        self.index = index
        self.cache_bytes = cache_bytes
        self.decoded = 0  # pieces decompressed so far (for stats and tests)
        self._fetch = fetch
        self._fetch_index = fetch_index
        self._forget = forget
        self._what = f"layer {index.digest}"
        self._starts = [p.uoffset for p in index.points]
        self._piece = GZIP_PIECE if index.compression == "gzip" else index.span
        self._lock = threading.Lock()
        self._cache: OrderedDict[_Key, bytes] = OrderedDict()
        self._cached = 0
        self._inflight: dict[_Key, threading.Event] = {}
        self._cursors: list[_Cursor] = []  # idle ones, oldest first
        self._windows: OrderedDict[int, bytes] = OrderedDict()  # range-fetched windows, by region
        self._region_locks: dict[int, threading.Lock] = {}
        self._window_locks: dict[int, threading.Lock] = {}  # one window fetch at a time per region
        self._max_cursors = max_cursors

    @property
    def cached_bytes(self) -> int:
        """Decompressed bytes held in the cache now (never more than `cache_bytes`)."""
        with self._lock:
            return self._cached

    def close(self) -> None:
        with self._lock:
            cursors, self._cursors = self._cursors, []
            self._cache.clear()
            self._cached = 0
        for c in cursors:
            c.close()

    def read_entry(self, entry: Entry, offset: int, length: int) -> bytes:
        """Up to *length* bytes of *entry*'s data from *offset* (short only at its end)."""
        if offset >= entry.size or length <= 0:
            return b""
        return self.read(entry.offset + offset, min(length, entry.size - offset))

    def read(self, uoffset: int, length: int) -> bytes:
        """Bytes [uoffset, uoffset+length) of the uncompressed tar stream, clamped to its end."""
        if uoffset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(uoffset + length, self.index.uncompressed_size)
        if uoffset >= end:
            return b""
        if self.index.compression == "none":
            data = self._fetch(uoffset, end - uoffset)
            if len(data) != end - uoffset:
                raise RuntimeFailure(self._what, f"short read at {uoffset}")
            return data
        parts: list[memoryview] = []
        pos = uoffset
        while pos < end:
            key, start, stop = self._piece_at(pos)
            data = self._get(key, start, stop)
            take = min(end, stop) - pos
            parts.append(memoryview(data)[pos - start:pos - start + take])
            pos += take
        return parts[0].tobytes() if len(parts) == 1 else b"".join(parts)

    def compressed_extent(self, uoffset: int, length: int) -> tuple[int, int]:
        """The compressed byte range [start, end) that reading [uoffset, uoffset+length) needs:
        what a prefetch of that data must fetch."""
        end = min(uoffset + max(length, 1), self.index.uncompressed_size)
        if self.index.compression == "none" or not self._starts:
            return uoffset, max(end, uoffset)
        points = self.index.points
        first = max(bisect.bisect_right(self._starts, uoffset) - 1, 0)
        last = bisect.bisect_right(self._starts, max(end - 1, uoffset)) - 1
        start = points[first].coffset - zran.lead_bytes(points[first].bits)
        stop = points[last + 1].coffset if last + 1 < len(points) else self.index.compressed_size
        return max(start, 0), stop

    def readahead_extent(self, uoffset: int, length: int) -> tuple[int, int]:
        """The compressed range [start, end) a read of [uoffset, uoffset+length) will probably use:
        `compressed_extent`, but ending (for gzip) where the region's compression ratio says the
        data ends rather than at the next seek point, so a small file is not fetched with the
        rest of its region. What to fetch ahead, in parallel, when a file is opened."""
        start, stop = self.compressed_extent(uoffset, length)
        if self.index.compression != "gzip" or not self._starts:
            return start, stop
        end = min(uoffset + max(length, 1), self.index.uncompressed_size)
        i = max(bisect.bisect_right(self._starts, end - 1) - 1, 0)
        point = self.index.points[i]
        _, _, ratio = _region(self.index, i)
        guess = point.coffset + int((end - point.uoffset) * ratio * 1.1) + _MIN_FETCH
        return start, max(min(stop, guess), start + 1)

    # -- pieces -----------------------------------------------------------------------------------

    def _region_end(self, i: int) -> int:
        return self._starts[i + 1] if i + 1 < len(self._starts) else self.index.uncompressed_size

    def _piece_at(self, pos: int) -> tuple[_Key, int, int]:
        """The cache key and uncompressed extent of the piece holding *pos*."""
        i = bisect.bisect_right(self._starts, pos) - 1
        start, stop = self._starts[i], self._region_end(i)
        k = (pos - start) // self._piece
        piece_start = start + k * self._piece
        return (i, k), piece_start, min(piece_start + self._piece, stop)

    def _get(self, key: _Key, start: int, stop: int) -> bytes:
        while True:
            with self._lock:
                data = self._cache.get(key)
                if data is not None:
                    self._cache.move_to_end(key)
                    return data
                event = self._inflight.get(key)
                mine = event is None
                if mine:
                    event = self._inflight[key] = threading.Event()
            assert event is not None
            if not mine:
                event.wait()  # then look again: cached now, or failed (and we try ourselves)
                continue
            try:
                data = self._decode(key, start, stop)
                self._put(key, data)
                return data
            finally:
                with self._lock:
                    del self._inflight[key]
                event.set()

    def _put(self, key: _Key, data: bytes) -> None:
        with self._lock:
            if len(data) > self.cache_bytes:
                return
            old = self._cache.pop(key, None)
            if old is not None:
                self._cached -= len(old)
            self._cache[key] = data
            self._cached += len(data)
            while self._cached > self.cache_bytes:
                _, dropped = self._cache.popitem(last=False)
                self._cached -= len(dropped)

    def _decode(self, key: _Key, start: int, stop: int) -> bytes:
        region = key[0]
        with self._lock:
            region_lock = self._region_locks.setdefault(region, threading.Lock())
        # One decode at a time per region: the kernel's read-ahead asks for the next pieces of a
        # file at once, and each would otherwise start a cursor of its own at the seek point and
        # decode everything before its piece again. Waiting, it finds its piece cached or the
        # cursor parked just before it. (Holders never wait on in-flight events: no deadlock.)
        with region_lock:
            with self._lock:
                data = self._cache.get(key)
            if data is not None:
                return data
            return self._decode_locked(key, start, stop)

    def _decode_locked(self, key: _Key, start: int, stop: int) -> bytes:
        with self._lock:
            self.decoded += 1
        if self.index.region_digests is not None:
            return self._decode_verified(key[0], start, stop)
        region = key[0]
        with self._lock:  # the idle cursor of this region furthest along but not past the piece
            usable = [c for c in self._cursors if c.region == region and c.pos <= start]
            cursor = max(usable, key=lambda c: c.pos, default=None)
            if cursor is not None:
                self._cursors.remove(cursor)
        ok = False
        try:
            if cursor is None:
                cursor = self._new_cursor(region)
            region_start = self._starts[region]
            while cursor.pos < start:  # decode what lies before; cache it, it cost the same
                k = (cursor.pos - region_start) // self._piece
                piece_end = min(region_start + (k + 1) * self._piece, stop)
                self._put((region, k), cursor.read_exact(piece_end - cursor.pos))
            data = cursor.read_exact(stop - start)
            ok = True
        except zstandard.ZstdError as e:
            raise InputError(self._what, f"does not decompress after seek point {region}: {e}") from None
        except zran.ZlibError as e:
            raise InputError(self._what, f"does not inflate after seek point {region}: {e}") from None
        finally:
            if not ok and cursor is not None:
                cursor.close()
        if cursor.pos < self._region_end(region):
            self._park(cursor)
        else:
            cursor.close()
        return data

    def _decode_verified(self, region: int, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of a region with a digest (eStargz): the whole region is decoded and
        checked before any of it is used or cached. Bad data is fetched once more, then refused."""
        region_start, region_end = self._starts[region], self._region_end(region)
        assert self.index.region_digests is not None
        expected = self.index.region_digests[region]
        for attempt in (1, 2):
            cursor = self._new_cursor(region)
            try:
                data = cursor.read_exact(region_end - region_start)
                problem = "" if hashlib.sha256(data).digest() == expected else "does not match its chunkDigest"
            except zran.ZlibError as e:
                problem = f"does not inflate: {e}"
            finally:
                cursor.close()
            if not problem:
                break
            if attempt == 2 or self._forget is None:
                raise InputError(self._what, f"the eStargz chunk at blob offset "
                                             f"{self.index.points[region].coffset} {problem}")
            self._forget(*self.compressed_extent(region_start, region_end - region_start))
        for k, at in enumerate(range(0, len(data), self._piece)):
            self._put((region, k), data[at:at + self._piece])
        return data[start - region_start:stop - region_start]

    def _new_cursor(self, region: int) -> _Cursor:
        if self.index.compression == "zstd":
            return _ZstdCursor(self._fetch, self.index, region, self._what)
        return _GzipCursor(self._fetch, self.index, region, self._window(region), self._what)

    # -- windows ----------------------------------------------------------------------------------

    def needs_window(self, uoffset: int) -> bool:
        """Whether starting to read at *uoffset* would range-fetch a window first."""
        if self.index.compression != "gzip" or self.index.windows is not None or not self._starts:
            return False
        region = max(bisect.bisect_right(self._starts, uoffset) - 1, 0)
        with self._lock:
            return region not in self._windows

    def restarts(self, uoffset: int, length: int) -> list[int]:
        """The uncompressed offsets of the seek points whose regions [uoffset, uoffset+length)
        overlaps: where reads of that range may restart (each needs its window, for gzip)."""
        if not self._starts:
            return []
        first = max(bisect.bisect_right(self._starts, uoffset) - 1, 0)
        last = max(bisect.bisect_right(self._starts, uoffset + max(length, 1) - 1) - 1, first)
        return self._starts[first:last + 1]

    def window_at(self, uoffset: int) -> bytes:
        """The window of the seek point before *uoffset* (fetched now if it must be)."""
        return self._window(max(bisect.bisect_right(self._starts, uoffset) - 1, 0))

    def _window(self, region: int) -> bytes:
        index = self.index
        if index.windows is not None:
            return index.window(region)
        with self._lock:
            window = self._windows.get(region)
            if window is not None:
                self._windows.move_to_end(region)
                return window
            fetching = self._window_locks.setdefault(region, threading.Lock())
        # One fetch per window: the profile prefetch, the read-ahead of an open and the read itself
        # all ask for it at once. (Nothing waited on here holds this lock: no deadlock.)
        with fetching:
            with self._lock:
                window = self._windows.get(region)
            if window is not None:
                return window
            assert self._fetch_index is not None
            window = index.decode_window(region, self._fetch_index(*index.window_range(region)))
            with self._lock:  # kept: a region is restarted from its point by every read behind its cursors
                self._windows[region] = window
                while len(self._windows) > _MAX_WINDOWS:
                    self._windows.popitem(last=False)
        return window

    def _park(self, cursor: _Cursor) -> None:
        with self._lock:
            self._cursors.append(cursor)
            evicted = self._cursors[:-self._max_cursors] if self._max_cursors else self._cursors[:]
            del self._cursors[:len(evicted)]
        for c in evicted:
            c.close()
