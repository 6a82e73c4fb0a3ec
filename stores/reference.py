"""Image references in skopeo's transport syntax, parsed into one dataclass per transport.

    docker://HOST[:PORT]/REPO[:TAG|@sha256:...]    oci:PATH[:TAG]
    docker-archive:PATH                           appc:NAME[,KEY=VALUE...]

A reference with no transport (`127.0.0.1:5000/busybox:latest`, as Mesos task JSON writes Docker
image names) is taken as `docker://`. Pure parsing: nothing here touches the network or disk.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from imagefs.errors import InputError
from stores.digest import check_digest

DOCKER_HUB = "registry-1.docker.io"
_REPO_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HOST = re.compile(r"^(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")


@dataclass(frozen=True)
class DockerReference:
    host: str  # "host[:port]" as the registry is addressed
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def hostname(self) -> str:
        host = self.host
        if host.startswith("["):
            return host[1:host.index("]")]
        return host.rsplit(":", 1)[0] if ":" in host else host

    @property
    def selector(self) -> str:
        """What to ask the manifests endpoint for: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def pinned(self, digest: str) -> DockerReference:
        return DockerReference(self.host, self.repository, None, digest)

    def __str__(self) -> str:
        s = f"docker://{self.host}/{self.repository}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


@dataclass(frozen=True)
class OciReference:
    path: str  # absolute
    tag: str | None = None

    def __str__(self) -> str:
        return f"oci:{self.path}" + (f":{self.tag}" if self.tag else "")


@dataclass(frozen=True)
class DockerArchiveReference:
    path: str  # absolute
    name: str | None = None  # optional "repo:tag" to pick one image out of a multi-image archive

    def __str__(self) -> str:
        return f"docker-archive:{self.path}" + (f":{self.name}" if self.name else "")


@dataclass(frozen=True)
class AppcReference:
    name: str
    labels: dict[str, str] = field(default_factory=dict, hash=False)

    def __str__(self) -> str:
        extra = "".join(f",{k}={v}" for k, v in sorted(self.labels.items()))
        return f"appc:{self.name}{extra}"


Reference = DockerReference | OciReference | DockerArchiveReference | AppcReference


def parse_reference(text: str) -> Reference:
    """Parse *text*; raise InputError naming it when it is malformed."""
    if not text or text != text.strip():
        raise InputError(repr(text), "not an image reference")
    if text.startswith("docker://"):
        return parse_docker(text[len("docker://"):], text)
    if text.startswith("oci:"):
        return _parse_oci(text[len("oci:"):], text)
    if text.startswith("docker-archive:"):
        return _parse_archive(text[len("docker-archive:"):], text)
    if text.startswith("appc:"):
        return _parse_appc(text[len("appc:"):], text)
    unknown = re.match(r"^([a-z][a-z-]*):(?![0-9])", text)
    if unknown:
        # "dir:x", "containers-storage:x": a transport we do not serve (a bare "host:port/repo"
        # has digits after its colon).
        raise InputError(text, f"unknown transport {unknown.group(1)!r} (use docker://, oci:, docker-archive: or appc:)")
    return parse_docker(text, text)


def parse_docker(rest: str, original: str) -> DockerReference:
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        check_digest(digest, original)
    else:
        digest = None
    first, _, remainder = rest.partition("/")
    if remainder and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        host, path = first, remainder
        if not _HOST.match(host):
            raise InputError(original, f"bad registry host {host!r}")
    else:
        host, path = DOCKER_HUB, rest
        if "/" not in path:
            path = f"library/{path}"
    tag = None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, tag = path.rsplit(":", 1)
        if not _TAG.match(tag):
            raise InputError(original, f"bad tag {tag!r}")
    if not path or not all(_REPO_COMPONENT.match(c) for c in path.split("/")):
        raise InputError(original, f"bad repository name {path!r}")
    if tag is None and digest is None:
        tag = "latest"
    return DockerReference(host, path, tag, digest)


def _split_path_tag(rest: str) -> tuple[str, str | None]:
    # oci:PATH[:TAG] — a colon followed by something without "/" is a tag, unless PATH:TAG exists.
    if ":" in rest:
        path, tag = rest.rsplit(":", 1)
        if tag and "/" not in tag and not os.path.exists(rest):
            return path, tag
    return rest, None


def _parse_oci(rest: str, original: str) -> OciReference:
    path, tag = _split_path_tag(rest)
    if not path:
        raise InputError(original, "missing layout path")
    return OciReference(os.path.abspath(path), tag)


def _parse_archive(rest: str, original: str) -> DockerArchiveReference:
    if not rest:
        raise InputError(original, "missing archive path")
    path, name = rest, None
    if not os.path.exists(rest) and ":" in rest:
        # docker-archive:PATH:REPO:TAG (skopeo's form for one image of a multi-image archive)
        head, _, tail = rest.partition(":")
        if os.path.exists(head):
            path, name = head, tail
    return DockerArchiveReference(os.path.abspath(path), name)


def _parse_appc(rest: str, original: str) -> AppcReference:
    name, *pairs = rest.split(",")
    if not name or not re.match(r"^[a-z0-9]+(?:[-./][a-z0-9]+)*$", name):
        raise InputError(original, f"bad Appc image name {name!r}")
    labels: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key or not value:
            raise InputError(original, f"bad label {pair!r} (want KEY=VALUE)")
        labels[key] = value
    return AppcReference(name, labels)
