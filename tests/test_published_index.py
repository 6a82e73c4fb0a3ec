"""Published layer indexes end to end, against the real registry (distribution 2.8: no referrers
API, so the `sha256-<hex>` tag schema): `imagefs index --push` and `pull --push-index` publish, and
fresh stores pull and mount through a counting `HttpFront` without fetching a layer whole; doctored
artifacts are refused, the referrers tag is read-modify-written, a (faked) referrers API is
preferred, and pushes go through basic and token auth. Access profiles travel in the artifact: a
profile recorded later re-publishes, pullers take the newest good one, and a bad one is a warning
that costs nothing else. Plus the artifact logic on its own."""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import random
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import httpx
import pytest

from imagefs.errors import InputError
from imagefs.index import LayerIndex, build_index
from imagefs.publish import (
    ANN_FORMAT,
    ANN_LAYER,
    ANN_META_DIGEST,
    ANN_META_SIZE,
    ANN_PROFILE_FORMAT,
    ARTIFACT_TYPE,
    EMPTY_DIGEST,
    EMPTY_MEDIA_TYPE,
    INDEX_MEDIA_TYPE,
    PROFILE_MEDIA_TYPE,
    PublishedProfile,
    build_artifact,
    index_blob,
    parse_artifact,
    profile_blob,
    verify_index,
    verify_profile,
)
from stores.model import Descriptor, Layer
from stores.reference import parse_reference
from stores.referrers import Referrer, add_referrer, fallback_tag, parse_referrers, push_referrer
from stores.registry import RegistrySource
from stores.store import MAX_PROFILE_BYTES, Store, encode_profile, parse_profile
from tests.conftest import requires_skopeo
from tests.mounts import Cli, Mounts, diff, needs_fuse, snapshot
from tests.support.images import Member, OciLayout, compress, layer_tar, push
from tests.support.registry import HttpFront, Registry, Reply, Seen, make_ca_and_cert, make_htpasswd
from tests.support.tokenserver import TokenServer

pytestmark = requires_skopeo

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
HELLO = b"hello from a published index\n"
RANDOM_SIZE = 12 << 20
USER, PASSWORD = "publisher", "pa55:word"
BAD_PROFILES = ("tampered", "oversized", "malformed")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


# -- images: one per test that publishes, so no test sees another's artifacts


@dataclass
class PushedImage:
    tag: str
    manifest: bytes
    layers: list[dict]  # the manifest's layer descriptors

    @property
    def digest(self) -> str:
        return sha(self.manifest)

    @property
    def layer_digests(self) -> list[str]:
        return [layer["digest"] for layer in self.layers]


def _small(marker: str) -> list[Member]:
    return [Member(marker, "dir"), Member(f"{marker}/id", data=f"{marker}\n".encode()),
            Member(f"{marker}/run", data=b"#!/bin/sh\necho run\n", mode=0o755),
            Member(f"{marker}/link", "symlink", linkname="run")]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, PushedImage]:
    """`lazy`: a layer of 12 MiB of random data then a small file, and a small second layer; the
    others are small two-layer images, each with its own layers."""
    layout = OciLayout(tmp_path_factory.mktemp("published") / "layout")
    big = [Member("data", "dir"), Member("data/random.bin", data=random.Random(11).randbytes(RANDOM_SIZE)),
           Member("etc", "dir"), Member("etc/hello.txt", data=HELLO)]
    specs = {"lazy": [big, _small("app")]}
    for name in ("doctored", "other", "rmw", "pushidx", "api", "apiempty", "auth", "profile", "profpush",
                 *(f"profbad-{case}" for case in BAD_PROFILES)):
        specs[name] = [_small(f"{name}-base"), _small(f"{name}-top")]
    out = {}
    for name, layers in specs.items():
        desc = layout.add_image([(layer_tar(members), "gzip") for members in layers], tag=name,
                                config={"Cmd": ["/bin/sh"]})
        manifest = layout.blob_path(desc["digest"]).read_bytes()
        out[name] = PushedImage(name, manifest, json.loads(manifest)["layers"])
    out["_layout"] = layout  # type: ignore[assignment]
    return out


@pytest.fixture(scope="module")
def pushed(images, registry) -> dict[str, PushedImage]:
    """Every image pushed to the session registry as pubidx/<name>:1."""
    layout = images["_layout"]
    for name in images:
        if not name.startswith("_") and name != "auth":
            push(layout.path, name, registry.ref(f"pubidx/{name}:1"))
    return images


# -- a front that counts what it serves


class CountingFront:
    """An `HttpFront` that forwards GETs to *upstream* and counts the body bytes served per path
    (query stripped). *fake* may answer a request itself (return a Reply) before forwarding."""

    def __init__(self, upstream: str, fake: Callable[[Seen], Reply | None] | None = None) -> None:
        self.upstream = upstream
        self.fake = fake
        self.served: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=30, trust_env=False, follow_redirects=False)
        self.front = HttpFront(hook=self._hook)

    def _hook(self, seen: Seen) -> Reply:
        reply = self.fake(seen) if self.fake else None
        if reply is None:
            headers = {k: v for k, v in seen.headers.items() if k not in ("host", "connection", "accept-encoding")}
            r = self._client.get(self.upstream + seen.path, headers=headers)
            keep = {k: v for k, v in r.headers.items()
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding")}
            reply = Reply(r.status_code, keep, r.content)
        with self._lock:
            self.served[seen.path.split("?", 1)[0]] += len(reply.body)
        return reply

    def ref(self, repo_tag: str) -> str:
        return f"docker://{self.front.host}/{repo_tag}"

    def blob_bytes(self, digest: str) -> int:
        with self._lock:
            return sum(n for path, n in self.served.items() if path.endswith(f"/blobs/{digest}"))

    def paths(self, contains: str) -> list[str]:
        return [s.path for s in self.front.requests(contains)]

    def __enter__(self) -> CountingFront:
        self.front.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.front.stop()
        self._client.close()


# -- pushing and reading by hand (plain registry, no auth): independent of the code under test


def raw_blob(base: str, repo: str, data: bytes) -> dict:
    with httpx.Client(trust_env=False) as c:
        r = c.post(f"{base}/v2/{repo}/blobs/uploads/")
        assert r.status_code == 202, r.text
        target = httpx.URL(f"{base}/v2/{repo}/blobs/uploads/").join(r.headers["location"])
        r = c.put(target.copy_merge_params({"digest": sha(data)}), content=data)
        assert r.status_code == 201, r.text
    return {"digest": sha(data), "size": len(data)}


def raw_put_manifest(base: str, repo: str, ref: str, data: bytes, media_type: str) -> None:
    r = httpx.put(f"{base}/v2/{repo}/manifests/{ref}", content=data, headers={"Content-Type": media_type},
                  trust_env=False)
    assert r.status_code == 201, r.text


def raw_get(base: str, repo: str, what: str, accept: str = f"{OCI_INDEX}, {OCI_MANIFEST}") -> bytes | None:
    r = httpx.get(f"{base}/v2/{repo}/{what}", headers={"Accept": accept}, trust_env=False)
    if r.status_code == 404:
        return None
    assert r.status_code == 200, r.text
    return r.content


def referrers_tag(base: str, repo: str, image: PushedImage) -> dict | None:
    data = raw_get(base, repo, f"manifests/sha256-{image.digest[7:]}", OCI_INDEX)
    return None if data is None else json.loads(data)


def our_artifacts(tag_index: dict | None) -> list[dict]:
    return [m for m in (tag_index or {}).get("manifests", []) if m.get("artifactType") == ARTIFACT_TYPE]


def hand_publish(base: str, repo: str, image: PushedImage, indexes: list[tuple[str, bytes]],
                 extra: list[dict] | None = None) -> str:
    """Publish an artifact for *image* by hand: *indexes* ((layer digest, index bytes), annotated as
    imagefs does) then the *extra* descriptors, as the only entry of the referrers tag; returns the
    artifact's digest. Whatever the code under test would refuse to build can be built here."""
    empty = raw_blob(base, repo, b"{}")
    layers = []
    for layer_digest, data in indexes:
        meta = LayerIndex.meta_length(data[:20])
        layers.append({"mediaType": INDEX_MEDIA_TYPE, **raw_blob(base, repo, data),
                       "annotations": {ANN_LAYER: layer_digest, ANN_META_SIZE: str(meta),
                                       ANN_META_DIGEST: sha(data[:meta])}})
    artifact = canonical({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": ARTIFACT_TYPE,
                          "config": {"mediaType": EMPTY_MEDIA_TYPE, **empty}, "layers": layers + (extra or []),
                          "subject": {"mediaType": OCI_MANIFEST, "digest": image.digest, "size": len(image.manifest)},
                          "annotations": {ANN_FORMAT: "1"}})
    raw_put_manifest(base, repo, sha(artifact), artifact, OCI_MANIFEST)
    tag = canonical({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": sha(artifact), "size": len(artifact), "artifactType": ARTIFACT_TYPE}]})
    raw_put_manifest(base, repo, f"sha256-{image.digest[7:]}", tag, OCI_INDEX)
    return sha(artifact)


@pytest.fixture
def new_cli(tmp_path) -> Iterator[Callable[[str], Cli]]:
    """Fresh stores on demand (each its own store and work dir)."""
    def make(name: str, **env: str) -> Cli:
        return Cli(tmp_path / name / "store", tmp_path / name / "work", env=dict(env))
    yield make


@pytest.fixture(scope="module")
def published(pushed, registry, tmp_path_factory) -> dict:
    """`imagefs index --push` of pubidx/lazy:1 from a store of its own (kept for comparisons)."""
    root = tmp_path_factory.mktemp("publisher")
    cli = Cli(root / "store", root / "work")
    r = cli.run("index", "--push", registry.ref("pubidx/lazy:1"))
    return {"cli": cli, "run": r, "image": pushed["lazy"]}


# -- 1. imagefs index --push, then a fresh store


def test_index_push_publishes_an_artifact_referring_to_the_image(published, registry):
    image, cli, r = published["image"], published["cli"], published["run"]
    assert r.stderr == ""
    assert "pushed sha256:" in r.stdout and f"tag sha256-{image.digest[7:]}" in r.stdout
    tag = referrers_tag(registry.url, "pubidx/lazy", image)
    ours = our_artifacts(tag)
    assert len(ours) == 1 and ours[0]["annotations"] == {ANN_FORMAT: "3"}
    manifest = raw_get(registry.url, "pubidx/lazy", f"manifests/{ours[0]['digest']}", OCI_MANIFEST)
    assert manifest is not None and sha(manifest) == ours[0]["digest"] and len(manifest) == ours[0]["size"]
    doc = json.loads(manifest)
    assert doc["mediaType"] == OCI_MANIFEST and doc["artifactType"] == ARTIFACT_TYPE
    assert doc["config"] == {"mediaType": EMPTY_MEDIA_TYPE, "digest": EMPTY_DIGEST, "size": 2}
    assert doc["subject"] == {"mediaType": OCI_MANIFEST, "digest": image.digest, "size": len(image.manifest)}
    assert [layer["annotations"][ANN_LAYER] for layer in doc["layers"]] == image.layer_digests
    indexes_total = 0
    for layer in doc["layers"]:
        assert layer["mediaType"] == INDEX_MEDIA_TYPE
        blob = raw_get(registry.url, "pubidx/lazy", f"blobs/{layer['digest']}", "*/*")
        local = (cli.store / "indexes" / layer["annotations"][ANN_LAYER][7:]).read_bytes()
        assert blob == local and sha(blob) == layer["digest"]
        meta = int(layer["annotations"][ANN_META_SIZE])
        assert meta == LayerIndex.meta_length(blob[:20]) and sha(blob[:meta]) == layer["annotations"][ANN_META_DIGEST]
        indexes_total += len(blob)
    # small beside what it saves: the layers of this image are 12 MiB of incompressible data
    assert indexes_total + len(manifest) < 0.05 * sum(layer["size"] for layer in image.layers)


def test_fresh_store_pulls_published_indexes_without_the_layers(published, registry, new_cli):
    image = published["image"]
    cli = new_cli("fresh")
    with CountingFront(registry.url) as front:
        r = cli.run("pull", front.ref("pubidx/lazy:1"))
        assert r.stderr == ""
        assert [front.blob_bytes(d) for d in image.layer_digests] == [0, 0]
        assert front.paths(f"/manifests/sha256-{image.digest[7:]}"), "the tag schema was not consulted"
    for digest in image.layer_digests:
        # Only the metadata part came over (the windows are range-read when a read needs one).
        meta = (cli.store / "indexes" / f"{digest[7:]}.meta").read_bytes()
        whole = (published["cli"].store / "indexes" / digest[7:]).read_bytes()
        assert len(meta) <= len(whole) and whole.startswith(meta)
        assert not (cli.store / "indexes" / digest[7:]).exists()
        remote = json.loads((cli.store / "indexes" / f"{digest[7:]}.remote.json").read_bytes())
        assert remote["size"] == len(whole) and remote["meta_size"] == len(meta)
    doc = json.loads(cli.run("inspect", "--json", front.ref("pubidx/lazy:1")).stdout)
    assert [(l["indexed"], l["index"], l["blob_local"]) for l in doc["layers"]] == [(True, "published", False)] * 2
    assert not list((cli.store / "tmp").glob("*.partial"))
    assert not (cli.store / "images" / image.digest[7:] / "profile.json").exists()  # none published


def test_published_indexes_are_looked_up_while_the_config_is_fetched(published, registry, new_cli):
    """The referrers lookup needs only the manifest: it is asked before the config has come (the
    config's answer here waits until it has been), a round trip sooner than after it."""
    image = published["image"]
    config = json.loads(image.manifest)["config"]["digest"]
    asked = threading.Event()
    answered_before: list[bool] = []

    def hold_config(seen: Seen) -> Reply | None:
        if f"/manifests/sha256-{image.digest[7:]}" in seen.path or "/referrers/" in seen.path:
            asked.set()
        elif seen.path.endswith(f"/blobs/{config}"):
            answered_before.append(asked.wait(10))   # a pull that asks only after the config: False
        return None

    cli = new_cli("early-lookup")
    with CountingFront(registry.url, hold_config) as front:
        cli.run("pull", front.ref("pubidx/lazy:1"))
        assert [front.blob_bytes(d) for d in image.layer_digests] == [0, 0]
    assert answered_before == [True]


@needs_fuse
def test_mount_from_published_indexes_reads_only_ranges(published, registry, new_cli, tmp_path):
    image = published["image"]
    cli = new_cli("mounter")
    mounts = Mounts(cli)
    reference = Mounts(published["cli"])
    # Background prefetch would fetch the whole image on purpose: this counts what reads fetch.
    quiet = ("--prefetch=none",)
    try:
        with CountingFront(registry.url) as front:
            try:
                mp = mounts.mount(front.ref("pubidx/lazy:1"), tmp_path / "mnt", *quiet)
                assert front.blob_bytes(image.layer_digests[0]) == 0, "the mount fetched layer data up front"
                assert (mp / "etc" / "hello.txt").read_bytes() == HELLO
                fetched, size = front.blob_bytes(image.layer_digests[0]), image.layers[0]["size"]
                assert 0 < fetched < size / 3, f"{fetched} of {size} bytes fetched for one small file"
                expected = snapshot(reference.mount(registry.ref("pubidx/lazy:1"), tmp_path / "ref-mnt", *quiet))
                problems = diff(expected, snapshot(mp))
                assert not problems, "\n".join(problems)
            finally:
                mounts.cleanup()  # before the front stops: the server may still be asking it
    finally:
        reference.cleanup()


@needs_fuse
def test_windows_are_range_read_checked_and_refetched(published, registry, new_cli, tmp_path):
    """A pull keeps only the metadata part of each published index; a read then range-reads the
    one window it restarts from. A window that does not match its digest in the metadata is never
    used (EIO), and the same read succeeds once the registry serves the right bytes."""
    image = published["image"]
    cli = new_cli("windows")
    mounts = Mounts(cli)
    corrupt = threading.Event()
    seen_windows: list[str] = []

    def tamper(seen: Seen) -> Reply | None:
        remote = cli.store / "indexes" / f"{image.layer_digests[0][7:]}.remote.json"
        if not remote.exists():
            return None
        blob = json.loads(remote.read_bytes())
        rng = seen.headers.get("range", "")
        if not seen.path.endswith(f"/blobs/{blob['digest']}") or not rng.startswith("bytes="):
            return None
        start, end = (int(x) for x in rng[6:].split("-"))
        if start < blob["meta_size"]:
            return None
        seen_windows.append(rng)
        whole = (published["cli"].store / "indexes" / image.layer_digests[0][7:]).read_bytes()
        body = whole[start:end + 1]
        if corrupt.is_set():
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        return Reply(206, {"Content-Type": "application/octet-stream",
                           "Content-Range": f"bytes {start}-{end}/{len(whole)}"}, body)

    try:
        with CountingFront(registry.url, tamper) as front:
            try:
                mp = mounts.mount(front.ref("pubidx/lazy:1"), tmp_path / "mnt", "--prefetch=none")
                assert not (cli.store / "indexes" / image.layer_digests[0][7:]).exists()
                corrupt.set()
                with pytest.raises(OSError) as e:
                    (mp / "etc" / "hello.txt").read_bytes()
                assert e.value.errno == errno.EIO and seen_windows, "a bad window was used"
                corrupt.clear()
                assert (mp / "etc" / "hello.txt").read_bytes() == HELLO
                whole = len((published["cli"].store / "indexes" / image.layer_digests[0][7:]).read_bytes())
                assert front.blob_bytes(json.loads((cli.store / "indexes" / f"{image.layer_digests[0][7:]}"
                                                    ".remote.json").read_bytes())["digest"]) < whole
            finally:
                mounts.cleanup()
    finally:
        mounts.cleanup()


# -- 2. what must not be trusted


def test_artifact_whose_index_names_another_layer_is_rejected(pushed, registry, new_cli):
    """An artifact for `doctored` whose first entry is annotated with doctored's first layer but
    holds the index of `other`'s first layer: refused with a warning naming the layer, which is
    then streamed and indexed as if nothing had been published; the second entry is fine."""
    victim, donor = pushed["doctored"], pushed["other"]
    builder = new_cli("builder")
    builder.run("pull", registry.ref("pubidx/other:1"))
    builder.run("pull", registry.ref("pubidx/doctored:1"))
    wrong = (builder.store / "indexes" / donor.layer_digests[0][7:]).read_bytes()
    right = (builder.store / "indexes" / victim.layer_digests[1][7:]).read_bytes()
    hand_publish(registry.url, "pubidx/doctored", victim,
                 [(victim.layer_digests[0], wrong), (victim.layer_digests[1], right)])

    cli = new_cli("victim")
    with CountingFront(registry.url) as front:
        r = cli.run("pull", front.ref("pubidx/doctored:1"))
        first, second = victim.layers
        assert front.blob_bytes(first["digest"]) == first["size"], "the doctored layer was not streamed"
        assert front.blob_bytes(second["digest"]) == 0, "the good index of the second layer was not used"
    warnings = r.stderr.strip().splitlines()
    assert len(warnings) == 1, r.stderr
    assert first["digest"] in warnings[0] and "rejected" in warnings[0]
    assert f"index is for layer {donor.layer_digests[0]}" in warnings[0]
    built = (cli.store / "indexes" / first["digest"][7:]).read_bytes()
    assert LayerIndex.from_bytes(built, first["digest"]).entries != LayerIndex.from_bytes(wrong, donor.layer_digests[0]).entries


# -- 3. the referrers tag and the referrers API


def test_push_keeps_the_other_referrers_in_the_tag(pushed, registry, new_cli):
    image, repo = pushed["rmw"], "pubidx/rmw"
    sbom = raw_blob(registry.url, repo, b'{"sbom": true}')
    empty = raw_blob(registry.url, repo, b"{}")
    other = canonical({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.sbom.v1",
                       "config": {"mediaType": EMPTY_MEDIA_TYPE, **empty},
                       "layers": [{"mediaType": "application/vnd.example.sbom.v1+json", **sbom}],
                       "subject": {"mediaType": OCI_MANIFEST, "digest": image.digest, "size": len(image.manifest)}})
    raw_put_manifest(registry.url, repo, sha(other), other, OCI_MANIFEST)
    other_entry = {"mediaType": OCI_MANIFEST, "digest": sha(other), "size": len(other),
                   "artifactType": "application/vnd.example.sbom.v1", "annotations": {"org.example.kept": "yes"}}
    before = canonical({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [other_entry]})
    raw_put_manifest(registry.url, repo, f"sha256-{image.digest[7:]}", before, OCI_INDEX)

    publisher = new_cli("publisher")
    publisher.run("index", "--push", registry.ref(f"{repo}:1"))
    after = referrers_tag(registry.url, repo, image)
    assert after is not None and after["manifests"][0] == other_entry
    assert len(after["manifests"]) == 2 and len(our_artifacts(after)) == 1
    publisher.run("index", "--push", registry.ref(f"{repo}:1"))  # again: nothing to change
    assert referrers_tag(registry.url, repo, image) == after

    cli = new_cli("consumer")
    with CountingFront(registry.url) as front:
        r = cli.run("pull", front.ref(f"{repo}:1"))
        assert r.stderr == ""
        assert [front.blob_bytes(d) for d in image.layer_digests] == [0, 0]
        assert not front.paths(sha(other)), "the other artifact was fetched"


@pytest.mark.parametrize("listed", [True, False], ids=["listed", "empty"])
def test_referrers_api_is_used_when_the_registry_has_it(pushed, registry, new_cli, listed):
    """A registry with the referrers API (faked by the front): its answer is the whole truth, the
    tag schema's is not used, even when the API lists nothing."""
    name = "api" if listed else "apiempty"
    image, repo = pushed[name], f"pubidx/{name}"
    new_cli("publisher").run("index", "--push", registry.ref(f"{repo}:1"))  # artifact + fallback tag
    ours = our_artifacts(referrers_tag(registry.url, repo, image))
    assert len(ours) == 1
    unrelated = {"mediaType": OCI_MANIFEST, "digest": sha(b"unrelated"), "size": 9,
                 "artifactType": "application/vnd.example.signature.v1"}
    answer = canonical({"schemaVersion": 2, "mediaType": OCI_INDEX,
                        "manifests": [unrelated, *ours] if listed else []})

    def fake(seen: Seen) -> Reply | None:
        if f"/v2/{repo}/referrers/{image.digest}" in seen.path:
            return Reply(200, {"Content-Type": OCI_INDEX}, answer)
        return None

    cli = new_cli("consumer")
    with CountingFront(registry.url, fake) as front:
        r = cli.run("pull", front.ref(f"{repo}:1"))
        asked = front.paths("/referrers/")
        assert asked == [f"/v2/{repo}/referrers/{image.digest}?artifactType=application%2Fvnd.imagefs.index.v1"]
        # The tag is asked at the same time (to save the round trip where the API is missing),
        # but its answer is dropped: with an empty API listing nothing published is used.
        assert not front.paths(unrelated["digest"])
        expected = [0, 0] if listed else [layer["size"] for layer in image.layers]
        assert [front.blob_bytes(d) for d in image.layer_digests] == expected
    assert r.stderr == ""


def test_push_to_a_registry_with_the_referrers_api_leaves_tags_alone(tmp_path):
    """A registry that answers the artifact's PUT with `OCI-Subject` indexes it itself: no tag is
    read or written, and blobs it already has are not uploaded (a fake registry, httpx's mock)."""
    calls: list[tuple[str, str]] = []
    subject = sha(b"image manifest")
    have = {EMPTY_DIGEST}

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((request.method, request.url.path))
        path = request.url.path
        if request.method == "HEAD" and "/blobs/" in path:
            return httpx.Response(200 if path.rsplit("/", 1)[1] in have else 404)
        if request.method == "POST" and path.endswith("/blobs/uploads/"):
            return httpx.Response(202, headers={"Location": "/v2/x/y/blobs/uploads/u1?_state=s"})
        if request.method == "PUT" and "/blobs/uploads/" in path:
            assert request.url.params["_state"] == "s" and request.url.params["digest"] == sha(request.content)
            have.add(request.url.params["digest"])
            return httpx.Response(201, headers={"Docker-Content-Digest": request.url.params["digest"]})
        if request.method == "PUT" and "/manifests/sha256:" in path:
            return httpx.Response(201, headers={"OCI-Subject": subject})
        return httpx.Response(404)

    src = RegistrySource(parse_reference("docker://127.0.0.1:1/x/y:1"), environ={},  # type: ignore[arg-type]
                         auth_file=str(tmp_path / "none.json"), certs_dir="/nonexistent")
    src._client.close()
    src._client = httpx.Client(transport=httpx.MockTransport(handler))
    try:
        blob = b"an index"
        how = push_referrer(src, b'{"artifact": 1}', {EMPTY_DIGEST: b"{}", sha(blob): blob}, subject, ARTIFACT_TYPE)
    finally:
        src.close()
    assert how == "referrers API"
    assert ("POST", "/v2/x/y/blobs/uploads/") in calls and sha(blob) in have
    assert [c for c in calls if c[0] == "POST"] == [("POST", "/v2/x/y/blobs/uploads/")]  # only the missing blob
    assert not [c for c in calls if "sha256-" in c[1]], calls


# -- 4. pull --push-index


def test_pull_push_index_then_fresh_pull_without_layers(pushed, registry, new_cli):
    image, repo = pushed["pushidx"], "pubidx/pushidx"
    first = new_cli("first")
    r = first.run("pull", "--push-index", registry.ref(f"{repo}:1"))
    assert r.stderr == ""
    assert len(our_artifacts(referrers_tag(registry.url, repo, image))) == 1
    second = new_cli("second")
    with CountingFront(registry.url) as front:
        # the front forwards GETs only: were this pull to push anything, it would fail
        r = second.run("pull", "--push-index", front.ref(f"{repo}:1"))
        assert r.stderr == ""
        assert [front.blob_bytes(d) for d in image.layer_digests] == [0, 0]


def test_push_index_needs_a_registry(busybox_layout, new_cli):
    cli = new_cli("local")
    for args in (("pull", "--push-index"), ("index", "--push")):
        r = cli.run(*args, f"oci:{busybox_layout.path}:busybox", check=False)
        assert r.returncode == 2 and "can only be published to a registry" in r.stderr, r.stderr
    r = cli.run("index", f"oci:{busybox_layout.path}:busybox")  # indexing alone works for any source
    assert "indexes " in r.stdout and r.stderr == ""


# -- 5. access profiles


def _profile_of(cli: Cli, image: PushedImage) -> list[str] | None:
    return Store(cli.store).read_profile(image.digest[7:])


def _record(cli: Cli, image: PushedImage, paths: list[str]) -> None:
    """A profile in the store, as a mount's recorder writes it."""
    Store(cli.store).put_profile(image.digest[7:], paths)


def test_profile_travels_with_the_indexes_and_the_newest_wins(pushed, registry, new_cli):
    image, repo = pushed["profile"], "pubidx/profile"
    ref = registry.ref(f"{repo}:1")
    first = ["profile-top/run", "profile-base/id"]
    a = new_cli("a")
    a.run("index", ref)
    _record(a, image, first)
    r = a.run("index", "--push", ref)
    assert r.stderr == "" and "access profile of 2 file(s)" in r.stdout
    (entry,) = our_artifacts(referrers_tag(registry.url, repo, image))
    manifest = raw_get(registry.url, repo, f"manifests/{entry['digest']}", OCI_MANIFEST)
    assert manifest is not None
    *indexes, profile = json.loads(manifest)["layers"]
    assert [d["mediaType"] for d in indexes] == [INDEX_MEDIA_TYPE] * 2
    document = encode_profile(first)
    assert profile == {"mediaType": PROFILE_MEDIA_TYPE, "digest": sha(document), "size": len(document),
                       "annotations": {ANN_PROFILE_FORMAT: "1"}}
    assert raw_get(registry.url, repo, f"blobs/{profile['digest']}", "*/*") == document

    # A store without a profile publishes the indexes alone: the newest artifact has none, and a
    # fresh pull takes the profile from the older one that has it.
    new_cli("b").run("index", "--push", ref)
    assert len(our_artifacts(referrers_tag(registry.url, repo, image))) == 2
    c = new_cli("c")
    with CountingFront(registry.url) as front:
        r = c.run("pull", front.ref(f"{repo}:1"))
        assert r.stderr == ""
        assert [front.blob_bytes(d) for d in image.layer_digests] == [0, 0]
        assert front.blob_bytes(sha(document)) == len(document)
    assert _profile_of(c, image) == first

    # A new recording re-publishes (a new artifact, the newest), and pulls take it from then on.
    second = ["profile-base/run"]
    _record(a, image, second)
    a.run("index", "--push", ref)
    tag = referrers_tag(registry.url, repo, image)
    assert len(our_artifacts(tag)) == 3
    a.run("index", "--push", ref)  # again: the same artifact, so nothing changes
    assert referrers_tag(registry.url, repo, image) == tag
    later = new_cli("later")
    later.run("pull", ref)
    assert _profile_of(later, image) == second

    # A store with a profile of its own keeps it and does not even fetch the published one.
    e = new_cli("e")
    _record(e, image, ["mine"])
    with CountingFront(registry.url) as front:
        e.run("pull", front.ref(f"{repo}:1"))
        assert not front.paths(f"/blobs/{sha(encode_profile(second))}")
        assert [front.blob_bytes(d) for d in image.layer_digests] == [0, 0]
    assert _profile_of(e, image) == ["mine"]


def test_pull_push_index_publishes_a_profile_only_when_none_is(pushed, registry, new_cli):
    image, repo = pushed["profpush"], "pubidx/profpush"
    new_cli("first").run("pull", "--push-index", registry.ref(f"{repo}:1"))  # indexes, no profile
    assert len(our_artifacts(referrers_tag(registry.url, repo, image))) == 1
    # Every index comes from the registry, but this store's profile does not: published.
    mine = new_cli("mine")
    _record(mine, image, ["profpush-top/id"])
    assert mine.run("pull", "--push-index", registry.ref(f"{repo}:1")).stderr == ""
    assert len(our_artifacts(referrers_tag(registry.url, repo, image))) == 2
    # A profile is published now: another store's own one does not replace it as a side effect.
    theirs = new_cli("theirs")
    _record(theirs, image, ["profpush-base/id"])
    with CountingFront(registry.url) as front:  # GETs only: were this pull to push, it would fail
        r = theirs.run("pull", "--push-index", front.ref(f"{repo}:1"))
        assert r.stderr == ""
        assert [front.blob_bytes(d) for d in image.layer_digests] == [0, 0]
    assert len(our_artifacts(referrers_tag(registry.url, repo, image))) == 2
    assert _profile_of(theirs, image) == ["profpush-base/id"]


@pytest.mark.parametrize("case", BAD_PROFILES)
def test_a_bad_published_profile_is_one_warning_and_the_indexes_are_used(case, pushed, registry, new_cli):
    image, repo = pushed[f"profbad-{case}"], f"pubidx/profbad-{case}"
    builder = new_cli("builder")
    builder.run("index", registry.ref(f"{repo}:1"))
    indexes = [(d, (builder.store / "indexes" / d[7:]).read_bytes()) for d in image.layer_digests]
    blob = {"tampered": encode_profile([f"profbad-{case}-top/id"]),
            "oversized": encode_profile(["x" * 1000] * 4300),  # a good profile, but over 4 MiB
            "malformed": b'{"format":1,"paths":["/etc/shadow","../x"]}'}[case]
    assert (len(blob) > MAX_PROFILE_BYTES) == (case == "oversized")
    descriptor = {"mediaType": PROFILE_MEDIA_TYPE, **raw_blob(registry.url, repo, blob),
                  "annotations": {ANN_PROFILE_FORMAT: "1"}}
    hand_publish(registry.url, repo, image, indexes, [descriptor])

    def tamper(seen: Seen) -> Reply | None:
        if case == "tampered" and seen.path.endswith(f"/blobs/{descriptor['digest']}"):
            return Reply(200, {"Content-Type": "application/octet-stream"}, blob.replace(b"/id", b"/ix"))
        return None

    cli = new_cli("consumer")
    with CountingFront(registry.url, tamper) as front:
        r = cli.run("pull", front.ref(f"{repo}:1"))
        assert [front.blob_bytes(d) for d in image.layer_digests] == [0, 0], "the indexes were not used"
        fetched = front.blob_bytes(descriptor["digest"])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert f"published profile {descriptor['digest']}" in lines[0] and "ignored" in lines[0]
    why = {"tampered": "digest mismatch", "oversized": f"more than the {MAX_PROFILE_BYTES}",
           "malformed": "normal relative paths"}[case]
    assert why in lines[0], lines[0]
    assert fetched == (0 if case == "oversized" else len(blob))  # an oversized one is not fetched at all
    assert _profile_of(cli, image) is None
    metas = [(cli.store / "indexes" / f"{d[7:]}.meta").read_bytes() for d, _ in indexes]
    assert all(meta and data.startswith(meta) for meta, (_, data) in zip(metas, indexes))


# -- 6. auth


@pytest.fixture(scope="module", params=["basic", "token"])
def auth_registry(request, images, tmp_path_factory) -> Iterator[tuple[Registry, TokenServer | None]]:
    """A registry that wants credentials to push (htpasswd basic auth, or bearer tokens from a
    token server that lets anyone pull), holding the `auth` image as priv/auth:1."""
    root = tmp_path_factory.mktemp(f"auth-{request.param}")
    tokens, reg = None, None
    try:
        if request.param == "token":
            ca, cert, key = make_ca_and_cert(root / "pki")
            tokens = TokenServer(cert, key, users={USER: PASSWORD}, anonymous_pull=True)
            tokens.start()
            reg = Registry(root / "reg", auth=tokens.registry_auth(ca))
        else:
            reg = Registry(root / "reg", htpasswd=make_htpasswd(root / "htpasswd", USER, PASSWORD))
        reg.start()
        push(images["_layout"].path, "auth", reg.ref("priv/auth:1"), creds=f"{USER}:{PASSWORD}")
        yield reg, tokens
    finally:
        if reg is not None:
            reg.stop()
        if tokens is not None:
            tokens.stop()


def test_push_through_an_authenticating_registry(auth_registry, images, new_cli, tmp_path):
    reg, tokens = auth_registry
    image = images["auth"]
    config = tmp_path / "auth.json"
    encoded = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    config.write_text(json.dumps({"auths": {reg.host: {"auth": encoded}}}))
    publisher = new_cli("publisher", IMAGEFS_AUTH_FILE=str(config))
    r = publisher.run("index", "--push", reg.ref("priv/auth:1"))
    assert r.stderr == "" and "pushed sha256:" in r.stdout
    if tokens is not None:
        scopes = {s for t in tokens.requests if t.account == USER for s in t.scopes}
        assert "repository:priv/auth:pull,push" in scopes, scopes

    consumer = new_cli("consumer", IMAGEFS_AUTH_FILE=str(config))
    with CountingFront(reg.url) as front:
        # the consumer asks the front, so its credentials are filed under the front's address
        config.write_text(json.dumps({"auths": {front.front.host: {"auth": encoded}}}))
        r = consumer.run("pull", front.ref("priv/auth:1"))
        assert r.stderr == ""
        assert [front.blob_bytes(d) for d in image.layer_digests] == [0, 0]
        assert front.paths(f"/manifests/sha256-{image.digest[7:]}")


@pytest.mark.parametrize("auth_registry", ["token"], indirect=True)  # htpasswd: no pull without push
def test_push_without_push_access_is_one_line(auth_registry, new_cli, tmp_path):
    reg, tokens = auth_registry
    cli = new_cli("anonymous", IMAGEFS_AUTH_FILE=str(tmp_path / "none.json"))
    r = cli.run("index", "--push", reg.ref("priv/auth:1"), check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"imagefs: {reg.host}/priv/auth: push refused")


# -- 7. the artifact logic on its own (no registry)


def _layer(members: list[Member]) -> tuple[Layer, bytes]:
    blob = compress(layer_tar(members), "gzip")
    layer = Layer(sha(blob), "application/vnd.oci.image.layer.v1.tar+gzip", len(blob), "gzip")
    index = build_index([blob], digest=layer.digest, size=layer.size, compression="gzip", root="")
    return layer, index.to_bytes()


def test_artifact_round_trip_and_what_parse_refuses():
    layer, data = _layer(_small("unit"))
    blob = index_blob(layer.digest, data)
    subject = Descriptor(OCI_MANIFEST, sha(b"subject"), 7)
    artifact = build_artifact(subject, [blob])
    assert artifact == build_artifact(subject, [blob])  # deterministic
    (ref,) = parse_artifact(artifact, subject.digest, "a").indexes
    assert ref == blob.ref and verify_index(data, ref, layer).digest == layer.digest
    doc = json.loads(artifact)
    cases = {"subject": ({**doc, "subject": {**doc["subject"], "digest": sha(b"x")}}, "refers to"),
             "type": ({**doc, "artifactType": "application/vnd.example"}, "not an imagefs index artifact"),
             "format": ({**doc, "annotations": {ANN_FORMAT: "2"}}, "index format '2'"),
             "sizes": ({**doc, "layers": [{**doc["layers"][0], "size": 3}]}, "bad sizes")}
    for name, (bad, needle) in cases.items():
        with pytest.raises(InputError, match=needle):
            parse_artifact(canonical(bad), subject.digest, name)


def test_verify_index_checks_the_blob_the_metadata_and_the_layer():
    layer, data = _layer(_small("verify"))
    ref = index_blob(layer.digest, data).ref
    other_layer, other = _layer(_small("another"))
    claimed = replace(index_blob(other_layer.digest, other).ref, layer=layer.digest)  # a true blob, a false claim
    with pytest.raises(InputError, match=f"index is for layer {other_layer.digest}"):
        verify_index(other, claimed, layer)
    with pytest.raises(InputError, match="digest mismatch"):
        verify_index(data[:-1] + bytes([data[-1] ^ 1]), ref, layer)
    with pytest.raises(InputError, match="metadata block does not match"):
        verify_index(data, replace(ref, meta_digest=sha(b"no")), layer)
    bigger = Layer(layer.digest, layer.media_type, layer.size + 1, layer.compression)
    with pytest.raises(InputError, match="the image's is"):
        verify_index(data, ref, bigger)


def test_referrers_tag_index_merge():
    mine = Referrer(sha(b"mine"), 10, OCI_MANIFEST, ARTIFACT_TYPE, {ANN_FORMAT: "1"})
    other = {"mediaType": OCI_MANIFEST, "digest": sha(b"other"), "size": 5, "artifactType": "x/y",
             "annotations": {"k": "v"}, "unknown-field": 1}
    existing = canonical({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [other], "annotations": {"a": "b"}})
    merged = json.loads(add_referrer(existing, mine, "t"))
    assert merged["manifests"] == [other, mine.descriptor()] and merged["annotations"] == {"a": "b"}
    again = json.loads(add_referrer(canonical(merged), mine, "t"))
    assert again["manifests"] == merged["manifests"]  # replaced, not duplicated
    assert [r.digest for r in parse_referrers(add_referrer(None, mine, "t"), "t")] == [mine.digest]
    assert fallback_tag(mine.digest) == f"sha256-{mine.digest[7:]}"
    with pytest.raises(InputError, match="not a referrers index"):
        parse_referrers(canonical({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "manifests": []}), "t")


def test_artifact_with_a_profile_round_trip_and_what_parse_ignores():
    layer, data = _layer(_small("unitprofile"))
    blob = index_blob(layer.digest, data)
    subject = Descriptor(OCI_MANIFEST, sha(b"subject"), 7)
    paths = ["unitprofile/run", "unitprofile/id"]
    profile = profile_blob(paths)
    artifact = build_artifact(subject, [blob], profile)
    assert artifact == build_artifact(subject, [blob], profile_blob(list(paths)))  # deterministic
    assert artifact != build_artifact(subject, [blob])
    parsed = parse_artifact(artifact, subject.digest, "a")
    assert (parsed.indexes, parsed.profile, parsed.profile_error) == ([blob.ref], profile.ref, None)
    assert verify_profile(profile.data, profile.ref) == paths
    doc = json.loads(artifact)
    index_desc, profile_desc = doc["layers"]
    assert profile_desc == {"mediaType": PROFILE_MEDIA_TYPE, "digest": profile.ref.digest,
                            "size": profile.ref.size, "annotations": {ANN_PROFILE_FORMAT: "1"}}
    newer = {**doc, "layers": [index_desc, {**profile_desc, "annotations": {ANN_PROFILE_FORMAT: "2"}}]}
    assert parse_artifact(canonical(newer), subject.digest, "newer") == parse_artifact(
        build_artifact(subject, [blob]), subject.digest, "none")  # a format it does not read: none
    broken = {**doc, "layers": [index_desc, {**profile_desc, "digest": "sha256:nope"}]}
    parsed = parse_artifact(canonical(broken), subject.digest, "broken")
    assert parsed.indexes == [blob.ref] and parsed.profile is None  # the indexes are not spoilt
    assert parsed.profile_error is not None and "not a sha256 digest" in parsed.profile_error
    with pytest.raises(InputError, match="digest mismatch"):
        verify_profile(profile.data.replace(b"/run", b"/rum"), profile.ref)
    with pytest.raises(InputError, match="descriptor says"):
        verify_profile(profile.data + b" ", profile.ref)
    with pytest.raises(InputError, match="normal relative paths"):
        bad = b'{"format":1,"paths":["a//b"]}'
        verify_profile(bad, PublishedProfile(sha(bad), len(bad)))


def test_profile_documents_and_the_store(tmp_path):
    paths = ["usr/bin/python3", "etc/ld.so.cache", os.fsdecode(b"odd/\xff")]
    data = encode_profile(paths)
    assert data == canonical({"format": 1, "paths": paths}) and parse_profile(data, "p") == paths
    refused = {b"[": "bad JSON", b'["a"]': "format 1", b'{"format":true,"paths":[]}': "format 1",
               b'{"format":2,"paths":[]}': "format 1", b'{"format":1,"paths":"a"}': "normal relative",
               b'{"format":1,"paths":[1]}': "normal relative", b'{"format":1,"paths":["/a"]}': "normal relative",
               b'{"format":1,"paths":["a/../b"]}': "normal relative", b'{"format":1,"paths":[""]}': "normal relative",
               b'{"format":1,"paths":["a\\u0000"]}': "normal relative",
               b"[" * 100_000: "nested too deeply", b" " * (MAX_PROFILE_BYTES + 1): "more than"}
    for bad, needle in refused.items():
        with pytest.raises(InputError, match=needle):
            parse_profile(bad, "p")

    store, image_id = Store(tmp_path / "store"), "ab" * 32
    assert store.read_profile(image_id) is None and not store.has_profile(image_id)
    store.put_profile(image_id, ["a", "/abs", "b/../c", "d"])  # what could not be read back is left out
    assert store.read_profile(image_id) == ["a", "d"]
    long = [f"{n:05d}/" + "x" * 1000 for n in range(5000)]  # ~5 MB: only the head fits
    store.put_profile(image_id, long)
    kept = store.read_profile(image_id)
    assert kept is not None and 4000 < len(kept) < 5000 and kept == long[:len(kept)]
    assert store.profile_path(image_id).stat().st_size <= MAX_PROFILE_BYTES
    store.profile_path(image_id).write_bytes(b"junk")
    with pytest.raises(InputError, match="bad JSON"):
        store.read_profile(image_id)
