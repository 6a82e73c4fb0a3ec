"""Writing eStargz layers: a tar re-laid so every file's data starts a gzip member of its own.

`write_estargz(tar, out)` copies the members of an open tar (any compression tarfile reads) into
`out` as an eStargz blob (imagefs/estargz.py has the format): tar headers go into the current gzip
member; each regular file's data is cut into `chunk_size` chunks, each in a new member whose offset
and sha256 go into the TOC; the TOC (`stargz.index.json`, the tar's last member) gets a member of
its own, and the 51-byte footer points at it. The uncompressed stream is an ordinary tar, so the
blob is a valid gzip layer for any runtime; the result says what its descriptor and config need
(digest, size, diff_id, and the TOC digest for the `containerd.io/snapshot/stargz/toc.digest`
annotation).

*prioritized* paths (an access profile, in first-read order) come first, each after its parent
directories, then a `.prefetch.landmark`; with none, the layer starts with a `.no.prefetch.landmark`.
That is how eStargz carries a profile inside the layer (`estargz.prioritized_paths` reads it back).

Concurrency: none; one synchronous pass (the source tar is read with random access).
"""

from __future__ import annotations

import base64
import hashlib
import json
import tarfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, BinaryIO

from imagefs.estargz import FOOTER_SIZE, TOC_NAME

DEFAULT_CHUNK_SIZE = 4 << 20  # what the stargz-snapshotter's writer uses
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
_TYPES = {tarfile.REGTYPE: "reg", tarfile.AREGTYPE: "reg", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
          tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}
_COPY_PIECE = 1 << 20


@dataclass(frozen=True)
class WrittenLayer:
    digest: str       # sha256 of the blob written
    size: int
    diff_id: str      # sha256 of the uncompressed tar
    tar_size: int
    toc_digest: str   # sha256 of the TOC JSON


class _Members:
    """The output: gzip members one after another, with both ends hashed and counted."""

    def __init__(self, out: BinaryIO, level: int) -> None:
        self._out, self._level = out, level
        self._z: Any = None
        self.pos = 0
        self.plain = 0
        self._blob_sha, self._plain_sha = hashlib.sha256(), hashlib.sha256()

    def write(self, data: bytes) -> None:
        """Uncompressed tar bytes, into the current member (opening one if none is open)."""
        if self._z is None:
            self._z = zlib.compressobj(self._level, zlib.DEFLATED, 31)
        self._plain_sha.update(data)
        self.plain += len(data)
        self._emit(self._z.compress(data))

    def close_member(self) -> None:
        if self._z is not None:
            self._emit(self._z.flush())
            self._z = None

    def raw(self, data: bytes) -> None:
        self._emit(data)

    def _emit(self, data: bytes) -> None:
        if data:
            self._out.write(data)
            self._blob_sha.update(data)
            self.pos += len(data)

    def result(self, toc_digest: str) -> WrittenLayer:
        return WrittenLayer("sha256:" + self._blob_sha.hexdigest(), self.pos,
                            "sha256:" + self._plain_sha.hexdigest(), self.plain, toc_digest)


def write_estargz(tar: tarfile.TarFile, out: BinaryIO, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                  level: int = 6, prioritized: Sequence[str] = ()) -> WrittenLayer:
    """Write *tar*'s members to *out* as an eStargz blob (see the module docstring)."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    members = tar.getmembers()
    out_ = _Members(out, level)
    entries: list[dict[str, Any]] = []
    ordered, landmark = _ordered(members, prioritized)
    for ti in ordered:
        entries.extend(_write_member(tar, ti, out_, chunk_size, is_landmark=ti is landmark))
    out_.close_member()
    toc = json.dumps({"version": 1, "entries": entries}, separators=(",", ":")).encode()
    toc_offset = out_.pos
    info = tarfile.TarInfo(TOC_NAME)
    info.size, info.mode = len(toc), 0o644
    out_.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
    out_.write(toc + _padding(len(toc)) + b"\0" * (2 * tarfile.BLOCKSIZE))  # the tar's end
    out_.close_member()
    out_.raw(footer(toc_offset))
    return out_.result("sha256:" + hashlib.sha256(toc).hexdigest())


def footer(toc_offset: int) -> bytes:
    """The 51-byte eStargz footer: an empty gzip member whose extra field locates the TOC."""
    payload = b"%016xSTARGZ" % toc_offset
    extra = b"SG" + len(payload).to_bytes(2, "little") + payload
    data = (b"\x1f\x8b\x08\x04" + b"\0" * 4 + b"\x00\xff" + len(extra).to_bytes(2, "little") + extra
            + b"\x01\x00\x00\xff\xff" + b"\0" * 8)  # an empty stored block, then CRC32 and size of nothing
    assert len(data) == FOOTER_SIZE
    return data


def _norm(name: str) -> str:
    return "/".join(p for p in name.split("/") if p and p != ".")


def _ordered(members: list[tarfile.TarInfo],
             prioritized: Sequence[str]) -> tuple[list[tarfile.TarInfo], tarfile.TarInfo]:
    """Members with the prioritized ones first (each after its parent directories and, for a
    hardlink, its target), then the landmark, then the rest in their order; and the landmark.
    A source that is eStargz already loses its landmark and TOC (they are made anew)."""
    ours = {PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK, TOC_NAME}
    members = [ti for ti in members if _norm(ti.name) not in ours]
    by_name = {_norm(ti.name): ti for ti in members}  # the last of a name wins, as on extraction
    first: list[tarfile.TarInfo] = []
    taken: set[int] = set()

    def take(name: str) -> None:
        ti = by_name.get(name)
        if ti is None or id(ti) in taken:
            return
        parts = name.split("/")
        for i in range(1, len(parts)):
            take("/".join(parts[:i]))
        if ti.islnk():
            take(_norm(ti.linkname))
        taken.add(id(ti))
        first.append(ti)

    for path in prioritized:
        take(_norm(path))
    landmark = tarfile.TarInfo(PREFETCH_LANDMARK if first else NO_PREFETCH_LANDMARK)
    landmark.size = 1
    return first + [landmark] + [ti for ti in members if id(ti) not in taken], landmark


def _write_member(tar: tarfile.TarFile, ti: tarfile.TarInfo, out: _Members, chunk_size: int, *,
                  is_landmark: bool) -> list[dict]:
    """Write one member (header, then its data in chunks) and return its TOC entries."""
    kind = _TYPES.get(ti.type)
    if kind is None:
        raise ValueError(f"{ti.name!r}: tar member type {ti.type!r} has no eStargz TOC type")
    out.write(ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
    entry = _toc_entry(ti, kind)
    if kind != "reg" or ti.size == 0:
        return [entry]
    source: Any = None if is_landmark else tar.extractfile(ti)  # a landmark holds one byte, 0x0f
    whole = hashlib.sha256()
    entries: list[dict] = []
    done = 0
    while done < ti.size:
        n = min(chunk_size, ti.size - done)
        out.close_member()  # every chunk starts a member: that is what makes it readable alone
        chunk = {"offset": out.pos, "chunkDigest": ""}
        digest = hashlib.sha256()
        left = n
        while left:
            data = source.read(min(left, _COPY_PIECE)) if source is not None else b"\x0f"
            if not data:
                raise ValueError(f"{ti.name!r}: data ends {left} bytes early")
            out.write(data)
            digest.update(data)
            whole.update(data)
            left -= len(data)
        chunk["chunkDigest"] = "sha256:" + digest.hexdigest()
        if done == 0:
            chunk_entry = entry
        else:
            chunk_entry = {"name": ti.name, "type": "chunk", "chunkOffset": done}
        chunk_entry.update(chunk)
        if done + n < ti.size:
            chunk_entry["chunkSize"] = n  # the last chunk of a file says 0 (left out)
        entries.append(chunk_entry)
        done += n
    out.write(_padding(ti.size))
    entry["digest"] = "sha256:" + whole.hexdigest()
    return entries


def _toc_entry(ti: tarfile.TarInfo, kind: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": ti.name, "type": kind}
    if kind == "reg" and ti.size:
        entry["size"] = ti.size
    entry["modtime"] = _rfc3339(ti)
    if kind in ("symlink", "hardlink"):
        entry["linkName"] = ti.linkname
    entry["mode"] = ti.mode & 0o7777
    for key, value in (("uid", ti.uid), ("gid", ti.gid), ("userName", ti.uname), ("groupName", ti.gname)):
        if value:
            entry[key] = value
    if kind in ("char", "block"):
        entry["devMajor"], entry["devMinor"] = ti.devmajor, ti.devminor
    xattrs = {k[13:]: base64.b64encode(v.encode("utf-8", "surrogateescape")).decode()
              for k, v in ti.pax_headers.items() if k.startswith("SCHILY.xattr.")}
    if xattrs:
        entry["xattrs"] = xattrs
    return entry


def _rfc3339(ti: tarfile.TarInfo) -> str:
    seconds = Decimal(ti.pax_headers.get("mtime") or int(ti.mtime))
    whole = int(seconds.to_integral_value(rounding="ROUND_FLOOR"))
    text = datetime.fromtimestamp(whole, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = seconds - whole
    return text + (str(fraction)[1:].rstrip("0") if fraction else "") + "Z"


def _padding(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)
