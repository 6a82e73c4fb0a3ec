"""Fetching an eStargz image's prioritized files early (imagefs/prioritized.py): the range before
each layer's .prefetch.landmark is fetched into the store's chunk cache as soon as the layer's TOC
is known, in order, and what is there is not fetched again; a layer with nothing prioritized, or
already local, costs nothing."""

from __future__ import annotations

import gzip
import io
import random
import tarfile
import threading

from imagefs.chunkcache import ChunkCache
from imagefs.estargz import fetch_toc, prioritized_extent
from imagefs.estargz_writer import write_estargz
from imagefs.index import DEFAULT_CHUNK_SIZE
from imagefs.prioritized import PIECE, PrioritizedFetch
from stores.model import Layer
from stores.store import Store
from tests.support.images import Member, layer_tar

MEMBERS = [Member("usr", "dir"), Member("usr/bin", "dir"),
           Member("usr/bin/tool", data=random.Random(1).randbytes(700 << 10)),
           Member("usr/lib", "dir"), Member("usr/lib/big", data=random.Random(2).randbytes(900 << 10)),
           Member("etc", "dir"), Member("etc/conf", data=b"x = 1\n")]


class Blob:
    """The layer served by range reads, counted; close() is what a Source must have."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.calls: list[tuple[int, int]] = []
        self.lock = threading.Lock()
        self.closed = False

    def read_range(self, digest: str, start: int, length: int) -> bytes:
        with self.lock:
            self.calls.append((start, length))
        return self.data[start:start + length]

    def close(self) -> None:
        self.closed = True


def estargz_layer(prioritized: list[str]) -> tuple[Layer, bytes, bytes]:
    src = io.BytesIO(gzip.compress(layer_tar(MEMBERS), mtime=0))
    out = io.BytesIO()
    with tarfile.open(fileobj=src) as tar:
        written = write_estargz(tar, out, prioritized=prioritized)
    blob = out.getvalue()
    layer = Layer(written.digest, "application/vnd.oci.image.layer.v1.tar+gzip", len(blob), "gzip",
                  toc_digest=written.toc_digest)
    return layer, blob, fetch_toc(lambda s, n: blob[s:s + n], len(blob), written.toc_digest, "x")


def test_the_prioritized_range_ends_at_the_landmark():
    layer, blob, toc = estargz_layer(["etc/conf", "usr/bin/tool"])
    extent = prioritized_extent(toc, toc_digest=layer.toc_digest, what="x")
    plain = gzip.decompress(blob[:extent])  # whole members: the prioritized files, the landmark's header
    names = [ti.name for ti in tarfile.open(fileobj=io.BytesIO(plain + b"\0" * 1024))]
    assert names == ["etc", "etc/conf", "usr", "usr/bin", "usr/bin/tool", ".prefetch.landmark"]
    layer, blob, toc = estargz_layer([])
    assert prioritized_extent(toc, toc_digest=layer.toc_digest, what="x") == 0


def test_the_prioritized_range_is_fetched_into_the_chunk_cache_once(tmp_path):
    store = Store(tmp_path / "store")
    layer, blob, toc = estargz_layer(["usr/bin/tool"])
    extent = prioritized_extent(toc, toc_digest=layer.toc_digest, what="x")
    source = Blob(blob)
    early = PrioritizedFetch(store, lambda: source)
    early.layer(layer, toc)
    early.finish()
    assert source.closed and early.bytes == extent
    chunks = -(-extent // DEFAULT_CHUNK_SIZE)
    assert sorted(source.calls) == [(s, min(PIECE, chunks * DEFAULT_CHUNK_SIZE - s))
                                    for s in range(0, chunks * DEFAULT_CHUNK_SIZE, PIECE)]
    # What the mount's cache then finds: those chunks, with the blob's bytes, and nothing fetched.
    again = Blob(blob)
    cache = ChunkCache(store.chunks_dir(layer.digest), len(blob), DEFAULT_CHUNK_SIZE, None,
                       lambda s, n: again.read_range(layer.digest, s, n))
    assert cache.has(0, chunks) and not cache.has(chunks, chunks + 1)
    assert cache.read(0, extent) == blob[:extent] and again.calls == []
    cache.close()

    # A second run of the same image: everything is there, nothing is fetched.
    source = Blob(blob)
    early = PrioritizedFetch(store, lambda: source)
    early.layer(layer, toc)
    early.finish()
    assert source.calls == []


def test_nothing_prioritized_or_the_layer_local_costs_nothing(tmp_path):
    store = Store(tmp_path / "store")
    opened = []
    layer, blob, toc = estargz_layer([])
    early = PrioritizedFetch(store, lambda: opened.append(1) or Blob(blob))
    early.layer(layer, toc)
    layer2, blob2, toc2 = estargz_layer(["etc/conf"])
    store.put_blob(layer2.digest, blob2)
    early.layer(layer2, toc2)
    early.finish()
    assert opened == [] and early.bytes == 0


# -- the files of an access profile, from the layer indexes the pull kept ---------------------------

class Blobs(Blob):
    """Several layers' blobs, by digest, served by range reads and counted."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        super().__init__(b"")
        self.blobs = blobs

    def read_range(self, digest: str, start: int, length: int) -> bytes:
        with self.lock:
            self.calls.append((digest, start, length))
        return self.blobs[digest][start:start + length]


def _profiled_image(tmp_path):
    """Two gzip layers pulled into a store from a layout (indexes built, no blob kept): the upper
    one replaces usr/bin/tool; the lower one has usr/lib/link, a hardlink to usr/lib/big."""
    from stores.pull import pull
    from tests.support.images import OciLayout

    rng = random.Random(3)
    lower = [Member("usr", "dir"), Member("usr/bin", "dir"), Member("usr/bin/tool", data=rng.randbytes(300 << 10)),
             Member("usr/lib", "dir"), Member("usr/lib/filler", data=rng.randbytes(2 << 20)),
             Member("usr/lib/big", data=rng.randbytes(600 << 10)),
             Member("usr/lib/link", "hardlink", linkname="usr/lib/big"),
             Member("usr/lib/after", data=rng.randbytes(1 << 20))]
    upper = [Member("usr", "dir"), Member("usr/bin", "dir"), Member("usr/bin/tool", data=rng.randbytes(200 << 10)),
             Member("etc", "dir"), Member("etc/conf", data=b"x = 1\n")]
    layout = OciLayout(tmp_path / "layout")
    layout.add_image([(layer_tar(lower), "gzip"), (layer_tar(upper), "gzip")], tag="t")
    store = Store(tmp_path / "store")
    record = pull(store, f"oci:{layout.path}:t")
    blobs = {layer.digest: layout.blob_path(layer.digest).read_bytes() for layer in record.image.layers}
    return store, record, blobs


def test_a_profiles_files_are_fetched_from_where_the_mount_would_read_them(tmp_path):
    from imagefs.index import LayerIndex
    from imagefs.layerread import LayerReader
    from imagefs.prioritized import profile_ranges

    store, record, blobs = _profiled_image(tmp_path)
    lower, upper = record.image.layers
    assert not any(store.has_blob(layer.digest) for layer in record.image.layers)
    indexes = {layer.digest: LayerIndex.from_bytes(store.read_index(layer.digest), layer.digest)
               for layer in record.image.layers}
    by_path = {d: {e.path: e for e in ix.entries} for d, ix in indexes.items()}

    def extent(layer, path: bytes) -> tuple[int, int]:
        entry = by_path[layer.digest][path]
        return LayerReader(indexes[layer.digest], blobs[layer.digest].__getitem__).readahead_extent(
            entry.offset, entry.size)

    profile = ["usr/bin/tool", "usr/lib/link", "etc/conf", "no/such/file", "usr"]
    ranges = profile_ranges(store, record, profile)
    # The upper layer's tool, the hardlink's target's data, the small file; in profile order.
    assert [(layer.digest, start, end) for layer, _, start, end in ranges] == [
        (upper.digest, *extent(upper, b"usr/bin/tool")), (lower.digest, *extent(lower, b"usr/lib/big")),
        (upper.digest, *extent(upper, b"etc/conf"))]
    # Each read-ahead starts at the seek point before its file: the hardlink's target sits 2 MiB
    # into its layer, past the first seek point, so its range does not start at the blob's start.
    assert ranges[1][2] > 0 and ranges[1][3] < len(blobs[lower.digest])

    store.put_profile(record.id, profile)
    source = Blobs(blobs)
    early = PrioritizedFetch(store, lambda: source)
    early.profile(record)
    early.finish()
    assert source.closed and early.bytes == sum(end - start for _, _, start, end in ranges)
    size = DEFAULT_CHUNK_SIZE
    wanted = {(layer.digest, c) for layer, _, start, end in ranges for c in range(start // size, (end - 1) // size + 1)}
    got = {(d, c) for d, s, n in source.calls for c in range(s // size, (s + n - 1) // size + 1)}
    assert got == wanted   # exactly the chunks of those ranges, each once
    assert sum(n for _, _, n in source.calls) == sum(
        min(size, len(blobs[d]) - c * size) for d, c in wanted)
    # The mount's caches find them, checked against the chunk digests, and fetch nothing.
    again = Blobs(blobs)
    for layer, index, start, end in ranges:
        cache = ChunkCache(store.chunks_dir(layer.digest), layer.size, index.chunk_size, index.chunk_digests,
                           lambda s, n, d=layer.digest: again.read_range(d, s, n))
        assert cache.read(start, end - start) == blobs[layer.digest][start:end]
        cache.close()
    assert again.calls == []


def test_no_profile_or_an_estargz_head_start_fetches_nothing_more(tmp_path):
    store, record, blobs = _profiled_image(tmp_path)
    opened = []
    early = PrioritizedFetch(store, lambda: opened.append(1) or Blobs(blobs))
    early.profile(record)   # the image has no profile
    early.finish()
    assert opened == [] and early.bytes == 0
    # A layer whose blob is here is read from it: its files are not fetched.
    store.put_profile(record.id, ["usr/lib/big", "etc/conf"])
    lower, upper = record.image.layers
    (store.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    store.blob_path(upper.digest).write_bytes(blobs[upper.digest])
    source = Blobs(blobs)
    early = PrioritizedFetch(store, lambda: source)
    early.profile(record)
    early.finish()
    assert source.calls and {d for d, _, _ in source.calls} == {lower.digest}
