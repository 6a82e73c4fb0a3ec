"""The task's user: `uid`, `uid:gid`, `name` or `name:group`, looked up in the image's own
/etc/passwd and /etc/group (read inside the rootfs, symlinks resolved as if it were "/"), as a
container runtime must: the host's user database says nothing about the image's."""

from __future__ import annotations

from dataclasses import dataclass

from imagefs.errors import InputError
from launcher.linux.rootfs import resolve_in_root


@dataclass(frozen=True)
class User:
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


def _read_db(rootfs: str, path: str) -> list[list[str]]:
    try:
        with open(resolve_in_root(rootfs, path), encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n").split(":") for line in f if line.strip() and not line.startswith("#")]
    except OSError:
        return []


def resolve_user(rootfs: str, spec: str) -> User:
    """User *spec* ("" = root) inside *rootfs*; an unknown name is an InputError naming it."""
    if not spec:
        return User(0, 0)
    name, _, group = spec.partition(":")
    passwd = _read_db(rootfs, "/etc/passwd")
    if name.isdigit():
        uid = int(name)
        row = next((r for r in passwd if len(r) > 3 and r[2] == name), None)
        gid = int(row[3]) if row and row[3].isdigit() else uid if not row else 0
        user_name = row[0] if row else None
    else:
        row = next((r for r in passwd if len(r) > 3 and r[0] == name), None)
        if row is None or not row[2].isdigit() or not row[3].isdigit():
            raise InputError(f"user {name}", "not found in the image's /etc/passwd")
        uid, gid, user_name = int(row[2]), int(row[3]), name
    groups_db = _read_db(rootfs, "/etc/group")
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            grow = next((r for r in groups_db if len(r) > 2 and r[0] == group), None)
            if grow is None or not grow[2].isdigit():
                raise InputError(f"group {group}", "not found in the image's /etc/group")
            gid = int(grow[2])
    extra = tuple(sorted({int(r[2]) for r in groups_db if len(r) > 3 and r[2].isdigit() and user_name
                          and user_name in r[3].split(",")} - {gid}))
    return User(uid, gid, extra)
