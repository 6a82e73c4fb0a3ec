"""`RegistrySource`: images from a Docker Registry HTTP API v2 server (distribution, Harbor, Hub...).

Endpoints used: `GET /v2/REPO/manifests/REF` and `GET /v2/REPO/blobs/DIGEST`, the latter whole,
from an offset (resume) or as an exact byte range (the lazy read path). Blob GETs commonly redirect
to object storage; they are followed, and httpx drops the Authorization header when a redirect
leaves the registry's origin, so registry credentials never reach the storage host.
For publishing (stores/referrers.py) also: `HEAD /v2/REPO/blobs/DIGEST`, monolithic blob uploads
(`POST /v2/REPO/blobs/uploads/` then `PUT <location>&digest=`), `PUT /v2/REPO/manifests/REF`, and
`request()` for anything else (the referrers API); these ask for `repository:REPO:pull,push`.

Transport: one `httpx.Client` per source (keep-alive pool). Scheme per host, decided once:
  1. a host in `insecure` (HOST or HOST:PORT; also $IMAGEFS_INSECURE_REGISTRIES) -> plain HTTP;
  2. a host in `tls_hosts`, or with a directory CERTS_DIR/HOST[:PORT]/ -> HTTPS (even on loopback:
     configuring CAs for a host says it speaks TLS);
  3. `localhost`, 127.0.0.0/8 and ::1 -> plain HTTP;  4. anything else -> HTTPS.
HTTPS trusts the public roots plus `ca_file` (else $IMAGEFS_CA_FILE) plus every `*.crt` in
CERTS_DIR/HOST[:PORT]/ (docker's and skopeo's /etc/docker/certs.d convention).

Failures: 5xx, 429, connection errors, resets and timeouts are retried with bounded exponential
backoff (`RetryPolicy`); other statuses map to the project's errors at once. Nothing from httpx
leaves this module: every failure is an `ImagefsError` naming the registry, manifest or blob.

Concurrency: thread-safe. `read_range` and `open_blob` run in many worker threads at once; the
httpx client and its pool are thread-safe, per-call state is local, and the `Authenticator` locks
its own cache. Nothing here blocks on anything but the network and the retry sleep.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
import re
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx

from imagefs.errors import AuthError, DigestMismatch, ImagefsError, InputError, NotFound, RuntimeFailure
from stores.auth import Authenticator, credentials_file, lookup_credentials
from stores.digest import check_digest, sha256_digest, verify_bytes
from stores.model import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_SCHEMA1,
    DOCKER_SCHEMA1_SIGNED,
    OCI_INDEX,
    OCI_MANIFEST,
)
from stores.reference import DockerReference
from stores.source import ManifestBytes, Source

T = TypeVar("T")

# Schema1 types are listed so that a registry holding only schema1 answers with it and `resolve`
# can say why it is refused, instead of the registry answering 404 / "manifest unknown".
MANIFEST_ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST,
                             DOCKER_SCHEMA1_SIGNED, DOCKER_SCHEMA1))
MAX_MANIFEST_BYTES = 4 << 20  # what registries accept for a manifest; more is not a manifest
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
DEFAULT_CERTS_DIR = "/etc/docker/certs.d"
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` tries in all; before try n+1 sleep min(cap, base * 2**n), or the server's
    Retry-After when it asks for longer (still capped). `sleep` is injectable for tests."""

    attempts: int = 4
    base: float = 0.2
    cap: float = 5.0
    sleep: Callable[[float], None] = time.sleep

    def pause(self, attempt: int, retry_after: float | None = None) -> None:
        delay = min(self.cap, self.base * (2 ** attempt))
        if retry_after is not None:
            delay = min(self.cap, max(delay, retry_after))
        self.sleep(delay)


@dataclass(frozen=True)
class Answer:
    """A registry's 2xx answer to `RegistrySource.request`: status, headers (names lower-cased),
    the body read in full (empty for HEAD) and the URL that answered (after redirects)."""

    status: int
    headers: dict[str, str]
    body: bytes
    url: str


class _Transient(Exception):
    """A failed try worth another: a 5xx or 429 answer (transport errors are httpx's own)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


def is_loopback(hostname: str) -> bool:
    if hostname.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def _host_listed(ref: DockerReference, hosts: frozenset[str]) -> bool:
    return ref.host.lower() in hosts or ref.hostname.lower() in hosts


def registry_scheme(ref: DockerReference, insecure: frozenset[str], tls_hosts: frozenset[str],
                    certs_dir: str) -> str:
    """"http" or "https" for *ref*'s registry, by the rules in the module docstring."""
    if _host_listed(ref, insecure):
        return "http"
    if _host_listed(ref, tls_hosts) or (Path(certs_dir) / ref.host).is_dir():
        return "https"
    return "http" if is_loopback(ref.hostname) else "https"


def tls_context(ref: DockerReference, ca_file: str | None, certs_dir: str) -> ssl.SSLContext:
    """Public roots (as httpx trusts by default) plus the configured CAs for this registry."""
    context = httpx.create_ssl_context()
    extra = [Path(ca_file)] if ca_file else []
    host_dir = Path(certs_dir) / ref.host
    if host_dir.is_dir():
        extra += sorted(host_dir.glob("*.crt"))
    for path in extra:
        try:
            context.load_verify_locations(cafile=str(path))
        except FileNotFoundError:
            raise InputError(str(path), "CA file not found") from None
        except (ssl.SSLError, OSError) as e:
            raise InputError(str(path), f"not a PEM CA certificate: {e}") from None
    return context


def _parse_env_hosts(value: str | None) -> frozenset[str]:
    return frozenset(h.strip().lower() for h in (value or "").split(",") if h.strip())


def _error_body(response: httpx.Response, limit: int = 64 << 10) -> bytes:
    """Up to *limit* bytes of an error answer's body, for its message. Tolerant on purpose:
    distribution answers a 416 with the blob's Content-Length and a short text body, so reading
    an error body to the end may fail; the status alone must still produce the error."""
    parts, total = [], 0
    try:
        for chunk in response.iter_bytes():
            parts.append(chunk)
            total += len(chunk)
            if total >= limit:
                break
    except httpx.HTTPError:
        pass
    finally:
        response.close()
    return b"".join(parts)[:limit]


def _registry_detail(status: int, body: bytes) -> str:
    """The registry's own words for an error: `CODE: message` from its JSON errors, else text."""
    try:
        errors = json.loads(body).get("errors")
        parts = [f"{e.get('code', '?')}: {e.get('message', '')}".rstrip(": ") for e in errors if isinstance(e, dict)]
        if parts:
            return "; ".join(parts)
    except Exception:  # noqa: BLE001 - any non-JSON body falls through to its text
        pass
    lines = body.decode("utf-8", "replace").strip().splitlines()
    return f"HTTP {status}" + (f": {lines[0][:200]}" if lines else "")


def _cert_error(e: BaseException) -> ssl.SSLError | None:
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__


log = logging.getLogger(__name__)


@functools.cache
def system_tls_context() -> ssl.SSLContext:
    """The system's default TLS context, made once a process: loading its roots takes ~17 ms
    (more on a cold page cache), and a start opens several sources. Contexts are safe to share
    between clients and threads once configured, and this one is never changed."""
    return ssl.create_default_context()


class RegistrySource(Source):
    """A registry image source for one `DockerReference`.

    Options (see the module docstring for the rules): *auth_file* (docker config.json; default
    $IMAGEFS_AUTH_FILE or ~/.docker/config.json), *insecure* and *tls_hosts* (HOST or HOST:PORT),
    *ca_file* (default $IMAGEFS_CA_FILE), *certs_dir*, *retries* (tries per request) and *timeout*
    (seconds per network operation). *sleep*, *clock* and *environ* are for tests.
    """

    def __init__(self, ref: DockerReference, *, auth_file: str | None = None,
                 insecure: frozenset[str] = frozenset(), tls_hosts: frozenset[str] = frozenset(),
                 ca_file: str | None = None, certs_dir: str = DEFAULT_CERTS_DIR, retries: int = 4,
                 timeout: float = 30.0, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, environ: Mapping[str, str] = os.environ) -> None:
        self.reference = ref
        self._ref = ref  # the same, typed as a DockerReference
        insecure = frozenset(h.lower() for h in insecure) | _parse_env_hosts(environ.get("IMAGEFS_INSECURE_REGISTRIES"))
        tls_hosts = frozenset(h.lower() for h in tls_hosts)
        self.scheme = registry_scheme(ref, insecure, tls_hosts, certs_dir)
        self._certs_dir = certs_dir
        self._base_url = f"{self.scheme}://{ref.host}/v2/{ref.repository}"
        self._retry = RetryPolicy(attempts=max(1, retries), sleep=sleep)
        if self.scheme == "https":
            verify = tls_context(ref, ca_file or environ.get("IMAGEFS_CA_FILE") or None, certs_dir)
        else:
            # TLS only if a redirect or a token realm leads to https: the system's roots, verified
            # as ever, without loading certifi's bundle (~85 ms, on every lazy start's path).
            verify = system_tls_context()
        # follow_redirects: blob GETs are redirected to object storage; httpx drops Authorization
        # when the redirect changes origin. trust_env=False: no proxy or netrc surprises from the env.
        self._client = httpx.Client(verify=verify, timeout=httpx.Timeout(timeout), follow_redirects=True,
                                    trust_env=False,
                                    # identity: ranges must address the blob's own bytes, not a
                                    # compressed rendering of them that a CDN might choose.
                                    headers={"User-Agent": "imagefs", "Accept-Encoding": "identity"})
        creds_path = credentials_file(auth_file, environ)
        self._auth = Authenticator(ref.host, lambda: lookup_credentials(creds_path, ref.host),
                                  self._send_for_token, clock)
        self._scope = f"repository:{ref.repository}:pull"
        self._push_scope = f"repository:{ref.repository}:pull,push"

    # -- Source

    def root_manifest(self) -> ManifestBytes:
        return self._manifest(self._ref.selector, str(self._ref), self._ref.digest)

    def manifest(self, digest: str) -> ManifestBytes:
        check_digest(digest, f"{self._ref}: child manifest")
        return self._manifest(digest, str(self._ref.pinned(digest)), digest)

    def open_blob(self, digest: str, size: int, offset: int = 0) -> Iterator[bytes]:
        """Stream the blob from *offset*. A stream that breaks is resumed from the bytes already
        yielded with a Range request, within the retry budget; a server that ignores Range
        (200 instead of 206) is read from the start and the first bytes skipped."""
        what = self._blob_what(digest)
        check_digest(digest, what)
        if 0 <= size <= offset:
            if offset > size:
                raise InputError(what, f"offset {offset} is past the blob's end ({size} bytes)")
            return  # resuming a blob that was already complete: nothing to fetch
        pos, failures = offset, 0
        while True:
            response = self._retrying(what, lambda: self._open_blob_response(digest, pos, what))
            broken = ""
            try:
                skip = pos if response.status_code == 200 else 0
                for chunk in response.iter_bytes():
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                    if not chunk:
                        continue
                    pos += len(chunk)
                    if 0 <= size < pos:
                        raise InputError(what, f"blob is longer than its descriptor's {size} bytes")
                    yield chunk
            except httpx.TransportError as e:
                error = self._fatal(e, what)
                if error is not None:
                    raise error from None
                broken = _describe(e)
            except httpx.HTTPError as e:  # e.g. a body that fails to decode: not worth a retry
                raise RuntimeFailure(what, f"stream failed at byte {pos}: {_describe(e)}") from None
            finally:
                response.close()
            if not broken and (size < 0 or pos >= size):
                return
            # Broken, or ended cleanly but short (chunked encoding can): resume from pos.
            failures += 1
            if failures >= self._retry.attempts:
                raise RuntimeFailure(what, f"stream broken at byte {pos} of {size} after {failures} tries: "
                                           f"{broken or 'ended early'}")
            self._retry.pause(failures - 1)

    def read_range(self, digest: str, start: int, length: int) -> bytes:
        what = self._blob_what(digest)
        check_digest(digest, what)
        if start < 0 or length < 0:
            raise InputError(what, f"bad range start={start} length={length}")
        if length == 0:
            return b""
        log.debug("range read of %s: %d bytes at %d", digest[:19], length, start)   # -vv: where bytes go
        return self._retrying(what, lambda: self._read_range_once(digest, start, length, what))

    def pinned(self, manifest_digest: str) -> str:
        return str(self._ref.pinned(manifest_digest))

    def close(self) -> None:
        self._client.close()

    # -- generic requests and pushes (stores/referrers.py)

    def request(self, method: str, path: str, *, headers: Mapping[str, str] | None = None,
                content: bytes | None = None, push: bool = False, what: str | None = None,
                not_found: str = "not found", limit: int = MAX_MANIFEST_BYTES) -> Answer:
        """One request to `/v2/REPO/<path>` (or to *path* when it is an absolute URL) answered
        2xx, its body (at most *limit* bytes) read. Authenticated and retried like every other
        request, in push scope when *push*; failures are ImagefsErrors (NotFound for a 404)."""
        url = path if "://" in path else f"{self._base_url}/{path}"
        what = what or f"{method} {url}"
        scope = self._push_scope if push else self._scope

        def once() -> Answer:
            with closing(self._send(method, url, dict(headers or {}), what, not_found,
                                    content=content, scope=scope)) as response:
                body = b"" if method == "HEAD" else self._read_body(response, limit, what)
                return Answer(response.status_code, {k.lower(): v for k, v in response.headers.items()},
                              body, str(response.url))

        return self._retrying(what, once)

    def has_blob(self, digest: str, *, push: bool = False) -> bool:
        """Whether the repository holds blob *digest* (HEAD; in push scope when about to push)."""
        what = self._blob_what(digest)
        check_digest(digest, what)
        try:
            self.request("HEAD", f"blobs/{digest}", push=push, what=what, not_found="blob unknown")
        except NotFound:
            return False
        return True

    def put_blob(self, digest: str, data: bytes) -> None:
        """Upload *data* as blob *digest*, monolithically: `POST /blobs/uploads/` for a session,
        then one `PUT <location>&digest=` with the bytes. A transient failure restarts both."""
        what = self._blob_what(digest)
        check_digest(digest, what)
        verify_bytes(data, digest, what)  # never publish bytes under another name

        def once() -> None:
            with closing(self._send("POST", f"{self._base_url}/blobs/uploads/", {}, what, "repository unknown",
                                    content=b"", scope=self._push_scope)) as started:
                location = started.headers.get("Location")
                if not location:
                    raise InputError(what, f"upload started (HTTP {started.status_code}) without a Location")
                target = started.url.join(location).copy_merge_params({"digest": digest})
            headers = {"Content-Type": "application/octet-stream"}
            with closing(self._send("PUT", str(target), headers, what, "upload unknown", content=data,
                                    scope=self._push_scope)) as done:
                served = done.headers.get("Docker-Content-Digest", "")
            if served.startswith("sha256:") and served != digest:
                raise DigestMismatch(f"{what}: upload (Docker-Content-Digest)", digest, served)

        self._retrying(what, once)

    def put_manifest(self, reference: str, data: bytes, media_type: str) -> dict[str, str]:
        """`PUT /v2/REPO/manifests/<reference>` (a tag or the data's digest); returns the answer's
        headers (names lower-cased: `oci-subject` says the registry indexed a `subject`)."""
        what = f"manifest {reference} in {self._repo_what}"
        digest = sha256_digest(data)
        if reference.startswith("sha256:") and reference != digest:
            raise DigestMismatch(what, reference, digest)
        answer = self.request("PUT", f"manifests/{reference}", headers={"Content-Type": media_type},
                              content=data, push=True, what=what, not_found="repository unknown")
        served = answer.headers.get("docker-content-digest", "")
        if served.startswith("sha256:") and served != digest:
            raise DigestMismatch(f"{what} (Docker-Content-Digest)", digest, served)
        return answer.headers

    # -- manifests

    def _manifest(self, selector: str, what: str, expect: str | None) -> ManifestBytes:
        url = f"{self._base_url}/manifests/{selector}"

        def once() -> ManifestBytes:
            with closing(self._get(url, {"Accept": MANIFEST_ACCEPT}, what, "manifest unknown")) as response:
                declared = response.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > MAX_MANIFEST_BYTES:
                    raise InputError(what, f"manifest too large ({declared} bytes)")
                data = self._read_body(response, MAX_MANIFEST_BYTES, what)
                media_type = response.headers.get("Content-Type", "").split(";", 1)[0].strip()
                served = response.headers.get("Docker-Content-Digest", "")
            digest = sha256_digest(data)
            if expect and digest != expect:
                raise DigestMismatch(f"{what}: manifest", expect, digest)
            # By tag the registry's digest is only a hint; a sha256 one that disagrees is corruption.
            if served.startswith("sha256:") and served != digest:
                raise DigestMismatch(f"{what}: manifest (Docker-Content-Digest)", served, digest)
            return ManifestBytes(data, media_type, digest)

        return self._retrying(what, once)

    @staticmethod
    def _read_body(response: httpx.Response, limit: int, what: str) -> bytes:
        parts, total = [], 0
        for chunk in response.iter_bytes():
            total += len(chunk)
            if total > limit:
                raise InputError(what, f"manifest larger than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    # -- blobs

    def _blob_what(self, digest: str) -> str:
        return f"blob {digest} in {self._ref.host}/{self._ref.repository}"

    def _blob_url(self, digest: str) -> str:
        return f"{self._base_url}/blobs/{digest}"

    def _open_blob_response(self, digest: str, pos: int, what: str) -> httpx.Response:
        headers = {"Range": f"bytes={pos}-"} if pos > 0 else {}
        response = self._get(self._blob_url(digest), headers, what, "blob unknown")
        try:
            if response.status_code == 206:
                first, _, _ = self._content_range(response, what)
                if first != pos:
                    raise InputError(what, f"asked for bytes from {pos}, registry sent from {first}")
            elif response.status_code != 200:
                raise InputError(what, f"unexpected HTTP {response.status_code} for a blob")
        except BaseException:
            response.close()
            raise
        return response

    def _read_range_once(self, digest: str, start: int, length: int, what: str) -> bytes:
        end = start + length - 1
        with closing(self._get(self._blob_url(digest), {"Range": f"bytes={start}-{end}"}, what, "blob unknown")) as response:
            if response.status_code == 206:
                first, last, total = self._content_range(response, what)
                if first != start or last != end:
                    size = f" (blob has {total} bytes)" if total is not None else ""
                    raise InputError(what, f"asked for bytes {start}-{end}, registry sent {first}-{last}{size}")
                data = response.read()
            elif response.status_code == 200:
                # A server that ignores Range sends it all: read up to the range, keep the range.
                data = self._slice_stream(response, start, length)
            else:
                raise InputError(what, f"unexpected HTTP {response.status_code} for a range read")
        if len(data) != length:
            raise RuntimeFailure(what, f"short read: {len(data)} of {length} bytes at offset {start}")
        return data

    @staticmethod
    def _slice_stream(response: httpx.Response, start: int, length: int) -> bytes:
        out, pos = bytearray(), 0
        for chunk in response.iter_bytes():
            lo, hi = max(start - pos, 0), min(start + length - pos, len(chunk))
            if lo < hi:
                out += chunk[lo:hi]
            pos += len(chunk)
            if pos >= start + length:
                break
        return bytes(out)

    @staticmethod
    def _content_range(response: httpx.Response, what: str) -> tuple[int, int, int | None]:
        m = _CONTENT_RANGE.match(response.headers.get("Content-Range", "").strip())
        if not m:
            raise InputError(what, f"bad Content-Range {response.headers.get('Content-Range')!r} in a 206 answer")
        total = None if m.group(3) == "*" else int(m.group(3))
        return int(m.group(1)), int(m.group(2)), total

    # -- requests, auth and retries

    def _get(self, url: str, headers: dict[str, str], what: str, not_found: str) -> httpx.Response:
        """One GET answered 2xx, as an open streaming response (the caller closes it). Answers a
        401 challenge once; raises `_Transient` for statuses worth retrying, ImagefsErrors else."""
        return self._send("GET", url, headers, what, not_found)

    def _send(self, method: str, url: str, headers: dict[str, str], what: str, not_found: str, *,
              content: bytes | None = None, scope: str | None = None) -> httpx.Response:
        """`_get` for any method, with an optional body and auth scope (default: pull)."""
        scope = scope or self._scope
        answered = False
        while True:
            sent = self._auth.header(scope)
            request = self._client.build_request(method, url, content=content,
                                                 headers={**headers, "Authorization": sent} if sent else headers)
            response = self._client.send(request, stream=True)
            if response.is_success:
                return response
            status = response.status_code
            detail = _registry_detail(status, _error_body(response))
            if status == 401 and not answered:
                self._auth.answer(response.headers.get_list("WWW-Authenticate"), scope, sent, self._repo_what)
                answered = True
                continue
            if status in RETRY_STATUS:
                raise _Transient(f"HTTP {status}: {detail}", self._retry_after(response))
            if status in (401, 403) and scope != self._scope:
                raise AuthError(self._repo_what, f"push refused ({detail})")
            if status in (401, 403):
                raise AuthError(self._repo_what, f"{self._auth.refused(sent)} ({detail})")
            if status == 404:
                raise NotFound(what, f"{not_found} ({detail})")
            if status == 416:
                # Asked for bytes past the end the registry has: the blob there is truncated.
                held = response.headers.get("Content-Range", "").rpartition("/")[2]
                have = f"the registry holds only {held} bytes" if held.isdigit() else "range not satisfiable"
                raise InputError(what, f"truncated: {have} ({response.headers.get('Content-Range', detail)})")
            raise InputError(what, f"registry answered {detail}")

    @property
    def _repo_what(self) -> str:
        return f"{self._ref.host}/{self._ref.repository}"

    @staticmethod
    def _retry_after(response: httpx.Response) -> float | None:
        value = response.headers.get("Retry-After", "")
        return float(value) if value.isdigit() else None

    def _retrying(self, what: str, once: Callable[[], T]) -> T:
        """Run *once* up to `retry.attempts` times while it fails transiently."""
        last = ""
        for attempt in range(self._retry.attempts):
            retry_after = None
            try:
                return once()
            except _Transient as e:
                last, retry_after = str(e), e.retry_after
            except httpx.TransportError as e:
                error = self._fatal(e, what)
                if error is not None:
                    raise error from None
                last = _describe(e)
            except httpx.HTTPError as e:  # redirect loops, bad URLs: nothing a retry would change
                raise self._as_error(e, what) from None
            if attempt + 1 < self._retry.attempts:
                self._retry.pause(attempt, retry_after)
        raise RuntimeFailure(self._ref.host, f"{what}: giving up after {self._retry.attempts} tries: {last}")

    def _fatal(self, e: httpx.HTTPError, what: str) -> ImagefsError | None:
        """None when a retry may help (timeouts, refused or reset connections, broken streams),
        else the ImagefsError to raise. TLS failures are never transient."""
        if _cert_error(e) is None and isinstance(e, (httpx.TimeoutException, httpx.NetworkError,
                                                     httpx.RemoteProtocolError)):
            return None
        return self._as_error(e, what)

    def _as_error(self, e: httpx.HTTPError, what: str) -> ImagefsError:
        ssl_error = _cert_error(e)
        if isinstance(ssl_error, ssl.SSLCertVerificationError):
            return InputError(self._ref.host, f"TLS certificate verify failed ({ssl_error.verify_message}); give the "
                              f"registry's CA with $IMAGEFS_CA_FILE or {self._certs_dir}/{self._ref.host}/ca.crt")
        if ssl_error is not None:
            return RuntimeFailure(self._ref.host, f"TLS failed ({ssl_error.reason or ssl_error}); does it serve HTTPS?")
        if isinstance(e, httpx.TooManyRedirects):
            return InputError(what, "too many redirects")
        return RuntimeFailure(self._ref.host, f"{what}: {_describe(e)}")

    def _send_for_token(self, request: httpx.Request) -> httpx.Response:
        """Token requests for the Authenticator: retried like the rest, body read, no auth loop."""
        where = f"token server {request.url.copy_with(query=None)}"

        def once() -> httpx.Response:
            response = self._client.send(request)
            if response.status_code in RETRY_STATUS:
                raise _Transient(f"HTTP {response.status_code}", self._retry_after(response))
            return response

        return self._retrying(where, once)

