"""The tricky image: every case the union and the FUSE front must get right, in several layers.

`tricky_layers(compressions)` returns (tar bytes, compression) pairs; the same content can be built
with different compressions so a zstd image (which umoci cannot unpack) is checked against the
umoci unpack of its gzip twin.
"""

from __future__ import annotations

import random
import tarfile

from tests.support.images import Member, busybox_members, layer_tar

CAP = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_bind_service, binary with NULs
LONG = "long/" + "d" * 120 + "/" + "n" * 150 + ".txt"
NON_UTF8 = b"caf\xe9-\xff.txt"
BIG = 64 << 20


def _random(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def layer_base() -> list[Member]:
    m = busybox_members()
    m += [
        Member("a", "dir"), Member("a/b", "dir"), Member("a/b/file1", data=b"version one\n"),
        Member("replace_dir", "dir"), Member("replace_dir/child", data=b"gone\n"),
        Member("replace_dir/sub", "dir"), Member("replace_dir/sub/deep", data=b"gone too\n"),
        Member("becomes_dir", data=b"I was a file\n"),
        Member("whiteme", data=b"delete me\n"),
        Member("whitedir", "dir"), Member("whitedir/x", data=b"x\n"),
        Member("opq", "dir", mode=0o750, uid=12, gid=34), Member("opq/lower1", data=b"1\n"), Member("opq/lower2", data=b"2\n"),
        Member("hl", "dir"), Member("hl/target", data=b"shared bytes\n", mode=0o640, uid=1000, gid=1000),
        Member("hl/same_layer", "hardlink", linkname="hl/target"),
        Member(LONG.rsplit("/", 1)[0].rsplit("/", 1)[0], "dir"),
        Member(LONG.rsplit("/", 1)[0], "dir"),
        Member(LONG, data=b"a long name\n"),
        Member(NON_UTF8, data=b"latin-1 name\n"),
        Member("xattrs", data=b"has xattrs\n", xattrs={"user.imagefs": b"hello", "security.capability": CAP}),
        Member("dev", "dir"), Member("dev/null", "char", mode=0o666, devmajor=1, devminor=3),
        Member("dev/loop0", "block", mode=0o660, devmajor=7, devminor=0, gid=6),
        Member("fifo", "fifo", mode=0o600),
        Member("empty", data=b""),
        Member("suid", data=b"#!/bin/sh\n", mode=0o4755), Member("sgid", data=b"x", mode=0o2711),
        Member("sticky", "dir", mode=0o1777),
        Member("private", data=b"secret\n", mode=0o600, uid=1000, gid=1000),
        Member("loop1", "symlink", linkname="loop2"), Member("loop2", "symlink", linkname="loop1"),
        Member("abs", "symlink", linkname="/etc/passwd"), Member("dangling", "symlink", linkname="nowhere/at/all"),
        Member("big", data=_random(BIG, 1), mode=0o644),
        Member("dup", data=b"first\n"), Member("dup", data=b"second, wins\n"),
        Member("frac", data=b"fractional mtime\n", mtime=1_700_000_000.5),
    ]
    return m


def layer_changes() -> list[Member]:
    return [
        Member(".wh.whiteme"),
        Member(".wh.whitedir"),
        Member("opq", "dir", mode=0o755, uid=0, gid=0),
        Member("opq/.wh..wh..opq"),
        Member("opq/upper", data=b"new\n"),
        Member("replace_dir", data=b"now a file\n"),
        Member("becomes_dir", "dir"), Member("becomes_dir/inside", data=b"inside\n"),
        Member("hl/cross_layer", "hardlink", linkname="hl/target"),
        Member("a/b/file1", data=b"version two\n"),
        Member("a/b/.wh.never_existed"),
        Member("implicit/parent/file", data=b"parents are implicit\n"),
        Member("recreated", data=b"old\n"),
    ]


def layer_many(n: int = 20_000) -> list[Member]:
    members = [Member("many", "dir")]
    for d in range(n // 500):
        members.append(Member(f"many/d{d:02}", "dir"))
        members += [Member(f"many/d{d:02}/f{i:04}", data=f"{d}/{i}\n".encode()) for i in range(500)]
    # whiteout and recreate in one layer: the new file stays
    members += [Member(".wh.recreated"), Member("recreated", data=b"new\n")]
    return members


def tricky_layers(compressions: tuple[str, str, str] = ("gzip", "none", "gzip")) -> list[tuple[bytes, str]]:
    return [
        (layer_tar(layer_base(), tarfile.PAX_FORMAT), compressions[0]),
        (layer_tar(layer_changes(), tarfile.PAX_FORMAT), compressions[1]),
        (layer_tar(layer_many(), tarfile.GNU_FORMAT), compressions[2]),
    ]
