"""The project's error type and the single place it becomes a message and an exit status.

Every layer raises `ImagefsError(what, why)`: *what* names the thing at fault (a reference, a blob
digest, a file), *why* says what is wrong with it. The CLI prints `imagefs: <what>: <why>` and exits
with `status`, so bad input never ends in a traceback.
"""

from __future__ import annotations

EXIT_RUNTIME = 1
EXIT_USAGE = 2


class ImagefsError(Exception):
    """An error with a one-line explanation; `status` is the CLI exit code it maps to."""

    status: int = EXIT_USAGE

    def __init__(self, what: str, why: str, *, status: int | None = None) -> None:
        super().__init__(f"{what}: {why}")
        self.what = what
        self.why = why
        if status is not None:
            self.status = status

    def line(self) -> str:
        return f"imagefs: {self.what}: {self.why}"


class InputError(ImagefsError):
    """Bad usage or bad input (a reference, a manifest, a blob): exit 2."""

    status = EXIT_USAGE


class DigestMismatch(InputError):
    """Content whose sha256 is not the digest it was asked for."""

    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(what, f"digest mismatch: expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class NotFound(InputError):
    """A reference, manifest or blob that does not exist."""


class AuthError(InputError):
    """Credentials missing or refused (401/403)."""


class RuntimeFailure(ImagefsError):
    """Something failed while doing valid work (network down, disk full): exit 1."""

    status = EXIT_RUNTIME
