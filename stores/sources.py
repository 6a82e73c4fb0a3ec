"""Open the `Source` for a reference, and the blob plumbing the local-file sources share.

`open_source` dispatches on the reference type. The registry source is imported lazily: it pulls
in the HTTP stack, which an `oci:` or `docker-archive:` pull never needs.

`LocalSource` is the common base of the OCI layout, docker archive and Appc sources: each of them
knows where a blob lives (a whole file, a region of a tar file, or bytes it synthesised) and this
class serves it. Nothing is extracted or copied: blobs are read in place with `os.pread`.
`SynthesisedSource` adds what the two non-OCI formats share: an OCI manifest and config made up
from their native metadata, served beside the layers they locate.

Concurrency: `read_range` and `open_blob` may run in many threads at once. Every call opens its
own descriptor and reads with `os.pread` (no shared file position), so there is no shared state to
lock and no descriptor whose lifetime `close()` could cut short under a reader. The open costs a
few microseconds beside the 128 KiB a FUSE read asks for.
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagefs.errors import InputError, NotFound
from stores.digest import sha256_digest
from stores.model import OCI_CONFIG, OCI_MANIFEST
from stores.reference import (
    AppcReference,
    DockerArchiveReference,
    DockerReference,
    OciReference,
    Reference,
)
from stores.source import ManifestBytes, Source

CHUNK = 1 << 20  # open_blob yields pieces of this size: bounded memory for any blob size
GZIP_MAGIC = b"\x1f\x8b"


def canonical_json(doc: Any) -> bytes:
    """Deterministic JSON bytes: a document synthesised twice from the same input has one digest."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class FileRegion:
    """Bytes [offset, offset + size) of a local file: a blob that is a file, or a tar member."""

    path: str
    offset: int
    size: int


Blob = bytes | FileRegion


def pread_exact(path: str, offset: int, length: int, what: str) -> bytes:
    """*length* bytes of *path* at *offset*, or InputError naming *what* if the file is short."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts, got = [], 0
        while got < length:
            piece = os.pread(fd, length - got, offset + got)
            if not piece:
                raise InputError(what, f"file {path} ends at {offset + got}, expected {length - got} more bytes (truncated?)")
            parts.append(piece)
            got += len(piece)
        return b"".join(parts)
    finally:
        os.close(fd)


class LocalSource(Source):
    """A source whose blobs are local files, tar members or bytes it synthesised.

    Subclasses implement `root_manifest` and `locate`; `manifest`, `open_blob` and `read_range`
    follow from `locate`. Thread-safe as described in the module docstring.
    """

    @abc.abstractmethod
    def locate(self, digest: str) -> Blob:
        """Where blob *digest* is; raise NotFound naming it when the source has no such blob."""

    def _what(self, digest: str) -> str:
        return f"{self.reference}: blob {digest}"

    def manifest(self, digest: str) -> ManifestBytes:
        # Media type left empty: the document's own mediaType field (or the index descriptor
        # that led here) decides, as Source.manifest allows.
        return ManifestBytes(self.read_all(digest), "", digest)

    def read_all(self, digest: str) -> bytes:
        blob = self.locate(digest)
        if isinstance(blob, bytes):
            return blob
        return pread_exact(blob.path, blob.offset, blob.size, self._what(digest))

    def open_blob(self, digest: str, size: int, offset: int = 0) -> Iterator[bytes]:
        blob = self.locate(digest)  # before the generator starts, so a missing blob fails here
        total = len(blob) if isinstance(blob, bytes) else blob.size
        self._check_range(digest, offset, 0, total)
        return self._stream(digest, blob, offset, total)

    def _stream(self, digest: str, blob: Blob, offset: int, total: int) -> Iterator[bytes]:
        if isinstance(blob, bytes):
            for start in range(offset, total, CHUNK):
                yield blob[start:start + CHUNK]
            return
        for start in range(offset, total, CHUNK):
            yield pread_exact(blob.path, blob.offset + start, min(CHUNK, total - start), self._what(digest))

    def read_range(self, digest: str, start: int, length: int) -> bytes:
        blob = self.locate(digest)
        total = len(blob) if isinstance(blob, bytes) else blob.size
        self._check_range(digest, start, length, total)
        if isinstance(blob, bytes):
            return blob[start:start + length]
        return pread_exact(blob.path, blob.offset + start, length, self._what(digest))

    def _check_range(self, digest: str, start: int, length: int, total: int) -> None:
        if start < 0 or length < 0 or start + length > total:
            raise InputError(self._what(digest), f"range {start}+{length} is outside the blob ({total} bytes)")


class SynthesisedSource(LocalSource):
    """A local source for a format with no OCI manifest of its own (docker archive, Appc).

    The subclass's __init__ calls `_publish` once with the config bytes it made or found and each
    layer's descriptor and location; the manifest is synthesised from them (canonical JSON, so
    the same input always gives the same image digest). Immutable afterwards.
    """

    _manifest: bytes
    _manifest_digest: str
    _blobs: dict[str, Blob]

    def _publish(self, config: bytes, layers: list[tuple[dict[str, Any], FileRegion]]) -> None:
        config_digest = sha256_digest(config)
        self._manifest = canonical_json({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [desc for desc, _ in layers],
        })
        self._manifest_digest = sha256_digest(self._manifest)
        self._blobs = {desc["digest"]: region for desc, region in layers}
        self._blobs[config_digest] = config  # configs are small: kept in memory
        self._blobs[self._manifest_digest] = self._manifest

    def root_manifest(self) -> ManifestBytes:
        return ManifestBytes(self._manifest, OCI_MANIFEST, self._manifest_digest)

    def locate(self, digest: str) -> Blob:
        try:
            return self._blobs[digest]
        except KeyError:
            raise NotFound(self._what(digest), "not part of this image") from None


def open_source(ref: Reference, *, appc_discovery: str | None = None, cache_dir: str | Path | None = None,
                **registry_opts: Any) -> Source:
    """The source that serves *ref*. Local sources validate their input here, so a bad layout or
    archive fails at open with an error naming it. *cache_dir* holds what a source must keep on
    disk (downloaded ACIs, a decompressed docker archive); a private temp dir when None."""
    # Imported on use: the registry source pulls in the HTTP stack, which a local pull never
    # needs, and the local sources import LocalSource from this module.
    if isinstance(ref, DockerReference):
        from stores.registry import RegistrySource
        return RegistrySource(ref, **registry_opts)
    if isinstance(ref, OciReference):
        from stores.oci_layout import OciLayoutSource
        return OciLayoutSource(ref)
    if isinstance(ref, DockerArchiveReference):
        from stores.docker_archive import DockerArchiveSource
        return DockerArchiveSource(ref, cache_dir=cache_dir)
    if isinstance(ref, AppcReference):
        if not appc_discovery:
            raise InputError(f"appc:{ref.name}", "no --appc-discovery prefix given")
        from stores.appc import AppcSource
        return AppcSource(ref, appc_discovery, cache_dir=cache_dir)
    raise InputError(repr(ref), "not an image reference")
