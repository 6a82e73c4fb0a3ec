"""Build the demo image (static busybox, two layers) as an OCI layout and push it with skopeo.

usage: demo_image.py LAYOUT_DIR DEST_REF
"""

import sys
from pathlib import Path

from tests.support.images import Member, OciLayout, busybox_members, layer_tar, push


def main() -> None:
    layout_dir, dest = Path(sys.argv[1]), sys.argv[2]
    layout = OciLayout(layout_dir)
    app = [Member("app", "dir"), Member("app/hello.sh", data=b"#!/bin/sh\necho hello from $(hostname)\n", mode=0o755),
           Member("etc/motd", data=b"Served lazily by imagefs.\n")]
    layout.add_image([(layer_tar(busybox_members()), "gzip"), (layer_tar(app), "gzip")], tag="demo",
                     config={"Cmd": ["/app/hello.sh"], "Env": ["PATH=/bin"], "WorkingDir": "/app"})
    push(layout_dir, "demo", dest)


if __name__ == "__main__":
    main()
