"""Appc images by simple discovery: the Mesos example, dependencies, HTTP, and refusals."""

from __future__ import annotations

import bz2
import hashlib
import json
import lzma
import os
from pathlib import Path

import pytest

from imagefs.errors import InputError, NotFound
from stores.appc import AppcSource, discovery_location
from stores.manifest import host_platform, resolve
from stores.model import APPC_ACI_GZIP, APPC_ACI_TAR, APPC_ROOT
from stores.reference import AppcReference, parse_reference
from stores.sources import open_source
from tests.support.aci import aci_bytes, aci_manifest, publish, serve_directory
from tests.support.images import Member, busybox_members, layer_tar

SEED = "acme.biz/appc/ubuntu1510"
ARCH = host_platform().architecture


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def files(*names: str) -> list[Member]:
    return [Member("etc", "dir")] + [Member(f"etc/{n}", data=n.encode()) for n in names]


@pytest.fixture
def acis(tmp_path: Path) -> Path:
    root = tmp_path / "acis"
    root.mkdir()
    return root


@pytest.fixture
def seed_aci(acis: Path) -> Path:
    """The image of the Mesos talk, with a busybox rootfs."""
    if not os.path.exists("/bin/busybox"):
        pytest.skip("needs busybox-static")
    manifest = aci_manifest(SEED, {"version": "0.0.1", "os": "linux", "arch": ARCH},
                            exec_=["/bin/sh", "-c", "echo hi"], user="0", group="0",
                            env={"PATH": "/bin", "GREETING": "hi"}, workdir="/tmp")
    return publish(acis, manifest, busybox_members())


def test_seed_example_is_found_by_simple_discovery(acis: Path, seed_aci: Path) -> None:
    assert seed_aci == acis / f"acme.biz/appc/ubuntu1510-0.0.1-linux-{ARCH}.aci"
    ref = parse_reference(f"appc:{SEED},version=0.0.1")
    with open_source(ref, appc_discovery=str(acis)) as src:
        image = resolve(src)
        (layer,) = image.layers
        data = seed_aci.read_bytes()
        assert layer.digest == sha(data) and layer.size == len(data)
        assert layer.media_type == APPC_ACI_GZIP and layer.compression == "gzip" and layer.root == APPC_ROOT
        assert src.read_range(layer.digest, 100, 1000) == data[100:1100]
        assert b"".join(src.open_blob(layer.digest, layer.size)) == data
    rt = image.runtime
    assert rt.entrypoint == ("/bin/sh", "-c", "echo hi") and rt.cmd == ()
    assert set(rt.env) == {"PATH=/bin", "GREETING=hi"}
    assert rt.workdir == "/tmp" and rt.user == "0:0"
    assert rt.labels["version"] == "0.0.1" and rt.os == "linux" and rt.architecture == ARCH


def test_discovery_location_follows_mesos_and_the_spec() -> None:
    labels = {"version": "0.0.1", "os": "linux", "arch": "amd64"}
    assert discovery_location("/var/lib/acis/", SEED, labels) == "/var/lib/acis/acme.biz/appc/ubuntu1510-0.0.1-linux-amd64.aci"
    assert discovery_location("/var/lib/acis", SEED, labels) == "/var/lib/acis/acme.biz/appc/ubuntu1510-0.0.1-linux-amd64.aci"
    # prefix "https://" is the spec's simple discovery template itself
    assert discovery_location("https://", SEED, labels) == "https://acme.biz/appc/ubuntu1510-0.0.1-linux-amd64.aci"
    assert discovery_location("http://h:8080/acis", "x", {}) == f"http://h:8080/acis/x-latest-linux-{ARCH}.aci"


def test_default_labels_find_latest(acis: Path) -> None:
    path = publish(acis, aci_manifest("example.com/tool", {"version": "1.2"}, exec_=["/bin/tool"]),
                   files("tool"), file_name=f"example.com/tool-latest-linux-{ARCH}.aci")
    with AppcSource(AppcReference("example.com/tool"), str(acis)) as src:
        assert [layer.digest for layer in resolve(src).layers] == [sha(path.read_bytes())]


def test_plain_tar_aci(acis: Path) -> None:
    path = publish(acis, aci_manifest("example.com/plain", exec_=["/bin/true"]), files("a"), compression="none")
    with AppcSource(AppcReference("example.com/plain"), str(acis)) as src:
        (layer,) = resolve(src).layers
    assert layer.media_type == APPC_ACI_TAR and layer.compression == "none" and layer.digest == sha(path.read_bytes())


def test_dependencies_are_lower_layers_in_order(acis: Path) -> None:
    base = publish(acis, aci_manifest("example.com/base", {"version": "1"}), files("base"))
    certs = publish(acis, aci_manifest("example.com/certs", {"version": "2"},
                                       dependencies=[{"imageName": "example.com/base", "labels": {"version": "1"}}]),
                    files("certs"))
    tools = publish(acis, aci_manifest("example.com/tools"), files("tools"), compression="none")
    app = publish(acis, aci_manifest("example.com/app", {"version": "3"}, exec_=["/bin/app"],
                                     dependencies=[{"imageName": "example.com/certs", "labels": {"version": "2"}},
                                                   {"imageName": "example.com/tools"},
                                                   {"imageName": "example.com/base", "labels": {"version": "1"}}]),
                  files("app"))
    with AppcSource(AppcReference("example.com/app", {"version": "3"}), str(acis)) as src:
        image = resolve(src)
    # base (under certs), certs, tools, then the image; base reached twice is laid down once.
    assert [layer.digest for layer in image.layers] == [sha(p.read_bytes()) for p in (base, certs, tools, app)]
    assert [layer.media_type for layer in image.layers] == [APPC_ACI_GZIP, APPC_ACI_GZIP, APPC_ACI_TAR, APPC_ACI_GZIP]
    assert image.runtime.entrypoint == ("/bin/app",)  # the image's app, not a dependency's
    assert len(json.loads(image.config)["rootfs"]["diff_ids"]) == 4


def test_dependency_chain_gives_base_then_image(acis: Path, seed_aci: Path) -> None:
    app = publish(acis, aci_manifest("acme.biz/appc/hello", {"version": "1"}, exec_=["/bin/echo", "hello"],
                                     dependencies=[{"imageName": SEED, "labels": {"version": "0.0.1"}}]),
                  files("hello"))
    with AppcSource(AppcReference("acme.biz/appc/hello", {"version": "1"}), str(acis)) as src:
        image = resolve(src)
    assert [layer.digest for layer in image.layers] == [sha(seed_aci.read_bytes()), sha(app.read_bytes())]


def test_dependency_cycle_is_a_clear_error(acis: Path) -> None:
    publish(acis, aci_manifest("example.com/a", dependencies=[{"imageName": "example.com/b"}]), files("a"))
    publish(acis, aci_manifest("example.com/b", dependencies=[{"imageName": "example.com/a"}]), files("b"))
    with pytest.raises(InputError) as e:
        AppcSource(AppcReference("example.com/a"), str(acis))
    assert "dependency cycle" in e.value.why
    assert e.value.why.count("example.com/a-latest") == 2 and "example.com/b-latest" in e.value.why


def test_dependency_image_id_is_checked(acis: Path) -> None:
    base = publish(acis, aci_manifest("example.com/base"), files("base"), compression="none")
    image_id = "sha512-" + hashlib.sha512(base.read_bytes()).hexdigest()
    publish(acis, aci_manifest("example.com/good", dependencies=[{"imageName": "example.com/base", "imageID": image_id}]), files("g"))
    publish(acis, aci_manifest("example.com/bad", dependencies=[{"imageName": "example.com/base", "imageID": "sha512-" + "0" * 128}]), files("b"))
    with AppcSource(AppcReference("example.com/good"), str(acis)) as src:
        assert len(resolve(src).layers) == 2
    with pytest.raises(InputError, match="image ID mismatch"):
        AppcSource(AppcReference("example.com/bad"), str(acis))


def test_missing_aci_is_not_found_naming_the_file(acis: Path) -> None:
    with pytest.raises(NotFound) as e:
        AppcSource(AppcReference("example.com/nothing", {"version": "9"}), str(acis))
    assert str(acis / f"example.com/nothing-9-linux-{ARCH}.aci") in e.value.why


def test_missing_dependency_is_not_found_naming_it(acis: Path) -> None:
    publish(acis, aci_manifest("example.com/app", dependencies=[{"imageName": "example.com/gone"}]), files("a"))
    with pytest.raises(NotFound) as e:
        AppcSource(AppcReference("example.com/app"), str(acis))
    assert "example.com/gone" in e.value.what and f"example.com/gone-latest-linux-{ARCH}.aci" in e.value.why


def test_name_mismatch_is_refused(acis: Path) -> None:
    publish(acis, aci_manifest("example.com/other"), files("x"), file_name=f"example.com/wanted-latest-linux-{ARCH}.aci")
    with pytest.raises(InputError, match="names image 'example.com/other', not 'example.com/wanted'"):
        AppcSource(AppcReference("example.com/wanted"), str(acis))


def test_label_asked_for_must_match_the_manifest(acis: Path) -> None:
    publish(acis, aci_manifest("example.com/v", {"version": "1"}), files("x"), file_name=f"example.com/v-2-linux-{ARCH}.aci")
    with pytest.raises(InputError, match="label version='2' asked for, manifest has '1'"):
        AppcSource(AppcReference("example.com/v", {"version": "2"}), str(acis))


def test_path_whitelist_is_refused(acis: Path) -> None:
    publish(acis, aci_manifest("example.com/wl", pathWhitelist=["/etc/a"]), files("a"))
    with pytest.raises(InputError, match="pathWhitelist is not supported"):
        AppcSource(AppcReference("example.com/wl"), str(acis))
    publish(acis, aci_manifest("example.com/empty-wl", pathWhitelist=[]), files("a"))  # empty = absent
    with AppcSource(AppcReference("example.com/empty-wl"), str(acis)) as src:
        assert len(resolve(src).layers) == 1


@pytest.mark.parametrize("kind", ["xz", "bzip2"])
def test_xz_and_bzip2_acis_are_refused(acis: Path, kind: str) -> None:
    tar = aci_bytes(aci_manifest("example.com/packed"), files("a"), compression="none")
    path = acis / f"example.com/packed-latest-linux-{ARCH}.aci"
    path.parent.mkdir(parents=True)
    path.write_bytes(lzma.compress(tar) if kind == "xz" else bz2.compress(tar))
    with pytest.raises(InputError, match=f"{kind}-compressed ACIs are not supported"):
        AppcSource(AppcReference("example.com/packed"), str(acis))


def test_broken_acis_are_refused(acis: Path) -> None:
    path = publish(acis, aci_manifest("example.com/cut"), files("a", "b", "c"), compression="none")
    path.write_bytes(path.read_bytes()[:1600])
    with pytest.raises(InputError, match="truncated"):
        AppcSource(AppcReference("example.com/cut"), str(acis))
    path = publish(acis, aci_manifest("example.com/cutgz"), files("a", "b", "c"))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(InputError, match="not a readable ACI"):
        AppcSource(AppcReference("example.com/cutgz"), str(acis))
    path = publish(acis, aci_manifest("example.com/kind", acKind="PodManifest"), files("a"))
    with pytest.raises(InputError, match="acKind"):
        AppcSource(AppcReference("example.com/kind"), str(acis))


def test_files_outside_rootfs_are_refused(acis: Path) -> None:
    manifest = aci_manifest("example.com/stray")
    tar = layer_tar([Member("manifest", data=json.dumps(manifest).encode()), Member("rootfs", "dir"),
                     Member("stray", data=b"x")])
    path = acis / f"example.com/stray-latest-linux-{ARCH}.aci"
    path.parent.mkdir(parents=True)
    path.write_bytes(tar)
    with pytest.raises(InputError, match="'stray' outside rootfs/"):
        AppcSource(AppcReference("example.com/stray"), str(acis))


def test_http_discovery(acis: Path, seed_aci: Path, tmp_path: Path) -> None:
    publish(acis, aci_manifest("acme.biz/appc/app", {"version": "1"}, exec_=["/bin/sh"],
                               dependencies=[{"imageName": SEED, "labels": {"version": "0.0.1"}}]), files("app"))
    cache = tmp_path / "cache"
    with serve_directory(acis) as url:
        with open_source(parse_reference("appc:acme.biz/appc/app,version=1"), appc_discovery=url + "/",
                         cache_dir=cache) as src:
            image = resolve(src)
            base = image.layers[0]
            assert src.read_range(base.digest, 0, 4096) == seed_aci.read_bytes()[:4096]
        with pytest.raises(NotFound) as e:
            AppcSource(AppcReference("acme.biz/appc/absent"), url)
        assert f"{url}/acme.biz/appc/absent-latest-linux-{ARCH}.aci" in e.value.why
    assert base.digest == sha(seed_aci.read_bytes()) and len(image.layers) == 2
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"sha256-{layer.digest[7:]}.aci" for layer in image.layers)


def test_http_discovery_without_cache_dir_cleans_up(acis: Path, seed_aci: Path) -> None:
    with serve_directory(acis) as url:
        src = AppcSource(AppcReference(SEED, {"version": "0.0.1"}), url)
        (layer,) = resolve(src).layers
        cached = src.discovery.cache_dir
        assert cached is not None and len(os.listdir(cached)) == 1
        src.close()
    assert not os.path.exists(cached)
    assert layer.digest == sha(seed_aci.read_bytes())


def test_open_source_needs_a_discovery_prefix(tmp_path: Path) -> None:
    with pytest.raises(InputError) as e:
        open_source(AppcReference(SEED))
    assert e.value.line() == f"imagefs: appc:{SEED}: no --appc-discovery prefix given"
    with pytest.raises(NotFound, match="no such directory"):
        open_source(AppcReference(SEED), appc_discovery=str(tmp_path / "absent"))
    with pytest.raises(InputError, match="directory or an http"):
        open_source(AppcReference(SEED), appc_discovery="hdfs://namenode/acis")
