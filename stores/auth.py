"""Registry authentication: docker credentials files, `WWW-Authenticate` challenges, bearer tokens.

The flow is Docker's: a request goes out anonymously; a 401 names a scheme. `Basic` is answered with
the user's credentials for the registry host from a docker `config.json`; `Bearer realm=...,
service=...,scope=...` with a token fetched from the realm (with basic credentials when we have
them, anonymously otherwise). Once a registry has challenged, later requests carry the answer up
front, so range reads do not pay a 401 round trip each.

Concurrency: an `Authenticator` is shared by every thread reading through one `RegistrySource`.
One lock guards its scheme and token cache. Token fetches happen under that lock, on purpose: when a
token expires, the threads that find it expired wait for one fetch instead of each making their own.
The credentials file is read once, lazily, when a challenge first needs it.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from imagefs.errors import AuthError, InputError, RuntimeFailure
from stores.reference import DOCKER_HUB

DEFAULT_TOKEN_LIFETIME = 60.0  # seconds, when the token server sends no expires_in (the spec's default)

# RFC 7235: challenge = scheme [ token68 / #auth-param ]; auth-param = token "=" (token / quoted-string)
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_SCHEME_RE = re.compile(rf"[\s,]*({_TOKEN})")
# Unquoted values are taken leniently (some servers send bare URLs), but never start with "=",
# so that a token68 such as "abc==" is not read as a parameter.
_PARAM_RE = re.compile(rf'\s*({_TOKEN})\s*=\s*("(?:[^"\\]|\\.)*"|(?:[^,\s"=][^,\s"]*)?)\s*(?:,|$)')
_TOKEN68_RE = re.compile(r"\s+([A-Za-z0-9._~+/-]+=*)\s*(?:,|$)")

# Docker Hub's credentials are filed under its old index names.
_HUB_ALIASES = (DOCKER_HUB, "index.docker.io", "docker.io")


@dataclass(frozen=True)
class Challenge:
    """One auth challenge: a scheme (lower-cased) and its parameters (names lower-cased)."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)


def parse_challenges(values: list[str] | str) -> list[Challenge]:
    """Parse `WWW-Authenticate` header values; one value may hold several challenges.

    Quoted parameter values may contain commas and escaped quotes. Unparseable tails are dropped:
    a registry's odd header must not hide a usable challenge in front of it.
    """
    if isinstance(values, str):
        values = [values]
    out: list[Challenge] = []
    for text in values:
        pos = 0
        while pos < len(text):
            m = _SCHEME_RE.match(text, pos)
            if not m:
                break
            challenge = Challenge(m.group(1).lower())
            pos = m.end()
            t68 = _TOKEN68_RE.match(text, pos)
            if t68 and not _PARAM_RE.match(text, pos):
                pos = t68.end()
            else:
                while (p := _PARAM_RE.match(text, pos)) is not None and p.end() > pos:
                    value = p.group(2)
                    if value.startswith('"'):
                        value = re.sub(r"\\(.)", r"\1", value[1:-1])
                    challenge.params[p.group(1).lower()] = value
                    pos = p.end()
            out.append(challenge)
            if pos < len(text) and not _SCHEME_RE.match(text, pos):
                break
    return out


# -- credentials


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


@dataclass(frozen=True)
class CredentialLookup:
    """What the credentials file says about one host: credentials, or why there are none
    (said in an AuthError when the registry turns out to need them)."""

    credentials: Credentials | None
    note: str


def credentials_file(auth_file: str | None = None, environ: Mapping[str, str] = os.environ) -> Path:
    """The docker-format credentials file: *auth_file*, else $IMAGEFS_AUTH_FILE, else
    ~/.docker/config.json."""
    if auth_file:
        return Path(auth_file)
    if environ.get("IMAGEFS_AUTH_FILE"):
        return Path(environ["IMAGEFS_AUTH_FILE"])
    home = environ.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".docker" / "config.json"


def normalise_registry_key(key: str) -> str:
    """`https://host:port/v1/`, `http://host`, `HOST:PORT` -> `host:port` (as docker files them)."""
    key = key.strip()
    for prefix in ("https://", "http://"):
        if key.lower().startswith(prefix):
            key = key[len(prefix):]
    return key.split("/", 1)[0].lower()


def lookup_credentials(path: Path, host: str) -> CredentialLookup:
    """Find credentials for registry *host* ("host[:port]") in a docker config.json.

    A missing file means no credentials; a malformed one is an InputError naming the file.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return CredentialLookup(None, f"no credentials file {path}")
    except OSError as e:
        raise InputError(str(path), f"cannot read credentials file: {e.strerror}") from None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(str(path), f"malformed JSON: {e}") from None
    if not isinstance(doc, dict):
        raise InputError(str(path), "malformed credentials file: not a JSON object")
    auths = doc.get("auths") or {}
    if not isinstance(auths, dict):
        raise InputError(str(path), "malformed credentials file: 'auths' is not an object")
    wanted = [host.lower()]
    if host.lower() in _HUB_ALIASES:
        wanted += [a for a in _HUB_ALIASES if a != host.lower()]
    entries = {normalise_registry_key(k): v for k, v in auths.items()}
    for name in wanted:
        if name in entries:
            return CredentialLookup(_entry_credentials(entries[name], path, name), f"credentials from {path}")
    helpers = doc.get("credHelpers") or {}
    helper = (helpers.get(host) if isinstance(helpers, dict) else None) or doc.get("credsStore")
    if isinstance(helper, str) and helper:
        return CredentialLookup(None, f"{path} names credential helper docker-credential-{helper}, "
                                      "which imagefs does not support (put the credentials in 'auths')")
    return CredentialLookup(None, f"no credentials for {host} in {path}")


def _entry_credentials(entry: object, path: Path, name: str) -> Credentials | None:
    if not isinstance(entry, dict):
        raise InputError(str(path), f"malformed credentials file: auths entry for {name} is not an object")
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise InputError(str(path), f"malformed credentials file: auth for {name} is not base64 'user:password'") from None
        if not sep:
            raise InputError(str(path), f"malformed credentials file: auth for {name} is not 'user:password'")
        return Credentials(user, password)
    username, secret = entry.get("username"), entry.get("password")
    if isinstance(username, str) and isinstance(secret, str) and username:
        return Credentials(username, secret)
    return None


# -- answering challenges


@dataclass
class _Token:
    header: str  # "Bearer <jwt>"
    expires_at: float  # by the authenticator's clock


class Authenticator:
    """Answers one registry host's challenges and caches what it learnt (scheme, tokens per scope).

    *lookup* yields the credentials for the host (called at most once, when first needed). *fetch*
    sends a request to the token realm (the registry client's retrying sender, without auth).
    *clock* is monotonic seconds; tests pass their own to expire tokens without waiting.
    """

    def __init__(self, host: str, lookup: Callable[[], CredentialLookup],
                 fetch: Callable[[httpx.Request], httpx.Response], clock: Callable[[], float] = time.monotonic) -> None:
        self.host = host
        self._lookup = lookup
        self._fetch = fetch
        self._clock = clock
        self._lock = threading.Lock()
        self._creds: CredentialLookup | None = None
        self._scheme: str | None = None  # "basic" or "bearer" once the registry has challenged
        self._bearer: dict[str, str] = {}  # realm and service from the last bearer challenge
        self._tokens: dict[str, _Token] = {}

    def header(self, scope: str) -> str | None:
        """The Authorization value for a request in *scope*, or None to go anonymously."""
        with self._lock:
            if self._scheme == "basic":
                creds = self._credentials().credentials
                return creds.basic() if creds else None
            if self._scheme == "bearer":
                token = self._tokens.get(scope)
                if token is None or self._clock() >= token.expires_at:
                    token = self._new_token(scope, self._bearer)
                return token.header
            return None

    def answer(self, challenges: list[str], scope: str, sent: str | None, what: str) -> None:
        """Learn from a 401 to a request that carried *sent* (None: anonymous). Afterwards
        `header(scope)` gives what to retry with; raises AuthError when there is nothing to try."""
        parsed = parse_challenges(challenges)
        bearer = next((c for c in parsed if c.scheme == "bearer" and c.params.get("realm")), None)
        basic = next((c for c in parsed if c.scheme == "basic"), None)
        with self._lock:
            if bearer is not None:
                self._scheme = "bearer"
                self._bearer = bearer.params
                current = self._tokens.get(scope)
                # Another thread may have refreshed the token since this request went out.
                if current is None or current.header == sent or self._clock() >= current.expires_at:
                    self._new_token(scope, bearer.params)
                return
            if basic is not None:
                lookup = self._credentials()
                if lookup.credentials is None:
                    raise AuthError(what, f"registry requires authentication; {lookup.note}")
                if sent == lookup.credentials.basic():
                    raise AuthError(what, f"credentials refused (user {lookup.credentials.username}, {lookup.note})")
                self._scheme = "basic"
                return
        offered = ", ".join(c.scheme for c in parsed) or "none"
        raise AuthError(what, f"registry answered 401 with no usable challenge (offered: {offered})")

    def refused(self, sent: str | None) -> str:
        """Why a request that carried *sent* was still refused (401/403), for the AuthError."""
        with self._lock:
            lookup = self._credentials()
        creds = lookup.credentials
        who = f"user {creds.username}, {lookup.note}" if creds else f"anonymous; {lookup.note}"
        if creds is not None and sent == creds.basic():
            return f"credentials refused ({who})"
        if sent is not None and sent.startswith("Bearer "):
            return f"token from {self._bearer.get('realm', '?')} does not grant pull access ({who})"
        return f"access denied ({who})"

    # -- under the lock

    def _credentials(self) -> CredentialLookup:
        if self._creds is None:
            self._creds = self._lookup()
        return self._creds

    def _new_token(self, scope: str, params: dict[str, str]) -> _Token:
        realm = params.get("realm", "")
        query: dict[str, str | list[str]] = {}
        if params.get("service"):
            query["service"] = params["service"]
        # The challenge's scope is what the registry wants for this request; ours is the same
        # repository:NAME:pull unless the registry asks for more.
        query["scope"] = [s for s in (params.get("scope") or scope).split(" ") if s]
        lookup = self._credentials()
        headers = {}
        if lookup.credentials is not None:
            headers["Authorization"] = lookup.credentials.basic()
            query["account"] = lookup.credentials.username
        try:
            request = httpx.Request("GET", realm, params=query, headers=headers)
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as e:
            raise InputError(self.host, f"bad token realm {realm!r}: {e}") from None
        response = self._fetch(request)
        where = f"token server {realm}"
        if response.status_code in (401, 403):
            who = f"user {lookup.credentials.username}" if lookup.credentials else f"anonymous; {lookup.note}"
            raise AuthError(where, f"refused credentials ({who}) for {self.host}")
        if not response.is_success:
            raise RuntimeFailure(where, f"token request failed: HTTP {response.status_code}")
        try:
            doc = json.loads(response.content)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(where, f"malformed token response: {e}") from None
        value = (doc.get("token") or doc.get("access_token")) if isinstance(doc, dict) else None
        if not isinstance(value, str) or not value:
            raise InputError(where, "malformed token response: no token or access_token")
        lifetime = doc.get("expires_in")
        if not isinstance(lifetime, (int, float)) or isinstance(lifetime, bool) or lifetime <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME
        # Renew a little early so a token does not expire between our check and the registry's.
        token = _Token(f"Bearer {value}", self._clock() + lifetime - min(10.0, lifetime / 10))
        self._tokens[scope] = token
        return token
