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
