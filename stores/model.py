"""The one image model every source produces, so nothing downstream asks where an image came from.

An `Image` is an ordered list of layers (bottom first) plus the runtime config. Sources translate
their native formats (registry manifests, OCI layouts, docker archives, Appc ACIs) into OCI image
manifests and configs; `manifest.parse_image` then turns those into this model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Compression = Literal["none", "gzip", "zstd"]

# Manifest media types.
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)

# Config media types.
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

# Layer media types and the compression each implies.
LAYER_COMPRESSION: dict[str, Compression] = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
}
# Appc ACIs are one tar (maybe gzip-compressed) with the filesystem under rootfs/.
APPC_ACI_TAR = "application/vnd.imagefs.appc.aci.v1.tar"
APPC_ACI_GZIP = "application/vnd.imagefs.appc.aci.v1.tar+gzip"
LAYER_COMPRESSION[APPC_ACI_TAR] = "none"
LAYER_COMPRESSION[APPC_ACI_GZIP] = "gzip"
APPC_ROOT = "rootfs/"


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a manifest says about a blob."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        s = f"{self.os}/{self.architecture}"
        return f"{s}/{self.variant}" if self.variant else s


# The annotation of an eStargz layer's descriptor that holds its TOC's digest (imagefs/estargz.py).
ESTARGZ_TOC_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"


@dataclass(frozen=True)
class Layer:
    """One layer of an image, bottom-most first in `Image.layers`.

    `root` is the path prefix inside the tar that is the filesystem root: "" for OCI/Docker layers,
    "rootfs/" for Appc ACIs, whose tar also holds the ACI manifest beside the tree.
    `toc_digest`: for an eStargz layer, the digest of its TOC (the descriptor's
    containerd.io/snapshot/stargz/toc.digest annotation); "" for every other layer.
    """

    digest: str
    media_type: str
    size: int
    compression: Compression
    root: str = ""
    toc_digest: str = ""


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config that decide how a task runs."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    workdir: str = ""
    user: str = ""
    labels: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    os: str = ""
    architecture: str = ""


@dataclass(frozen=True)
class Image:
    """A resolved image: its manifest (exact bytes, for verification), config and layers."""

    manifest_digest: str
    manifest: bytes
    config_digest: str
    config: bytes
    layers: tuple[Layer, ...]
    runtime: ImageConfig

    @property
    def id(self) -> str:
        """The image id: the manifest digest's hex, since the manifest fixes config and layers."""
        return self.manifest_digest.split(":", 1)[1]
