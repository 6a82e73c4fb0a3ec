"""The eStargz writer, checked by reading what it writes two ways: lazily, through the TOC only
(imagefs/estargz.py, what a pull of an eStargz image uses), and as the plain gzip tar any runtime
sees (the full streaming index): both must agree on every entry and every byte. Plus the layout
rules: data chunks start gzip members at their TOC offsets, prioritized files come first with a
landmark, the footer locates the TOC, and the digests returned are the blob's and the tar's."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
import zlib

import pytest

from imagefs.estargz import FOOTER_SIZE, fetch_toc, index_from_toc, prioritized_paths, read_toc_member, toc_offset
from imagefs.estargz_writer import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, footer, write_estargz
from imagefs.index import build_index
from imagefs.layerread import LayerReader
from tests.support.images import Member, layer_tar
from tests.support.tricky import layer_base, layer_changes

CHUNK = 64 << 10


def chunked_file(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def tricky_members() -> list[Member]:
    # The 64 MiB file of the tricky layer is left out (slow to compress, nothing new); files of
    # exactly one chunk, one byte more, and several chunks take its place.
    members = [m for m in layer_base() if m.path != "big"]
    members += [Member("chunks", "dir")] + [Member(f"chunks/{n}", data=chunked_file(n))
                                             for n in (CHUNK, CHUNK + 1, 5 * CHUNK + 123)]
    return members + layer_changes()


def written(members: list[Member], **kw) -> tuple[bytes, object]:
    src = io.BytesIO(gzip.compress(layer_tar(members), mtime=0))
    with tarfile.open(fileobj=src, encoding="utf-8", errors="surrogateescape") as tar:
        out = io.BytesIO()
        result = write_estargz(tar, out, chunk_size=CHUNK, **kw)
    return out.getvalue(), result


def lazy_index(blob: bytes, result):
    member = fetch_toc(lambda s, n: blob[s:s + n], len(blob), result.toc_digest, "layer")
    return index_from_toc(member, digest=result.digest, size=len(blob), toc_digest=result.toc_digest,
                          warn=lambda msg: None)


def test_what_the_toc_says_is_what_the_tar_holds():
    blob, result = written(tricky_members())
    assert result.digest == "sha256:" + hashlib.sha256(blob).hexdigest() and result.size == len(blob)
    plain = gzip.decompress(blob)  # one valid gzip stream (of many members) holding one tar
    assert result.diff_id == "sha256:" + hashlib.sha256(plain).hexdigest() and result.tar_size == len(plain)

    lazy = lazy_index(blob, result)
    full = build_index([blob], digest=result.digest, size=len(blob), compression="gzip")
    full_reader, lazy_reader = LayerReader(full, lambda s, n: blob[s:s + n]), LayerReader(lazy, lambda s, n: blob[s:s + n])
    hide = {b".no.prefetch.landmark", b".prefetch.landmark", b"stargz.index.json"}
    expected = [e for e in full.entries if e.path not in hide]
    assert [e.path for e in lazy.entries] == [e.path for e in expected]
    for a, b in zip(lazy.entries, expected):
        assert (a.type, a.mode, a.uid, a.gid, a.size, a.linkname, a.devmajor, a.devminor, a.xattrs, a.mtime_ns) == \
               (b.type, b.mode, b.uid, b.gid, b.size, b.linkname, b.devmajor, b.devminor, b.xattrs, b.mtime_ns), a.path
        if a.size:
            assert lazy_reader.read_entry(a, 0, a.size) == full_reader.read_entry(b, 0, b.size), a.path
    frac = next(e for e in lazy.entries if e.path == b"frac")
    assert frac.mtime_ns == 1_700_000_000_500_000_000


def test_every_chunk_starts_a_gzip_member_at_its_toc_offset():
    blob, result = written(tricky_members())
    toc = json.loads(read_toc_member(fetch_toc(lambda s, n: blob[s:s + n], len(blob), result.toc_digest, "x"),
                                     result.toc_digest, "x"))
    chunks = [e for e in toc["entries"] if "offset" in e]
    big = [e for e in chunks if e["name"] == f"chunks/{5 * CHUNK + 123}"]
    assert [e["type"] for e in big] == ["reg"] + ["chunk"] * 5
    assert [e.get("chunkOffset", 0) for e in big] == [i * CHUNK for i in range(6)]
    assert [e.get("chunkSize", 0) for e in big] == [CHUNK] * 5 + [0]  # the last says 0
    for e in chunks:
        d = zlib.decompressobj(31)  # a member starts right there and holds the chunk first
        data = d.decompress(blob[e["offset"]:])
        size = e.get("chunkSize") or (e["size"] if e["type"] == "reg" and "chunkSize" not in e else None)
        if size is not None:
            assert hashlib.sha256(data[:size]).hexdigest() == e["chunkDigest"][7:], e["name"]
    assert toc_offset(blob[-FOOTER_SIZE:], len(blob), "x") == len(blob) - FOOTER_SIZE - len(
        fetch_toc(lambda s, n: blob[s:s + n], len(blob), result.toc_digest, "x"))


def test_prioritized_files_come_first_then_the_landmark():
    members = [Member("usr", "dir"), Member("usr/lib", "dir"), Member("usr/lib/a", data=b"a" * 100),
               Member("usr/bin", "dir"), Member("usr/bin/py", data=b"py"), Member("etc", "dir"),
               Member("etc/hard", "hardlink", linkname="usr/lib/a"), Member("etc/conf", data=b"c")]
    blob, result = written(members, prioritized=["etc/conf", "/usr/bin/py", "etc/hard", "not/there"])
    names = [ti.name for ti in tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob)))]
    assert names[:names.index(PREFETCH_LANDMARK) + 1] == [
        "etc", "etc/conf", "usr", "usr/bin", "usr/bin/py", "usr/lib", "usr/lib/a", "etc/hard", PREFETCH_LANDMARK]
    assert sorted(names) == sorted([m.path for m in members] + [PREFETCH_LANDMARK, "stargz.index.json"])
    member = fetch_toc(lambda s, n: blob[s:s + n], len(blob), result.toc_digest, "x")
    assert prioritized_paths(member, toc_digest=result.toc_digest, what="x") == [
        "etc/conf", "usr/bin/py", "usr/lib/a"]  # regular files only; a hardlink has no data of its own

    blob, result = written(members)
    names = [ti.name for ti in tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob)))]
    assert names[0] == NO_PREFETCH_LANDMARK
    member = fetch_toc(lambda s, n: blob[s:s + n], len(blob), result.toc_digest, "x")
    assert prioritized_paths(member, toc_digest=result.toc_digest, what="x") == []


def test_rewriting_an_estargz_layer_makes_one_landmark_and_one_toc():
    blob, _ = written([Member("f", data=b"x")])
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        out = io.BytesIO()
        result = write_estargz(tar, out, prioritized=["f"])
    names = [ti.name for ti in tarfile.open(fileobj=io.BytesIO(gzip.decompress(out.getvalue())))]
    assert names == ["f", PREFETCH_LANDMARK, "stargz.index.json"]
    assert lazy_index(out.getvalue(), result).entries[0].path == b"f"


def test_footer_is_an_empty_gzip_member_naming_the_offset():
    data = footer(0x4DB9F)
    assert len(data) == FOOTER_SIZE and zlib.decompress(data, 31) == b""
    assert data.hex() == ("1f8b08040000000000ff1a00534716003030303030303030303030346462396653544152475a"
                          "010000ffff0000000000000000")  # byte for byte what ctr-remote wrote (fixture)
    assert toc_offset(data, 10 ** 6, "x") == 0x4DB9F
    with pytest.raises(ValueError):
        write_estargz(tarfile.open(fileobj=io.BytesIO(layer_tar([]))), io.BytesIO(), chunk_size=0)


def test_an_index_made_from_a_toc_round_trips_through_format_2():
    from imagefs.index import TOC_FORMAT_VERSION, LayerIndex

    blob, result = written(tricky_members())
    lazy = lazy_index(blob, result)
    data = lazy.to_bytes()
    assert LayerIndex.format_version(data) == TOC_FORMAT_VERSION
    back = LayerIndex.from_bytes(data, result.digest)
    assert (back.entries, back.points, back.region_digests, back.uncompressed_size, back.chunk_digests) == \
           (lazy.entries, lazy.points, lazy.region_digests, lazy.uncompressed_size, [])
    assert back.region_digests[-1] == b"" and all(len(d) == 32 for d in back.region_digests[:-1])
    reader = LayerReader(back, lambda s, n: blob[s:s + n])
    big = next(e for e in back.entries if e.path == f"chunks/{5 * CHUNK + 123}".encode())
    assert reader.read_entry(big, 0, big.size) == chunked_file(5 * CHUNK + 123)
