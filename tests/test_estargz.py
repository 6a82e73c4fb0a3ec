"""eStargz layers read through their own TOC (imagefs/estargz.py), checked against the fixture the
stargz-snapshotter's converter wrote (tests/data/estargz/README.md).

Pure (no registry, no FUSE): the index a TOC gives equals what the blob's own tar says (every
entry's metadata, every file's bytes through LayerReader, which fetches only the chunks it reads);
wrong footers, TOC members and TOC documents are each one clear InputError naming the layer;
unsafe names are dropped with a warning; a chunk that does not match its chunkDigest is refused
naming the layer, or, with a `forget` callback, fetched once more; a pull keeps only a TOC it can
use and lets the layer fall back to plain gzip otherwise.

End to end (the session registry, skopeo, FUSE): a lazy pull range-reads only the blobs' tails and
keeps the TOCs (no blobs, no indexes, no published-index lookup); a mount serves the image exactly
as the tars say (whiteout and opaque dir applied) while fetching about what it reads; a chunk
corrupted once in transit is refetched, one corrupted always is EIO and the rest is still served;
a wrong toc.digest annotation falls back to streaming; `--prefetch all` makes every layer a
verified local blob that serves with the registry gone; `imagefs index` builds full indexes.
"""

from __future__ import annotations

import errno
import functools
import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import stat
import tarfile
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from imagefs.entry import EntryType
from imagefs.errors import DigestMismatch, InputError
from imagefs.estargz import FOOTER_SIZE, LANDMARKS, TOC_NAME, fetch_toc, index_from_toc, read_toc_member
from imagefs.index import LayerIndex, build_index
from imagefs.layerread import LayerReader
from stores.model import Layer
from stores.pull import _take_tocs
from stores.store import Store
from tests.conftest import requires_skopeo
from tests.mounts import Cli, Mounts, diff, needs_fuse, snapshot
from tests.support.images import push, wait_until
from tests.support.registry import Registry, Reply, Seen
from tests.test_published_index import CountingFront

LAYOUT = Path(__file__).parent / "data" / "estargz" / "layout"
TOC_ANN = "containerd.io/snapshot/stargz/toc.digest"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
CACHE_CHUNK = 64 << 10  # the chunk cache's unit of fetching (imagefs/index.py DEFAULT_CHUNK_SIZE)
LAYER_NAMES = ("layer1", "layer2")
# What reading a layer as a plain gzip tar shows beside the files of the image: the eStargz
# writer's own members (hidden when the layer is read through its TOC).
ESTARGZ_MEMBERS = {b".no.prefetch.landmark", b"stargz.index.json"}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- the fixture, as its tars and TOCs say (independently of the code under test)


@dataclass(frozen=True)
class FixtureLayer:
    digest: str
    size: int
    toc_digest: str
    blob: bytes

    @property
    def hex(self) -> str:
        return self.digest[7:]

    @property
    def toc_at(self) -> int:
        return int(self.blob[-FOOTER_SIZE:][16:32], 16)

    @property
    def member(self) -> bytes:
        """The TOC's gzip member, exactly as in the blob."""
        return self.blob[self.toc_at:-FOOTER_SIZE]

    def toc(self) -> dict:
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(self.member))) as t:
            return json.loads(t.extractfile(TOC_NAME).read())  # type: ignore[union-attr]

    def tar(self) -> list[tuple[tarfile.TarInfo, bytes]]:
        """The whole blob gunzipped and read as the tar it also is."""
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(self.blob))) as t:
            return [(ti, t.extractfile(ti).read() if ti.isreg() else b"") for ti in t]  # type: ignore[union-attr]

    def read(self, start: int, n: int) -> bytes:
        return self.blob[start:start + n]


@dataclass(frozen=True)
class Fixture:
    manifest: bytes
    layers: tuple[FixtureLayer, ...]

    @property
    def digest(self) -> str:
        return sha(self.manifest)


def _blob(layout: Path, digest: str) -> bytes:
    data = (layout / "blobs" / "sha256" / digest[7:]).read_bytes()
    assert sha(data) == digest
    return data


@functools.cache
def fixture() -> Fixture:
    index = json.loads((LAYOUT / "index.json").read_text())
    (desc,) = [m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == "1"]
    manifest = _blob(LAYOUT, desc["digest"])
    layers = tuple(FixtureLayer(d["digest"], d["size"], d["annotations"][TOC_ANN], _blob(LAYOUT, d["digest"]))
                   for d in json.loads(manifest)["layers"])
    return Fixture(manifest, layers)


def toc_index(layer: FixtureLayer, warn: Callable[[str], None] | None = None) -> LayerIndex:
    warnings: list[str] = []
    index = index_from_toc(layer.member, digest=layer.digest, size=layer.size, toc_digest=layer.toc_digest,
                           warn=warn or warnings.append)
    assert warnings == []
    return index


def toc_mtime_ns(text: str) -> int:
    """An RFC 3339 modtime in whole seconds (what the converter writes) as nanoseconds."""
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()) * 10**9


def tar_mtime_ns(ti: tarfile.TarInfo) -> int:
    return int(Decimal(ti.pax_headers.get("mtime", ti.mtime)) * 10**9)


def norm(name: str) -> bytes:
    return name.rstrip("/").encode()


_KIND = {tarfile.REGTYPE: EntryType.FILE, tarfile.DIRTYPE: EntryType.DIR, tarfile.SYMTYPE: EntryType.SYMLINK,
         tarfile.LNKTYPE: EntryType.HARDLINK, tarfile.FIFOTYPE: EntryType.FIFO}


# -- building TOC members and blobs by hand


def toc_member(doc: dict | bytes, name: str = TOC_NAME) -> tuple[bytes, str]:
    """A TOC gzip member holding *doc* (JSON bytes as given, or a dict to encode), and its digest."""
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        ti = tarfile.TarInfo(name)
        ti.size = len(raw)
        t.addfile(ti, io.BytesIO(raw))
    return gzip.compress(buf.getvalue(), mtime=0), sha(raw)


def footer(layer: FixtureLayer, offset: int) -> bytes:
    real = layer.blob[-FOOTER_SIZE:]
    return real[:16] + b"%016x" % offset + real[32:]


def with_toc(layer: FixtureLayer, doc: dict | bytes) -> tuple[bytes, bytes, str]:
    """*layer*'s blob with its TOC replaced by *doc* (its data members untouched, so the TOC's
    offsets still point at them): (blob, TOC member, TOC digest)."""
    member, digest = toc_member(doc)
    return layer.blob[:layer.toc_at] + member + footer(layer, layer.toc_at), member, digest


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1:]


def region_of(index: LayerIndex, path: bytes, chunk: int) -> int:
    """The index's region (seek point) holding chunk *chunk* of file *path*."""
    entry = next(e for e in index.entries if e.path == path)
    starts = [p.uoffset for p in index.points]
    return starts.index(entry.offset) + chunk


# -- 1. the index a TOC gives is what the tar says


@pytest.mark.parametrize("n", [0, 1], ids=LAYER_NAMES)
def test_index_from_toc_matches_the_blobs_tar(n):
    layer = fixture().layers[n]
    index = toc_index(layer)
    toc = {norm(e["name"]): e for e in layer.toc()["entries"] if e["type"] != "chunk"}
    tar = {norm(ti.name): (ti, data) for ti, data in layer.tar()}
    assert set(LANDMARKS) & set(tar) and TOC_NAME.encode() in tar  # the writer's own members are there...
    entries = {e.path: e for e in index.entries}
    assert len(entries) == len(index.entries)
    assert set(entries) == set(tar) - set(LANDMARKS) - {TOC_NAME.encode()}  # ...and only those are hidden
    assert (index.compression, index.compressed_size, index.digest) == ("gzip", layer.size, layer.digest)
    reader = LayerReader(index, layer.read)
    for path, entry in entries.items():
        ti, data = tar[path]
        assert entry.type == _KIND[ti.type], path
        assert (entry.mode, entry.uid, entry.gid) == (ti.mode & 0o7777, ti.uid, ti.gid), path
        assert entry.size == (ti.size if ti.isreg() else 0), path
        assert entry.linkname == (ti.linkname.encode() if ti.issym() or ti.islnk() else b""), path
        assert entry.xattrs == {k[13:].encode(): v.encode() for k, v in ti.pax_headers.items()
                                if k.startswith("SCHILY.xattr.")}, path
        assert entry.mtime_ns == toc_mtime_ns(toc[path]["modtime"]), path  # from the TOC...
        if path != b"etc/owned.conf":
            assert entry.mtime_ns == tar_mtime_ns(ti), path  # ...which has whole seconds only
        if entry.type == EntryType.FILE:
            assert reader.read_entry(entry, 0, entry.size + 10) == data, path
    if n == 0:
        big, big_data = entries[b"usr/lib/big.bin"], tar[b"usr/lib/big.bin"][1]
        assert big_data == random_big() and big.size == 307200
        assert reader.read_entry(big, 65536 - 10, 20) == big_data[65526:65546]  # across a chunk boundary
        assert reader.read_entry(big, 307190, 100) == big_data[-10:]
        assert (entries[b"usr/lib/hard"].type, entries[b"usr/lib/hard"].linkname) == (EntryType.HARDLINK, b"usr/lib/text.txt")
        assert (entries[b"usr/lib/link"].type, entries[b"usr/lib/link"].linkname) == (EntryType.SYMLINK, b"text.txt")
        assert entries[b"etc/fifo"].type == EntryType.FIFO
        assert entries[b"etc/xattr.txt"].xattrs == {b"user.test": b"hello"}
        owned = entries[b"etc/owned.conf"]
        assert (owned.uid, owned.gid, owned.mode) == (1000, 1000, 0o640)
        assert owned.mtime_ns == 1_700_000_001 * 10**9 and tar_mtime_ns(tar[b"etc/owned.conf"][0]) == 1_700_000_000_500_000_000
        # big.bin is 5 chunks, text.txt 4: each a region with its chunkDigest
        regions = [region_of(index, b"usr/lib/big.bin", k) for k in range(5)]
        assert [index.points[r + 1].uoffset - index.points[r].uoffset for r in regions] == [65536] * 4 + [45056]
        assert index.region_digests is not None
        assert [index.region_digests[r] for r in regions] == [
            bytes.fromhex(e["chunkDigest"][7:]) for e in layer.toc()["entries"] if e["name"] == "usr/lib/big.bin"]
    # The same metadata as the layer's own streaming index (offsets aside: the TOC's layout is
    # virtual, data only; mtimes aside: the TOC has whole seconds).
    full = build_index([layer.blob], digest=layer.digest, size=layer.size, compression="gzip", root="")
    plain = {e.path: replace(e, offset=0, mtime_ns=0) for e in full.entries if e.path not in ESTARGZ_MEMBERS}
    assert plain == {p: replace(e, offset=0, mtime_ns=0) for p, e in entries.items()}


def test_a_read_fetches_only_the_chunks_it_needs():
    layer = fixture().layers[0]
    index = toc_index(layer)
    asked: list[tuple[int, int]] = []

    def fetch(start: int, n: int) -> bytes:
        asked.append((start, start + n))
        return layer.read(start, n)

    reader = LayerReader(index, fetch)
    big = next(e for e in index.entries if e.path == b"usr/lib/big.bin")
    region = region_of(index, b"usr/lib/big.bin", 2)
    lo, hi = index.points[region].coffset, index.points[region + 1].coffset
    data = reader.read_entry(big, 2 * 65536 + 100, 1000)
    assert data == random_big()[2 * 65536 + 100:2 * 65536 + 1100]
    assert asked and all(lo <= a and b <= hi for a, b in asked), (asked, lo, hi)
    assert all(b1 <= a2 for (_, b1), (a2, _) in zip(asked, asked[1:]))  # nothing fetched twice
    assert sum(b - a for a, b in asked) > hi - lo - 64  # the chunk's member, about whole (checked whole)


@functools.cache
def random_big() -> bytes:
    import random

    return random.Random(7).randbytes(300 * 1024)  # README: how big.bin was made


# -- 2. footers, TOC members and TOC documents that are wrong: one InputError each


def _what(layer: FixtureLayer) -> str:
    return f"layer {layer.digest}"


def _footer_cases() -> dict[str, tuple[Callable[[FixtureLayer], tuple[bytes, str]], str]]:
    def blob_with_footer(make: Callable[[FixtureLayer, bytes], bytes]) -> Callable[[FixtureLayer], tuple[bytes, str]]:
        return lambda layer: (layer.blob[:-FOOTER_SIZE] + make(layer, layer.blob[-FOOTER_SIZE:]), layer.toc_digest)

    return {
        "too small": (lambda layer: (layer.blob[-50:], layer.toc_digest), "too small to be an eStargz layer"),
        "no footer": (lambda layer: (layer.blob[:layer.toc_at], layer.toc_digest), "no eStargz footer"),
        "magic": (blob_with_footer(lambda layer, f: b"\x1f\x8c" + f[2:]), "no eStargz footer"),
        "STARGZ": (blob_with_footer(lambda layer, f: f[:32] + b"STARGY" + f[38:]), "no eStargz footer"),
        "offset not hex": (blob_with_footer(lambda layer, f: f[:16] + b"000000000000zz00" + f[32:]), "no eStargz footer"),
        "offset past the end": (blob_with_footer(lambda layer, f: footer(layer, layer.size)),
                                f"TOC offset {fixture().layers[0].size} is past the end"),
        "footer not empty": (blob_with_footer(lambda layer, f: f[:-8] + b"\x01\x02\x03\x04" + f[-4:]),
                             "not an empty gzip member"),
        "TOC not gzip": (blob_with_footer(lambda layer, f: footer(layer, layer.toc_at + 3)), "TOC does not inflate"),
        "TOC not one member": (blob_with_footer(lambda layer, f: footer(layer, region_start(layer, -1))),
                               "not exactly one gzip member"),
        "TOC digest": (lambda layer: (layer.blob, sha(b"another TOC")), "digest mismatch"),
        "TOC not a tar": (lambda layer: (layer.blob[:layer.toc_at] + gzip.compress(b"x" * 1024, mtime=0)
                                         + footer(layer, layer.toc_at), layer.toc_digest), "not a tar"),
        "TOC of another name": (lambda layer: (layer.blob[:layer.toc_at] + toc_member(b"{}", "index.json")[0]
                                               + footer(layer, layer.toc_at), layer.toc_digest),
                                f"holds no {TOC_NAME}"),
    }


def region_start(layer: FixtureLayer, k: int) -> int:
    """Where the member of the layer's *k*-th chunk (in blob order) starts."""
    return sorted(e["offset"] for e in layer.toc()["entries"] if "offset" in e)[k]


@pytest.mark.parametrize("case", list(_footer_cases()))
def test_footer_and_toc_member_refusals(case):
    layer = fixture().layers[0]
    make, needle = _footer_cases()[case]
    blob, toc_digest = make(layer)
    with pytest.raises(InputError) as e:
        fetch_toc(lambda start, n: blob[start:start + n], len(blob), toc_digest, _what(layer))
    assert needle in str(e.value), str(e.value)
    if case == "TOC digest":
        assert isinstance(e.value, DigestMismatch) and e.value.expected == toc_digest
        assert e.value.actual == layer.toc_digest
    else:
        assert e.value.what == _what(layer) and type(e.value) is InputError
    assert len(str(e.value).splitlines()) == 1


def test_fetch_toc_reads_only_the_tail_and_returns_the_member():
    for layer in fixture().layers:
        asked: list[tuple[int, int]] = []

        def fetch(start: int, n: int, layer: FixtureLayer = layer) -> bytes:
            asked.append((start, n))
            return layer.read(start, n)

        assert fetch_toc(fetch, layer.size, layer.toc_digest, _what(layer)) == layer.member
        ((start, n),) = asked  # one request, of the blob's end
        assert start + n == layer.size
        assert n == layer.size if layer.size < 16 << 10 else n <= layer.size // 4, (layer.size, n)
        assert json.loads(read_toc_member(layer.member, layer.toc_digest, "x")) == layer.toc()


def test_a_toc_bigger_than_the_first_read_costs_a_second_one():
    layer = fixture().layers[0]
    # A TOC as big as the layer's first tail read: the same entries, padded with dirs.
    doc = layer.toc()
    doc["entries"] += [{"name": f"pad/{hashlib.sha256(b'%d' % n).hexdigest()}/", "type": "dir", "mode": 493}
                       for n in range(2000)]
    blob, member, toc_digest = with_toc(layer, json.dumps(doc).encode())
    assert len(member) > 16 << 10 and len(member) > len(blob) // 8
    asked: list[tuple[int, int]] = []

    def fetch(start: int, n: int) -> bytes:
        asked.append((start, n))
        return blob[start:start + n]

    assert fetch_toc(fetch, len(blob), toc_digest, "x") == member
    assert len(asked) == 2 and asked[1] == (layer.toc_at, len(member))


def _doc_cases() -> dict[str, tuple[Callable[[dict], dict | bytes], str]]:
    def entry(doc: dict, name: str, kind: str | None = None, k: int = 0) -> dict:
        return [e for e in doc["entries"] if e["name"] == name and (kind is None or e["type"] == kind)][k]

    def edit(change: Callable[[dict], object]) -> Callable[[dict], dict]:
        def apply(doc: dict) -> dict:
            change(doc)
            return doc
        return apply

    def chunk_first(doc: dict) -> None:
        entries = doc["entries"]
        chunk = entry(doc, "usr/lib/big.bin", "chunk")
        entries.remove(chunk)
        entries.insert(entries.index(entry(doc, "usr/lib/big.bin", "reg")), chunk)

    def swap_chunks(doc: dict) -> None:
        a, b = entry(doc, "usr/lib/big.bin", "chunk", 1), entry(doc, "usr/lib/big.bin", "chunk", 2)
        a["offset"], b["offset"] = b["offset"], a["offset"]

    return {
        "not JSON": (lambda doc: b'{"version": 1, "entries": [', "TOC is not JSON"),
        "nested too deep": (lambda doc: b"[" * 100_000 + b"]" * 100_000, "TOC is not JSON"),
        "version 2": (edit(lambda doc: doc.update(version=2)), "not a version 1 TOC"),
        "no entries": (edit(lambda doc: doc.update(entries={})), "not a version 1 TOC"),
        "entry not an object": (edit(lambda doc: doc["entries"].append(["etc/x", "reg"])), "not an object"),
        "no name": (edit(lambda doc: doc["entries"][1].pop("name")), "entry 1: no name"),
        "chunk before its file": (edit(chunk_first), "chunk of 'usr/lib/big.bin' before its file"),
        "two chunks at one offset": (edit(lambda doc: entry(doc, "usr/lib/big.bin", "chunk", 1).update(
            offset=entry(doc, "usr/lib/big.bin", "chunk", 0)["offset"])), "two chunks at blob offset"),
        "a chunk past the TOC": (edit(lambda doc: entry(doc, "var/cache/old.txt").update(
            offset=fixture().layers[0].toc_at)), "a chunk lies past the TOC"),
        "chunks not consecutive": (edit(swap_chunks), "chunks of 'usr/lib/big.bin' are not consecutive"),
        "first chunk not at 0": (edit(lambda doc: entry(doc, "usr/lib/text.txt", "reg").update(chunkOffset=10)),
                                 "does not start with its first chunk"),
        "empty chunk": (edit(lambda doc: entry(doc, "usr/lib/big.bin", "chunk", 1).update(
            chunkOffset=entry(doc, "usr/lib/big.bin", "chunk", 0)["chunkOffset"])), "has a chunk of 0 bytes"),
        "bad modtime": (edit(lambda doc: entry(doc, "etc/").update(modtime="yesterday")), "bad modtime 'yesterday'"),
        "impossible modtime": (edit(lambda doc: entry(doc, "etc/").update(modtime="2023-13-45T25:61:61Z")),
                               "bad modtime"),
        "year 0": (edit(lambda doc: entry(doc, "etc/").update(modtime="0000-01-01T00:00:00Z")), "bad modtime"),
        "negative size": (edit(lambda doc: entry(doc, "etc/hostname").update(size=-8)), "size is negative"),
        "size not a number": (edit(lambda doc: entry(doc, "etc/hostname").update(size="8")), "size is not a int"),
        "size a bool": (edit(lambda doc: entry(doc, "etc/hostname").update(size=True)), "size is not a int"),
        "no offset": (edit(lambda doc: entry(doc, "etc/hostname").pop("offset")), "no offset"),
        "bad chunkDigest": (edit(lambda doc: entry(doc, "etc/hostname").update(chunkDigest="sha256:XYZ")),
                            "chunkDigest is not a sha256 digest"),
        "no chunkDigest": (edit(lambda doc: entry(doc, "usr/lib/big.bin", "chunk", 3).pop("chunkDigest")),
                           "no chunkDigest"),
        "uid out of range": (edit(lambda doc: entry(doc, "etc/owned.conf").update(uid=1 << 64)), "uid"),
        "xattr not base64": (edit(lambda doc: entry(doc, "etc/xattr.txt").update(xattrs={"user.test": "h*llo"})),
                             "xattr 'user.test' is not base64"),
        "xattr not ASCII": (edit(lambda doc: entry(doc, "etc/xattr.txt").update(xattrs={"user.test": "h\u00e9llo"})),
                            "is not base64"),
        "name a lone surrogate": (edit(lambda doc: entry(doc, "etc/empty").update(name="etc/\ud800")),
                                  "name is not text a tar name could hold"),
        "link a lone surrogate": (edit(lambda doc: entry(doc, "usr/lib/link").update(linkName="\udbff")),
                                  "linkName is not text"),
        "xattr name a lone surrogate": (edit(lambda doc: entry(doc, "etc/xattr.txt").update(
            xattrs={"user.\ud800": "aGk="})), "xattr name is not text"),
        "name with NUL": (edit(lambda doc: entry(doc, "etc/empty").update(name="etc/em\u0000pty")), "NUL"),
    }


@pytest.mark.parametrize("case", list(_doc_cases()))
def test_malformed_toc_documents_are_refused(case):
    layer = fixture().layers[0]
    make, needle = _doc_cases()[case]
    doc = make(layer.toc())
    blob, member, toc_digest = with_toc(layer, doc if isinstance(doc, bytes) else json.dumps(doc).encode())
    digest = sha(blob)
    with pytest.raises(InputError) as e:
        index_from_toc(member, digest=digest, size=len(blob), toc_digest=toc_digest, warn=lambda msg: None)
    assert type(e.value) is InputError and e.value.what == f"layer {digest}"
    assert needle in e.value.why, e.value.why
    assert len(str(e.value).splitlines()) == 1
    # fetch_toc vouches only for the member: the document is index_from_toc's to judge
    assert fetch_toc(lambda s, n: blob[s:s + n], len(blob), toc_digest, "x") == member


def test_a_toc_that_does_not_fit_its_blob_is_refused():
    layer = fixture().layers[1]
    with pytest.raises(InputError, match="TOC is larger than the layer"):
        index_from_toc(layer.member, digest=layer.digest, size=len(layer.member), toc_digest=layer.toc_digest,
                       warn=lambda msg: None)
    with pytest.raises(DigestMismatch):
        index_from_toc(layer.member, digest=layer.digest, size=layer.size, toc_digest=fixture().layers[0].toc_digest,
                       warn=lambda msg: None)


def test_unsafe_and_unknown_entries_are_dropped_with_a_warning():
    layer = fixture().layers[1]
    doc = layer.toc()
    fresh = next(e for e in doc["entries"] if e["name"] == "var/cache/fresh.txt")
    fresh["name"] = "../fresh.txt"  # its data stays in the blob, under an unsafe name
    doc["entries"] += [
        {"name": "/etc/abs/", "type": "dir", "mode": 493},
        {"name": "var/../../up", "type": "symlink", "linkName": "x"},
        {"name": "etc/hardout", "type": "hardlink", "linkName": "../etc/new.txt"},
        {"name": "etc/abshard", "type": "hardlink", "linkName": "/etc/new.txt"},
        {"name": "etc/sock", "type": "socket"},
        {"name": "etc/zero", "type": "0"},  # a tar type letter is no TOC type
        {"name": "./etc/./dotted.txt", "type": "hardlink", "linkName": "etc/new.txt"},  # safe, normalised
    ]
    blob, member, toc_digest = with_toc(layer, json.dumps(doc).encode())
    warnings: list[str] = []
    index = index_from_toc(member, digest=sha(blob), size=len(blob), toc_digest=toc_digest, warn=warnings.append)
    paths = {e.path for e in index.entries}
    assert paths == {b"etc", b"etc/.wh.hostname", b"etc/new.txt", b"var", b"var/cache", b"var/cache/.wh..wh..opq",
                     b"etc/dotted.txt"}
    assert next(e for e in index.entries if e.path == b"etc/dotted.txt").linkname == b"etc/new.txt"
    assert len(warnings) == 7, warnings
    for needle in ("../fresh.txt", "/etc/abs/", "var/../../up", "etc/hardout", "etc/abshard", "'socket'", "'0'"):
        assert sum(needle in w for w in warnings) == 1, (needle, warnings)
    reader = LayerReader(index, lambda s, n: blob[s:s + n])
    new = next(e for e in index.entries if e.path == b"etc/new.txt")
    assert reader.read_entry(new, 0, 100) == b"added in layer 2\n"


# -- 3. reads check every chunk against its chunkDigest


def _bad_chunk() -> tuple[FixtureLayer, LayerIndex, int, int, int, bytes]:
    """Layer 1 with one byte of big.bin's third chunk changed, its gzip member still valid (the
    member is stored deflate blocks, random data: the byte is changed in place and the trailer's
    CRC made to match), so only the chunkDigest can tell. Returns the layer, its index, the
    chunk's region and compressed extent [lo, hi) (its member), and the bad blob."""
    layer = fixture().layers[0]
    index = toc_index(layer)
    region = region_of(index, b"usr/lib/big.bin", 2)
    lo, hi = index.points[region].coffset, index.points[region + 1].coffset
    d = zlib.decompressobj(31)
    data = d.decompress(layer.blob[lo:hi])
    assert d.eof and not d.unused_data and data == random_big()[2 * 65536:3 * 65536]  # exactly its member
    assert layer.blob[lo + 10] == 0 and layer.blob[lo + 15:lo + 1015] == data[:1000]  # stored: data as is
    at = lo + 15 + 1000
    bad = flip(layer.blob, at)
    wrong = flip(data, 1000)
    bad = bad[:hi - 8] + zlib.crc32(wrong).to_bytes(4, "little") + bad[hi - 4:]
    assert gzip.decompress(bad[lo:hi]) == wrong
    return layer, index, region, lo, hi, bad


def test_a_chunk_that_does_not_match_its_digest_is_refused_naming_the_layer():
    layer, index, region, lo, hi, bad = _bad_chunk()
    reader = LayerReader(index, lambda s, n: bad[s:s + n])
    big = next(e for e in index.entries if e.path == b"usr/lib/big.bin")
    for _ in range(2):  # refused every time: nothing wrong was cached
        with pytest.raises(InputError) as e:
            reader.read_entry(big, 2 * 65536 + 5, 10)
        assert e.value.what == f"layer {layer.digest}"
        assert e.value.why == f"the eStargz chunk at blob offset {lo} does not match its chunkDigest"
    # The other chunks and files are fine.
    assert reader.read_entry(big, 0, 65536) == random_big()[:65536]
    assert reader.read_entry(big, 3 * 65536, 1 << 20) == random_big()[3 * 65536:]
    text = next(e for e in index.entries if e.path == b"usr/lib/text.txt")
    assert reader.read_entry(text, 0, text.size) == dict((ti.name, d) for ti, d in layer.tar())["usr/lib/text.txt"]
    # A chunk whose compressed bytes no longer inflate (text.txt's compress well) is refused too.
    region = region_of(index, b"usr/lib/text.txt", 1)
    at = (index.points[region].coffset + index.points[region + 1].coffset) // 2
    broken = flip(layer.blob, at)
    reader = LayerReader(index, lambda s, n: broken[s:s + n])
    with pytest.raises(InputError) as e:
        reader.read_entry(text, 65536, 100)
    assert e.value.what == f"layer {layer.digest}"
    assert f"chunk at blob offset {index.points[region].coffset} " in e.value.why
    assert "does not inflate" in e.value.why or "does not match its chunkDigest" in e.value.why


@pytest.mark.parametrize("heals", [True, False], ids=["refetched", "still-bad"])
def test_a_bad_chunk_is_forgotten_and_fetched_once_more(heals):
    layer, index, region, lo, hi, bad = _bad_chunk()
    forgotten: list[tuple[int, int]] = []
    state = {"bad": True}

    def fetch(start: int, n: int) -> bytes:  # like a cache that holds bad bytes until told to drop them
        return (bad if state["bad"] else layer.blob)[start:start + n]

    def forget(start: int, end: int) -> None:
        forgotten.append((start, end))
        if heals:
            state["bad"] = False

    reader = LayerReader(index, fetch, forget=forget)
    big = next(e for e in index.entries if e.path == b"usr/lib/big.bin")
    if heals:
        assert reader.read_entry(big, 0, big.size) == random_big()
    else:
        with pytest.raises(InputError, match=f"chunk at blob offset {lo} does not match its chunkDigest"):
            reader.read_entry(big, 2 * 65536, 10)
    assert forgotten == [(lo, hi)]  # the chunk's own member, once


# -- a pull keeps only a TOC it can use (stores/pull.py _take_tocs)


class _BlobSource:
    """Enough of a Source for _take_tocs: range reads of blobs held in memory, counted."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.asked: list[tuple[str, int, int]] = []

    def read_range(self, digest: str, start: int, length: int) -> bytes:
        self.asked.append((digest, start, length))
        return self.blobs[digest][start:start + length]


def test_take_tocs_keeps_usable_tocs_and_warns_about_the_rest(tmp_path, caplog):
    good1, good2 = fixture().layers
    version2 = good1.toc()
    version2["version"] = 2
    blob2, _, digest2 = with_toc(good1, json.dumps(version2).encode())  # authentic, but not one we read
    layers = [Layer(good1.digest, GZIP_LAYER, good1.size, "gzip", "", good1.toc_digest),
              Layer(good2.digest, GZIP_LAYER, good2.size, "gzip", "", sha(b"not the TOC")),
              Layer(sha(blob2), GZIP_LAYER, len(blob2), "gzip", "", digest2),
              Layer(sha(b"plain"), GZIP_LAYER, 5, "gzip", "", "")]  # not eStargz: never read
    source = _BlobSource({good1.digest: good1.blob, good2.digest: good2.blob, sha(blob2): blob2})
    store = Store(tmp_path / "store")
    with caplog.at_level(logging.WARNING, logger="stores.pull"):
        _take_tocs(store, source, layers)  # type: ignore[arg-type]
    assert store.read_toc(good1.digest) == good1.member
    assert [store.has_toc(layer.digest) for layer in layers] == [True, False, False, False]
    assert not any(store.has_full_index(layer.digest) for layer in layers)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert good2.digest in warnings[0] + warnings[1] and "digest mismatch" in warnings[0] + warnings[1]
    assert any(sha(blob2) in w and "not a version 1 TOC" in w for w in warnings), warnings
    assert all("plain gzip" in w for w in warnings)
    assert {d for d, _, _ in source.asked} == {good1.digest, good2.digest, sha(blob2)}
    assert len(source.asked) == 3  # one tail read each
    caplog.clear()
    _take_tocs(store, source, layers[:1])  # type: ignore[arg-type]
    assert len(source.asked) == 3  # had its TOC: not read again


# -- end to end: the registry and FUSE


def expected_tree(via_toc: tuple[bool, ...] = (True, True)) -> dict[bytes, tuple]:
    """What tests.mounts.snapshot should see in a mount of the fixture image, from the layers' tars
    alone: whiteouts and the opaque dir applied. A layer read through its TOC has its mtimes in
    whole seconds (the TOC's) and hides the eStargz writer's members; read as a plain gzip tar
    (*via_toc* false) it has the tar's mtimes and shows them."""
    files: dict[bytes, tuple] = {}
    for layer, toc in zip(fixture().layers, via_toc):
        mtimes = {norm(e["name"]): toc_mtime_ns(e["modtime"]) for e in layer.toc()["entries"] if "modtime" in e}
        for ti, data in layer.tar():
            path = norm(ti.name)
            parent, _, base = path.rpartition(b"/")
            if toc and path in ESTARGZ_MEMBERS:
                continue
            if base == b".wh..wh..opq":
                for p in [p for p in files if p.startswith(parent + b"/")]:
                    del files[p]
                continue
            if base.startswith(b".wh."):
                gone = (parent + b"/" if parent else b"") + base[4:]
                for p in [p for p in files if p == gone or p.startswith(gone + b"/")]:
                    del files[p]
                continue
            files[path] = (ti, data, mtimes.get(path, 0) if toc else tar_mtime_ns(ti))
    out: dict[bytes, tuple] = {}
    for path, (ti, data, mtime) in files.items():
        if ti.islnk():  # one inode: the target's
            ti, data, mtime = files[ti.linkname.encode()]
        kind = {tarfile.REGTYPE: stat.S_IFREG, tarfile.DIRTYPE: stat.S_IFDIR, tarfile.SYMTYPE: stat.S_IFLNK,
                tarfile.FIFOTYPE: stat.S_IFIFO}[ti.type]
        content = (hashlib.sha256(data).hexdigest() if ti.isreg() else ti.linkname.encode() if ti.issym() else None)
        xattrs = tuple(sorted((k[13:], v.encode()) for k, v in ti.pax_headers.items() if k.startswith("SCHILY.xattr.")))
        mode = 0o777 if ti.issym() else ti.mode & 0o7777  # what Linux shows for every symlink
        out[path] = (kind, mode, ti.uid, ti.gid, ti.size if ti.isreg() else 0 if ti.isdir() else len(
            ti.linkname) if ti.issym() else 0, content, xattrs, 0, None if ti.isdir() else mtime)
    links = [p for p, (ti, _, _) in files.items() if ti.islnk()]
    for link in links:
        target = files[link][0].linkname.encode()
        group = tuple(sorted([link, target]))
        out[link] += (group,)
        out[target] += (group,)
    return out


def expected_contents() -> dict[str, bytes]:
    return {"usr/lib/big.bin": random_big(), "usr/lib/text.txt": next(
        d for ti, d in fixture().layers[0].tar() if ti.name == "usr/lib/text.txt"),
        "etc/new.txt": b"added in layer 2\n", "var/cache/fresh.txt": b"only file left in var/cache\n",
        "bin/hello": b"#!/bin/sh\necho hello from estargz\n"}


def check_mount(mp: Path, via_toc: tuple[bool, ...] = (True, True)) -> None:
    problems = diff(expected_tree(via_toc), snapshot(mp))
    assert not problems, "\n".join(problems)
    for path, data in expected_contents().items():
        assert (mp / path).read_bytes() == data, path
    assert not (mp / "etc" / "hostname").exists() and not (mp / "var" / "cache" / "old.txt").exists()
    assert os.getxattr(mp / "etc" / "xattr.txt", "user.test") == b"hello"


@pytest.fixture(scope="module")
def pushed(registry) -> str:
    """The fixture image in the session registry as estargz/img:1, its manifest unchanged."""
    if shutil.which("skopeo") is None:
        pytest.skip("needs skopeo")
    push(LAYOUT, "1", registry.ref("estargz/img:1"))
    return "estargz/img:1"


@pytest.fixture
def clis(tmp_path) -> Iterator[Callable[[str], tuple[Cli, Mounts]]]:
    """Fresh stores on demand, each with its Mounts, all unmounted at the end even on failure."""
    made: list[Mounts] = []

    def make(name: str) -> tuple[Cli, Mounts]:
        cli = Cli(tmp_path / name / "store", tmp_path / name / "work")
        made.append(Mounts(cli))
        return cli, made[-1]

    try:
        yield make
    finally:
        for mounts in made:
            mounts.cleanup()


def _registry_manifest(registry: Registry, repo_tag: str) -> bytes:
    repo, tag = repo_tag.split(":")
    r = httpx.get(f"{registry.url}/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST}, trust_env=False)
    assert r.status_code == 200, r.text
    return r.content


def _layer_files(store: Path) -> list[str]:
    return sorted(p.name for p in (store / "indexes").iterdir()) if (store / "indexes").exists() else []


def _blob_ranges(front: CountingFront, digest: str) -> list[tuple[int, int]]:
    out = []
    for seen in front.front.requests(f"/blobs/{digest}"):
        rng = seen.headers.get("range", "")
        assert rng.startswith("bytes="), f"a whole-blob GET of {digest}"
        start, end = (int(x) for x in rng[6:].split("-"))
        out.append((start, end + 1))
    return out


@requires_skopeo
@needs_fuse
def test_lazy_pull_takes_only_the_tocs_and_a_mount_reads_what_it_needs(pushed, registry, clis, tmp_path):
    fx = fixture()
    assert _registry_manifest(registry, pushed) == fx.manifest  # skopeo kept it, annotations and all
    (l1, l2), total = fx.layers, sum(layer.size for layer in fx.layers)
    cli, mounts = clis("lazy")
    with CountingFront(registry.url) as front:
        try:
            r = cli.run("pull", front.ref(pushed))
            assert r.stderr == ""
            assert _layer_files(cli.store) == sorted(f"{layer.hex}.{ext}" for layer in fx.layers
                                                    for ext in ("toc", "tocindex"))
            for layer in fx.layers:
                assert (cli.store / "indexes" / f"{layer.hex}.toc").read_bytes() == layer.member
                assert not (cli.store / "blobs" / "sha256" / layer.hex).exists()
                ((start, end),) = _blob_ranges(front, layer.digest)  # one tail read per layer
                assert end == layer.size and start <= layer.toc_at
            pulled = {layer.digest: front.blob_bytes(layer.digest) for layer in fx.layers}
            assert pulled[l2.digest] == l2.size  # 1 KiB: its tail is all of it
            assert pulled[l1.digest] <= l1.size // 4, pulled
            # Every layer is eStargz: no published index is looked for.
            assert not front.paths("/referrers/") and not front.paths("/manifests/sha256-")
            layers = json.loads(cli.run("inspect", "--json", front.ref(pushed)).stdout)["layers"]
            assert [(layer["indexed"], layer["index"], layer["blob_local"]) for layer in layers] == \
                   [(True, "estargz-toc", False)] * 2

            mp = mounts.mount(front.ref(pushed), tmp_path / "mnt", "--prefetch=none")
            assert front.blob_bytes(l1.digest) == pulled[l1.digest], "the mount fetched data up front"
            assert (mp / "usr" / "lib" / "text.txt").read_bytes() == expected_contents()["usr/lib/text.txt"]
            assert sum(front.blob_bytes(layer.digest) for layer in fx.layers) < total / 2
            # big.bin: about its own chunks (the cache fetches whole 64 KiB chunks; one of them was
            # fetched for text.txt already)
            before = front.blob_bytes(l1.digest)
            assert (mp / "usr" / "lib" / "big.bin").read_bytes() == random_big()
            index = toc_index(l1)
            region = region_of(index, b"usr/lib/big.bin", 0)
            lo, hi = index.points[region].coffset, index.points[region + 5].coffset
            fetched = front.blob_bytes(l1.digest) - before
            assert hi - lo - CACHE_CHUNK <= fetched <= hi - lo + CACHE_CHUNK, (fetched, hi - lo)
            check_mount(mp)
            assert not (mp / ".no.prefetch.landmark").exists() and not (mp / TOC_NAME).exists()
            assert front.blob_bytes(l1.digest) <= l1.size + CACHE_CHUNK  # nothing fetched twice over
        finally:
            mounts.cleanup()  # before the front stops: the server may still be asking it


class Tamper:
    """A CountingFront hook that serves *bad* (the blob with one chunk spoilt in [lo, hi)) for range
    requests of the blob that overlap that chunk, the first *times* times (None: always); it
    forwards everything else unchanged."""

    def __init__(self, digest: str, bad: bytes, lo: int, hi: int, times: int | None) -> None:
        self.digest, self.bad, self.lo, self.hi, self.times = digest, bad, lo, hi, times
        self.spoilt = 0
        self.overlapping = 0  # range requests that overlapped the chunk
        self._lock = threading.Lock()

    def __call__(self, seen: Seen) -> Reply | None:
        rng = seen.headers.get("range", "")
        if not seen.path.endswith(f"/blobs/{self.digest}") or not rng.startswith("bytes="):
            return None
        start, end = (int(x) for x in rng[6:].split("-"))
        if end < self.lo or start >= self.hi:
            return None
        with self._lock:
            self.overlapping += 1
            if self.times is not None and self.spoilt >= self.times:
                return None
            self.spoilt += 1
        return Reply(206, {"Content-Type": "application/octet-stream",
                           "Content-Range": f"bytes {start}-{end}/{len(self.bad)}"}, self.bad[start:end + 1])


@requires_skopeo
@needs_fuse
@pytest.mark.parametrize("times", [1, None], ids=["once", "always"])
def test_a_chunk_corrupted_in_transit(times, pushed, registry, clis, tmp_path):
    """Once: the read still returns the right bytes (the chunk was fetched again). Always: EIO,
    and the mount goes on serving everything else."""
    layer, index, region, lo, hi, bad = _bad_chunk()
    tamper = Tamper(layer.digest, bad, lo, hi, times)
    cli, mounts = clis("tamper")
    with CountingFront(registry.url, tamper) as front:
        try:
            mp = mounts.mount(front.ref(pushed), tmp_path / "mnt", "--prefetch=none")
            big = mp / "usr" / "lib" / "big.bin"
            if times == 1:
                assert big.read_bytes() == random_big()
                assert tamper.spoilt == 1 and tamper.overlapping >= 2, (tamper.spoilt, tamper.overlapping)
                assert big.read_bytes() == random_big()
            else:
                for _ in range(2):
                    with pytest.raises(OSError) as e:
                        big.read_bytes()
                    assert e.value.errno == errno.EIO
                assert tamper.spoilt >= 2  # refetched (and still bad) before refusing
                with open(big, "rb") as f:  # chunks before the bad one are served
                    assert f.read(65536) == random_big()[:65536]
                for path, data in expected_contents().items():
                    if path != "usr/lib/big.bin":
                        assert (mp / path).read_bytes() == data, path
                assert (mp / "usr" / "lib" / "link").resolve().name == "text.txt"
        finally:
            mounts.cleanup()


def _layout_with_wrong_toc_digest(dest: Path) -> str:
    """A copy of the fixture layout whose manifest names a wrong TOC digest for layer 1 (manifest
    and index.json rewritten, fresh digests); returns the new manifest's digest."""
    shutil.copytree(LAYOUT, dest)
    manifest = json.loads(fixture().manifest)
    manifest["layers"][0]["annotations"][TOC_ANN] = sha(b"not the TOC")
    data = json.dumps(manifest, separators=(",", ":")).encode()
    (dest / "blobs" / "sha256" / sha(data)[7:]).write_bytes(data)
    index = json.loads((dest / "index.json").read_text())
    index["manifests"][0].update(digest=sha(data), size=len(data))
    (dest / "index.json").write_text(json.dumps(index))
    return sha(data)


@requires_skopeo
@needs_fuse
def test_a_wrong_toc_digest_falls_back_to_streaming(registry, clis, tmp_path):
    digest = _layout_with_wrong_toc_digest(tmp_path / "layout")
    push(tmp_path / "layout", "1", registry.ref("estargz/badtoc:1"))
    assert sha(_registry_manifest(registry, "estargz/badtoc:1")) == digest
    (l1, l2) = fixture().layers
    cli, mounts = clis("badtoc")
    with CountingFront(registry.url) as front:
        try:
            r = cli.run("pull", front.ref("estargz/badtoc:1"))
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1, r.stderr
            assert l1.digest in lines[0] and "digest mismatch" in lines[0] and "plain gzip" in lines[0], lines[0]
            assert front.blob_bytes(l1.digest) >= l1.size  # the tail, then the whole layer streamed
            assert _layer_files(cli.store) == sorted([l1.hex, f"{l2.hex}.toc", f"{l2.hex}.tocindex"])
            assert not (cli.store / "blobs" / "sha256" / l1.hex).exists()  # indexed, then dropped
            index = LayerIndex.from_bytes((cli.store / "indexes" / l1.hex).read_bytes(), l1.digest)
            assert index.region_digests is None and index.chunk_digests
            mp = mounts.mount(front.ref("estargz/badtoc:1"), tmp_path / "mnt", "--prefetch=none")
            check_mount(mp, via_toc=(False, True))
        finally:
            mounts.cleanup()


@requires_skopeo
@needs_fuse
def test_prefetch_all_makes_the_layers_local_and_the_image_survives_the_registry(own_registry, clis, tmp_path):
    fx = fixture()
    push(LAYOUT, "1", own_registry.ref("estargz/img:1"))
    cli, mounts = clis("prefetch")
    mp = mounts.mount(own_registry.ref("estargz/img:1"), tmp_path / "mnt", "--prefetch", "all")
    blobs = cli.store / "blobs" / "sha256"
    wait_until(lambda: all((blobs / layer.hex).exists() for layer in fx.layers), 60, "layers local")
    for layer in fx.layers:
        assert sha((blobs / layer.hex).read_bytes()) == layer.digest
    own_registry.stop()
    check_mount(mp)
    cli.run("umount", str(mp))
    mp = mounts.mount(own_registry.ref("estargz/img:1"), tmp_path / "mnt2", "--prefetch", "none")
    check_mount(mp)  # a new mount, from the local blobs (still through the TOCs)
    assert _layer_files(cli.store) == sorted(f"{layer.hex}.{ext}" for layer in fx.layers
                                                    for ext in ("toc", "tocindex"))


@requires_skopeo
def test_index_builds_full_indexes_of_estargz_layers(pushed, registry, clis):
    fx = fixture()
    cli, _ = clis("index")
    r = cli.run("index", registry.ref(pushed))
    assert r.returncode == 0 and r.stderr == ""
    for layer in fx.layers:
        assert layer.digest in r.stdout
        index = LayerIndex.from_bytes((cli.store / "indexes" / layer.hex).read_bytes(), layer.digest)
        assert index.compressed_size == layer.size and index.region_digests is None
        full = build_index([layer.blob], digest=layer.digest, size=layer.size, compression="gzip", root="")
        assert index.entries == full.entries and index.chunk_digests == full.chunk_digests
        assert (cli.store / "indexes" / f"{layer.hex}.toc").read_bytes() == layer.member
        assert not (cli.store / "blobs" / "sha256" / layer.hex).exists()
    again = cli.run("index", registry.ref(pushed))  # everything indexed: nothing to do
    assert again.stderr == "" and again.stdout == r.stdout
