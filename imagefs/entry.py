"""One entry of a layer's table of contents: what the tar header said, normalised.

Shared by the index builder (which makes entries), the union (which merges them) and the FUSE
front (which serves them). Paths and link targets are bytes: tar names need not be UTF-8.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class EntryType(enum.IntEnum):
    FILE = 0
    DIR = 1
    SYMLINK = 2
    HARDLINK = 3
    CHAR = 4
    BLOCK = 5
    FIFO = 6


@dataclass(slots=True)
class Entry:
    """A tar member after normalisation.

    path:     relative, no leading "./" or "/", no "." or ".." components, no trailing "/";
              the layer's root prefix (Appc "rootfs/") already removed; b"" is the root itself.
    mode:     permission bits including suid/sgid/sticky (0o7777), without the file type.
    linkname: symlink target as written, or the normalised path of a hardlink's target.
    offset:   where the member's data starts in the *uncompressed* tar stream.
    mtime:    seconds since the epoch (PAX may carry fractions; kept as nanoseconds in mtime_ns).
    """

    path: bytes
    type: EntryType
    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    offset: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
