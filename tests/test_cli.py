"""The pull side of the CLI end to end: real registry, real store, one-line errors, resume, gc."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.mounts import Cli
from tests.support.images import Member, OciLayout, busybox_members, layer_tar, push
from tests.support.registry import HttpFront, Reply


@pytest.fixture(scope="module")
def images(tmp_path_factory, registry):
    """Two images sharing the busybox layer, and one with a 6 MiB incompressible layer."""
    layout = OciLayout(tmp_path_factory.mktemp("cli") / "layout")
    base = (layer_tar(busybox_members()), "gzip")
    app = (layer_tar([Member("app", "dir"), Member("app/run", data=b"#!/bin/sh\necho app\n", mode=0o755)]), "gzip")
    big = (layer_tar([Member("blob", data=os.urandom(6 << 20))]), "gzip")
    layout.add_image([base], tag="a", config={"Cmd": ["/bin/sh"]})
    layout.add_image([base, app], tag="b", config={"Cmd": ["/app/run"]})
    layout.add_image([base, big], tag="big")
    for tag in ("a", "b", "big"):
        push(layout.path, tag, registry.ref(f"cli/img:{tag}"))
    return layout


@pytest.fixture
def cli(tmp_path):
    return Cli(tmp_path / "store", tmp_path / "work")


def one_line(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("imagefs: ") and "Traceback" not in r.stderr
    return lines[0]


def files(path) -> set[str]:
    return {p.name for p in path.iterdir()} if path.is_dir() else set()


def test_pull_images_inspect_rmi_gc(images, registry, cli):
    a, b = registry.ref("cli/img:a"), registry.ref("cli/img:b")
    assert cli.run("pull", a).stdout.startswith(a)
    cli.run("pull", "--all-layers", b)
    listing = cli.run("images").stdout
    assert a in listing and b in listing
    doc_a = json.loads(cli.run("inspect", "--json", a).stdout)
    doc_b = json.loads(cli.run("inspect", "--json", b).stdout)
    assert [(l["indexed"], l["index"]) for l in doc_b["layers"]] == [(True, "whole")] * 2
    assert doc_a["layers"][0]["digest"] == doc_b["layers"][0]["digest"]
    assert doc_b["layers"][1]["blob_local"] and doc_b["config"]["cmd"] == ["/app/run"]
    assert "Layers:" in cli.run("inspect", a).stdout
    base_hex = doc_a["layers"][0]["digest"][7:]
    app_hex = doc_b["layers"][1]["digest"][7:]

    assert "untagged" in cli.run("rmi", b).stdout
    assert b not in cli.run("images").stdout
    assert "removed 1 images" in cli.run("gc").stdout
    store = cli.store
    assert base_hex in files(store / "indexes") and app_hex not in files(store / "indexes")
    assert app_hex not in files(store / "blobs" / "sha256")
    assert doc_b["manifest_digest"][7:] not in files(store / "blobs" / "sha256")
    assert doc_a["manifest_digest"][7:] in files(store / "blobs" / "sha256")
    assert json.loads(cli.run("inspect", "--json", a).stdout)["id"] == doc_a["id"]
    r = cli.run("rmi", b, check=False)
    assert r.returncode == 2 and "no such image reference" in one_line(r)


def test_concurrent_pulls_into_one_store(images, registry, cli):
    ref = registry.ref("cli/img:big")
    cmd = [sys.executable, "-m", "imagefs", "--store", str(cli.store), "pull", ref]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], results
    doc = json.loads(cli.run("inspect", "--json", ref).stdout)
    assert all(l["indexed"] for l in doc["layers"])
    assert files(cli.store / "tmp") == set()
    assert len(files(cli.store / "refs")) == 1


def _blob_front(registry, hook):
    return HttpFront(registry.url, hook)


def test_interrupted_pull_resumes(images, registry, cli):
    layout = images
    index = json.loads((layout.path / "index.json").read_text())
    big_manifest = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == "big")
    big_layer = json.loads(layout.blob_path(big_manifest["digest"]).read_bytes())["layers"][1]["digest"]
    state = {"break": True}
    front_box: list[HttpFront] = []

    def hook(seen):
        if state["break"] and big_layer in seen.path:
            real = front_box[0]._forward(seen)
            return Reply(real.status, real.headers, real.body, cut_after=min(len(real.body) // 3, 1 << 20))
        return None

    with _blob_front(registry, hook) as front:
        front_box.append(front)
        ref = f"docker://{front.host}/cli/img:big"
        r = cli.run("pull", ref, check=False)
        assert r.returncode == 1, r.stderr
        assert front.host in one_line(r)
        partial = cli.store / "tmp" / f"{big_layer[7:]}.partial"
        have = partial.stat().st_size
        assert have > 0
        state["break"] = False
        before = len(front.requests(big_layer))
        cli.run("pull", ref)
        resumed = front.requests(big_layer)[before]
        assert resumed.headers.get("range") == f"bytes={have}-"
    assert not partial.exists()


@pytest.mark.parametrize("case", ["digest", "truncated", "missing", "malformed", "media-type", "schema1"])
def test_bad_input_is_one_line_and_exit_2(images, registry, cli, case):
    index = json.loads((images.path / "index.json").read_text())
    manifest_a = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == "a")
    layer = json.loads(images.blob_path(manifest_a["digest"]).read_bytes())["layers"][0]["digest"]
    front_box: list[HttpFront] = []

    def hook(seen):
        if case == "digest" and layer in seen.path:
            real = front_box[0]._forward(seen)
            body = bytearray(real.body)
            body[len(body) // 2] ^= 0xFF
            return Reply(real.status, real.headers, bytes(body))
        if case == "truncated" and layer in seen.path:
            # the registry holds a blob 100 bytes long where the manifest says more
            if "range" in seen.headers:
                return Reply(416, {"Content-Range": "bytes */100"})
            real = front_box[0]._forward(seen)
            return Reply(200, {"Content-Type": "application/octet-stream"}, real.body[:100])
        if "/manifests/" in seen.path:
            if case == "malformed":
                return Reply(200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, b"{not json")
            if case == "media-type":
                real = front_box[0]._forward(seen)
                doc = json.loads(real.body)
                doc["layers"][0]["mediaType"] = "application/vnd.example.layer.v9+lz5"
                return Reply(200, {"Content-Type": doc["mediaType"]}, json.dumps(doc).encode())
            if case == "schema1":
                return Reply(200, {"Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws"},
                             json.dumps({"schemaVersion": 1, "name": "cli/img", "tag": "a", "fsLayers": []}).encode())
        return None

    with _blob_front(registry, hook) as front:
        front_box.append(front)
        tag = "nope" if case == "missing" else "a"
        r = cli.run("pull", f"docker://{front.host}/cli/img:{tag}", check=False)
    line = one_line(r)
    assert r.returncode == 2, line
    expected = {"digest": "digest mismatch", "truncated": "truncated", "missing": "cli/img:nope",
                "malformed": "malformed JSON", "media-type": "application/vnd.example.layer.v9+lz5",
                "schema1": "schema1"}[case]
    assert expected in line
    if case == "digest":
        assert layer in line
    assert not any(p.name == layer[7:] for p in (cli.store / "blobs" / "sha256").glob("*"))
    assert files(cli.store / "tmp") == set()


def test_bad_references_and_usage(cli):
    for args, needle in [(("pull", "docker://"), "docker://"), (("pull", "dir:/x"), "unknown transport"),
                         (("pull", "oci:/nonexistent/layout"), "/nonexistent/layout"),
                         (("pull", "appc:acme.biz/x"), "appc-discovery"), (("inspect", "nothing:here"), "nothing"),
                         (("--platform", "linux", "pull", "x"), "platform"), (("frobnicate",), "invalid choice")]:
        r = cli.run(*args, check=False)
        assert r.returncode == 2, (args, r.stderr)
        assert needle in one_line(r), (args, r.stderr)


def test_progress_on_a_terminal_and_quiet_otherwise(images, registry, cli):
    import pty

    ref = registry.ref("cli/img:big")
    r = cli.run("pull", ref)
    assert r.stderr == ""  # not a terminal: no progress
    cli.run("rmi", ref)
    cli.run("gc")
    leader, follower = pty.openpty()
    try:
        p = subprocess.Popen([sys.executable, "-m", "imagefs", "--store", str(cli.store), "pull", ref],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower)
        os.close(follower)
        out = b""
        while True:
            try:
                block = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not block:
                break
            out += block
        assert p.wait(120) == 0
    finally:
        os.close(leader)
    text = out.decode(errors="replace")
    layers = json.loads(cli.run("inspect", "--json", ref).stdout)["layers"]
    assert layers[1]["digest"][7:19] in text and "MB" in text


class _Opened:
    def __init__(self, reference: str) -> None:
        self.reference = reference
        self.closed = False

    def close(self) -> None:
        self.closed = True


class _Options:
    """Stands in for SourceOptions: counts what is opened."""

    def __init__(self, error: Exception | None = None) -> None:
        self.opened: list[_Opened] = []
        self.error = error

    def open(self, reference: str) -> _Opened:
        if self.error is not None:
            raise self.error
        self.opened.append(_Opened(reference))
        return self.opened[-1]


def test_mount_server_opens_a_registry_source_ahead():
    from imagefs.cli import _SourceAhead
    from imagefs.errors import InputError

    ref = "docker://127.0.0.1:5000/x/y@sha256:" + "0" * 64
    options = _Options()
    ahead = _SourceAhead(options, ref)
    ahead.start()
    ahead.start()                              # idempotent
    source = ahead.get()                       # the view's first remote read takes it
    assert options.opened == [source] and source.reference == ref
    ahead.close_unused()
    assert not source.closed                   # the view's to close
    # Never taken (an image read locally): closed at the end.
    options = _Options()
    ahead = _SourceAhead(options, ref)
    ahead.start()
    ahead.close_unused()
    assert len(options.opened) == 1 and options.opened[0].closed
    # Taken before start: opened once, by the view.
    options = _Options()
    ahead = _SourceAhead(options, ref)
    ahead.get()
    ahead.start()
    assert len(options.opened) == 1
    # Not a registry: opened when first used only (Appc discovery, say, may reach out).
    options = _Options()
    ahead = _SourceAhead(options, "oci:/some/layout:tag")
    ahead.start()
    ahead.close_unused()
    assert options.opened == []
    # A failure to open is raised where the view asks.
    ahead = _SourceAhead(_Options(InputError("ca.pem", "CA file not found")), ref)
    ahead.start()
    with pytest.raises(InputError, match="CA file"):
        ahead.get()
