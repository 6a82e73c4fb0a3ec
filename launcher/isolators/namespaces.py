"""Namespace isolators: namespaces/pid, namespaces/ipc, namespaces/uts, network/none, network/host.

Each asks the container init (launcher/init.py) for namespaces through its LaunchInfo; the init
creates them, so these isolators make nothing on the host and have nothing to clean up or recover.
A new namespace dies with the last process in it.

- namespaces/pid: the init is PID 1 of a new pid namespace; the task sees only its container.
- namespaces/ipc: System V IPC and POSIX message queues of its own.
- namespaces/uts: a hostname of its own: the spec's, else the container id (as docker does).
- network/none: a network namespace with only `lo`, brought up. network/host: the host's network.

Concurrency: as launcher.isolators.base; prepare() only computes.
"""

from __future__ import annotations

from launcher.isolators.base import Isolator, LaunchInfo
from launcher.spec import ContainerConfig

HOST_NAME_MAX = 64   # the kernel's limit, in bytes


class PidNamespaceIsolator(Isolator):
    name = "namespaces/pid"

    def prepare(self, config: ContainerConfig) -> LaunchInfo | None:
        return LaunchInfo(clone_namespaces=("pid",))


class IpcNamespaceIsolator(Isolator):
    name = "namespaces/ipc"

    def prepare(self, config: ContainerConfig) -> LaunchInfo | None:
        return LaunchInfo(clone_namespaces=("ipc",))


class UtsNamespaceIsolator(Isolator):
    name = "namespaces/uts"

    def prepare(self, config: ContainerConfig) -> LaunchInfo | None:
        hostname = config.spec.hostname or self.container_id[:HOST_NAME_MAX]
        if not hostname or len(hostname.encode()) > HOST_NAME_MAX or "\0" in hostname:
            raise ValueError(f"hostname {hostname!r}: must be 1 to {HOST_NAME_MAX} bytes")
        return LaunchInfo(clone_namespaces=("uts",), hostname=hostname)


class NetworkNoneIsolator(Isolator):
    name = "network/none"

    def prepare(self, config: ContainerConfig) -> LaunchInfo | None:
        if config.spec.network != "none":
            raise ValueError(f"{self.name}: the task asks for network {config.spec.network!r}")
        return LaunchInfo(clone_namespaces=("net",), loopback_up=True)


class NetworkHostIsolator(Isolator):
    name = "network/host"

    def prepare(self, config: ContainerConfig) -> LaunchInfo | None:
        if config.spec.network != "host":
            raise ValueError(f"{self.name}: the task asks for network {config.spec.network!r}")
        return None


ISOLATORS: dict[str, type[Isolator]] = {cls.name: cls for cls in (
    PidNamespaceIsolator, IpcNamespaceIsolator, UtsNamespaceIsolator, NetworkNoneIsolator, NetworkHostIsolator)}


def network_isolator(network: str) -> str:
    """The isolator name for a TaskSpec.network value ("none" or "host")."""
    return f"network/{network}"
