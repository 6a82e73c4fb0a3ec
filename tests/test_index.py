"""The layer index: one streaming pass over real tars (every dialect, every compression), the entries
it yields, its integrity checks, and its serialised form."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import os
import random
import shutil
import struct
import subprocess
import tarfile
from collections.abc import Callable

import pytest
import zstandard

from imagefs import zran
from imagefs.entry import Entry, EntryType
from imagefs.errors import DigestMismatch, InputError
from imagefs.index import MAGIC, LayerIndex, SeekPoint, build_index

KINDS = ["none", "gzip", "gzip-cli", "gzip-multi", "zstd", "zstd-multi"]


# -- building tars ------------------------------------------------------------------------------

def octal(n: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, n)


def base256(n: int, width: int) -> bytes:
    return bytes([0x80]) + n.to_bytes(width - 1, "big")


_LAYOUT = [("name", 100), ("mode", 8), ("uid", 8), ("gid", 8), ("size", 12), ("mtime", 12),
           ("chksum", 8), ("typeflag", 1), ("linkname", 100), ("magic", 6), ("version", 2),
           ("uname", 32), ("gname", 32), ("devmajor", 8), ("devminor", 8), ("prefix", 155), ("pad", 12)]


def header(name: bytes, *, type: bytes = b"0", size: int = 0, linkname: bytes = b"", gnu: bool = False,
           raw: dict[str, bytes] | None = None, **fields: bytes) -> bytes:
    """A hand-made tar header: *fields* and then *raw* override fields with exact bytes."""
    f = {"name": name, "mode": octal(0o644, 8), "uid": octal(0, 8), "gid": octal(0, 8),
         "size": octal(size, 12), "mtime": octal(0, 12), "typeflag": type, "linkname": linkname,
         "magic": b"ustar " if gnu else b"ustar\0", "version": b" \0" if gnu else b"00",
         "devmajor": octal(0, 8), "devminor": octal(0, 8)}
    f.update(fields)
    f.update(raw or {})
    buf = b"".join(b" " * 8 if k == "chksum" else f.get(k, b"").ljust(w, b"\0")[:w] for k, w in _LAYOUT)
    return buf[:148] + b"%06o\0 " % sum(buf) + buf[156:]


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def member(name: bytes, data: bytes = b"", **kw) -> bytes:
    return header(name, size=len(data), **kw) + pad(data)


def pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def pax(records: list[tuple[bytes, bytes]], type: bytes = b"x") -> bytes:
    """A PAX extended header written byte for byte, as GNU tar does (no hdrcharset)."""
    return member(b"PaxHeaders/x", b"".join(pax_record(k, v) for k, v in records), type=type)


END = bytes(1024)


def tarinfo(name: str, data: bytes = b"", **attrs) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = 1_600_000_000
    for k, v in attrs.items():
        setattr(ti, k, v)
    return ti, data


def make_tar(members: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue()


def content(rng: random.Random, n: int) -> bytes:
    """Half text-like (compressible), half random."""
    words = [b"lib", b"usr", b"share", b"locale", b"x86_64", b"linux", b"gnu", b"\n", b"so.6"]
    text = b"".join(rng.choice(words) for _ in range(n // 8))[:n // 2]
    return text + rng.randbytes(n - len(text))


def big_members(rng: random.Random, total: int) -> list[tuple[tarfile.TarInfo, bytes]]:
    members = [tarinfo("./usr/", type=tarfile.DIRTYPE, mode=0o755)]
    i = 0
    while sum(len(d) for _, d in members) < total:
        members.append(tarinfo(f"./usr/lib/f{i}", content(rng, rng.choice([0, 10, 4000, 90_000, 700_000]))))
        i += 1
    return members


def big_tar(rng: random.Random, total: int = 5 << 20, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    return make_tar(big_members(rng, total), fmt)


# -- compressing -------------------------------------------------------------------------------

def zstd_frames(tar: bytes) -> list[tuple[bytes, int]]:
    """Frames of 300 KB, alternately with checksum/content size, and a skippable frame inside:
    (compressed frame, uncompressed length) each."""
    out = []
    for n, i in enumerate(range(0, len(tar), 300_000)):
        c = zstandard.ZstdCompressor(write_checksum=bool(n % 2), write_content_size=not n % 3)
        out.append((c.compress(tar[i:i + 300_000]), len(tar[i:i + 300_000])))
        if n == 1:
            out.append((struct.pack("<II", 0x184D2A53, 5) + b"skip!", 0))
    return out


def zstd_multi(tar: bytes) -> bytes:
    return b"".join(f for f, _ in zstd_frames(tar))


def compress(tar: bytes, kind: str) -> tuple[bytes, str]:
    if kind == "none":
        return tar, "none"
    if kind == "gzip":
        return gzip.compress(tar, mtime=0), "gzip"
    if kind == "gzip-cli":
        if shutil.which("gzip") is None:
            pytest.skip("needs the gzip command")
        return subprocess.run(["gzip", "-c"], input=tar, check=True, capture_output=True).stdout, "gzip"
    if kind == "gzip-multi":
        cuts = [0, len(tar) // 3, len(tar) // 3 + 777, len(tar)]
        return b"".join(gzip.compress(tar[a:b], mtime=0) for a, b in zip(cuts, cuts[1:])), "gzip"
    if kind == "zstd":
        return zstandard.ZstdCompressor(write_checksum=True).compress(tar), "zstd"
    if kind == "zstd-multi":
        return zstd_multi(tar), "zstd"
    raise AssertionError(kind)


def digest_of(blob: bytes) -> str:
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def build(blob: bytes, compression: str, *, piece: int = 65536, warn: Callable[[str], None] | None = None,
          **kw) -> LayerIndex:
    warnings: list[str] = []
    index = build_index((blob[i:i + piece] for i in range(0, len(blob), piece)), digest=digest_of(blob),
                        size=len(blob), compression=compression,  # type: ignore[arg-type]
                        warn=warn or warnings.append, **kw)
    if warn is None:
        assert warnings == [], "unexpected warnings"
    return index


def by_path(index: LayerIndex) -> dict[bytes, Entry]:
    return {e.path: e for e in index.entries}


# -- tar dialects and entries --------------------------------------------------------------------

def dialect_members(fmt: int) -> list[tuple[tarfile.TarInfo, bytes]]:
    long = "d" * 60 + "/" + "e" * 70 + "/" + "f" * 90  # needs GNU longname, PAX path or ustar prefix
    return [
        tarinfo("./etc", type=tarfile.DIRTYPE, mode=0o40755 & 0o7777 | 0o1000),
        tarinfo("./etc/passwd", b"root:x:0:0::/root:/bin/sh\n", mode=0o4755, uid=1000, gid=50),
        tarinfo("./etc/sym", type=tarfile.SYMTYPE, linkname="../../outside//x"),
        tarinfo("./etc/hard", type=tarfile.LNKTYPE, linkname="./etc//passwd"),
        tarinfo("dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
        tarinfo("dev/sda", type=tarfile.BLKTYPE, devmajor=8, devminor=0),
        tarinfo("run/fifo", type=tarfile.FIFOTYPE),
        tarinfo(long, b"long name data"),
        tarinfo("etc/longlink", type=tarfile.SYMTYPE, linkname="/" + "t" * 150 if fmt != tarfile.USTAR_FORMAT else "/t"),
    ]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_dialects_and_entry_fields(fmt: int, kind: str) -> None:
    members = dialect_members(fmt)
    tar = make_tar(members, fmt)
    blob, compression = compress(tar, kind)
    index = build(blob, compression, piece=4093)
    assert index.uncompressed_size == len(tar) and index.compressed_size == len(blob)
    assert index.compression == compression and index.digest == digest_of(blob)
    e = by_path(index)
    assert [x.path for x in index.entries] == [
        b"etc", b"etc/passwd", b"etc/sym", b"etc/hard", b"dev/null", b"dev/sda", b"run/fifo",
        os.fsencode(members[7][0].name), b"etc/longlink"]
    assert e[b"etc"].type == EntryType.DIR and e[b"etc"].mode == 0o1755
    pw = e[b"etc/passwd"]
    assert (pw.type, pw.mode, pw.uid, pw.gid, pw.size, pw.mtime_ns) == (
        EntryType.FILE, 0o4755, 1000, 50, len(members[1][1]), 1_600_000_000 * 10**9)
    assert tar[pw.offset:pw.offset + pw.size] == members[1][1]
    assert e[b"etc/sym"].type == EntryType.SYMLINK and e[b"etc/sym"].linkname == b"../../outside//x"
    assert e[b"etc/hard"].type == EntryType.HARDLINK and e[b"etc/hard"].linkname == b"etc/passwd"
    assert (e[b"dev/null"].type, e[b"dev/null"].devmajor, e[b"dev/null"].devminor) == (EntryType.CHAR, 1, 3)
    assert (e[b"dev/sda"].type, e[b"dev/sda"].devmajor) == (EntryType.BLOCK, 8)
    assert e[b"run/fifo"].type == EntryType.FIFO
    longe = index.entries[7]
    assert tar[longe.offset:longe.offset + longe.size] == b"long name data"
    assert e[b"etc/longlink"].linkname == os.fsencode(members[8][0].linkname)


def test_normalisation() -> None:
    tar = make_tar([
        tarinfo("./", type=tarfile.DIRTYPE),
        tarinfo(".//a//b/./c/", type=tarfile.DIRTYPE),
        tarinfo("a/./b/c/f", b"x"),
        tarinfo("./a/link", type=tarfile.LNKTYPE, linkname=".//a/b/./c//f"),
        tarinfo("a/sym", type=tarfile.SYMTYPE, linkname="./..//x/./"),
    ])
    index = build(tar, "none")
    assert [e.path for e in index.entries] == [b"", b"a/b/c", b"a/b/c/f", b"a/link", b"a/sym"]
    assert index.entries[3].linkname == b"a/b/c/f"
    assert index.entries[4].linkname == b"./..//x/./"  # symlink targets are kept as written


def test_gnu_and_pax_long_names_and_links() -> None:
    name, target = "n/" + "x" * 300, "t/" + "y" * 250
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        tar = make_tar([tarinfo(target, b"data"), tarinfo(name, type=tarfile.LNKTYPE, linkname=target),
                        tarinfo(name + "s", type=tarfile.SYMTYPE, linkname="/" + target)], fmt)
        e = build(*compress(tar, "gzip")).entries
        assert [x.path for x in e] == [target.encode(), name.encode(), name.encode() + b"s"]
        assert e[1].linkname == target.encode() and e[2].linkname == b"/" + target.encode()


def test_large_numbers_pax_and_gnu_base256() -> None:
    big = 2**40 + 5
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):  # tarfile writes base-256 / PAX records
        tar = make_tar([tarinfo("f", b"abc", uid=big, gid=big + 1, mtime=9_000_000_000)], fmt)
        f = build(tar, "none").entries[0]
        assert (f.uid, f.gid, f.mtime_ns) == (big, big + 1, 9_000_000_000 * 10**9)
    data = os.urandom(1000)
    tar = (pax([(b"size", b"1000"), (b"uid", str(big).encode())]) + header(b"paxsize", size=0) + pad(data)
           + header(b"gnusize", gnu=True, raw={"size": base256(1000, 12), "uid": base256(big, 8)})
           + pad(data) + END)
    e = by_path(build(tar, "none"))
    for name in (b"paxsize", b"gnusize"):
        assert e[name].size == 1000 and e[name].uid == big
        assert tar[e[name].offset:e[name].offset + 1000] == data


def test_non_utf8_names() -> None:
    raw = b"caf\xe9/\xff\xfename"
    name = raw.decode("utf-8", "surrogateescape")
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):  # PAX: hdrcharset=BINARY
        tar = make_tar([tarinfo(name, b"x"), tarinfo("l", type=tarfile.LNKTYPE, linkname=name)], fmt)
        e = build(tar, "none").entries
        assert e[0].path == raw and e[1].linkname == raw
    # GNU tar's way: raw bytes in a PAX path record, no hdrcharset.
    tar = pax([(b"path", b"long/" + raw * 30)]) + member(b"short", b"y") + END
    assert build(tar, "none").entries[0].path == b"long/" + raw * 30


def test_xattrs_binary_values_round_trip() -> None:
    cap = bytes.fromhex("0100000200200000000000000000000000000000")  # 20 bytes, mostly zeros
    odd = b"\xff\xfe\x00\x80value\n=\x00"  # not UTF-8, with newline, '=' and zeros
    # 1. tarfile's writer (switches to hdrcharset=BINARY for the undecodable value)
    ti, _ = tarinfo("bin/ping", b"elf")
    ti.pax_headers = {"SCHILY.xattr.security.capability": cap.decode("utf-8", "surrogateescape"),
                      "SCHILY.xattr.user.odd": odd.decode("utf-8", "surrogateescape")}
    tar1 = make_tar([(ti, b"elf")])
    # 2. raw records, as GNU tar writes them; 3. libarchive's base64 form, name %-encoded
    tar2 = (pax([(b"SCHILY.xattr.security.capability", cap), (b"SCHILY.xattr.user.odd", odd)])
            + member(b"bin/ping", b"elf") + END)
    tar3 = (pax([(b"LIBARCHIVE.xattr.security.capability", base64.b64encode(cap).rstrip(b"=")),
                 (b"LIBARCHIVE.xattr.user.o%3Ddd", base64.b64encode(odd))])
            + member(b"bin/ping", b"elf") + END)
    for tar, names in ((tar1, b"user.odd"), (tar2, b"user.odd"), (tar3, b"user.o=dd")):
        index = build(*compress(tar, "gzip"))
        x = index.entries[0].xattrs
        assert x == {b"security.capability": cap, names: odd}
        assert LayerIndex.from_bytes(index.to_bytes(), index.digest).entries[0].xattrs == x


def test_pax_fractional_mtime() -> None:
    tar = (pax([(b"mtime", b"1700000000.123456789")]) + member(b"a")
           + pax([(b"mtime", b"-1.5")]) + member(b"b")
           + header(b"c", mtime=octal(1234, 12)) + END)
    assert [e.mtime_ns for e in build(tar, "none").entries] == [1700000000123456789, -1500000000, 1234 * 10**9]


def test_unsafe_paths_dropped_with_warning() -> None:
    tar = make_tar([
        tarinfo("../evil", b"x"), tarinfo("/abs", b"x"), tarinfo("a/../../b", b"x"), tarinfo("a/../b", b"x"),
        tarinfo("ok", b"fine"),
        tarinfo("h1", type=tarfile.LNKTYPE, linkname="../etc/shadow"),
        tarinfo("h2", type=tarfile.LNKTYPE, linkname="/etc/shadow"),
        tarinfo("h3", type=tarfile.LNKTYPE, linkname="ok"),
        tarinfo("s", type=tarfile.SYMTYPE, linkname="/etc/shadow"),  # symlinks resolve in the mount
    ])
    warnings: list[str] = []
    index = build(*compress(tar, "gzip"), warn=warnings.append)
    assert [e.path for e in index.entries] == [b"ok", b"h3", b"s"]
    assert len(warnings) == 6
    for bad in ("../evil", "/abs", "a/../../b", "a/../b", "h1", "h2"):
        assert any(bad in w for w in warnings), bad


def test_appc_root_prefix() -> None:
    tar = make_tar([
        tarinfo("manifest", b'{"acKind": "ImageManifest"}'),
        tarinfo("rootfs", type=tarfile.DIRTYPE, mode=0o755),
        tarinfo("rootfs/bin", type=tarfile.DIRTYPE),
        tarinfo("rootfs/bin/sh", b"#!"),
        tarinfo("rootfs/bin/sh2", type=tarfile.LNKTYPE, linkname="rootfs/bin/sh"),
        tarinfo("rootfs/bin/m", type=tarfile.LNKTYPE, linkname="manifest"),
        tarinfo("rootfsx/y", b"not under rootfs/"),
    ])
    warnings: list[str] = []
    index = build(*compress(tar, "gzip"), root="rootfs/", warn=warnings.append)
    assert [e.path for e in index.entries] == [b"", b"bin", b"bin/sh", b"bin/sh2"]
    assert index.entries[0].mode == 0o755 and index.entries[3].linkname == b"bin/sh"
    assert len(warnings) == 1 and "rootfs/bin/m" in warnings[0]  # the manifest itself: silent
    assert LayerIndex.from_bytes(index.to_bytes(), index.digest).root == "rootfs/"


def test_same_path_twice_kept_in_order() -> None:
    tar = make_tar([tarinfo("f", b"one"), tarinfo("g", b"x"), tarinfo("f", b"two!")])
    e = build(tar, "none").entries
    assert [(x.path, tar[x.offset:x.offset + x.size]) for x in e] == [(b"f", b"one"), (b"g", b"x"), (b"f", b"two!")]


@pytest.mark.parametrize("kind", KINDS)
def test_empty_layers(kind: str) -> None:
    for tar in (make_tar([]), END, b""):
        if tar == b"" and kind == "zstd-multi":  # no frames at all: not a zstd stream
            continue
        blob, compression = compress(tar, kind)
        index = build(blob, compression)
        assert index.entries == [] and index.uncompressed_size == len(tar)
        assert LayerIndex.from_bytes(index.to_bytes(), index.digest) == index


def test_tar_without_end_blocks_is_accepted() -> None:
    tar = member(b"a", b"x" * 700)
    assert [e.path for e in build(*compress(tar, "gzip")).entries] == [b"a"]


def test_bytes_after_the_end_blocks_are_read_and_ignored() -> None:
    tar = member(b"a", b"x") + END + b"trailing junk" * 100
    index = build(*compress(tar, "gzip"))
    assert [e.path for e in index.entries] == [b"a"] and index.uncompressed_size == len(tar)


def test_unsupported_members() -> None:
    tar = member(b"vol", type=b"V") + member(b"ok", b"1") + END
    warnings: list[str] = []
    assert [e.path for e in build(tar, "none", warn=warnings.append).entries] == [b"ok"]
    assert len(warnings) == 1 and "vol" in warnings[0]


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
def test_sparse_members_rejected(tmp_path) -> None:
    f = tmp_path / "sparse"
    with open(f, "wb") as fh:
        fh.truncate(8 << 20)
        fh.seek(4 << 20)
        fh.write(b"data")
    tar = subprocess.run(["tar", "-S", "-C", str(tmp_path), "-cf", "-", "sparse"], check=True,
                         capture_output=True).stdout
    with pytest.raises(InputError, match="sparse"):
        build(tar, "none")


# -- integrity ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def layer() -> bytes:
    return big_tar(random.Random(7), 3 << 20)


@pytest.mark.parametrize("kind", ["none", "gzip", "zstd"])
def test_digest_and_size_checked(layer: bytes, kind: str) -> None:
    blob, compression = compress(layer, kind)
    other = digest_of(b"something else")
    with pytest.raises(DigestMismatch) as err:
        build_index([blob], digest=other, size=len(blob), compression=compression)  # type: ignore[arg-type]
    assert other in str(err.value) and err.value.what == f"layer {other}"
    with pytest.raises(InputError, match="truncated"):
        build_index([blob[:-10]], digest=digest_of(blob), size=len(blob), compression=compression)  # type: ignore[arg-type]

    consumed = []

    def chunks():
        for i in range(0, len(blob), 4096):
            consumed.append(i)
            yield blob[i:i + 4096]
    with pytest.raises(InputError, match="longer than"):
        build_index(chunks(), digest=digest_of(blob), size=len(blob) // 2, compression=compression)  # type: ignore[arg-type]
    assert len(consumed) < len(blob) // 4096  # stopped at once, did not read to the end


@pytest.mark.parametrize("kind", ["gzip", "zstd", "zstd-multi"])
def test_truncated_compressed_stream_rejected_even_with_right_digest(layer: bytes, kind: str) -> None:
    blob, compression = compress(layer, kind)
    for cut in (len(blob) // 2, len(blob) - 3):
        with pytest.raises(InputError, match="does not decompress"):
            build(blob[:cut], compression)


def test_bad_streams_rejected() -> None:
    with pytest.raises(InputError, match="does not decompress"):
        build(b"\x1f\x8b\x08\x00" + os.urandom(2000), "gzip")
    with pytest.raises(InputError, match="does not decompress"):
        build(os.urandom(2000), "zstd")
    with pytest.raises(InputError, match="does not decompress"):
        build(b"", "gzip")
    with pytest.raises(InputError, match="not a valid tar"):
        build(gzip.compress(os.urandom(5000)), "gzip")


def test_bad_or_truncated_tar_rejected() -> None:
    good = member(b"a", b"1" * 600) + member(b"b", b"2") + member(b"c", b"3") + END
    bad_header = bytearray(good)
    bad_header[1536 + 10] ^= 0xFF  # third member's name: its checksum no longer matches
    for tar in (bytes(bad_header), good[:1024 + 700], good[:1536 + 100]):
        with pytest.raises(InputError, match="not a valid tar"):
            build(tar, "none")


def test_unsafe_input_arguments() -> None:
    with pytest.raises(InputError, match="digest"):
        build_index([], digest="md5:abc", size=0, compression="none")
    with pytest.raises(InputError, match="compression"):
        build_index([], digest=digest_of(b""), size=0, compression="bzip2")  # type: ignore[arg-type]


# -- seek points and chunk digests ------------------------------------------------------------------

def test_gzip_seek_points(layer: bytes) -> None:
    blob, _ = compress(layer, "gzip")
    index = build(blob, "gzip", span=64 << 10)
    assert len(index.points) > 20 and index.points[0].uoffset == 0
    assert any(p.bits for p in index.points)
    for i, (a, b) in enumerate(zip(index.points, index.points[1:]), start=1):
        assert b.uoffset - a.uoffset >= 64 << 10
        assert index.window(i) == layer[b.uoffset - zran.WINDOW_SIZE:b.uoffset]
    assert index.window(0) == b""


def test_zstd_seek_points_at_frame_starts(layer: bytes) -> None:
    single, _ = compress(layer, "zstd")
    index = build(single, "zstd", span=64 << 10)
    assert [(p.uoffset, p.coffset) for p in index.points] == [(0, 0)]
    frames = zstd_frames(layer)
    index = build(b"".join(f for f, _ in frames), "zstd", span=1)  # every frame start
    starts, upos, cpos = [], 0, 0
    for frame, ulen in frames:
        if not starts or upos > starts[-1][0]:  # a frame with no output (skippable) adds no point
            starts.append((upos, cpos))
        upos, cpos = upos + ulen, cpos + len(frame)
    assert len(starts) > 5
    assert [(p.uoffset, p.coffset) for p in index.points] == starts
    assert all(p.window_size == 0 and p.bits == 0 for p in index.points)
    index = build(b"".join(f for f, _ in frames), "zstd", span=700_000)
    assert all(b.uoffset - a.uoffset >= 700_000 for a, b in zip(index.points, index.points[1:]))


@pytest.mark.parametrize("piece", [1, 777, 65536, 1 << 30])
def test_chunk_digests_independent_of_arrival(layer: bytes, piece: int) -> None:
    tar = big_tar(random.Random(3), 300_000) if piece == 1 else layer  # 1-byte pieces are slow
    blob = gzip.compress(tar, mtime=0)
    index = build(blob, "gzip", chunk_size=100_000, piece=piece)
    expected = [hashlib.sha256(blob[i:i + 100_000]).digest() for i in range(0, len(blob), 100_000)]
    assert index.chunk_digests == expected and len(index.chunk_digests[-1]) == 32


# -- serialisation ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gz_index() -> LayerIndex:
    x = tarinfo("bin/ping", b"elf")
    x[0].pax_headers = {"SCHILY.xattr.security.capability": "\x01\x00\udcff"}
    members = [*dialect_members(tarfile.PAX_FORMAT), x, tarinfo("caf\udce9", b"latin-1 name"),
               *big_members(random.Random(5), 3 << 20)]
    blob, _ = compress(make_tar(members), "gzip")
    return build(blob, "gzip", span=128 << 10, chunk_size=256 << 10)


def test_round_trip(gz_index: LayerIndex) -> None:
    assert len(gz_index.entries) > 20 and len(gz_index.points) > 10
    assert by_path(gz_index)[b"bin/ping"].xattrs == {b"security.capability": b"\x01\x00\xff"}
    data = gz_index.to_bytes()
    assert data.startswith(MAGIC) and data == gz_index.to_bytes()  # deterministic
    back = LayerIndex.from_bytes(data, gz_index.digest)
    assert back == gz_index and back.entries == gz_index.entries and back.windows == gz_index.windows
    assert [back.window(i) for i in range(len(back.points))] == [
        gz_index.window(i) for i in range(len(gz_index.points))]


def test_metadata_first_then_windows_by_range(gz_index: LayerIndex) -> None:
    data = gz_index.to_bytes()
    n = LayerIndex.meta_length(data[:20], gz_index.digest)
    meta = LayerIndex.from_meta(data[:n], gz_index.digest)
    assert meta.windows is None and meta.entries == gz_index.entries and n < len(data) / 2
    with pytest.raises(ValueError):
        meta.window(1)
    for i in range(len(meta.points)):
        start, length = meta.window_range(i)
        assert meta.decode_window(i, data[start:start + length]) == gz_index.window(i)
    start, length = meta.window_range(3)
    with pytest.raises(InputError, match="window 3"):
        meta.decode_window(3, data[start + 1:start + length + 1])  # a wrong range is caught


def test_wrong_expected_digest_rejected(gz_index: LayerIndex) -> None:
    other = digest_of(b"other")
    with pytest.raises(InputError, match="index is for layer") as err:
        LayerIndex.from_bytes(gz_index.to_bytes(), other)
    assert other in err.value.what


def test_corruption_rejected(gz_index: LayerIndex) -> None:
    data = gz_index.to_bytes()
    rng = random.Random(11)
    meta_end = LayerIndex.meta_length(data[:20])
    positions = ([0, 8, 12, 13, 19, 20, 24, meta_end - 1, meta_end, len(data) - 1]
                 + rng.sample(range(20, meta_end), 40) + rng.sample(range(meta_end, len(data)), 40))
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 1 << rng.randrange(8)
        with pytest.raises(InputError) as err:
            LayerIndex.from_bytes(bytes(bad), gz_index.digest)
        assert gz_index.digest in err.value.what, pos
    for cut in [0, 5, 20, 21, meta_end - 1, meta_end, meta_end + 10, len(data) - 1]:
        with pytest.raises(InputError):
            LayerIndex.from_bytes(data[:cut], gz_index.digest)
    with pytest.raises(InputError):
        LayerIndex.from_bytes(data + b"\0", gz_index.digest)


def _as_format_1(index: LayerIndex) -> bytes:
    """*index* serialised as format 1 wrote it (lz4 metadata and windows)."""
    import lz4.frame

    section, points = bytearray(), []
    for i, p in enumerate(index.points):
        window = index.window(i)
        stored = lz4.frame.compress(window, content_checksum=True) if window else b""
        points.append(SeekPoint(p.uoffset, p.coffset, p.bits, len(section), len(stored), p.window_length,
                                p.window_digest))
        section += stored
    fields = {f: getattr(index, f) for f in ("digest", "compressed_size", "compression", "uncompressed_size", "root",
                                             "span", "chunk_size", "entries", "chunk_digests")}
    return LayerIndex(**fields, points=points, windows=bytes(section), codec="lz4").to_bytes()


def test_version_and_magic_checked(gz_index: LayerIndex) -> None:
    data = gz_index.to_bytes()
    assert LayerIndex.format_version(data) == 3
    with pytest.raises(InputError, match="version 4"):
        LayerIndex.from_bytes(data[:8] + struct.pack("<I", 4) + data[12:], gz_index.digest)
    # Version 2 is an index made from an eStargz TOC: a version 1 index relabelled is not one.
    old = _as_format_1(gz_index)
    assert LayerIndex.format_version(old) == 1
    with pytest.raises(InputError, match="eStargz"):
        LayerIndex.from_bytes(old[:8] + struct.pack("<I", 2) + old[12:], gz_index.digest)
    # The codec follows from the version: zstd frames labelled 1 (lz4) or lz4 labelled 3 are corrupt.
    with pytest.raises(InputError, match="corrupt metadata block"):
        LayerIndex.from_bytes(data[:8] + struct.pack("<I", 1) + data[12:], gz_index.digest)
    with pytest.raises(InputError, match="corrupt metadata block"):
        LayerIndex.from_bytes(old[:8] + struct.pack("<I", 3) + old[12:], gz_index.digest)
    with pytest.raises(InputError, match="magic"):
        LayerIndex.from_bytes(b"X" + data[1:], gz_index.digest)


def test_format_1_indexes_are_still_read_and_kept_as_they_are(gz_index: LayerIndex) -> None:
    old = _as_format_1(gz_index)
    assert len(old) > len(gz_index.to_bytes())   # what format 3 is for
    loaded = LayerIndex.from_bytes(old, gz_index.digest)
    assert loaded.codec == "lz4" and loaded.entries == gz_index.entries
    assert loaded.chunk_digests == gz_index.chunk_digests
    assert [(p.uoffset, p.coffset, p.bits, p.window_digest) for p in loaded.points] == [
        (p.uoffset, p.coffset, p.bits, p.window_digest) for p in gz_index.points]
    assert [loaded.window(i) for i in range(len(loaded.points))] == [
        gz_index.window(i) for i in range(len(gz_index.points))]
    assert loaded.to_bytes() == old   # re-serialised in the format it came in
    meta = LayerIndex.from_meta(old[:LayerIndex.meta_length(old[:20])], gz_index.digest)
    start, length = meta.window_range(1)
    assert meta.decode_window(1, old[start:start + length]) == gz_index.window(1)


def test_a_zstd_frame_that_would_inflate_past_its_limit_is_refused(gz_index: LayerIndex) -> None:
    import zstandard

    data = gz_index.to_bytes()
    start, length = gz_index.window_range(1)
    bomb = zstandard.ZstdCompressor(level=3).compress(bytes(1 << 20))   # declares 1 MiB: more than a window
    with pytest.raises(InputError, match="more than 32768 bytes"):
        gz_index.decode_window(1, bomb + bytes(length - len(bomb)) if len(bomb) < length else bomb[:length])
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 100)
    with pytest.raises(InputError, match="no size"):
        LayerIndex.from_meta(data[:8] + struct.pack("<IQ", 3, len(no_size)) + no_size, gz_index.digest)


def test_tampered_entries_rejected(gz_index: LayerIndex) -> None:
    """An index that checks out as lz4 but names an unsafe path (a hostile publisher) is refused."""
    for bad in (Entry(b"../etc/passwd", EntryType.FILE, 0o644),
                Entry(b"a//b", EntryType.DIR, 0o755),
                Entry(b"x", EntryType.HARDLINK, 0o644, linkname=b"/etc/shadow"),
                Entry(b"big", EntryType.FILE, 0o644, size=1 << 40)):
        index = LayerIndex(**{f: getattr(gz_index, f) for f in (
            "digest", "compressed_size", "compression", "uncompressed_size", "root", "span",
            "chunk_size", "points", "chunk_digests", "windows")}, entries=[bad])
        with pytest.raises(InputError, match="corrupt metadata"):
            LayerIndex.from_bytes(index.to_bytes(), gz_index.digest)
