"""A Docker token server (the `Bearer realm=...` side of registry auth) on 127.0.0.1, in a thread.

It issues RS256 JWTs that distribution 2.8's `token` auth accepts: the header carries the signing
certificate in `x5c`, and the registry verifies that chain against its `rootcertbundle` (the test
CA). Signing goes through the `openssl` command (already needed for the test CA), so the tests need
no JWT or crypto package.

Policy, enough to test a client: users with a password may pull and push; anonymous callers get
pull only when `anonymous_pull` is set, else a token with no access (the registry then answers
401 insufficient_scope). Wrong basic credentials get 401. Every request is recorded.
"""

from __future__ import annotations

import base64
import json
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ISSUER = "imagefs-test-issuer"
SERVICE = "imagefs-test-registry"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _pem_to_der_b64(cert_pem: str) -> str:
    lines = [ln for ln in Path(cert_pem).read_text().splitlines() if ln and not ln.startswith("-----")]
    return "".join(lines)


@dataclass
class TokenRequest:
    """What one token request asked for and how it authenticated."""

    account: str | None  # user of valid basic credentials, None when anonymous
    service: str
    scopes: list[str]


@dataclass
class TokenServer:
    """Issue registry tokens signed with *key* (PEM) whose certificate *cert* chains to the CA the
    registry trusts. `expires_in` is what the JSON answer announces (and the JWT's exp)."""

    cert: str
    key: str
    users: dict[str, str] = field(default_factory=dict)
    anonymous_pull: bool = False
    expires_in: int = 300
    field_name: str = "token"  # or "access_token" (the OAuth2 spelling, also accepted by clients)
    # Tokens (numbered from 1 in issue order) to issue already expired while announcing them as
    # valid: the registry refuses them, a client must fetch a fresh one.
    expired_tokens: frozenset[int] = frozenset()
    issued: int = 0
    requests: list[TokenRequest] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def realm(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def registry_auth(self, rootcertbundle: str) -> dict:
        """The `auth:` section of a distribution config that trusts this server."""
        return {"token": {"realm": self.realm, "service": SERVICE, "issuer": ISSUER,
                          "rootcertbundle": rootcertbundle}}

    def start(self) -> TokenServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                status, body = owner._answer(self.path, self.headers.get("Authorization"))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 401:
                    self.send_header("WWW-Authenticate", 'Basic realm="imagefs-test-tokens"')
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="tokenserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def reset(self, **settings: object) -> None:
        """Forget recorded requests and change policy settings between tests."""
        with self._lock:
            self.requests.clear()
            self.issued = 0
            for name, value in settings.items():
                setattr(self, name, value)

    # -- the token endpoint

    def _answer(self, path: str, authorization: str | None) -> tuple[int, dict]:
        url = urllib.parse.urlsplit(path)
        if url.path != "/token":
            return 404, {"errors": [{"code": "NOT_FOUND", "message": url.path}]}
        query = urllib.parse.parse_qs(url.query)
        service = query.get("service", [""])[0]
        scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
        account = None
        if authorization:
            scheme, _, encoded = authorization.partition(" ")
            try:
                user, _, password = base64.b64decode(encoded).decode().partition(":")
            except ValueError:
                return 400, {"details": "bad Authorization header"}
            if scheme.lower() != "basic" or self.users.get(user) != password:
                return 401, {"details": "incorrect username or password"}
            account = user
        with self._lock:
            self.requests.append(TokenRequest(account, service, scopes))
            self.issued += 1
            expired = self.issued in self.expired_tokens
            expires_in, field_name = self.expires_in, self.field_name
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository" or not name:
                continue
            allowed = {"pull", "push"} if account else ({"pull"} if self.anonymous_pull else set())
            granted = sorted(allowed & set(actions.split(",")))
            if granted:
                access.append({"type": "repository", "name": name, "actions": granted})
        now = int(time.time())
        # distribution allows 60 s of clock skew on exp: a token meant to be refused is far older.
        issued = now - 7200 if expired else now
        claims = {"iss": ISSUER, "sub": account or "", "aud": service, "iat": issued, "nbf": issued - 1,
                  "exp": issued + expires_in, "jti": f"{now}-{len(self.requests)}", "access": access}
        return 200, {field_name: self._sign(claims), "expires_in": expires_in}

    def _sign(self, claims: dict) -> str:
        header = {"typ": "JWT", "alg": "RS256", "x5c": [_pem_to_der_b64(self.cert)]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", self.key], input=signing_input.encode(),
                                   capture_output=True, check=True).stdout
        return f"{signing_input}.{_b64url(signature)}"
