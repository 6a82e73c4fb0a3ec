"""zran: seek points found while streaming a gzip stream, and spans inflated from them."""

from __future__ import annotations

import gzip
import random
import shutil
import subprocess
import zlib

import pytest

from imagefs import zran


def mixed_data(rng: random.Random, size: int) -> bytes:
    """Compressible text (dynamic Huffman blocks, so points with bits != 0), random bytes (stored
    blocks) and zeros (long matches), interleaved."""
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 9)))
             for _ in range(3000)]
    out = bytearray()
    while len(out) < size:
        kind = rng.randrange(3)
        n = rng.randint(1, 400_000)
        if kind == 0:
            out += b" ".join(rng.choice(words) for _ in range(n // 5))
        elif kind == 1:
            out += rng.randbytes(n)
        else:
            out += bytes(n)
    return bytes(out[:size])


def scan(comp: bytes, span: int, rng: random.Random | None = None) -> tuple[bytes, list[zran.ScanPoint]]:
    """Feed *comp* in irregular pieces (1-byte pieces first, to split the gzip header)."""
    out = []
    with zran.GzipScanner(span) as sc:
        pos = 0
        while pos < len(comp):
            n = 1 if pos < 20 else (rng.randint(1, 200_000) if rng else 65536)
            out.extend(sc.feed(comp[pos:pos + n]))
            pos += n
        sc.finish()
    return b"".join(out), sc.points


def check_spans(comp: bytes, data: bytes, points: list[zran.ScanPoint]) -> None:
    for i, p in enumerate(points):
        end = points[i + 1].uoffset if i + 1 < len(points) else len(data)
        cend = points[i + 1].coffset if i + 1 < len(points) else len(comp)
        start = p.coffset - (1 if p.bits else 0)
        got = zran.inflate_span(comp[start:cend], bits=p.bits, window=p.window, length=end - p.uoffset)
        assert got == data[p.uoffset:end], f"span {i}"


@pytest.fixture(scope="module")
def data() -> bytes:
    return mixed_data(random.Random(1), 6 << 20)


@pytest.mark.parametrize("level", [1, 6, 9])
def test_scan_output_and_every_span_restarts(data: bytes, level: int) -> None:
    comp = gzip.compress(data, compresslevel=level, mtime=0)
    span = 64 << 10
    out, points = scan(comp, span, random.Random(level))
    assert out == data
    assert points[0].uoffset == 0 and points[0].window == b""
    assert len(points) > 20
    for a, b in zip(points, points[1:]):
        assert b.uoffset - a.uoffset >= span
        assert 0 <= b.bits <= 7
        assert len(b.window) == zran.WINDOW_SIZE
        assert b.window == data[b.uoffset - zran.WINDOW_SIZE:b.uoffset]
    check_spans(comp, data, points)


def test_some_points_need_leftover_bits(data: bytes) -> None:
    _, points = scan(gzip.compress(data, mtime=0), 64 << 10)
    assert any(p.bits for p in points), "no seek point with bits != 0: inflatePrime untested"
    assert any(not p.bits for p in points)


@pytest.mark.skipif(shutil.which("gzip") is None, reason="needs the gzip command")
def test_gzip_command_line_output(data: bytes, tmp_path) -> None:
    path = tmp_path / "layer.tar"  # a file name, so the header carries FNAME
    path.write_bytes(data)
    comp = subprocess.run(["gzip", "-c", "-9", str(path)], check=True, capture_output=True).stdout
    assert comp[3] & 0x08  # FNAME set
    out, points = scan(comp, 128 << 10)
    assert out == data
    check_spans(comp, data, points)


def test_multi_member(data: bytes) -> None:
    cuts = [0, 1000, 1001, 1001, 2_500_000, 2_600_000, len(data)]  # includes an empty member
    comp = b"".join(gzip.compress(data[a:b], mtime=0) for a, b in zip(cuts, cuts[1:]))
    offsets = []  # compressed offset just after each member's 10-byte header
    pos = 0
    for a, b in zip(cuts, cuts[1:]):
        offsets.append(pos + 10)
        pos += len(gzip.compress(data[a:b], mtime=0))
    for span in (16 << 10, 1 << 20, 64 << 20):  # spans inside members, across them, everything
        out, points = scan(comp, span, random.Random(span))
        assert out == data
        check_spans(comp, data, points)
    # With a small span a member start is taken as a point, and it needs no window.
    _, points = scan(comp, 16 << 10)
    starts = [p for p in points if p.coffset in offsets and p.uoffset > 0]
    assert starts and all(p.window == b"" and p.bits == 0 for p in starts)


def test_window_limited_to_current_member() -> None:
    a, b = b"A" * 50_000, bytes(random.Random(2).randbytes(300_000))
    comp = gzip.compress(a, mtime=0) + gzip.compress(b, mtime=0)
    _, points = scan(comp, 1)  # a point at every boundary
    second = [p for p in points if p.uoffset > len(a)]
    assert second and all(len(p.window) == min(zran.WINDOW_SIZE, p.uoffset - len(a)) for p in second)


def test_truncated_stream_rejected(data: bytes) -> None:
    comp = gzip.compress(data[:300_000], mtime=0)
    for cut in (5, 100, len(comp) // 2, len(comp) - 1):
        with pytest.raises(zran.ZlibError, match="unexpected end"):
            scan(comp[:cut], 1 << 20)


def test_corrupt_data_gives_zlib_message() -> None:
    bad = bytes([0x1F, 0x8B, 8, 0, 0, 0, 0, 0, 0, 3]) + b"\x07\x00\x00"  # BTYPE 11: reserved
    with pytest.raises(zran.ZlibError, match="invalid block type"):
        scan(bad, 1 << 20)


def test_trailing_garbage_and_non_gzip_rejected() -> None:
    comp = gzip.compress(b"hello", mtime=0)
    with pytest.raises(zran.ZlibError, match="incorrect header check"):
        scan(comp + b"garbage!!!", 1 << 20)
    with pytest.raises(zran.ZlibError):
        scan(zlib.compress(b"hello"), 1 << 20)  # zlib wrapper, not gzip
    with pytest.raises(zran.ZlibError, match="empty"):
        scan(b"", 1 << 20)


def test_inflate_span_errors(data: bytes) -> None:
    comp = gzip.compress(data[:1_000_000], mtime=0)
    _, points = scan(comp, 128 << 10)
    p = points[2]
    start = p.coffset - (1 if p.bits else 0)
    with pytest.raises(zran.ZlibError, match="ended early"):
        zran.inflate_span(comp[start:start + 100], bits=p.bits, window=p.window, length=500_000)
    with pytest.raises(zran.ZlibError, match="ended early"):  # past the end of the stream
        zran.inflate_span(comp[start:], bits=p.bits, window=p.window, length=10_000_000)
    with pytest.raises(zran.ZlibError, match="invalid block type"):
        zran.inflate_span(b"\xff" * 100, bits=p.bits, window=p.window, length=10)
    assert zran.inflate_span(b"", bits=0, window=b"", length=0) == b""
    with pytest.raises(ValueError):
        zran.inflate_span(comp, bits=8, window=b"", length=1)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_z_streams_freed_on_error_paths() -> None:
    """Each leaked inflate state holds >40 KiB; thousands of failing calls must not grow memory."""
    comp = gzip.compress(b"x" * 100_000, mtime=0)
    for _ in range(200):  # warm up allocator pools
        with pytest.raises(zran.ZlibError):
            zran.inflate_span(b"\xff" * 64, bits=0, window=b"w" * 32768, length=10)
    before = _rss()
    for _ in range(3000):
        with pytest.raises(zran.ZlibError):
            zran.inflate_span(b"\xff" * 64, bits=3, window=b"w" * 32768, length=10)
        sc = zran.GzipScanner(1 << 20)
        list(sc.feed(comp[:50]))
        with pytest.raises(zran.ZlibError):
            sc.finish()
        sc.close()  # idempotent after finish
    assert _rss() - before < 30 << 20


@pytest.mark.parametrize("members", [1, 4])
def test_inflater_fed_in_pieces_continues_across_reads(data: bytes, members: int) -> None:
    """The incremental inflater gives what inflate_span gives, whatever the sizes of the pieces fed
    and of the reads asked for: 1-byte pieces (a trailer and a header split across feeds) included."""
    cuts = [len(data) * i // members for i in range(members + 1)]
    comp = b"".join(gzip.compress(data[a:b], mtime=0) for a, b in zip(cuts, cuts[1:]))
    _, points = scan(comp, 256 << 10)
    rng = random.Random(members)
    for p in points[:: max(1, len(points) // 8)]:
        inflater = zran.Inflater(bits=p.bits, window=p.window)
        pos = p.coffset - (1 if p.bits else 0)
        want = min(len(data) - p.uoffset, 3 << 20)
        got = bytearray()
        try:
            while len(got) < want:
                if inflater.needs_input:
                    step = rng.choice([1, 13, 4096, 200_000])
                    inflater.feed(comp[pos:pos + step])
                    pos += step
                got += inflater.read(min(rng.choice([1, 5000, 300_000]), want - len(got)))
        finally:
            inflater.close()
        assert bytes(got) == data[p.uoffset:p.uoffset + want], p.uoffset
        assert inflater.total_in <= pos - (p.coffset - (1 if p.bits else 0)) + 1


def test_inflater_rejects_corrupt_data() -> None:
    inflater = zran.Inflater(bits=0, window=b"")
    try:
        inflater.feed(b"\x07\x00\x00")  # a raw deflate block of BTYPE 11: reserved
        with pytest.raises(zran.ZlibError, match="invalid block type"):
            inflater.read(100)
    finally:
        inflater.close()
