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

The metadata size and digest let a reader range-fetch just the metadata block and trust it before
any window; the windows are covered by their own sha256s inside the metadata. The JSON is
canonical (sorted keys, no spaces) and indexes are deterministic, so the same image published twice,
from any machine, is the same artifact.

Verification of a published index, all before it is stored (anything less: a warning, and the
layer is streamed as if nothing had been published): the blob's sha256 and size are its
descriptor's; the metadata size and digest are its annotations'; `LayerIndex.from_bytes` with the
layer's digest (the binding: the index must name that layer) checks the whole index, every window
included; and the index's compressed size, compression and root prefix are the layer's.

Concurrency: synchronous; `PublishedIndexes` is used by one pull at a time (no locking).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from imagefs.errors import DigestMismatch, ImagefsError, InputError, NotFound
from imagefs.index import FORMAT_VERSION, LayerIndex
from stores.digest import check_digest, sha256_digest
from stores.manifest import load_json, media_type_of
from stores.model import OCI_MANIFEST, Descriptor, Image, Layer
from stores.source import ManifestBytes
from stores.store import Store

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


def build_artifact(subject: Descriptor, blobs: list[IndexBlob]) -> bytes:
    """The artifact manifest for *blobs* (one per layer) referring to *subject*."""
    layers = [{"mediaType": INDEX_MEDIA_TYPE, "digest": b.ref.digest, "size": b.ref.size,
               "annotations": {ANN_LAYER: b.ref.layer, ANN_META_SIZE: str(b.ref.meta_size),
                               ANN_META_DIGEST: b.ref.meta_digest}} for b in blobs]
    return _canonical({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_MEDIA_TYPE, "digest": EMPTY_DIGEST, "size": len(EMPTY_JSON)},
        "layers": layers,
        "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size},
        "annotations": {ANN_FORMAT: str(FORMAT_VERSION)},
    })


def parse_artifact(data: bytes, subject: str, what: str) -> list[PublishedIndex]:
    """The layer indexes an artifact manifest lists, after checking it is an imagefs index artifact
    for *subject* in a format this imagefs reads. Layers of other media types are ignored."""
    doc = load_json(data, what)
    if doc.get("mediaType") != OCI_MANIFEST or doc.get("artifactType") != ARTIFACT_TYPE:
        raise InputError(what, f"not an imagefs index artifact ({doc.get('mediaType')!r}, {doc.get('artifactType')!r})")
    named = (doc.get("subject") or {}).get("digest") if isinstance(doc.get("subject"), dict) else None
    if named != subject:
        raise InputError(what, f"refers to {named}, not to image {subject}")
    version = (doc.get("annotations") or {}).get(ANN_FORMAT) if isinstance(doc.get("annotations"), dict) else None
    if version != str(FORMAT_VERSION):
        raise InputError(what, f"index format {version!r}, this imagefs reads {FORMAT_VERSION}")
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
    return out


def verify_index(data: bytes, ref: PublishedIndex, layer: Layer) -> LayerIndex:
    """Check a fetched index blob against its descriptor and the layer (module docstring)."""
    what = f"published index {ref.digest}"
    if len(data) != ref.size:
        raise InputError(what, f"{len(data)} bytes, descriptor says {ref.size}")
    actual = sha256_digest(data)
    if actual != ref.digest:
        raise DigestMismatch(what, ref.digest, actual)
    meta_size = LayerIndex.meta_length(data[:20], layer.digest)
    if meta_size != ref.meta_size or sha256_digest(data[:meta_size]) != ref.meta_digest:
        raise InputError(what, "metadata block does not match its annotations")
    index = LayerIndex.from_bytes(data, layer.digest)
    if (index.compressed_size, index.compression, index.root) != (layer.size, layer.compression, layer.root):
        raise InputError(what, f"describes a {index.compressed_size}-byte {index.compression} layer rooted at "
                               f"{index.root!r}; the image's is {layer.size} bytes, {layer.compression}, {layer.root!r}")
    return index


# -- the registry side


class PublishedIndexes:
    """The indexes published for one image in its registry; looked up on first need, once."""

    def __init__(self, source: RegistrySource, image: Image) -> None:
        self._source = source
        self._image = image
        self._by_layer: dict[str, list[tuple[str, PublishedIndex]]] | None = None
        self.used: set[str] = set()  # layers whose index came from here

    def _lookup(self) -> dict[str, list[tuple[str, PublishedIndex]]]:
        from stores.referrers import find_referrers

        by_layer: dict[str, list[tuple[str, PublishedIndex]]] = {}
        image = self._image.manifest_digest
        try:
            referrers, how = find_referrers(self._source, image, ARTIFACT_TYPE)
        except ImagefsError as e:
            log.warning("image %s: cannot look for published indexes (%s); building them from the layers",
                        image, e)
            return by_layer
        log.info("image %s: %d published index artifact(s) (%s)", image, len(referrers), how)
        for referrer in reversed(referrers[-MAX_ARTIFACTS:]):  # the newest (appended last) first
            try:
                m = self._source.manifest(referrer.digest)
                refs = parse_artifact(m.data, image, f"index artifact {referrer.digest}")
            except ImagefsError as e:
                log.warning("image %s: ignoring published index artifact %s: %s", image, referrer.digest, e)
                continue
            for ref in refs:
                by_layer.setdefault(ref.layer, []).append((referrer.digest, ref))
        return by_layer

    def index_for(self, layer: Layer) -> bytes | None:
        """A verified serialised index for *layer* from a published artifact, or None."""
        if self._by_layer is None:
            self._by_layer = self._lookup()
        candidates = self._by_layer.get(layer.digest, [])
        for n, (artifact, ref) in enumerate(candidates, 1):
            then = "trying the next" if n < len(candidates) else "building it from the layer"
            if ref.size > layer.size + MAX_INDEX_SLACK:
                log.warning("layer %s: published index %s rejected: %d bytes for a %d-byte layer; %s",
                            layer.digest, ref.digest, ref.size, layer.size, then)
                continue
            try:
                data = b"".join(self._source.open_blob(ref.digest, ref.size))
                verify_index(data, ref, layer)
            except ImagefsError as e:
                log.warning("layer %s: published index %s (artifact %s) rejected: %s; %s",
                            layer.digest, ref.digest, artifact, e, then)
                continue
            log.info("layer %s: index from published artifact %s (%d bytes)", layer.digest, artifact, len(data))
            self.used.add(layer.digest)
            return data
        return None

    def covered(self, image: Image) -> bool:
        """Whether every layer's index came from published artifacts in this pull."""
        return all(layer.digest in self.used for layer in image.layers)


@dataclass(frozen=True)
class Publication:
    """What `publish` did: the artifact, its index blobs, and how it is discoverable."""

    artifact: str
    artifact_size: int
    indexes: list[PublishedIndex]
    how: str

    @property
    def index_bytes(self) -> int:
        return sum(r.size for r in self.indexes)


def artifact_for(store: Store, image: Image) -> tuple[bytes, list[IndexBlob]]:
    """The artifact manifest and index blobs for *image*, from the indexes in *store*."""
    blobs, seen = [], set()
    for layer in image.layers:
        if layer.digest in seen:
            continue
        seen.add(layer.digest)
        try:
            data = store.read_index(layer.digest)
        except NotFound:
            raise NotFound(f"layer {layer.digest}", "no index in the store to publish (pull the image first)") from None
        LayerIndex.from_bytes(data, layer.digest)  # publish nothing we would refuse to load
        blobs.append(index_blob(layer.digest, data))
    return build_artifact(subject_of(image), blobs), blobs


def publish(store: Store, source: RegistrySource, image: Image) -> Publication:
    """Push *image*'s layer indexes from *store* as an artifact referring to it, through *source*
    (a RegistrySource for the image's repository)."""
    from stores.referrers import push_referrer

    manifest, blobs = artifact_for(store, image)
    payload = {EMPTY_DIGEST: EMPTY_JSON, **{b.ref.digest: b.data for b in blobs}}
    how = push_referrer(source, manifest, payload, image.manifest_digest, ARTIFACT_TYPE,
                        {ANN_FORMAT: str(FORMAT_VERSION)})
    digest = sha256_digest(manifest)
    log.info("image %s: published %d layer index(es) as %s (%s)", image.manifest_digest, len(blobs), digest, how)
    return Publication(digest, len(manifest), [b.ref for b in blobs], how)
