"""Fixtures shared by every test: a real registry per session, temp stores, the image builder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.support.images import OciLayout, busybox_members, layer_tar
from tests.support.registry import Registry


def _have(binary: str) -> bool:
    return shutil.which(binary) is not None


requires_registry = pytest.mark.skipif(not os.path.exists("/usr/bin/docker-registry"),
                                       reason="needs Debian's docker-registry (apt-get install docker-registry)")
requires_skopeo = pytest.mark.skipif(not _have("skopeo"), reason="needs skopeo")


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory):
    """One plain-HTTP registry on a free 127.0.0.1 port for the whole session."""
    if not os.path.exists("/usr/bin/docker-registry"):
        pytest.skip("needs Debian's docker-registry (apt-get install docker-registry)")
    reg = Registry(tmp_path_factory.mktemp("registry"))
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def own_registry(tmp_path: Path):
    """A registry of the test's own, which it may stop and start again (same port, same storage)."""
    reg = Registry(tmp_path / "registry")
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture(scope="session")
def busybox_layout(tmp_path_factory: pytest.TempPathFactory) -> OciLayout:
    """An OCI layout with tag `busybox`: one gzip layer of static busybox."""
    if not os.path.exists("/bin/busybox"):
        pytest.skip("needs busybox-static")
    layout = OciLayout(tmp_path_factory.mktemp("layouts") / "busybox")
    layout.add_image([(layer_tar(busybox_members()), "gzip")], tag="busybox",
                     config={"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]})
    return layout
