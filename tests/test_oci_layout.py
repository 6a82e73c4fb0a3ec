"""OCI image layouts as a source: tag selection, nested indexes, verification, skopeo's layouts."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from imagefs.errors import DigestMismatch, InputError, NotFound
from stores.manifest import resolve
from stores.model import Platform
from stores.oci_layout import OciLayoutSource
from stores.reference import OciReference, parse_reference
from stores.sources import open_source
from tests.conftest import requires_skopeo
from tests.support.images import OciLayout, layer_tar, Member

AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64")


def small_layer(text: str) -> bytes:
    return layer_tar([Member("etc", "dir"), Member("etc/hello", data=text.encode())])


@pytest.fixture
def layout_copy(busybox_layout: OciLayout, tmp_path: Path) -> OciLayout:
    """A private copy of the busybox layout, for tests that damage it."""
    shutil.copytree(busybox_layout.path, tmp_path / "copy")
    return OciLayout(tmp_path / "copy")


def index_of(layout: OciLayout) -> dict:
    return json.loads((layout.path / "index.json").read_text())


def test_by_tag_resolves_the_tagged_image(busybox_layout: OciLayout) -> None:
    with open_source(parse_reference(f"oci:{busybox_layout.path}:busybox")) as src:
        image = resolve(src, AMD64)
    entry = index_of(busybox_layout)["manifests"][0]
    assert image.manifest_digest == entry["digest"]
    manifest = json.loads(busybox_layout.blob_path(entry["digest"]).read_bytes())
    assert [layer.digest for layer in image.layers] == [d["digest"] for d in manifest["layers"]]
    assert image.layers[0].compression == "gzip" and image.layers[0].root == ""
    assert image.runtime.cmd == ("/bin/sh",) and image.runtime.env == ("PATH=/bin",)


def test_untagged_reference_takes_the_only_image(tmp_path: Path) -> None:
    layout = OciLayout(tmp_path / "one")
    desc = layout.add_image([(small_layer("one"), "none")])
    (layout.path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    with OciLayoutSource(OciReference(str(layout.path))) as src:
        assert resolve(src, AMD64).manifest_digest == desc["digest"]


def test_untagged_reference_to_several_images_lists_the_tags(tmp_path: Path) -> None:
    layout = OciLayout(tmp_path / "two")
    layout.add_image([(small_layer("a"), "none")], tag="alpha")
    layout.add_image([(small_layer("b"), "none")], tag="beta")
    with pytest.raises(InputError) as e:
        OciLayoutSource(OciReference(str(layout.path)))
    assert "alpha" in e.value.why and "beta" in e.value.why and str(layout.path) in e.value.what


def test_missing_tag_is_not_found_and_lists_the_tags(busybox_layout: OciLayout) -> None:
    with pytest.raises(NotFound) as e:
        OciLayoutSource(OciReference(str(busybox_layout.path), "nosuchtag"))
    assert "'nosuchtag'" in e.value.why and "busybox" in e.value.why


def test_nested_index_chooses_the_platform(tmp_path: Path) -> None:
    layout = OciLayout(tmp_path / "multi")
    amd = layout.add_image([(small_layer("amd64"), "gzip")], arch="amd64")
    arm = layout.add_image([(small_layer("arm64"), "gzip")], arch="arm64")
    layout.add_index([amd, arm], tag="multi")
    with OciLayoutSource(OciReference(str(layout.path), "multi")) as src:
        assert resolve(src, ARM64).manifest_digest == arm["digest"]
        image = resolve(src, AMD64)
        assert image.manifest_digest == amd["digest"] and image.runtime.architecture == "amd64"
        with pytest.raises(NotFound, match="linux/s390x"):
            resolve(src, Platform("linux", "s390x"))


def test_one_tag_on_several_platform_entries_acts_as_an_index(tmp_path: Path) -> None:
    layout = OciLayout(tmp_path / "flat")
    amd = layout.add_image([(small_layer("amd64"), "none")], arch="amd64")
    arm = layout.add_image([(small_layer("arm64"), "none")], arch="arm64")
    tagged = [{**d, "annotations": {"org.opencontainers.image.ref.name": "v1"}} for d in (amd, arm)]
    (layout.path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": tagged}))
    with OciLayoutSource(OciReference(str(layout.path), "v1")) as src:
        assert resolve(src, ARM64).manifest_digest == arm["digest"]
        assert resolve(src, AMD64).manifest_digest == amd["digest"]


def test_missing_layout_is_not_found_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(NotFound) as e:
        OciLayoutSource(OciReference(str(tmp_path / "absent"), "x"))
    assert str(tmp_path / "absent") in e.value.why


def test_directory_without_oci_layout_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "index.json").write_text('{"manifests": []}')
    with pytest.raises(InputError, match="no oci-layout file"):
        OciLayoutSource(OciReference(str(tmp_path)))


def test_unsupported_layout_version_is_refused(layout_copy: OciLayout) -> None:
    (layout_copy.path / "oci-layout").write_text('{"imageLayoutVersion": "2.0.0"}')
    with pytest.raises(InputError, match="unsupported imageLayoutVersion '2.0.0'"):
        OciLayoutSource(OciReference(str(layout_copy.path), "busybox"))


def test_malformed_index_json(layout_copy: OciLayout) -> None:
    (layout_copy.path / "index.json").write_text('{"manifests": [')
    with pytest.raises(InputError) as e:
        OciLayoutSource(OciReference(str(layout_copy.path), "busybox"))
    assert "malformed JSON" in e.value.why and e.value.what.endswith("index.json")


def test_missing_manifest_blob_is_not_found_naming_the_digest(layout_copy: OciLayout) -> None:
    digest = index_of(layout_copy)["manifests"][0]["digest"]
    layout_copy.blob_path(digest).unlink()
    with pytest.raises(NotFound) as e:
        OciLayoutSource(OciReference(str(layout_copy.path), "busybox"))
    assert digest in e.value.what


def test_missing_layer_blob_is_not_found_when_read(layout_copy: OciLayout) -> None:
    with OciLayoutSource(OciReference(str(layout_copy.path), "busybox")) as src:
        layer = resolve(src, AMD64).layers[0]
        layout_copy.blob_path(layer.digest).unlink()
        with pytest.raises(NotFound) as e:
            src.read_range(layer.digest, 0, 10)
        assert layer.digest in e.value.what
        with pytest.raises(NotFound):
            src.open_blob(layer.digest, layer.size)


def test_corrupted_manifest_is_a_digest_mismatch(layout_copy: OciLayout) -> None:
    digest = index_of(layout_copy)["manifests"][0]["digest"]
    path = layout_copy.blob_path(digest)
    path.write_bytes(path.read_bytes().replace(b"schemaVersion", b"schemaversion"))
    with OciLayoutSource(OciReference(str(layout_copy.path), "busybox")) as src:
        with pytest.raises(DigestMismatch) as e:
            resolve(src, AMD64)
    assert e.value.expected == digest


def test_corrupted_config_is_a_digest_mismatch(layout_copy: OciLayout) -> None:
    manifest = json.loads(layout_copy.blob_path(index_of(layout_copy)["manifests"][0]["digest"]).read_bytes())
    config = layout_copy.blob_path(manifest["config"]["digest"])
    config.write_bytes(config.read_bytes().replace(b"/bin/sh", b"/bin/xx"))
    with OciLayoutSource(OciReference(str(layout_copy.path), "busybox")) as src:
        with pytest.raises(DigestMismatch) as e:
            resolve(src, AMD64)
    assert e.value.expected == manifest["config"]["digest"] and "config" in e.value.what


def test_read_range_and_open_blob_return_exact_bytes(busybox_layout: OciLayout) -> None:
    with OciLayoutSource(OciReference(str(busybox_layout.path), "busybox")) as src:
        layer = resolve(src, AMD64).layers[0]
        data = busybox_layout.blob_path(layer.digest).read_bytes()
        assert src.read_range(layer.digest, 0, 1) == data[:1]
        assert src.read_range(layer.digest, 1000, 4096) == data[1000:5096]
        assert src.read_range(layer.digest, len(data) - 7, 7) == data[-7:]
        assert b"".join(src.open_blob(layer.digest, layer.size)) == data
        assert b"".join(src.open_blob(layer.digest, layer.size, 12345)) == data[12345:]
        with pytest.raises(InputError, match="outside the blob"):
            src.read_range(layer.digest, len(data) - 7, 8)
        # The lazy path reads from many threads at once: every read must get its own bytes.
        starts = list(range(0, len(data) - 5000, 9973))
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda s: src.read_range(layer.digest, s, 5000), starts))
        assert got == [data[s:s + 5000] for s in starts]


@requires_skopeo
def test_layout_written_by_skopeo(busybox_layout: OciLayout, tmp_path: Path) -> None:
    dest = tmp_path / "skopeo"
    subprocess.run(["skopeo", "copy", "--quiet", f"oci:{busybox_layout.path}:busybox", f"oci:{dest}:x"],
                   check=True, capture_output=True, timeout=120)
    with OciLayoutSource(OciReference(str(busybox_layout.path), "busybox")) as src:
        original = resolve(src, AMD64)
    with open_source(parse_reference(f"oci:{dest}:x")) as src:
        copied = resolve(src, AMD64)
        assert [layer.digest for layer in copied.layers] == [layer.digest for layer in original.layers]
        assert copied.config_digest == original.config_digest
        layer = copied.layers[0]
        tar = gzip.decompress(b"".join(src.open_blob(layer.digest, layer.size)))
    assert "sha256:" + hashlib.sha256(tar).hexdigest() == json.loads(copied.config)["rootfs"]["diff_ids"][0]
