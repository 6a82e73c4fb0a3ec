"""The test support itself: the registry starts, and a built image round-trips through skopeo."""

import json
import subprocess

import httpx

from tests.conftest import requires_skopeo
from tests.support.images import push


@requires_skopeo
def test_built_image_pushes_and_reads_back(registry, busybox_layout):
    push(busybox_layout.path, "busybox", registry.ref("support/busybox:1"))
    r = httpx.get(f"{registry.url}/v2/support/busybox/manifests/1",
                  headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert r.status_code == 200
    index = json.loads((busybox_layout.path / "index.json").read_text())
    assert "sha256:" + __import__("hashlib").sha256(r.content).hexdigest() == index["manifests"][0]["digest"]
    out = subprocess.run(["skopeo", "inspect", "--tls-verify=false", registry.ref("support/busybox:1")],
                         capture_output=True, check=True, text=True)
    assert json.loads(out.stdout)["Layers"][0].startswith("sha256:")
