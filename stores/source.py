"""The one interface every image source implements (registry, OCI layout, docker archive, Appc).

A source hands out *bytes as published*: manifests and blobs exactly as stored, so the store can
verify every one against its digest. Sources whose native format is not OCI (docker archives, Appc)
synthesise an OCI manifest and config and serve those synthetic blobs like any other.

Concurrency: sources are synchronous. `read_range` may be called from several worker threads at
once (the FUSE server's read path), so implementations keep per-call state local or locked.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass

from stores.reference import Reference


@dataclass(frozen=True)
class ManifestBytes:
    """A manifest or index as served: exact bytes, the media type the source declared (may be
    empty when the source has none; then the JSON `mediaType` field decides), and its digest
    when the source knows it in advance (pinned references, layout descriptors)."""

    data: bytes
    media_type: str
    digest: str | None = None


class Source(abc.ABC):
    """An image source for one reference."""

    reference: Reference

    @abc.abstractmethod
    def root_manifest(self) -> ManifestBytes:
        """What the reference names: an image manifest, or an index / manifest list."""

    @abc.abstractmethod
    def manifest(self, digest: str) -> ManifestBytes:
        """A manifest by digest (a child of an index)."""

    @abc.abstractmethod
    def open_blob(self, digest: str, size: int, offset: int = 0) -> Iterator[bytes]:
        """Stream blob *digest* from byte *offset* (for resuming). The caller verifies the digest;
        a source that cannot start mid-blob restarts at 0 only if offset == 0 was asked."""

    @abc.abstractmethod
    def read_range(self, digest: str, start: int, length: int) -> bytes:
        """Exactly *length* bytes of blob *digest* from *start* (the lazy read path)."""

    def pinned(self, manifest_digest: str) -> str:
        """A reference string that reopens this exact image later (for lazy reads after pull)."""
        return str(self.reference)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and open files."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
