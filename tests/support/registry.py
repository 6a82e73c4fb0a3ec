"""A real Docker registry (Debian's `docker-registry`, distribution 2.8) on a free loopback port.

Each instance has its own storage and config under a temp dir and is stopped by the PID we started.
Options: htpasswd basic auth, TLS with a test CA, token auth (`auth` passed through verbatim).
`HttpFront` puts a scriptable HTTP server in front of one (proxy, redirector, flaky link, fake).
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from tests.support.images import wait_until

REGISTRY_BIN = "/usr/bin/docker-registry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Registry:
    root: Path
    port: int = 0
    tls_cert: str | None = None
    tls_key: str | None = None
    htpasswd: str | None = None
    auth: dict | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_cert else 'http'}://{self.host}"

    def ref(self, repo_tag: str) -> str:
        return f"docker://{self.host}/{repo_tag}"

    def start(self) -> Registry:
        self.port = self.port or free_port()
        storage = self.root / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        http: dict = {"addr": f"127.0.0.1:{self.port}", "secret": "imagefs-test"}
        if self.tls_cert:
            http["tls"] = {"certificate": self.tls_cert, "key": self.tls_key}
        config: dict = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
            "http": http,
        }
        if self.htpasswd:
            config["auth"] = {"htpasswd": {"realm": "imagefs-test", "path": self.htpasswd}}
        elif self.auth:
            config["auth"] = self.auth
        cfg = self.root / "config.yml"
        cfg.write_text(json.dumps(config))  # JSON is YAML
        log = open(self.root / "registry.log", "wb")
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()
        try:
            wait_until(self._answers, 20, f"registry on {self.host}")
        except BaseException:
            self.stop()
            raise
        return self

    def _answers(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {(self.root / 'registry.log').read_text()[-2000:]}")
        try:
            httpx.get(f"{self.url}/v2/", verify=False, timeout=1)
            return True
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_htpasswd(path: Path, user: str, password: str) -> str:
    """bcrypt htpasswd entry (distribution accepts only bcrypt), via apache2-utils' htpasswd."""
    subprocess.run(["htpasswd", "-Bbc", str(path), user, password], check=True, capture_output=True)
    return str(path)


def make_ca_and_cert(directory: Path, hostname: str = "127.0.0.1") -> tuple[str, str, str]:
    """A throwaway CA and a server cert for *hostname* (IP SAN); returns (ca, cert, key) paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (d / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt"))
    ext = d / "ext.cnf"
    ext.write_text(f"subjectAltName=IP:{hostname}\nbasicConstraints=CA:FALSE\n")
    run = lambda *a: subprocess.run(list(a), check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
        "-days", "2", "-subj", "/CN=imagefs test CA")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", f"/CN={hostname}")
    run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return str(ca), str(cert), str(key)


# -- a scriptable HTTP front: proxy, redirector, flaky link or fake registry (for client tests)


@dataclass
class Seen:
    """A request an `HttpFront` received."""

    method: str
    path: str
    headers: dict[str, str]  # names lower-cased


@dataclass
class Reply:
    """A canned answer from an `HttpFront` hook. `cut_after`: announce the whole body but send
    only that many bytes, then drop the connection (a stream broken mid-way). `drop`: close the
    connection without answering at all (a reset)."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    cut_after: int | None = None
    drop: bool = False


class HttpFront:
    """A small HTTP/1.1 server on 127.0.0.1 in a thread. Each request is recorded in `seen`, then
    answered by `hook(seen)` when it returns a Reply, else forwarded to *upstream* unchanged
    (redirects not followed), else answered 404. Keep-alive works as with a real registry."""

    def __init__(self, upstream: str | None = None, hook=None) -> None:
        self.upstream = upstream
        self.hook = hook
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._client: httpx.Client | None = None
        self.port = 0  # kept after stop, so a test can still name the host in its asserts

    @property
    def host(self) -> str:
        assert self.port, "HttpFront not started"
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def requests(self, contains: str = "") -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if contains in s.path]

    def start(self) -> HttpFront:
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                seen = Seen("GET", self.path, {k.lower(): v for k, v in self.headers.items()})
                with front._lock:
                    front.seen.append(seen)
                reply = front.hook(seen) if front.hook else None
                if reply is None:
                    reply = front._forward(seen)
                if reply.drop:
                    self.close_connection = True
                    return
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                if reply.cut_after is None:
                    self.wfile.write(reply.body)
                else:
                    self.wfile.write(reply.body[:reply.cut_after])
                    self.wfile.flush()
                    self.close_connection = True

        self._client = httpx.Client(timeout=30, trust_env=False, follow_redirects=False)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="httpfront", daemon=True)
        self._thread.start()
        return self

    def _forward(self, seen: Seen) -> Reply:
        if not self.upstream or self._client is None:
            return Reply(404, {"Content-Type": "application/json"},
                         b'{"errors":[{"code":"NOT_FOUND","message":"nothing here"}]}')
        headers = {k: v for k, v in seen.headers.items() if k not in ("host", "connection", "accept-encoding")}
        r = self._client.get(self.upstream + seen.path, headers=headers)
        keep = {k: v for k, v in r.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding")}
        return Reply(r.status_code, keep, r.content)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> HttpFront:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
