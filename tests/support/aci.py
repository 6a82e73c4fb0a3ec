"""Build Appc ACIs for tests: a `manifest` plus `rootfs/` (plain tar or gzip), written where
simple discovery looks for them (`ROOT/NAME-VERSION-OS-ARCH.aci`), and a loopback HTTP server
that serves such a directory."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import http.server
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stores.manifest import host_platform
from tests.support.images import Member, layer_tar


def aci_manifest(name: str, labels: dict[str, str] | None = None, *, exec_: list[str] | None = None,
                 user: str = "0", group: str = "0", env: dict[str, str] | None = None,
                 workdir: str | None = None, dependencies: list[dict[str, Any]] | None = None,
                 **extra: Any) -> dict[str, Any]:
    """An ImageManifest. *dependencies*: [{"imageName": N, "labels": {K: V}, ...}] (labels as a dict)."""
    doc: dict[str, Any] = {"acKind": "ImageManifest", "acVersion": "0.8.11", "name": name,
                           "labels": [{"name": k, "value": v} for k, v in (labels or {}).items()]}
    if exec_ is not None:
        app: dict[str, Any] = {"exec": exec_, "user": user, "group": group}
        if env:
            app["environment"] = [{"name": k, "value": v} for k, v in env.items()]
        if workdir:
            app["workingDirectory"] = workdir
        doc["app"] = app
    if dependencies:
        doc["dependencies"] = [{**d, "labels": [{"name": k, "value": v} for k, v in d.get("labels", {}).items()]}
                               for d in dependencies]
    doc.update(extra)
    return doc


def aci_bytes(manifest: dict[str, Any], members: list[Member], compression: str = "gzip") -> bytes:
    """The ACI archive: `manifest` first, then `rootfs/` and *members* under it."""
    entries = [Member("manifest", data=json.dumps(manifest).encode()), Member("rootfs", "dir")]
    for m in members:
        linkname = m.linkname
        if m.kind == "hardlink":  # hardlink targets are archive paths, so they move under rootfs/ too
            linkname = f"rootfs/{m.linkname}"
        entries.append(dataclasses.replace(m, path=f"rootfs/{m.path}", linkname=linkname))
    tar = layer_tar(entries)
    if compression == "gzip":
        return gzip.compress(tar, mtime=0)
    if compression == "none":
        return tar
    raise ValueError(compression)


def discovery_name(manifest: dict[str, Any]) -> str:
    """NAME-VERSION-OS-ARCH.aci for *manifest*, with simple discovery's defaults."""
    labels = {p["name"]: p["value"] for p in manifest.get("labels", [])}
    arch = labels.get("arch", host_platform().architecture)
    return f"{manifest['name']}-{labels.get('version', 'latest')}-{labels.get('os', 'linux')}-{arch}.aci"


def publish(root: Path, manifest: dict[str, Any], members: list[Member], compression: str = "gzip",
            file_name: str | None = None) -> Path:
    """Write the ACI under *root* where discovery finds it; returns its path."""
    path = Path(root) / (file_name or discovery_name(manifest))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(aci_bytes(manifest, members, compression))
    return path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


@contextmanager
def serve_directory(root: Path) -> Iterator[str]:
    """Serve *root* over HTTP on a free 127.0.0.1 port; yields the base URL (no trailing slash)."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="aci-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
