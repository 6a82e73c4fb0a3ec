"""Digests (`sha256:<hex>`) and a hashing writer that verifies content while it streams in."""

from __future__ import annotations

import hashlib
import re

from imagefs.errors import DigestMismatch, InputError

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def check_digest(digest: str, what: str = "digest") -> str:
    """Return *digest* if it is a well-formed sha256 digest, else raise an InputError naming *what*."""
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise InputError(what, f"not a sha256 digest: {digest!r}")
    return digest


def hex_of(digest: str) -> str:
    return check_digest(digest)[len("sha256:"):]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def verify_bytes(data: bytes, expected: str, what: str) -> bytes:
    """Return *data* if its digest is *expected*; raise DigestMismatch naming *what* otherwise."""
    actual = sha256_digest(data)
    if actual != expected:
        raise DigestMismatch(what, expected, actual)
    return data
