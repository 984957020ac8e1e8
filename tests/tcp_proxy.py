"""A TCP proxy on 127.0.0.1 that can be switched off (connections refused) and on: an outage on demand."""

from __future__ import annotations

import socket
import threading


class SwitchableProxy:
    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.port = 0
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.accepted = 0  # connections passed on

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        """Stop listening and cut every open connection: new connections are refused."""
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = self._upstream()
            if upstream is None:
                client.close()
                continue
            upstream.settimeout(None)  # the timeout was for the connect: a long-poll may be silent for minutes
            with self._lock:
                self._conns += [client, upstream]
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _upstream(self) -> socket.socket | None:
        """A connection to the target (None: refused, so the client's is closed)."""
        try:
            return socket.create_connection(self.target, timeout=5)
        except OSError:
            return None

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class Failover(SwitchableProxy):
    """A TCP front for several servers, as a Kubernetes Service is for a Deployment's replicas: each new
    connection goes to the first target that accepts it (so one takes everything while it lives, and the
    next once it has died); connections to a server that dies end when it does."""

    def __init__(self, targets: list[tuple[str, int]]):
        super().__init__(*targets[0])
        self.targets = targets
        self.served: dict[tuple[str, int], int] = {t: 0 for t in targets}  # connections each target took

    def _upstream(self) -> socket.socket | None:
        for target in self.targets:
            try:
                upstream = socket.create_connection(target, timeout=5)
            except OSError:
                continue
            self.served[target] += 1
            return upstream
        return None
