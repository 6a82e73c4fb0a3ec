"""docker save archives as a source: manifest.json and legacy layouts, digests, odd archives."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imagefs.errors import DigestMismatch, InputError, NotFound
from stores.docker_archive import DockerArchiveSource
from stores.manifest import resolve
from stores.model import Platform
from stores.reference import DockerArchiveReference, parse_reference
from stores.sources import open_source
from tests.conftest import requires_skopeo
from tests.support.images import Member, OciLayout, docker_save_archive, layer_tar

AMD64 = Platform("linux", "amd64")
PLAIN = "application/vnd.oci.image.layer.v1.tar"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def diff_id(layer: bytes) -> str:
    return sha(gzip.decompress(layer) if layer[:2] == b"\x1f\x8b" else layer)


def small_layer(path: str, text: str) -> bytes:
    return layer_tar([Member(path, data=text.encode())])


@dataclass
class SavedImage:
    repo_tag: str
    layers: list[bytes]
    config: dict = field(default_factory=dict)  # the runtime part ("Cmd", "Env", ...)


def write_archive(out: Path, images: list[SavedImage], *, manifest_json: bool = True,
                  link_duplicates: bool = False, compress: bool = False) -> None:
    """A docker save archive written member by member: manifest.json and/or the legacy
    repositories + <id>/json chain. *link_duplicates*: repeated layers become symlinks, as docker
    writes them."""
    members: dict[str, tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]] = {}

    def add(name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime = len(data), 1_700_000_000
        members[name] = (info, data)

    manifest, repositories = [], {}
    for image in images:
        parent, paths, by_digest = "", [], {}
        for i, layer in enumerate(image.layers):
            layer_id = hashlib.sha256(f"{parent}:{sha(layer)}:{image.repo_tag}".encode()).hexdigest()
            is_top = i == len(image.layers) - 1
            v1 = {"id": layer_id, "created": "2023-11-14T22:13:20Z", "os": "linux", "architecture": "amd64"}
            if parent:
                v1["parent"] = parent
            if is_top:
                v1["config"] = image.config
            add(f"{layer_id}/json", json.dumps(v1).encode())
            add(f"{layer_id}/VERSION", b"1.0")
            if link_duplicates and sha(layer) in by_digest:
                link = tarfile.TarInfo(f"{layer_id}/layer.tar")
                link.type, link.linkname = tarfile.SYMTYPE, f"../{by_digest[sha(layer)]}/layer.tar"
                members[link.name] = link
            else:
                add(f"{layer_id}/layer.tar", layer)
                by_digest[sha(layer)] = layer_id
            paths.append(f"{layer_id}/layer.tar")
            parent = layer_id
        config = json.dumps({"architecture": "amd64", "os": "linux", "config": image.config,
                             "rootfs": {"type": "layers", "diff_ids": [diff_id(x) for x in image.layers]}}).encode()
        add(f"{sha(config)[7:]}.json", config)
        manifest.append({"Config": f"{sha(config)[7:]}.json", "RepoTags": [image.repo_tag], "Layers": paths})
        repo, _, tag = image.repo_tag.rpartition(":")
        repositories.setdefault(repo, {})[tag] = parent
    if manifest_json:
        add("manifest.json", json.dumps(manifest).encode())
    add("repositories", json.dumps(repositories).encode())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for member in members.values():
            if isinstance(member, tuple):
                tar.addfile(member[0], io.BytesIO(member[1]))
            else:
                tar.addfile(member)
    out.write_bytes(gzip.compress(buf.getvalue(), mtime=0) if compress else buf.getvalue())


@pytest.fixture
def saved(busybox_layout: OciLayout, tmp_path: Path) -> Path:
    """busybox saved as docker does (manifest.json + repositories), via the shared builder."""
    desc = json.loads((busybox_layout.path / "index.json").read_text())["manifests"][0]
    out = tmp_path / "busybox.tar"
    docker_save_archive(busybox_layout, desc, out, "busybox:latest")
    return out


TWO = [SavedImage("alpha:1", [small_layer("a", "1"), small_layer("b", "2")], {"Cmd": ["/bin/alpha"]}),
       SavedImage("beta:2", [small_layer("c", "3")], {"Cmd": ["/bin/beta"], "Env": ["B=2"]})]


def test_saved_busybox_layers_are_the_uncompressed_layer_tars(saved: Path, busybox_layout: OciLayout) -> None:
    with open_source(parse_reference(f"docker-archive:{saved}")) as src:
        image = resolve(src, AMD64)
        layer = image.layers[0]
        data = b"".join(src.open_blob(layer.digest, layer.size))
    with tarfile.open(saved) as tar:
        layer_member = next(m for m in tar.getnames() if m.endswith("layer.tar"))
        member_bytes = tar.extractfile(layer_member).read()  # type: ignore[union-attr]
    assert data == member_bytes and layer.digest == sha(member_bytes)
    assert layer.media_type == PLAIN and layer.compression == "none"
    # The config is the archive's file as-is: the layout's own config blob.
    manifest = json.loads(busybox_layout.blob_path(
        json.loads((busybox_layout.path / "index.json").read_text())["manifests"][0]["digest"]).read_bytes())
    assert image.config_digest == manifest["config"]["digest"]
    assert json.loads(image.config)["rootfs"]["diff_ids"] == [layer.digest]
    assert image.runtime.cmd == ("/bin/sh",)


def test_synthesised_manifest_is_deterministic(saved: Path) -> None:
    with DockerArchiveSource(DockerArchiveReference(str(saved))) as a, \
            DockerArchiveSource(DockerArchiveReference(str(saved), "busybox:latest")) as b:
        assert a.root_manifest() == b.root_manifest()
        assert a.root_manifest().digest == sha(a.root_manifest().data)


def test_read_range_reads_inside_the_archive(saved: Path) -> None:
    with DockerArchiveSource(DockerArchiveReference(str(saved))) as src:
        layer = resolve(src, AMD64).layers[0]
        whole = b"".join(src.open_blob(layer.digest, layer.size))
        assert src.read_range(layer.digest, 512, 3000) == whole[512:3512]
        assert src.read_range(layer.digest, layer.size - 10, 10) == whole[-10:]
        with pytest.raises(InputError, match="outside the blob"):
            src.read_range(layer.digest, layer.size - 10, 11)
        with pytest.raises(NotFound):
            src.read_range("sha256:" + "0" * 64, 0, 1)


def test_multi_image_archive_by_name(tmp_path: Path) -> None:
    out = tmp_path / "two.tar"
    write_archive(out, TWO)
    with pytest.raises(InputError) as e:
        DockerArchiveSource(DockerArchiveReference(str(out)))
    assert "alpha:1" in e.value.why and "beta:2" in e.value.why
    with DockerArchiveSource(DockerArchiveReference(str(out), "beta:2")) as src:
        image = resolve(src, AMD64)
    assert [layer.digest for layer in image.layers] == [sha(x) for x in TWO[1].layers]
    assert image.runtime.cmd == ("/bin/beta",) and image.runtime.env == ("B=2",)
    with DockerArchiveSource(DockerArchiveReference(str(out), "@0")) as src:  # skopeo's index form
        assert [layer.digest for layer in resolve(src, AMD64).layers] == [sha(x) for x in TWO[0].layers]
    with pytest.raises(NotFound, match="'gamma:3'"):
        DockerArchiveSource(DockerArchiveReference(str(out), "gamma:3"))


def test_reference_with_repo_and_tag_parses_to_a_name(tmp_path: Path) -> None:
    out = tmp_path / "two.tar"
    write_archive(out, TWO)
    with open_source(parse_reference(f"docker-archive:{out}:alpha:1")) as src:
        assert [layer.digest for layer in resolve(src, AMD64).layers] == [sha(x) for x in TWO[0].layers]


def test_legacy_archive_without_manifest_json(tmp_path: Path) -> None:
    out = tmp_path / "legacy.tar"
    write_archive(out, TWO, manifest_json=False)
    with DockerArchiveSource(DockerArchiveReference(str(out), "alpha:1")) as src:
        image = resolve(src, AMD64)
        assert [layer.digest for layer in image.layers] == [sha(x) for x in TWO[0].layers]  # bottom first
        config = json.loads(b"".join(src.open_blob(image.config_digest, len(image.config))))
    assert config["rootfs"] == {"type": "layers", "diff_ids": [sha(x) for x in TWO[0].layers]}
    assert image.runtime.cmd == ("/bin/alpha",) and image.runtime.architecture == "amd64"
    with pytest.raises(InputError, match="2 tags"):
        DockerArchiveSource(DockerArchiveReference(str(out)))


def test_duplicate_layers_saved_as_symlinks(tmp_path: Path) -> None:
    same = small_layer("same", "x")
    out = tmp_path / "dup.tar"
    write_archive(out, [SavedImage("dup:1", [same, small_layer("mid", "y"), same])], link_duplicates=True)
    with tarfile.open(out) as tar:
        assert any(m.issym() for m in tar.getmembers())
    for manifest_json in (True, False):
        write_archive(out, [SavedImage("dup:1", [same, small_layer("mid", "y"), same])],
                      link_duplicates=True, manifest_json=manifest_json)
        with DockerArchiveSource(DockerArchiveReference(str(out))) as src:
            layers = resolve(src, AMD64).layers
            assert [layer.digest for layer in layers] == [sha(same), sha(small_layer("mid", "y")), sha(same)]
            assert src.read_range(layers[2].digest, 0, len(same)) == same


def test_gzip_compressed_archive_reads_like_the_plain_one(tmp_path: Path) -> None:
    plain, packed = tmp_path / "plain.tar", tmp_path / "packed.tar.gz"
    write_archive(plain, TWO[:1])
    write_archive(packed, TWO[:1], compress=True)
    cache = tmp_path / "cache"
    with DockerArchiveSource(DockerArchiveReference(str(plain))) as a:
        expected = resolve(a, AMD64)
    src = DockerArchiveSource(DockerArchiveReference(str(packed)), cache_dir=cache)
    with src:
        got = resolve(src, AMD64)
        assert src.read_range(got.layers[1].digest, 0, 100) == TWO[0].layers[1][:100]
        assert len(list(cache.iterdir())) == 1  # the decompressed copy, served in place
    assert got.manifest_digest == expected.manifest_digest
    assert list(cache.iterdir()) == []  # close() removed it


def test_gzip_layer_inside_an_archive_is_detected(tmp_path: Path) -> None:
    packed = gzip.compress(small_layer("z", "zz"), mtime=0)
    out = tmp_path / "z.tar"
    write_archive(out, [SavedImage("z:latest", [packed])])
    with DockerArchiveSource(DockerArchiveReference(str(out))) as src:
        (layer,) = resolve(src, AMD64).layers
    assert layer.compression == "gzip" and layer.digest == sha(packed)
    assert layer.media_type == PLAIN + "+gzip"
    # A legacy archive needs the diff_id for its synthesised config; docker never packed those.
    write_archive(out, [SavedImage("z:latest", [packed])], manifest_json=False)
    with pytest.raises(InputError, match="gzip-compressed legacy layers are not supported"):
        DockerArchiveSource(DockerArchiveReference(str(out)))


def test_layer_not_matching_the_config_is_a_digest_mismatch(tmp_path: Path) -> None:
    out = tmp_path / "bad.tar"
    write_archive(out, TWO[:1])
    data = out.read_bytes()
    good = TWO[0].layers[0]
    out.write_bytes(data.replace(good[512:520], b"XXXXXXXX", 1))
    with pytest.raises(DigestMismatch) as e:
        DockerArchiveSource(DockerArchiveReference(str(out)))
    assert e.value.expected == sha(good) and "layer.tar" in e.value.what


@pytest.mark.parametrize("keep", [0.3, 0.7, 0.99])
def test_truncated_archive_is_a_clear_error(saved: Path, tmp_path: Path, keep: float) -> None:
    cut = tmp_path / "cut.tar"
    data = saved.read_bytes()
    cut.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(InputError, match="truncated"):
        DockerArchiveSource(DockerArchiveReference(str(cut)))


def test_not_an_archive(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"hello" * 1000)
    with pytest.raises(InputError, match="not a readable tar archive"):
        DockerArchiveSource(DockerArchiveReference(str(junk)))
    with pytest.raises(NotFound, match="no archive file"):
        DockerArchiveSource(DockerArchiveReference(str(tmp_path / "absent.tar")))
    other = tmp_path / "other.tar"
    other.write_bytes(layer_tar([Member("hello", data=b"hi")]))
    with pytest.raises(InputError, match="not a docker save archive"):
        DockerArchiveSource(DockerArchiveReference(str(other)))


@requires_skopeo
def test_skopeo_agrees_on_digests(saved: Path, tmp_path: Path) -> None:
    with DockerArchiveSource(DockerArchiveReference(str(saved))) as src:
        image = resolve(src, AMD64)
    raw = subprocess.run(["skopeo", "inspect", "--raw", f"docker-archive:{saved}"],
                         check=True, capture_output=True, timeout=60).stdout
    theirs = json.loads(raw)
    assert [d["digest"] for d in theirs["layers"]] == [layer.digest for layer in image.layers]
    assert theirs["config"]["digest"] == image.config_digest
    # And what skopeo copies out of the archive is the same content (it gzips it on the way).
    dest = tmp_path / "oci"
    subprocess.run(["skopeo", "copy", "--quiet", f"docker-archive:{saved}", f"oci:{dest}:x"],
                   check=True, capture_output=True, timeout=120)
    index = json.loads((dest / "index.json").read_text())
    manifest = json.loads((dest / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_bytes())
    copied = [(dest / "blobs/sha256" / d["digest"][7:]).read_bytes() for d in manifest["layers"]]
    unpacked = [gzip.decompress(b) if d["mediaType"].endswith("gzip") else b
                for b, d in zip(copied, manifest["layers"])]
    assert [sha(b) for b in unpacked] == [layer.digest for layer in image.layers]
