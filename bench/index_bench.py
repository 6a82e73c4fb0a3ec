"""5. Index: its size against the layer's, the time to build it, the time to fetch it.

- Size: STORE/indexes/<layer> after a pull, whole and its metadata part (what a lazy start must
  fetch before the first read; the windows of untouched spans can stay remote), per layer.
- Build: `imagefs pull oci:LAYOUT:TAG` of the workload image into an empty store (it copies each
  layer once, indexes it in one streaming pass and drops the copy), against `umoci unpack` of the
  same layout (what one does today to get a usable tree from a local image). Caches dropped before
  each. Sizes are those of the reads image's layers (the workload image's and the data layer).
- Fetch: today `imagefs pull` downloads the layers and indexes them itself; an index published
  beside the image would be fetched instead. To size that, each index is uploaded as a blob to
  the bench registry and fetched through the slow link (one keep-alive connection, as a pull
  would), against fetching the image's layer blobs the same way.
"""

from __future__ import annotations

import logging
import struct
import time

import httpx

from bench.context import Context
from bench.link import rate_bits
from bench.results import Row
from bench.system import run as run_cmd, timed

log = logging.getLogger("bench")

_PREFIX = struct.Struct("<8sIQ")  # magic, format version, metadata length (imagefs/index.py)


def _index_parts(data: bytes) -> tuple[int, int]:
    """(whole size, size of the prefix + metadata block) of an index file."""
    magic, _version, meta = _PREFIX.unpack_from(data)
    assert magic == b"IMGFSIDX", magic
    return len(data), _PREFIX.size + meta


def run(ctx: Context) -> None:
    image = ctx.image()  # the workload image: build times
    build, peer = [], []
    for i in range(ctx.mode.runs):
        cli = ctx.fresh_imagefs("index")
        ctx.cold()
        build.append(timed(lambda: cli("pull", image.ref)))
        ctx.discard(cli.store.parent)
        bundle = ctx.fresh_dir("umoci")
        ctx.cold()
        peer.append(timed(lambda: run_cmd("umoci", "unpack", "--image", f"{image.layout}:{image.tag}",
                                          bundle / "bundle")))
        ctx.discard(bundle)
        log.info("index: build run %d: imagefs pull %.2f s, umoci unpack %.2f s", i + 1, build[-1], peer[-1])
    ctx.add(Row("index", f"build: pull of a local OCI layout, `{image.tag}` "
                         f"({image.compressed_size / 1e6:.0f} MB gzip, {image.tar_size / 1e6:.0f} MB tar)",
                "imagefs pull oci:… (indexes every layer)", build,
                "umoci unpack of the same layout", peer))

    # Sizes: every layer of the reads image (the workload image's and the data layer).
    from bench.reads import ensure_local_store

    ensure_local_store(ctx)
    store = ctx.local_store
    assert store is not None
    reads = ctx.image(ctx.mode.reads_image)
    total_idx = total_meta = 0
    for n, layer in enumerate(reads.layers, 1):
        data = (store.store / "indexes" / layer.digest.split(":", 1)[1]).read_bytes()
        whole, meta = _index_parts(data)
        total_idx += whole
        total_meta += meta
        what = f"layer {n} of `{reads.tag}` ({layer.size / 1e6:.1f} MB gzip, {layer.tar_size / 1e6:.0f} MB tar)"
        ctx.add(Row("index", f"size, {what}", "index, whole", [whole], "the gzip layer", [layer.size], unit="B"))
        ctx.add(Row("index", f"size, {what}", "index, metadata part", [meta], "the gzip layer", [layer.size],
                    unit="B"))
    ctx.add(Row("index", f"size, all {len(reads.layers)} layers", "index, whole", [total_idx],
                "the gzip layers", [reads.compressed_size], unit="B"))
    ctx.add(Row("index", f"size, all {len(reads.layers)} layers", "index, metadata part", [total_meta],
                "the gzip layers", [reads.compressed_size], unit="B"))
    _fetch(ctx, store)


def _fetch(ctx: Context, cli) -> None:
    image = ctx.image()  # the workload image: what a cold start would fetch
    link = ctx.get_link()
    ctx.pushed(image.tag)
    repo = f"bench/{image.tag}"
    indexes = []
    for layer in image.layers:
        data = (cli.store / "indexes" / layer.digest.split(":", 1)[1]).read_bytes()
        indexes.append((link.push_blob(repo, data), _index_parts(data)[1]))
    layers = [layer.digest for layer in image.layers]

    def fetch(digests: list[str], meta_only: list[int] | None = None) -> float:
        with httpx.Client(timeout=600, trust_env=False) as client:
            start = time.perf_counter()
            for i, digest in enumerate(digests):
                headers = {"Range": f"bytes=0-{meta_only[i] - 1}"} if meta_only else {}
                with client.stream("GET", link.blob_url(repo, digest), headers=headers) as r:
                    r.raise_for_status()
                    for _ in r.iter_raw(1 << 20):
                        pass
            return time.perf_counter() - start

    for rate in ctx.mode.rates:
        link.set_rate(rate)
        where = _where(ctx, rate)
        whole, meta, peer = [], [], []
        for _ in range(ctx.mode.runs):
            whole.append(fetch([d for d, _ in indexes]))
            meta.append(fetch([d for d, _ in indexes], [m for _, m in indexes]))
            peer.append(fetch(layers))
        ctx.add(Row("index", f"fetch, `{image.tag}` ({len(layers)} layers), {where}",
                    "the indexes, whole (as published blobs)", whole, "the layer blobs", peer))
        ctx.add(Row("index", f"fetch, `{image.tag}` ({len(layers)} layers), {where}",
                    "the indexes' metadata parts (range reads)", meta, "the layer blobs", peer))
    ctx.note("index", "Fetch rows time the transfer alone (one keep-alive connection, the index files as plain "
                      "blobs), not a pull: the cold-start section has pulls that find published indexes, when "
                      "`imagefs index --push` exists.")


def _where(ctx: Context, rate: str | None) -> str:
    bits = rate_bits(rate)
    speed = "loopback, no limit" if bits is None else (f"{bits / 1e9:g} Gbit/s" if bits >= 1e9 else f"{bits / 1e6:g} Mbit/s")
    return f"{speed}, {ctx.mode.rtt * 1000:.0f} ms RTT"
