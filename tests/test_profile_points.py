"""Extra seek points at the files of an access profile: the scanner places them (checked against
zlib), indexes carry them through every serialisation, and `imagefs index --push` of an image with
a profile publishes indexes with which reading a profiled file fetches far fewer bytes, the same
artifact from any store."""

from __future__ import annotations

import bisect
import gzip
import random
import re
import tarfile
import zlib

import pytest

from imagefs import zran
from imagefs.index import LayerIndex, build_index
from imagefs.layerread import LayerReader
from imagefs.profile_points import has_extra_points, profile_extents
from stores.store import Store
from tests.conftest import requires_skopeo
from tests.mounts import Cli, Mounts, needs_fuse
from tests.support.images import Member, OciLayout, layer_tar, push
from tests.test_index import big_tar, by_path, digest_of, make_tar, tarinfo
from tests.test_published_index import CountingFront, our_artifacts, referrers_tag
from tests.test_zran import check_spans, mixed_data


def scan(comp: bytes, span: int, wanted: list[int], ends: list[int] = (), min_lead: int = zran.MIN_LEAD,
         piece: int = 65536) -> tuple[bytes, list[zran.ScanPoint]]:
    out = []
    with zran.GzipScanner(span, wanted, min_lead, ends=ends) as sc:
        for i in range(0, len(comp), piece):
            out.extend(sc.feed(comp[i:i + piece]))
        sc.finish()
    return b"".join(out), sc.points


@pytest.fixture(scope="module")
def data() -> bytes:
    return mixed_data(random.Random(7), 4 << 20)


@pytest.mark.parametrize("piece", [4096, 65536, 1 << 22])
def test_points_at_or_just_before_each_wanted_offset(data: bytes, piece: int) -> None:
    comp = gzip.compress(data, mtime=0)
    rng = random.Random(piece)
    wanted = sorted(rng.sample(range(len(data)), 40)) + [len(data) - 1]
    _, regular = scan(comp, 1 << 20, [], piece=piece)
    out, points = scan(comp, 1 << 20, wanted, min_lead=0, piece=piece)
    assert out == data
    # The regular points stay exactly as they were; extra ones come in between.
    assert {(p.uoffset, p.coffset, p.bits) for p in regular} < {(p.uoffset, p.coffset, p.bits) for p in points}
    assert [p.uoffset for p in points] == sorted({p.uoffset for p in points})
    # Each wanted offset has a point at or before it, and no block boundary lies between the two:
    # restarting there and inflating exactly as far as the wanted offset gives zlib's bytes.
    boundaries = {p.uoffset for p in scan(comp, 1, [], piece=piece)[1]}  # span 1: every boundary
    starts = [p.uoffset for p in points]
    for w in wanted:
        i = bisect.bisect_right(starts, w) - 1
        assert not any(starts[i] < b <= w for b in boundaries), f"a later boundary before {w}"
    for p in points:
        assert p.window == data[max(0, p.uoffset - zran.WINDOW_SIZE):p.uoffset]
    check_spans(comp, data, points)
    whole = zlib.decompress(comp, 31)
    for w in wanted:  # and zlib agrees on what follows each point
        p = points[bisect.bisect_right(starts, w) - 1]
        lead = zran.lead_bytes(p.bits)
        got = zran.inflate_span(comp[p.coffset - lead:], bits=p.bits, window=p.window,
                                length=min(w + 1000, len(data)) - p.uoffset)
        assert got == whole[p.uoffset:w + 1000]


def test_min_lead_and_ends(data: bytes) -> None:
    comp = gzip.compress(data, mtime=0)
    boundaries = sorted({p.uoffset for p in scan(comp, 1, [])[1]})
    # Two wanted offsets close together: one point serves both when min_lead covers the gap.
    far = [b for b in boundaries if b > 2 << 20]
    w1, w2 = far[0] + 10, far[3] + 10
    _, tight = scan(comp, 8 << 20, [w1, w2], min_lead=0)
    _, loose = scan(comp, 8 << 20, [w1, w2], min_lead=w2 - far[0] + 1)
    assert [p.uoffset for p in tight] == [0, far[0], far[3]]
    assert [p.uoffset for p in loose] == [0, far[0]]
    # An end gets the first boundary at or after it.
    out, points = scan(comp, 8 << 20, [], ends=[w1, far[5]])
    assert out == data and [p.uoffset for p in points] == [0, far[1], far[5]]
    check_spans(comp, data, points)


def test_multi_member_and_wanted_in_the_last_block() -> None:
    rng = random.Random(3)
    parts = [mixed_data(rng, n) for n in (300_000, 5000, 700_000)]
    comp = b"".join(gzip.compress(p, mtime=0) for p in parts)
    data = b"".join(parts)
    wanted = [299_999, 300_000, 302_000, len(data) - 10]
    out, points = scan(comp, 1 << 30, wanted, min_lead=0, piece=1000)
    assert out == data
    starts = [p.uoffset for p in points]
    assert 300_000 in starts  # the second member's start, an exact hit
    assert all(starts[bisect.bisect_right(starts, w) - 1] <= w for w in wanted)
    assert len(points) >= 4
    check_spans(comp, data, points)


# -- indexes ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def layer() -> bytes:
    return big_tar(random.Random(21), 6 << 20)


def build(blob: bytes, **kw) -> LayerIndex:
    return build_index((blob[i:i + 65536] for i in range(0, len(blob), 65536)), digest=digest_of(blob),
                       size=len(blob), compression="gzip", **kw)


def test_index_with_extra_points_round_trips_and_reads(layer: bytes) -> None:
    blob = gzip.compress(layer, mtime=0)
    plain = build(blob)
    files = [e for e in plain.entries if e.size > 1000]
    chosen = files[3::7]
    extra = build(blob, wanted=[e.offset for e in chosen], ends=[e.offset + e.size for e in chosen])
    assert not has_extra_points(plain) and has_extra_points(extra)
    assert len(extra.points) > len(plain.points) and extra.entries == plain.entries
    assert {p.uoffset for p in plain.points} < {p.uoffset for p in extra.points}
    data = extra.to_bytes()
    assert data == build(blob, wanted=[e.offset for e in chosen], ends=[e.offset + e.size for e in chosen]).to_bytes()
    back = LayerIndex.from_bytes(data, extra.digest)
    assert back == extra and back.windows == extra.windows
    meta = LayerIndex.from_meta(data[:LayerIndex.meta_length(data[:20])], extra.digest)
    assert meta.points == extra.points
    # A reader over the metadata part (windows range-read) serves the chosen files right, and
    # what it fetches for one starts close to it.
    fetched: list[tuple[int, int]] = []

    def fetch(start: int, length: int) -> bytes:
        fetched.append((start, length))
        return blob[start:start + length]

    reader = LayerReader(meta, fetch, fetch_index=lambda s, n: data[s:s + n])
    starts = [p.uoffset for p in meta.points]
    for e in chosen:
        assert reader.read_entry(e, 0, e.size) == layer[e.offset:e.offset + e.size]
        point = meta.points[bisect.bisect_right(starts, e.offset) - 1]
        assert e.offset - point.uoffset < 256 << 10  # not the half span (512 KiB) on average
        start, stop = reader.readahead_extent(e.offset, e.size)
        assert start == point.coffset - zran.lead_bytes(point.bits)
    assert by_path(back)[chosen[0].path].offset == chosen[0].offset


def test_profile_extents_follow_the_union() -> None:
    lower = make_tar([tarinfo("a", b"A" * 5000), tarinfo("b", b"B" * 300_000), tarinfo("c", b"C" * 70_000),
                      tarinfo("d", b"D" * 10)])
    upper = make_tar([tarinfo("b", b"b" * 100), tarinfo("h", type=tarfile.LNKTYPE, linkname="c")])
    blobs = [gzip.compress(t, mtime=0) for t in (lower, upper)]
    indexes = [build(b) for b in blobs]

    class _Layer:
        def __init__(self, digest: str) -> None:
            self.digest = digest

    class _Image:
        layers = [_Layer(ix.digest) for ix in indexes]

    low, up = (by_path(ix) for ix in indexes)
    got = profile_extents(_Image(), indexes, ["a", "b", "d", "missing", ""], gap=1000)  # type: ignore[arg-type]
    # b is served by the upper layer; a and d are far apart in the lower one (b, c between them).
    assert got[indexes[1].digest] == [(up[b"b"].offset, up[b"b"].offset + 100)]
    assert got[indexes[0].digest] == [(low[b"a"].offset, low[b"a"].offset + 5000),
                                      (low[b"d"].offset, low[b"d"].offset + 10)]
    merged = profile_extents(_Image(), indexes, ["d", "a"], gap=1 << 20)  # type: ignore[arg-type]
    assert merged[indexes[0].digest] == [(low[b"a"].offset, low[b"d"].offset + 10)]
    # A hardlink is read from its target's data, in the layer that has it.
    linked = profile_extents(_Image(), indexes, ["h"], gap=1000)  # type: ignore[arg-type]
    assert linked == {indexes[0].digest: [(low[b"c"].offset, low[b"c"].offset + 70_000)], indexes[1].digest: []}


# -- end to end: index --push with a profile --------------------------------------------------------

def _files(rng: random.Random) -> list[Member]:
    words = [bytes(rng.choice(b"abcdefghij") for _ in range(rng.randint(2, 8))) for _ in range(500)]
    out = [Member("lib", "dir")]
    for i in range(160):
        text = b" ".join(rng.choice(words) for _ in range(6000))
        out.append(Member(f"lib/m{i:03}.py", data=text + rng.randbytes(8000)))
    return out


@pytest.fixture(scope="module")
def pushed(registry, tmp_path_factory) -> dict:
    """One image (a gzip layer of 160 files of ~50 KB) pushed as two repositories: profpts/plain and
    profpts/profiled (the same image: indexes are published per repository)."""
    members = _files(random.Random(5))
    layout = OciLayout(tmp_path_factory.mktemp("profpts") / "layout")
    desc = layout.add_image([(layer_tar(members), "gzip")], tag="img", config={"Cmd": ["/bin/sh"]})
    for repo in ("plain", "profiled", "again"):
        push(layout.path, "img", registry.ref(f"profpts/{repo}:1"))
    return {"digest": desc["digest"], "members": members}


def _pushed_artifact(stdout: str) -> str:
    m = re.search(r"pushed (sha256:[0-9a-f]{64})", stdout)
    assert m, stdout
    return m.group(1)


PROFILED = ["lib/m077.py", "lib/m123.py", "lib/m010.py"]


@requires_skopeo
@needs_fuse
def test_profiled_files_read_with_far_fewer_bytes(pushed, registry, tmp_path):
    image_id = pushed["digest"][7:]
    contents = {m.path: m.data for m in pushed["members"] if m.kind == "file"}
    publisher = Cli(tmp_path / "pub" / "store", tmp_path / "pub" / "work")
    publisher.run("index", "--push", registry.ref("profpts/plain:1"))
    profiled = Cli(tmp_path / "prof" / "store", tmp_path / "prof" / "work")
    profiled.run("index", registry.ref("profpts/profiled:1"))
    Store(profiled.store).put_profile(image_id, PROFILED)
    r = profiled.run("index", "--push", registry.ref("profpts/profiled:1"))
    assert r.stderr == "" and "access profile of 3 file(s)" in r.stdout

    fetched = {}
    for repo in ("plain", "profiled"):
        reader = Cli(tmp_path / f"read-{repo}" / "store", tmp_path / f"read-{repo}" / "work")
        mounts = Mounts(reader)
        with CountingFront(registry.url) as front:
            try:
                # No background prefetch: this counts what the reads fetch.
                mp = mounts.mount(front.ref(f"profpts/{repo}:1"), tmp_path / f"mnt-{repo}", "--prefetch=none")
                before = sum(front.served.values())
                for path in PROFILED:
                    assert (mp / path).read_bytes() == contents[path]
                fetched[repo] = sum(front.served.values()) - before
            finally:
                mounts.cleanup()  # before the front stops: the server may still be asking it
    wanted = sum(len(gzip.compress(contents[p])) for p in PROFILED)
    assert fetched["profiled"] < 0.6 * fetched["plain"], fetched
    assert fetched["profiled"] < 4 * wanted + 3 * 65536, (fetched, wanted)


@requires_skopeo
def test_the_artifact_depends_on_the_image_and_profile_only(pushed, registry, tmp_path):
    image_id = pushed["digest"][7:]
    ref = registry.ref("profpts/again:1")
    a = Cli(tmp_path / "a" / "store", tmp_path / "a" / "work")
    b = Cli(tmp_path / "b" / "store", tmp_path / "b" / "work")
    a.run("pull", "--all-layers", ref)  # a re-indexes from its local blob, b from the registry
    b.run("index", ref)
    for cli in (a, b):
        Store(cli.store).put_profile(image_id, PROFILED)
    first = _pushed_artifact(a.run("index", "--push", ref).stdout)
    assert _pushed_artifact(b.run("index", "--push", ref).stdout) == first
    assert _pushed_artifact(a.run("index", "--push", ref).stdout) == first
    layer = next(iter((a.store / "indexes").iterdir())).name
    assert (a.store / "indexes" / layer).read_bytes() == (b.store / "indexes" / layer).read_bytes()
    assert len(our_artifacts(referrers_tag(registry.url, "profpts/again", _Image(pushed)))) == 1
    # Another profile: other points; the first profile again: the first artifact again.
    Store(a.store).put_profile(image_id, ["lib/m001.py"])
    assert _pushed_artifact(a.run("index", "--push", ref).stdout) != first
    Store(a.store).put_profile(image_id, PROFILED)
    assert _pushed_artifact(a.run("index", "--push", ref).stdout) == first


class _Image:
    """What referrers_tag needs of an image: its manifest digest."""

    def __init__(self, pushed: dict) -> None:
        self.digest = pushed["digest"]
