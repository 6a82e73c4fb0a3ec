"""A `docker save` tarball (`docker-archive:PATH[:REPO:TAG]`) as a source.

Two layouts exist and both are read:

    manifest.json   [{"Config": "<hex>.json", "RepoTags": ["repo:tag"], "Layers": ["<id>/layer.tar", ...]}]
                    (docker >= 1.10; docker >= 25 writes blobs/sha256/<hex> paths here, same format)
    repositories    {"repo": {"tag": "<top layer id>"}} with <id>/json (v1 metadata, "parent" link)
                    and <id>/layer.tar per layer: the legacy format, used when manifest.json is absent

The archive holds no registry manifest, so one is synthesised (OCI, deterministic JSON): the
config is the archive's config file as-is (legacy: an OCI config built from the top layer's v1
json), and each layer is its member's bytes, digest = sha256 of those bytes, media type from the
member's magic number (tar, gzip or zstd). Digests are computed in one streaming pass at open.

Nothing is extracted: blobs are regions of the archive file (`TarInfo.offset_data`) read with
pread. A gzip-compressed archive has no such regions, so it is decompressed once into a temp file
(in *cache_dir* when given) that `close()` removes.

Concurrency: all state is built in __init__ and immutable after; reads go through `LocalSource`
(a descriptor per call, pread), so any number of threads may read.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import posixpath
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagefs.errors import DigestMismatch, InputError, NotFound
from stores.manifest import load_json
from stores.reference import DockerArchiveReference
from stores.sources import CHUNK, GZIP_MAGIC, FileRegion, SynthesisedSource, canonical_json, pread_exact

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
LAYER_MEDIA = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
_MAX_LINKS = 16  # symlink hops when following a layer member (docker links duplicate layers)


@dataclass(frozen=True)
class LayerBlob:
    """One layer member after hashing: where it is, its digest and compression."""

    region: FileRegion
    digest: str
    compression: str  # "none" | "gzip" | "zstd"

    @property
    def diff_id(self) -> str | None:
        """The sha256 of the uncompressed tar, known without work only for a plain layer."""
        return self.digest if self.compression == "none" else None


class TarMembers:
    """The members of an uncompressed tar file, by normalised name, located without extracting."""

    def __init__(self, path: str, what: str) -> None:
        self.path, self.what = path, what
        self.size = os.path.getsize(path)
        with open(path, "rb") as f:
            first = f.read(tarfile.BLOCKSIZE)
        try:
            tarfile.TarInfo.frombuf(first, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise InputError(what, f"not a readable tar archive: {e}") from None
        try:
            with tarfile.open(path, "r:") as tar:
                infos = tar.getmembers()
                end = tar.offset
        except tarfile.TarError as e:
            # The first header was sound (checked above), so a later one is cut off or damaged.
            raise InputError(what, f"truncated or corrupt archive: {e}") from None
        # tarfile stops quietly at a header it cannot read; a complete archive ends with two
        # zero blocks after the last member, so a file shorter than that was cut off.
        if self.size < end + 2 * tarfile.BLOCKSIZE:
            raise InputError(what, f"truncated archive: ends at byte {self.size}, members run to {end}")
        self.members = {_norm(i.name): i for i in infos}

    def __contains__(self, name: str) -> bool:
        return name in self.members

    def region(self, name: str) -> FileRegion:
        """The data of regular-file member *name*, following symlinks and hardlinks."""
        current = _norm(name)
        for _ in range(_MAX_LINKS):
            info = self.members.get(current)
            if info is None:
                raise NotFound(self.what, f"archive has no member {current!r}" + (f" (from {name!r})" if current != _norm(name) else ""))
            if info.issym():
                current = _norm(posixpath.join(posixpath.dirname(current), info.linkname))
                continue
            if info.islnk():
                current = _norm(info.linkname)
                continue
            if not info.isfile():
                raise InputError(self.what, f"member {current!r} is not a regular file")
            if info.offset_data + info.size > self.size:
                raise InputError(self.what, f"truncated archive: member {current!r} runs past the end of the file")
            return FileRegion(self.path, info.offset_data, info.size)
        raise InputError(self.what, f"member {name!r}: too many links")

    def read(self, name: str) -> bytes:
        r = self.region(name)
        return pread_exact(r.path, r.offset, r.size, self.what)


def _norm(name: str) -> str:
    return posixpath.normpath(name.lstrip("/")).removeprefix("./")


def hash_layer(region: FileRegion, what: str) -> LayerBlob:
    """Stream *region* once for its sha256; its compression comes from its magic number."""
    head = pread_exact(region.path, region.offset, min(4, region.size), what)
    compression = "gzip" if head.startswith(GZIP_MAGIC) else "zstd" if head.startswith(ZSTD_MAGIC) else "none"
    blob_hash = hashlib.sha256()
    for start in range(0, region.size, CHUNK):
        blob_hash.update(pread_exact(region.path, region.offset + start, min(CHUNK, region.size - start), what))
    return LayerBlob(region, "sha256:" + blob_hash.hexdigest(), compression)


class DockerArchiveSource(SynthesisedSource):
    """One image of a docker save archive, served with a synthesised OCI manifest."""

    def __init__(self, ref: DockerArchiveReference, *, cache_dir: str | Path | None = None) -> None:
        self.reference = ref
        self._temp: str | None = None
        what = str(ref)
        if not os.path.isfile(ref.path):
            raise NotFound(what, f"no archive file at {ref.path}")
        try:
            tar = TarMembers(self._plain_tar(ref.path, what, cache_dir), what)
            if "manifest.json" in tar:
                config, layers = self._from_manifest_json(tar, what)
            elif "repositories" in tar:
                config, layers = self._from_legacy(tar, what)
            else:
                raise InputError(what, "not a docker save archive (no manifest.json or repositories)")
        except BaseException:
            self.close()
            raise
        self._publish(config, [({"mediaType": LAYER_MEDIA[layer.compression], "digest": layer.digest,
                                 "size": layer.region.size}, layer.region) for layer in layers])

    # -- opening -------------------------------------------------------------------------------

    def _plain_tar(self, path: str, what: str, cache_dir: str | Path | None) -> str:
        """*path* itself, or a decompressed temp copy when the archive is gzip-compressed."""
        with open(path, "rb") as f:
            if f.read(2) != GZIP_MAGIC:
                return path
        if cache_dir is not None:
            os.makedirs(cache_dir, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix="docker-archive-", suffix=".tar", dir=cache_dir)
        self._temp = temp
        try:
            with os.fdopen(fd, "wb") as out, gzip.open(path, "rb") as src:
                shutil.copyfileobj(src, out, CHUNK)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise InputError(what, f"corrupt or truncated gzip archive: {e}") from None
        return temp

    def _from_manifest_json(self, tar: TarMembers, what: str) -> tuple[bytes, list[LayerBlob]]:
        doc = _json_any(tar.read("manifest.json"), f"{what}: manifest.json")
        if not isinstance(doc, list) or not doc or not all(isinstance(e, dict) for e in doc):
            raise InputError(f"{what}: manifest.json", "malformed: want a non-empty list of images")
        entry = self._choose_entry(doc, what)
        config_name, layer_names = entry.get("Config"), entry.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layer_names, list) \
                or not all(isinstance(n, str) for n in layer_names):
            raise InputError(f"{what}: manifest.json", "malformed entry: want Config and Layers")
        config = tar.read(config_name)
        rootfs = load_json(config, f"{what}: {config_name}").get("rootfs")
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        diff_ids = diff_ids if isinstance(diff_ids, list) else []
        layers = self._hash_layers(tar, layer_names, what)
        # A plain layer's digest is its diff_id: comparing them is free and catches an archive
        # whose layer files do not belong to its config (corruption, hand-made archives).
        if len(diff_ids) == len(layers):
            for name, layer, diff_id in zip(layer_names, layers, diff_ids):
                if layer.diff_id and layer.diff_id != diff_id:
                    raise DigestMismatch(f"{what}: layer {name}", diff_id, layer.diff_id)
        return config, layers

    def _choose_entry(self, doc: list[dict[str, Any]], what: str) -> dict[str, Any]:
        name = self.reference.name
        if name is None:
            if len(doc) != 1:
                raise InputError(what, f"archive holds {len(doc)} images; name one as docker-archive:PATH:REPO:TAG "
                                       f"(tags: {_tags_of(doc)})")
            return doc[0]
        if name.startswith("@") and name[1:].isdigit():  # skopeo's docker-archive:PATH:@N
            index = int(name[1:])
            if index >= len(doc):
                raise NotFound(what, f"archive holds {len(doc)} images, no @{index}")
            return doc[index]
        want = _normal_name(name)
        for entry in doc:
            if any(_normal_name(t) == want for t in entry.get("RepoTags") or () if isinstance(t, str)):
                return entry
        raise NotFound(what, f"no image tagged {name!r} in the archive (tags: {_tags_of(doc)})")

    def _from_legacy(self, tar: TarMembers, what: str) -> tuple[bytes, list[LayerBlob]]:
        repos = _json_any(tar.read("repositories"), f"{what}: repositories")
        if not isinstance(repos, dict):
            raise InputError(f"{what}: repositories", "malformed: want an object")
        tagged = {f"{repo}:{tag}": layer_id for repo, tags in repos.items() if isinstance(tags, dict)
                  for tag, layer_id in tags.items() if isinstance(layer_id, str)}
        name = self.reference.name
        if name is None:
            if len(tagged) != 1:
                raise InputError(what, f"archive holds {len(tagged)} tags; name one as docker-archive:PATH:REPO:TAG "
                                       f"(tags: {', '.join(sorted(tagged)) or 'none'})")
            top = next(iter(tagged.values()))
        else:
            found = [i for t, i in tagged.items() if _normal_name(t) == _normal_name(name)]
            if not found:
                raise NotFound(what, f"no image tagged {name!r} in the archive (tags: {', '.join(sorted(tagged)) or 'none'})")
            top = found[0]
        chain: list[dict[str, Any]] = []  # top first, then parents
        layer_id: str | None = top
        while layer_id:
            if any(j.get("id") == layer_id for j in chain) or len(chain) > 1000:
                raise InputError(what, f"legacy layer chain loops at {layer_id}")
            v1 = load_json(tar.read(f"{layer_id}/json"), f"{what}: {layer_id}/json")
            v1.setdefault("id", layer_id)
            chain.append(v1)
            parent = v1.get("parent")
            layer_id = parent if isinstance(parent, str) and parent else None
        chain.reverse()
        layers = self._hash_layers(tar, [f"{j['id']}/layer.tar" for j in chain], what)
        return _legacy_config(chain, layers, what), layers

    @staticmethod
    def _hash_layers(tar: TarMembers, names: list[str], what: str) -> list[LayerBlob]:
        cache: dict[FileRegion, LayerBlob] = {}  # docker links duplicate layers: hash each once
        out = []
        for name in names:
            region = tar.region(name)
            if region not in cache:
                cache[region] = hash_layer(region, f"{what}: layer {name}")
            out.append(cache[region])
        return out

    def close(self) -> None:
        if self._temp is not None:
            try:
                os.unlink(self._temp)
            except FileNotFoundError:
                pass
            self._temp = None


def _legacy_config(chain: list[dict[str, Any]], layers: list[LayerBlob], what: str) -> bytes:
    """An OCI image config for a legacy image: runtime config and platform from the top layer's
    v1 json, rootfs from the layers' uncompressed digests."""
    top = chain[-1]
    diff_ids = []
    for v1, layer in zip(chain, layers):
        if layer.diff_id is None:  # docker wrote legacy layers uncompressed; a packed one is foreign
            raise InputError(f"{what}: layer {v1['id']}", f"{layer.compression}-compressed legacy layers are not supported")
        diff_ids.append(layer.diff_id)
    config: dict[str, Any] = {
        "architecture": top.get("architecture") or "amd64",  # legacy docker ran on amd64 only
        "os": top.get("os") or "linux",
        "config": top.get("config") or {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    if isinstance(top.get("created"), str):
        config["created"] = top["created"]
    return canonical_json(config)


def _json_any(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(what, f"malformed JSON: {e}") from None


def _normal_name(name: str) -> str:
    """'busybox', 'busybox:latest' and 'docker.io/library/busybox:latest' all name one image."""
    last = name.rsplit("/", 1)[-1]
    if ":" not in last:
        name += ":latest"
    for prefix in ("docker.io/library/", "docker.io/", "library/"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _tags_of(doc: list[dict[str, Any]]) -> str:
    tags = [", ".join(e.get("RepoTags") or ["untagged"]) for e in doc]
    return "; ".join(tags)
