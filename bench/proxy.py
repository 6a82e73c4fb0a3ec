"""A TCP proxy on 127.0.0.1 that adds a fixed round-trip time and counts the bytes it carries.

The kernel here has no netem, so delay lives in user space: each direction is a delay line that
holds every chunk it reads for rtt/2 before writing it on, so a request and its answer cost one
RTT while a long transfer keeps its full rate (the line is pipelined, not stop-and-wait). A new
connection's first bytes wait one more RTT, as a TCP handshake would make them. Rate limits are
not done here but by `tbf` on the link behind (bench/link.py).

    with DelayProxy(("198.18.3.2", 5000), rtt=0.02) as proxy:
        ...clients use 127.0.0.1:{proxy.port}...
        before = proxy.counters()
        ...
        down = proxy.counters().down - before.down     # bytes sent from upstream to clients

Concurrency: threads (two per connection plus one accepting); the counters take a lock. Closing
the proxy shuts every socket, which ends all its threads.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from dataclasses import dataclass

CHUNK = 256 * 1024
LINE_DEPTH = 64  # chunks held per direction at most (backpressure beyond that)


@dataclass(frozen=True)
class Counters:
    up: int = 0           # client -> upstream bytes
    down: int = 0         # upstream -> client bytes
    connections: int = 0

    def __sub__(self, other: Counters) -> Counters:
        return Counters(self.up - other.up, self.down - other.down, self.connections - other.connections)


class DelayProxy:
    def __init__(self, upstream: tuple[str, int], rtt: float = 0.0) -> None:
        self.upstream = upstream
        self.rtt = rtt
        self._lock = threading.Lock()
        self._up = self._down = self._conns = 0
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._closed = False
        self.port = 0

    def counters(self) -> Counters:
        with self._lock:
            return Counters(self._up, self._down, self._conns)

    def start(self) -> DelayProxy:
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", 0))
        lst.listen(256)
        self._listener = lst
        self.port = lst.getsockname()[1]
        t = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def _track(self, sock: socket.socket) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._sockets.add(sock)
            return True

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            accepted = time.monotonic()
            if not self._track(client):
                client.close()
                return
            with self._lock:
                self._conns += 1
            threading.Thread(target=self._connect, args=(client, accepted), daemon=True,
                             name="proxy-conn").start()

    def _connect(self, client: socket.socket, accepted: float) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=30)
        except OSError:
            self._drop(client)
            return
        upstream.settimeout(None)
        if not self._track(upstream):
            upstream.close()
            return
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        not_before = accepted + self.rtt  # the handshake's round trip
        open_directions = [2]  # both sockets are closed once both directions have ended
        for src, dst, up in ((client, upstream, True), (upstream, client, False)):
            line: queue.Queue = queue.Queue(LINE_DEPTH)
            threading.Thread(target=self._read, args=(src, line, not_before, up), daemon=True).start()
            threading.Thread(target=self._write, args=(dst, line, (client, upstream), open_directions),
                             daemon=True).start()

    def _read(self, src: socket.socket, line: queue.Queue, not_before: float, up: bool) -> None:
        half = self.rtt / 2
        while True:
            try:
                data = src.recv(CHUNK)
            except OSError:
                data = b""
            due = max(time.monotonic(), not_before) + half
            line.put((due, data))
            if not data:
                return
            with self._lock:
                if up:
                    self._up += len(data)
                else:
                    self._down += len(data)

    def _write(self, dst: socket.socket, line: queue.Queue, pair: tuple[socket.socket, socket.socket],
               open_directions: list[int]) -> None:
        while True:
            due, data = line.get()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if data:
                try:
                    dst.sendall(data)
                    continue
                except OSError:
                    for sock in pair:  # a broken connection: end both directions now
                        self._drop(sock)
            else:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            with self._lock:
                open_directions[0] -= 1
                last = open_directions[0] == 0
            if last:
                for sock in pair:
                    self._drop(sock)
            return

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets = list(self._sockets)
            self._sockets.clear()
        if self._listener is not None:
            try:  # wakes the thread blocked in accept(); close() alone does not
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
