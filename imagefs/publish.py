"""Published layer indexes: the OCI artifact that carries an image's layer indexes beside it.

A layer's index is built by streaming the whole layer once (imagefs/index.py). Publishing it in the
image's repository lets every other machine skip that: `pull` finds the artifact, checks each index
against the layer it is for, and stores it, without fetching a byte of the layers.

The artifact (docs/index-format.md, "Published indexes"):

    OCI image manifest   mediaType    application/vnd.oci.image.manifest.v1+json
                         artifactType application/vnd.imagefs.index.v1
                         config       the OCI empty descriptor (application/vnd.oci.empty.v1+json, `{}`)
                         subject      the image manifest's descriptor
                         annotations  io.imagefs.index.format: the index format version
                         layers       one per distinct image layer, in image order:
        mediaType   application/vnd.imagefs.layer-index.v1   (the serialised index, as stored)
        annotations io.imagefs.layer.digest            the layer it indexes
                    io.imagefs.index.metadata.size     bytes of prefix + metadata block
                    io.imagefs.index.metadata.digest   sha256 of those bytes
        and, when the store has the image's access profile, one more (after the indexes):
        mediaType   application/vnd.imagefs.profile.v1+json  (the profile document, canonical JSON)
        annotations io.imagefs.profile.format          its format version

The metadata size and digest let a reader range-fetch just the metadata block and trust it before
any window; the windows are covered by their own sha256s inside the metadata. The JSON is
canonical (sorted keys, no spaces) and indexes and profile documents are deterministic, so the same
image with the same profile published twice, from any machine, is the same artifact; a profile
recorded after the indexes were published makes a new artifact (the newest), and readers take each
layer's index and the profile from the newest artifact that has a good one.

Verification of a published index, all before it is stored (anything less: a warning, and the
layer is streamed as if nothing had been published): the blob's sha256 and size are its
descriptor's; the metadata size and digest are its annotations'; `LayerIndex.from_bytes` with the
layer's digest (the binding: the index must name that layer) checks the whole index, every window
included; and the index's compressed size, compression and root prefix are the layer's. A
published profile is optional all the way: fetched beside the indexes (in a thread of its own, so it
costs no round trip in sequence, and none at all when there is none), it must be at most
MAX_PROFILE_BYTES, match its descriptor's size and sha256 and parse as a profile; otherwise it is a
one-line warning and the pull goes on without it. It only orders prefetching: the files it names are
read, and verified, like any other.

Concurrency: `PublishedIndexes` is used by one pull at a time; its only other thread fetches the
profile, sharing nothing but the (thread-safe) RegistrySource, and `close` waits for it.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from imagefs.errors import DigestMismatch, ImagefsError, InputError, NotFound
from imagefs.index import FORMAT_VERSION, PUBLISHED_FORMATS, LayerIndex
from stores.digest import check_digest, sha256_digest
from stores.manifest import load_json, media_type_of
from stores.model import OCI_MANIFEST, Descriptor, Image, Layer
from stores.source import ManifestBytes, Source
from stores.store import MAX_PROFILE_BYTES, PROFILE_FORMAT, Store, encode_profile, parse_profile

if TYPE_CHECKING:
    from stores.registry import RegistrySource

log = logging.getLogger(__name__)

ARTIFACT_TYPE = "application/vnd.imagefs.index.v1"
INDEX_MEDIA_TYPE = "application/vnd.imagefs.layer-index.v1"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
EMPTY_DIGEST = sha256_digest(EMPTY_JSON)
ANN_FORMAT = "io.imagefs.index.format"
ANN_LAYER = "io.imagefs.layer.digest"
ANN_META_SIZE = "io.imagefs.index.metadata.size"
ANN_META_DIGEST = "io.imagefs.index.metadata.digest"
PROFILE_MEDIA_TYPE = "application/vnd.imagefs.profile.v1+json"
ANN_PROFILE_FORMAT = "io.imagefs.profile.format"
MAX_ARTIFACTS = 8  # newest artifacts examined per image; older ones are superseded anyway
MAX_INDEX_SLACK = 16 << 20  # an index blob larger than its layer plus this is not an index


@dataclass(frozen=True)
class PublishedIndex:
    """A layer index as an artifact lists it: its blob's descriptor and what it claims to be."""

    layer: str
    digest: str
    size: int
    meta_size: int
    meta_digest: str


@dataclass(frozen=True)
class IndexBlob:
    """A serialised index ready to publish, with the descriptor facts the artifact records."""

    ref: PublishedIndex
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class PublishedProfile:
    """An access profile as an artifact lists it."""

    digest: str
    size: int


@dataclass(frozen=True)
class ProfileBlob:
    """A profile document ready to publish."""

    ref: PublishedProfile
    data: bytes = field(repr=False)
    paths: int  # how many


@dataclass(frozen=True)
class ParsedArtifact:
    """What an artifact manifest lists: layer indexes, and maybe a profile. A profile descriptor
    that is malformed does not spoil the indexes: it is `profile_error` (for a warning) instead."""

    indexes: list[PublishedIndex]
    profile: PublishedProfile | None = None
    profile_error: str | None = None


def index_blob(layer_digest: str, data: bytes) -> IndexBlob:
    meta_size = LayerIndex.meta_length(data[:20], layer_digest)
    return IndexBlob(PublishedIndex(layer_digest, sha256_digest(data), len(data), meta_size,
                                    sha256_digest(data[:meta_size])), data)


def subject_of(image: Image) -> Descriptor:
    """The image manifest's descriptor: what the artifact refers to."""
    doc = load_json(image.manifest, f"image {image.id}: manifest")
    media_type = media_type_of(ManifestBytes(image.manifest, ""), doc, f"image {image.id}")
    return Descriptor(media_type, image.manifest_digest, len(image.manifest))


def _canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def profile_blob(paths: list[str]) -> ProfileBlob:
    data = encode_profile(paths)
    return ProfileBlob(PublishedProfile(sha256_digest(data), len(data)), data, len(paths))


def build_artifact(subject: Descriptor, blobs: list[IndexBlob], profile: ProfileBlob | None = None) -> bytes:
    """The artifact manifest for *blobs* (one per layer), and *profile* if any, referring to *subject*."""
    layers = [{"mediaType": INDEX_MEDIA_TYPE, "digest": b.ref.digest, "size": b.ref.size,
               "annotations": {ANN_LAYER: b.ref.layer, ANN_META_SIZE: str(b.ref.meta_size),
                               ANN_META_DIGEST: b.ref.meta_digest}} for b in blobs]
    if profile is not None:  # last: readers that predate profiles skip it by its media type
        layers.append({"mediaType": PROFILE_MEDIA_TYPE, "digest": profile.ref.digest, "size": profile.ref.size,
                       "annotations": {ANN_PROFILE_FORMAT: str(PROFILE_FORMAT)}})
    return _canonical({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_MEDIA_TYPE, "digest": EMPTY_DIGEST, "size": len(EMPTY_JSON)},
        "layers": layers,
        "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size},
        "annotations": {ANN_FORMAT: str(artifact_format(blobs))},
    })


def artifact_format(blobs: list[IndexBlob]) -> int:
    """The format an artifact of *blobs* says it holds: the newest of its blobs' (indexes a store
    took from format 1 stay in it; each blob's header says its own, and readers check that)."""
    return max((LayerIndex.format_version(b.data[:20]) for b in blobs), default=FORMAT_VERSION)


def parse_artifact(data: bytes, subject: str, what: str) -> ParsedArtifact:
    """The layer indexes (and profile) an artifact manifest lists, after checking it is an imagefs
    index artifact for *subject* in a format this imagefs reads. Layers of other media types, and
    profiles of another format, are ignored."""
    doc = load_json(data, what)
    if doc.get("mediaType") != OCI_MANIFEST or doc.get("artifactType") != ARTIFACT_TYPE:
        raise InputError(what, f"not an imagefs index artifact ({doc.get('mediaType')!r}, {doc.get('artifactType')!r})")
    named = (doc.get("subject") or {}).get("digest") if isinstance(doc.get("subject"), dict) else None
    if named != subject:
        raise InputError(what, f"refers to {named}, not to image {subject}")
    version = (doc.get("annotations") or {}).get(ANN_FORMAT) if isinstance(doc.get("annotations"), dict) else None
    if version not in [str(v) for v in PUBLISHED_FORMATS]:
        raise InputError(what, f"index format {version!r}, this imagefs reads {' or '.join(map(str, PUBLISHED_FORMATS))}")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise InputError(what, "malformed: no layers list")
    out = []
    for d in layers:
        if not isinstance(d, dict) or d.get("mediaType") != INDEX_MEDIA_TYPE:
            continue
        ann = d.get("annotations") if isinstance(d.get("annotations"), dict) else {}
        try:
            size, meta_size = d["size"], int(ann[ANN_META_SIZE])
            ref = PublishedIndex(check_digest(ann[ANN_LAYER], what), check_digest(d["digest"], what), size,
                                 meta_size, check_digest(ann[ANN_META_DIGEST], what))
        except (KeyError, ValueError, TypeError) as e:
            raise InputError(what, f"malformed index descriptor ({type(e).__name__}: {e})") from None
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < meta_size <= size:
            raise InputError(what, f"malformed index descriptor for layer {ref.layer}: bad sizes")
        out.append(ref)
    profile, error = _profile_in(layers, what)
    return ParsedArtifact(out, profile, error)


def _profile_in(layers: list[Any], what: str) -> tuple[PublishedProfile | None, str | None]:
    """The first profile of our format among an artifact's layers, or why its descriptor is bad."""
    for d in layers:
        if not isinstance(d, dict) or d.get("mediaType") != PROFILE_MEDIA_TYPE:
            continue
        ann = d.get("annotations") if isinstance(d.get("annotations"), dict) else {}
        if ann.get(ANN_PROFILE_FORMAT) != str(PROFILE_FORMAT):
            continue  # a newer format, maybe: an older artifact may still have one we read
        size = d.get("size")
        try:
            digest = check_digest(d.get("digest"), f"{what}: profile")
        except InputError as e:
            return None, e.why
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            return None, f"profile {digest}: bad size {size!r}"
        return PublishedProfile(digest, size), None
    return None, None


def verify_index(data: bytes, ref: PublishedIndex, layer: Layer) -> LayerIndex:
    """Check a fetched index blob against its descriptor and the layer (module docstring)."""
    what = f"published index {ref.digest}"
    if len(data) != ref.size:
        raise InputError(what, f"{len(data)} bytes, descriptor says {ref.size}")
    actual = sha256_digest(data)
    if actual != ref.digest:
        raise DigestMismatch(what, ref.digest, actual)
    verify_meta(data[:ref.meta_size], ref, layer)
    return LayerIndex.from_bytes(data, layer.digest)


def verify_meta(data: bytes, ref: PublishedIndex, layer: Layer) -> LayerIndex:
    """Check the metadata part of a published index (its first `meta_size` bytes) against the
    descriptor's annotations and the layer; the index without its windows. Each window is checked
    later, when fetched, against its sha256 in this metadata."""
    what = f"published index {ref.digest}"
    if len(data) != ref.meta_size or LayerIndex.meta_length(data[:20], layer.digest) != ref.meta_size:
        raise InputError(what, "metadata block does not match its annotations")
    if LayerIndex.format_version(data) not in PUBLISHED_FORMATS:  # a TOC-made index stays where it was made
        raise InputError(what, f"index format {LayerIndex.format_version(data)}, published indexes are "
                               f"{' or '.join(map(str, PUBLISHED_FORMATS))}")
    if sha256_digest(data) != ref.meta_digest:
        raise InputError(what, "metadata block does not match its annotations")
    index = LayerIndex.from_meta(data, layer.digest)
    if (index.compressed_size, index.compression, index.root) != (layer.size, layer.compression, layer.root):
        raise InputError(what, f"describes a {index.compressed_size}-byte {index.compression} layer rooted at "
                               f"{index.root!r}; the image's is {layer.size} bytes, {layer.compression}, {layer.root!r}")
    if index.serialized_size != ref.size:
        raise InputError(what, f"{ref.size} bytes, its metadata says {index.serialized_size}")
    return index


def remote_of(ref: PublishedIndex) -> dict[str, Any]:
    """What the store keeps beside an index's metadata part (Store.put_index_meta)."""
    return {"digest": ref.digest, "size": ref.size, "meta_size": ref.meta_size, "meta_digest": ref.meta_digest,
            "layer": ref.layer}


def ref_of(remote: dict[str, Any], layer_digest: str) -> PublishedIndex:
    try:
        return PublishedIndex(layer_digest, check_digest(remote["digest"], "index descriptor"), int(remote["size"]),
                              int(remote["meta_size"]), check_digest(remote["meta_digest"], "index descriptor"))
    except (KeyError, TypeError, ValueError):
        raise InputError(f"layer {layer_digest}", "index descriptor in the store is damaged (pull again)") from None


def fetch_full_index(store: Store, source: Source, layer: Layer) -> bytes:
    """Make the layer's index whole in *store*: fetch the published blob its metadata part came
    from, check it, keep it. (Publishing and offline use need every window.)"""
    if store.has_full_index(layer.digest):
        return store.read_index(layer.digest)
    _, remote = store.read_index_meta(layer.digest)
    ref = ref_of(remote, layer.digest)
    data = b"".join(source.open_blob(ref.digest, ref.size))
    verify_index(data, ref, layer)
    store.put_index(layer.digest, data)
    return data


def verify_profile(data: bytes, ref: PublishedProfile) -> list[str]:
    """The paths of a fetched profile blob, once it matches its descriptor and parses."""
    what = f"published profile {ref.digest}"
    if len(data) != ref.size:
        raise InputError(what, f"{len(data)} bytes, descriptor says {ref.size}")
    actual = sha256_digest(data)
    if actual != ref.digest:
        raise DigestMismatch(what, ref.digest, actual)
    return parse_profile(data, what)


# -- the registry side


class PublishedIndexes:
    """The indexes (and access profile) published for one image in its registry; looked up on
    first need, once. With *want_profile* the newest good profile is fetched in the background as
    soon as the lookup has found one; `profile()` waits for it, `close()` must be called."""

    def __init__(self, source: RegistrySource, manifest_digest: str, *, want_profile: bool = False) -> None:
        self._source = source
        self._manifest_digest = manifest_digest
        self._want_profile = want_profile
        self._by_layer: dict[str, list[tuple[str, PublishedIndex]]] | None = None
        self._profiles: list[tuple[str, PublishedProfile]] = []  # newest artifact first
        self._pool: ThreadPoolExecutor | None = None
        self._profile: Future[list[str] | None] | None = None
        self.used: set[str] = set()  # layers whose index came from here
        self._tried: set[str] = set()  # layers meta_for was asked about

    def _lookup(self) -> dict[str, list[tuple[str, PublishedIndex]]]:
        from stores.referrers import find_referrers

        by_layer: dict[str, list[tuple[str, PublishedIndex]]] = {}
        image = self._manifest_digest
        try:
            referrers, how = find_referrers(self._source, image, ARTIFACT_TYPE)
        except ImagefsError as e:
            log.warning("image %s: cannot look for published indexes (%s); building them from the layers",
                        image, e)
            return by_layer
        log.info("image %s: %d published index artifact(s) (%s)", image, len(referrers), how)
        newest_first = list(reversed(referrers[-MAX_ARTIFACTS:]))  # appended last: newest
        with ThreadPoolExecutor(max(1, min(len(newest_first), 4)), thread_name_prefix="imagefs-artifact") as pool:
            # All at once (a republished profile makes two or more): one round trip, not one each.
            manifests = [pool.submit(self._source.manifest, r.digest) for r in newest_first]
        for referrer, future in zip(newest_first, manifests):
            try:
                parsed = parse_artifact(future.result().data, image, f"index artifact {referrer.digest}")
            except ImagefsError as e:
                log.warning("image %s: ignoring published index artifact %s: %s", image, referrer.digest, e)
                continue
            for ref in parsed.indexes:
                by_layer.setdefault(ref.layer, []).append((referrer.digest, ref))
            if parsed.profile_error is not None:
                log.warning("image %s: published profile of artifact %s ignored: %s",
                            image, referrer.digest, parsed.profile_error)
            elif parsed.profile is not None:
                self._profiles.append((referrer.digest, parsed.profile))
        return by_layer

    def lookup(self) -> None:
        """Look the artifacts up now (else on first need): before threads share this object."""
        self._looked_up()

    def _looked_up(self) -> dict[str, list[tuple[str, PublishedIndex]]]:
        if self._by_layer is None:
            self._by_layer = self._lookup()
            if self._want_profile and self._profiles:  # only then: no profile, no extra request
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imagefs-profile")
                self._profile = self._pool.submit(self._fetch_profile)
        return self._by_layer

    def _fetch_profile(self) -> list[str] | None:
        """The paths of the newest published profile that verifies; each bad one is a warning."""
        tried: set[str] = set()
        for artifact, ref in self._profiles:
            if ref.digest in tried:
                continue
            tried.add(ref.digest)
            try:
                paths = self._fetch_one_profile(ref)
            except ImagefsError as e:
                log.warning("image %s: published profile %s (artifact %s) ignored: %s",
                            self._manifest_digest, ref.digest, artifact, e.why)
                continue
            log.info("image %s: access profile of %d path(s) from published artifact %s",
                     self._manifest_digest, len(paths), artifact)
            return paths
        return None

    def _fetch_one_profile(self, ref: PublishedProfile) -> list[str]:
        if ref.size > MAX_PROFILE_BYTES:  # refused before a byte of it is fetched
            raise InputError(f"published profile {ref.digest}",
                             f"{ref.size} bytes, more than the {MAX_PROFILE_BYTES} a profile may have")
        return verify_profile(b"".join(self._source.open_blob(ref.digest, ref.size)), ref)

    def profile(self) -> list[str] | None:
        """The published profile's paths, if a lookup happened and found a good one (waits for it)."""
        return self._profile.result() if self._profile is not None else None

    @property
    def profile_listed(self) -> bool:
        """Whether a looked-up artifact lists a well-formed profile descriptor (its blob is not
        fetched when the store has a profile already: whatever it holds, it is someone's)."""
        return bool(self._profiles)

    def close(self) -> None:
        """Wait for the profile fetch, if one runs: the source it reads from is closed next."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def meta_for(self, layer: Layer) -> tuple[bytes, PublishedIndex] | None:
        """The verified metadata part of a published index for *layer* (range-read: the windows
        stay in the registry until a read needs one), with the descriptor of its blob; or None."""
        if layer.digest in self._tried:
            return None  # one verdict per layer and pull (its warnings said once)
        self._tried.add(layer.digest)
        candidates = self._looked_up().get(layer.digest, [])
        for n, (artifact, ref) in enumerate(candidates, 1):
            then = "trying the next" if n < len(candidates) else "building it from the layer"
            if ref.size > layer.size + MAX_INDEX_SLACK:
                log.warning("layer %s: published index %s rejected: %d bytes for a %d-byte layer; %s",
                            layer.digest, ref.digest, ref.size, layer.size, then)
                continue
            try:
                data = self._source.read_range(ref.digest, 0, ref.meta_size)
                verify_meta(data, ref, layer)
            except ImagefsError as e:
                log.warning("layer %s: published index %s (artifact %s) rejected: %s; %s",
                            layer.digest, ref.digest, artifact, e, then)
                continue
            log.info("layer %s: index metadata from published artifact %s (%d of %d bytes)", layer.digest,
                     artifact, len(data), ref.size)
            self.used.add(layer.digest)
            return data, ref
        return None

    def covered(self, image: Image) -> bool:
        """Whether every layer's index came from published artifacts in this pull."""
        return all(layer.digest in self.used for layer in image.layers)


@dataclass(frozen=True)
class Publication:
    """What `publish` did: the artifact, its blobs, and how it is discoverable."""

    artifact: str
    artifact_size: int
    indexes: list[PublishedIndex]
    how: str
    profile: PublishedProfile | None = None
    profile_paths: int = 0

    @property
    def index_bytes(self) -> int:
        return sum(r.size for r in self.indexes)

    @property
    def total_bytes(self) -> int:
        """The artifact manifest and every blob it lists, the empty config aside."""
        return self.artifact_size + self.index_bytes + (self.profile.size if self.profile else 0)


@dataclass(frozen=True)
class ArtifactContent:
    """An artifact manifest ready to push, with the blobs it lists."""

    manifest: bytes = field(repr=False)
    indexes: list[IndexBlob]
    profile: ProfileBlob | None

    def blobs(self) -> dict[str, bytes]:
        """digest -> bytes of every blob the manifest names."""
        out = {EMPTY_DIGEST: EMPTY_JSON, **{b.ref.digest: b.data for b in self.indexes}}
        if self.profile is not None:
            out[self.profile.ref.digest] = self.profile.data
        return out


def artifact_for(store: Store, image: Image, source: Source | None = None) -> ArtifactContent:
    """The artifact for *image*, from the indexes (and the access profile, if any) in *store*;
    indexes held only as metadata are first made whole from *source*."""
    blobs, seen = [], set()
    for layer in image.layers:
        if layer.digest in seen:
            continue
        seen.add(layer.digest)
        if not store.has_full_index(layer.digest) and store.has_toc(layer.digest):
            raise NotFound(f"layer {layer.digest}", "is read through its eStargz TOC and has no index of "
                                                    "its own (`imagefs index --push` builds one)")
        try:
            if source is not None and not store.has_full_index(layer.digest) and store.has_index(layer.digest):
                data = fetch_full_index(store, source, layer)
            else:
                data = store.read_index(layer.digest)
        except NotFound:
            raise NotFound(f"layer {layer.digest}", "no index in the store to publish (pull the image first)") from None
        LayerIndex.from_bytes(data, layer.digest)  # publish nothing we would refuse to load
        blobs.append(index_blob(layer.digest, data))
    profile = stored_profile(store, image)
    return ArtifactContent(build_artifact(subject_of(image), blobs, profile), blobs, profile)


def stored_profile(store: Store, image: Image) -> ProfileBlob | None:
    """The store's access profile of *image* as a blob to publish; None without a usable one (a
    damaged profile is not worth failing a publication for: the indexes are what matters)."""
    try:
        paths = store.read_profile(image.id)
    except ImagefsError as e:
        log.warning("%s: not published: %s", e.what, e.why)
        return None
    return profile_blob(paths) if paths else None


def publish(store: Store, source: RegistrySource, image: Image) -> Publication:
    """Push *image*'s layer indexes and access profile from *store* as an artifact referring to it,
    through *source* (a RegistrySource for the image's repository). Pushing what is already
    published changes nothing: the artifact is deterministic."""
    from stores.referrers import push_referrer

    content = artifact_for(store, image, source)
    how = push_referrer(source, content.manifest, content.blobs(), image.manifest_digest, ARTIFACT_TYPE,
                        {ANN_FORMAT: str(artifact_format(content.indexes))})
    digest = sha256_digest(content.manifest)
    profile = content.profile
    log.info("image %s: published %d layer index(es)%s as %s (%s)", image.manifest_digest, len(content.indexes),
             f" and a profile of {profile.paths} path(s)" if profile else "", digest, how)
    return Publication(digest, len(content.manifest), [b.ref for b in content.indexes], how,
                       profile.ref if profile else None, profile.paths if profile else 0)
