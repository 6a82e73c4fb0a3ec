"""Appc images (`appc:NAME[,KEY=VALUE...]`), found by simple discovery as Mesos finds them.

Discovery. The Appc spec's simple discovery renders `https://{name}-{version}-{os}-{arch}.{ext}`
with ext `aci`; Mesos replaces the `https://` with `--appc_simple_discovery_uri_prefix` and
concatenates. We do the same with `--appc-discovery PREFIX`:

    location = PREFIX [+ "/"] + NAME-VERSION-OS-ARCH.aci     (NAME keeps its slashes)

where PREFIX is a directory (`/var/lib/acis`, or `file:///var/lib/acis`) or an `http(s)://` URL; a
missing "/" between the two is added (Mesos would not, and would look for `/var/lib/acisacme.biz/..`).
So prefix `http://` gives the spec's URL over plain HTTP. Labels: `version` defaults to `latest`
(the spec's "latest pattern"), `os` to `linux`, `arch` to the host's (amd64 on x86_64). Only
labels the user (or a dependency entry) gave are checked against the ACI's manifest, as the spec's
matching rule says; the name must always match. ACIs fetched over HTTP are downloaded once per
open into the cache dir, named by their sha256, and served from there.

Image model. An ACI is a tar (plain or gzip; xz and bzip2 are refused) holding `manifest` and
`rootfs/`. Each ACI is one layer with media type APPC_ACI_TAR/APPC_ACI_GZIP, whose filesystem root
is `rootfs/` (the index builder strips it and skips `manifest`). Dependencies are discovered the
same way, recursively, and go *below* the image, in manifest order, each one's own dependencies
below it: the spec says they are "placed down into the rootfs before the files from this image"
and "each image dependency can overwrite files from the previous dependency" (Mesos's store
orders them the same way). A dependency reached twice (a diamond) is laid down once, at its first
(lowest) place, so re-applying a shared base cannot undo a later dependency. A non-empty
`pathWhitelist` (Appc's way of dropping files of dependencies) is refused: the union cannot
express it. The synthesised OCI config takes Entrypoint, Env, WorkingDir and User from the
image's `app`, Labels from its labels; dependencies' `app` sections are ignored, as the spec says.

Concurrency: everything is discovered and hashed in __init__; afterwards the source is immutable
and reads go through `LocalSource` (a descriptor per call, pread): any number of threads may read.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from imagefs.errors import AuthError, InputError, NotFound, RuntimeFailure
from stores.manifest import host_platform, load_json
from stores.model import APPC_ACI_GZIP, APPC_ACI_TAR
from stores.reference import AppcReference
from stores.sources import CHUNK, GZIP_MAGIC, FileRegion, SynthesisedSource, canonical_json

XZ_MAGIC = b"\xfd7zXZ\x00"
BZIP2_MAGIC = b"BZh"
ANNOTATION_NAME = "io.appc.image.name"
ANNOTATION_ID = "io.appc.image.id"
MAX_DEPTH = 32  # dependency nesting; deeper is surely a mistake


def discovery_labels(labels: dict[str, str]) -> dict[str, str]:
    """The labels simple discovery renders: *labels* over the defaults."""
    return {"version": "latest", "os": "linux", "arch": host_platform().architecture, **labels}


def discovery_location(prefix: str, name: str, labels: dict[str, str]) -> str:
    """Where simple discovery looks for image *name* with *labels* under *prefix*."""
    full = discovery_labels(labels)
    file_name = f"{name}-{full['version']}-{full['os']}-{full['arch']}.aci"
    if prefix.startswith(("http://", "https://")):
        return prefix + file_name if prefix.endswith("/") else f"{prefix}/{file_name}"
    return os.path.join(prefix.removeprefix("file://"), file_name)


@dataclass(frozen=True)
class Aci:
    """One ACI file after its single scanning pass."""

    location: str  # the path or URL discovery found it at (for messages)
    path: str  # the local file served
    size: int
    digest: str  # sha256 of the file as stored: the layer digest
    compression: str  # "none" | "gzip"
    diff_id: str  # sha256 of the uncompressed tar
    image_id: str  # Appc image ID: "sha512-" + sha512 of the uncompressed tar
    manifest: dict[str, Any] = field(compare=False)

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def labels(self) -> dict[str, str]:
        return _pairs(self.manifest.get("labels"), self.location, "labels")


class _Hashing:
    """A read-only stream that hashes (and counts) what passes through it."""

    def __init__(self, inner: BinaryIO, *hashes: Any) -> None:
        self.inner, self.hashes, self.count = inner, hashes, 0

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n)
        for h in self.hashes:
            h.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


def scan_aci(path: str, location: str) -> Aci:
    """Read the ACI at *path* once: its digests, compression and manifest; check its layout."""
    with open(path, "rb") as raw:
        head = raw.read(6)
        raw.seek(0)
        if head.startswith(XZ_MAGIC) or head.startswith(BZIP2_MAGIC):
            kind = "xz" if head.startswith(XZ_MAGIC) else "bzip2"
            raise InputError(location, f"{kind}-compressed ACIs are not supported (recompress with gzip or leave plain)")
        compression = "gzip" if head.startswith(GZIP_MAGIC) else "none"
        file_hash, tar_hash, id_hash = hashlib.sha256(), hashlib.sha256(), hashlib.sha512()
        stored = _Hashing(raw, file_hash)
        decoded: BinaryIO = gzip.GzipFile(fileobj=stored, mode="rb") if compression == "gzip" else stored  # type: ignore[assignment]
        plain = _Hashing(decoded, tar_hash, id_hash)
        manifest_bytes = None
        try:
            with tarfile.open(fileobj=plain, mode="r|") as tar:  # type: ignore[call-overload]
                for info in tar:
                    name = info.name.removeprefix("./").rstrip("/")
                    if name == "manifest" and info.isfile():
                        manifest_bytes = tar.extractfile(info).read()  # type: ignore[union-attr]
                    elif name != "rootfs" and not name.startswith("rootfs/"):
                        raise InputError(location, f"ACI has {info.name!r} outside rootfs/ (only manifest and rootfs/ are allowed)")
                end = tar.offset
            plain.drain()  # the end-of-archive blocks count in the image ID
            stored.drain()
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise InputError(location, f"not a readable ACI (tar{', gzip' if compression == 'gzip' else ''}): {e}") from None
    # tarfile's stream mode stops quietly at a missing header: a complete tar has two zero
    # blocks after its last member, so fewer bytes than that means the file was cut off.
    if plain.count < end + 2 * tarfile.BLOCKSIZE:
        raise InputError(location, f"truncated ACI: {plain.count} bytes of tar, members run to {end}")
    if manifest_bytes is None:
        raise InputError(location, "not an ACI: no manifest file at the top of the archive")
    manifest = load_json(manifest_bytes, f"{location}: manifest")
    _check_manifest(manifest, location)
    return Aci(location, path, stored.count, "sha256:" + file_hash.hexdigest(), compression,
               "sha256:" + tar_hash.hexdigest(), "sha512-" + id_hash.hexdigest(), manifest)


def _check_manifest(m: dict[str, Any], location: str) -> None:
    what = f"{location}: manifest"
    if m.get("acKind") != "ImageManifest":
        raise InputError(what, f"acKind is {m.get('acKind')!r}, not 'ImageManifest'")
    if not isinstance(m.get("acVersion"), str) or not isinstance(m.get("name"), str):
        raise InputError(what, "acVersion and name must be strings")
    _pairs(m.get("labels"), what, "labels")
    app = m.get("app")
    if app is not None:
        if not isinstance(app, dict):
            raise InputError(what, "app is not an object")
        exec_ = app.get("exec")
        if exec_ is not None and (not isinstance(exec_, list) or not all(isinstance(a, str) for a in exec_)):
            raise InputError(what, "app.exec is not a list of strings")
        _pairs(app.get("environment"), what, "app.environment")
        for key in ("user", "group", "workingDirectory"):
            if app.get(key) is not None and not isinstance(app[key], str):
                raise InputError(what, f"app.{key} is not a string")
        if str(app.get("user") or "").startswith("/") or str(app.get("group") or "").startswith("/"):
            # "owner of this file" has no OCI equivalent; running as root instead would be wrong
            raise InputError(what, "app.user/app.group naming a file's owner ('/path') is not supported")
    deps = m.get("dependencies") or []
    if not isinstance(deps, list) or not all(isinstance(d, dict) and isinstance(d.get("imageName"), str) for d in deps):
        raise InputError(what, "dependencies must be a list of objects with an imageName")
    for d in deps:
        _pairs(d.get("labels"), what, f"labels of dependency {d['imageName']}")
    if m.get("pathWhitelist"):
        raise InputError(what, "pathWhitelist is not supported (it hides files of dependencies, "
                               "which imagefs's layer union cannot express)")


def _pairs(value: Any, what: str, key: str) -> dict[str, str]:
    """Appc's [{"name": N, "value": V}, ...] lists as a dict."""
    if value is None:
        return {}
    if not isinstance(value, list) or not all(
            isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("value"), str) for p in value):
        raise InputError(what, f"{key} must be a list of {{name, value}} strings")
    return {p["name"]: p["value"] for p in value}


class Discovery:
    """Simple discovery under one prefix: (name, labels) -> a local ACI file, downloading when the
    prefix is a URL. Not thread-safe (used only while a source is being opened)."""

    def __init__(self, prefix: str, cache_dir: str | Path | None = None) -> None:
        self.prefix = prefix
        self.remote = prefix.startswith(("http://", "https://"))
        if not self.remote:
            if "://" in prefix and not prefix.startswith("file://"):
                raise InputError(f"--appc-discovery {prefix}", "want a directory or an http(s):// URL")
            if not os.path.isdir(prefix.removeprefix("file://")):
                raise NotFound(f"--appc-discovery {prefix}", "no such directory")
        self._own_cache = cache_dir is None
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self._client: httpx.Client | None = None

    def location(self, name: str, labels: dict[str, str]) -> str:
        return discovery_location(self.prefix, name, labels)

    def fetch(self, location: str, what: str) -> str:
        """A local path holding the ACI at *location*; NotFound naming the location."""
        if not self.remote:
            if not os.path.isfile(location):
                raise NotFound(what, f"no ACI at {location}")
            return location
        return self._download(location, what)

    def _download(self, url: str, what: str) -> str:
        if self.cache_dir is None:
            self.cache_dir = tempfile.mkdtemp(prefix="imagefs-appc-")
        os.makedirs(self.cache_dir, exist_ok=True)
        if self._client is None:
            self._client = httpx.Client(follow_redirects=True, timeout=httpx.Timeout(30.0, connect=10.0))
        fd, temp = tempfile.mkstemp(prefix=".download-", dir=self.cache_dir)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, self._client.stream("GET", url) as r:
                if r.status_code == 404:
                    raise NotFound(what, f"no ACI at {url} (HTTP 404)")
                if r.status_code in (401, 403):
                    raise AuthError(what, f"{url}: HTTP {r.status_code}")
                if r.status_code != 200:
                    raise RuntimeFailure(what, f"{url}: HTTP {r.status_code}")
                for piece in r.iter_bytes(CHUNK):
                    digest.update(piece)
                    out.write(piece)
            # Named by content: a file once served never changes under a reader, even when a
            # later open downloads a newer "latest".
            final = os.path.join(self.cache_dir, f"sha256-{digest.hexdigest()}.aci")
            os.replace(temp, final)
            return final
        except httpx.HTTPError as e:
            raise RuntimeFailure(what, f"cannot fetch {url}: {e}") from None
        finally:
            if os.path.exists(temp):
                os.unlink(temp)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._own_cache and self.cache_dir is not None:
            shutil.rmtree(self.cache_dir, ignore_errors=True)
            self.cache_dir = None


class AppcSource(SynthesisedSource):
    """An Appc image and its dependencies as one OCI image: one layer per ACI, bottom first."""

    def __init__(self, ref: AppcReference, discovery: str, *, cache_dir: str | Path | None = None) -> None:
        self.reference = ref
        self.discovery = Discovery(discovery, cache_dir)
        self._found: dict[str, Aci] = {}  # by location: a diamond dependency is fetched once
        try:
            self.acis = self._resolve(ref.name, dict(ref.labels), None, (), str(ref))
        except BaseException:
            self.discovery.close()
            raise
        self._publish(_oci_config(self.acis[-1], self.acis), [
            ({"mediaType": APPC_ACI_GZIP if a.compression == "gzip" else APPC_ACI_TAR, "digest": a.digest,
              "size": a.size, "annotations": {ANNOTATION_NAME: a.name, ANNOTATION_ID: a.image_id}},
             FileRegion(a.path, 0, a.size))
            for a in self.acis])

    def _resolve(self, name: str, labels: dict[str, str], image_id: str | None,
                 chain: tuple[str, ...], what: str) -> list[Aci]:
        """The ACIs that make up *name*: its dependencies' (recursively, in order), then itself."""
        location = self.discovery.location(name, labels)
        if location in chain:
            cycle = " -> ".join((*chain[chain.index(location):], location))
            raise InputError(str(self.reference), f"Appc dependency cycle: {cycle}")
        if len(chain) >= MAX_DEPTH:
            raise InputError(str(self.reference), f"Appc dependencies nest deeper than {MAX_DEPTH}")
        aci = self._found.get(location)
        if aci is None:
            aci = self._found[location] = scan_aci(self.discovery.fetch(location, what), location)
        _check_match(aci, name, labels, image_id)
        layers: list[Aci] = []
        for dep in aci.manifest.get("dependencies") or []:
            dep_labels = _pairs(dep.get("labels"), location, "dependency labels")
            dep_what = f"appc:{dep['imageName']} (dependency of {name})"
            for below in self._resolve(dep["imageName"], dep_labels, dep.get("imageID"), (*chain, location), dep_what):
                if all(below.digest != kept.digest for kept in layers):
                    layers.append(below)
        layers = [a for a in layers if a.digest != aci.digest]
        layers.append(aci)
        return layers

    def close(self) -> None:
        self.discovery.close()


def _check_match(aci: Aci, name: str, labels: dict[str, str], image_id: str | None) -> None:
    """The spec's rules: the name must match; a dependency's imageID, when given, must equal the
    ACI's; otherwise every label asked for must be in the manifest with the same value (labels
    not asked for match anything)."""
    if aci.name != name:
        raise InputError(aci.location, f"ACI manifest names image {aci.name!r}, not {name!r}")
    if image_id is not None:  # a pinned dependency: the ID decides, labels are not compared
        if image_id != aci.image_id:
            raise InputError(aci.location, f"image ID mismatch: dependency wants {image_id}, ACI is {aci.image_id}")
        return
    have = aci.labels
    for key, value in labels.items():
        if have.get(key) != value:
            found = f"{have[key]!r}" if key in have else "no such label"
            raise InputError(aci.location, f"label {key}={value!r} asked for, manifest has {found}")


def _oci_config(top: Aci, acis: list[Aci]) -> bytes:
    """The OCI image config for *top*'s app, its layers being *acis*."""
    app = top.manifest.get("app") or {}
    cfg: dict[str, Any] = {}
    if app.get("exec"):
        cfg["Entrypoint"] = list(app["exec"])
    env = _pairs(app.get("environment"), top.location, "app.environment")
    if env:
        cfg["Env"] = [f"{k}={v}" for k, v in env.items()]
    if app.get("workingDirectory"):
        cfg["WorkingDir"] = app["workingDirectory"]
    if app.get("user"):
        cfg["User"] = f"{app['user']}:{app['group']}" if app.get("group") else app["user"]
    labels = top.labels
    if labels:
        cfg["Labels"] = labels
    doc = {
        "architecture": labels.get("arch") or host_platform().architecture,
        "os": labels.get("os") or "linux",
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": [a.diff_id for a in acis]},
    }
    return canonical_json(doc)
