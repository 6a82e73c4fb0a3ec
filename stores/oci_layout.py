"""An OCI image layout directory (`oci:PATH[:TAG]`) as a source.

    PATH/oci-layout          {"imageLayoutVersion": "1.0.0"}
    PATH/index.json          an image index; entries tagged by org.opencontainers.image.ref.name
    PATH/blobs/sha256/HEX    every manifest, index, config and layer, named by digest

The layout is validated when the source is made (so `open_source` fails on a bad one), and the
tagged entry becomes the root manifest: an image manifest, or a nested index that `resolve()`
narrows to one platform through `manifest(digest)`. Blobs are served from their files in place.

Concurrency: the parsed index is immutable after __init__; reads go through `LocalSource`, which
opens a descriptor per call, so any number of threads may read.
"""

from __future__ import annotations

import os
from typing import Any

from imagefs.errors import InputError, NotFound
from stores.digest import check_digest, hex_of
from stores.manifest import load_json
from stores.model import OCI_INDEX
from stores.reference import OciReference
from stores.source import ManifestBytes
from stores.sources import Blob, FileRegion, LocalSource, canonical_json

REF_NAME = "org.opencontainers.image.ref.name"
SUPPORTED_LAYOUT_MAJOR = "1"


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise NotFound(what, f"no such file {path}") from None
    except OSError as e:
        raise InputError(what, f"cannot read {path}: {e.strerror}") from None


class OciLayoutSource(LocalSource):
    """The image (or index) that *ref*'s tag names in an OCI layout directory."""

    def __init__(self, ref: OciReference) -> None:
        self.reference = ref
        self.path = ref.path
        what = str(ref)
        if not os.path.isdir(self.path):
            raise NotFound(what, f"no OCI layout directory at {self.path}")
        self._check_layout_file(what)
        index = load_json(_read(os.path.join(self.path, "index.json"), what), f"{what}: index.json")
        entries = index.get("manifests")
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise InputError(f"{what}: index.json", "malformed index: no manifests list")
        self._root = self._select(entries, what)

    def _check_layout_file(self, what: str) -> None:
        layout_path = os.path.join(self.path, "oci-layout")
        if not os.path.exists(layout_path):
            raise InputError(what, f"not an OCI image layout (no oci-layout file in {self.path})")
        doc = load_json(_read(layout_path, what), f"{what}: oci-layout")
        version = doc.get("imageLayoutVersion")
        if not isinstance(version, str):
            raise InputError(f"{what}: oci-layout", "no imageLayoutVersion")
        if version.split(".")[0] != SUPPORTED_LAYOUT_MAJOR:
            raise InputError(f"{what}: oci-layout", f"unsupported imageLayoutVersion {version!r} (want 1.x)")

    def _select(self, entries: list[dict[str, Any]], what: str) -> ManifestBytes:
        """The root manifest for the reference's tag (or the layout's only entry)."""
        tag = self.reference.tag
        if tag is None:
            if len(entries) != 1:
                raise InputError(what, f"layout has {len(entries)} images; name one with oci:PATH:TAG "
                                       f"(tags: {_tag_list(entries)})")
            chosen = entries
        else:
            chosen = [e for e in entries if _ref_name(e) == tag]
            if not chosen:
                raise NotFound(what, f"no image tagged {tag!r} in the layout (tags: {_tag_list(entries)})")
        if len(chosen) == 1:
            media_type, digest = _entry_digest(chosen[0], what)
            data = self.read_all(digest)
            return ManifestBytes(data, media_type, digest)
        # Several entries share the tag (one per platform, as some tools write them): treat them as
        # the index they stand for, so resolve() picks the platform. Synthesised, hence no digest.
        if not all(isinstance(e.get("platform"), dict) for e in chosen):
            raise InputError(what, f"tag {tag!r} names {len(chosen)} entries, not all with a platform")
        for e in chosen:
            _entry_digest(e, what)
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX,
               "manifests": [{k: v for k, v in e.items() if k != "annotations"} for e in chosen]}
        return ManifestBytes(canonical_json(doc), OCI_INDEX)

    def root_manifest(self) -> ManifestBytes:
        return self._root

    def locate(self, digest: str) -> Blob:
        path = os.path.join(self.path, "blobs", "sha256", hex_of(check_digest(digest, self._what(digest))))
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise NotFound(self._what(digest), f"not in the layout (no file {path})") from None
        return FileRegion(path, 0, size)


def _ref_name(entry: dict[str, Any]) -> str | None:
    annotations = entry.get("annotations")
    if isinstance(annotations, dict) and isinstance(annotations.get(REF_NAME), str):
        return annotations[REF_NAME]
    return None


def _entry_digest(entry: dict[str, Any], what: str) -> tuple[str, str]:
    media_type, digest = entry.get("mediaType"), entry.get("digest")
    if not isinstance(media_type, str):
        raise InputError(f"{what}: index.json", "malformed descriptor: no mediaType")
    return media_type, check_digest(digest, f"{what}: index.json")


def _tag_list(entries: list[dict[str, Any]]) -> str:
    names = [_ref_name(e) or f"untagged {e.get('digest')}" for e in entries]
    return ", ".join(names) or "none"
