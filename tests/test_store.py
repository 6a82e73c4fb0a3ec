"""The content-addressed store on its own: verification, resume, locks, refs and gc."""

from __future__ import annotations

import hashlib
import multiprocessing
import os

import pytest

from imagefs.errors import DigestMismatch, InputError, RuntimeFailure
from stores.store import Store


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chunks_of(data: bytes, offset: int = 0, size: int = 1000):
    for i in range(offset, len(data), size):
        yield data[i:i + size]


def test_fetch_verifies_and_stores(tmp_path):
    store = Store(tmp_path)
    data = os.urandom(10_000)
    path = store.fetch_blob(sha(data), len(data), lambda off: chunks_of(data, off))
    assert path.read_bytes() == data
    assert store.has_blob(sha(data))


def test_digest_mismatch_leaves_nothing(tmp_path):
    store = Store(tmp_path)
    data = os.urandom(5000)
    wrong = sha(b"something else")
    with pytest.raises(DigestMismatch) as e:
        store.fetch_blob(wrong, len(data), lambda off: chunks_of(data, off))
    assert wrong in str(e.value) and sha(data) in str(e.value)
    assert not store.has_blob(wrong)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_truncated_blob_is_rejected(tmp_path):
    store = Store(tmp_path)
    data = os.urandom(5000)
    with pytest.raises(InputError, match="truncated: got 4000 of 5000"):
        store.fetch_blob(sha(data), len(data), lambda off: chunks_of(data[:4000], off))
    assert not store.has_blob(sha(data))
    assert list((tmp_path / "tmp").iterdir()) == []


def test_oversized_blob_is_rejected(tmp_path):
    store = Store(tmp_path)
    data = os.urandom(5000)
    with pytest.raises(InputError, match="larger than"):
        store.fetch_blob(sha(data), 4000, lambda off: chunks_of(data, off))


def test_interrupted_fetch_resumes_from_where_it_stopped(tmp_path):
    store = Store(tmp_path)
    data = os.urandom(50_000)
    asked: list[int] = []

    def flaky(offset):
        asked.append(offset)
        for i, block in enumerate(chunks_of(data, offset)):
            if len(asked) == 1 and i == 20:
                raise RuntimeFailure("registry", "connection reset")
            yield block

    with pytest.raises(RuntimeFailure):
        store.fetch_blob(sha(data), len(data), flaky)
    assert not store.has_blob(sha(data))
    store.fetch_blob(sha(data), len(data), flaky)
    assert asked == [0, 20_000]  # the second attempt did not fetch the first 20 kB again
    assert store.blob_path(sha(data)).read_bytes() == data


def _fetch_in_child(root: str, data: bytes, counter: str) -> None:
    def opener(offset):
        with open(counter, "a") as f:
            f.write("x")
        yield from chunks_of(data, offset)
    Store(root).fetch_blob(sha(data), len(data), opener)


def test_two_processes_fetch_one_blob_once(tmp_path):
    data = os.urandom(200_000)
    counter = tmp_path / "count"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_fetch_in_child, args=(str(tmp_path / "s"), data, str(counter))) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert counter.read_text() == "x"  # the lock made the others find it present
    assert Store(tmp_path / "s").blob_path(sha(data)).read_bytes() == data


def test_put_blob_rejects_wrong_digest(tmp_path):
    with pytest.raises(DigestMismatch):
        Store(tmp_path).put_blob(sha(b"a"), b"b")
