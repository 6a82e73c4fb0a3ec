"""The benchmark images, built once and cached under bench/.cache/ (gitignored).

One OCI layout, bench/.cache/layout, holds every image by tag:

    busybox          static busybox (tests/support's fixture), one layer        (--smoke)
    busybox-reads    busybox + a data layer with one 8 MiB file                 (--smoke)
    python           Debian bookworm minbase + python3, two gzip layers         (--quick)
    python-reads     python + a data layer with one 256 MiB file                (--quick)
    numpy            python + python3-numpy, three gzip layers                  (full)
    numpy-reads      numpy + a data layer with one 1 GiB file                   (full)

The Debian layers come from `debootstrap --variant=minbase` and `apt-get install` in a chroot,
one stage per layer (base system / python / numpy+scipy); each stage's layer is the diff of the
tree across that stage. The chroot runs in private mount and pid namespaces (`unshare`), so its
/proc mount vanishes with it and nothing outside bench/.cache/ is ever mounted.

Data files are deterministic: every MiB is 384 KiB of fresh pseudo-random bytes followed by one
4 KiB random block repeated, so gzip shrinks it to roughly 40% and no two MiB are alike.

Beside the layout, per layer an extracted directory in overlayfs' format (whiteouts as 0/0 char
devices, opaque dirs by xattr) and per image a merged directory (the plain unpacked rootfs).

Concurrency: one builder at a time (an flock on the cache directory).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.layers import (LayerDesc, add_image, diff, init_layout, snapshot, walk, write_estargz_layer,
                          write_file_layer, write_layer)

log = logging.getLogger("bench")

MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
CACHE = Path(__file__).resolve().parent / ".cache"
MiB = 1 << 20
RECIPE_VERSION = 1  # bump when the way images or data files are made changes

# stage name -> packages installed in it (the base stage is debootstrap itself)
# python3-scipy is left out: Debian's depends on pythran, which brings gcc, g++ and boost headers
# (a 724 MB layer, 900 MB in all), past the 400-800 MB this image is meant to have.
STAGES = {"base": (), "python": ("python3",), "numpy": ("python3-numpy",)}
PYTHON_CONFIG = {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"],
                 "Cmd": ["/usr/bin/python3"]}
BUSYBOX_CONFIG = {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]}


@dataclass(frozen=True)
class BenchImage:
    """One image of the layout: its tag, its layers (bottom first) and where it is unpacked."""

    tag: str
    layers: tuple[LayerDesc, ...]
    layout: Path

    @property
    def ref(self) -> str:
        return f"oci:{self.layout}:{self.tag}"

    @property
    def compressed_size(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def tar_size(self) -> int:
        return sum(layer.tar_size for layer in self.layers)

    def blob(self, layer: LayerDesc) -> Path:
        return self.layout / "blobs" / "sha256" / layer.digest.split(":", 1)[1]


class Cache:
    """bench/.cache/: the layout, the stage stamps, extracted layers, merged trees, traces."""

    def __init__(self, root: Path = CACHE) -> None:
        self.root = Path(root)
        self.layout = self.root / "layout"
        self.stamps = self.root / "stamps"
        self.chroot = self.root / "debian-rootfs"
        self._depth = 0

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive use of the cache; re-entrant within this object (building an image builds
        the images below it)."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            self._depth = 1
            try:
                yield
            finally:
                self._depth = 0

    # -- stamps: a stage's result, written only once the stage is complete

    def _stamp(self, name: str) -> Path:
        return self.stamps / f"{name}.json"

    def _load(self, name: str) -> list[LayerDesc] | None:
        try:
            return [LayerDesc.from_json(d) for d in json.loads(self._stamp(name).read_text())]
        except FileNotFoundError:
            return None

    def _save(self, name: str, layers: list[LayerDesc]) -> None:
        self.stamps.mkdir(parents=True, exist_ok=True)
        tmp = self._stamp(name).with_suffix(".tmp")
        tmp.write_text(json.dumps([layer.to_json() for layer in layers]))
        os.replace(tmp, self._stamp(name))

    # -- images

    def _check_recipe(self) -> None:
        """Start over when what the images are made of changed since the cache was built."""
        recipe = json.dumps({"version": RECIPE_VERSION, "suite": SUITE, "stages": STAGES}, sort_keys=True)
        marker = self.root / "recipe.json"
        if marker.exists() and marker.read_text() == recipe:
            return
        _refuse_mounts_below(self.root)
        for entry in self.root.iterdir():
            if entry.name != ".lock":
                _remove(entry)
        marker.write_text(recipe)

    def image(self, tag: str) -> BenchImage:
        """The image *tag*, building whatever it needs that is not cached yet."""
        with self.locked():
            self._check_recipe()
            layers = self._load(f"image-{tag}")
            if layers is None:
                layers = self._build(tag)
                self._save(f"image-{tag}", layers)
            return BenchImage(tag, tuple(layers), self.layout)

    def estargz(self, image: BenchImage, tag: str, prioritized: list[str] | None = None) -> BenchImage:
        """*image* with every layer rewritten as eStargz, tagged *tag* in the layout; *prioritized*
        paths (an access profile) first in each layer. Rebuilt when the profile differs."""
        key = hashlib.sha256(json.dumps(prioritized or []).encode()).hexdigest()[:16]
        with self.locked():
            self._check_recipe()
            layers = self._load(f"image-{tag}-{key}")
            if layers is None:
                layers = [write_estargz_layer(self.layout, image.blob(layer), prioritized=prioritized or [])
                          for layer in image.layers]
                self._save(f"image-{tag}-{key}", layers)
            add_image(self.layout, layers, tag=tag, config=PYTHON_CONFIG)
            return BenchImage(tag, tuple(layers), self.layout)

    def _build(self, tag: str) -> list[LayerDesc]:
        init_layout(self.layout)
        if tag == "busybox":
            layers, config = [self._busybox_layer()], BUSYBOX_CONFIG
        elif tag in STAGES:
            layers, config = self._debian(tag), PYTHON_CONFIG
        elif tag.endswith("-reads"):
            base = tag.removesuffix("-reads")
            size = {"busybox": 8 * MiB, "python": 256 * MiB, "numpy": 1024 * MiB}[base]
            layers = list(self.image(base).layers) + [self._data_layer(size)]
            config = BUSYBOX_CONFIG if base == "busybox" else PYTHON_CONFIG
        else:
            raise ValueError(f"unknown bench image {tag!r}")
        add_image(self.layout, layers, tag=tag, config=config)
        return layers

    def _busybox_layer(self) -> LayerDesc:
        from tests.support.images import busybox_members, layer_tar  # the tests' own busybox image

        staging = self.root / "busybox-tree"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        tar = staging.with_suffix(".tar")
        tar.write_bytes(layer_tar(busybox_members()))
        subprocess.run(["tar", "-xf", str(tar), "-C", str(staging)], check=True)
        tar.unlink()
        try:
            return write_layer(self.layout, staging, list(walk(staging)))
        finally:
            shutil.rmtree(staging)

    def _data_layer(self, size: int) -> LayerDesc:
        name = f"data-{size // MiB}m"
        cached = self._load(name)
        if cached:
            return cached[0]
        log.info("writing a %d MiB data layer", size // MiB)
        desc = write_file_layer(self.layout, [(f"data/{size // MiB}m.bin", size, data_chunks(size))])
        self._save(name, [desc])
        return desc

    # -- the Debian stages

    def _debian(self, upto: str) -> list[LayerDesc]:
        names = list(STAGES)
        layers: list[LayerDesc] = []
        for i, stage in enumerate(names[: names.index(upto) + 1]):
            done = self._load(f"stage-{stage}")
            if done is None:
                if i == 0 or self._load(f"stage-{names[i - 1]}") is not None and self._chroot_is(names[i - 1]):
                    done = self._run_stage(stage)
                else:  # the chroot moved on (or was lost): rebuild from scratch
                    for later in names:
                        self._stamp(f"stage-{later}").unlink(missing_ok=True)
                    return self._debian(upto)
            layers += done
        return layers

    def _chroot_is(self, stage: str) -> bool:
        try:
            return (self.root / "chroot-stage").read_text() == stage
        except FileNotFoundError:
            return False

    def _run_stage(self, stage: str) -> list[LayerDesc]:
        root = self.chroot
        (self.root / "chroot-stage").unlink(missing_ok=True)
        if stage == "base":
            _refuse_mounts_below(root)
            shutil.rmtree(root, ignore_errors=True)
            log.info("debootstrap --variant=minbase %s (a few minutes, once)", SUITE)
            subprocess.run(["debootstrap", "--variant=minbase", SUITE, str(root), MIRROR], check=True,
                           stdout=subprocess.DEVNULL)
            _clean_apt(root)
            layer = write_layer(self.layout, root, list(walk(root)))
        else:
            before = snapshot(root)
            log.info("apt-get install %s in the chroot", " ".join(STAGES[stage]))
            _in_chroot(root, "apt-get", "update", "-qq")
            _in_chroot(root, "apt-get", "install", "-y", "-qq", "-o", "Dpkg::Use-Pty=0",
                        "--no-install-recommends", *STAGES[stage])
            _clean_apt(root)
            paths, gone = diff(root, before)
            layer = write_layer(self.layout, root, paths, gone)
        (self.root / "chroot-stage").write_text(stage)
        self._save(f"stage-{stage}", [layer])
        return [layer]

    # -- unpacked forms

    def extracted(self, image: BenchImage) -> list[Path]:
        """Each layer unpacked in overlayfs' format (bottom first): lowerdirs for overlay mounts."""
        with self.locked():
            return [self._extract_layer(image, layer) for layer in image.layers]

    def _extract_layer(self, image: BenchImage, layer: LayerDesc) -> Path:
        out = self.root / "extracted" / layer.digest.split(":", 1)[1][:16]
        if (out / ".done").exists():
            return out / "tree"
        shutil.rmtree(out, ignore_errors=True)
        (out / "tree").mkdir(parents=True)
        subprocess.run(["tar", "-xzf", str(image.blob(layer)), "-C", str(out / "tree"), "--numeric-owner"],
                       check=True)
        to_overlay_whiteouts(out / "tree")
        (out / ".done").touch()
        return out / "tree"

    def merged(self, image: BenchImage) -> Path:
        """The image unpacked into one plain directory, whiteouts applied (what `umoci unpack` gives)."""
        lowers = self.extracted(image)
        with self.locked():
            out = self.root / "merged" / image.tag
            if (out / ".done").exists():
                return out / "rootfs"
            shutil.rmtree(out, ignore_errors=True)
            (out / "rootfs").mkdir(parents=True)
            for layer, lower in zip(image.layers, lowers):
                apply_overlay_whiteouts(lower, out / "rootfs")
                subprocess.run(["tar", "-xzf", str(image.blob(layer)), "-C", str(out / "rootfs"),
                                "--numeric-owner", "--exclude=.wh.*"], check=True)
            (out / ".done").touch()
            return out / "rootfs"


def data_chunks(size: int, seed: int = 42) -> Iterator[bytes]:
    """*size* bytes of the data file, one MiB at a time (see the module docstring)."""
    rng = random.Random(seed)
    left = size
    while left > 0:
        block = rng.randbytes(384 * 1024) + rng.randbytes(4096) * 160
        yield block[:left]
        left -= len(block)


def to_overlay_whiteouts(tree: Path) -> None:
    """Turn OCI whiteout files under *tree* into overlayfs' own: `.wh.NAME` becomes a 0/0 char
    device NAME, `.wh..wh..opq` the `trusted.overlay.opaque` xattr on its directory."""
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in filenames:
            if not name.startswith(".wh."):
                continue
            os.unlink(os.path.join(dirpath, name))
            if name == ".wh..wh..opq":
                os.setxattr(dirpath, "trusted.overlay.opaque", b"y")
            else:
                os.mknod(os.path.join(dirpath, name[4:]), 0o600 | 0o020000, os.makedev(0, 0))


def apply_overlay_whiteouts(lower: Path, merged: Path) -> None:
    """Remove from *merged* what the overlay-format layer *lower* whites out."""
    import stat

    for dirpath, dirnames, filenames in os.walk(lower):
        rel = os.path.relpath(dirpath, lower)
        target_dir = merged / rel
        try:
            opaque = os.getxattr(dirpath, "trusted.overlay.opaque") == b"y"
        except OSError:
            opaque = False
        if opaque and target_dir.is_dir():
            for child in os.listdir(target_dir):
                _remove(target_dir / child)
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                _remove(target_dir / name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _clean_apt(root: Path) -> None:
    """What a careful Dockerfile does after apt: no package cache, no lists."""
    for d in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (root / d).glob("*"):
            if entry.is_file() and entry.name != "lock":
                entry.unlink()
            elif entry.is_dir() and entry.name != "partial":
                shutil.rmtree(entry)
    for f in (root / "var/cache/apt").glob("*.bin"):
        f.unlink()


def _in_chroot(root: Path, *argv: str) -> None:
    """Run *argv* chrooted into *root* with its own /proc, in private mount and pid namespaces."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LANG": "C.UTF-8",
           "HOME": "/root"}
    subprocess.run(["unshare", "--mount", "--pid", "--fork", "--propagation", "private",
                    f"--mount-proc={root}/proc", "chroot", str(root), *argv], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def _refuse_mounts_below(root: Path) -> None:
    prefix = os.path.realpath(root) + "/"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4]
            if (point + "/").startswith(prefix):
                raise RuntimeError(f"something is mounted at {point}; not deleting {root}")
