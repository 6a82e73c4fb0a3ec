"""Pull: reference -> source -> verified manifest, config and layer indexes in the store.

A layer's index comes, in order of preference, from the store; for an eStargz layer, from its own
TOC (imagefs/estargz.py: read from the blob's tail and checked against the layer's annotation);
from an index artifact published
beside the image in its registry (imagefs/publish.py: found through the referrers API or tag, and
checked against the layer it names before it is stored; then the layer is not fetched at all); or
from the layer itself, fetched whole once (resumable, verified), indexed in one streaming pass, and
dropped unless `all_layers`. From then on the lazy read path fetches only the ranges tasks read.
A layer whose index and (if wanted) blob are already present is not fetched again, so an
interrupted pull resumes where it stopped. A pull that takes published indexes also takes the
access profile published with them, if the store has none for the image (the next mount prefetches
its files first). `push_index` publishes the image's indexes (and profile) afterwards.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from imagefs.errors import InputError
from stores.digest import hex_of
from stores.manifest import resolve
from stores.model import Image, Layer, Platform
from stores.reference import DockerReference, parse_reference
from stores.source import Source
from stores.sources import open_source
from stores.store import ImageRecord, Store

if TYPE_CHECKING:
    from imagefs.publish import PublishedIndexes

log = logging.getLogger(__name__)


@dataclass
class SourceOptions:
    """How to reach sources: registry TLS and auth, Appc discovery. Passed through to sources."""

    appc_discovery: str | None = None
    auth_file: str | None = None
    insecure: frozenset[str] = frozenset()
    ca_file: str | None = None
    cache_dir: str | None = None
    extra: dict = field(default_factory=dict)

    def open(self, reference: str) -> Source:
        registry_opts = dict(self.extra)
        if self.auth_file:
            registry_opts["auth_file"] = self.auth_file
        if self.insecure:
            registry_opts["insecure"] = self.insecure
        if self.ca_file:
            registry_opts["ca_file"] = self.ca_file
        return open_source(parse_reference(reference), appc_discovery=self.appc_discovery,
                           cache_dir=self.cache_dir, **registry_opts)


class PullProgress:
    """What pull reports; the CLI renders it (a no-op by default)."""

    def start(self, image_id: str, layers: list[Layer]) -> None: ...
    def layer_start(self, layer: Layer, already: bool) -> None: ...
    def advance(self, layer: Layer, nbytes: int) -> None: ...
    def layer_done(self, layer: Layer) -> None: ...


def pull(store: Store, reference: str, *, options: SourceOptions | None = None,
         platform: Platform | None = None, all_layers: bool = False,
         progress: PullProgress | None = None, use_published: bool = True,
         push_index: bool = False, on_toc: Callable[[Layer, bytes], None] | None = None) -> ImageRecord:
    """Pull *reference* into *store*. *use_published*: take layer indexes published in the registry
    (not with *all_layers*, which fetches the layers anyway); *push_index*: publish the image's
    indexes to its registry afterwards, unless they all came from there. *on_toc* is called with
    each eStargz layer's TOC as soon as it has arrived and been verified (from the thread that
    fetched it), before its index is built."""
    options = options or SourceOptions()
    progress = progress or PullProgress()
    ref = parse_reference(reference)
    if push_index and not isinstance(ref, DockerReference):
        raise InputError(reference, "indexes can only be published to a registry (docker://...)")
    with store.using(), options.open(reference) as source:
        tocs: list[Future[None]] = []
        lookups: list[Future[None]] = []
        found: list[PublishedIndexes | None] = [None]

        def manifest_known(digest: str, layers: tuple[Layer, ...]) -> None:
            # eStargz TOCs, and the published indexes of the layers that need one, are looked up
            # while the config is fetched: one round trip less.
            if not all_layers and any(layer.toc_digest for layer in layers):
                tocs.append(_in_thread(_take_tocs, store, source, list(layers), on_toc))
            if use_published and not all_layers:
                found[0] = published_indexes(source, digest, want_profile=not store.has_profile(hex_of(digest)))
                if found[0] is not None and any(not layer.toc_digest and not store.has_index(layer.digest)
                                                for layer in layers):
                    lookups.append(_in_thread(found[0].lookup))

        image = resolve(source, platform, on_manifest=manifest_known)
        store.put_blob(image.manifest_digest, image.manifest)
        store.put_blob(image.config_digest, image.config)
        progress.start(image.id, list(image.layers))
        published = found[0]
        try:
            for job in tocs + lookups:
                job.result()
            if not all_layers:
                _keep_prioritized(store, image)
            if published is not None:
                _prefetch_published(store, published, list(image.layers))
            for layer in image.layers:
                ensure_layer(store, source, layer, keep_blob=all_layers, progress=progress, published=published)
            store.save_image(image, source.pinned(image.manifest_digest), [str(ref)])
            if published is not None:
                keep_published_profile(store, image, published)
        finally:
            if published is not None:
                published.close()  # its profile fetch uses the source, which closes below
        if push_index and all(store.has_toc(layer.digest) for layer in image.layers):
            log.info("%s: every layer is eStargz, read through its own TOC: no index to publish", reference)
        elif push_index and not already_published(store, image, published):
            from imagefs.publish import publish
            from stores.registry import RegistrySource

            if not isinstance(source, RegistrySource):
                raise InputError(reference, "indexes can only be published to a registry")
            publish(store, source, image)
    return store.load(image.id)


def published_indexes(source: Source, manifest_digest: str, *, want_profile: bool = False) -> PublishedIndexes | None:
    """The published-index lookup for a registry source (lazy: it asks nothing until a layer
    needs an index; *want_profile*: it then fetches the published profile too); None for every
    other kind of source."""
    if not isinstance(source.reference, DockerReference):
        return None  # checked first: the registry module (and httpx) is not loaded for local sources
    from imagefs.publish import PublishedIndexes
    from stores.registry import RegistrySource

    return (PublishedIndexes(source, manifest_digest, want_profile=want_profile) if isinstance(source, RegistrySource)
            else None)


def keep_published_profile(store: Store, image: Image, published: PublishedIndexes) -> None:
    """Store the profile published with the indexes, unless the store has one by now (a mount of
    this image may have recorded its own meanwhile: a local recording is kept)."""
    paths = published.profile()
    if paths and not store.has_profile(image.id):
        store.put_profile(image.id, paths)


def already_published(store: Store, image: Image, published: PublishedIndexes | None) -> bool:
    """Whether `push_index` has nothing to add: every index came from the registry and, if the
    store has a profile, one is published already. A side effect of a pull does not replace
    someone's published profile with ours; `imagefs index --push` does, on purpose."""
    if published is None or not published.covered(image):
        return False
    return published.profile_listed or not store.has_profile(image.id)


def find_or_pull(store: Store, reference: str, options: SourceOptions | None = None,
                 platform: Platform | None = None,
                 on_toc: Callable[[Layer, bytes], None] | None = None) -> ImageRecord:
    """The image *reference* names in the store (by reference or id prefix), pulled lazily (indexes
    only) when the store does not have it yet, or has it for another platform than *platform*."""
    from imagefs.errors import NotFound

    try:
        name: str | None = str(parse_reference(reference))
    except InputError:
        name = None  # maybe an image id prefix
    if re.fullmatch(r"(sha256:)?[0-9a-f]{12,64}", reference):
        name = None  # an image id, never a Docker Hub repository to pull
    image_id = (name and store.lookup(name)) or store.lookup(reference)
    if image_id is not None:
        record = store.load(image_id)
        runtime = record.image.runtime
        if platform is None or (runtime.os, runtime.architecture) == (platform.os, platform.architecture):
            return record
    if name is None:
        raise NotFound(reference, "no such image in the store, and not a reference to pull")
    return pull(store, reference, options=options, platform=platform, on_toc=on_toc)


def ensure_layer(store: Store, source: Source, layer: Layer, *, keep_blob: bool,
                 progress: PullProgress, published: PublishedIndexes | None = None) -> None:
    """Make the layer's index (and blob, if *keep_blob*) present in the store; the index from
    *published* when it has a good one for this layer and the blob is not wanted."""
    if store.has_index(layer.digest) and (not keep_blob or store.has_blob(layer.digest)):
        progress.layer_start(layer, already=True)
        progress.layer_done(layer)
        return
    progress.layer_start(layer, already=False)
    with store.blob_lock(layer.digest):
        if published is not None and not keep_blob and not store.has_index(layer.digest):
            _take_published(store, published, layer)
        if store.has_index(layer.digest) and (not keep_blob or store.has_blob(layer.digest)):
            progress.layer_done(layer)  # published, or done by another pull while we waited
            return
        _index_from_blob(store, source, layer, keep_blob=keep_blob, progress=progress)
    progress.layer_done(layer)


def index_whole_layer(store: Store, source: Source, layer: Layer) -> None:
    """Build the layer's own index from its blob (fetched for it, kept only if it was here), even
    if the store holds its eStargz TOC: what publishing an index needs."""
    with store.blob_lock(layer.digest):
        if not store.has_full_index(layer.digest):
            _index_from_blob(store, source, layer, keep_blob=False, progress=PullProgress())


def _index_from_blob(store: Store, source: Source, layer: Layer, *, keep_blob: bool,
                     progress: PullProgress) -> None:
    """Fetch the blob (resumable, verified) and index it in one pass; the caller holds its lock."""
    had_blob = store.has_blob(layer.digest)
    path = store.fetch_blob_locked(
        layer.digest, layer.size,
        lambda offset: source.open_blob(layer.digest, layer.size, offset),
        lambda n: progress.advance(layer, n))
    if not store.has_full_index(layer.digest):
        store.put_index(layer.digest, build_layer_index(path, layer))
    if not keep_blob and not had_blob:
        path.unlink()


def _in_thread(fn: Callable[..., None], *args: object) -> Future[None]:
    """fn(*args) in a thread of its own, started now."""
    future: Future[None] = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # raised where the result is asked for
            future.set_exception(e)

    threading.Thread(target=run, name=f"imagefs-{fn.__name__.strip('_')}", daemon=True).start()
    return future


def _take_tocs(store: Store, source: Source, layers: list[Layer],
               on_toc: Callable[[Layer, bytes], None] | None = None) -> None:
    """Keep the TOC of every eStargz layer that has no index yet (read from the blob's tail, all
    layers at once): such a layer needs no index built or published. A TOC that cannot be read or
    does not match its annotation is a warning, and the layer is indexed as a plain gzip layer."""
    from concurrent.futures import ThreadPoolExecutor

    wanted = list({layer.digest: layer for layer in layers
                   if layer.toc_digest and not store.has_index(layer.digest)}.values())
    if not wanted:
        return

    def one(layer: Layer) -> None:
        from imagefs.estargz import fetch_toc, index_from_toc

        with store.blob_lock(layer.digest):
            if store.has_index(layer.digest):
                return
            try:
                member = fetch_toc(lambda start, n: source.read_range(layer.digest, start, n),
                                   layer.size, layer.toc_digest, f"layer {layer.digest}")
                if on_toc is not None:
                    on_toc(layer, member)
                # Usable, not only authentic: a TOC the mount would refuse (malformed, or in a
                # form not read here) must not make the image unmountable when its layer is
                # also a plain gzip tar. The index made here is kept: mounts load it, not the TOC.
                warn = lambda msg: log.warning("layer %s: %s", layer.digest[:19], msg)  # noqa: E731
                index = index_from_toc(member, digest=layer.digest, size=layer.size,
                                       toc_digest=layer.toc_digest, warn=warn)
            except InputError as e:
                log.warning("%s; indexing it as a plain gzip layer", e)
                return
            store.put_toc(layer.digest, member, index.to_bytes())

    if len(wanted) == 1:
        one(wanted[0])
        return
    with ThreadPoolExecutor(min(len(wanted), 8), thread_name_prefix="imagefs-toc") as pool:
        for future in [pool.submit(one, layer) for layer in wanted]:
            future.result()


def _keep_prioritized(store: Store, image: Image) -> None:
    """An eStargz image carries its access profile: the prioritized files of its layers (those
    before their `.prefetch.landmark`). Kept as the image's profile unless it has one."""
    if store.has_profile(image.id) or not any(layer.toc_digest for layer in image.layers):
        return
    from imagefs.estargz import prioritized_paths  # here: no import for images that are not eStargz

    paths: dict[str, None] = {}
    for layer in image.layers:
        if layer.toc_digest and store.has_toc(layer.digest):
            try:
                found = prioritized_paths(store.read_toc(layer.digest), toc_digest=layer.toc_digest,
                                          what=f"layer {layer.digest}")
            except (InputError, ValueError):
                continue  # the index built from it reports what is wrong
            paths.update(dict.fromkeys(found))
    if paths:
        store.put_profile(image.id, list(paths))


def _take_published(store: Store, published: PublishedIndexes, layer: Layer) -> None:
    """Store the metadata part of the layer's published index, if it has a good one."""
    from imagefs.publish import remote_of

    found = published.meta_for(layer)  # verified against the layer, or None
    if found is not None:
        meta, ref = found
        store.put_index_meta(layer.digest, meta, remote_of(ref))


def _prefetch_published(store: Store, published: PublishedIndexes, layers: list[Layer]) -> None:
    """Fetch the published index metadata of *layers* at once (one round trip, not one per layer);
    `ensure_layer` then finds them present."""
    from concurrent.futures import ThreadPoolExecutor

    wanted = list({layer.digest: layer for layer in layers if not store.has_index(layer.digest)}.values())
    if len(wanted) < 2:
        return  # ensure_layer does it: nothing to overlap

    def one(layer: Layer) -> None:
        with store.blob_lock(layer.digest):
            if not store.has_index(layer.digest):
                _take_published(store, published, layer)

    published.lookup()  # once, before the threads share it
    with ThreadPoolExecutor(min(len(wanted), 8), thread_name_prefix="imagefs-index") as pool:
        for future in [pool.submit(one, layer) for layer in wanted]:
            future.result()


def build_layer_index(path: Path, layer: Layer) -> bytes:
    from imagefs.index import build_index  # the index builder lives with the filesystem

    def chunks() -> Iterator[bytes]:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                yield block

    warn: Callable[[str], None] = lambda msg: log.warning("layer %s: %s", layer.digest[:19], msg)  # noqa: E731
    index = build_index(chunks(), digest=layer.digest, size=layer.size,
                        compression=layer.compression, root=layer.root, warn=warn)
    return index.to_bytes()
