"""ImageView over an index held as metadata only: its windows come from the published blob, or
from the store's whole copy of that same index, never from another index of the layer."""

from __future__ import annotations

import base64
import random

from imagefs.index import LayerIndex, build_index
from imagefs.view import ImageView
from stores.digest import sha256_digest
from stores.pull import pull
from stores.store import Store
from tests.support.images import Member, OciLayout, layer_tar


class Blobs:
    """A source serving blobs by digest through range reads, counting the index blob's."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.reads: list[tuple[str, int, int]] = []

    def read_range(self, digest: str, start: int, length: int) -> bytes:
        self.reads.append((digest, start, length))
        return self.blobs[digest][start:start + length]

    def close(self) -> None:
        pass


def test_windows_come_from_the_index_the_view_was_opened_with(tmp_path):
    # Base64 of random bytes: ~4.6 MB in short deflate blocks, several regions with a window each.
    text = base64.b64encode(random.Random(5).randbytes(3_450_000))
    members = [Member("data", "dir"), Member("data/first", data=text[:2_000_000]),
               Member("data/second", data=text[2_000_000:])]
    layout = OciLayout(tmp_path / "layout")
    layout.add_image([(layer_tar(members), "gzip")], tag="t")
    store = Store(tmp_path / "store")
    record = pull(store, f"oci:{layout.path}:t")
    (layer,) = record.image.layers
    blob = layout.blob_path(layer.digest).read_bytes()
    # Held as a pull of a published index leaves it: the metadata part and the blob's descriptor.
    published = store.read_index(layer.digest)
    meta = published[:LayerIndex.meta_length(published[:20], layer.digest)]
    index_blob = sha256_digest(published)
    store.put_index_meta(layer.digest, meta, {"digest": index_blob, "size": len(published),
                                              "meta_size": len(meta)})
    store.index_path(layer.digest).unlink()
    source = Blobs({layer.digest: blob, index_blob: published})
    view = ImageView.open(store, record, lambda: source)
    try:
        # Meanwhile the store's index of the layer is replaced by another one (`index --push`
        # re-indexing it with seek points at profiled files): other windows at other offsets.
        entries = {e.path: e for e in LayerIndex.from_bytes(published, layer.digest).entries}
        second = entries[b"data/second"]
        other = build_index([blob], digest=layer.digest, size=len(blob), compression="gzip",
                            wanted=[second.offset + 300_000])
        assert other.to_bytes() != published
        store.put_index(layer.digest, other.to_bytes())
        ino = view.tree.resolve(b"data/second")
        assert view.read(ino, 1_000_000, 4096) == text[3_000_000:3_004_096]
        assert any(d == index_blob for d, _, _ in source.reads)   # its window: from the published blob
    finally:
        view.close()
    # A whole copy of the same index (the prefetcher fetched it) serves the windows itself.
    store.index_path(layer.digest).unlink()
    view = ImageView.open(store, record, lambda: source)
    try:
        store.put_index(layer.digest, published)
        source.reads.clear()
        ino = view.tree.resolve(b"data/first")
        assert view.read(ino, 1_500_000, 4096) == text[1_500_000:1_504_096]
    finally:
        view.close()
    assert not any(d == index_blob for d, _, _ in source.reads)
