"""imagefs mount, the remaining cases: appc: images, multi-platform indexes, a slow read that must
not stall lookups, and a failing or lying registry that must never make the mount serve wrong bytes.

All on real mounts. Registry trouble is scripted by an `HttpFront` before the real registry that
acts on the range reads (the lazy read path) of one layer at a time: hold them until released,
answer 503, drop the connection, or corrupt the bytes. Pulls (whole-blob GETs) pass untouched.
Every mount server's log is read back: errors appear only where a test provoked them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from imagefs.fuse.daemon import load_record
from stores.manifest import host_platform
from tests.mounts import Cli, Mounts, diff, needs_fuse, snapshot
from tests.support.aci import aci_manifest, publish
from tests.support.images import Member, OciLayout, layer_tar, push
from tests.support.registry import HttpFront, Reply, Seen

pytestmark = needs_fuse

GUARD = 60.0  # seconds: keeps a regression from hanging the run; never a timing assertion
_rng = random.Random(20261125)


def _data(n: int) -> bytes:
    return _rng.randbytes(n)


def in_thread(fn: Callable[..., Any], *args: Any) -> Future:
    """Run fn(*args) in a daemon thread: a call stuck in the kernel cannot hang the test's exit."""
    fut: Future = Future()

    def run() -> None:
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the test through the future
            fut.set_exception(e)

    threading.Thread(target=run, daemon=True, name=f"probe-{getattr(fn, '__name__', 'fn')}").start()
    return fut


class Envs:
    """Stores and work dirs for this module's mounts; `cleanup` unmounts every one of them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mounts: list[Mounts] = []

    def new(self, name: str) -> tuple[Cli, Mounts]:
        cli = Cli(self.root / name / "store", self.root / name / "work")
        mounts = Mounts(cli)
        self.mounts.append(mounts)
        return cli, mounts

    def logs(self) -> list[Path]:
        return sorted(p for m in self.mounts for p in (m.cli.work / "run" / "mounts").glob("*.log"))

    def cleanup(self) -> None:
        for m in reversed(self.mounts):
            m.cleanup()


@pytest.fixture(scope="module")
def envs(tmp_path_factory) -> Iterator[Envs]:
    envs = Envs(tmp_path_factory.mktemp("more"))
    try:
        yield envs
    finally:
        envs.cleanup()


# -- what a user should see, worked out from the members themselves ------------------------------

_KIND = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}


def expected_tree(*layers: list[Member]) -> dict[bytes, tuple]:
    """What `snapshot` should find for these layers merged bottom first (no whiteouts): the last
    member at a path decides its attributes."""
    out: dict[bytes, tuple] = {}
    for members in layers:
        for m in members:
            kind = _KIND[m.kind]
            mode = m.mode if m.mode is not None else (0o755 if m.kind == "dir" else 0o644)
            if m.kind == "symlink":
                mode = 0o777  # a symlink's mode on Linux, whatever the tar header said
            link = os.fsencode(m.linkname)
            content = (hashlib.sha256(m.data).hexdigest() if m.kind == "file" else
                       link if m.kind == "symlink" else None)
            size = len(m.data) if m.kind == "file" else len(link) if m.kind == "symlink" else 0
            xattrs = tuple(sorted(m.xattrs.items()))
            mtime = None if m.kind == "dir" else int(m.mtime) * 10**9
            out[os.fsencode(m.path)] = (kind, mode, m.uid, m.gid, size, content, xattrs, 0, mtime)
    return out


# -- 1. appc: an ACI over its dependency ---------------------------------------------------------

BASE_ACI = [
    Member("etc", "dir"), Member("etc/base.conf", data=b"base\n"),
    Member("etc/shared", data=b"from the base\n", mode=0o600),
    Member("usr", "dir"), Member("usr/lib", "dir"),
    Member("usr/lib/libbase.so", data=_data(70_000), mode=0o755),
    Member("usr/lib/libbase.so.1", "symlink", linkname="libbase.so"),
    Member("var", "dir", mode=0o700, uid=5, gid=6),
]
APP_ACI = [
    Member("etc", "dir", mode=0o750),  # the upper ACI's attributes win for a shared directory
    Member("etc/shared", data=b"from the app, longer than the base's\n"),
    Member("etc/app.conf", data=b"app\n", uid=1000, gid=1000),
    Member("app", "dir"), Member("app/run", data=b"#!/bin/sh\necho app\n", mode=0o755),
    Member("app/data", data=_data(300_000), xattrs={"user.origin": b"app aci"}),
    Member("usr", "dir"), Member("usr/bin", "dir"),
    Member("usr/bin/tool", "symlink", linkname="../lib/libbase.so.1"),
]


def test_appc_image_with_dependency(envs):
    acis = envs.root / "acis"
    arch = host_platform().architecture
    base = aci_manifest("example.com/more/base", {"version": "1.0", "os": "linux", "arch": arch})
    app = aci_manifest("example.com/more/app", {"version": "2.0", "os": "linux", "arch": arch},
                       exec_=["/app/run"],
                       dependencies=[{"imageName": "example.com/more/base", "labels": {"version": "1.0"}}])
    publish(acis, base, BASE_ACI, compression="none")
    publish(acis, app, APP_ACI, compression="gzip")
    cli, mounts = envs.new("appc")
    mp = mounts.mount("appc:example.com/more/app,version=2.0", envs.root / "appc" / "mnt",
                      "--appc-discovery", str(acis))
    problems = diff(expected_tree(BASE_ACI, APP_ACI), snapshot(mp))
    assert not problems, "\n".join(problems)
    # spelled out: the ACI's own layout (manifest, rootfs/) is not part of the filesystem
    assert sorted(os.listdir(mp)) == ["app", "etc", "usr", "var"]
    assert (mp / "etc" / "shared").read_bytes() == b"from the app, longer than the base's\n"
    assert (mp / "usr" / "bin" / "tool").read_bytes() == BASE_ACI[5].data  # across the layers


# -- 2. a multi-platform index ---------------------------------------------------------------------

PLATFORM_FILES = {arch: [Member("etc", "dir"), Member("etc/arch", data=f"{arch}\n".encode()),
                         Member(f"only-{arch}", data=_data(50_000 if arch == "amd64" else 60_000))]
                  for arch in ("amd64", "arm64")}


@pytest.fixture(scope="module")
def multi(tmp_path_factory, registry) -> str:
    """An index of an amd64 and an arm64 image with different content, pushed with --all."""
    layout = OciLayout(tmp_path_factory.mktemp("multi") / "layout")
    common = (layer_tar([Member("common", data=b"both\n")]), "gzip")
    descs = [layout.add_image([common, (layer_tar(PLATFORM_FILES[arch]), "gzip")], arch=arch)
             for arch in ("amd64", "arm64")]
    layout.add_index(descs, tag="multi")
    ref = registry.ref("more/multi:1")
    push(layout.path, "multi", ref)
    return ref


def _platform_tree(arch: str) -> dict[bytes, tuple]:
    return expected_tree([Member("common", data=b"both\n")], PLATFORM_FILES[arch])


def test_multi_platform_index_host_default_and_chosen(envs, multi):
    host = host_platform().architecture
    if host not in PLATFORM_FILES:
        pytest.skip(f"the index offers amd64 and arm64, this host is {host}")
    other = "arm64" if host == "amd64" else "amd64"
    cli, mounts = envs.new("platform-default")
    mp = mounts.mount(multi, cli.work.parent / "mnt")
    problems = diff(_platform_tree(host), snapshot(mp))
    assert not problems, "\n".join(problems)
    cli2, mounts2 = envs.new("platform-chosen")
    mp2 = mounts2.mount(multi, cli2.work.parent / "mnt", "--platform", f"linux/{other}")
    problems = diff(_platform_tree(other), snapshot(mp2))
    assert not problems, "\n".join(problems)
    assert (mp2 / "etc" / "arch").read_text() == f"{other}\n"
    doc = json.loads(cli2.run("inspect", "--json", multi).stdout)
    assert doc["config"]["architecture"] == other


def test_platform_choice_within_one_store(envs, multi):
    host = host_platform().architecture
    if host not in PLATFORM_FILES:
        pytest.skip(f"the index offers amd64 and arm64, this host is {host}")
    other = "arm64" if host == "amd64" else "amd64"
    cli, mounts = envs.new("platform-one-store")
    mp = mounts.mount(multi, cli.work.parent / "host")
    assert (mp / "etc" / "arch").read_text() == f"{host}\n"
    mp2 = mounts.mount(multi, cli.work.parent / "other", "--platform", f"linux/{other}")
    assert (mp2 / "etc" / "arch").read_text() == f"{other}\n"


# -- 3. and 4. a lazy mount behind a scriptable front ------------------------------------------------


class Script:
    """What the front does to range reads of a layer: by default pass them on; `hold` them until
    `heal`, or answer them `503`, `drop` the connection, or `corrupt` the bytes."""

    def __init__(self) -> None:
        self.front: HttpFront | None = None
        self._lock = threading.Lock()
        self._modes: dict[str, str] = {}
        self.hits: dict[str, int] = {}  # range reads of each layer that met a mode
        self.arrived = threading.Event()  # a held request reached the front
        self.released = threading.Event()

    def set(self, digest: str, mode: str) -> None:
        with self._lock:
            self._modes[digest] = mode
            self.hits[digest] = 0

    def heal(self, digest: str) -> None:
        with self._lock:
            self._modes.pop(digest, None)
        self.released.set()

    def hook(self, seen: Seen) -> Reply | None:
        if "range" not in seen.headers or "/blobs/" not in seen.path:
            return None
        digest = seen.path.rsplit("/", 1)[1]
        with self._lock:
            mode = self._modes.get(digest)
            if mode is not None:
                self.hits[digest] += 1
        if mode is None:
            return None
        if mode == "hold":
            self.arrived.set()
            self.released.wait(GUARD)
            return None  # then forwarded: the held read completes with the real bytes
        if mode == "503":
            return Reply(503, {"Content-Type": "application/json"},
                         b'{"errors":[{"code":"UNAVAILABLE","message":"scripted outage"}]}')
        if mode == "drop":
            return Reply(drop=True)
        assert mode == "corrupt" and self.front is not None
        real = self.front._forward(seen)
        return Reply(real.status, real.headers, bytes(b ^ 0x5A for b in real.body))


@dataclass
class LogWatch:
    """New lines of a mount server's log since the last call."""

    path: Path
    pos: int = 0

    def new_lines(self) -> list[str]:
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            data = f.read()
        self.pos += len(data)
        return [line for line in data.decode(errors="replace").splitlines() if line.strip()]


@dataclass
class Lazy:
    mp: Path
    script: Script
    log: LogWatch
    layers: dict[str, str]  # name -> digest
    files: dict[str, bytes] = field(default_factory=dict)  # path in the image -> content


LAZY_LAYERS = {  # name -> (compression, members)
    "base": ("gzip", [Member("base", "dir"), Member("base/hello", data=b"hello\n"),
                      Member("base/second", data=_data(40_000)), Member("base/deep", "dir"),
                      Member("base/deep/a", data=b"a\n"), Member("base/deep/b", "symlink", linkname="a")]),
    "slow": ("gzip", [Member("slow", "dir"), Member("slow/data", data=_data(400_000)),
                      Member("slow/neighbour", data=b"same layer\n")]),
    "503": ("gzip", [Member("f503", "dir"), Member("f503/data", data=_data(200_000))]),
    "drop": ("zstd", [Member("fdrop", "dir"), Member("fdrop/data", data=_data(200_000))]),
    # plain tar: its bytes are served as fetched, so only the chunk digests stand between a
    # corrupted range read and the reader
    "corrupt": ("none", [Member("fcorrupt", "dir"), Member("fcorrupt/data", data=_data(200_000))]),
}


@pytest.fixture(scope="module")
def lazy(envs, registry) -> Iterator[Lazy]:
    """One image, one layer per case, pulled (indexes only) and mounted through the front."""
    layout = OciLayout(envs.root / "lazy-layout")
    names = list(LAZY_LAYERS)
    desc = layout.add_image([(layer_tar(members), comp) for comp, members in LAZY_LAYERS.values()], tag="lazy")
    manifest = json.loads(layout.blob_path(desc["digest"]).read_bytes())
    layers = {name: layer["digest"] for name, layer in zip(names, manifest["layers"])}
    push(layout.path, "lazy", registry.ref("more/lazy:1"))
    script = Script()
    files = {m.path: m.data for _, members in LAZY_LAYERS.values() for m in members if m.kind == "file"}
    with HttpFront(registry.url, script.hook) as front:
        script.front = front
        cli, mounts = envs.new("lazy")
        try:
            # --prefetch none: these tests are about the demand path (tests/test_prefetch.py
            # covers the background one), and must see every range request a read causes.
            mp = mounts.mount(f"docker://{front.host}/more/lazy:1", cli.work.parent / "mnt", "--prefetch", "none")
            assert not [s for s in front.requests("/blobs/") if "range" in s.headers], "the mount read eagerly"
            record = load_record(str(cli.work), os.path.realpath(mp))
            assert record is not None
            lz = Lazy(mp, script, LogWatch(Path(record.log)), layers, files)
            lz.log.new_lines()  # whatever the start wrote is checked by the last test
            yield lz
        finally:
            script.released.set()  # never leave a front thread waiting
            mounts.cleanup()  # before the front stops: the server may still be asking it


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_slow_read_does_not_stall_lookups(lazy):
    mp, script = lazy.mp, lazy.script
    assert _read(mp / "base/hello") == b"hello\n"  # fetches the base layer's only chunk
    script.released.clear()
    script.arrived.clear()
    script.set(lazy.layers["slow"], "hold")
    try:
        reader = in_thread(_read, mp / "slow/data")
        assert script.arrived.wait(GUARD), "the read never reached the registry"

        def probes() -> None:
            # every name here is looked up for the first time: the kernel has to ask the server
            assert os.stat(mp / "base/deep/a").st_size == 2
            assert sorted(os.listdir(mp / "base/deep")) == ["a", "b"]
            assert sorted(os.listdir(mp)) == ["base", "f503", "fcorrupt", "fdrop", "slow"]
            assert os.readlink(mp / "base/deep/b") == "a"
            assert os.stat(mp / "slow/neighbour").st_size == len(b"same layer\n")
            for missing in ("base/nothing", "slow/nothing", "no-such-dir"):
                assert not os.path.lexists(mp / missing)
            os.statvfs(mp)
            # a read of another layer's fetched chunk is served while that read waits
            assert _read(mp / "base/second") == lazy.files["base/second"]

        in_thread(probes).result(GUARD)
        assert not reader.done(), "the slow read was not held while the lookups ran"
        assert script.hits[lazy.layers["slow"]] >= 1
    finally:
        script.heal(lazy.layers["slow"])
    assert reader.result(GUARD) == lazy.files["slow/data"]
    assert lazy.log.new_lines() == []


def _is_error_line(line: str) -> bool:
    """One line saying which request failed and why, prefixed once: `imagefs: read: <what>: <why>`."""
    return line.startswith("imagefs: read: ") and not line.startswith("imagefs: read: imagefs:")


EXPECTED_ERROR = {"503": "giving up after 4 tries", "drop": "giving up after 4 tries",
                  "corrupt": "does not match its digest"}


@pytest.mark.parametrize("case", ["503", "drop", "corrupt"])
def test_failing_registry_is_eio_never_wrong_bytes_and_recovers(lazy, case):
    mp, script, digest = lazy.mp, lazy.script, lazy.layers[case]
    path = f"f{case}/data"
    script.set(digest, case)
    try:
        with pytest.raises(OSError) as e:
            in_thread(_read, mp / path).result(GUARD)
        assert e.value.errno == errno.EIO
        # the failure was met by the read path, with retries (503, drop) or the one re-fetch
        assert script.hits[digest] >= (4 if case != "corrupt" else 2)
    finally:
        script.heal(digest)
    # the same mount, the same file: now the right bytes
    assert in_thread(_read, mp / path).result(GUARD) == lazy.files[path]
    lines = lazy.log.new_lines()
    assert lines, "the failure was not logged"
    assert all(_is_error_line(line) and EXPECTED_ERROR[case] in line and digest in line
               for line in lines), "\n".join(lines)


# -- 5. the servers' logs --------------------------------------------------------------------------


def test_server_logs_have_no_unexpected_lines(envs, lazy):
    """Runs last: every mount server of this module logged nothing but the errors provoked above
    (one line each: `imagefs: read: <registry>: <blob>: <why>`), and never a traceback."""
    logs = envs.logs()
    assert logs
    allowed = tuple(EXPECTED_ERROR.values())
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            assert "Traceback" not in line, f"{log}: {line}"
            assert _is_error_line(line) and any(a in line for a in allowed), f"{log}: {line}"
