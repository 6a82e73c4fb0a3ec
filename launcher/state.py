"""state.json: what the launcher checkpoints about a container, so another process can finish its
work (recover, wait, kill, stats) after the one that launched it is gone.

Format version 1 (changes are noted here):
  1 — format, id, status, image, image_id, spec, created, pid, pid_start, rootfs (provisioner
      state), isolation (isolator names in prepare order), isolators (each one's state),
      termination ({exit_code, signal, reason, message}) once it ended.

Writes are atomic (temp + fsync + rename): a reader sees the previous state or the new one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagefs.errors import InputError, NotFound
from launcher.spec import Resources, TaskSpec, Volume
from stores.fsutil import atomic_write

FORMAT = 1
STATE_NAME = "state.json"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# Container statuses, in lifecycle order.
PROVISIONING, PREPARING, RUNNING, DESTROYING, TERMINATED = (
    "provisioning", "preparing", "running", "destroying", "terminated")


def check_container_id(container_id: str) -> str:
    if not _ID.match(container_id):
        raise InputError(container_id, "bad container id (letters, digits, '_', '.', '-'; at most 64)")
    return container_id


def spec_to_json(spec: TaskSpec) -> dict[str, Any]:
    return dataclasses.asdict(spec)


def spec_from_json(doc: dict[str, Any]) -> TaskSpec:
    doc = dict(doc)
    doc["argv"] = tuple(doc.get("argv", ()))
    doc["env"] = tuple(tuple(kv) for kv in doc.get("env", ()))
    doc["volumes"] = tuple(Volume(**v) for v in doc.get("volumes", ()))
    doc["resources"] = Resources(**doc.get("resources", {}))
    if doc.get("isolation") is not None:
        doc["isolation"] = tuple(doc["isolation"])
    return TaskSpec(**doc)


@dataclass
class ContainerState:
    id: str
    spec: TaskSpec
    status: str = PROVISIONING
    created: float = field(default_factory=time.time)
    image_id: str | None = None
    pid: int | None = None
    pid_start: float | None = None
    rootfs: dict[str, Any] | None = None
    isolation: list[str] = field(default_factory=list)
    isolators: dict[str, dict[str, Any]] = field(default_factory=dict)
    termination: dict[str, Any] | None = None

    def to_json(self) -> bytes:
        doc = dataclasses.asdict(self)
        doc["spec"] = spec_to_json(self.spec)
        doc["format"] = FORMAT
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, what: str) -> ContainerState:
        try:
            doc = json.loads(data)
            if doc.pop("format", None) != FORMAT:
                raise ValueError("unknown format version")
            doc["spec"] = spec_from_json(doc["spec"])
            return cls(**doc)
        except (ValueError, TypeError, KeyError) as e:
            raise InputError(what, f"unreadable container state: {e}") from None


class ContainerDirs:
    """WORK/containers/<id>/: state.json, sandbox/, backends/ (the provisioner's), init files."""

    def __init__(self, work_dir: str | os.PathLike[str]) -> None:
        self.root = Path(work_dir) / "containers"

    def dir(self, container_id: str) -> Path:
        return self.root / check_container_id(container_id)

    def sandbox(self, container_id: str) -> Path:
        return self.dir(container_id) / "sandbox"

    def save(self, state: ContainerState) -> None:
        atomic_write(self.dir(state.id) / STATE_NAME, state.to_json())

    def load(self, container_id: str) -> ContainerState:
        path = self.dir(container_id) / STATE_NAME
        try:
            return ContainerState.from_json(path.read_bytes(), str(path))
        except FileNotFoundError:
            raise NotFound(container_id, "no such container") from None

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _ID.match(p.name))
