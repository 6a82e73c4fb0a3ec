"""OCI referrers: list the artifacts that refer to a manifest (its `subject`), and push one.

Nothing here knows what an artifact holds; imagefs/publish.py builds and reads the imagefs one.

Discovery (OCI distribution spec 1.1, "Listing referrers"), in this order:

1. the referrers API, `GET /v2/REPO/referrers/<digest>?artifactType=T`: a registry that has it
   answers 200 with an OCI index (maybe paginated by `Link: <...>; rel="next"`), and that list is
   the whole truth (possibly empty). Filtering by `artifactType` is optional for the registry, so
   the list is filtered here again;
2. any other answer to that (404 from distribution 2.8, which has no such route; 400, 405...)
   means no API: the *referrers tag schema* is used instead. The tag `sha256-<hex of the subject
   digest>` holds an OCI index whose `manifests` are the referrers; no tag means none.

Push: the artifact's blobs (skipped when a HEAD finds them), the artifact manifest by digest, then,
unless the registry answered the manifest PUT with an `OCI-Subject` header (it indexes `subject`
itself), a read-modify-write of the fallback tag's index: read it (absent = empty), drop any entry
with our digest, append ours, put it back, and read it back to check ours survived (the tag schema
has no compare-and-swap, so a concurrent pusher can overwrite us; a few rounds settle it). Entries of
other referrers are kept as they are.

Concurrency: synchronous, no shared state beyond the `RegistrySource` (which is thread-safe).
"""

from __future__ import annotations

import json
import logging
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from imagefs.errors import InputError, NotFound, RuntimeFailure
from stores.digest import check_digest, hex_of, sha256_digest
from stores.model import OCI_INDEX, OCI_MANIFEST
from stores.registry import RegistrySource

log = logging.getLogger(__name__)

MAX_PAGES = 16  # referrers API pages followed; more is a registry misbehaving
TAG_ROUNDS = 3  # read-modify-write rounds on the fallback tag before giving up
_LINK_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


@dataclass(frozen=True)
class Referrer:
    """One entry of a referrers list: the descriptor of an artifact manifest."""

    digest: str
    size: int
    media_type: str
    artifact_type: str
    annotations: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def descriptor(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size,
                               "artifactType": self.artifact_type}
        if self.annotations:
            doc["annotations"] = dict(self.annotations)
        return doc


def fallback_tag(subject: str) -> str:
    """The referrers tag schema's tag for *subject*: `sha256-<hex>`."""
    return f"sha256-{hex_of(subject)}"


def _index_doc(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(what, f"malformed referrers index: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("manifests", []), list):
        raise InputError(what, "malformed referrers index: no manifests list")
    media_type = doc.get("mediaType", OCI_INDEX)
    if media_type != OCI_INDEX:
        raise InputError(what, f"not a referrers index (media type {media_type!r})")
    return doc


def parse_referrers(data: bytes, what: str) -> list[Referrer]:
    """The referrers an OCI index lists (API answer or fallback tag), malformed entries skipped."""
    out = []
    for entry in _index_doc(data, what).get("manifests", []):
        if not isinstance(entry, dict):
            continue
        digest, size = entry.get("digest"), entry.get("size")
        if not isinstance(digest, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            continue
        try:
            check_digest(digest)
        except InputError:
            continue
        annotations = entry.get("annotations")
        annotations = {str(k): str(v) for k, v in annotations.items()} if isinstance(annotations, dict) else {}
        out.append(Referrer(digest, size, str(entry.get("mediaType") or OCI_MANIFEST),
                            str(entry.get("artifactType") or ""), annotations))
    return out


def add_referrer(existing: bytes | None, referrer: Referrer, what: str) -> bytes:
    """The fallback tag's index with *referrer* appended (replacing an entry of the same digest);
    every other entry, and any other field of the index, kept as it was."""
    doc = _index_doc(existing, what) if existing is not None else {}
    manifests = [m for m in doc.get("manifests", []) if not (isinstance(m, dict) and m.get("digest") == referrer.digest)]
    out = {"schemaVersion": 2, "mediaType": OCI_INDEX, **{k: v for k, v in doc.items() if k != "manifests"}}
    out["manifests"] = [*manifests, referrer.descriptor()]
    return json.dumps(out, sort_keys=True, separators=(",", ":")).encode()


# -- discovery


def find_referrers(source: RegistrySource, subject: str, artifact_type: str) -> tuple[list[Referrer], str]:
    """The referrers of *subject* with *artifact_type*, and how they were found ("referrers API"
    or "tag sha256-..."). Raises ImagefsErrors only for failures of the fallback tag's GET."""
    from concurrent.futures import ThreadPoolExecutor

    check_digest(subject, "referrers subject")
    # Both asked at once: a registry without the API (distribution 2.8, the common case today)
    # would otherwise cost a round trip for its 404 before the tag is even asked for.
    with ThreadPoolExecutor(1, thread_name_prefix="imagefs-referrers") as pool:
        by_tag = pool.submit(_from_tag, source, subject)
        found = _from_api(source, subject, artifact_type)
        how = "referrers API"
        if found is None:
            found, how = by_tag.result(), f"tag {fallback_tag(subject)}"
        else:
            by_tag.exception()  # not wanted: whatever it says (even a failure) is dropped
    return [r for r in found if r.artifact_type == artifact_type], how


def _from_api(source: RegistrySource, subject: str, artifact_type: str) -> list[Referrer] | None:
    url = f"referrers/{subject}?artifactType={urllib.parse.quote(artifact_type, safe='')}"
    what = f"referrers of {subject}"
    out: list[Referrer] = []
    for page in range(MAX_PAGES):
        try:
            answer = source.request("GET", url, headers={"Accept": OCI_INDEX}, what=what)
        except InputError as e:  # 404 and friends (even 401 for an unknown route): no API here
            if page:
                raise
            log.debug("%s: no referrers API (%s); using the tag schema", what, e.why)
            return None
        if answer.headers.get("content-type", OCI_INDEX).split(";")[0].strip() not in (OCI_INDEX, "application/json"):
            if page:
                raise InputError(what, f"unexpected content type {answer.headers.get('content-type')!r}")
            return None
        out += parse_referrers(answer.body, what)
        m = _LINK_NEXT.search(answer.headers.get("link", ""))
        if not m:
            return out
        url = str(_join(answer.url, m.group(1)))
    raise InputError(what, f"more than {MAX_PAGES} pages of referrers")


def _join(base: str, link: str) -> str:
    import httpx  # only to resolve a relative Link; registry.py already depends on it

    return str(httpx.URL(base).join(link))


def _tag_index(source: RegistrySource, subject: str) -> bytes | None:
    tag = fallback_tag(subject)
    try:
        return source.request("GET", f"manifests/{tag}", headers={"Accept": OCI_INDEX},
                              what=f"referrers tag {tag}", not_found="no referrers").body
    except NotFound:
        return None


def _from_tag(source: RegistrySource, subject: str) -> list[Referrer]:
    data = _tag_index(source, subject)
    return [] if data is None else parse_referrers(data, f"referrers tag {fallback_tag(subject)}")


# -- push


def push_referrer(source: RegistrySource, manifest: bytes, blobs: Mapping[str, bytes], subject: str,
                  artifact_type: str, annotations: Mapping[str, str] | None = None) -> str:
    """Push an artifact manifest (whose `subject` is *subject*) with its *blobs* (digest -> bytes)
    and make it discoverable; returns how ("referrers API" or "tag sha256-...")."""
    for digest, data in blobs.items():
        if not source.has_blob(digest, push=True):
            source.put_blob(digest, data)
    digest = sha256_digest(manifest)
    headers = source.put_manifest(digest, manifest, OCI_MANIFEST)
    if headers.get("oci-subject") == subject:
        return "referrers API"
    referrer = Referrer(digest, len(manifest), OCI_MANIFEST, artifact_type, dict(annotations or {}))
    tag = fallback_tag(subject)
    what = f"referrers tag {tag} in {source.reference}"
    for round_ in range(TAG_ROUNDS + 1):
        # Read (again after a write: tags have no compare-and-swap, a concurrent pusher may have
        # replaced the index between our read and our write).
        existing = _tag_index(source, subject)
        if existing is not None and any(r.digest == digest for r in parse_referrers(existing, what)):
            return f"tag {tag}"
        if round_ == TAG_ROUNDS:
            break
        source.put_manifest(tag, add_referrer(existing, referrer, what), OCI_INDEX)
    raise RuntimeFailure(what, f"our referrer {digest} kept being overwritten ({TAG_ROUNDS} rounds)")
