"""A TCP proxy on loopback that can stall: every byte in both directions waits while it is stalled
(a store that stops answering for a while, then carries on, as an overloaded S3 endpoint does)."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Iterator

from tests.support.net import free_port


class StallingProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target``; :meth:`stall` holds every byte for a while."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.flowing = threading.Event()
        self.flowing.set()
        self.closed = threading.Event()
        self.bytes = 0  # forwarded so far (both directions)
        self.stalls: list[tuple[float, float]] = []
        self.server = socket.create_server(("127.0.0.1", self.port))
        self.server.settimeout(0.2)
        self.threads = [threading.Thread(target=self._accept, daemon=True, name="stall-proxy")]
        self.threads[0].start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stall(self, seconds: float) -> None:
        """Hold every byte for ``seconds`` (in the background), then forward them."""
        self.flowing.clear()
        started = time.time()

        def resume() -> None:
            self.closed.wait(seconds)
            self.stalls.append((started, time.time()))
            self.flowing.set()

        threading.Thread(target=resume, daemon=True, name="stall-resume").start()

    def close(self) -> None:
        self.closed.set()
        self.flowing.set()
        self.server.close()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.server.accept()
            except (TimeoutError, OSError):
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True, name="stall-pump").start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self.closed.is_set():
                ready, _, _ = select.select([src], [], [], 0.2)
                if not ready:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                self.flowing.wait()
                dst.sendall(data)
                self.bytes += len(data)
        except (OSError, ValueError):  # the other direction closed both sockets
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()


@contextlib.contextmanager
def stalling_proxy(endpoint: str) -> Iterator[StallingProxy]:
    """A :class:`StallingProxy` in front of ``http://host:port`` for the length of a block."""
    host, port = endpoint.removeprefix("http://").rsplit(":", 1)
    proxy = StallingProxy(host, int(port))
    try:
        yield proxy
    finally:
        proxy.close()
