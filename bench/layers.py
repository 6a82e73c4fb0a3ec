"""Layers of big trees, streamed to disk: tar → gzip → file, hashing both ends on the way.

tests/support/images.py builds layers in memory, which is right for test fixtures and wrong for an
800 MB rootfs. Here a layer is written from a directory (a list of its paths, in order) straight to
a file in an OCI layout, never holding more than tarfile's and zlib's buffers:

    snap = snapshot(root)                      # before a change to the tree
    ...change the tree (apt-get install)...
    paths, gone = diff(root, snap)             # what the layer must carry, and its whiteouts
    desc = write_layer(layout, root, paths, gone)
    add_image(layout, [desc1, desc2], tag="python", config={...})

Diffs compare (mode, uid, gid, size, mtime, ctime, inode) per path, so anything dpkg rewrote is in
the layer; parents of changed paths are carried too, as `docker commit` does.

Concurrency: none; plain synchronous file work.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
ESTARGZ_TOC = "containerd.io/snapshot/stargz/toc.digest"

# Paths whose contents never belong in an image (the runtime provides them), relative to the root.
EMPTY_DIRS = ("dev", "proc", "sys", "run", "tmp")

StatKey = tuple[int, int, int, int, int, int, int]


@dataclass(frozen=True)
class LayerDesc:
    """A written layer: its descriptor fields and what the image config needs."""

    digest: str          # sha256 of the compressed blob
    size: int            # compressed size
    diff_id: str         # sha256 of the uncompressed tar
    tar_size: int        # uncompressed size
    media_type: str = GZIP_LAYER
    toc_digest: str = ""  # an eStargz layer's TOC digest (its descriptor's annotation)

    def to_json(self) -> dict:
        return {"digest": self.digest, "size": self.size, "diff_id": self.diff_id,
                "tar_size": self.tar_size, "media_type": self.media_type, "toc_digest": self.toc_digest}

    @classmethod
    def from_json(cls, doc: dict) -> LayerDesc:
        return cls(doc["digest"], doc["size"], doc["diff_id"], doc["tar_size"], doc["media_type"],
                   doc.get("toc_digest", ""))

    def descriptor(self) -> dict:
        desc = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.toc_digest:
            desc["annotations"] = {ESTARGZ_TOC: self.toc_digest,
                                   "io.containers.estargz.uncompressed-size": str(self.tar_size)}
        return desc


class _Counting(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to *sink*."""

    def __init__(self, sink) -> None:
        self.sink = sink
        self.sha = hashlib.sha256()
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        view = memoryview(data)
        self.sink.write(view)
        self.sha.update(view)
        self.count += len(view)
        return len(view)


def _excluded(rel: str) -> bool:
    top, _, rest = rel.partition("/")
    return bool(rest) and top in EMPTY_DIRS


def _key(st: os.stat_result) -> StatKey:
    return (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def walk(root: Path) -> Iterable[str]:
    """Every path under *root* (relative, parents before children, sorted), minus EMPTY_DIRS' contents."""
    base = str(root)
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        full_dir = os.path.join(base, rel_dir) if rel_dir else base
        try:
            names = sorted(os.listdir(full_dir))
        except NotADirectoryError:
            continue
        subdirs = []
        for name in names:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if _excluded(rel):
                continue
            yield rel
            if stat.S_ISDIR(os.lstat(os.path.join(base, rel)).st_mode):
                subdirs.append(rel)
        stack.extend(reversed(subdirs))


def snapshot(root: Path) -> dict[str, StatKey]:
    return {rel: _key(os.lstat(root / rel)) for rel in walk(root)}


def diff(root: Path, before: dict[str, StatKey]) -> tuple[list[str], list[str]]:
    """(paths to carry, in walk order, with their parent dirs; top-most deleted paths)."""
    now = list(walk(root))
    present = set(now)
    changed = {rel for rel in now if before.get(rel) != _key(os.lstat(root / rel))}
    for rel in list(changed):
        parent = os.path.dirname(rel)
        while parent and parent not in changed:
            changed.add(parent)
            parent = os.path.dirname(parent)
    gone = [rel for rel in before if rel not in present and os.path.dirname(rel) in present | {""}]
    return [rel for rel in now if rel in changed], sorted(gone)


def _write_gzip_tar(layout: Path, level: int, add: Callable[[tarfile.TarFile], None]) -> LayerDesc:
    """Stream a gzip tar blob into *layout*'s blobs (never held in memory): *add* writes the
    members; the blob is hashed (compressed and plain) on the way and renamed to its digest."""
    blobs = Path(layout) / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    tmp = blobs / f".partial-{os.getpid()}"
    with open(tmp, "wb") as raw:
        compressed = _Counting(raw)
        with gzip.GzipFile(fileobj=compressed, mode="wb", compresslevel=level, mtime=0) as gz:
            plain = _Counting(gz)
            with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                add(tar)
        raw.flush()
        os.fsync(raw.fileno())
    digest = compressed.sha.hexdigest()
    os.replace(tmp, blobs / digest)
    return LayerDesc(f"sha256:{digest}", compressed.count, f"sha256:{plain.sha.hexdigest()}", plain.count)


def write_layer(layout: Path, root: Path, paths: Iterable[str], whiteouts: Iterable[str] = (),
                *, level: int = 6) -> LayerDesc:
    """Write a gzip layer of *paths* (relative to *root*) plus whiteouts into *layout*'s blobs."""
    def add(tar: tarfile.TarFile) -> None:
        for rel in whiteouts:
            info = tarfile.TarInfo(os.path.join(os.path.dirname(rel), ".wh." + os.path.basename(rel)))
            info.mtime = 0
            tar.addfile(info)
        for rel in paths:
            tar.add(str(root / rel), arcname=rel, recursive=False)
    return _write_gzip_tar(layout, level, add)


def write_file_layer(layout: Path, members: Iterable[tuple[str, int, Iterable[bytes]]], *,
                     level: int = 6) -> LayerDesc:
    """A gzip layer of regular files given as (path, size, chunks), e.g. a generated data file."""
    def add(tar: tarfile.TarFile) -> None:
        for path, size, chunks in members:
            parent = os.path.dirname(path)
            if parent:
                d = tarfile.TarInfo(parent)
                d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
                tar.addfile(d)
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = size, 0o644, 1_700_000_000
            tar.addfile(info, _ChunkReader(chunks, size))
    return _write_gzip_tar(layout, level, add)


def write_estargz_layer(layout: Path, source: Path, *, prioritized: Iterable[str] = ()) -> LayerDesc:
    """The gzip layer blob *source* rewritten as eStargz (imagefs/estargz_writer.py) into *layout*;
    *prioritized* paths first. The tar is unpacked to a scratch file first: putting prioritized
    files first reads the source out of order, which a gzip stream cannot do cheaply."""
    from imagefs.estargz_writer import write_estargz

    blobs = Path(layout) / "blobs" / "sha256"
    plain, tmp = blobs / f".plain-{os.getpid()}", blobs / f".partial-{os.getpid()}"
    try:
        with gzip.open(source, "rb") as src, open(plain, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        with tarfile.open(plain, encoding="utf-8", errors="surrogateescape") as tar, open(tmp, "wb") as out:
            written = write_estargz(tar, out, prioritized=list(prioritized))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, blobs / written.digest.split(":", 1)[1])
    finally:
        plain.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return LayerDesc(written.digest, written.size, written.diff_id, written.tar_size, toc_digest=written.toc_digest)


class _ChunkReader(io.RawIOBase):
    """A readable stream over an iterator of byte chunks (what tarfile.addfile copies from)."""

    def __init__(self, chunks: Iterable[bytes], size: int) -> None:
        self._it = iter(chunks)
        self._buf = b""
        self._left = size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        while len(self._buf) < n or n < 0:
            try:
                self._buf += next(self._it)
            except StopIteration:
                break
        if n < 0:
            n = len(self._buf)
        out, self._buf = self._buf[:n], self._buf[n:]
        self._left -= len(out)
        return out


def _put_blob(layout: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    path = Path(layout) / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def init_layout(layout: Path) -> None:
    layout = Path(layout)
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    if not (layout / "index.json").exists():
        (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                                       "manifests": []}))


def add_image(layout: Path, layers: list[LayerDesc], *, tag: str, config: dict | None = None) -> dict:
    """Write config and manifest for *layers* and tag the manifest in index.json (replacing *tag*)."""
    init_layout(layout)
    cfg = {"architecture": "amd64", "os": "linux", "config": dict(config or {}),
           "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
           "created": "2023-11-14T22:13:20Z"}
    cfg_desc = _put_blob(layout, json.dumps(cfg).encode())
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, **cfg_desc},
                "layers": [layer.descriptor() for layer in layers]}
    desc = {"mediaType": OCI_MANIFEST, **_put_blob(layout, json.dumps(manifest).encode()),
            "platform": {"architecture": "amd64", "os": "linux"}, "annotations": {REF_NAME: tag}}
    index_path = Path(layout) / "index.json"
    index = json.loads(index_path.read_text())
    index["manifests"] = [m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != tag] + [desc]
    tmp = index_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, index_path)
    return desc
