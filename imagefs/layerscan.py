"""One streaming pass over a layer blob: hash it, decompress it, and list its tar members.

`scan_layer` reads the compressed bytes once, as they arrive: every byte is hashed (sha256 per
`chunk_size` slice and whole), decompressed (gzip through `zran`, which also records seek points;
zstd frame by frame; plain passed through) and fed to the stdlib tar parser in stream mode, which
gives every member's data offset in the uncompressed tar. Members are normalised into `Entry`s;
unsafe ones (absolute, climbing with "..") are dropped with a warning. imagefs/index.py turns the
result into a LayerIndex.

Concurrency: synchronous and single-threaded; run it in a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import tarfile
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal
from typing import Protocol

import zstandard

from imagefs import zran
from imagefs.entry import Entry, EntryType
from imagefs.errors import DigestMismatch, InputError
from stores.model import Compression

log = logging.getLogger(__name__)

_MTIME_NS_RANGE = (-(1 << 63), (1 << 63) - 1)


@dataclass
class LayerScan:
    """What one pass over a layer found."""

    entries: list[Entry]
    points: list[zran.ScanPoint]   # gzip: deflate block boundaries (span apart, and wanted); zstd: frame starts
    chunk_digests: list[bytes]
    uncompressed_size: int


# -- tar members to entries ---------------------------------------------------------------------

def _fs(s: str) -> bytes:
    # tarfile decoded names with utf-8/surrogateescape (our open() arguments); this is the exact
    # inverse, independent of the locale (os.fsencode would follow the filesystem encoding).
    return s.encode("utf-8", "surrogateescape")


def _split(name: bytes) -> list[bytes] | None:
    """*name*'s components without "" and "."; None if it is absolute or climbs with ".."."""
    if name.startswith(b"/"):
        return None
    parts = [p for p in name.split(b"/") if p and p != b"."]
    return None if b".." in parts else parts


_TYPES = {
    tarfile.REGTYPE: EntryType.FILE, tarfile.AREGTYPE: EntryType.FILE, tarfile.CONTTYPE: EntryType.FILE,
    tarfile.DIRTYPE: EntryType.DIR, tarfile.SYMTYPE: EntryType.SYMLINK, tarfile.LNKTYPE: EntryType.HARDLINK,
    tarfile.CHRTYPE: EntryType.CHAR, tarfile.BLKTYPE: EntryType.BLOCK, tarfile.FIFOTYPE: EntryType.FIFO,
}


class EntryMaker:
    """Turns TarInfos into normalised Entries, or None for members that are skipped or dropped."""

    def __init__(self, root: str, warn: Callable[[str], None], what: str) -> None:
        parts = _split(root.encode())
        if parts is None:
            raise ValueError(f"bad root prefix {root!r}")
        self._root = parts
        self._warn = warn
        self._what = what

    def _strip_root(self, parts: list[bytes]) -> bytes | None:
        n = len(self._root)
        return b"/".join(parts[n:]) if parts[:n] == self._root else None

    def make(self, ti: tarfile.TarInfo) -> Entry | None:
        name = _fs(ti.name)
        return self.make_entry(name, _TYPES.get(ti.type), kind=repr(ti.type), mode=ti.mode, uid=ti.uid,
                               gid=ti.gid, size=ti.size, mtime_ns=_mtime_ns(ti), linkname=_fs(ti.linkname),
                               devmajor=ti.devmajor, devminor=ti.devminor, offset=ti.offset_data,
                               xattrs=self._xattrs(ti.pax_headers, name), sparse=ti.issparse())

    def make_entry(self, name: bytes, etype: EntryType | None, *, kind: str, mode: int, uid: int, gid: int,
                   size: int, mtime_ns: int, linkname: bytes, devmajor: int, devminor: int, offset: int,
                   xattrs: dict[bytes, bytes], sparse: bool = False) -> Entry | None:
        """The entry for a member described field by field (a tar header, or an eStargz TOC
        entry), normalised and checked by the same rules; None if it is skipped or dropped."""
        parts = _split(name)
        if parts is None:
            self._warn(f"dropping {name!r}: absolute path or '..' component")
            return None
        path = self._strip_root(parts)
        if path is None:
            return None  # outside the root (the Appc manifest): not part of the filesystem
        if sparse:
            raise InputError(self._what, f"{name!r}: sparse tar members are not supported")
        if etype is None:
            self._warn(f"dropping {name!r}: unsupported tar member type {kind}")
            return None
        if path == b"" and etype != EntryType.DIR:
            self._warn(f"dropping {name!r}: the root can only be a directory")
            return None
        if etype == EntryType.HARDLINK:
            target_parts = _split(linkname)
            target = self._strip_root(target_parts) if target_parts is not None else None
            if not target:
                self._warn(f"dropping hardlink {name!r}: target {linkname!r} is unsafe or outside the root")
                return None
            linkname = target
        elif etype != EntryType.SYMLINK:
            linkname = b""
        for label, value, limit in (("uid", uid, 1 << 64), ("gid", gid, 1 << 64), ("size", size, 1 << 64),
                                    ("devmajor", devmajor, 1 << 32), ("devminor", devminor, 1 << 32)):
            if not 0 <= value < limit:
                raise InputError(self._what, f"{name!r}: {label} {value} out of range")
        for k, v in list(xattrs.items()):
            if not 0 < len(k) <= 255 or len(v) > 65536:  # Linux's limits; keeps records small
                self._warn(f"{name!r}: ignoring xattr {k[:64]!r}: name or value too long")
                del xattrs[k]
        return Entry(path=path, type=etype, mode=mode & 0o7777, uid=uid, gid=gid,
                     size=size if etype == EntryType.FILE else 0, mtime_ns=mtime_ns, linkname=linkname,
                     devmajor=devmajor, devminor=devminor, offset=offset, xattrs=xattrs)

    def _xattrs(self, pax: dict[str, str], name: bytes) -> dict[bytes, bytes]:
        # tarfile decoded PAX values as utf-8 (surrogateescape where not valid, or with
        # hdrcharset=BINARY): _fs gives back the exact bytes, zero bytes included.
        schily: dict[bytes, bytes] = {}
        libarchive: dict[bytes, bytes] = {}
        for key, value in pax.items():
            if key.startswith("SCHILY.xattr."):
                schily[_fs(key[13:])] = _fs(value)
            elif key.startswith("LIBARCHIVE.xattr."):
                raw = _fs(value).rstrip(b"=")  # libarchive writes base64 without padding
                try:
                    decoded = base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True)
                except binascii.Error:
                    self._warn(f"{name!r}: ignoring xattr {key!r}: bad base64")
                    continue
                libarchive[urllib.parse.unquote_to_bytes(_fs(key[17:]))] = decoded
        return libarchive | schily  # libarchive writes both; SCHILY is the common one


def _mtime_ns(ti: tarfile.TarInfo) -> int:
    # tarfile turns a PAX mtime into a float, which loses nanoseconds: parse the text again.
    text = ti.pax_headers.get("mtime")
    try:
        ns = int((Decimal(text) if text else Decimal(ti.mtime)).scaleb(9).to_integral_value(ROUND_FLOOR))
    except (ArithmeticError, ValueError):  # "nan", "inf", junk: tarfile gives up on these too
        ns = 0
    return min(max(ns, _MTIME_NS_RANGE[0]), _MTIME_NS_RANGE[1])


class _BadTar(tarfile.TarError):
    pass


class _StrictTarInfo(tarfile.TarInfo):
    """Makes tarfile fail on a bad header instead of silently ending the listing there.

    Stream-mode tarfile treats an invalid or truncated header after the first as the end of the
    archive; Go's archive/tar (Docker, containerd) rejects it, and so do we. A header that is
    simply absent (data ends on a block boundary) stays a clean end, as it is for Go.
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as e:  # type: ignore[attr-defined]
            raise _BadTar(f"bad tar header at offset {tarfile_.offset}: {e}") from None


# -- the streaming pass -----------------------------------------------------------------------------

class _Oversize(InputError):
    pass


class _CorruptStream(Exception):
    """The compressed stream does not decode."""


class _BlobHasher:
    """sha256 of the whole blob and of each chunk_size slice, fed pieces of any size.

    Hashing is about a tenth of the pass (sha256 runs at >1 GB/s with SHA extensions against
    ~100 MB/s for inflate); a helper thread to overlap it gained nothing measurable on our 2-CPU
    test machine, so it stays inline.
    """

    def __init__(self, what: str, size: int, chunk_size: int) -> None:
        self.what, self.size, self.chunk_size = what, size, chunk_size
        self.count = 0
        self.digests: list[bytes] = []
        self._whole = hashlib.sha256()
        self._part = hashlib.sha256()
        self._room = chunk_size  # bytes left in the current chunk

    def update(self, data: bytes) -> None:
        n = len(data)
        if self.count + n > self.size:  # stop at once: never read an unbounded stream to its end
            raise _Oversize(self.what, f"blob is longer than its declared size {self.size}")
        self.count += n
        self._whole.update(data)
        view, pos = memoryview(data), 0
        while pos < n:
            take = min(self._room, n - pos)
            self._part.update(view[pos:pos + take])
            pos += take
            self._room -= take
            if self._room == 0:
                self.digests.append(self._part.digest())
                self._part, self._room = hashlib.sha256(), self.chunk_size

    def finish(self, digest: str) -> list[bytes]:
        if self.count != self.size:
            raise InputError(self.what, f"blob is truncated: {self.count} of {self.size} bytes")
        if self._room != self.chunk_size:
            self.digests.append(self._part.digest())
        actual = "sha256:" + self._whole.hexdigest()
        if actual != digest:
            raise DigestMismatch(self.what, digest, actual)
        return self.digests


class _Decoder(Protocol):
    points: list[zran.ScanPoint]

    def feed(self, data: bytes) -> Iterator[bytes]: ...
    def finish(self) -> Iterator[bytes]: ...
    def close(self) -> None: ...


class _Plain:
    def __init__(self) -> None:
        self.points: list[zran.ScanPoint] = []  # offsets in a plain tar need no seek points

    def feed(self, data: bytes) -> Iterator[bytes]:
        yield data

    def finish(self) -> Iterator[bytes]:
        return iter(())

    def close(self) -> None:
        pass


class _Gzip:
    def __init__(self, span: int, wanted: Sequence[int], ends: Sequence[int]) -> None:
        self._scanner = zran.GzipScanner(span, wanted, ends=ends)
        self.points = self._scanner.points

    def feed(self, data: bytes) -> Iterator[bytes]:
        try:
            yield from self._scanner.feed(data)
        except zran.ZlibError as e:
            raise _CorruptStream(str(e)) from None

    def finish(self) -> Iterator[bytes]:
        try:
            self._scanner.finish()
        except zran.ZlibError as e:
            raise _CorruptStream(str(e)) from None
        return iter(())

    def close(self) -> None:
        self._scanner.close()


class _Zstd:
    """Decodes a zstd stream frame by frame, offering a seek point at each frame start.

    Frame and block headers are walked here so that each call to the decompressor gets at most
    one block (at most 128 KiB of output): zstandard's decompressobj returns all the output of its
    input at once, and a few KiB of zstd can expand to gigabytes.
    """

    _MAGIC = 0xFD2FB528
    _SKIPPABLE = 0x184D2A50  # ..0x184D2A5F
    _BLOCK_MAX = 128 << 10

    def __init__(self, span: int) -> None:
        self.span = span
        self.points: list[zran.ScanPoint] = []
        self._dctx = zstandard.ZstdDecompressor()
        self._obj: zstandard.ZstdDecompressionObj | None = None
        self._hdr = bytearray()
        self._state = "frame"  # what _hdr is gathering: a "frame" header or a "block" header
        self._body = 0  # bytes left in the current block body, checksum or skippable payload
        self._last = self._checksum = False
        self._in_checksum = False
        self._cin = self._uout = self._last_point = 0

    def _header_size(self) -> int:
        h = self._hdr
        if self._state == "block":
            return 3
        if len(h) < 4:
            return 4
        magic = int.from_bytes(h[:4], "little")
        if magic & 0xFFFFFFF0 == self._SKIPPABLE:
            return 8
        if magic != self._MAGIC:
            raise _CorruptStream(f"zstd: not a zstd frame at offset {self._cin}")
        if len(h) < 5:
            return 5
        fhd = h[4]
        single = bool(fhd & 0x20)
        fcs = (1 if single else 0, 2, 4, 8)[fhd >> 6]
        return 5 + (not single) + (0, 1, 2, 4)[fhd & 3] + fcs

    def feed(self, data: bytes) -> Iterator[bytes]:
        view, i, n = memoryview(data), 0, len(data)
        while i < n:
            if self._body:
                take = min(self._body, n - i)
                if self._obj is not None:
                    yield from self._decompress(view[i:i + take])
                i += take
                self._body -= take
                self._cin += take
                if not self._body:
                    yield from self._region_done()
                continue
            need = self._header_size()
            take = min(need - len(self._hdr), n - i)
            self._hdr += view[i:i + take]
            i += take
            if len(self._hdr) == self._header_size():
                yield from self._header_done()

    def _decompress(self, data: memoryview | bytes) -> Iterator[bytes]:
        assert self._obj is not None
        try:
            out = self._obj.decompress(data)
        except zstandard.ZstdError as e:
            raise _CorruptStream(f"zstd: {e}") from None
        if out:
            self._uout += len(out)
            yield out

    def _header_done(self) -> Iterator[bytes]:
        h = bytes(self._hdr)
        self._hdr.clear()
        if self._state == "frame":
            if not self.points or self._uout - self._last_point >= self.span:
                self.points.append(zran.ScanPoint(self._uout, self._cin, 0, b""))
                self._last_point = self._uout
            self._cin += len(h)
            if int.from_bytes(h[:4], "little") != self._MAGIC:  # skippable frame: no output
                self._obj, self._body = None, int.from_bytes(h[4:8], "little")
            else:
                if h[4] & 0x08:
                    raise _CorruptStream("zstd: reserved frame header bit set")
                self._checksum = bool(h[4] & 0x04)
                self._obj = self._dctx.decompressobj()
                yield from self._decompress(h)
                self._state = "block"
                return
        else:
            v = int.from_bytes(h, "little")
            btype, bsize = (v >> 1) & 3, v >> 3
            if btype == 3 or bsize > self._BLOCK_MAX:
                raise _CorruptStream(f"zstd: bad block header at offset {self._cin}")
            self._cin += 3
            self._last = bool(v & 1)
            yield from self._decompress(h)
            self._body = 1 if btype == 1 else bsize
        if not self._body:
            yield from self._region_done()

    def _region_done(self) -> Iterator[bytes]:
        if self._obj is None or self._state == "frame":  # end of a skippable frame
            self._state = "frame"
        elif self._last and self._checksum and not self._in_checksum:
            self._in_checksum, self._body = True, 4
        elif self._last:
            if not self._obj.eof:
                raise _CorruptStream("zstd: frame did not end after its last block")
            self._obj, self._state, self._in_checksum = None, "frame", False
        return iter(())

    def finish(self) -> Iterator[bytes]:
        if self._cin == 0 and not self._hdr:
            raise _CorruptStream("zstd: empty stream")
        if self._state != "frame" or self._hdr or self._body:
            raise _CorruptStream("zstd: unexpected end of compressed data")
        return iter(())

    def close(self) -> None:
        self._obj = None


class _TarSource:
    """The file object tarfile reads: decoded output pulled piece by piece from the pipeline."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._cur = b""
        self._pos = 0
        self.total = 0  # uncompressed bytes handed out (or drained) so far

    def read(self, n: int = -1) -> bytes:
        while self._pos >= len(self._cur):
            nxt = next(self._pieces, None)
            if nxt is None:
                return b""
            self._cur, self._pos = nxt, 0
        if n < 0 or n >= len(self._cur) - self._pos:
            out = self._cur[self._pos:] if self._pos else self._cur
        else:
            out = self._cur[self._pos:self._pos + n]
        self._pos += len(out)
        self.total += len(out)
        return out

    def drain(self) -> None:
        """Decode the rest (tar padding, anything after the end blocks) so every byte is checked."""
        self.total += len(self._cur) - self._pos
        self._cur, self._pos = b"", 0
        for piece in self._pieces:
            self.total += len(piece)


def _pieces(chunks: Iterator[bytes], hasher: _BlobHasher, decoder: _Decoder) -> Iterator[bytes]:
    for chunk in chunks:
        if chunk:
            hasher.update(chunk)  # hash first: the digest check must see every byte
            yield from decoder.feed(chunk)
    yield from decoder.finish()


def _scan_tar(source: _TarSource, maker: EntryMaker) -> list[Entry]:
    try:
        tf = tarfile.open(fileobj=source, mode="r|", encoding="utf-8", errors="surrogateescape",
                          tarinfo=_StrictTarInfo)
    except tarfile.ReadError:
        if source.total == 0:
            source.drain()
            if source.total == 0:
                return []  # no bytes at all: an empty layer, as Go's tar reader sees it
        raise
    entries: list[Entry] = []
    with tf:
        while (ti := tf.next()) is not None:
            tf.members.clear()  # tarfile keeps every TarInfo otherwise: memory for nothing
            entry = maker.make(ti)
            if entry is not None:
                entries.append(entry)
    return entries



def scan_layer(chunks: Iterable[bytes], *, digest: str, size: int, compression: Compression,
               root: str, span: int, chunk_size: int, warn: Callable[[str], None] | None = None,
               wanted: Sequence[int] = (), ends: Sequence[int] = ()) -> LayerScan:
    """Index the layer blob whose bytes *chunks* yields in order (see the module docstring).

    *wanted*: uncompressed offsets that should get a seek point at or just before them, *ends*
    offsets that should get one at or just after them (gzip only: `zran.GzipScanner`; zstd points
    stay at frame starts, a plain layer needs none).

    Raises InputError (DigestMismatch for a wrong digest) naming the layer if the blob is not
    *size* bytes with sha256 *digest*, does not decompress, or is not a tar. Members with absolute
    or climbing paths are dropped with a message to *warn* (default: this module's logger).
    """
    what = f"layer {digest}"
    maker = EntryMaker(root, warn or log.warning, what)
    hasher = _BlobHasher(what, size, chunk_size)
    decoder: _Decoder = (_Plain() if compression == "none" else _Gzip(span, wanted, ends) if compression == "gzip"
                         else _Zstd(span))
    chunk_iter = iter(chunks)
    source = _TarSource(_pieces(chunk_iter, hasher, decoder))
    problem: Exception | None = None
    try:
        entries = _scan_tar(source, maker)
        source.drain()
    except _Oversize:
        raise
    except (_CorruptStream, tarfile.TarError, InputError) as e:
        problem = e  # reported after the digest check: a damaged download should say so
    finally:
        decoder.close()
    if problem is not None:
        for chunk in chunk_iter:
            hasher.update(chunk)
    digests = hasher.finish(digest)
    if isinstance(problem, InputError):
        raise problem
    if problem is not None:
        kind = "not a valid tar archive" if isinstance(problem, tarfile.TarError) else "does not decompress"
        raise InputError(what, f"{kind}: {problem}")
    return LayerScan(entries, decoder.points, digests, source.total)
