"""Thin ctypes wrappers for the Linux syscalls the container init needs and Python lacks.

Python 3.11 has no os.unshare, os.setns, mount, pivot_root or prctl. Each wrapper here makes one
call and raises `OSError(errno, strerror, path)` on failure, exactly like the os module would; no
policy lives here (which flags, in which order: launcher/linux/rootfs.py and launcher/init.py).

The container init imports this module on every container start, so it imports only ctypes and
os: libc is the process's own (dlopen(NULL): Python links it), not looked up with
ctypes.util.find_library, which runs `ldconfig -p` in a subprocess (~10 ms, and the subprocess
module's imports).

Concurrency: plain blocking calls, meant for the single-threaded init process. Namespace calls act
on the calling thread, so never call them from a process that runs other threads.
"""

from __future__ import annotations

import ctypes
import os

# Namespaces (linux/sched.h).
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# The names used in configs and LaunchInfo.clone_namespaces, as in /proc/PID/ns/.
NAMESPACES: dict[str, int] = {
    "mnt": CLONE_NEWNS,
    "uts": CLONE_NEWUTS,
    "ipc": CLONE_NEWIPC,
    "net": CLONE_NEWNET,
    "pid": CLONE_NEWPID,
    "cgroup": CLONE_NEWCGROUP,
}

# mount(2) flags (linux/mount.h).
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24

# umount2(2) flags.
MNT_FORCE = 1
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

# mount_setattr(2).
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8

# socket(2), for launcher/linux/netdev.py.
AF_INET = 2
SOCK_DGRAM = 2
SOCK_CLOEXEC = 0o2000000

# prctl(2).
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36

# glibc has no wrappers for these; numbers per architecture (asm/unistd.h). mount_setattr is new
# enough to share one number across architectures.
_SYSCALLS = {
    "x86_64": {"pivot_root": 155, "mount_setattr": 442},
    "aarch64": {"pivot_root": 41, "mount_setattr": 442},
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.socket.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def _check(result: int, what: str, path: str | None = None) -> None:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path if path is not None else what)


def _syscall_number(name: str) -> int:
    machine = os.uname().machine
    table = _SYSCALLS.get(machine)
    if table is None:
        raise OSError(38, f"{name}: syscall number unknown on {machine}")  # ENOSYS
    return table[name]


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), "mount", target)


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), "umount2", target)


def pivot_root(new_root: str, put_old: str) -> None:
    number = _syscall_number("pivot_root")
    _check(_libc.syscall(ctypes.c_long(number), _b(new_root), _b(put_old)), "pivot_root", new_root)


def mount_setattr(path: str, attr_set: int, attr_clr: int = 0, *, recursive: bool = True,
                  dirfd: int = AT_FDCWD) -> None:
    """Change mount attributes (e.g. MOUNT_ATTR_RDONLY), on the whole subtree when *recursive*.
    Raises ENOSYS on kernels before 5.12; callers fall back to a MS_REMOUNT of the top mount."""
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    if path == "":
        flags |= AT_EMPTY_PATH
    number = _syscall_number("mount_setattr")
    result = _libc.syscall(ctypes.c_long(number), ctypes.c_int(dirfd), _b(path), ctypes.c_uint(flags),
                           ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    _check(result, "mount_setattr", path)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname", name)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    result = _libc.prctl(option, arg2, arg3, arg4, arg5)
    _check(result, "prctl")
    return result


def socket(domain: int, type_: int, protocol: int = 0) -> int:
    """A socket's fd, without importing the socket module (see launcher/linux/netdev.py)."""
    fd = _libc.socket(domain, type_, protocol)
    _check(fd, "socket")
    return fd


def namespace_flags(names: list[str] | tuple[str, ...]) -> int:
    """CLONE_NEW* flags for namespace names ("mnt", "pid", ...); KeyError names an unknown one."""
    flags = 0
    for name in names:
        flags |= NAMESPACES[name]
    return flags
