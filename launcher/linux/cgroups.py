"""cgroups v1 and v2: find the hierarchies; create, fill, signal and remove one container's cgroup.

Layout
    `detect_layout()` reads /proc/self/mountinfo and /proc/self/cgroup (both roots are parameters,
    as in psutil, so tests feed synthetic files). "v1" means per-controller hierarchies. A hybrid
    machine (v1 controllers plus a `unified` cgroup2 mount that holds none of them) counts as v1;
    its cgroup2 mount is kept in `Layout.unified`. "v2" means no v1 controller is mounted and one
    cgroup2 mount carries the controllers.

Where cgroups go
    `CgroupRoot.resolve(layout, spec)` chooses the directory, in each hierarchy, under which the
    containers' cgroups live. By default this is `<own cgroup>/imagefs`, a child of this process's
    own cgroup, so the launcher never writes outside its own subtree. `container_cgroup(id, root,
    controllers)` names `<root>/<id>` in the hierarchies of those controllers. Isolators that share
    a container therefore agree on the path by construction, and on v1 each one creates only its
    own hierarchies.

v2 and the "no internal processes" rule
    On v2, a cgroup that holds processes cannot enable controllers for its children (the root
    cgroup is exempt). So container processes only ever live in leaves (`<root>/<id>`), and the
    cgroups we create above them hold no processes. The one cgroup we did not create is the
    launcher's own (`enable_from`). Its cgroup.subtree_control must list the controllers. Either
    it already does (systemd `Delegate=yes` with the launcher started in a sub-cgroup), or it is
    the root cgroup, or the write fails with EBUSY and we raise a CgroupError that says so.
    `--cgroup-root /ABS` points the root at a delegated subtree instead.

Sharing
    create() and destroy() are idempotent: mkdir tolerates existing directories, controllers are
    enabled only when missing, and missing directories are fine to destroy. So several isolators
    may create and destroy one container's cgroup in any order. On v1, every set also joins the
    `freezer` hierarchy when it is mounted, so kill_all() can stop forks while it signals.

Concurrency: plain blocking file I/O on cgroupfs, which answers at once. The only waits are the
bounded ones in freeze(), kill_all() and destroy(), for processes to stop or to exit. Nothing is
cached: every method reads the kernel's files, so two processes (or two isolators) may share a set.
"""

from __future__ import annotations

import errno
import os
import re
import select
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from imagefs.errors import RuntimeFailure

Version = Literal["v1", "v2"]

UNIFIED = "unified"       # the only `dirs` key of a v2 set or root: one directory for all controllers
DEFAULT_ROOT = "imagefs"  # default root: <own cgroup>/imagefs in every hierarchy
FREEZE_TIMEOUT = 2.0      # seconds for the freezer to report FROZEN before we signal regardless
EXIT_TIMEOUT = 10.0       # seconds for SIGKILLed processes to leave (a task stuck in D state may not)

# The names a v1 cgroup mount's options may bind as controllers. Other options (rw, xattr,
# clone_children, name=systemd) are not controllers.
V1_CONTROLLERS = frozenset({
    "blkio", "cpu", "cpuacct", "cpuset", "devices", "freezer", "hugetlb", "memory", "misc",
    "net_cls", "net_prio", "perf_event", "pids", "rdma",
})

_NAME = re.compile(r"[^/\0]+")


class CgroupError(RuntimeFailure):
    """A cgroup operation failed. `what` is the cgroup directory or file; `errno` is set if known."""

    def __init__(self, what: str, why: str, *, errno_: int | None = None) -> None:
        super().__init__(what, why)
        self.errno = errno_


# ---------------------------------------------------------------------------------------------
# Layout detection (pure parsing + two file reads)


@dataclass(frozen=True)
class Mount:
    """One cgroup-related line of mountinfo."""

    mountpoint: str
    root: str                  # the cgroup the mount shows at its mountpoint (field 4)
    fstype: str                # "cgroup" or "cgroup2"
    options: frozenset[str]    # super options: for v1, the bound controllers are among them


def _unescape(field_: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts in a /proc/<pid>/mountinfo text, in mount order."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or not tail or tail[0] not in ("cgroup", "cgroup2"):
            continue
        options = frozenset(tail[2].split(",")) if len(tail) > 2 else frozenset()
        mounts.append(Mount(_unescape(fields[4]), _unescape(fields[3]), tail[0], options))
    return mounts


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/<pid>/cgroup as {controller: cgroup path}; the v2 entry has the key ""."""
    own: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        path = path.removesuffix(" (deleted)")
        if not controllers:
            own[""] = path
        for name in controllers.split(","):
            if name and not name.startswith("name="):
                own[name] = path
    return own


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy and where this process sits in it."""

    version: Literal[1, 2]
    mountpoint: str            # a directory on this machine (the fsroot already applied)
    mount_root: str            # the cgroup shown at mountpoint ("/" unless a bind or cgroupns)
    controllers: frozenset[str]
    own: str                   # this process's cgroup, as /proc/self/cgroup names it

    def dir_of(self, cgroup: str) -> str:
        """The directory of a cgroup path as /proc/<pid>/cgroup names it."""
        rel = cgroup
        if self.mount_root != "/":
            if cgroup != self.mount_root and not cgroup.startswith(self.mount_root.rstrip("/") + "/"):
                raise CgroupError(cgroup, f"not visible under {self.mountpoint}, which shows "
                                          f"{self.mount_root}")
            rel = cgroup[len(self.mount_root):]
        return os.path.normpath(os.path.join(self.mountpoint, rel.lstrip("/")))

    @property
    def own_dir(self) -> str:
        return self.dir_of(self.own)


@dataclass(frozen=True)
class Layout:
    """The cgroup hierarchies of this machine, as this process sees them."""

    version: Version
    hierarchies: tuple[Hierarchy, ...]     # v1: per-controller ones; v2: the one unified mount
    unified: Hierarchy | None = None       # the cgroup2 mount (on hybrid v1: controller-less)

    @property
    def controllers(self) -> frozenset[str]:
        """The controllers containers can use (v2: those the hierarchy's root offers)."""
        return frozenset().union(*(h.controllers for h in self.hierarchies))

    def hierarchy(self, controller: str) -> Hierarchy:
        for h in self.hierarchies:
            if controller in h.controllers:
                return h
        raise CgroupError(controller, "cgroup controller is not mounted")

    def v2_view(self) -> Layout:
        """The cgroup2 mount alone, as a v2 layout (on hybrid machines: the core files only)."""
        if self.unified is None:
            raise CgroupError("cgroup2", "no cgroup2 file system is mounted")
        return Layout("v2", (self.unified,), self.unified)


def _under(fsroot: str, path: str) -> str:
    return os.path.normpath(os.path.join(fsroot, path.lstrip("/")))


def _read_words(path: str) -> frozenset[str]:
    try:
        with open(path) as f:
            return frozenset(f.read().split())
    except OSError:
        return frozenset()


def detect_layout(procfs: str = "/proc", fsroot: str = "/") -> Layout:
    """Read this process's mountinfo and cgroup membership; `fsroot` prefixes the mount points."""
    try:
        with open(os.path.join(procfs, "self", "mountinfo")) as f:
            mounts = parse_mountinfo(f.read())
        with open(os.path.join(procfs, "self", "cgroup")) as f:
            own = parse_proc_cgroup(f.read())
    except OSError as e:
        raise CgroupError(e.filename or procfs, e.strerror or str(e), errno_=e.errno) from e
    v1: list[Hierarchy] = []
    seen: set[frozenset[str]] = set()
    unified: Hierarchy | None = None
    for m in mounts:
        mountpoint = _under(fsroot, m.mountpoint)
        if m.fstype == "cgroup":
            bound = frozenset(m.options & V1_CONTROLLERS)
            # Named hierarchies (name=systemd) bind no controller; a hierarchy mounted twice
            # (bind mounts) is used at its first mount point.
            if not bound or bound in seen:
                continue
            path = next((own[c] for c in sorted(bound) if c in own), None)
            if path is None:
                continue
            seen.add(bound)
            v1.append(Hierarchy(1, mountpoint, m.root, bound, path))
        elif unified is None:
            offered = _read_words(os.path.join(mountpoint, "cgroup.controllers"))
            unified = Hierarchy(2, mountpoint, m.root, offered, own.get("", "/"))
    if v1:
        return Layout("v1", tuple(v1), unified)
    if unified is not None:
        return Layout("v2", (unified,), unified)
    raise CgroupError(os.path.join(procfs, "self", "mountinfo"), "no cgroup file system is mounted")


# ---------------------------------------------------------------------------------------------
# Where containers' cgroups live


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise CgroupError(name, "not a valid cgroup name (one path component, not . or ..)")
    return name


@dataclass(frozen=True)
class CgroupRoot:
    """The directory, per hierarchy, that holds the containers' cgroups."""

    version: Version
    dirs: Mapping[str, str]           # v1: controller → directory; v2: {UNIFIED: directory}
    enable_from: str | None = None    # v2: the cgroup above the root whose subtree_control we extend

    @classmethod
    def resolve(cls, layout: Layout, spec: str | None = None) -> CgroupRoot:
        """`spec` relative ("imagefs", "a/b"): below this process's own cgroup in each hierarchy;
        absolute ("/imagefs"): below the top of each mounted hierarchy. None: DEFAULT_ROOT."""
        spec = spec or DEFAULT_ROOT
        parts = [_check_name(p) for p in spec.split("/") if p]
        if not parts:
            raise CgroupError(spec, "the cgroup root must name a cgroup to create, not a hierarchy top")

        def base(h: Hierarchy) -> str:
            return h.mountpoint if spec.startswith("/") else h.own_dir

        if layout.version == "v1":
            dirs = {c: os.path.join(base(h), *parts) for h in layout.hierarchies for c in h.controllers}
            return cls("v1", dirs)
        h = layout.hierarchies[0]
        return cls("v2", {UNIFIED: os.path.join(base(h), *parts)}, enable_from=base(h))

    def remove(self) -> bool:
        """rmdir the root directories that are empty; True when none is left. For tests and tidy
        shutdowns: a root another launcher still uses stays."""
        gone = True
        for d in sorted(set(self.dirs.values()), key=len, reverse=True):
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError:
                gone = False
        return gone


def container_cgroup(container_id: str, root: CgroupRoot, controllers: Iterable[str],
                     optional: Iterable[str] = ()) -> CgroupSet:
    """The cgroup `<root>/<container_id>` in the hierarchies of `controllers` (required) and of
    `optional` ones that are mounted; on v1 also in `freezer` when mounted (for kill_all)."""
    name = _check_name(container_id)
    wanted = tuple(controllers)
    if root.version == "v2":
        return CgroupSet("v2", {UNIFIED: os.path.join(root.dirs[UNIFIED], name)}, wanted,
                         enable_from=root.enable_from)
    dirs: dict[str, str] = {}
    for c in wanted:
        if c not in root.dirs:
            raise CgroupError(c, "cgroup controller is not mounted")
        dirs[c] = os.path.join(root.dirs[c], name)
    for c in (*optional, "freezer"):
        if c in root.dirs:
            dirs[c] = os.path.join(root.dirs[c], name)
    return CgroupSet("v1", dirs, wanted)


# ---------------------------------------------------------------------------------------------
# One container's cgroup


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value: str) -> None:
    # No O_CREAT: on cgroupfs a missing knob is an error, not a file to make. One write(2),
    # because cgroupfs treats every write as one complete command.
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def parse_keyed(text: str) -> dict[str, int]:
    """"key value" lines (memory.stat, cpu.stat, *.events, cpuacct.stat) → {key: int}."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _procs(directory: str) -> set[int]:
    try:
        return {int(p) for p in _read(os.path.join(directory, "cgroup.procs")).split()}
    except FileNotFoundError:
        return set()


def _subtree(top: str) -> Iterator[str]:
    """`top` and every cgroup below it, parents first (the container may nest cgroups)."""
    if os.path.isdir(top):
        for d, _, _ in os.walk(top):
            yield d


def _wait_for(cond: Callable[[], bool], timeout: float) -> bool:
    """Re-check `cond` with backoff (1 ms doubling to 50 ms) until it holds or `timeout` passes.
    Only for kernel states that announce no event (freezer.state, a cgroup still busy)."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not cond():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.05)
    return True


def _pidfds(pids: Iterable[int]) -> list[int]:
    """pidfds for the pids still alive. A pidfd names one process for good, so signalling and
    waiting on it cannot hit a process that later reuses the pid."""
    fds = []
    for pid in pids:
        try:
            fds.append(os.pidfd_open(pid))
        except ProcessLookupError:
            pass
    return fds


def _wait_exited(fds: list[int], timeout: float) -> bool:
    """Wait until every pidfd reports its process exited (readable), or `timeout`; True if all did.
    The kernel leaves the cgroup (cgroup_exit) before it wakes pidfd pollers, so an exited process
    is no longer in cgroup.procs."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    pending = set(fds)
    deadline = time.monotonic() + timeout
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        for fd, _ in poller.poll(left * 1000):
            poller.unregister(fd)
            pending.discard(fd)
    return True


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


@dataclass(frozen=True)
class CgroupSet:
    """One logical cgroup realised in several v1 hierarchies, or once on v2.

    `dirs` maps each v1 controller to its directory (co-mounted controllers share one); on v2 it
    is {UNIFIED: directory}. `controllers` are the ones the owner needs (v2: enabled in parents).
    """

    version: Version
    dirs: Mapping[str, str]
    controllers: tuple[str, ...] = ()
    enable_from: str | None = field(default=None, compare=False)

    # -- state.json ---------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        return {"version": self.version, "dirs": dict(self.dirs), "controllers": list(self.controllers)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> CgroupSet:
        version, dirs = state.get("version"), state.get("dirs")
        if version not in ("v1", "v2") or not isinstance(dirs, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and os.path.isabs(v) for k, v in dirs.items()):
            raise CgroupError("state.json", f"not a saved cgroup: {dict(state)!r}")
        return cls(version, dict(dirs), tuple(state.get("controllers", ())))

    # -- paths and files ----------------------------------------------------------------------

    @property
    def directories(self) -> list[str]:
        """Each distinct directory once (co-mounted v1 controllers share one)."""
        return sorted(set(self.dirs.values()))

    def path(self, controller: str) -> str:
        """The directory holding `controller`'s files (v2: the one directory)."""
        if self.version == "v2":
            return self.dirs[UNIFIED]
        try:
            return self.dirs[controller]
        except KeyError:
            raise CgroupError(controller, "not a controller of this cgroup set") from None

    def has(self, controller: str, file: str) -> bool:
        """Whether the kernel offers `file` (e.g. memory.memsw.* only with swap accounting)."""
        if self.version == "v1" and controller not in self.dirs:
            return False
        return os.path.exists(os.path.join(self.path(controller), file))

    def read(self, controller: str, file: str) -> str:
        path = os.path.join(self.path(controller), file)
        try:
            return _read(path).strip()
        except OSError as e:
            raise CgroupError(path, f"read: {e.strerror}", errno_=e.errno) from e

    def read_keyed(self, controller: str, file: str) -> dict[str, int]:
        return parse_keyed(self.read(controller, file))

    def write(self, controller: str, file: str, value: str | int) -> None:
        path = os.path.join(self.path(controller), file)
        try:
            _write(path, str(value))
        except OSError as e:
            raise CgroupError(path, f"write {value!r}: {e.strerror}", errno_=e.errno) from e

    def exists(self) -> bool:
        """True while any of its directories exists (a crash may have left some)."""
        return any(os.path.isdir(d) for d in self.directories)

    # -- lifecycle ----------------------------------------------------------------------------

    def create(self) -> None:
        """Make the directories (and on v2 enable the controllers in the parents). Idempotent."""
        if self.version == "v2" and self.enable_from is not None:
            self._enable_controllers(os.path.dirname(self.dirs[UNIFIED]))
        for d in self.directories:
            try:
                os.makedirs(d, exist_ok=True)
            except OSError as e:
                raise CgroupError(d, f"mkdir: {e.strerror}", errno_=e.errno) from e

    def _enable_controllers(self, parent: str) -> None:
        # Every cgroup from enable_from down to the leaf's parent must list the controllers in
        # cgroup.subtree_control, so that the next one down gets them.
        assert self.enable_from is not None
        rel = os.path.relpath(parent, self.enable_from)
        if rel.startswith(".."):
            raise CgroupError(parent, f"not below {self.enable_from}")
        chain = [self.enable_from]
        for part in ([] if rel == "." else rel.split(os.sep)):
            chain.append(os.path.join(chain[-1], part))
        for i, d in enumerate(chain):
            try:
                if i:
                    os.makedirs(d, exist_ok=True)
                enabled = set(_read(os.path.join(d, "cgroup.subtree_control")).split())
                missing = [c for c in self.controllers if c not in enabled]
                if not missing:
                    continue
                if i == 0:
                    offered = set(_read(os.path.join(d, "cgroup.controllers")).split())
                    absent = [c for c in missing if c not in offered]
                    if absent:
                        raise CgroupError(d, f"controllers {' '.join(absent)} are not delegated "
                                             f"to this cgroup (cgroup.controllers: {' '.join(sorted(offered))})")
                _write(os.path.join(d, "cgroup.subtree_control"), " ".join(f"+{c}" for c in missing))
            except OSError as e:
                if e.errno == errno.EBUSY:
                    raise CgroupError(d, "cannot enable controllers: this cgroup holds processes "
                                         "(cgroup v2 'no internal processes' rule); start the launcher "
                                         "in a leaf cgroup or give --cgroup-root a delegated subtree",
                                      errno_=e.errno) from e
                raise CgroupError(d, f"enable controllers: {e.strerror}", errno_=e.errno) from e

    def add_pid(self, pid: int) -> None:
        """Move process `pid` (all its threads) into the cgroup in every hierarchy."""
        for d in self.directories:
            path = os.path.join(d, "cgroup.procs")
            try:
                _write(path, str(pid))
            except OSError as e:
                raise CgroupError(path, f"add pid {pid}: {e.strerror}", errno_=e.errno) from e

    def pids(self) -> set[int]:
        """Every process in the cgroup or below it, in any of its hierarchies."""
        found: set[int] = set()
        for top in self.directories:
            for d in _subtree(top):
                found |= _procs(d)
        return found

    def freeze(self, timeout: float = FREEZE_TIMEOUT) -> bool:
        """Stop every process in the cgroup; True once the kernel reports it frozen. False if this
        set has no freezer (v1 without the freezer hierarchy) or freezing did not finish in time."""
        if self.version == "v2":
            d = self.dirs[UNIFIED]
            control, value = os.path.join(d, "cgroup.freeze"), "1"
            def frozen() -> bool:
                return parse_keyed(_read(os.path.join(d, "cgroup.events"))).get("frozen") == 1
        else:
            d = self.dirs.get("freezer", "")
            control, value = os.path.join(d, "freezer.state"), "FROZEN"
            def frozen() -> bool:
                return _read(control).strip() == "FROZEN"
        if not d or not os.path.exists(control):
            return False
        try:
            _write(control, value)
            return _wait_for(frozen, timeout)
        except FileNotFoundError:
            return False

    def thaw(self) -> None:
        """Undo freeze(); fine if never frozen or already gone."""
        if self.version == "v2":
            control, value = os.path.join(self.dirs[UNIFIED], "cgroup.freeze"), "0"
        elif "freezer" in self.dirs:
            control, value = os.path.join(self.dirs["freezer"], "freezer.state"), "THAWED"
        else:
            return
        try:
            _write(control, value)
        except FileNotFoundError:
            pass

    def kill_all(self, timeout: float = EXIT_TIMEOUT, *, use_kill_file: bool = True) -> None:
        """SIGKILL every process in the cgroup (and below) and wait until they have left.

        v2 with cgroup.kill (Linux 5.14+): one write kills the whole subtree, forks included.
        Otherwise freeze (so nothing forks between listing and signalling), SIGKILL each process
        through a pidfd, thaw (frozen tasks die on thaw), and repeat while any remain.
        `use_kill_file=False` forces the second path (older kernels always take it)."""
        deadline = time.monotonic() + timeout
        while pids := self.pids():
            if time.monotonic() >= deadline:
                raise CgroupError(self.directories[0], f"processes {sorted(pids)} survive SIGKILL")
            kill_file = os.path.join(self.dirs[UNIFIED], "cgroup.kill") if self.version == "v2" else None
            if kill_file and use_kill_file and os.path.exists(kill_file):
                fds = _pidfds(pids)   # opened first: these are the processes we then wait for
                try:
                    _write(kill_file, "1")
                except FileNotFoundError:
                    pass              # removed meanwhile: nothing left to kill
            else:
                try:
                    frozen = self.freeze()
                    fds = _pidfds(self.pids() if frozen else pids)
                    for fd in fds:
                        try:
                            signal.pidfd_send_signal(fd, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                finally:
                    self.thaw()
            try:
                # Bounded slices, so a process that left the cgroup instead of dying cannot hold
                # us past a re-read of cgroup.procs.
                _wait_exited(fds, min(1.0, max(0.0, deadline - time.monotonic())))
            finally:
                _close_all(fds)

    def destroy(self, timeout: float = EXIT_TIMEOUT) -> None:
        """Remove the cgroup and any below it, children first. Idempotent. Does not kill: while
        processes are still exiting (or a child cgroup appears) it waits for them, bounded."""
        deadline = time.monotonic() + timeout
        for top in self.directories:
            self._remove_tree(top, deadline)

    def _remove_tree(self, top: str, deadline: float) -> None:
        for d in reversed(list(_subtree(top))):   # children before parents
            self._remove_one(d, deadline)

    def _remove_one(self, d: str, deadline: float) -> None:
        delay = 0.001
        while True:
            try:
                os.rmdir(d)
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                    raise CgroupError(d, f"rmdir: {e.strerror}", errno_=e.errno) from e
                if time.monotonic() >= deadline:
                    left = _procs(d)
                    raise CgroupError(d, f"rmdir: {e.strerror}" + (
                        f" (processes {sorted(left)} still inside)" if left else ""),
                        errno_=e.errno) from e
            # Busy: a child cgroup was made meanwhile, or tasks are still on their way out.
            try:
                subs = [os.path.join(d, n) for n in os.listdir(d) if os.path.isdir(os.path.join(d, n))]
            except FileNotFoundError:
                return
            for sub in subs:
                self._remove_tree(sub, deadline)
            if left_pids := _procs(d):
                fds = _pidfds(left_pids)
                try:
                    _wait_exited(fds, max(0.0, deadline - time.monotonic()))
                finally:
                    _close_all(fds)
            else:
                # Empty yet busy: the kernel is still releasing exited tasks; no event for that.
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 0.05)
