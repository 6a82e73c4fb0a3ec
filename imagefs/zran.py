"""Random access into gzip streams: seek points found in one streaming pass, spans inflated from them.

The idea is zlib's examples/zran.c. While a gzip stream is inflated once (as it arrives from the
network), inflate is asked to stop at every deflate block boundary (Z_BLOCK). At a boundary at least
`span` uncompressed bytes past the previous seek point we record one: the uncompressed offset, the
offset of the next whole compressed byte, how many bits (0-7) of the byte before it still belong to
the next block, and the 32 KiB of output before it (the dictionary a deflate block may refer back
into). Later, `inflate_span` restarts a raw inflater at that point with inflatePrime (the leftover
bits) and inflateSetDictionary (the window) and produces the bytes after it.

Why hand-written over indexed_gzip or rapidgzip: both need a seekable file and keep their own opaque
index formats, while we build the index in the same single pass that feeds the tar parser and the
per-chunk digests, and store each window separately so a remote reader range-fetches only the
windows it uses. Python's zlib has no inflatePrime, hence ctypes on the system libz.

Extra seek points: a scanner can be given *wanted* uncompressed offsets, such as where the data of
the files a container reads first starts. It keeps the last block boundary it passed as a
candidate, and when the output passes a wanted offset it commits that candidate (the last boundary
at or before the offset) as a seek point too, unless a point already lies less than `min_lead`
bytes of output before the offset. A read of the file then restarts a few KiB before it instead of
half a span. Offsets given as *ends* (where such data ends) get a point at the first boundary at
or after them: the region holding the data's tail then ends with the block that holds it, so a
reader never fetches further than that block for it. The regular points are unaffected: they are exactly those of a scan without wanted
offsets (`span` is counted from the last regular point), so the extra points are the only
difference. The candidate's window stays in the output buffer and is copied only when the buffer
wraps while a wanted offset is still ahead.

Gzip members: concatenated members are legal gzip and do occur. The scanner also offers every
member start (just after its header) as a seek point, with an empty window since a new member never
refers back. A span may still contain member boundaries (when members are shorter than `span`):
`inflate_span` skips the 8-byte trailer and continues with the next member's header. Trailing bytes
after the last member that are not another member are an error (as in Go's gzip reader, which is
what Docker and containerd use).

`Inflater` is the incremental form of `inflate_span`: it starts at a seek point and is fed the
compressed bytes as they arrive, so a reader fetches only as far into a span as the bytes it wants,
and can stop, keep the inflater, and continue later from where it stopped (sequential reads).

Concurrency: `inflate_span` is reentrant; each call owns its z_stream, and libz runs with the GIL
released, so several threads inflate in parallel. A `GzipScanner` or an `Inflater` belongs to one
thread at a time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

WINDOW_SIZE = 32768  # deflate's maximum back-reference distance
# A seek point's `bits` value saying its coffset is the first byte of a gzip member's *header*
# (eStargz puts one before every file chunk): inflation starts there with gzip framing, no window.
MEMBER_START = 8
# Extra seek points (see the module docstring) closer than this after an existing point are not
# made: a window costs ~11 KiB of zstd in the index, about what this much lead-in costs in gzip.
MIN_LEAD = 64 << 10
_OUT_SIZE = 256 * 1024  # output produced per piece: big enough that Python overhead is noise

# zlib.h constants.
Z_OK, Z_STREAM_END, Z_NEED_DICT = 0, 1, 2
Z_STREAM_ERROR, Z_DATA_ERROR, Z_MEM_ERROR, Z_BUF_ERROR = -2, -3, -4, -5
Z_NO_FLUSH, Z_BLOCK = 0, 5
_GZIP_WBITS = 31  # 15-bit window, gzip header and trailer only (a layer is gzip, not zlib)
_RAW_WBITS = -15  # raw deflate: what follows a seek point
_CODE_NAMES = {Z_STREAM_ERROR: "Z_STREAM_ERROR", Z_DATA_ERROR: "Z_DATA_ERROR",
               Z_MEM_ERROR: "Z_MEM_ERROR", Z_BUF_ERROR: "Z_BUF_ERROR", Z_NEED_DICT: "Z_NEED_DICT"}


class ZlibError(Exception):
    """libz refused the data (or the data ended early); the message is zlib's own when it has one."""

    def __init__(self, msg: str, code: int = Z_DATA_ERROR) -> None:
        super().__init__(msg)
        self.code = code


class _ZStream(ctypes.Structure):
    # z_stream from zlib.h; pointers are kept as c_void_p so we can do address arithmetic.
    _fields_ = [
        ("next_in", ctypes.c_void_p), ("avail_in", ctypes.c_uint), ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p), ("avail_out", ctypes.c_uint), ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p), ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p), ("zfree", ctypes.c_void_p), ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int), ("adler", ctypes.c_ulong), ("reserved", ctypes.c_ulong),
    ]


def _load_libz() -> ctypes.CDLL:
    try:  # the soname first: find_library forks `ldconfig -p`, on every mount server's start
        lib = ctypes.CDLL("libz.so.1")
    except OSError:
        name = ctypes.util.find_library("z")
        if name is None:
            raise ImportError("imagefs.zran needs the system zlib (libz.so.1)") from None
        lib = ctypes.CDLL(name)
    p = ctypes.POINTER(_ZStream)
    for fn, args in (("inflateInit2_", [p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]),
                     ("inflate", [p, ctypes.c_int]), ("inflateEnd", [p]), ("inflateReset", [p]),
                     ("inflateReset2", [p, ctypes.c_int]),
                     ("inflatePrime", [p, ctypes.c_int, ctypes.c_int]),
                     ("inflateSetDictionary", [p, ctypes.c_char_p, ctypes.c_uint])):
        getattr(lib, fn).argtypes = args
        getattr(lib, fn).restype = ctypes.c_int
    lib.zlibVersion.argtypes = []
    lib.zlibVersion.restype = ctypes.c_char_p
    return lib


_z = _load_libz()
_VERSION: bytes = _z.zlibVersion()


def _check(strm: _ZStream, ret: int, what: str) -> None:
    if ret != Z_OK:
        msg = strm.msg.decode("utf-8", "replace") if strm.msg else _CODE_NAMES.get(ret, f"error {ret}")
        raise ZlibError(f"{what}: {msg}", ret)


def _new_stream(wbits: int) -> _ZStream:
    strm = _ZStream()
    _check(strm, _z.inflateInit2_(ctypes.byref(strm), wbits, _VERSION, ctypes.sizeof(_ZStream)), "inflateInit2")
    return strm


def _address(buf: bytes) -> tuple[ctypes.c_char_p, int]:
    """The address of *buf*'s bytes without copying; keep the returned c_char_p alive while in use."""
    keep = ctypes.c_char_p(buf)
    return keep, ctypes.cast(keep, ctypes.c_void_p).value or 0


@dataclass(slots=True, frozen=True)
class ScanPoint:
    """A place where inflation can restart (see the module docstring).

    coffset is the offset of the first whole compressed byte after the point; when bits > 0 the
    byte at coffset - 1 holds the first `bits` bits of the next block in its high bits.
    window is the output before the point that the next blocks may refer to: the last 32 KiB, less
    near the start of a gzip member (empty at a member start).
    """

    uoffset: int
    coffset: int
    bits: int
    window: bytes


class GzipScanner:
    """Inflates a (multi-member) gzip stream fed in pieces and records seek points `span` apart,
    and one at or just before each *wanted* offset (see the module docstring).

    Usage: `for out in scanner.feed(piece): ...` for every piece in order, then `finish()`.
    Always `close()` (or use it as a context manager) to free the z_stream; `finish()` closes too.
    Not thread-safe: one owner.
    """

    def __init__(self, span: int, wanted: Iterable[int] = (), min_lead: int = MIN_LEAD,
                 ends: Iterable[int] = ()) -> None:
        if span <= 0 or min_lead < 0:
            raise ValueError("span must be positive, min_lead not negative")
        self.span = span
        self.min_lead = min_lead
        self.points: list[ScanPoint] = []
        self._wanted = sorted(set(wanted))  # extra points: see the module docstring
        self._next_wanted = 0  # _wanted[:_next_wanted] have been dealt with
        self._ends = sorted(set(ends))  # offsets that get a point at the first boundary at or after
        self._next_end = 0
        # The last block boundary passed: uoffset, coffset, bits, where its window ends in _buf and
        # its length, and the window itself once copied (None while it is still in _buf).
        self._cand: tuple[int, int, int, int, int] | None = None
        self._cand_window: bytes | None = None
        self.total_in = 0  # compressed bytes consumed so far
        self.total_out = 0  # uncompressed bytes produced so far
        self._strm: _ZStream | None = _new_stream(_GZIP_WBITS)
        # Output goes into one buffer whose first 32 KiB, after the first wrap, hold the previous
        # output: a window is then always one contiguous slice, copied only when a point is taken.
        self._cap = WINDOW_SIZE + _OUT_SIZE
        self._buf = ctypes.create_string_buffer(self._cap)
        self._base = ctypes.addressof(self._buf)
        self._pos = 0  # bytes of _buf in use
        self._emitted = 0  # _buf[:_emitted] has been handed out already
        self._member_out = 0  # output of the current member (limits the window)
        self._member_done = False  # the last member ended; a new one may follow
        self._started = False
        self._last_point = 0  # uoffset of the last regular point
        self._regular = False  # a regular point was taken (the first one, at offset 0)

    def __enter__(self) -> GzipScanner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._strm is not None:
            _z.inflateEnd(ctypes.byref(self._strm))
            self._strm = None

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Inflate *data*, the next compressed bytes; yields output pieces of at most 256 KiB.

        Exhaust each returned iterator before the next call (output is bounded per piece, not per
        call: a few KiB of gzip can expand a thousandfold)."""
        strm = self._strm
        if strm is None:
            raise ValueError("scanner is closed")
        if not data:
            return
        self._started = True
        keep, addr = _address(bytes(data))
        start_in, size = self.total_in, len(data)
        strm.next_in, strm.avail_in = addr, size
        full = False  # the last call filled the output: inflate may hold more even with no input
        while strm.avail_in > 0 or full:
            if self._member_done:  # more input after a member's trailer: the next member
                if strm.avail_in == 0:
                    break
                _check(strm, _z.inflateReset(ctypes.byref(strm)), "gzip")
                self._member_done, self._member_out = False, 0
            if self._pos == self._cap:
                yield from self._emit()
                self._keep_candidate_window()
                # Keep the last 32 KiB at the front as the window for points taken next.
                ctypes.memmove(self._base, self._base + self._cap - WINDOW_SIZE, WINDOW_SIZE)
                self._pos = self._emitted = WINDOW_SIZE
            room = self._cap - self._pos
            strm.next_out, strm.avail_out = self._base + self._pos, room
            ret = _z.inflate(ctypes.byref(strm), Z_BLOCK)
            made = room - strm.avail_out
            full = strm.avail_out == 0
            self._pos += made
            self._member_out += made
            self.total_out += made
            self.total_in = start_in + size - strm.avail_in
            if ret == Z_STREAM_END:
                self._member_done = True
                self._wanted_passed(self.total_out)  # passed in the member's last block
                continue
            if ret == Z_BUF_ERROR:  # no progress possible: it needs the next piece of input
                break
            _check(strm, ret, "gzip")
            # Bit 7: stopped at a block boundary or just after a header; bit 6: in the last block,
            # so what follows is the trailer, not a block.
            dt = strm.data_type
            if dt & 128 and not dt & 64:
                self._boundary(dt & 7)
        del keep
        yield from self._emit()

    def _boundary(self, bits: int) -> None:
        """At a block boundary (or a member start): extra points for the wanted offsets passed
        since the last boundary, then this boundary as the candidate, then the regular rule."""
        out = self.total_out
        self._wanted_passed(out)
        self._cand = (out, self.total_in, bits, self._pos, min(WINDOW_SIZE, self._member_out))
        self._cand_window = None
        wanted, i = self._wanted, self._next_wanted
        while i < len(wanted) and wanted[i] == out:  # a wanted offset right at this boundary
            self._commit(wanted[i])
            i += 1
        self._next_wanted = i
        ends, j = self._ends, self._next_end
        if j < len(ends) and ends[j] <= out:  # ends passed since the last boundary: a point here
            while j < len(ends) and ends[j] <= out:
                j += 1
            self._next_end = j
            if not self.points or self.points[-1].uoffset != out:
                self._commit(out)
        if not self._regular or out - self._last_point >= self.span:
            self._regular, self._last_point = True, out
            if not self.points or self.points[-1].uoffset != out:  # not taken as an extra already
                self._commit(out)

    def _wanted_passed(self, out: int) -> None:
        """Extra points for the wanted offsets before *out*: the candidate precedes them all."""
        wanted, i = self._wanted, self._next_wanted
        while i < len(wanted) and wanted[i] < out:
            if self._cand is not None:
                self._commit(wanted[i])
            i += 1
        self._next_wanted = i

    def _commit(self, target: int) -> None:
        """The candidate as a seek point for *target* (a wanted offset, or the candidate's own
        offset for a regular point), unless a point at most `min_lead` before it exists."""
        assert self._cand is not None
        uoffset, coffset, bits, end, wlen = self._cand
        if self.points:
            last = self.points[-1].uoffset
            if uoffset <= last or (target != uoffset and target - last < self.min_lead):
                return
        window = self._cand_window
        if window is None:
            window = ctypes.string_at(self._base + end - wlen, wlen)
        self.points.append(ScanPoint(uoffset, coffset, bits, window))

    def _keep_candidate_window(self) -> None:
        """The output buffer is about to wrap: copy the candidate's window out of it if a wanted
        offset may still commit the candidate."""
        if (self._cand is not None and self._cand_window is None and self._next_wanted < len(self._wanted)
                and (not self.points or self._cand[0] > self.points[-1].uoffset)):
            _, _, _, end, wlen = self._cand
            self._cand_window = ctypes.string_at(self._base + end - wlen, wlen)
        # Otherwise its place in _buf goes stale, harmlessly: _commit returns before using it.

    def _emit(self) -> Iterator[bytes]:
        if self._pos > self._emitted:
            out = ctypes.string_at(self._base + self._emitted, self._pos - self._emitted)
            self._emitted = self._pos
            yield out

    def finish(self) -> None:
        """Check the stream ended at the end of a member, and free the z_stream."""
        try:
            if not self._started:
                raise ZlibError("gzip: empty stream (no gzip header)")
            if not self._member_done:
                raise ZlibError("gzip: unexpected end of compressed data")
        finally:
            self.close()


def lead_bytes(bits: int) -> int:
    """How many bytes before a seek point's coffset its compressed data starts (the partial byte)."""
    return 1 if 0 < bits < MEMBER_START else 0


def inflate_span(data: bytes, *, bits: int, window: bytes, length: int) -> bytes:
    """Exactly *length* uncompressed bytes following a seek point.

    *data* is the compressed stream from the point on: starting at `coffset - 1` when bits > 0
    (that partial byte first), else at `coffset`; it may end anywhere after the bytes needed.
    Crosses gzip member boundaries (trailer skipped, next header parsed). Raises ZlibError if the
    data is corrupt or ends before *length* bytes came out.
    """
    if length <= 0:
        return b""
    if not 0 <= bits <= 7 or len(window) > WINDOW_SIZE:
        raise ValueError("bad seek point")
    strm = _new_stream(_RAW_WBITS)
    try:
        keep, addr = _address(bytes(data))
        skip = 0
        if bits:
            if not data:
                raise ZlibError("gzip: no data at seek point")
            _check(strm, _z.inflatePrime(ctypes.byref(strm), bits, data[0] >> (8 - bits)), "inflatePrime")
            skip = 1
        if window:
            _check(strm, _z.inflateSetDictionary(ctypes.byref(strm), window, len(window)), "inflateSetDictionary")
        out = ctypes.create_string_buffer(length)
        strm.next_in, strm.avail_in = addr + skip, len(data) - skip
        strm.next_out, strm.avail_out = ctypes.addressof(out), length
        raw = True  # still in the member the point is in (raw deflate: we must skip its trailer)
        while strm.avail_out > 0:
            ret = _z.inflate(ctypes.byref(strm), Z_NO_FLUSH)
            if ret == Z_STREAM_END:
                if strm.avail_out == 0:
                    break
                if raw:  # raw inflate stops before the 8-byte gzip trailer (CRC32, ISIZE)
                    if strm.avail_in < 8:
                        raise ZlibError("gzip: compressed data ends inside a member trailer")
                    strm.next_in, strm.avail_in = strm.next_in + 8, strm.avail_in - 8
                    _check(strm, _z.inflateReset2(ctypes.byref(strm), _GZIP_WBITS), "gzip")
                    raw = False
                else:
                    _check(strm, _z.inflateReset(ctypes.byref(strm)), "gzip")
                if strm.avail_in == 0:
                    raise ZlibError("gzip: compressed data ended early")
                continue
            if ret == Z_BUF_ERROR or (ret == Z_OK and strm.avail_in == 0 and strm.avail_out > 0):
                raise ZlibError("gzip: compressed data ended early", Z_BUF_ERROR)
            _check(strm, ret, "gzip")
        del keep
        return out.raw
    finally:
        _z.inflateEnd(ctypes.byref(strm))


class Inflater:
    """Inflation restarted at a seek point and fed its compressed bytes piece by piece.

    `feed(data)` appends compressed bytes (the first piece starts at `coffset - lead_bytes(bits)`,
    as for `inflate_span`; bits may also be MEMBER_START); `read(n)` returns up to *n* uncompressed bytes from
    what has been fed: fewer only when it needs more input (`needs_input` is then true). Gzip
    member boundaries are crossed as in `inflate_span`. Raises ZlibError on corrupt data.
    Always `close()` it (frees the z_stream).
    """

    def __init__(self, *, bits: int, window: bytes) -> None:
        member = bits == MEMBER_START
        if not (0 <= bits <= 7 or (member and not window)) or len(window) > WINDOW_SIZE:
            raise ValueError("bad seek point")
        self._strm: _ZStream | None = _new_stream(_GZIP_WBITS if member else _RAW_WBITS)
        self._bits = 0 if member else bits
        self._window = window
        self._primed = False
        self._buf = b""  # fed bytes; libz has consumed _buf[:_off]
        self._off = 0
        # Still in the point's own member, inflated raw (its trailer is skipped by hand); a point
        # at a member's header is inflated with gzip framing from the start.
        self._raw = not member
        self._member_end = False  # a member ended; the next read starts the next one
        self._starved = False  # the last read stopped inside a trailer: it needs more bytes
        self.total_in = 0  # compressed bytes fed so far

    def close(self) -> None:
        if self._strm is not None:
            _z.inflateEnd(ctypes.byref(self._strm))
            self._strm = None

    @property
    def needs_input(self) -> bool:
        """Whether `read` stopped (or would stop) for want of compressed bytes."""
        return self._starved or self._off >= len(self._buf)

    def feed(self, data: bytes) -> None:
        if not data:
            return
        self.total_in += len(data)
        rest = self._buf[self._off:]
        self._buf, self._off = (rest + data if rest else bytes(data)), 0
        self._starved = False

    def _prime(self, strm: _ZStream) -> bool:
        if self._bits:
            if self.needs_input:
                return False
            first = self._buf[self._off]
            _check(strm, _z.inflatePrime(ctypes.byref(strm), self._bits, first >> (8 - self._bits)), "inflatePrime")
            self._off += 1
        if self._window:
            _check(strm, _z.inflateSetDictionary(ctypes.byref(strm), self._window, len(self._window)),
                   "inflateSetDictionary")
        self._primed = True
        return True

    def read(self, n: int) -> bytes:
        strm = self._strm
        if strm is None:
            raise ValueError("inflater is closed")
        if n <= 0 or (not self._primed and not self._prime(strm)):
            return b""
        out = ctypes.create_string_buffer(n)
        base = ctypes.addressof(out)
        made = 0
        keep, addr = _address(self._buf)
        while made < n and self._off < len(self._buf):
            if self._member_end:
                if self._raw:  # raw inflate stops before the 8-byte gzip trailer (CRC32, ISIZE)
                    if len(self._buf) - self._off < 8:
                        self._starved = True  # the rest of the trailer comes with the next piece
                        break
                    self._off += 8
                    _check(strm, _z.inflateReset2(ctypes.byref(strm), _GZIP_WBITS), "gzip")
                    self._raw = False
                else:
                    _check(strm, _z.inflateReset(ctypes.byref(strm)), "gzip")
                self._member_end = False
                continue
            avail = len(self._buf) - self._off
            strm.next_in, strm.avail_in = addr + self._off, avail
            strm.next_out, strm.avail_out = base + made, n - made
            ret = _z.inflate(ctypes.byref(strm), Z_NO_FLUSH)
            self._off += avail - strm.avail_in
            made = n - strm.avail_out
            if ret == Z_STREAM_END:
                self._member_end = True
                continue
            if ret == Z_BUF_ERROR:
                break  # needs more input
            _check(strm, ret, "gzip")
        del keep
        return ctypes.string_at(base, made)
