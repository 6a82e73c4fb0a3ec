"""What a task reads: traced once with strace on the unpacked image, replayed on any rootfs.

    trace = Trace.load_or_make(cache, image, merged_root, WORKLOADS["print42"])
    trace.replay(mountpoint)          # open+read whole every file it opened, stat what it looked up
    trace.read_bytes(merged_root)     # what those files hold (for the floor)

The trace is `strace -f -e trace=%file` of `chroot ROOT CMD`, cut at the chroot() call so the
host's own loader does not count. Successful opens and execs of regular files become reads of
the whole file (an upper bound: the task itself may mmap only some pages), other successful
lookups become stats, failed ones become probes (a lookup that must answer ENOENT). Paths are
resolved inside the replay root as the kernel would inside a chroot, symlinks included.

Concurrency: none.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.images import BenchImage, Cache

CHROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
              "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/root"}


@dataclass(frozen=True)
class Workload:
    name: str
    argv: tuple[str, ...]
    label: str


WORKLOADS = {
    "print42": Workload("print42", ("python3", "-c", "print(42)"), "python3 -c 'print(42)'"),
    "numpy": Workload("numpy", ("python3", "-c", "import numpy"), "python3 -c 'import numpy'"),
    "true": Workload("true", ("/bin/true",), "/bin/true"),
}

_LINE = re.compile(r'^(?:\[pid\s+)?(\d+)\]?\s+(\w+)\((.*)\)\s+=\s+(-?\d+)')
_FIRST_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_OPENS = {"open", "openat", "openat2", "execve", "execveat", "creat"}


def _unescape(s: str) -> str:
    return s.encode("latin-1", "backslashreplace").decode("unicode_escape").encode("latin-1").decode(
        "utf-8", "surrogateescape")


def parse_strace(text: str) -> list[tuple[str, str]]:
    """(op, absolute path) in first-seen order from `strace -f -e trace=%file` output, after chroot."""
    ops: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    started = False
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        _, call, args, ret = m.groups()
        if call == "chroot":
            started = int(ret) == 0
            continue
        if not started:
            continue
        s = _FIRST_STRING.search(args)
        if not s or not s.group(1):
            continue
        path = _unescape(s.group(1))
        if not path.startswith("/"):
            first_arg = args.split(",", 1)[0].strip()
            if call.endswith("at") and first_arg != "AT_FDCWD" and not call.startswith("exec"):
                continue  # relative to a directory descriptor we do not track
            path = "/" + path  # chroot(1) leaves the cwd at /
        ok = int(ret) >= 0
        op = ("open" if call in _OPENS else "stat") if ok else "probe"
        key = (op, os.path.normpath(path))
        if key not in seen:
            seen.add(key)
            ops.append(key)
    return ops


def resolve(root: str | Path, path: str, *, follow: bool = True) -> str:
    """*path* as seen from inside a chroot at *root*, as a host path (symlinks stay inside root)."""
    root = os.fspath(root)
    parts = [p for p in path.split("/") if p]
    current: list[str] = []
    hops = 0
    while parts:
        name = parts.pop(0)
        if name == ".":
            continue
        if name == "..":
            if current:
                current.pop()
            continue
        candidate = os.path.join(root, *current, name)
        if (parts or follow) and os.path.islink(candidate):
            hops += 1
            if hops > 40:
                raise OSError(f"too many symlinks resolving {path}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        current.append(name)
    return os.path.join(root, *current)


@dataclass
class Trace:
    workload: Workload
    ops: list[tuple[str, str]]

    @classmethod
    def load_or_make(cls, cache: Cache, image: BenchImage, root: Path, workload: Workload) -> Trace:
        key = hashlib.sha256(json.dumps([workload.argv, [l.digest for l in image.layers]]).encode()).hexdigest()[:12]
        path = cache.root / "traces" / f"{image.tag}-{workload.name}-{key}.json"
        if path.exists():
            ops = [tuple(op) for op in json.loads(path.read_text())]
            return cls(workload, ops)  # type: ignore[arg-type]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "strace.out"
            subprocess.run(["strace", "-f", "-qq", "-e", "trace=%file", "-o", str(out), "chroot", str(root),
                            *workload.argv], check=True, env=CHROOT_ENV, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
            ops = parse_strace(out.read_text(errors="replace"))
        # opens of directories are lookups, not reads
        ops = [("stat", p) if op == "open" and not _is_file(root, p) else (op, p) for op, p in ops]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ops))
        return cls(workload, ops)

    def files(self) -> list[str]:
        return [p for op, p in self.ops if op == "open"]

    def replay(self, root: Path) -> int:
        """Do the trace's lookups and whole-file reads under *root*; returns bytes read."""
        buf = bytearray(1 << 20)
        total = 0
        for op, path in self.ops:
            try:
                target = resolve(root, path)
                if op == "open":
                    with open(target, "rb", buffering=0) as f:
                        while n := f.readinto(buf):
                            total += n
                else:
                    os.stat(target)
            except OSError:
                pass  # a probe, or a path only the running task could see (/proc)
        return total

    def read_bytes_by_layer(self, cache: Cache, image: BenchImage) -> list[int]:
        """Bytes of the files this trace reads, by the layer that provides each (bottom first)."""
        lowers = cache.extracted(image)
        merged = cache.merged(image)
        out = [0] * len(lowers)
        for path in self.files():
            host = resolve(merged, path)
            rel = os.path.relpath(host, merged)
            try:
                size = os.stat(host).st_size
            except OSError:
                continue
            for i in reversed(range(len(lowers))):
                if os.path.lexists(os.path.join(lowers[i], rel)):
                    out[i] += size
                    break
        return out


def _is_file(root: Path, path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(resolve(root, path)).st_mode)
    except OSError:
        return False
