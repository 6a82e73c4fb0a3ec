"""What a benchmark produces: rows of samples, each beside the peer measured in the same run.

A `Row` holds every sample (not only the median) of imagefs and of its peer, the unit, and notes.
The ratio is always imagefs ÷ peer of the medians: for times and bytes below 1 means imagefs
needs less. A row whose imagefs side cannot be measured yet carries `pending` (the reason) and
still shows its peer. Rows serialise to JSON (bench/.cache/last-results.json) and render to
markdown in bench/report.py.

Concurrency: none.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field


@dataclass
class Row:
    section: str
    what: str
    subject: str                  # how imagefs was measured ("imagefs pull + mount + read")
    samples: list[float]          # imagefs, one per run
    peer: str = ""                # the peer's name and how it ran ("skopeo copy + umoci unpack")
    peer_samples: list[float] = field(default_factory=list)
    unit: str = "s"               # s | B | share | B/s
    note: str = ""
    pending: str | None = None    # why the imagefs side has no samples yet

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def peer_median(self) -> float | None:
        return statistics.median(self.peer_samples) if self.peer_samples else None

    @property
    def ratio(self) -> float | None:
        m, p = self.median, self.peer_median
        if m is None or p is None or p == 0:
            return None
        return m / p

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict) -> Row:
        return cls(**doc)


@dataclass
class Section:
    """A section's heading text and its free-form notes, in report order."""

    key: str
    title: str
    intro: str
    notes: list[str] = field(default_factory=list)


SECTIONS = {
    "cold": Section("cold", "1. Cold pull (pull half)",
                    "From an empty store over the slow link: imagefs pull + mount + reading the files the "
                    "workload opens, against skopeo copy + umoci unpack + the same reads. Bytes are counted "
                    "at the delay proxy (registry → client)."),
    "launch": Section("launch", "1–2. Cold and warm start to task exit",
                      "Whole task starts: `imagefs run` against skopeo copy + umoci unpack + crun run (cold) "
                      "and against crun run / bwrap of an unpacked rootfs (warm)."),
    "reads": Section("reads", "3. Reads",
                     "Reads through imagefs (chunks local: the layers are read from the local OCI layout), "
                     "kernel overlayfs and fuse-overlayfs over the extracted layers, and the plain extracted "
                     "directory. First pass: fresh mount, page cache dropped; second pass: the same again, "
                     "caches warm."),
    "shared": Section("shared", "4. Shared rootfs",
                      "N concurrent tasks on one image: start latency p50/p99, server memory, extra disk per task."),
    "index": Section("index", "5. Index",
                     "The imagefs layer index: its size against the layer's, the time `imagefs pull` of a "
                     "local OCI layout takes (it builds the indexes), and the time to fetch the indexes over "
                     "the slow link."),
}
