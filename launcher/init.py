"""The container init: `python -S -P -m launcher.init CONFIG.json --sync-fd N`, started by launcher/launch.py.

Three processes, after Mesos' `mesos-containerizer launch` and tini:

    launcher ──spawn──▶ monitor ──fork──▶ container init ──fork──▶ task (execve)
                        host namespaces   PID 1 of a new pid ns     setuid, chdir, exec
                        writes status.json mounts, pivot_root,       argv[0] looked up on
                        forwards signals   reaps, forwards signals   the task's PATH

1. The monitor reads "go" from the sync fd: the launcher first moves it into the container's
   cgroups (isolate before exec), so everything forked after inherits them. EOF means abort (125).
   Only then does it read its config: the launcher may start it before the config exists (Python's
   start-up then overlaps the image's pull and mount) and writes the config before saying "go".
2. It unshares only the pid namespace (which applies to its children), so it stays in the host's
   mount namespace and can write the status file by path at the end: the container never holds an
   fd to anything on the host beyond its stdio (an open host directory in PID 1 would be reachable
   through /proc/1/fd from inside the container).
3. The container init unshares the other namespaces, builds the rootfs view and pivots into it
   (launcher/linux/rootfs.py), forks the task, forwards signals to it, reaps every orphan, and when
   the task exits sends {"exit_code", "signal", "error"} to the monitor over a pipe and exits with
   the task's code (128+N for signal N). Its exit makes the kernel kill the rest of the pid ns.
4. The monitor writes that report to status_path (atomically) and exits with the same code.

Exit codes, as docker and podman use them: 125 the launch failed (bad config, a mount, setuid, a
missing workdir, an abort before "go"), 126 argv[0] found but not executable, 127 argv[0] not found.
A missing workdir is 125 rather than 126: the task was never looked up, the container was wrong.

Config keys (JSON object; all but argv and status_path optional):
    rootfs        host directory to pivot into (needs "mnt"); null: stay in the host's file system
    sandbox       host directory bound read-write at SANDBOX_PATH (when rootfs is set)
    argv, env     the task's command line and its whole environment (PATH in env is used for lookup)
    workdir       container path to chdir to before exec ("/")
    uid, gid, groups   credentials of the task (0, 0, [])
    hostname      needs "uts";  loopback_up: bring lo up, needs "net"
    namespaces    subset of "pid", "mnt", "uts", "ipc", "net", "cgroup"
    mounts        [{"source", "target", "type": "bind", "read_only", "is_dir", "flags", "data"}]:
                  binds of host paths (source absolute) or other file systems, in order, after the
                  sandbox; targets are container paths resolved inside the rootfs
    status_path   host path of the status JSON the monitor writes
    sync_fd       fd to read "go" from (or --sync-fd N on the command line)
    container_id  for messages only

Without "pid" the init is no PID 1: it still reaps orphans (as a child subreaper), but processes
left when the task exits outlive it; the cgroup isolators' cleanup is what ends them then.

Concurrency: single-threaded, no event loop. The monitor and the container init block every signal
they handle and take them one at a time with sigwaitinfo(), so there are no handlers and no races
between a signal and a fork: a signal that arrives early waits, pending, until the loop runs.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import sys

from launcher.linux import netdev
from launcher.linux import rootfs as fs
from launcher.linux import syscalls as sc

# Every container start pays for this module's imports (the launcher starts it with `python -S`:
# no site-packages either), so it imports only the standard library's cheap modules and
# launcher/linux: no argparse, dataclasses or typing, whose imports cost more than the rest.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn

SANDBOX_PATH = "/mnt/mesos/sandbox"   # launcher.spec.SANDBOX_PATH (spec imports dataclasses)
GO = b"go"
EXIT_LAUNCH_FAILED = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT)
_WAITED = {signal.SIGCHLD, *FORWARDED}
_MAX_MESSAGE = 1000


class LaunchError(Exception):
    """A launch step failed; `code` is the exit status it maps to."""

    def __init__(self, message: str, code: int = EXIT_LAUNCH_FAILED) -> None:
        super().__init__(message)
        self.code = code


class Mount:
    """One mount of the config's "mounts"."""

    __slots__ = ("source", "target", "type", "read_only", "is_dir", "flags", "data")

    def __init__(self, source: str, target: str, type: str = "bind", read_only: bool = False,
                 is_dir: bool | None = None, flags: int = 0, data: str | None = None) -> None:
        self.source = source
        self.target = target
        self.type = type
        self.read_only = read_only
        self.is_dir = is_dir      # bind of a directory or of a file; None: look at the source
        self.flags = flags
        self.data = data


class InitConfig:
    """The config (see the module docstring); `from_dict` builds and validates one."""

    FIELDS = ("argv", "status_path", "env", "rootfs", "sandbox", "workdir", "uid", "gid", "groups",
              "hostname", "namespaces", "loopback_up", "mounts", "sync_fd", "container_id")
    __slots__ = FIELDS

    def __init__(self, argv: list[str], status_path: str, env: dict[str, str] | None = None,
                 rootfs: str | None = None, sandbox: str | None = None, workdir: str = "/", uid: int = 0,
                 gid: int = 0, groups: list[int] | None = None, hostname: str | None = None,
                 namespaces: list[str] | None = None, loopback_up: bool = False,
                 mounts: list[Mount] | None = None, sync_fd: int | None = None,
                 container_id: str | None = None) -> None:
        self.argv = argv
        self.status_path = status_path
        self.env = {} if env is None else env
        self.rootfs = rootfs
        self.sandbox = sandbox
        self.workdir = workdir
        self.uid = uid
        self.gid = gid
        self.groups = [] if groups is None else groups
        self.hostname = hostname
        self.namespaces = [] if namespaces is None else namespaces
        self.loopback_up = loopback_up
        self.mounts = [] if mounts is None else mounts
        self.sync_fd = sync_fd
        self.container_id = container_id

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> InitConfig:
        unknown = set(doc) - set(cls.FIELDS)
        if unknown:
            raise LaunchError(f"config: unknown keys {sorted(unknown)}")
        doc = dict(doc)
        doc["mounts"] = [Mount(**m) for m in doc.get("mounts", [])]
        cfg = cls(**doc)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if not self.argv or not all(isinstance(a, str) for a in self.argv):
            raise LaunchError("config: argv must be a non-empty list of strings")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.env.items()):
            raise LaunchError("config: env must map strings to strings")
        for name in self.namespaces:
            if name not in sc.NAMESPACES:
                raise LaunchError(f"config: unknown namespace {name!r}")
        # Each of these would change the host itself without its namespace.
        needs = [(self.rootfs is not None or bool(self.mounts), "mnt", "a rootfs or mounts"),
                 (self.hostname is not None, "uts", "hostname"), (self.loopback_up, "net", "loopback_up")]
        for wanted, ns, what in needs:
            if wanted and ns not in self.namespaces:
                raise LaunchError(f"config: {what} needs the {ns!r} namespace")
        if self.mounts and self.rootfs is None:
            raise LaunchError("config: mounts need a rootfs")
        for m in self.mounts:
            if not m.target.startswith("/"):
                raise LaunchError(f"config: mount target {m.target!r} is not absolute")
            if m.type == "bind" and not m.source.startswith("/"):
                raise LaunchError(f"config: bind source {m.source!r} is not absolute")


# ---- small helpers usable after fork --------------------------------------------------------------

def _say(message: str) -> None:
    """One line on stderr (the sandbox's stderr file); os.write, so no buffer is copied by fork."""
    try:
        os.write(2, f"imagefs-init: {message}\n".encode(errors="replace"))
    except OSError:
        pass


def _one_line(message: str) -> str:
    return " ".join(message.split())[:_MAX_MESSAGE]


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _decode_wait_status(status: int) -> tuple[int, int | None]:
    """(exit code, signal) from a waitpid status; a signal N gives code 128+N, as shells do."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return 128 + sig, sig
    return os.waitstatus_to_exitcode(status), None


def _report(exit_code: int | None, sig: int | None = None, error: str | None = None) -> dict[str, Any]:
    return {"exit_code": exit_code, "signal": sig, "error": None if error is None else _one_line(error)}


def write_status(path: str, report: dict[str, Any]) -> None:
    """Atomically replace *path* with the JSON *report* (temp, fsync, rename)."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, json.dumps(report).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


# ---- the task (grandchild) ------------------------------------------------------------------------

def _find_executable(name: str, env: dict[str, str]) -> list[str]:
    """Candidates for argv[0]: itself if it has a slash, else each PATH entry (the task's PATH)."""
    if "/" in name:
        return [name]
    dirs = env.get("PATH", DEFAULT_PATH).split(":")
    return [os.path.join(d or ".", name) for d in dirs]


def _exec_task(cfg: InitConfig, parent: int, errpipe: int) -> NoReturn:
    """In the forked task: drop privileges, chdir, reset signals, exec. Never returns; a failure is
    written to *errpipe* (close-on-exec, so a successful exec closes it with nothing written)."""
    try:
        try:
            os.setgroups(cfg.groups)
            os.setgid(cfg.gid)
            os.setuid(cfg.uid)
        except OSError as e:
            raise LaunchError(f"set user {cfg.uid}:{cfg.gid}: {e.strerror}") from e
        # After setuid, which clears it. Without a pid namespace this is what ties the task to init.
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(EXIT_LAUNCH_FAILED)
        try:
            os.chdir(cfg.workdir)
        except OSError as e:
            raise LaunchError(f"workdir {cfg.workdir}: {e.strerror}") from e
        # exec keeps ignored signals ignored and the mask: give the task a clean slate. Python
        # ignores SIGPIPE and SIGXFSZ itself.
        for sig in (*FORWARDED, signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        os.closerange(3, errpipe)
        os.closerange(errpipe + 1, 65536)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        argv0 = cfg.argv[0]
        first_error: OSError | None = None
        for candidate in _find_executable(argv0, cfg.env):
            try:
                os.execve(candidate, cfg.argv, cfg.env)
            except OSError as e:
                # As execvp: keep looking past missing entries, remember the first other error.
                if e.errno not in (errno.ENOENT, errno.ENOTDIR) and first_error is None:
                    first_error = e
        if first_error is None:
            raise LaunchError(f"exec {argv0}: not found", EXIT_NOT_FOUND)
        raise LaunchError(f"exec {argv0}: not executable: {first_error.strerror}", EXIT_NOT_EXECUTABLE)
    except LaunchError as e:
        code, message = e.code, str(e)
    except BaseException as e:   # anything at all: the child must never return into init's code
        code, message = EXIT_LAUNCH_FAILED, f"starting the task: {e!r}"
    try:
        os.write(errpipe, f"{code} {_one_line(message)}".encode(errors="replace"))
    finally:
        os._exit(code)


def _start_task(cfg: InitConfig) -> tuple[int, str | None]:
    """Fork the task; returns its pid and the launch error, if its exec failed (it then exits with
    125/126/127 by itself, so the caller waits for it like any task)."""
    errpipe_r, errpipe_w = os.pipe()   # both close-on-exec
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(errpipe_r)
        _exec_task(cfg, parent, errpipe_w)
    os.close(errpipe_w)
    try:
        data = _read_all(errpipe_r)   # EOF at the task's exec or exit
    finally:
        os.close(errpipe_r)
    if not data:
        return pid, None
    message = data.decode(errors="replace").partition(" ")[2]
    _say(message)
    return pid, message


# ---- the container init (child, PID 1) ----------------------------------------------------------

def _bring_up_loopback() -> None:
    try:
        netdev.link_up("lo")
    except OSError as e:
        if e.errno == errno.ENODEV:
            raise LaunchError("bring up lo: no loopback device in the new namespace") from e
        raise LaunchError(f"bring up lo: {e.strerror or e}") from e


def _step(what: str, fn: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    """Run one setup step; an OSError becomes a one-line LaunchError naming the step."""
    try:
        fn(*args, **kwargs)
    except OSError as e:
        raise LaunchError(f"{what}: {e.strerror or e}") from e


def _setup_namespaces(cfg: InitConfig) -> None:
    others = [n for n in cfg.namespaces if n != "pid"]
    if others:
        _step(f"unshare {','.join(others)}", sc.unshare, sc.namespace_flags(others))
    if "mnt" in cfg.namespaces:
        _step("make mounts private", fs.make_private)
    if cfg.hostname is not None:
        _step(f"set hostname {cfg.hostname}", sc.sethostname, cfg.hostname)
    if cfg.loopback_up:
        _bring_up_loopback()


def _setup_rootfs(cfg: InitConfig) -> None:
    if cfg.rootfs is None:
        return
    if not os.path.isdir(cfg.rootfs):
        raise LaunchError(f"rootfs {cfg.rootfs}: not a directory")
    root = os.path.realpath(cfg.rootfs)
    _step(f"bind rootfs {root}", fs.bind_self, root)
    _step("mount /proc", fs.mount_proc, root)
    _step("mount /dev", fs.mount_dev, root)
    _step("mount /sys", fs.mount_sys, root)
    if cfg.sandbox is not None:
        _step(f"mount sandbox {cfg.sandbox}", fs.mount_at, root, SANDBOX_PATH, cfg.sandbox, is_dir=True)
    for m in cfg.mounts:
        _step(f"mount {m.source} at {m.target}", fs.mount_at, root, m.target, m.source, fstype=m.type,
              flags=m.flags, data=m.data, read_only=m.read_only, is_dir=m.is_dir)
    _step("pivot_root", fs.pivot, root)


def _wait_for_task(task: int) -> int:
    """Forward signals to *task* and reap every child (orphans re-parent to us) until *task* ends;
    returns its wait status."""
    while True:
        info = signal.sigwaitinfo(_WAITED)
        if info.si_signo != signal.SIGCHLD:
            try:
                os.kill(task, info.si_signo)
            except ProcessLookupError:
                pass   # exited; its SIGCHLD is pending
            continue
        # SIGCHLDs coalesce: reap until nothing more has exited.
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == task:
                return status


def _container_init(cfg: InitConfig, report_fd: int, lifeline: int) -> NoReturn:
    """The forked child: PID 1 of the container when a pid namespace was asked for."""
    report: dict[str, Any]
    try:
        # Die with the monitor. If it is already gone the signal will never come, but then its end
        # of the lifeline is closed (files close before the parent-death signal is sent).
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if select.select([lifeline], [], [], 0)[0]:
            os._exit(EXIT_LAUNCH_FAILED)
        os.close(lifeline)
        # Without a pid namespace orphans would go to the host's init: keep them.
        sc.prctl(sc.PR_SET_CHILD_SUBREAPER, 1)
        _setup_namespaces(cfg)
        _setup_rootfs(cfg)
        task, error = _start_task(cfg)
        exit_code, sig = _decode_wait_status(_wait_for_task(task))
        report = _report(exit_code, sig, error)
    except LaunchError as e:
        _say(str(e))
        report = _report(EXIT_LAUNCH_FAILED, None, str(e))
    except BaseException as e:
        _say(f"container init failed: {e!r}")
        report = _report(EXIT_LAUNCH_FAILED, None, f"container init failed: {e!r}")
    try:
        os.write(report_fd, json.dumps(report).encode() + b"\n")
    finally:
        os._exit(report["exit_code"] if report["exit_code"] is not None else EXIT_LAUNCH_FAILED)


# ---- the monitor (the launcher's child) -----------------------------------------------------------

def _wait_for_go(fd: int | None) -> None:
    if fd is None:
        return
    received = b""
    while len(received) < len(GO):
        chunk = os.read(fd, len(GO) - len(received))
        if not chunk:
            raise LaunchError("aborted by the launcher before start")
        received += chunk
    os.close(fd)
    if received != GO:
        raise LaunchError(f"bad start byte {received!r} from the launcher")


def run_monitor(cfg: InitConfig) -> int:
    """Fork the container init, wait for it, write the status file; returns the exit code."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _WAITED)   # inherited by the container init
    if "pid" in cfg.namespaces:
        # Applies to children only: the monitor itself stays in the host's pid namespace.
        _step("unshare pid", sc.unshare, sc.CLONE_NEWPID)
    report_r, report_w = os.pipe()
    lifeline_r, lifeline_w = os.pipe()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(report_r)
        os.close(lifeline_w)
        _container_init(cfg, report_w, lifeline_r)
    os.close(report_w)
    os.close(lifeline_r)
    while True:
        info = signal.sigwaitinfo(_WAITED)
        if info.si_signo == signal.SIGCHLD:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            continue
        try:
            os.kill(pid, info.si_signo)
        except ProcessLookupError:
            pass
    # The init wrote its report before exiting; read what is there without waiting for EOF (a
    # task that never reached exec could still hold the write end for a moment).
    os.set_blocking(report_r, False)
    lines = _read_all(report_r).splitlines()
    os.close(report_r)
    report = json.loads(lines[-1]) if lines else None
    if report is None:
        code, sig = _decode_wait_status(status)
        error = f"container init killed by signal {sig}" if sig else "container init exited without a report"
        report = _report(code, sig, error)
    write_status(cfg.status_path, report)
    os.close(lifeline_w)
    return report["exit_code"] if report["exit_code"] is not None else EXIT_LAUNCH_FAILED


def _parse_args(argv: list[str]) -> tuple[str, int | None]:
    """`CONFIG [--sync-fd N]`, the launcher's fixed command line, parsed by hand (see the imports)."""
    config: str | None = None
    sync_fd: int | None = None
    rest = list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--sync-fd" and rest:
            sync_fd = int(rest.pop(0))
        elif arg.startswith("--sync-fd="):
            sync_fd = int(arg.partition("=")[2])
        elif config is None and not arg.startswith("-"):
            config = arg
        else:
            raise ValueError(f"unexpected argument {arg!r}")
    if config is None:
        raise ValueError("the config file is missing")
    return config, sync_fd


def _read_config(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    if not isinstance(doc, dict):
        raise LaunchError("config: not a JSON object")
    return doc


def _status_path_of(path: str) -> str | None:
    """The config's status_path, for reporting a failure that came before (or while) reading it."""
    try:
        value = _read_config(path).get("status_path")
    except (LaunchError, OSError, ValueError):
        return None
    return value if isinstance(value, str) else None


def main(argv: list[str] | None = None) -> NoReturn:
    try:
        config_path, sync_fd = _parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        _say(f"usage: launcher.init CONFIG [--sync-fd N]: {e}")
        os._exit(2)
    status_path: str | None = None
    try:
        if sync_fd is not None:
            # "go" first, the config after: the launcher may start the init before the config
            # exists, so that Python's start-up overlaps pulling and mounting the image. It
            # writes the config before it says "go".
            _wait_for_go(sync_fd)
        doc = _read_config(config_path)
        status_path = doc.get("status_path")
        if sync_fd is None and doc.get("sync_fd") is not None:
            _wait_for_go(doc["sync_fd"])   # a config that names its own sync fd
        doc.pop("sync_fd", None)
        cfg = InitConfig.from_dict(doc)
        code = run_monitor(cfg)
    except (LaunchError, OSError, ValueError, TypeError) as e:
        message = str(e) if isinstance(e, LaunchError) else f"{type(e).__name__}: {e}"
        _say(message)
        status_path = status_path if isinstance(status_path, str) else _status_path_of(config_path)
        if status_path:
            try:
                write_status(status_path, _report(EXIT_LAUNCH_FAILED, None, message))
            except OSError as w:
                _say(f"cannot write status {status_path}: {w.strerror}")
        code = EXIT_LAUNCH_FAILED
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
