"""eStargz layers, read lazily through their own table of contents: no index to build or publish.

An eStargz blob (the stargz-snapshotter ecosystem's format, docs/estargz.md there) is an ordinary
gzip tar written so that every regular file's data, in chunks, begins a gzip member of its own. The
last tar entry, `stargz.index.json` (the TOC), sits in its own member, and a 51-byte footer (an empty
gzip member whose extra field holds "%016xSTARGZ" % toc_offset) ends the blob. The TOC lists every
entry with its metadata and, for each data chunk, the offset of its member and the sha256 of its
uncompressed bytes (`chunkDigest`). The TOC itself is trusted through the layer descriptor's
annotation `containerd.io/snapshot/stargz/toc.digest` (the manifest is verified by digest).

`index_from_toc` turns a TOC into a `LayerIndex` over a *virtual* uncompressed stream: the files'
data only, chunk after chunk in blob order (the tar headers between them are never read, so they
get no place in it). Each chunk is a seek point at its member's header (`zran.MEMBER_START`), and
its chunkDigest is that region's digest (`LayerIndex.region_digests`): the reader checks every
region it decodes against it, which is what makes range reads of an eStargz layer trustworthy.

`fetch_toc` finds and verifies the TOC with one range read of the blob's tail, sized from the
layer's size (two reads when the TOC is larger than that guess). The store keeps the TOC's gzip
member as it is in the blob, and its length gives the TOC's offset; beside it, the index made
from it (format 2), which is what a mount loads.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_FLOOR, Decimal
from typing import Any

from imagefs import zran
from imagefs.entry import Entry, EntryType
from imagefs.errors import DigestMismatch, InputError
from imagefs.index import DEFAULT_CHUNK_SIZE, DEFAULT_SPAN, LayerIndex, SeekPoint
from imagefs.layerscan import EntryMaker

TOC_NAME = "stargz.index.json"
FOOTER_SIZE = 51
# The first range read of a layer's tail is a guess at its TOC's size: TOCs run at 0.5-0.7% of
# their layer (some 50 compressed bytes per entry, an entry per ~8 KB of layer), so 1/TAIL_SHARE
# of the layer plus MIN_TAIL, at most TAIL_BYTES, usually holds the TOC and the footer in one
# request without fetching much else. A TOC larger than the guess costs a second request.
TAIL_BYTES = 4 << 20
TAIL_SHARE = 128
MIN_TAIL = 16 << 10
MAX_TOC_MEMBER = 64 << 20  # compressed; a TOC is ~100 bytes per entry
MAX_TOC_JSON = 512 << 20
MAX_CHUNK = 64 << 20  # a region is decoded whole to be verified: bound what one read may cost
# Files the eStargz writer adds to mark where its prioritized files end; not part of the image.
LANDMARKS = (b".prefetch.landmark", b".no.prefetch.landmark")

_FOOTER_PAYLOAD = re.compile(rb"([0-9a-f]{16})STARGZ")
_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", re.ASCII)
_ENTRY_TYPES = {"dir": EntryType.DIR, "reg": EntryType.FILE, "symlink": EntryType.SYMLINK,
                "hardlink": EntryType.HARDLINK, "char": EntryType.CHAR, "block": EntryType.BLOCK,
                "fifo": EntryType.FIFO}


def toc_offset(footer: bytes, blob_size: int, what: str) -> int:
    """The TOC's offset from the blob's last FOOTER_SIZE bytes; InputError if they are no footer."""
    if len(footer) != FOOTER_SIZE or footer[:4] != b"\x1f\x8b\x08\x04":
        raise InputError(what, "no eStargz footer at the end of the layer")
    xlen, sub, sublen = int.from_bytes(footer[10:12], "little"), footer[12:14], int.from_bytes(footer[14:16], "little")
    m = _FOOTER_PAYLOAD.fullmatch(footer[16:38])
    if xlen != 26 or sub != b"SG" or sublen != 22 or m is None:
        raise InputError(what, "no eStargz footer at the end of the layer")
    try:
        if zlib.decompress(footer, wbits=31) != b"":
            raise zlib.error("not empty")
    except zlib.error:
        raise InputError(what, "the eStargz footer is not an empty gzip member") from None
    offset = int(m.group(1), 16)
    if offset > blob_size - FOOTER_SIZE:
        raise InputError(what, f"eStargz TOC offset {offset} is past the end of the layer")
    return offset


def read_toc_member(member: bytes, toc_digest: str, what: str) -> bytes:
    """The TOC JSON from its gzip member, checked against *toc_digest* (the layer's annotation)."""
    d = zlib.decompressobj(wbits=31)
    try:
        tar = d.decompress(member, MAX_TOC_JSON + 4096)
    except zlib.error as e:
        raise InputError(what, f"eStargz TOC does not inflate: {e}") from None
    if not d.eof or d.unused_data or d.unconsumed_tail:
        raise InputError(what, "eStargz TOC is not exactly one gzip member (or is too large)")
    try:
        with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
            info = tf.next()
            if info is None or info.name != TOC_NAME or not info.isreg():
                raise InputError(what, f"eStargz TOC member holds no {TOC_NAME}")
            f = tf.extractfile(info)
            assert f is not None
            toc = f.read()
    except tarfile.TarError as e:
        raise InputError(what, f"eStargz TOC is not a tar: {e}") from None
    actual = "sha256:" + hashlib.sha256(toc).hexdigest()
    if actual != toc_digest:
        raise DigestMismatch(f"{what}: eStargz TOC", toc_digest, actual)
    return toc


def fetch_toc(read_range: Callable[[int, int], bytes], size: int, toc_digest: str, what: str) -> bytes:
    """The layer's TOC gzip member (verified), read from the end of the blob."""
    if size < FOOTER_SIZE:
        raise InputError(what, "too small to be an eStargz layer")
    tail_start = max(size - min(TAIL_BYTES, size // TAIL_SHARE + MIN_TAIL), 0)
    tail = read_range(tail_start, size - tail_start)
    offset = toc_offset(tail[-FOOTER_SIZE:], size, what)
    end = size - FOOTER_SIZE
    if end - offset > MAX_TOC_MEMBER:
        raise InputError(what, f"eStargz TOC is {end - offset} bytes (more than {MAX_TOC_MEMBER})")
    member = tail[offset - tail_start:end - tail_start] if offset >= tail_start else read_range(offset, end - offset)
    read_toc_member(member, toc_digest, what)
    return member


@dataclass(slots=True)
class _Member:
    """One TOC entry's fields, as read (normalised later, by layerscan's EntryMaker)."""

    name: str
    type: EntryType
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    linkname: str
    devmajor: int
    devminor: int
    xattrs: dict[bytes, bytes]


@dataclass
class _Chunk:
    coffset: int
    chunk_offset: int
    digest: bytes
    size: int = 0  # filled in once the file's chunks are all known


def index_from_toc(member: bytes, *, digest: str, size: int, toc_digest: str,
                   warn: Callable[[str], None]) -> LayerIndex:
    """The layer's index (virtual layout: see the module docstring) from its TOC gzip member as
    `fetch_toc` returned it. InputError names the layer for anything malformed or inconsistent."""
    what = f"layer {digest}"
    toc_at = size - FOOTER_SIZE - len(member)
    if toc_at < 0:
        raise InputError(what, "eStargz TOC is larger than the layer")
    try:
        doc = json.loads(read_toc_member(member, toc_digest, what))
    except (ValueError, RecursionError) as e:
        raise InputError(what, f"eStargz TOC is not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(doc.get("entries"), list):
        raise InputError(what, "eStargz TOC: not a version 1 TOC with an entries list")
    maker = EntryMaker("", warn, what)
    infos: list[tuple[_Member, list[_Chunk]]] = []
    chunks_of: dict[str, list[_Chunk]] = {}  # a regular file's chunks, by TOC name
    mtimes: dict[str, int] = {}
    for n, raw in enumerate(doc["entries"]):
        fields = _Fields(raw, n, what)
        name, kind = fields.text("name", required=True), fields.text("type", required=True)
        if kind == "chunk":
            chunks = chunks_of.get(name)
            if chunks is None:
                raise InputError(what, f"eStargz TOC entry {n}: chunk of {name!r} before its file")
            chunks.append(_Chunk(fields.number("offset", required=True), fields.number("chunkOffset", required=True),
                                 fields.digest("chunkDigest")))
            continue
        etype = _ENTRY_TYPES.get(kind)
        if etype is None:
            warn(f"dropping {name!r}: unsupported eStargz TOC entry type {kind!r}")
            continue
        modtime = fields.text("modtime")
        mtime_ns = mtimes.get(modtime)
        if mtime_ns is None:  # most entries of a layer share a handful of times
            mtime_ns = mtimes[modtime] = _mtime_ns(modtime, what, n)
        member = _Member(name, etype, fields.number("mode"), fields.number("uid"), fields.number("gid"),
                         fields.number("size") if kind == "reg" else 0, mtime_ns, fields.text("linkName"),
                         fields.number("devMajor"), fields.number("devMinor"), fields.xattrs())
        chunks = []
        if kind == "reg":
            if member.size:
                chunks = [_Chunk(fields.number("offset", required=True), fields.number("chunkOffset"),
                                 fields.digest("chunkDigest"))]
            chunks_of[name] = chunks
        infos.append((member, chunks))

    # Lay the data out: every chunk of every file, in blob order, back to back.
    ordered: list[_Chunk] = []
    for m, chunks in infos:
        _size_chunks(m, chunks, what)
        ordered.extend(chunks)
    ordered.sort(key=lambda c: c.coffset)
    for a, b in zip(ordered, ordered[1:]):
        if a.coffset == b.coffset:
            raise InputError(what, f"eStargz TOC: two chunks at blob offset {a.coffset}")
    if ordered and ordered[-1].coffset >= toc_at:
        raise InputError(what, "eStargz TOC: a chunk lies past the TOC")
    uoffset_of: dict[int, int] = {}
    points: list[SeekPoint] = []
    region_digests: list[bytes] = []
    usize = 0
    for c in ordered:
        uoffset_of[id(c)] = usize
        points.append(SeekPoint(usize, c.coffset, zran.MEMBER_START))
        region_digests.append(c.digest)
        usize += c.size
    if points:  # the last chunk's member ends where the TOC's begins
        points.append(SeekPoint(usize, toc_at, zran.MEMBER_START))
        region_digests.append(b"")

    entries: list[Entry] = []
    for m, chunks in infos:
        offset = 0
        if chunks:
            starts = [uoffset_of[id(c)] for c in chunks]
            if starts != [starts[0] + c.chunk_offset for c in chunks]:
                raise InputError(what, f"eStargz TOC: the chunks of {m.name!r} are not consecutive in the blob")
            offset = starts[0]
        entry = maker.make_entry(m.name.encode("utf-8", "surrogateescape"), m.type, kind="", mode=m.mode,
                                 uid=m.uid, gid=m.gid, size=m.size, mtime_ns=m.mtime_ns,
                                 linkname=m.linkname.encode("utf-8", "surrogateescape"), devmajor=m.devmajor,
                                 devminor=m.devminor, offset=offset, xattrs=m.xattrs)
        if entry is None or entry.path in LANDMARKS:
            continue
        entries.append(entry)
    return LayerIndex(digest, size, "gzip", usize, "", DEFAULT_SPAN, DEFAULT_CHUNK_SIZE, entries, points, [],
                      b"", region_digests=region_digests)


def prioritized_paths(member: bytes, *, toc_digest: str, what: str) -> list[str]:
    """The layer's prioritized files (its built-in access profile): the regular files before its
    `.prefetch.landmark`, as normal relative paths, in order; [] when it has none."""
    doc = json.loads(read_toc_member(member, toc_digest, what))
    paths: list[str] = []
    for raw in doc.get("entries", []) if isinstance(doc, dict) else []:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            continue
        name = "/".join(p for p in raw["name"].split("/") if p and p != ".")
        if name == LANDMARKS[0].decode():
            return paths
        if raw.get("type") == "reg" and name and ".." not in name.split("/"):
            paths.append(name)
    return []  # no landmark: nothing is prioritized


def prioritized_extent(member: bytes, *, toc_digest: str, what: str) -> int:
    """How many leading bytes of the blob hold its prioritized files' data: the offset of its
    `.prefetch.landmark`'s member (the files before it are written before it); 0 when it has none.

    Quick, because a start waits for it: the landmark's entry is found in the JSON text and only
    that object is parsed (the answer only steers a prefetch, whose data is checked when read)."""
    toc = read_toc_member(member, toc_digest, what)
    at = toc.find(b'"name":"' + LANDMARKS[0] + b'"')
    if at < 0:
        return 0
    start = toc.rfind(b"{", 0, at)
    try:
        entry, _ = json.JSONDecoder().raw_decode(toc[start:].decode("utf-8", "replace"))
    except ValueError:
        return 0
    offset = entry.get("offset") if isinstance(entry, dict) and entry.get("name") == LANDMARKS[0].decode() else None
    return offset if type(offset) is int and offset > 0 else 0


def _size_chunks(ti: _Member, chunks: list[_Chunk], what: str) -> None:
    """Each chunk's size from the next one's chunkOffset (the last: to the file's end), checked."""
    if not chunks:
        return
    if chunks[0].chunk_offset != 0:
        raise InputError(what, f"eStargz TOC: {ti.name!r} does not start with its first chunk")
    ends = [c.chunk_offset for c in chunks[1:]] + [ti.size]
    for c, end in zip(chunks, ends):
        c.size = end - c.chunk_offset
        if c.size <= 0 or c.size > MAX_CHUNK:
            raise InputError(what, f"eStargz TOC: {ti.name!r} has a chunk of {c.size} bytes at {c.chunk_offset}")


def _mtime_ns(text: str, what: str, n: int) -> int:
    """An RFC 3339 time as nanoseconds since the epoch (clamped as a tar's would be); "" is 0."""
    if not text:
        return 0
    m = _RFC3339.fullmatch(text)
    if m is None:
        raise InputError(what, f"eStargz TOC entry {n}: bad modtime {text!r}")
    try:
        whole = datetime.fromisoformat(m.group(1) + ("+00:00" if m.group(3) == "Z" else m.group(3)))
    except ValueError:  # month 13, year 0, 25:00 ...
        raise InputError(what, f"eStargz TOC entry {n}: bad modtime {text!r}") from None
    seconds = Decimal(int(whole.timestamp())) + Decimal("0" + (m.group(2) or ""))
    ns = int(seconds.scaleb(9).to_integral_value(ROUND_FLOOR))
    return min(max(ns, -(1 << 63)), (1 << 63) - 1)


class _Fields:
    """Typed access to one TOC entry's JSON fields, with errors that say which entry is bad."""

    __slots__ = ("_raw", "_n", "_what")

    def __init__(self, raw: Any, n: int, what: str) -> None:
        if not isinstance(raw, dict):
            raise InputError(what, f"eStargz TOC entry {n}: not an object")
        self._raw, self._n, self._what = raw, n, what

    @property
    def _where(self) -> str:  # built only for an error: a TOC has one entry per file
        return f"eStargz TOC entry {self._n}"

    def _get(self, key: str, kind: type, default: Any, required: bool) -> Any:
        value = self._raw.get(key)
        if value is None:
            if required:
                raise InputError(self._what, f"{self._where}: no {key}")
            return default
        if not isinstance(value, kind) or isinstance(value, bool):
            raise InputError(self._what, f"{self._where}: {key} is not a {kind.__name__}")
        return value

    def text(self, key: str, *, required: bool = False) -> str:
        value = self._raw.get(key)
        if type(value) is str and value.isascii() and "\0" not in value:
            return value  # the common cases first: a TOC has one entry per file
        if value is None and not required:
            return ""
        value = self._get(key, str, "", required)
        if "\0" in value or not value.isascii():
            _check_text(value, f"{self._where}: {key}", self._what)
        return value

    def number(self, key: str, *, required: bool = False) -> int:
        value = self._raw.get(key)
        if type(value) is int and value >= 0:
            return value
        if value is None and not required:
            return 0
        value = self._get(key, int, 0, required)
        if value < 0:
            raise InputError(self._what, f"{self._where}: {key} is negative")
        return value

    def digest(self, key: str) -> bytes:
        text = self.text(key, required=True)
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", text):
            raise InputError(self._what, f"{self._where}: {key} is not a sha256 digest")
        return bytes.fromhex(text[7:])

    def xattrs(self) -> dict[bytes, bytes]:
        """Extended attributes (Go encodes []byte values as base64)."""
        raw = self._raw.get("xattrs")
        if raw is None:
            return {}
        raw = self._get("xattrs", dict, {}, False)
        out = {}
        for key, value in raw.items():
            _check_text(key, f"{self._where}: xattr name", self._what)
            try:
                data = base64.b64decode(value, validate=True)
            except (TypeError, ValueError):  # binascii.Error, or a str that is not ASCII
                raise InputError(self._what, f"{self._where}: xattr {key!r} is not base64") from None
            out[key.encode("utf-8", "surrogateescape")] = data
        return out


def _check_text(value: str, where: str, what: str) -> None:
    """A TOC string must stand for bytes a tar could hold: no NUL, no lone UTF-16 surrogate (JSON
    can spell both; Go's encoder never writes them). \udc80-\udcff are this project's spelling of
    undecodable bytes (surrogateescape) and stay allowed."""
    try:
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise InputError(what, f"{where} is not text a tar name could hold") from None
    if "\0" in value:
        raise InputError(what, f"{where} holds a NUL character")
