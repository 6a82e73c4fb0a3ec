"""A real Docker registry (Debian's `docker-registry`, distribution 2.8) on a free loopback port.

Each instance has its own storage and config under a temp dir and is stopped by the PID we started.
Options: htpasswd basic auth, TLS with a test CA, token auth (`auth` passed through verbatim).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.images import wait_until

REGISTRY_BIN = "/usr/bin/docker-registry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Registry:
    root: Path
    port: int = 0
    tls_cert: str | None = None
    tls_key: str | None = None
    htpasswd: str | None = None
    auth: dict | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_cert else 'http'}://{self.host}"

    def ref(self, repo_tag: str) -> str:
        return f"docker://{self.host}/{repo_tag}"

    def start(self) -> Registry:
        self.port = self.port or free_port()
        storage = self.root / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        http: dict = {"addr": f"127.0.0.1:{self.port}", "secret": "imagefs-test"}
        if self.tls_cert:
            http["tls"] = {"certificate": self.tls_cert, "key": self.tls_key}
        config: dict = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
            "http": http,
        }
        if self.htpasswd:
            config["auth"] = {"htpasswd": {"realm": "imagefs-test", "path": self.htpasswd}}
        elif self.auth:
            config["auth"] = self.auth
        cfg = self.root / "config.yml"
        cfg.write_text(json.dumps(config))  # JSON is YAML
        log = open(self.root / "registry.log", "wb")
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()
        try:
            wait_until(self._answers, 20, f"registry on {self.host}")
        except BaseException:
            self.stop()
            raise
        return self

    def _answers(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {(self.root / 'registry.log').read_text()[-2000:]}")
        try:
            httpx.get(f"{self.url}/v2/", verify=False, timeout=1)
            return True
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_htpasswd(path: Path, user: str, password: str) -> str:
    """bcrypt htpasswd entry (distribution accepts only bcrypt), via apache2-utils' htpasswd."""
    subprocess.run(["htpasswd", "-Bbc", str(path), user, password], check=True, capture_output=True)
    return str(path)


def make_ca_and_cert(directory: Path, hostname: str = "127.0.0.1") -> tuple[str, str, str]:
    """A throwaway CA and a server cert for *hostname* (IP SAN); returns (ca, cert, key) paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (d / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt"))
    ext = d / "ext.cnf"
    ext.write_text(f"subjectAltName=IP:{hostname}\nbasicConstraints=CA:FALSE\n")
    run = lambda *a: subprocess.run(list(a), check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
        "-days", "2", "-subj", "/CN=imagefs test CA")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", f"/CN={hostname}")
    run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return str(ca), str(cert), str(key)
