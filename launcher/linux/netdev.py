"""Bring a network interface up: what the container init does to `lo` in a new network namespace.

Two ioctls on a datagram socket (SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP), as ifconfig does;
bringing the loopback up makes the kernel give it 127.0.0.1 and ::1. This replaces pyroute2, whose
import alone cost ~90 ms of every container's start, for the one netlink request the init made.
The socket comes from libc (launcher/linux/syscalls.py), not the socket module, whose import costs
more than the rest of the init's imports together.

Concurrency: plain blocking calls on the calling thread's network namespace.
"""

from __future__ import annotations

import fcntl
import os
import struct

from launcher.linux import syscalls as sc

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFNAMSIZ = 16

# struct ifreq (linux/if.h): the name, then a 24-byte union whose first member we use, ifr_flags.
_IFREQ = struct.Struct(f"{IFNAMSIZ}sH22x")


def link_up(name: str) -> None:
    """Set IFF_UP on interface *name*. OSError as the ioctls raise it: ENODEV if there is none."""
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ:
        raise OSError(19, os.strerror(19), name)   # ENODEV: no interface can have that name
    fd = sc.socket(sc.AF_INET, sc.SOCK_DGRAM | sc.SOCK_CLOEXEC)
    try:
        flags = _IFREQ.unpack(fcntl.ioctl(fd, SIOCGIFFLAGS, _IFREQ.pack(raw, 0)))[1]
        if not flags & IFF_UP:
            fcntl.ioctl(fd, SIOCSIFFLAGS, _IFREQ.pack(raw, flags | IFF_UP))
    finally:
        os.close(fd)


def is_up(name: str) -> bool:
    """Whether interface *name* has IFF_UP (for tests and diagnostics)."""
    fd = sc.socket(sc.AF_INET, sc.SOCK_DGRAM | sc.SOCK_CLOEXEC)
    try:
        return bool(_IFREQ.unpack(fcntl.ioctl(fd, SIOCGIFFLAGS, _IFREQ.pack(name.encode(), 0)))[1] & IFF_UP)
    finally:
        os.close(fd)
