"""Parse manifests, indexes and configs (OCI and Docker schema2) into the image model.

Pure functions over bytes: `resolve` is the only one that asks a source for more (the child
manifest of an index and the config blob), and it verifies each against its digest.
"""

from __future__ import annotations

import json
import logging
import platform as _platform
from collections.abc import Callable
from typing import Any

from imagefs.errors import InputError, NotFound
from stores.digest import check_digest, sha256_digest, verify_bytes
from stores.model import (
    DOCKER_SCHEMA1,
    DOCKER_SCHEMA1_SIGNED,
    INDEX_TYPES,
    LAYER_COMPRESSION,
    MANIFEST_TYPES,
    APPC_ACI_GZIP,
    APPC_ACI_TAR,
    APPC_ROOT,
    ESTARGZ_TOC_ANNOTATION,
    Descriptor,
    Image,
    ImageConfig,
    Layer,
    Platform,
)
from stores.source import ManifestBytes, Source

log = logging.getLogger(__name__)

_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "ppc64le": "ppc64le", "s390x": "s390x"}


def host_platform() -> Platform:
    machine = _platform.machine()
    arch = _ARCH.get(machine, machine)
    return Platform("linux", arch, "v7" if machine == "armv7l" else "")


def parse_platform(text: str) -> Platform:
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise InputError(text, "bad platform (want OS/ARCH[/VARIANT])")
    return Platform(*parts)


def load_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(what, f"malformed JSON: {e}") from None
    if not isinstance(value, dict):
        raise InputError(what, "malformed JSON: not an object")
    return value


def media_type_of(m: ManifestBytes, doc: dict[str, Any], what: str) -> str:
    declared = doc.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise InputError(what, "malformed manifest: mediaType is not a string")
    # The served Content-Type may be generic ("application/json"); the document's own field wins.
    media_type = declared or m.media_type
    if not declared and doc.get("schemaVersion") == 1:
        media_type = DOCKER_SCHEMA1
    if not declared and "manifests" in doc:
        media_type = INDEX_TYPES[0]
    if not declared and "layers" in doc and "config" in doc:
        media_type = MANIFEST_TYPES[0]
    return media_type


def _descriptor(d: Any, what: str) -> Descriptor:
    if not isinstance(d, dict):
        raise InputError(what, "malformed descriptor")
    try:
        media_type, digest, size = d["mediaType"], d["digest"], d["size"]
    except KeyError as e:
        raise InputError(what, f"descriptor lacks {e.args[0]}") from None
    if not isinstance(media_type, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InputError(what, "malformed descriptor")
    check_digest(digest, what)
    plat = d.get("platform")
    platform = None
    if isinstance(plat, dict) and isinstance(plat.get("os"), str) and isinstance(plat.get("architecture"), str):
        platform = Platform(plat["os"], plat["architecture"], str(plat.get("variant") or ""))
    annotations = d.get("annotations") if isinstance(d.get("annotations"), dict) else {}
    return Descriptor(media_type, digest, size, platform, annotations)


def choose_platform(doc: dict[str, Any], want: Platform, what: str) -> Descriptor:
    """Pick the manifest for *want* from an index; variant matches if given, else first of arch."""
    manifests = doc.get("manifests")
    if not isinstance(manifests, list):
        raise InputError(what, "malformed index: no manifests list")
    descriptors = [_descriptor(d, what) for d in manifests]
    candidates = [d for d in descriptors if d.media_type in MANIFEST_TYPES and d.platform
                  and d.platform.os == want.os and d.platform.architecture == want.architecture]
    if want.variant:
        exact = [d for d in candidates if d.platform and d.platform.variant == want.variant]
        candidates = exact or candidates
    if not candidates:
        offered = ", ".join(sorted({str(d.platform) for d in descriptors if d.platform})) or "none"
        raise NotFound(what, f"no manifest for platform {want} (index offers: {offered})")
    return candidates[0]


def parse_config(data: bytes, what: str) -> ImageConfig:
    doc = load_json(data, what)
    cfg = doc.get("config") or {}
    if not isinstance(cfg, dict):
        raise InputError(what, "malformed config: 'config' is not an object")

    def strings(key: str) -> tuple[str, ...]:
        value = cfg.get(key) or ()
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise InputError(what, f"malformed config: {key} is not a list of strings")
        return tuple(value)

    labels = cfg.get("Labels") or {}
    return ImageConfig(
        entrypoint=strings("Entrypoint"),
        cmd=strings("Cmd"),
        env=strings("Env"),
        workdir=str(cfg.get("WorkingDir") or ""),
        user=str(cfg.get("User") or ""),
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
        os=str(doc.get("os") or ""),
        architecture=str(doc.get("architecture") or ""),
    )


def parse_layers(doc: dict[str, Any], what: str) -> tuple[Layer, ...]:
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise InputError(what, "malformed manifest: no layers list")
    out = []
    for raw in layers:
        d = _descriptor(raw, what)
        compression = LAYER_COMPRESSION.get(d.media_type)
        if compression is None:
            raise InputError(what, f"unknown layer media type {d.media_type!r} (layer {d.digest})")
        root = APPC_ROOT if d.media_type in (APPC_ACI_TAR, APPC_ACI_GZIP) else ""
        out.append(Layer(d.digest, d.media_type, d.size, compression, root, _toc_digest(d, compression, what)))
    return tuple(out)


def _toc_digest(d: Descriptor, compression: str, what: str) -> str:
    """The eStargz TOC digest the descriptor's annotation names, or "" (not eStargz, or an
    annotation that is no digest: then the layer is read as a plain gzip layer, which it also is)."""
    value = d.annotations.get(ESTARGZ_TOC_ANNOTATION, "")
    if not value or compression != "gzip":
        return ""
    try:
        return check_digest(value, "eStargz TOC digest")
    except InputError:
        log.warning("%s: layer %s: ignoring its eStargz TOC annotation %r (not a sha256 digest)",
                    what, d.digest, value[:80])
        return ""


def resolve(source: Source, want: Platform | None = None, *, max_depth: int = 2,
            on_manifest: Callable[[str, tuple[Layer, ...]], None] | None = None) -> Image:
    """Follow the source's reference to one image manifest, verifying every document fetched.
    *on_manifest* is told the image manifest's digest and its layers as soon as the manifest is
    verified, before the config is fetched: work on them can start a round trip earlier."""
    want = want or host_platform()
    what = str(source.reference)
    m = source.root_manifest()
    for _ in range(max_depth + 1):
        digest = m.digest or sha256_digest(m.data)
        verify_bytes(m.data, digest, f"{what}: manifest {digest}")
        doc = load_json(m.data, f"{what}: manifest")
        media_type = media_type_of(m, doc, what)
        if media_type in (DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED):
            raise InputError(what, "Docker schema1 manifests are not supported (re-push the image with schema2 or OCI)")
        if media_type in INDEX_TYPES:
            child = choose_platform(doc, want, what)
            m = source.manifest(child.digest)
            m = ManifestBytes(m.data, m.media_type or child.media_type, child.digest)
            continue
        if media_type not in MANIFEST_TYPES:
            raise InputError(what, f"unknown manifest media type {media_type!r}")
        config_desc = _descriptor(doc.get("config"), f"{what}: config")
        layers = parse_layers(doc, what)
        if on_manifest is not None:
            on_manifest(digest, layers)
        config = b"".join(source.open_blob(config_desc.digest, config_desc.size))
        verify_bytes(config, config_desc.digest, f"{what}: config {config_desc.digest}")
        return Image(digest, m.data, config_desc.digest, config, layers, parse_config(config, f"{what}: config"))
    raise InputError(what, "index nests too deeply")
