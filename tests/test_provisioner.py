"""The provisioner end to end: real registry, real FUSE servers, real kernel overlays.

One image (the smaller tricky image of tests/test_extract.py) is built, pushed and pulled lazily
once for the module; each test gets its own work dir, and its fixture destroys what the test
made even when it fails (recover, then lazy unmounts and killing recorded servers as a last
resort). Every backend's rootfs is compared with `umoci unpack` of the image.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import psutil
import pytest

from imagefs.errors import ImagefsError, InputError, RuntimeFailure
from imagefs.fuse import daemon
from launcher.backends import mount_overlay, mounts_below
from launcher.provisioner import MARKER, Provisioner
from stores.pull import SourceOptions, pull
from stores.store import ImageRecord, Store
from tests.mounts import diff, needs_fuse, snapshot
from tests.support.images import Member, OciLayout, busybox_members, layer_tar, push
from tests.test_extract import CONFIG, small_tricky_layers, umoci_snapshot

pytestmark = needs_fuse


def servers() -> list[psutil.Process]:
    """Mount servers this test process started (they are its children, in their own sessions)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if "imagefs" in cmd and "mount" in cmd and p.status() != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


def fuse_mounts(below: Path) -> list[str]:
    return [p for p in mounts_below(below) if (daemon.mount_type(p) or "").startswith("fuse")]


@pytest.fixture(scope="module")
def image(tmp_path_factory, registry):
    """The tricky image pushed to the registry and pulled lazily (indexes only) into a store;
    a one-layer image (with a whiteout) from an OCI layout; umoci's unpack of the first."""
    root = tmp_path_factory.mktemp("provision")
    layout = OciLayout(root / "layout")
    layout.add_image(small_tricky_layers(), tag="small", config=CONFIG)
    layout.add_image([(layer_tar(busybox_members() + [Member(".wh.ghost")]), "gzip")], tag="single", config=CONFIG)
    ref = registry.ref("test/provision:1")
    push(layout.path, "small", ref)
    store = Store(root / "store")
    record = pull(store, ref)
    single = pull(store, f"oci:{layout.path}:single")
    expected = umoci_snapshot(layout, "small", root / "bundle")
    return {"store": store, "record": record, "single": single, "expected": expected, "ref": ref}


@pytest.fixture(scope="module")
def work_dirs():
    """After the module: no mount left below any work dir, and no mount server running."""
    made: list[Path] = []
    yield made
    left = [p for w in made for p in mounts_below(w)]
    running = servers()
    for p in running:  # only our own children: started by the provisioner in these tests
        p.kill()
        p.wait(10)
    assert not left and not running, f"left behind: mounts {left}, servers {running}"


def _last_resort(tmp: Path, work: Path) -> None:
    for point in reversed(mounts_below(tmp)):
        subprocess.run(["umount", "-l", point], capture_output=True)
    for path in (work / "run" / "mounts").glob("*.json"):
        record = daemon.ServerRecord(**json.loads(path.read_text()))
        proc = daemon._process(record)  # the recorded pid, only if its start time matches too
        if proc is not None:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def make(image, tmp_path, work_dirs):
    """Provisioners on this test's work dir (a second one plays the restarted launcher)."""
    work = Path(os.path.realpath(tmp_path)) / "work"
    work_dirs.append(work)
    made: list[Provisioner] = []

    def factory() -> Provisioner:
        made.append(Provisioner(image["store"], work, source_options=SourceOptions()))
        return made[-1]

    try:
        yield factory
    finally:
        try:
            factory().recover(set())
        finally:
            _last_resort(Path(os.path.realpath(tmp_path)), work)
        assert not mounts_below(work)


@pytest.fixture
def prov(make) -> Provisioner:
    return make()


def check_matches(expected: dict, root: Path) -> None:
    problems = diff(expected, snapshot(root))
    assert not problems, "\n".join(problems)


def mount_dir(prov: Provisioner, record: ImageRecord) -> Path:
    return prov.work_dir / "mounts" / record.id


# ---- every backend gives the image ----------------------------------------------------------------

@pytest.mark.parametrize("backend", ["imagefs", "overlay", "copy"])
def test_rootfs_matches_umoci(image, prov, backend):
    record = image["record"]
    r = prov.provision("c1", record, backend)
    assert r.backend == backend and os.path.isdir(r.path)
    assert r.path == str(prov.work_dir / "containers/c1/backends" / backend / "rootfses" / r.rootfs_id / "rootfs")
    json.dumps(r.state)  # checkpointable
    check_matches(image["expected"], Path(r.path))
    assert (Path(r.path) / "bin/busybox").read_bytes() == Path("/bin/busybox").read_bytes()
    prov.destroy("c1", r.state)
    assert not (prov.work_dir / "containers" / "c1").exists()
    assert not mounts_below(prov.work_dir)


@pytest.mark.parametrize("backend", ["imagefs", "overlay"])
def test_writes_stay_in_the_container(image, prov, backend):
    record = image["record"]
    one, two = (prov.provision(c, record, backend) for c in ("c1", "c2"))
    p1, p2 = Path(one.path), Path(two.path)
    (p1 / "written").write_text("mine")
    (p1 / "a/b/file1").write_text("changed")
    os.unlink(p1 / "empty")
    upper = p1.parent / "upper"
    assert (upper / "written").read_text() == "mine" and (upper / "a/b/file1").read_text() == "changed"
    assert (upper / "empty").is_char_device()  # overlayfs' whiteout
    assert not (p2 / "written").exists() and (p2 / "empty").exists()
    assert (p2 / "a/b/file1").read_text() == "version two\n"
    if backend == "imagefs":
        image_root = mount_dir(prov, record) / "rootfs"
    else:
        image_root = image["store"].root / "layers" / two.state["layers"][1]  # the layer with a/b/file1
    assert (image_root / "a/b/file1").read_text() == "version two\n" and not (image_root / "written").exists()
    prov.destroy("c1", one.state)
    prov.destroy("c2", two.state)


# ---- imagefs: one shared mount per image ---------------------------------------------------------

def test_containers_share_one_mount_until_the_last_goes(image, prov):
    record = image["record"]
    one, two = (prov.provision(c, record, "imagefs") for c in ("c1", "c2"))
    mp = mount_dir(prov, record) / "rootfs"
    assert fuse_mounts(prov.work_dir) == [str(mp)]
    pid = daemon.load_record(str(prov.work_dir), str(mp)).pid
    assert [p.pid for p in servers()] == [pid]
    assert sorted(os.listdir(mount_dir(prov, record) / "refs")) == ["c1", "c2"]

    prov.destroy("c1", one.state)
    assert fuse_mounts(prov.work_dir) == [str(mp)] and [p.pid for p in servers()] == [pid]
    assert (Path(two.path) / "a/b/file1").read_text() == "version two\n"
    server = psutil.Process(pid)
    prov.destroy("c2", two.state)
    assert fuse_mounts(prov.work_dir) == [] and servers() == []
    assert not server.is_running()
    assert not mount_dir(prov, record).exists()


def test_concurrent_provisions_start_one_server(image, prov):
    record = image["record"]
    barrier = threading.Barrier(3)
    results: dict[str, object] = {}

    def run(cid: str) -> None:
        barrier.wait()
        try:
            results[cid] = prov.provision(cid, record, "imagefs")
        except Exception as e:  # reported below
            results[cid] = e

    threads = [threading.Thread(target=run, args=(c,)) for c in ("c1", "c2", "c3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(not isinstance(r, Exception) for r in results.values()), results
    assert len(fuse_mounts(prov.work_dir)) == 1 and len(servers()) == 1
    for cid, r in results.items():
        assert (Path(r.path) / "a/b/file1").read_text() == "version two\n"  # type: ignore[attr-defined]
        prov.destroy(cid, r.state)  # type: ignore[attr-defined]
    assert servers() == []


# ---- recovery ------------------------------------------------------------------------------------

def test_recover_destroys_orphans_and_keeps_the_living(image, make):
    record = image["record"]
    before = make()
    made = {c: before.provision(c, record, b) for c, b in
            (("c1", "imagefs"), ("c2", "overlay"), ("c3", "copy"), ("c4", "imagefs"))}
    after = make()  # the launcher restarted
    after.recover({"c4"})
    containers = after.work_dir / "containers"
    assert sorted(os.listdir(containers)) == ["c4"]
    assert os.listdir(mount_dir(after, record) / "refs") == ["c4"]
    assert (Path(made["c4"].path) / "a/b/file1").read_text() == "version two\n"
    after.recover(set())
    assert os.listdir(containers) == [] and os.listdir(after.work_dir / "mounts") == []
    assert not mounts_below(after.work_dir) and servers() == []


def test_recover_cleans_up_after_a_crash_before_the_mount(image, prov):
    """A launcher that died after writing its markers but before mounting anything."""
    record = image["record"]
    rootfs_dir = prov.work_dir / "containers/c9/backends/imagefs/rootfses/0123"
    (rootfs_dir / "upper").mkdir(parents=True)
    (rootfs_dir / MARKER).write_text(json.dumps({"version": 1, "image_id": record.id}))
    refs = mount_dir(prov, record) / "refs"
    refs.mkdir(parents=True)
    (refs / "c9").touch()
    (refs / "gone-before-its-rootfs").touch()
    prov.recover(set())
    assert os.listdir(prov.work_dir / "containers") == [] and os.listdir(prov.work_dir / "mounts") == []


def test_dead_server_is_served_again_for_live_containers(image, make):
    record = image["record"]
    before = make()
    one = before.provision("c1", record, "imagefs")
    mp = mount_dir(before, record) / "rootfs"
    first = daemon._process(daemon.load_record(str(before.work_dir), str(mp)))
    first.send_signal(signal.SIGKILL)
    first.wait(10)  # our child: reaped here
    with pytest.raises(OSError) as e:
        os.statvfs(mp)
    assert e.value.errno == errno.ENOTCONN
    after = make()
    after.recover({"c1"})
    again = daemon.load_record(str(after.work_dir), str(mp))
    assert again.pid != first.pid and [p.pid for p in servers()] == [again.pid]
    assert (mp / "a/b/file1").read_text() == "version two\n"
    two = after.provision("c2", record, "imagefs")
    assert (Path(two.path) / "a/b/file1").read_text() == "version two\n"
    assert len(fuse_mounts(after.work_dir)) == 1
    after.destroy("c1", one.state)
    after.destroy("c2", two.state)
    assert servers() == []


def test_destroy_is_idempotent(image, prov):
    r = prov.provision("c1", image["record"], "imagefs")
    prov.destroy("c1", r.state)
    prov.destroy("c1", r.state)
    prov.destroy("c1")
    prov.destroy("never-made")
    assert not (prov.work_dir / "containers" / "c1").exists() and servers() == []


# ---- overlay and bind: layers extracted once -------------------------------------------------------

def test_overlay_layers_are_extracted_once(image, prov):
    record = image["record"]
    one = prov.provision("c1", record, "overlay")
    layers = image["store"].root / "layers"
    inodes = {p.name: p.stat().st_ino for p in layers.iterdir()}
    two = prov.provision("c2", record, "overlay")
    assert one.state["layers"] == two.state["layers"]
    assert {p.name: p.stat().st_ino for p in layers.iterdir()} == inodes
    # self-contained layers under their digest; dependent ones (a hardlink into a lower layer,
    # directories they do not describe) also under the digest of the layers below
    names = [n.split(".") for n in one.state["layers"]]
    assert [len(n) for n in names] == [1, 2, 1, 2]
    assert [n[0] for n in names] == [layer.digest.split(":")[1] for layer in record.image.layers]
    assert not any(".tmp-" in n for n in inodes)
    prov.destroy("c1", one.state)
    prov.destroy("c2", two.state)


def test_bind_backend_mounts_a_single_layer_read_only(image, prov):
    single = image["single"]
    bound = prov.provision("c1", single, "bind")
    copied = prov.provision("c2", single, "copy")
    assert not diff(snapshot(Path(copied.path)), snapshot(Path(bound.path)))
    assert not os.path.lexists(Path(bound.path) / "ghost")  # a whiteout with nothing below: not shown
    with pytest.raises(OSError) as e:
        (Path(bound.path) / "new").write_text("x")
    assert e.value.errno == errno.EROFS
    prov.destroy("c1", bound.state)
    prov.destroy("c2", copied.state)


def test_bind_backend_refuses_a_multi_layer_image(image, prov):
    with pytest.raises(InputError) as e:
        prov.provision("c1", image["record"], "bind")
    message = str(e.value)
    assert "\n" not in message and "test/provision:1" in message and "4 layers" in message
    assert not (prov.work_dir / "containers").exists()


@pytest.mark.parametrize("backend, cid, fault", [
    ("nope", "c1", "backend 'nope'"),
    ("imagefs", "../escape", "container id '../escape'"),
    ("imagefs", "", "container id ''"),
])
def test_bad_input_is_one_line_naming_the_fault(image, prov, backend, cid, fault):
    with pytest.raises(InputError) as e:
        prov.provision(cid, image["record"], backend)
    assert str(e.value).startswith(fault) and "\n" not in str(e.value)
    assert not (prov.work_dir / "containers").exists()


@pytest.mark.parametrize("backend", ["imagefs", "overlay", "copy"])
def test_a_failed_provision_leaves_nothing(image, tmp_path, work_dirs, backend):
    """The store lacks the image (its indexes): the server, or the extraction, fails."""
    work = Path(os.path.realpath(tmp_path)) / "work"
    work_dirs.append(work)
    prov = Provisioner(Store(tmp_path / "empty-store"), work)
    try:
        with pytest.raises(ImagefsError) as e:
            prov.provision("c1", image["record"], backend)
        assert "\n" not in str(e.value)
        assert not (work / "containers").exists() or os.listdir(work / "containers") == []
        assert not (work / "mounts").exists() or os.listdir(work / "mounts") == []
        assert not mounts_below(work) and servers() == []
    finally:
        prov.recover(set())
        _last_resort(Path(os.path.realpath(tmp_path)), work)


def test_overlay_options_longer_than_a_page_are_refused(tmp_path):
    lowers = [tmp_path / "layers" / ("%064x" % i) for i in range(60)]
    with pytest.raises(RuntimeFailure) as e:
        mount_overlay(lowers, tmp_path / "upper", tmp_path / "work", tmp_path / "rootfs", what="image abc")
    assert str(e.value).startswith("image abc: 60 layers") and "imagefs or copy backend" in str(e.value)
    assert not mounts_below(tmp_path)
