"""Background prefetch and access profiles on real mounts, with a registry that goes away; a
profile published with the indexes is fetched first by a store that never ran the image."""

from __future__ import annotations

import errno
import json
import os
import random
from pathlib import Path

import pytest

from imagefs.chunkcache import present_file
from imagefs.index import DEFAULT_CHUNK_SIZE
from tests.mounts import Cli, Mounts, needs_fuse
from tests.support.images import Member, OciLayout, busybox_members, layer_tar, push, wait_until

pytestmark = needs_fuse

BIG = random.Random(3).randbytes(6 << 20)


@pytest.fixture
def env(tmp_path):
    cli = Cli(tmp_path / "store", tmp_path / "work")
    mounts = Mounts(cli)
    try:
        yield cli, mounts
    finally:
        mounts.cleanup()


def _image(tmp_path, registry) -> str:
    layout = OciLayout(tmp_path / "layout")
    files = [Member("data", "dir"), Member("data/big", data=BIG), Member("data/small", data=b"small file\n")]
    layout.add_image([(layer_tar(busybox_members()), "gzip"), (layer_tar(files), "gzip")], tag="p")
    ref = registry.ref("prefetch/img:1")
    push(layout.path, "p", ref)
    return ref


def _layers(cli: Cli, ref: str) -> list[dict]:
    return json.loads(cli.run("inspect", "--json", ref).stdout)["layers"]


def _all_present(present: Path, chunks: range) -> bool:
    marks = present.read_bytes() if present.exists() else b""
    return len(marks) >= chunks.stop and all(marks[c] for c in chunks)


def _profiled_chunks(cli: Cli, layer_hex: str, path: str) -> range:
    """The chunks of the layer the profile prefetch fetches for *path* (what a read of it needs)."""
    from imagefs.index import LayerIndex
    from imagefs.layerread import LayerReader

    index = LayerIndex.from_bytes((cli.store / "indexes" / layer_hex).read_bytes(), f"sha256:{layer_hex}")
    entry = next(e for e in index.entries if e.path == path.encode())
    start, end = LayerReader(index, lambda s, n: b"").readahead_extent(entry.offset, entry.size)
    return range(start // index.chunk_size, (end - 1) // index.chunk_size + 1)


def _read_errno(path) -> int | None:
    try:
        path.read_bytes()
    except OSError as e:
        return e.errno
    return None


def test_prefetch_all_makes_the_image_survive_the_registry(tmp_path, own_registry, env):
    cli, mounts = env
    ref = _image(tmp_path, own_registry)
    mp = mounts.mount(ref, tmp_path / "mnt")  # --prefetch all is the default
    layers = _layers(cli, ref)
    blobs = cli.store / "blobs" / "sha256"
    wait_until(lambda: all((blobs / l["digest"][7:]).exists() for l in layers), 120, "layers local")
    own_registry.stop()
    assert (mp / "data" / "big").read_bytes() == BIG
    assert (mp / "bin" / "busybox").read_bytes() == Path("/bin/busybox").read_bytes()
    assert all(l["blob_local"] for l in _layers(cli, ref))  # promoted: verified whole layers


def test_prefetch_all_from_published_indexes_survives_the_registry(tmp_path, own_registry, env):
    """A store that took only the metadata of published indexes: the prefetch makes the indexes
    whole as well as the layers, so every file (every window) reads with the registry gone."""
    cli, mounts = env
    ref = _image(tmp_path, own_registry)
    Cli(tmp_path / "publisher" / "store", tmp_path / "publisher" / "work").run("index", "--push", ref)
    mp = mounts.mount(ref, tmp_path / "mnt")
    layers = _layers(cli, ref)
    assert not any((cli.store / "indexes" / l["digest"][7:]).exists() for l in layers)  # metadata only
    blobs, indexes = cli.store / "blobs" / "sha256", cli.store / "indexes"
    wait_until(lambda: all((blobs / l["digest"][7:]).exists() and (indexes / l["digest"][7:]).exists()
                           for l in layers), 120, "layers and indexes local")
    own_registry.stop()
    with open(mp / "data" / "big", "rb") as f:  # from the middle first: a window not read before
        f.seek(len(BIG) - 100_000)
        assert f.read() == BIG[-100_000:]
    assert (mp / "data" / "big").read_bytes() == BIG
    assert (mp / "bin" / "busybox").read_bytes() == Path("/bin/busybox").read_bytes()


def test_profile_is_recorded_and_fetched_first(tmp_path, own_registry, env):
    cli, mounts = env
    ref = _image(tmp_path, own_registry)
    mp = mounts.mount(ref, tmp_path / "mnt", "--prefetch", "none")
    assert (mp / "data" / "small").read_bytes() == b"small file\n"
    assert (mp / "bin" / "busybox").stat().st_size > 0  # a stat is not a read
    cli.run("umount", str(mp))
    image_id = json.loads(cli.run("inspect", "--json", ref).stdout)["id"]
    profile = json.loads((cli.store / "images" / image_id / "profile.json").read_text())
    assert profile["paths"] == ["data/small"]
    data_layer = _layers(cli, ref)[1]["digest"][7:]
    assert not all(present_file(cli.store / "chunks" / data_layer, DEFAULT_CHUNK_SIZE).read_bytes())  # not whole

    # A fresh cache: with --prefetch profile, the profiled file's chunks arrive without any read.
    for d in (cli.store / "chunks").iterdir():
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    mounts.mount(ref, mp, "--prefetch", "profile")
    present = present_file(cli.store / "chunks" / data_layer, DEFAULT_CHUNK_SIZE)
    wanted = _profiled_chunks(cli, data_layer, "data/small")
    wait_until(lambda: _all_present(present, wanted), 60, "profile prefetch")
    own_registry.stop()
    assert (mp / "data" / "small").read_bytes() == b"small file\n"  # served with the registry gone
    assert _read_errno(mp / "data" / "big") == errno.EIO  # never prefetched: not served, not wrong


def test_published_profile_is_fetched_first_by_another_store(tmp_path, own_registry, env):
    """Store A records a profile and publishes it with the indexes (`index --push`); store B,
    which never ran the image, mounts it: the pull brings the indexes and the profile, and the
    profiled file's chunks arrive before anything reads them."""
    cli, mounts = env
    ref = _image(tmp_path, own_registry)
    mp = mounts.mount(ref, tmp_path / "mnt", "--prefetch", "none")
    assert (mp / "data" / "small").read_bytes() == b"small file\n"
    cli.run("umount", str(mp))
    image_id = json.loads(cli.run("inspect", "--json", ref).stdout)["id"]
    recorded = (cli.store / "images" / image_id / "profile.json").read_bytes()
    assert json.loads(recorded)["paths"] == ["data/small"]
    r = cli.run("index", "--push", ref)
    assert "access profile of 1 file(s)" in r.stdout, r.stdout

    other = Cli(tmp_path / "b" / "store", tmp_path / "b" / "work")
    other_mounts = Mounts(other)
    try:
        mp_b = other_mounts.mount(ref, tmp_path / "mnt-b", "--prefetch", "profile")  # pulls first
        assert (other.store / "images" / image_id / "profile.json").read_bytes() == recorded
        layers = _layers(other, ref)
        assert not any(l["blob_local"] for l in layers)  # the indexes were published: no layer fetched
        data_layer = layers[1]["digest"][7:]
        present = present_file(other.store / "chunks" / data_layer, DEFAULT_CHUNK_SIZE)
        wanted = _profiled_chunks(cli, data_layer, "data/small")  # the publisher's whole index
        wait_until(lambda: _all_present(present, wanted), 60, "profile prefetch")
        own_registry.stop()
        assert (mp_b / "data" / "small").read_bytes() == b"small file\n"  # served with the registry gone
        assert _read_errno(mp_b / "data" / "big") == errno.EIO  # not in the profile: never fetched
    finally:
        other_mounts.cleanup()


def test_a_profiled_file_reads_anywhere_without_the_registry_once_prefetched(tmp_path, own_registry, env):
    """A task maps a big profiled file and reads it out of order: every region it spans needs its
    window, not only the first. The profile prefetch fetches all of them before the chunks, so a
    read deep into the file, with the registry gone, is served."""
    cli, mounts = env
    ref = _image(tmp_path, own_registry)
    mp = mounts.mount(ref, tmp_path / "mnt", "--prefetch", "none")
    with open(mp / "data" / "big", "rb") as f:
        assert os.pread(f.fileno(), 4096, 0) == BIG[:4096]
    cli.run("umount", str(mp))
    cli.run("index", "--push", ref)

    other = Cli(tmp_path / "b" / "store", tmp_path / "b" / "work")
    other_mounts = Mounts(other)
    try:
        mp_b = other_mounts.mount(ref, tmp_path / "mnt-b", "--prefetch", "profile")
        data_layer = _layers(other, ref)[1]["digest"][7:]
        present = present_file(other.store / "chunks" / data_layer, DEFAULT_CHUNK_SIZE)
        wanted = _profiled_chunks(cli, data_layer, "data/big")
        wait_until(lambda: _all_present(present, wanted), 60, "profile prefetch")
        own_registry.stop()
        far = len(BIG) - (300 << 10)   # in the file's last region: four seek points past its start
        with open(mp_b / "data" / "big", "rb") as f:
            assert os.pread(f.fileno(), 8192, far) == BIG[far:far + 8192]
            assert os.pread(f.fileno(), 8192, 3 << 20) == BIG[3 << 20:(3 << 20) + 8192]
    finally:
        other_mounts.cleanup()
