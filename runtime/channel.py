"""The runtime's line to the gateway: one keep-alive HTTP/1.1 connection on a plain socket (TLS-wrapped for an
``https`` gateway URL).

A request goes out in one write, its head's fixed part (request line, Host, the worker's credentials) built
once per path; answers are read with httptools (``opbox/http_answer.py``, shared with the SDK). http.client's
request building and answer parsing were a quarter of a warm worker's CPU per call.

Requests are retried while the gateway is unreachable (restarting), up to ``patience`` seconds, so a finished
run's result is not lost to a short outage.
"""

from __future__ import annotations

import socket
import ssl
import time
from urllib.parse import urlsplit

import httptools

from opbox.http_answer import Answer, Disconnected, Headers

ONE_WRITE_MAX = 1 << 20  # bodies up to this size go out with the request's head in one write
HEADS_KEPT = 64  # request heads kept per channel (paths with a run id in them come and go)
LINE_ERRORS = (OSError, Disconnected, httptools.HttpParserError)  # ssl.SSLError and socket.timeout are OSErrors


class GatewayGone(Exception):
    pass


class Channel:
    def __init__(self, url: str, token: str, worker: str, patience: float = 60.0):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        self.https = parts.scheme == "https"
        self.base = parts.path.rstrip("/")
        self.patience = patience
        self.sock: socket.socket | None = None
        self.timeout: float | None = None
        self.tls: ssl.SSLContext | None = None
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port != (443 if self.https else 80):
            host = f"{host}:{self.port}"
        self.fixed = (f"Host: {host}\r\nAuthorization: Bearer {token}\r\nX-Opbox-Worker: {worker}\r\n"
                      "Accept-Encoding: identity\r\n").encode("latin-1")
        self.heads: dict[tuple[str, str], bytes] = {}

    def request(self, method: str, path: str, body: bytes = b"", headers: dict | None = None,
                timeout: float = 90.0) -> tuple[int, Headers, bytes]:
        deadline = time.monotonic() + self.patience
        delay = 0.05
        while True:
            try:
                return self._exchange(method, path, body, headers, timeout, False)
            except LINE_ERRORS as exc:
                self.close()
                if time.monotonic() + delay > deadline:
                    raise GatewayGone(f"gateway at {self.host}:{self.port} unreachable: {_said(exc)}") from exc
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def stream(self, method: str, path: str, chunks, headers: dict | None = None,
               timeout: float = 90.0) -> tuple[int, Headers, bytes]:
        """A request whose body is ``chunks``, each sent (chunked) as the iterator yields it. Never retried: what
        was sent cannot be sent again, so a broken line is GatewayGone at once."""
        try:
            return self._exchange(method, path, chunks, headers, timeout, True)
        except LINE_ERRORS as exc:
            self.close()
            raise GatewayGone(f"gateway at {self.host}:{self.port} unreachable: {_said(exc)}") from exc

    def _exchange(self, method: str, path: str, body, headers: dict | None, timeout: float,
                  chunked: bool) -> tuple[int, Headers, bytes]:
        sock = self.sock or self._connect(timeout)
        if timeout != self.timeout:
            sock.settimeout(timeout)
            self.timeout = timeout
        head = self._head(method, path)
        if headers:
            lines = [f"{name}: {value}\r\n" for name, value in headers.items() if value is not None]
            extra = "".join(lines)
            if extra.count("\n") != len(lines):
                raise ValueError(f"a request header holds a line break: {headers!r}")
            head += extra.encode("latin-1")
        answer = Answer()
        try:
            if chunked:
                self._send_chunks(sock, head, body)
            elif len(body) <= ONE_WRITE_MAX:
                sock.sendall(b"%bContent-Length: %d\r\n\r\n%b" % (head, len(body), body))
            else:
                sock.sendall(b"%bContent-Length: %d\r\n\r\n" % (head, len(body)))
                sock.sendall(body)
            answer.read(sock)
        except BaseException:  # a request half-sent or an answer half-read (an error, a signal): the line is unusable
            self.close()
            raise
        if not answer.keep_alive:  # Connection: close, or an answer that ended with the connection
            self.close()
        return answer.status, Headers(answer.headers), b"".join(answer.body)

    @staticmethod
    def _send_chunks(sock: socket.socket, head: bytes, chunks) -> None:
        sock.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
        for chunk in chunks:
            if chunk:
                sock.sendall(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        sock.sendall(b"0\r\n\r\n")

    def _head(self, method: str, path: str) -> bytes:
        head = self.heads.get((method, path))
        if head is None:
            if len(self.heads) >= HEADS_KEPT:
                self.heads.clear()
            head = f"{method} {self.base}{path} HTTP/1.1\r\n".encode("latin-1") + self.fixed
            self.heads[(method, path)] = head
        return head

    def _connect(self, timeout: float) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.https:
                if self.tls is None:
                    self.tls = ssl.create_default_context()
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        self.sock, self.timeout = sock, timeout
        return sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _said(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
