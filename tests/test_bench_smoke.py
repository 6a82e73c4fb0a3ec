"""The benchmarks' smoke mode, so bench/ does not rot: busybox, a loopback registry, one run.

It asserts the report is well formed (header facts, one table per section, seven cells a row,
ratios that are numbers), never a timing: benchmarks measure, they do not assert.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NEEDS = ("docker-registry", "skopeo", "umoci", "strace", "fusermount3", "find", "tar")

pytestmark = [
    pytest.mark.root,
    pytest.mark.fuse,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                       reason="needs root and /dev/fuse (mounts, drop_caches)"),
    pytest.mark.skipif(not os.path.exists("/bin/busybox"), reason="needs busybox-static"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in NEEDS),
                       reason=f"needs {', '.join(NEEDS)} (bench/setup.sh installs them)"),
]

ROW = re.compile(r"^\|(.*)\|$")


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(prefix)]


def test_smoke_run_writes_a_well_formed_report(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    cache = tmp_path / "cache"
    r = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--output", str(out), "--cache", str(cache),
                        "--workdir", str(tmp_path / "work")],
                       cwd=REPO, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()

    assert text.startswith("# Benchmarks\n")
    assert re.search(r"^- \*\*Date:\*\* \d{4}-\d\d-\d\d \d\d:\d\d UTC$", text, re.M)
    assert f"`uname -r` {os.uname().release}" in text
    assert "- **Command:** `python -m bench --smoke" in text
    assert "## Pending" in text

    sections = re.findall(r"^## (.+)$", text, re.M)
    for title in ("1. Cold pull (pull half)", "1–2. Cold and warm start to task exit", "3. Reads", "5. Index",
                  "4. Shared rootfs"):
        assert title in sections, sections

    tables = 0
    for block in re.split(r"^## ", text, flags=re.M)[1:]:
        lines = [line for line in block.splitlines() if ROW.match(line)]
        if not lines:
            continue
        tables += 1
        assert lines[0].startswith("| measurement | imagefs | median"), lines[0]
        assert set(lines[1].replace("|", "")) == {"-"}
        assert len(lines) > 2, f"a table without rows: {block[:80]}"
        for line in lines[2:]:
            cells = [c.strip() for c in ROW.match(line).group(1).split(" | ")]
            assert len(cells) == 7, line
            what, subject, mine, peer, peer_value, ratio, runs = cells
            assert what and subject and peer
            assert mine and peer_value, line
            assert ratio == "—" or float(ratio) >= 0, line
            assert re.fullmatch(r"\d+ / \d+", runs), line
            if ratio != "—":  # a ratio means both sides were measured
                assert not mine.startswith("pending"), line
    assert tables == 5

    raw = json.loads((cache / "last-results-smoke.json").read_text())
    assert raw["meta"]["mode"] == "smoke" and raw["rows"]

    assert not _mounts_below(tmp_path), "the bench left mounts behind"
    assert not any((tmp_path / "work").iterdir()), "the bench left its scratch directory behind"
