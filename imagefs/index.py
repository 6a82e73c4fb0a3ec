"""A layer's index: table of contents, seek points and chunk digests, built in one streaming pass.

`build_index` reads the compressed blob once, as it arrives (imagefs/layerscan.py): every byte is hashed (per chunk and
whole), decompressed (gzip through `zran`, zstd through `zstandard`, plain passed through) and fed
to the stdlib tar parser in stream mode. Nothing is returned for a blob whose size or digest is
wrong. The result is what the lazy filesystem needs to serve a file without the layer: each entry
with the offset of its data in the uncompressed tar, seek points to restart decompression near any
offset (with their 32 KiB gzip windows), and a sha256 per `chunk_size` slice of the compressed blob
so every range fetched later is checked before a byte of it is served.

On-disk format (little-endian), what `to_bytes` writes to STORE/indexes/<layer-hex>:

    b"IMGFSIDX"  u32 format version  u64 length of the metadata block
    metadata block: one zstd frame (with checksum; an lz4 frame in versions 1 and 2) holding
        header    digest (32 raw bytes), compression, compressed/uncompressed size, span,
                  chunk_size, windows section size, counts, root prefix
        entries   one `_ENTRY` record each + path + link target + xattrs (`_XATTR` + name + value)
        points    one `_POINT` record each: offsets, bits, the window's place in the windows
                  section, its length and sha256
        digests   32 bytes per chunk
    windows section: each seek point's window as its own zstd frame (lz4 in version 1), concatenated

A remote reader fetches `meta_length(first 20 bytes)` bytes, calls `from_meta`, and range-fetches
only the windows it needs (`window_range`, `decode_window`); each window is checked against the
sha256 in the metadata, which is what makes a range-fetched window trustworthy.

Format versions (also for docs/): 1 — first version. 2 — an index made from an eStargz TOC
(imagefs/estargz.py), kept only in the store beside the TOC it came from and never published: no
compressed chunk digests and no windows; its seek points are gzip member starts
(`zran.MEMBER_START`), and after the (empty) chunk digests come 32 bytes per seek point, the
sha256 of that region's uncompressed bytes (zeros for the last point, which only marks the end).
3 — version 1 with zstd frames (level ZSTD_LEVEL) instead of lz4 for the metadata block and each
window: a third smaller on the wire, where a lazy start fetches them (measured on the benchmark
image: metadata -36%, windows -27%, 0.1 s more to build). Version 1 indexes are still read.

Concurrency: `build_index` is synchronous and single-threaded (run it in a worker thread). A
LayerIndex is immutable in practice; `window`/`decode_window` only read it, so any thread may call
them.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import lz4.frame
import zstandard

from imagefs import zran
from imagefs.layerscan import scan_layer
from imagefs.entry import Entry, EntryType
from imagefs.errors import InputError
from stores.digest import check_digest
from stores.model import Compression

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # what indexes are written as (see the module docstring)
LZ4_FORMAT_VERSION = 1  # the first format, still read (and written again for an index read from it)
TOC_FORMAT_VERSION = 2  # an index made from an eStargz TOC (see the module docstring)
PUBLISHED_FORMATS = (LZ4_FORMAT_VERSION, FORMAT_VERSION)  # a TOC-made index is never published
ZSTD_LEVEL = 9  # level 19 saves 3% more of the windows for 15x the time
MAX_METADATA = 1 << 30  # bytes a metadata block may inflate to (~10 million entries)
_NO_DIGEST = bytes(32)
MAGIC = b"IMGFSIDX"
DEFAULT_SPAN = 1 << 20
# Chunks are the unit of verification and of fetching: a lazy read fetches whole chunks, so they
# are small (a 16 KiB chunk costs 32 bytes of digest: 0.2% of the layer, in the metadata a start
# fetches; measured, 64 KiB chunks cost a profiled python3 start 0.57 MB more at both ends of files).
DEFAULT_CHUNK_SIZE = 16 << 10

_PREFIX = struct.Struct("<8sIQ")
# digest, compression, compressed size, uncompressed size, span, chunk size, windows section size,
# entry count, point count, chunk count, root length
_HEAD = struct.Struct("<32sBQQQQQIIIH")
# type, mode, uid, gid, size, mtime_ns, offset, devmajor, devminor, path len, link len, xattr count
_ENTRY = struct.Struct("<BHQQQqQIIIIH")
_XATTR = struct.Struct("<HI")  # name length, value length
# uoffset, coffset, bits, window offset in the windows section, stored length, window length, sha256
_POINT = struct.Struct("<QQBQII32s")
_COMPRESSIONS: tuple[Compression, ...] = ("none", "gzip", "zstd")
_MTIME_NS_RANGE = (-(1 << 63), (1 << 63) - 1)


@dataclass(slots=True, frozen=True)
class SeekPoint:
    """Where decompression can restart: see `zran.ScanPoint`; zstd points are frame starts.

    The window is `window_size` stored (lz4) bytes at `window_offset` in the windows section,
    `window_length` bytes once decompressed, with sha256 `window_digest`; 0/0 when there is none.
    """

    uoffset: int
    coffset: int
    bits: int
    window_offset: int = 0
    window_size: int = 0
    window_length: int = 0
    window_digest: bytes = hashlib.sha256(b"").digest()


@dataclass(slots=True)
class LayerIndex:
    """Everything about one layer blob that the lazy filesystem needs (see the module docstring).

    `windows` is the windows section, or None when only the metadata was loaded (`from_meta`).
    `windows_start` is where that section begins in the serialised index (known once the index
    has been serialised or loaded).

    `codec` is how the metadata block and windows are compressed when serialised: "zstd" (format
    3), or "lz4" for an index read from format 1 (its windows section is kept as it was).

    `region_digests`, for an index made from an eStargz TOC (imagefs/estargz.py), is the sha256 of
    each region's uncompressed bytes (b"" for none), which the reader checks on every decode; such
    an index has no compressed chunk digests and is never serialised (the store keeps the TOC).
    """

    digest: str
    compressed_size: int
    compression: Compression
    uncompressed_size: int
    root: str
    span: int
    chunk_size: int
    entries: list[Entry]
    points: list[SeekPoint]
    chunk_digests: list[bytes]
    windows: bytes | None = field(default=b"", repr=False)
    windows_start: int = field(default=0, compare=False, repr=False)
    region_digests: list[bytes] | None = field(default=None, repr=False)
    codec: str = field(default="zstd", compare=False, repr=False)

    # -- windows --------------------------------------------------------------------------------

    def window(self, i: int) -> bytes:
        """Seek point *i*'s window, from the windows section held in memory."""
        if self.windows is None:
            raise ValueError("windows section not loaded (index from from_meta); use window_range")
        p = self.points[i]
        return self.decode_window(i, self.windows[p.window_offset:p.window_offset + p.window_size])

    def window_range(self, i: int) -> tuple[int, int]:
        """(start, length) of seek point *i*'s stored window within the serialised index."""
        p = self.points[i]
        return self.windows_start + p.window_offset, p.window_size

    def decode_window(self, i: int, stored: bytes) -> bytes:
        """Seek point *i*'s window from its stored bytes, checked against the metadata."""
        p = self.points[i]
        what = f"index of layer {self.digest}"
        if len(stored) != p.window_size:
            raise InputError(what, f"window {i} is {len(stored)} bytes, expected {p.window_size}")
        window = _decompress(stored, self.codec, what, f"window {i}", zran.WINDOW_SIZE) if stored else b""
        if len(window) != p.window_length or hashlib.sha256(window).digest() != p.window_digest:
            raise InputError(what, f"window {i} does not match its digest")
        return window

    # -- serialisation ----------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The serialised index (see the module docstring); also sets `windows_start`."""
        if self.windows is None:
            raise ValueError("cannot serialise an index whose windows section was not loaded")
        meta = bytearray(_HEAD.pack(
            bytes.fromhex(self.digest.split(":", 1)[1]), _COMPRESSIONS.index(self.compression),
            self.compressed_size, self.uncompressed_size, self.span, self.chunk_size, len(self.windows),
            len(self.entries), len(self.points), len(self.chunk_digests), len(self.root.encode())))
        meta += self.root.encode()
        for e in self.entries:
            meta += _ENTRY.pack(e.type, e.mode, e.uid, e.gid, e.size, e.mtime_ns, e.offset, e.devmajor,
                                e.devminor, len(e.path), len(e.linkname), len(e.xattrs))
            meta += e.path
            meta += e.linkname
            for k, v in e.xattrs.items():
                meta += _XATTR.pack(len(k), len(v))
                meta += k
                meta += v
        for p in self.points:
            meta += _POINT.pack(p.uoffset, p.coffset, p.bits, p.window_offset, p.window_size,
                                p.window_length, p.window_digest)
        for d in self.chunk_digests:
            meta += d
        version = FORMAT_VERSION if self.codec == "zstd" else LZ4_FORMAT_VERSION
        if self.region_digests is not None:  # made from an eStargz TOC: format 2 (lz4, no windows)
            version = TOC_FORMAT_VERSION
            for d in self.region_digests:
                meta += d or _NO_DIGEST
        block = _compress(bytes(meta), _codec_of(version))
        prefix = _PREFIX.pack(MAGIC, version, len(block))
        self.windows_start = len(prefix) + len(block)
        return prefix + block + self.windows

    @staticmethod
    def meta_length(head: bytes, expected_digest: str = "") -> int:
        """How many leading bytes of a serialised index `from_meta` needs, given its first 20."""
        what = f"index of layer {expected_digest}" if expected_digest else "layer index"
        if len(head) < _PREFIX.size:
            raise InputError(what, "truncated (no header)")
        magic, version, meta_len = _PREFIX.unpack_from(head)
        if magic != MAGIC:
            raise InputError(what, "not an imagefs layer index (bad magic)")
        if version not in (LZ4_FORMAT_VERSION, TOC_FORMAT_VERSION, FORMAT_VERSION):
            raise InputError(what, f"unsupported index format version {version} (this is {FORMAT_VERSION})")
        return _PREFIX.size + meta_len

    @staticmethod
    def format_version(head: bytes) -> int:
        """The format version of a serialised index, from its first 20 bytes (0 if it is none)."""
        return _PREFIX.unpack_from(head)[1] if len(head) >= _PREFIX.size and head[:8] == MAGIC else 0

    @classmethod
    def from_meta(cls, prefix: bytes, expected_digest: str) -> LayerIndex:
        """The index without its windows section, from (at least) its first `meta_length` bytes."""
        what = f"index of layer {expected_digest}"
        end = cls.meta_length(prefix, expected_digest)
        if len(prefix) < end:
            raise InputError(what, "truncated (metadata block incomplete)")
        version = cls.format_version(prefix)
        meta = _decompress(prefix[_PREFIX.size:end], _codec_of(version), what, "metadata block")
        try:
            index = _parse_meta(meta, what, version)
        except (struct.error, ValueError, IndexError) as e:  # ValueError covers UnicodeDecodeError
            raise InputError(what, f"corrupt metadata block: {e}") from None
        if index.digest != expected_digest:
            raise InputError(what, f"index is for layer {index.digest}")
        index.windows, index.windows_start, index.codec = None, end, _codec_of(version)
        return index

    @classmethod
    def from_bytes(cls, data: bytes, expected_digest: str) -> LayerIndex:
        """Parse and fully check a serialised index for the layer *expected_digest*."""
        what = f"index of layer {expected_digest}"
        index = cls.from_meta(data, expected_digest)
        windows = bytes(data[index.windows_start:])
        if len(windows) != index._windows_size:
            raise InputError(what, f"windows section is {len(windows)} bytes, expected {index._windows_size}")
        index.windows = windows
        for i in range(len(index.points)):
            index.window(i)  # checks every window now: a bad local index fails at load, not mid-read
        return index

    @property
    def _windows_size(self) -> int:
        return max((p.window_offset + p.window_size for p in self.points), default=0)

    @property
    def serialized_size(self) -> int:
        """Bytes of the serialised index (known once serialised or loaded: see windows_start)."""
        return self.windows_start + self._windows_size


def _codec_of(version: int) -> str:
    return "zstd" if version == FORMAT_VERSION else "lz4"


def _compress(data: bytes, codec: str) -> bytes:
    if codec == "lz4":
        return lz4.frame.compress(data, content_checksum=True)
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compress(data)


def _decompress(data: bytes, codec: str, what: str, part: str, limit: int = MAX_METADATA) -> bytes:
    """One whole frame of *codec*, checked (its checksum, nothing missing, nothing after it); a
    zstd frame must declare its size, at most *limit* (a frame that would inflate without bound
    is refused before it is inflated)."""
    if codec == "lz4":
        d = lz4.frame.LZ4FrameDecompressor()
    else:
        try:
            declared = zstandard.frame_content_size(data)
        except zstandard.ZstdError as e:
            raise InputError(what, f"corrupt {part}: {e}") from None
        if not 0 <= declared <= limit:
            raise InputError(what, f"corrupt {part}: no size, or more than {limit} bytes")
        d = zstandard.ZstdDecompressor().decompressobj()
    try:
        out = d.decompress(data)
    except (RuntimeError, ValueError, zstandard.ZstdError) as e:
        raise InputError(what, f"corrupt {part}: {e}") from None
    if not d.eof or d.unused_data:
        raise InputError(what, f"corrupt {part}: truncated or trailing data")
    return out


def _parse_meta(meta: bytes, what: str, version: int) -> LayerIndex:
    """The metadata block's fields, validated; struct/Value/Index errors mean corruption."""
    toc = version == TOC_FORMAT_VERSION
    (digest, comp, csize, usize, span, chunk_size, windows_size, n_entries, n_points, n_chunks,
     root_len) = _HEAD.unpack_from(meta, 0)
    pos = _HEAD.size
    root = meta[pos:pos + root_len].decode()
    pos += root_len
    if comp >= len(_COMPRESSIONS) or span <= 0 or chunk_size <= 0:
        raise ValueError("bad header")
    entries: list[Entry] = []
    for _ in range(n_entries):
        (etype, mode, uid, gid, size, mtime_ns, offset, major, minor, plen, llen,
         nx) = _ENTRY.unpack_from(meta, pos)
        pos += _ENTRY.size
        path, link = _slice(meta, pos, plen), _slice(meta, pos + plen, llen)
        pos += plen + llen
        xattrs: dict[bytes, bytes] = {}
        for _ in range(nx):
            klen, vlen = _XATTR.unpack_from(meta, pos)
            pos += _XATTR.size
            xattrs[_slice(meta, pos, klen)] = _slice(meta, pos + klen, vlen)
            pos += klen + vlen
        e = Entry(path, EntryType(etype), mode, uid, gid, size, mtime_ns, link, major, minor, offset, xattrs)
        # A published index is only as trusted as its transport: re-check what a tar check would.
        if not _is_normal(path) or (path == b"" and e.type != EntryType.DIR) or mode > 0o7777:
            raise ValueError(f"bad entry path {path!r}")
        if e.type == EntryType.HARDLINK and (link == b"" or not _is_normal(link)):
            raise ValueError(f"bad hardlink target {link!r}")
        if e.type == EntryType.FILE and offset + size > usize:
            raise ValueError(f"entry {path!r} extends past the end of the layer")
        entries.append(e)
    points: list[SeekPoint] = []
    for _ in range(n_points):
        p = SeekPoint(*_POINT.unpack_from(meta, pos))
        pos += _POINT.size
        prev = points[-1] if points else None
        member = toc and p.bits == zran.MEMBER_START and not p.window_size
        if ((p.bits > 7 and not member) or p.uoffset > usize or p.coffset > csize
                or (p.bits and not p.coffset and not member)
                or p.window_length > zran.WINDOW_SIZE or p.window_offset + p.window_size > windows_size
                or (prev is None and p.uoffset != 0)
                or (prev is not None and (p.uoffset <= prev.uoffset or p.coffset < prev.coffset))):
            raise ValueError("bad seek point table")
        points.append(p)
    compression = _COMPRESSIONS[comp]
    if toc and (compression != "gzip" or n_chunks or windows_size):
        raise ValueError("an index from an eStargz TOC is gzip, without chunk digests or windows")
    if not toc and (compression == "none") != (not points) and csize:
        raise ValueError("seek points do not fit the compression")
    if not toc and n_chunks != -(-csize // chunk_size):
        raise ValueError("chunk digest count does not fit the size")
    digests = [_slice(meta, pos + 32 * i, 32) for i in range(n_chunks)]
    pos += 32 * n_chunks
    regions = None
    if toc:
        regions = [_slice(meta, pos + 32 * i, 32) for i in range(n_points)]
        pos += 32 * n_points
        if regions:
            regions[-1] = b""  # the end marker
    if pos != len(meta):
        raise ValueError("trailing bytes in the metadata block")
    index = LayerIndex("sha256:" + digest.hex(), csize, compression, usize, root, span, chunk_size,
                       entries, points, digests, region_digests=regions)
    if index._windows_size != windows_size:
        raise ValueError("windows section size does not match the seek points")
    return index


def _slice(buf: bytes, pos: int, n: int) -> bytes:
    if pos + n > len(buf):
        raise ValueError("record runs past the end of the metadata block")
    return buf[pos:pos + n]


def _is_normal(path: bytes) -> bool:
    return path == b"" or all(p and p not in (b".", b"..") for p in path.split(b"/"))


def build_index(chunks: Iterable[bytes], *, digest: str, size: int, compression: Compression,
                root: str = "", span: int = DEFAULT_SPAN, chunk_size: int = DEFAULT_CHUNK_SIZE,
                warn: Callable[[str], None] | None = None, wanted: Sequence[int] = (),
                ends: Sequence[int] = ()) -> LayerIndex:
    """Index the layer blob whose bytes *chunks* yields in order, in one pass (imagefs/layerscan.py).

    A gzip layer gets, besides its seek points every *span*, one at or just before each *wanted*
    uncompressed offset (where the data a start reads begins: imagefs/profile_points.py), unless
    a point is less than `zran.MIN_LEAD` before it already, and one at or just after each of
    *ends* (where that data ends).

    Raises InputError (DigestMismatch for a wrong digest) naming the layer if the blob is not
    *size* bytes with sha256 *digest*, does not decompress, or is not a tar. Members with absolute
    or climbing paths are dropped with a message to *warn* (default: the scanner's logger).
    """
    check_digest(digest, "layer digest")
    if compression not in _COMPRESSIONS:
        raise InputError(f"layer {digest}", f"unknown compression {compression!r}")
    if size < 0 or span <= 0 or chunk_size <= 0:
        raise ValueError("size must be >= 0, span and chunk_size > 0")
    if any(w < 0 for w in (*wanted, *ends)):
        raise ValueError("wanted offsets must not be negative")
    scan = scan_layer(chunks, digest=digest, size=size, compression=compression, root=root, span=span,
                      chunk_size=chunk_size, warn=warn, wanted=sorted(set(wanted)),
                      ends=sorted(set(ends)))
    points, windows = _store_points(scan.points)
    return LayerIndex(digest, size, compression, scan.uncompressed_size, root, span, chunk_size, scan.entries,
                      points, scan.chunk_digests, windows)


def _store_points(scanned: list[zran.ScanPoint]) -> tuple[list[SeekPoint], bytes]:
    section = bytearray()
    points = []
    for p in scanned:
        stored = _compress(p.window, "zstd") if p.window else b""
        points.append(SeekPoint(p.uoffset, p.coffset, p.bits, len(section), len(stored), len(p.window),
                                hashlib.sha256(p.window).digest()))
        section += stored
    return points, bytes(section)
