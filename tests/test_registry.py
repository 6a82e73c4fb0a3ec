"""RegistrySource against real registries (distribution 2.8) started here: anonymous, htpasswd,
TLS with a test CA, and token auth through tests/support/tokenserver.py; plus `HttpFront`s for
what a well-behaved registry never does (redirects to storage, 503s, resets, broken streams,
schema1 and malformed manifests)."""

from __future__ import annotations

import base64
import hashlib
import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from imagefs.errors import AuthError, DigestMismatch, ImagefsError, InputError, NotFound, RuntimeFailure
from stores.auth import CredentialLookup, lookup_credentials, normalise_registry_key, parse_challenges
from stores.manifest import resolve
from stores.model import DOCKER_SCHEMA1_SIGNED, Platform
from stores.reference import DockerReference, parse_reference
from stores.registry import RegistrySource, registry_scheme
from tests.conftest import requires_skopeo
from tests.support.images import OciLayout, layer_tar, Member, push
from tests.support.registry import HttpFront, Registry, Reply, Seen, make_ca_and_cert, make_htpasswd
from tests.support.tokenserver import TokenServer

pytestmark = requires_skopeo

AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64")
USER, PASSWORD = "imagefs", "s3cret,with:colon"


# -- helpers


def ref_of(text: str) -> DockerReference:
    ref = parse_reference(text)
    assert isinstance(ref, DockerReference)
    return ref


def source(text: str, tmp_path: Path | None = None, **options) -> RegistrySource:
    """A source that sees no host environment: no ~/.docker, no $IMAGEFS_* (unless given)."""
    options.setdefault("environ", {})
    options.setdefault("auth_file", str((tmp_path or Path("/nonexistent")) / "no-config.json"))
    options.setdefault("certs_dir", "/nonexistent/certs.d")
    return RegistrySource(ref_of(text), **options)


def auth_config(path: Path, key: str, user: str = USER, password: str = PASSWORD, *, fields: bool = False) -> str:
    entry = {"username": user, "password": password} if fields else \
        {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
    path.write_text(json.dumps({"auths": {key: entry}}))
    return str(path)


class Sleeps:
    """An injected sleep: records the delays asked for, waits for none."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def manifest_of(layout: OciLayout, desc: dict) -> dict:
    return json.loads(layout.blob_path(desc["digest"]).read_bytes())


# -- images and registries (each started once per module, stopped in finally)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict:
    """One layout: `plain` (one uncompressed 3 MiB pseudo-random file, so offsets mean something)
    and `multi` (an index of amd64 + arm64 images)."""
    layout = OciLayout(tmp_path_factory.mktemp("reglayouts") / "layout")
    payload = random.Random(7).randbytes(3 << 20)
    plain = layout.add_image([(layer_tar([Member("data.bin", data=payload)]), "none"),
                              (layer_tar([Member("etc", "dir"), Member("etc/hello", data=b"hi\n")]), "gzip")],
                             tag="plain", config={"Cmd": ["/bin/true"]})
    amd = layout.add_image([(layer_tar([Member("arch", data=b"amd64\n")]), "gzip")], arch="amd64")
    arm = layout.add_image([(layer_tar([Member("arch", data=b"arm64\n")]), "gzip")], arch="arm64")
    index = layout.add_index([amd, arm], tag="multi")
    big = manifest_of(layout, plain)["layers"][0]
    return {"layout": layout, "plain": plain, "amd": amd, "arm": arm, "index": index,
            "big_digest": big["digest"], "big": layout.blob_path(big["digest"]).read_bytes()}


@pytest.fixture(scope="module")
def plain_registry(registry, images) -> Registry:
    """The session's anonymous registry holding the test images."""
    layout = images["layout"].path
    push(layout, "plain", registry.ref("test/plain:1"))
    push(layout, "multi", registry.ref("test/multi:1"))
    return registry


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> tuple[str, str, str]:
    return make_ca_and_cert(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory, images):
    root = tmp_path_factory.mktemp("basicreg")
    reg = Registry(root, htpasswd=make_htpasswd(root / "htpasswd", USER, PASSWORD))
    reg.start()
    try:
        push(images["layout"].path, "plain", reg.ref("private/plain:1"), creds=f"{USER}:{PASSWORD}")
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory, images, pki):
    ca, cert, key = pki
    reg = Registry(tmp_path_factory.mktemp("tlsreg"), tls_cert=cert, tls_key=key)
    reg.start()
    try:
        push(images["layout"].path, "plain", reg.ref("secure/plain:1"), tls_verify=False)
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def token_setup(tmp_path_factory, images, pki):
    ca, cert, key = pki
    tokens = TokenServer(cert, key, users={USER: PASSWORD})
    tokens.start()
    try:
        reg = Registry(tmp_path_factory.mktemp("tokenreg"), auth=tokens.registry_auth(ca))
        reg.start()
        try:
            push(images["layout"].path, "plain", reg.ref("tok/plain:1"), creds=f"{USER}:{PASSWORD}")
            yield reg, tokens
        finally:
            reg.stop()
    finally:
        tokens.stop()


@pytest.fixture
def tokens(token_setup):
    """The token server, with default policy and no recorded requests at the start of a test."""
    reg, server = token_setup
    server.reset(anonymous_pull=False, expires_in=300, field_name="token", expired_tokens=frozenset())
    return server


# -- 1. anonymous pull


def test_pull_by_tag_matches_the_layout(plain_registry, images, tmp_path):
    layout, desc = images["layout"], images["plain"]
    want = manifest_of(layout, desc)
    with source(plain_registry.ref("test/plain:1"), tmp_path) as src:
        image = resolve(src, AMD64)
    assert image.manifest_digest == desc["digest"]
    assert image.manifest == layout.blob_path(desc["digest"]).read_bytes()
    assert image.config == layout.blob_path(want["config"]["digest"]).read_bytes()
    assert [layer.digest for layer in image.layers] == [d["digest"] for d in want["layers"]]
    assert [layer.compression for layer in image.layers] == ["none", "gzip"]
    assert image.runtime.cmd == ("/bin/true",)


def test_pull_by_digest_and_pinned(plain_registry, images, tmp_path):
    digest = images["plain"]["digest"]
    with source(plain_registry.ref(f"test/plain@{digest}"), tmp_path) as src:
        m = src.root_manifest()
        image = resolve(src, AMD64)
        assert src.pinned(digest) == f"docker://{plain_registry.host}/test/plain@{digest}"
    assert m.digest == digest and m.media_type == "application/vnd.oci.image.manifest.v1+json"
    assert image.manifest_digest == digest
    with source(src.pinned(digest), tmp_path) as again:
        assert resolve(again, AMD64).layers == image.layers


# -- 2. indexes


@pytest.mark.parametrize("platform, key", [(AMD64, "amd"), (ARM64, "arm")])
def test_index_picks_the_platform(plain_registry, images, tmp_path, platform, key):
    with source(plain_registry.ref("test/multi:1"), tmp_path) as src:
        root = src.root_manifest()
        image = resolve(src, platform)
    assert root.digest == images["index"]["digest"]
    assert image.manifest_digest == images[key]["digest"]
    assert image.runtime.architecture == platform.architecture


def test_index_without_the_platform_lists_what_it_offers(plain_registry, tmp_path):
    with source(plain_registry.ref("test/multi:1"), tmp_path) as src, pytest.raises(NotFound) as e:
        resolve(src, Platform("linux", "s390x"))
    assert "linux/s390x" in str(e.value) and "linux/amd64, linux/arm64" in str(e.value)


# -- 3. basic auth (htpasswd)


@pytest.mark.parametrize("key, fields", [("127.0.0.1:{port}", False), ("http://127.0.0.1:{port}/v2/", True)])
def test_basic_auth_with_credentials_from_config(basic_registry, images, tmp_path, key, fields):
    config = auth_config(tmp_path / "config.json", key.format(port=basic_registry.port), fields=fields)
    with source(basic_registry.ref("private/plain:1"), auth_file=config) as src:
        image = resolve(src, AMD64)
        # After the first challenge, credentials go up front: a range read still works.
        assert src.read_range(images["big_digest"], 100, 50) == images["big"][100:150]
    assert image.manifest_digest == images["plain"]["digest"]


def test_basic_auth_wrong_password(basic_registry, tmp_path):
    config = auth_config(tmp_path / "config.json", basic_registry.host, password="wrong")
    with source(basic_registry.ref("private/plain:1"), auth_file=config) as src, pytest.raises(AuthError) as e:
        src.root_manifest()
    assert f"{basic_registry.host}/private/plain" in str(e.value)
    assert "credentials refused" in str(e.value) and USER in str(e.value) and "config.json" in str(e.value)


def test_basic_auth_without_credentials(basic_registry, tmp_path):
    with source(basic_registry.ref("private/plain:1"), tmp_path) as src, pytest.raises(AuthError) as e:
        src.root_manifest()
    assert "requires authentication" in str(e.value) and "no-config.json" in str(e.value)


def test_auth_file_from_environment_and_credential_helpers(basic_registry, tmp_path):
    config = tmp_path / "env-config.json"
    auth_config(config, basic_registry.host)
    with source(basic_registry.ref("private/plain:1"), auth_file=None,
                environ={"IMAGEFS_AUTH_FILE": str(config)}) as src:
        assert src.root_manifest().data
    config.write_text(json.dumps({"auths": {}, "credsStore": "desktop"}))
    with source(basic_registry.ref("private/plain:1"), auth_file=str(config)) as src, pytest.raises(AuthError) as e:
        src.root_manifest()
    assert "docker-credential-desktop" in str(e.value) and "not support" in str(e.value)


def test_malformed_credentials_file_names_the_file(basic_registry, tmp_path):
    config = tmp_path / "config.json"
    config.write_text("{not json")
    with source(basic_registry.ref("private/plain:1"), auth_file=str(config)) as src, pytest.raises(InputError) as e:
        src.root_manifest()
    assert str(config) in str(e.value) and "malformed JSON" in str(e.value)


# -- 4. bearer tokens


def test_bearer_token_with_credentials(token_setup, tokens, images, tmp_path):
    reg, _ = token_setup
    config = auth_config(tmp_path / "config.json", reg.host)
    with source(reg.ref("tok/plain:1"), auth_file=config) as src:
        image = resolve(src, AMD64)
        assert src.read_range(images["big_digest"], 0, 512) == images["big"][:512]
    assert image.manifest_digest == images["plain"]["digest"]
    # One token served the manifest, config and range read (cached per scope).
    assert len(tokens.requests) == 1
    assert tokens.requests[0].account == USER and tokens.requests[0].scopes == ["repository:tok/plain:pull"]


def test_bearer_anonymous_token_and_access_token_field(token_setup, tokens, tmp_path):
    reg, _ = token_setup
    tokens.reset(anonymous_pull=True, field_name="access_token")
    with source(reg.ref("tok/plain:1"), tmp_path) as src:
        assert src.root_manifest().data
    assert [r.account for r in tokens.requests] == [None]


def test_bearer_token_refreshed_when_expired(token_setup, tokens, images, tmp_path):
    reg, _ = token_setup
    tokens.reset(expires_in=30)
    clock = Clock()
    config = auth_config(tmp_path / "config.json", reg.host)
    with source(reg.ref("tok/plain:1"), auth_file=config, clock=clock) as src:
        src.root_manifest()
        src.read_range(images["big_digest"], 0, 16)
        assert tokens.count() == 1
        clock.now += 31  # past expires_in: the client must fetch a new token before the next request
        assert src.read_range(images["big_digest"], 16, 16) == images["big"][16:32]
    assert tokens.count() == 2


def test_bearer_token_refreshed_when_registry_refuses_it(token_setup, tokens, images, tmp_path):
    reg, _ = token_setup
    # Token 2 is announced valid but already expired: the registry answers 401 to the request that
    # carries it, and the client must fetch token 3 and retry once.
    tokens.reset(expires_in=30, expired_tokens=frozenset({2}))
    clock = Clock()
    config = auth_config(tmp_path / "config.json", reg.host)
    with source(reg.ref("tok/plain:1"), auth_file=config, clock=clock) as src:
        assert src.root_manifest().data
        clock.now += 31
        assert src.read_range(images["big_digest"], 64, 64) == images["big"][64:128]
    assert tokens.count() == 3


def test_bearer_fresh_token_refused_is_not_retried_forever(token_setup, tokens, tmp_path):
    reg, _ = token_setup
    tokens.reset(expired_tokens=frozenset({1, 2, 3}))
    config = auth_config(tmp_path / "config.json", reg.host)
    with source(reg.ref("tok/plain:1"), auth_file=config) as src, pytest.raises(AuthError) as e:
        src.root_manifest()
    assert "does not grant pull" in str(e.value) and tokens.realm in str(e.value)
    assert tokens.count() == 1


def test_bearer_wrong_credentials(token_setup, tokens, tmp_path):
    reg, _ = token_setup
    config = auth_config(tmp_path / "config.json", reg.host, password="nope")
    with source(reg.ref("tok/plain:1"), auth_file=config) as src, pytest.raises(AuthError) as e:
        src.root_manifest()
    assert "token server" in str(e.value) and tokens.realm in str(e.value) and USER in str(e.value)


def test_bearer_without_credentials_is_denied(token_setup, tokens, tmp_path):
    reg, _ = token_setup
    with source(reg.ref("tok/plain:1"), tmp_path) as src, pytest.raises(AuthError) as e:
        src.root_manifest()
    assert f"{reg.host}/tok/plain" in str(e.value) and "anonymous" in str(e.value)
    assert tokens.count() == 1  # one anonymous token, refused by the registry; no loop


# -- 5. TLS with a custom CA


def test_tls_with_ca_file(tls_registry, pki, images, tmp_path):
    ca = pki[0]
    with source(tls_registry.ref("secure/plain:1"), tmp_path, ca_file=ca,
                tls_hosts=frozenset({tls_registry.host})) as src:
        assert src.scheme == "https"
        assert resolve(src, AMD64).manifest_digest == images["plain"]["digest"]


def test_tls_with_ca_from_environment(tls_registry, pki, images, tmp_path):
    with source(tls_registry.ref("secure/plain:1"), tmp_path, environ={"IMAGEFS_CA_FILE": pki[0]},
                tls_hosts=frozenset({"127.0.0.1"})) as src:
        assert resolve(src, AMD64).manifest_digest == images["plain"]["digest"]


def test_tls_with_certs_dir(tls_registry, pki, images, tmp_path):
    certs = tmp_path / "certs.d"
    (certs / tls_registry.host).mkdir(parents=True)
    (certs / tls_registry.host / "ca.crt").write_bytes(Path(pki[0]).read_bytes())
    # No tls_hosts: a certs.d entry for the host is what makes loopback speak HTTPS.
    with source(tls_registry.ref("secure/plain:1"), tmp_path, certs_dir=str(certs)) as src:
        assert src.scheme == "https"
        assert src.read_range(images["big_digest"], 7, 9) == images["big"][7:16]


def test_missing_ca_file_is_named(tls_registry, tmp_path):
    with pytest.raises(InputError) as e:
        source(tls_registry.ref("secure/plain:1"), tmp_path, ca_file=str(tmp_path / "nope.crt"),
               tls_hosts=frozenset({tls_registry.host}))
    assert str(tmp_path / "nope.crt") in str(e.value) and "not found" in str(e.value)


def test_tls_without_the_ca_fails_clearly(tls_registry, tmp_path):
    sleeps = Sleeps()
    with source(tls_registry.ref("secure/plain:1"), tmp_path, tls_hosts=frozenset({tls_registry.host}),
                sleep=sleeps) as src, pytest.raises(InputError) as e:
        src.root_manifest()
    assert tls_registry.host in str(e.value) and "certificate verify failed" in str(e.value)
    assert sleeps.delays == []  # an untrusted certificate is not retried


# -- 6. range reads


def test_read_range_exact_bytes(plain_registry, images, tmp_path):
    blob, digest = images["big"], images["big_digest"]
    spots = [(0, 1), (1, 4096), (len(blob) // 2, 100_000), (len(blob) - 10, 10), (123_457, 1)]
    with source(plain_registry.ref("test/plain:1"), tmp_path) as src:
        for start, length in spots:
            assert src.read_range(digest, start, length) == blob[start:start + length]
        assert src.read_range(digest, 5, 0) == b""


def test_read_range_from_many_threads(plain_registry, images, tmp_path):
    blob, digest = images["big"], images["big_digest"]
    rng = random.Random(3)
    spots = [(rng.randrange(len(blob) - 70_000), rng.randrange(1, 70_000)) for _ in range(48)]
    with source(plain_registry.ref("test/plain:1"), tmp_path) as src, ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda s: src.read_range(digest, *s), spots))
    assert got == [blob[a:a + n] for a, n in spots]


def test_read_range_beyond_the_end(plain_registry, images, tmp_path):
    blob, digest = images["big"], images["big_digest"]
    with source(plain_registry.ref("test/plain:1"), tmp_path) as src:
        with pytest.raises(InputError) as e:
            src.read_range(digest, len(blob) - 5, 10)
        assert digest in str(e.value)
        with pytest.raises(InputError):
            src.read_range(digest, len(blob) + 5, 10)


def test_open_blob_whole_and_from_offset(plain_registry, images, tmp_path):
    blob, digest = images["big"], images["big_digest"]
    with source(plain_registry.ref("test/plain:1"), tmp_path) as src:
        assert hashlib.sha256(b"".join(src.open_blob(digest, len(blob)))).hexdigest() == digest[7:]
        assert b"".join(src.open_blob(digest, len(blob), 1_000_001)) == blob[1_000_001:]
        stream = src.open_blob(digest, len(blob))
        first = next(stream)
        assert first and blob.startswith(first)
        stream.close()  # abandoning a stream part-way releases its connection
        assert src.read_range(digest, 0, 3) == blob[:3]


def test_open_blob_when_the_server_ignores_range(plain_registry, images, tmp_path):
    blob, digest = images["big"], images["big_digest"]
    asked: list[str | None] = []

    def no_ranges(seen: Seen) -> Reply | None:
        # Forwarded without its Range header, so the registry answers 200 with the whole blob.
        asked.append(seen.headers.pop("range", None))
        return None

    with HttpFront(plain_registry.url, no_ranges) as front:
        with source(f"docker://{front.host}/test/plain:1", tmp_path) as src:
            assert b"".join(src.open_blob(digest, len(blob), 2_000_000)) == blob[2_000_000:]
            assert src.read_range(digest, 10, 20) == blob[10:30]
    assert asked[-2:] == ["bytes=2000000-", "bytes=10-29"]


# -- 7. redirects to storage


def test_blob_redirect_to_storage_drops_authorization(plain_registry, images, tmp_path):
    blob, digest = images["big"], images["big_digest"]
    expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    with HttpFront(plain_registry.url) as storage:

        def front_hook(seen: Seen) -> Reply | None:
            if seen.headers.get("authorization") != expected:
                return Reply(401, {"WWW-Authenticate": 'Basic realm="front"'})
            if "/blobs/" in seen.path:
                return Reply(307, {"Location": storage.url + seen.path})
            return None

        with HttpFront(plain_registry.url, front_hook) as front:
            config = auth_config(tmp_path / "config.json", front.host)
            with source(f"docker://{front.host}/test/plain:1", auth_file=config) as src:
                image = resolve(src, AMD64)
                whole = b"".join(src.open_blob(digest, len(blob)))
                part = src.read_range(digest, 999, 1000)
            assert image.manifest_digest == images["plain"]["digest"]
            assert hashlib.sha256(whole).hexdigest() == digest[7:] and part == blob[999:1999]
            redirected = storage.requests("/blobs/")
            assert len(redirected) >= 3  # config, whole layer, range
            assert all("authorization" not in s.headers for s in redirected)
            assert any(s.headers.get("range") == "bytes=999-1998" for s in redirected)
            assert all(s.headers.get("authorization") == expected for s in front.requests("/blobs/"))


# -- 8. retries


def test_retries_503_then_succeeds(plain_registry, images, tmp_path):
    failures = {"left": 2}

    def flaky(seen: Seen) -> Reply | None:
        if failures["left"] > 0:
            failures["left"] -= 1
            return Reply(503, {"Content-Type": "application/json"},
                         b'{"errors":[{"code":"UNAVAILABLE","message":"try later"}]}')
        return None

    sleeps = Sleeps()
    with HttpFront(plain_registry.url, flaky) as front, \
            source(f"docker://{front.host}/test/plain:1", tmp_path, sleep=sleeps) as src:
        assert resolve(src, AMD64).manifest_digest == images["plain"]["digest"]
    assert sleeps.delays == [0.2, 0.4]


def test_always_503_gives_up_after_bounded_tries(plain_registry, tmp_path):
    sleeps = Sleeps()
    with HttpFront(plain_registry.url, lambda s: Reply(503)) as front, \
            source(f"docker://{front.host}/test/plain:1", tmp_path, sleep=sleeps, retries=4) as src:
        with pytest.raises(RuntimeFailure) as e:
            src.root_manifest()
        assert len(front.seen) == 4
    assert front.host in str(e.value) and "giving up after 4 tries" in str(e.value) and "503" in str(e.value)
    assert sleeps.delays == [0.2, 0.4, 0.8]


def test_429_honours_retry_after_within_the_cap(plain_registry, tmp_path):
    answers = iter([Reply(429, {"Retry-After": "3"}), Reply(429, {"Retry-After": "120"})])
    sleeps = Sleeps()
    with HttpFront(plain_registry.url, lambda s: next(answers, None)) as front, \
            source(f"docker://{front.host}/test/plain:1", tmp_path, sleep=sleeps) as src:
        assert src.root_manifest().data
    assert sleeps.delays == [3.0, 5.0]


def test_connection_resets_are_retried(plain_registry, images, tmp_path):
    drops = {"left": 2}

    def reset(seen: Seen) -> Reply | None:
        if "/blobs/" in seen.path and drops["left"] > 0:
            drops["left"] -= 1
            return Reply(drop=True)
        return None

    blob, digest = images["big"], images["big_digest"]
    sleeps = Sleeps()
    with HttpFront(plain_registry.url, reset) as front, \
            source(f"docker://{front.host}/test/plain:1", tmp_path, sleep=sleeps) as src:
        assert src.read_range(digest, 4096, 8192) == blob[4096:4096 + 8192]
    assert drops["left"] == 0 and len(sleeps.delays) == 2


def test_open_blob_resumes_a_broken_stream(plain_registry, images, tmp_path):
    blob, digest = images["big"], images["big_digest"]
    cuts = {"left": 2}

    def cut(seen: Seen) -> Reply | None:
        if "/blobs/" in seen.path and cuts["left"] > 0:
            cuts["left"] -= 1
            start = int(seen.headers["range"][6:-1]) if "range" in seen.headers else 0
            return Reply(206 if start else 200, {"Content-Range": f"bytes {start}-{len(blob) - 1}/{len(blob)}"},
                         blob[start:], cut_after=700_000)
        return None

    with HttpFront(plain_registry.url, cut) as front, \
            source(f"docker://{front.host}/test/plain:1", tmp_path, sleep=Sleeps()) as src:
        data = b"".join(src.open_blob(digest, len(blob)))
        ranges = [s.headers.get("range") for s in front.requests("/blobs/")]
    assert hashlib.sha256(data).hexdigest() == digest[7:]
    assert ranges[0] is None and ranges[1:] == ["bytes=700000-", "bytes=1400000-"]


def test_open_blob_gives_up_on_a_stream_that_always_breaks(plain_registry, images, tmp_path):
    blob, digest = images["big"], images["big_digest"]

    def cut(seen: Seen) -> Reply | None:
        if "/blobs/" not in seen.path:
            return None
        start = int(seen.headers["range"][6:-1]) if "range" in seen.headers else 0
        return Reply(206 if start else 200, {"Content-Range": f"bytes {start}-{len(blob) - 1}/{len(blob)}"},
                     blob[start:], cut_after=1000)

    sleeps = Sleeps()
    with HttpFront(plain_registry.url, cut) as front, \
            source(f"docker://{front.host}/test/plain:1", tmp_path, sleep=sleeps) as src:
        got = bytearray()
        with pytest.raises(RuntimeFailure) as e:
            for chunk in src.open_blob(digest, len(blob)):
                got += chunk
        assert len(front.requests("/blobs/")) == 4
    assert digest in str(e.value) and "stream broken at byte 4000" in str(e.value)
    assert bytes(got) == blob[:4000] and len(sleeps.delays) == 3
    with source(plain_registry.ref("test/plain:1"), tmp_path) as src:
        assert list(src.open_blob(digest, len(blob), len(blob))) == []


def test_no_retry_on_404(plain_registry, tmp_path):
    sleeps = Sleeps()
    with HttpFront(plain_registry.url) as front, \
            source(f"docker://{front.host}/test/plain:nope", tmp_path, sleep=sleeps) as src:
        with pytest.raises(NotFound):
            src.root_manifest()
        assert len(front.seen) == 1 and sleeps.delays == []


def test_unreachable_registry(tmp_path):
    from tests.support.registry import free_port

    sleeps = Sleeps()
    with source(f"docker://127.0.0.1:{free_port()}/x/y:1", tmp_path, sleep=sleeps, retries=3) as src, \
            pytest.raises(RuntimeFailure) as e:
        src.root_manifest()
    assert "127.0.0.1" in str(e.value) and "giving up after 3 tries" in str(e.value)
    assert len(sleeps.delays) == 2


# -- 9. errors


def test_missing_tag_and_missing_repo(plain_registry, tmp_path):
    for text in (plain_registry.ref("test/plain:nope"), plain_registry.ref("no/such/repo:1")):
        with source(text, tmp_path) as src, pytest.raises(NotFound) as e:
            src.root_manifest()
        assert str(e.value).startswith(text + ":") and "manifest unknown" in str(e.value)


def test_missing_blob(plain_registry, tmp_path):
    digest = "sha256:" + "0" * 64
    with source(plain_registry.ref("test/plain:1"), tmp_path) as src, pytest.raises(NotFound) as e:
        src.read_range(digest, 0, 10)
    assert digest in str(e.value) and "blob unknown" in str(e.value)


def fake_registry(manifest: bytes, media_type: str):
    def hook(seen: Seen) -> Reply | None:
        if "/manifests/" in seen.path:
            return Reply(200, {"Content-Type": media_type}, manifest)
        return None
    return HttpFront(None, hook)


def test_schema1_manifest_is_refused_clearly(tmp_path):
    schema1 = json.dumps({"schemaVersion": 1, "name": "old/image", "tag": "1", "architecture": "amd64",
                          "fsLayers": [], "history": [], "signatures": []}).encode()
    with fake_registry(schema1, DOCKER_SCHEMA1_SIGNED) as front, \
            source(f"docker://{front.host}/old/image:1", tmp_path) as src, pytest.raises(InputError) as e:
        resolve(src, AMD64)
    assert "schema1" in str(e.value) and "old/image" in str(e.value)
    assert "vnd.docker.distribution.manifest.v1+prettyjws" in front.seen[0].headers["accept"]


def test_malformed_manifest_json(tmp_path):
    with fake_registry(b"{this is not json", "application/vnd.oci.image.manifest.v1+json") as front, \
            source(f"docker://{front.host}/bad/image:1", tmp_path) as src, pytest.raises(InputError) as e:
        resolve(src, AMD64)
    assert "malformed JSON" in str(e.value) and "bad/image" in str(e.value)


def test_manifest_by_digest_is_verified(tmp_path):
    digest = "sha256:" + hashlib.sha256(b"{}").hexdigest()
    with fake_registry(b'{"other": 1}', "application/vnd.oci.image.manifest.v1+json") as front, \
            source(f"docker://{front.host}/bad/image@{digest}", tmp_path) as src, pytest.raises(DigestMismatch):
        src.root_manifest()


def test_registry_error_codes_are_reported(tmp_path):
    body = b'{"errors":[{"code":"DENIED","message":"quota exceeded"}]}'
    with HttpFront(None, lambda s: Reply(400, {"Content-Type": "application/json"}, body)) as front, \
            source(f"docker://{front.host}/a/b:1", tmp_path) as src, pytest.raises(InputError) as e:
        src.root_manifest()
    assert "DENIED: quota exceeded" in str(e.value)
    assert not isinstance(e.value, (NotFound, AuthError))


# -- pure parts


def test_challenge_parsing():
    (c,) = parse_challenges('Bearer realm="https://auth.example/token",service="reg",'
                            'scope="repository:a/b:pull,push"')
    assert c.scheme == "bearer" and c.params["scope"] == "repository:a/b:pull,push"
    basic, negotiate, bearer = parse_challenges(['Basic realm="a, b"', 'Negotiate abc==, BEARER realm="x\\"y"'])
    assert basic.params == {"realm": "a, b"} and negotiate.params == {} and bearer.params == {"realm": 'x"y'}


@pytest.mark.parametrize("key", ["https://Reg.Example:5000/v1/", "http://reg.example:5000", "reg.example:5000"])
def test_registry_key_normalisation(key):
    assert normalise_registry_key(key) == "reg.example:5000"


def test_credentials_lookup(tmp_path):
    path = tmp_path / "config.json"
    assert lookup_credentials(path, "h:1").credentials is None
    hub = base64.b64encode(b"me:pw").decode()
    path.write_text(json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": hub}}}))
    creds = lookup_credentials(path, "registry-1.docker.io").credentials
    assert creds is not None and (creds.username, creds.password) == ("me", "pw")
    path.write_text(json.dumps({"auths": {"h:1": {"auth": "!!!"}}}))
    with pytest.raises(InputError, match="not base64"):
        lookup_credentials(path, "h:1")
    path.write_text(json.dumps({"auths": {}, "credHelpers": {"h:1": "pass"}}))
    found = lookup_credentials(path, "h:1")
    assert isinstance(found, CredentialLookup) and found.credentials is None and "docker-credential-pass" in found.note


def test_scheme_rules(tmp_path):
    none = frozenset()
    assert registry_scheme(ref_of("docker://127.0.0.5:5000/a:1"), none, none, str(tmp_path)) == "http"
    assert registry_scheme(ref_of("docker://localhost:5000/a:1"), none, none, str(tmp_path)) == "http"
    assert registry_scheme(ref_of("docker://[::1]:5000/a:1"), none, none, str(tmp_path)) == "http"
    assert registry_scheme(ref_of("docker://reg.example/a:1"), none, none, str(tmp_path)) == "https"
    assert registry_scheme(ref_of("docker://reg.example/a:1"), frozenset({"reg.example"}), none, str(tmp_path)) == "http"
    assert registry_scheme(ref_of("docker://127.0.0.1:5000/a:1"), none, frozenset({"127.0.0.1:5000"}),
                           str(tmp_path)) == "https"
    (tmp_path / "127.0.0.1:5001").mkdir()
    assert registry_scheme(ref_of("docker://127.0.0.1:5001/a:1"), none, none, str(tmp_path)) == "https"
    env = {"IMAGEFS_INSECURE_REGISTRIES": "reg.example:5000, other"}
    with RegistrySource(ref_of("docker://reg.example:5000/a:1"), environ=env, auth_file="/nonexistent") as src:
        assert src.scheme == "http"


def test_every_failure_is_an_imagefs_error(tmp_path):
    # A port that closes connections at once: the client must never leak an httpx exception.
    with HttpFront(None, lambda s: Reply(drop=True)) as front, \
            source(f"docker://{front.host}/a/b:1", tmp_path, sleep=Sleeps()) as src:
        for call in (src.root_manifest, lambda: src.read_range("sha256:" + "1" * 64, 0, 5),
                     lambda: b"".join(src.open_blob("sha256:" + "1" * 64, 5))):
            with pytest.raises(ImagefsError):
                call()
