"""Build test images in Python: tar layers with every entry kind, OCI layouts, docker archives.

Nothing here pulls from public registries: the only binary is the host's busybox-static. Layouts
are written by hand (the spec is small) so tests control digests, media types and odd cases;
`skopeo copy` then pushes them to the test registry unchanged (`--preserve-digests`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

BUSYBOX = "/bin/busybox"
BUSYBOX_APPLETS = ("sh", "ls", "cat", "echo", "true", "false", "sleep", "id", "hostname", "mount",
                   "ps", "env", "touch", "rm", "mkdir", "stat", "readlink", "head", "wc", "sha256sum",
                   "dd", "grep", "test", "ip", "ifconfig", "kill", "pwd", "uname", "df", "du", "yes")

MEDIA = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
FIXED_MTIME = 1_700_000_000


@dataclass
class Member:
    """One tar member to write. `kind`: file, dir, symlink, hardlink, char, block, fifo."""

    path: str | bytes
    kind: str = "file"
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: float = FIXED_MTIME
    linkname: str | bytes = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    uname: str = ""
    gname: str = ""


_KIND = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
         "hardlink": tarfile.LNKTYPE, "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE,
         "fifo": tarfile.FIFOTYPE}


def _str(name: str | bytes) -> str:
    return os.fsdecode(name) if isinstance(name, bytes) else name


def layer_tar(members: list[Member], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar stream of *members* in order (duplicates and whiteouts are written as given)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tar:
        for m in members:
            info = tarfile.TarInfo(_str(m.path))
            info.type = _KIND[m.kind]
            info.mode = m.mode if m.mode is not None else (0o755 if m.kind == "dir" else 0o644)
            info.uid, info.gid, info.mtime = m.uid, m.gid, m.mtime
            info.uname, info.gname = m.uname, m.gname
            info.linkname = _str(m.linkname)
            info.devmajor, info.devminor = m.devmajor, m.devminor
            if m.xattrs:
                # Binary xattr values (security.capability) go through surrogateescape untouched.
                info.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                                    for k, v in m.xattrs.items()}
            if m.kind == "file":
                info.size = len(m.data)
                tar.addfile(info, io.BytesIO(m.data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def compress(tar_bytes: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(tar_bytes, compresslevel=6, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(tar_bytes)
    if compression == "none":
        return tar_bytes
    raise ValueError(compression)


def busybox_members(extra_dirs: bool = True) -> list[Member]:
    """A minimal rootfs: static busybox with its common applets as symlinks."""
    data = Path(BUSYBOX).read_bytes()
    members = [Member(d, "dir") for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "root", "var", "var/tmp", "mnt")] if extra_dirs else []
    for m in members:
        if m.path in ("tmp", "var/tmp"):
            m.mode = 0o1777
    members.append(Member("bin/busybox", data=data, mode=0o755))
    members += [Member(f"bin/{a}", "symlink", linkname="busybox") for a in BUSYBOX_APPLETS]
    members.append(Member("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"))
    members.append(Member("etc/group", data=b"root:x:0:\nnogroup:x:65534:\n"))
    return members


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class OciLayout:
    """An OCI image layout directory written by hand."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        if not (self.path / "index.json").exists():
            self._write_index([])

    def _write_index(self, manifests: list[dict]) -> None:
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        (self.path / "index.json").write_text(json.dumps(doc, indent=1))

    def add_blob(self, data: bytes) -> str:
        digest = _sha(data)
        (self.path / "blobs" / "sha256" / digest[7:]).write_bytes(data)
        return digest

    def blob_path(self, digest: str) -> Path:
        return self.path / "blobs" / "sha256" / digest.split(":", 1)[1]

    def add_image(self, layers: list[tuple[bytes, str]], *, tag: str | None = None,
                  config: dict | None = None, arch: str = "amd64", os_: str = "linux",
                  layer_media: list[str] | None = None, manifest_extra: dict | None = None) -> dict:
        """Add an image from (tar bytes, compression) pairs; tag it in index.json if *tag*.
        Returns the manifest's descriptor."""
        layer_descs, diff_ids = [], []
        for i, (tar_bytes, compression) in enumerate(layers):
            blob = compress(tar_bytes, compression)
            media = layer_media[i] if layer_media else MEDIA[compression]
            layer_descs.append({"mediaType": media, "digest": self.add_blob(blob), "size": len(blob)})
            diff_ids.append(_sha(tar_bytes))
        cfg = {"architecture": arch, "os": os_, "config": dict(config or {}),
               "rootfs": {"type": "layers", "diff_ids": diff_ids},
               "created": "2023-11-14T22:13:20Z"}
        cfg_bytes = json.dumps(cfg).encode()
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": OCI_CONFIG, "digest": self.add_blob(cfg_bytes), "size": len(cfg_bytes)},
                    "layers": layer_descs}
        manifest.update(manifest_extra or {})
        data = json.dumps(manifest).encode()
        desc = {"mediaType": OCI_MANIFEST, "digest": self.add_blob(data), "size": len(data),
                "platform": {"architecture": arch, "os": os_}}
        if tag:
            self.tag(desc, tag)
        return desc

    def add_index(self, manifests: list[dict], tag: str) -> dict:
        data = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()
        desc = {"mediaType": OCI_INDEX, "digest": self.add_blob(data), "size": len(data)}
        self.tag(desc, tag)
        return desc

    def tag(self, desc: dict, tag: str) -> None:
        index = json.loads((self.path / "index.json").read_text())
        kept = [m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag]
        entry = dict(desc)
        entry["annotations"] = {"org.opencontainers.image.ref.name": tag}
        self._write_index(kept + [entry])


def push(layout: Path, tag: str, dest: str, *, creds: str | None = None, tls_verify: bool = False,
         cert_dir: str | None = None) -> None:
    """Copy oci:LAYOUT:TAG to DEST (docker://...) with skopeo, digests unchanged."""
    cmd = ["skopeo", "copy", "--quiet", "--preserve-digests", "--all"]
    if creds:
        cmd += ["--dest-creds", creds]
    cmd += [f"--dest-tls-verify={'true' if tls_verify else 'false'}"]
    if cert_dir:
        cmd += ["--dest-cert-dir", cert_dir]
    cmd += [f"oci:{layout}:{tag}", dest]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)


def docker_save_archive(layout: OciLayout, desc: dict, out: Path, repo_tag: str) -> None:
    """Write a `docker save`-style tarball (manifest.json + legacy repositories) of one image."""
    manifest = json.loads(layout.blob_path(desc["digest"]).read_bytes())
    config_hex = manifest["config"]["digest"].split(":", 1)[1]
    staging = out.parent / (out.name + ".d")
    staging.mkdir()
    try:
        shutil.copy(layout.blob_path(manifest["config"]["digest"]), staging / f"{config_hex}.json")
        layer_paths = []
        for i, layer in enumerate(manifest["layers"]):
            blob = layout.blob_path(layer["digest"]).read_bytes()
            if layer["mediaType"].endswith("+gzip"):
                blob = gzip.decompress(blob)
            layer_id = hashlib.sha256(f"{i}:{layer['digest']}".encode()).hexdigest()
            (staging / layer_id).mkdir()
            (staging / layer_id / "layer.tar").write_bytes(blob)
            (staging / layer_id / "VERSION").write_text("1.0")
            layer_paths.append(f"{layer_id}/layer.tar")
        repo, _, tag = repo_tag.rpartition(":")
        (staging / "manifest.json").write_text(json.dumps([{"Config": f"{config_hex}.json", "RepoTags": [repo_tag], "Layers": layer_paths}]))
        (staging / "repositories").write_text(json.dumps({repo: {tag: layer_paths[-1].split("/")[0]}}))
        with tarfile.open(out, "w") as tar:
            for name in sorted(os.listdir(staging)):
                tar.add(staging / name, arcname=name)
    finally:
        shutil.rmtree(staging)


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll *predicate* until true: for waiting on external processes that offer no event."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)
