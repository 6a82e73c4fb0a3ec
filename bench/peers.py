"""The tools people use today, driven the way they are usually driven.

- `skopeo copy docker://… oci:DIR:img` + `umoci unpack --image DIR:img BUNDLE`: pull and unpack.
- `crun run`: here crun refuses the hybrid cgroup layout (DESIGN.md), so it runs in a private
  mount namespace (`unshare -m`) with cgroup2 mounted at /sys/fs/cgroup, and with
  `--cgroup-manager=disabled`: on this machine crun's own cgroup setup fails (RLIMIT_MEMLOCK for its
  eBPF device filter), and disabled it creates no cgroup at all. Its state goes under the run's
  work directory (`--root`). Container ids are unique per run.
- `bwrap`: the rootfs bind-mounted read-only, fresh /proc and /dev, every namespace unshared.

Concurrency: `crun_start` may be called from several threads at once (one process each).
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
from pathlib import Path

from bench.system import run

CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def skopeo_copy(ref: str, oci_dir: Path) -> None:
    run("skopeo", "copy", "--quiet", "--src-tls-verify=false", ref, f"oci:{oci_dir}:img")


def umoci_unpack(oci_dir: Path, bundle: Path) -> None:
    run("umoci", "unpack", "--image", f"{oci_dir}:img", bundle)


def crun_config(bundle: Path, argv: list[str], rootfs: Path | None = None, *, readonly: bool = True) -> None:
    """Write (or adapt umoci's) bundle/config.json to run *argv* without a terminal or cgroups."""
    config_path = bundle / "config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text())
    else:
        bundle.mkdir(parents=True, exist_ok=True)
        run("crun", "spec", cwd=bundle)
        config = json.loads(config_path.read_text())
        config["process"]["env"] = [f"PATH={CHROOT_PATH}", "LANG=C.UTF-8"]
    config["process"]["terminal"] = False
    config["process"]["args"] = list(argv)
    config["process"].pop("rlimits", None)
    config["hostname"] = "bench"
    config.setdefault("linux", {}).pop("resources", None)
    config["linux"].pop("cgroupsPath", None)
    if rootfs is not None:
        config["root"] = {"path": str(rootfs), "readonly": readonly}
    config_path.write_text(json.dumps(config))


class Crun:
    """crun with its state under *state_dir*, each container in a private mount namespace."""

    def __init__(self, state_dir: Path) -> None:
        self.state = state_dir
        self.state.mkdir(parents=True, exist_ok=True)
        self.prefix = f"ibench-{secrets.token_hex(3)}"
        self._n = 0

    def argv(self, bundle: Path) -> list[str]:
        self._n += 1
        cid = f"{self.prefix}-{self._n}"
        script = ('mount -t cgroup2 none /sys/fs/cgroup && exec crun --root "$1" --cgroup-manager=disabled '
                  'run --bundle "$2" "$3"')
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "crun",
                str(self.state), str(bundle), cid]

    def run(self, bundle: Path) -> subprocess.CompletedProcess:
        return run(*self.argv(bundle), timeout=300)

    def popen(self, bundle: Path, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(bundle), **kw)


def bwrap_argv(rootfs: Path, argv: list[str]) -> list[str]:
    return ["bwrap", "--ro-bind", str(rootfs), "/", "--proc", "/proc", "--dev", "/dev", "--unshare-all",
            "--die-with-parent", "--clearenv", "--setenv", "PATH", CHROOT_PATH, *argv]


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def missing_tools(*tools: str) -> list[str]:
    return [t for t in tools if not have(t)]
