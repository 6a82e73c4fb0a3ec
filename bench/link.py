"""A registry behind a slow link: its own network namespace, a veth pair, `tbf`, and a delay proxy.

    with SlowLink(workdir, rtt=0.02) as link:      # netns imagefs-bench-<random>, registry inside
        link.push(layout, "python")                # skopeo copy oci:… → the registry (no limit yet)
        link.set_rate("100mbit")                   # tbf on both ends of the veth pair
        ref = link.ref("python")                   # docker://127.0.0.1:<proxy>/bench/python:latest

Addresses: a /30 picked at random in 198.18.0.0/15 (RFC 2544's benchmarking range) that no host
address or route overlaps, used only between the host and the namespace. Clients talk to the delay
proxy on 127.0.0.1 (plain HTTP, as imagefs and skopeo allow for loopback), which talks to the
registry over the veth pair. Nothing leaves the machine.

Everything is undone by `close` (also on errors half-way through `start`): the registry is ended
by the PID we started, the namespace deleted (which deletes the veth pair), the proxy closed.

`LoopbackLink` is the same interface for --smoke: a registry on 127.0.0.1 (tests/support's), no
namespace and no rate limit, the delay proxy in front for counting bytes.

Concurrency: none; call from one thread.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
import secrets
import subprocess
import time
from pathlib import Path

import httpx

from bench.proxy import Counters, DelayProxy

log = logging.getLogger("bench")

REGISTRY_BIN = "/usr/bin/docker-registry"
BENCH_RANGE = ipaddress.ip_network("198.18.0.0/15")
REGISTRY_PORT = 5000


def _run(*argv: str) -> str:
    r = subprocess.run(list(argv), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return r.stdout


def _host_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    for addr in json.loads(_run("ip", "-j", "-4", "addr")):
        for info in addr.get("addr_info", []):
            nets.append(ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False))
    for route in json.loads(_run("ip", "-j", "-4", "route", "show", "table", "all")):
        dst = route.get("dst", "")
        if dst and dst != "default":
            try:
                nets.append(ipaddress.ip_network(dst, strict=False))
            except ValueError:
                pass
    return nets


def pick_subnet() -> ipaddress.IPv4Network:
    taken = _host_networks()
    for _ in range(100):
        index = random.randrange(BENCH_RANGE.num_addresses // 4)
        net = ipaddress.ip_network(f"{BENCH_RANGE.network_address + index * 4}/30")
        if not any(net.overlaps(t) for t in taken):
            return net
    raise RuntimeError("no free /30 in 198.18.0.0/15")


class _Link:
    """What both links share: a registry reached through a DelayProxy, pushes, refs."""

    proxy: DelayProxy | None = None
    registry_host: str = ""  # host:port the registry is reachable at without the proxy
    rate: str | None = None

    def ref(self, tag: str) -> str:
        assert self.proxy is not None
        return f"docker://127.0.0.1:{self.proxy.port}/bench/{tag}:latest"

    def direct_url(self) -> str:
        return f"http://{self.registry_host}"

    def counters(self) -> Counters:
        assert self.proxy is not None
        return self.proxy.counters()

    def push(self, layout: Path, tag: str, repo: str | None = None) -> None:
        """Push the layout's *tag* as bench/<repo, default the tag>:latest."""
        subprocess.run(["skopeo", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false",
                        f"oci:{layout}:{tag}", f"docker://{self.registry_host}/bench/{repo or tag}:latest"],
                       check=True, capture_output=True, timeout=1800)

    def push_blob(self, repo: str, data: bytes) -> str:
        """Upload *data* as a blob of *repo* (monolithic upload); returns its digest."""
        import hashlib

        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with httpx.Client(base_url=self.direct_url(), timeout=600, trust_env=False) as client:
            r = client.post(f"/v2/{repo}/blobs/uploads/")
            r.raise_for_status()
            location = r.headers["location"]
            sep = "&" if "?" in location else "?"
            r = client.put(f"{location}{sep}digest={digest}", content=data,
                           headers={"Content-Type": "application/octet-stream"})
            r.raise_for_status()
        return digest

    def blob_url(self, repo: str, digest: str) -> str:
        assert self.proxy is not None
        return f"http://127.0.0.1:{self.proxy.port}/v2/{repo}/blobs/{digest}"

    def _wait_registry(self, proc: subprocess.Popen, logfile: Path) -> None:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {logfile.read_text()[-2000:]}")
            try:
                httpx.get(f"{self.direct_url()}/v2/", timeout=1, trust_env=False)
                return
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError("docker-registry did not answer within 30 s") from None
                time.sleep(0.05)

    def __enter__(self):
        try:
            return self.start()  # type: ignore[attr-defined]
        except BaseException:
            self.close()  # type: ignore[attr-defined]
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()  # type: ignore[attr-defined]


def _registry_config(root: Path, addr: str) -> Path:
    storage = root / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = {"version": 0.1, "log": {"level": "error", "accesslog": {"disabled": True}},
              "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
              "http": {"addr": addr, "secret": "imagefs-bench"}}
    path = root / "config.yml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def _end(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class SlowLink(_Link):
    def __init__(self, workdir: Path, rtt: float) -> None:
        self.workdir = Path(workdir)
        self.rtt = rtt
        suffix = secrets.token_hex(4)
        self.netns = f"imagefs-bench-{suffix}"
        self.host_if, self.ns_if = f"ibh{suffix}", f"ibn{suffix}"
        self.subnet: ipaddress.IPv4Network | None = None
        self._ns_made = self._veth_made = False
        self._registry: subprocess.Popen | None = None

    @property
    def host_addr(self) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + 1)

    @property
    def ns_addr(self) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + 2)

    def start(self) -> SlowLink:
        self.subnet = pick_subnet()
        _run("ip", "netns", "add", self.netns)
        self._ns_made = True
        _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if, "netns", self.netns)
        self._veth_made = True
        _run("ip", "addr", "add", f"{self.host_addr}/30", "dev", self.host_if)
        _run("ip", "link", "set", self.host_if, "up")
        _run("ip", "-n", self.netns, "addr", "add", f"{self.ns_addr}/30", "dev", self.ns_if)
        _run("ip", "-n", self.netns, "link", "set", self.ns_if, "up")
        _run("ip", "-n", self.netns, "link", "set", "lo", "up")
        root = self.workdir / "registry"
        root.mkdir(parents=True, exist_ok=True)
        self.registry_host = f"{self.ns_addr}:{REGISTRY_PORT}"
        config = _registry_config(root, self.registry_host)
        logfile = root / "registry.log"
        with open(logfile, "wb") as out:
            # `ip netns exec` execs the registry in place: the PID we hold is the registry's.
            self._registry = subprocess.Popen(["ip", "netns", "exec", self.netns, REGISTRY_BIN, "serve", str(config)],
                                              stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._wait_registry(self._registry, logfile)
        self.proxy = DelayProxy((self.ns_addr, REGISTRY_PORT), self.rtt).start()
        log.info("slow link: netns %s, %s <-> %s, registry pid %d, proxy 127.0.0.1:%d, rtt %.0f ms",
                 self.netns, self.host_addr, self.ns_addr, self._registry.pid, self.proxy.port, self.rtt * 1000)
        return self

    def set_rate(self, rate: str | None) -> None:
        """`tbf` at *rate* (tc syntax: 100mbit, 1gbit) on both ends of the pair; None removes it."""
        for prefix, dev in ((["tc"], self.host_if), (["tc", "-n", self.netns], self.ns_if)):
            if rate is None:
                subprocess.run([*prefix, "qdisc", "del", "dev", dev, "root"], capture_output=True)
                continue
            bits = _rate_bits(rate)
            burst = max(bits // 8 // 100, 64 * 1024)  # 10 ms worth of bytes, at least 64 KiB
            _run(*prefix, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                 "burst", str(burst), "latency", "50ms")
        self.rate = rate

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
            self.proxy = None
        _end(self._registry)
        self._registry = None
        if self._ns_made:
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
            self._ns_made = False
        if self._veth_made:  # gone with the namespace; make sure
            subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
            self._veth_made = False


class LoopbackLink(_Link):
    """For --smoke: a registry on 127.0.0.1, no namespace, no rate limit; the proxy counts bytes."""

    def __init__(self, workdir: Path, rtt: float = 0.0) -> None:
        self.workdir = Path(workdir)
        self.rtt = rtt
        self._registry: subprocess.Popen | None = None

    def start(self) -> LoopbackLink:
        from tests.support.registry import free_port

        root = self.workdir / "registry"
        root.mkdir(parents=True, exist_ok=True)
        self.registry_host = f"127.0.0.1:{free_port()}"
        config = _registry_config(root, self.registry_host)
        logfile = root / "registry.log"
        with open(logfile, "wb") as out:
            self._registry = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=out,
                                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._wait_registry(self._registry, logfile)
        host, port = self.registry_host.split(":")
        self.proxy = DelayProxy((host, int(port)), self.rtt).start()
        return self

    def set_rate(self, rate: str | None) -> None:
        self.rate = None  # loopback: no limit

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
            self.proxy = None
        _end(self._registry)
        self._registry = None


def _rate_bits(rate: str) -> int:
    units = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "bit": 1}
    for unit, factor in units.items():
        if rate.endswith(unit):
            return int(float(rate[: -len(unit)]) * factor)
    raise ValueError(f"rate {rate!r}: use kbit, mbit or gbit")


def rate_bits(rate: str | None) -> int | None:
    return None if rate is None else _rate_bits(rate)
