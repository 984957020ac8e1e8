"""The runtime's line to the gateway: one keep-alive HTTP connection (stdlib http.client, for speed).

Requests are retried while the gateway is unreachable (restarting), up to ``patience``
seconds, so a finished run's result is not lost to a short outage.
"""

from __future__ import annotations

import http.client
import socket
import time
from urllib.parse import urlsplit


ONE_WRITE_MAX = 1 << 20  # bodies up to this size go out with the request's head in one write


class GatewayGone(Exception):
    pass


class _OneWrite:
    """http.client sends a request's head and body in two writes (two wake-ups of the gateway); this sends
    an in-memory body of up to ``ONE_WRITE_MAX`` bytes in the same write as the head."""

    def _send_output(self, message_body=None, encode_chunked=False):
        if isinstance(message_body, (bytes, bytearray)) and len(message_body) <= ONE_WRITE_MAX:
            self._buffer.extend((b"", b""))
            head = b"\r\n".join(self._buffer)
            del self._buffer[:]
            self.send(head + message_body)
            return
        super()._send_output(message_body, encode_chunked)


class _Connection(_OneWrite, http.client.HTTPConnection):
    pass


class _TLSConnection(_OneWrite, http.client.HTTPSConnection):
    pass


class Channel:
    def __init__(self, url: str, token: str, worker: str, patience: float = 60.0):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        self.https = parts.scheme == "https"
        self.base = parts.path.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}", "X-Opbox-Worker": worker}
        self.patience = patience
        self.conn: http.client.HTTPConnection | None = None

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        cls = _TLSConnection if self.https else _Connection
        conn = cls(self.host, self.port, timeout=timeout)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def request(self, method: str, path: str, body: bytes = b"", headers: dict | None = None,
                timeout: float = 90.0) -> tuple[int, http.client.HTTPMessage, bytes]:
        deadline = time.monotonic() + self.patience
        delay = 0.05
        while True:
            try:
                return self._exchange(method, path, body, headers, timeout, False)
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if time.monotonic() + delay > deadline:
                    raise GatewayGone(f"gateway at {self.host}:{self.port} unreachable: {exc}") from exc
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def stream(self, method: str, path: str, chunks, headers: dict | None = None,
               timeout: float = 90.0) -> tuple[int, http.client.HTTPMessage, bytes]:
        """A request whose body is ``chunks``, each sent (chunked) as the iterator yields it. Never retried: what
        was sent cannot be sent again, so a broken line is GatewayGone at once."""
        try:
            return self._exchange(method, path, chunks, headers, timeout, True)
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise GatewayGone(f"gateway at {self.host}:{self.port} unreachable: {exc}") from exc

    def _exchange(self, method: str, path: str, body, headers: dict | None, timeout: float,
                  chunked: bool) -> tuple[int, http.client.HTTPMessage, bytes]:
        if self.conn is None:
            self.conn = self._connect(timeout)
        self.conn.request(method, self.base + path, body=body, headers={**self.headers, **(headers or {})},
                          encode_chunked=chunked)
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.getheader("connection", "").lower() == "close":
            self.close()
        return resp.status, resp.headers, data

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
