"""The content-addressed store: verified blobs, image metadata, refs, layer indexes, and gc.

Layout (../DESIGN.md "On-disk layout"):

    STORE/blobs/sha256/<hex>         verified blobs
    STORE/tmp/<hex>.partial          a blob being fetched (resumed after an interruption)
    STORE/indexes/<layer-hex>        layer indexes
    STORE/indexes/<layer-hex>.meta   or only an index's metadata part, when the index came from a
      and <layer-hex>.remote.json    published artifact: its windows are range-read from the index
                                     blob in the registry (remote.json: that blob's descriptor)
    STORE/indexes/<layer-hex>.toc    or, for an eStargz layer, its TOC: the gzip member exactly as
      and <layer-hex>.tocindex       in the blob (imagefs/estargz.py), and the index made from it
                                     (format 2), which is what a mount loads
    STORE/chunks/<layer-hex>/        lazily fetched pieces of layers
    STORE/images/<image-id>/         manifest, config, source.json (where lazy reads go), and
                                     profile.json: the image's access profile, when it has one
    STORE/refs/<quoted reference>    reference -> image id
    STORE/locks/                     flock files: one per blob, plus store.lock

Concurrency: any number of processes may use one store. Writers of a blob or index hold that blob's
lock; pulls hold store.lock shared and gc holds it exclusive, so gc never deletes what a pull in
flight is about to reference. Every file appears by atomic rename. Synchronous; not for the FUSE
event loop thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from pathlib import Path

from imagefs.errors import DigestMismatch, InputError, NotFound, RuntimeFailure
from stores.digest import check_digest, hex_of
from stores.fsutil import atomic_write, fsync_dir, locked
from stores.manifest import load_json, parse_config, parse_layers
from stores.model import Image

Progress = Callable[[int], None]  # called with the number of new bytes

# An access profile: the paths a task read first, in first-read order (imagefs/prefetch.py records
# them, imagefs/publish.py carries them beside the image). One document format, here and published.
PROFILE_NAME = "profile.json"
PROFILE_FORMAT = 1
# Bounds what a pull accepts from a registry; a real profile (at most 10,000 paths) is far smaller.
MAX_PROFILE_BYTES = 4 << 20


def encode_profile(paths: Sequence[str]) -> bytes:
    """The profile document, canonical (sorted keys, no spaces, ASCII), so that the same profile
    is the same bytes everywhere: published twice, it is the same blob."""
    return json.dumps({"format": PROFILE_FORMAT, "paths": list(paths)}, sort_keys=True,
                      separators=(",", ":")).encode()


def parse_profile(data: bytes, what: str) -> list[str]:
    """The paths of a profile document, or InputError: it must be at most MAX_PROFILE_BYTES of
    `{"format": 1, "paths": [...]}` whose paths are normal relative paths (as a tree walk names them)."""
    if len(data) > MAX_PROFILE_BYTES:
        raise InputError(what, f"{len(data)} bytes, more than the {MAX_PROFILE_BYTES} a profile may have")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(what, f"not a profile: bad JSON ({e})") from None
    except RecursionError:  # deeply nested arrays: hostile, and not a profile either way
        raise InputError(what, "not a profile: JSON nested too deeply") from None
    version = doc.get("format") if isinstance(doc, dict) else None
    if type(version) is not int or version != PROFILE_FORMAT:  # type(): True == 1 in Python
        raise InputError(what, f"not a profile of format {PROFILE_FORMAT}")
    paths = doc.get("paths")
    if not isinstance(paths, list) or not all(isinstance(p, str) and _normal_path(p) for p in paths):
        raise InputError(what, "not a profile: paths must be a list of normal relative paths")
    return paths


def _normal_path(path: str) -> bool:
    return "\0" not in path and all(part not in ("", ".", "..") for part in path.split("/"))


def _fit_profile(paths: Sequence[str]) -> list[str]:
    """The leading paths whose document stays within MAX_PROFILE_BYTES: the order is first-read
    order, so the head is what matters, and a profile must never be one its readers refuse."""
    budget = MAX_PROFILE_BYTES - len(encode_profile([]))
    kept = []
    for path in paths:
        budget -= len(json.dumps(path)) + 1  # ASCII-escaped, plus a comma
        if budget < 0:
            break
        kept.append(path)
    return kept


@dataclass(frozen=True)
class ImageRecord:
    id: str
    refs: tuple[str, ...]
    image: Image
    source: str  # a reference that reopens exactly this image

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.image.layers)


class Store:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # -- paths -------------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / hex_of(digest)

    def index_path(self, layer_digest: str) -> Path:
        return self.root / "indexes" / hex_of(layer_digest)

    def chunks_dir(self, layer_digest: str) -> Path:
        return self.root / "chunks" / hex_of(layer_digest)

    def image_dir(self, image_id: str) -> Path:
        return self.root / "images" / image_id

    def _lock_path(self, name: str) -> Path:
        return self.root / "locks" / f"{name}.lock"

    def blob_lock(self, digest: str) -> contextlib.AbstractContextManager[None]:
        return locked(self._lock_path(hex_of(digest)))

    def using(self) -> contextlib.AbstractContextManager[None]:
        """Held (shared) by every operation that adds to the store; gc takes it exclusively."""
        return locked(self._lock_path("store"), shared=True)

    # -- blobs -------------------------------------------------------------------------------
    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def read_blob(self, digest: str) -> bytes:
        try:
            return self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise NotFound(digest, "blob not in the store") from None

    def put_blob(self, digest: str, data: bytes) -> Path:
        """Store *data* under *digest* after checking it."""
        check_digest(digest)
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise DigestMismatch(f"blob {digest}", digest, actual)
        path = self.blob_path(digest)
        if not path.exists():
            with self.blob_lock(digest):
                if not path.exists():
                    atomic_write(path, data)
        return path

    def fetch_blob(self, digest: str, size: int, open_at: Callable[[int], Iterator[bytes]],
                   progress: Progress | None = None) -> Path:
        """Fetch a blob into the store unless it is there, verifying it while it streams in.

        `open_at(offset)` streams the blob from *offset*. A `.partial` left by an interrupted
        fetch is resumed from its end (we hold the blob's lock, so no live writer owns it); a
        partial that turns out wrong is discarded with the error, so a retry starts clean.
        """
        check_digest(digest)
        path = self.blob_path(digest)
        if path.exists():
            return path
        with self.blob_lock(digest):
            return self.fetch_blob_locked(digest, size, open_at, progress)

    def fetch_blob_locked(self, digest: str, size: int, open_at: Callable[[int], Iterator[bytes]],
                          progress: Progress | None = None) -> Path:
        """`fetch_blob` for a caller already holding `blob_lock(digest)` (flock does not nest)."""
        path = self.blob_path(digest)
        if path.exists():  # another process fetched it while we waited for the lock
            return path
        partial = self.root / "tmp" / f"{hex_of(digest)}.partial"
        partial.parent.mkdir(parents=True, exist_ok=True)
        hasher = hashlib.sha256()
        have = 0
        if partial.exists():
            with open(partial, "rb") as f:
                while block := f.read(1 << 20):
                    hasher.update(block)
                    have += len(block)
            if have > size:
                partial.unlink()
                hasher, have = hashlib.sha256(), 0
        if progress and have:
            progress(have)
        try:
            with open(partial, "ab") as out:
                if have < size:
                    for block in open_at(have):
                        if have + len(block) > size:
                            raise InputError(f"blob {digest}", f"larger than the {size} bytes its descriptor declares")
                        out.write(block)
                        hasher.update(block)
                        have += len(block)
                        if progress:
                            progress(len(block))
                out.flush()
                os.fsync(out.fileno())
            if have != size:
                raise InputError(f"blob {digest}", f"truncated: got {have} of {size} bytes")
            actual = "sha256:" + hasher.hexdigest()
            if actual != digest:
                raise DigestMismatch(f"blob {digest}", digest, actual)
        except (InputError, DigestMismatch):
            partial.unlink(missing_ok=True)
            raise
        path.parent.mkdir(parents=True, exist_ok=True)
        os.rename(partial, path)
        fsync_dir(path.parent)
        return path

    # -- indexes -----------------------------------------------------------------------------
    def has_index(self, layer_digest: str) -> bool:
        """Whether the layer has an index here: whole, its metadata part (windows remote), or its
        eStargz TOC."""
        return (self.has_full_index(layer_digest) or self.index_meta_path(layer_digest).is_file()
                or self.has_toc(layer_digest))

    def has_full_index(self, layer_digest: str) -> bool:
        return self.index_path(layer_digest).is_file()

    def index_meta_path(self, layer_digest: str) -> Path:
        return self.root / "indexes" / f"{hex_of(layer_digest)}.meta"

    def _index_remote_path(self, layer_digest: str) -> Path:
        return self.root / "indexes" / f"{hex_of(layer_digest)}.remote.json"

    def put_index_meta(self, layer_digest: str, meta: bytes, remote: dict[str, Any]) -> None:
        """Keep an index's metadata part and the descriptor of the published blob holding the
        rest (written first: a .meta file always has its descriptor)."""
        atomic_write(self._index_remote_path(layer_digest), json.dumps(remote, sort_keys=True).encode())
        atomic_write(self.index_meta_path(layer_digest), meta)

    def read_index_meta(self, layer_digest: str) -> tuple[bytes, dict[str, Any]]:
        """(metadata part, published blob descriptor) of a layer whose index is not whole here."""
        try:
            remote = json.loads(self._index_remote_path(layer_digest).read_bytes())
            return self.index_meta_path(layer_digest).read_bytes(), remote
        except (FileNotFoundError, json.JSONDecodeError):
            raise NotFound(f"layer {layer_digest}", "no index in the store (pull the image again)") from None

    def toc_path(self, layer_digest: str) -> Path:
        return self.root / "indexes" / f"{hex_of(layer_digest)}.toc"

    def has_toc(self, layer_digest: str) -> bool:
        return self.toc_path(layer_digest).is_file()

    def put_toc(self, layer_digest: str, member: bytes, index: bytes) -> None:
        """Keep an eStargz layer's TOC (its gzip member, verified by the caller) and the index
        made from it (written first: a .toc file always has its index)."""
        atomic_write(self.root / "indexes" / f"{hex_of(layer_digest)}.tocindex", index)
        atomic_write(self.toc_path(layer_digest), member)

    def read_toc_index(self, layer_digest: str) -> bytes | None:
        """The index made from the layer's TOC, if the store has it."""
        try:
            return (self.root / "indexes" / f"{hex_of(layer_digest)}.tocindex").read_bytes()
        except FileNotFoundError:
            return None

    def read_toc(self, layer_digest: str) -> bytes:
        try:
            return self.toc_path(layer_digest).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"layer {layer_digest}", "no index in the store (pull the image again)") from None

    def put_index(self, layer_digest: str, data: bytes) -> None:
        atomic_write(self.index_path(layer_digest), data)

    def read_index(self, layer_digest: str) -> bytes:
        try:
            return self.index_path(layer_digest).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"layer {layer_digest}", "no index in the store (pull the image again)") from None

    # -- access profiles ---------------------------------------------------------------------
    def profile_path(self, image_id: str) -> Path:
        return self.image_dir(image_id) / PROFILE_NAME

    def has_profile(self, image_id: str) -> bool:
        return self.profile_path(image_id).is_file()

    def read_profile(self, image_id: str) -> list[str] | None:
        """The image's access profile (paths in first-read order); None when it has none,
        InputError when the file is not a profile."""
        path = self.profile_path(image_id)
        try:
            if path.stat().st_size > MAX_PROFILE_BYTES:  # not read whole just to be refused
                raise InputError(str(path), f"more than the {MAX_PROFILE_BYTES} bytes a profile may have")
            return parse_profile(path.read_bytes(), str(path))
        except FileNotFoundError:
            return None

    def put_profile(self, image_id: str, paths: Sequence[str]) -> None:
        """Record the image's access profile (replacing any); paths that are not normal are left
        out, and the tail beyond MAX_PROFILE_BYTES, so what is written always reads back."""
        atomic_write(self.profile_path(image_id), encode_profile(_fit_profile([p for p in paths if _normal_path(p)])))

    # -- images and refs ---------------------------------------------------------------------
    def save_image(self, image: Image, source: str, refs: list[str]) -> None:
        """Record *image* (its blobs must already be stored) and point *refs* at it."""
        d = self.image_dir(image.id)
        atomic_write(d / "manifest", image.manifest)
        atomic_write(d / "config", image.config)
        atomic_write(d / "source.json", json.dumps({"source": source, "pulled": int(time.time())}).encode())
        for ref in refs:
            atomic_write(self._ref_path(ref), image.id.encode())

    def _ref_path(self, ref: str) -> Path:
        return self.root / "refs" / urllib.parse.quote(ref, safe="")

    def refs(self) -> dict[str, str]:
        """reference -> image id, for every ref in the store."""
        out = {}
        refs_dir = self.root / "refs"
        if refs_dir.is_dir():
            for p in sorted(refs_dir.iterdir()):
                if not p.name.startswith("."):
                    with contextlib.suppress(FileNotFoundError):
                        out[urllib.parse.unquote(p.name)] = p.read_text().strip()
        return out

    def image_ids(self) -> list[str]:
        images = self.root / "images"
        return sorted(p.name for p in images.iterdir()) if images.is_dir() else []

    def lookup(self, name: str) -> str | None:
        """The image id a reference (normalised by the caller) or an id prefix names."""
        refs = self.refs()
        if name in refs:
            return refs[name]
        bare = name.removeprefix("sha256:")
        if len(bare) >= 6 and all(c in "0123456789abcdef" for c in bare):
            matches = [i for i in self.image_ids() if i.startswith(bare)]
            if len(matches) > 1:
                raise InputError(name, "ambiguous image id prefix")
            if matches:
                return matches[0]
        return None

    def load(self, image_id: str) -> ImageRecord:
        d = self.image_dir(image_id)
        try:
            manifest = (d / "manifest").read_bytes()
            config = (d / "config").read_bytes()
            source = json.loads((d / "source.json").read_text())["source"]
        except FileNotFoundError:
            raise NotFound(image_id, "image not in the store") from None
        except (json.JSONDecodeError, KeyError):
            raise RuntimeFailure(str(d / "source.json"), "corrupt image record") from None
        doc = load_json(manifest, f"image {image_id}: manifest")
        config_digest = doc["config"]["digest"]
        image = Image("sha256:" + image_id, manifest, config_digest, config,
                      parse_layers(doc, f"image {image_id}"), parse_config(config, f"image {image_id}: config"))
        refs = tuple(r for r, i in self.refs().items() if i == image_id)
        return ImageRecord(image_id, refs, image, source)

    def remove_ref(self, ref: str) -> str:
        """Forget *ref*; returns the image id it named. Blobs stay until gc."""
        image_id = self.refs().get(ref)
        if image_id is None:
            raise NotFound(ref, "no such image reference in the store")
        self._ref_path(ref).unlink(missing_ok=True)
        return image_id

    def local_bytes(self, image: Image) -> int:
        """How much of the image's layer data is on disk (whole blobs, or fetched chunks)."""
        total = 0
        for layer in image.layers:
            if self.has_blob(layer.digest):
                total += layer.size
            else:
                chunks = self.chunks_dir(layer.digest)
                if chunks.is_dir():
                    total += sum(p.stat().st_blocks * 512 for p in chunks.iterdir() if p.is_file())
        return total

    # -- gc ----------------------------------------------------------------------------------
    def gc(self, in_use: set[str] = frozenset()) -> dict[str, int]:
        """Delete images no ref names (nor *in_use*: images running containers and mounts still
        read), and the blobs, indexes, chunks, extracted layers and partials they alone used."""
        removed = {"images": 0, "blobs": 0, "indexes": 0, "chunks": 0, "layers": 0, "bytes": 0}
        with locked(self._lock_path("store")):
            live_images = set(self.refs().values()) | set(in_use)
            keep: set[str] = set()
            for image_id in self.image_ids():
                if image_id not in live_images:
                    shutil.rmtree(self.image_dir(image_id), ignore_errors=True)
                    removed["images"] += 1
                    continue
                try:
                    image = self.load(image_id).image
                except (InputError, RuntimeFailure):
                    continue  # unreadable record: keep what it may reference
                keep.add(hex_of(image.manifest_digest))
                keep.add(hex_of(image.config_digest))
                keep.update(hex_of(layer.digest) for layer in image.layers)
            # layers/ holds <hex>, <hex>.<lower-chain>, <hex>.flat and <hex>.tmp-* (an extraction
            # that died: live ones hold the store lock shared, so gc never sees them).
            for kind, sub in (("blobs", "blobs/sha256"), ("indexes", "indexes"), ("chunks", "chunks"),
                              ("layers", "layers"), ("blobs", "tmp")):
                d = self.root / sub
                if not d.is_dir():
                    continue
                for p in d.iterdir():
                    if p.name.split(".")[0] in keep:
                        continue
                    removed["bytes"] += _du(p)
                    if p.is_dir():
                        shutil.rmtree(p)
                    else:
                        p.unlink()
                    removed[kind] += 1
        return removed


def _du(path: Path) -> int:
    if path.is_dir():
        return sum(_du(p) for p in path.iterdir())
    return path.stat().st_blocks * 512
