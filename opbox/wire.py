"""The SDK's sync HTTP transport: one keep-alive ``http.client`` connection per thread.

httpx's own transport (httpcore + h11) costs the caller about 0.5 ms of CPU per request and writes
a request's head and body in two ``send`` calls, so the gateway wakes twice for one call. This
transport keeps httpx's client (URLs, headers, timeouts, the retry policy in ``client.py``) and
sends each request whose body is in memory in one write, reading the answer with the standard
library's parser; a call's answer (``exchange``, the hot path) is read with httptools (llhttp, the
parser uvicorn uses): http.client's header parsing (the ``email`` package) cost the caller about
0.1 ms a call, httptools a few µs. What it does not handle goes to httpx's transport unchanged: TLS,
streamed request bodies, and any client that must honour proxy settings from the environment.

Errors are httpx's, so the retry policy reads them as before: a request that never left raises
``ConnectError``/``ConnectTimeout`` (safe to resend), one that may have arrived ``WriteError``,
``ReadError``, ``RemoteProtocolError`` or ``ReadTimeout``.
"""

from __future__ import annotations

import http.client
import os
import select
import socket
import threading

import httptools
import httpx

from .http_answer import READ_SIZE, Answer, Disconnected

PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")


def proxies_in_environment() -> bool:
    return any(os.environ.get(name) for name in PROXY_VARIABLES)


class KeepAliveTransport(httpx.BaseTransport):
    """Plain-HTTP requests with in-memory bodies over one persistent connection per thread; the rest through
    ``fallback`` (httpx's own transport)."""

    def __init__(self, fallback: httpx.BaseTransport):
        self.fallback = fallback
        self.local = threading.local()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "http" or not isinstance(request.stream, httpx.ByteStream):
            return self.fallback.handle_request(request)
        head = [b"%s %s HTTP/1.1" % (request.method.encode("ascii"), request.url.raw_path)]
        head.extend(b"%s: %s" % pair for pair in request.headers.raw)
        head.append(b"\r\n")
        sock, answer = self.send((request.url.host, request.url.port or 80), request.method, b"\r\n".join(head),
                                 request.read(), request.extensions.get("timeout", {}), request)
        return httpx.Response(answer.status, headers=answer.getheaders(),
                              stream=_AnswerStream(self, sock, answer, request),
                              extensions={"http_version": b"HTTP/1.1"})

    def exchange(self, address: tuple[str, int], method: str, head: bytes, body: bytes,
                 timeouts: dict) -> tuple[int, list[tuple[str, str]], bytes]:
        """One request whose head (request line and headers, ending in a blank line) is already made, and
        its whole answer: the caller's hot path, without building httpx's request and URL objects. ``method``
        is never HEAD (an answer's body is read as its headers say)."""
        sock = self._sent(address, head + body, timeouts)
        self.local.busy = True
        answer = Answer()
        try:
            sock.settimeout(timeouts.get("read"))
            answer.read(sock)
        except socket.timeout as exc:
            self._drop(sock)
            raise httpx.ReadTimeout("timed out waiting for the answer") from exc
        except Disconnected as exc:
            self._drop(sock)
            raise httpx.RemoteProtocolError(str(exc)) from exc
        except (OSError, httptools.HttpParserError) as exc:
            self._drop(sock)
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
        if answer.keep_alive:
            self._release(sock)
        else:
            self._drop(sock)
        return answer.status, answer.headers, b"".join(answer.body)

    def _sent(self, address: tuple[str, int], data: bytes, timeouts: dict,
              request: httpx.Request | None = None) -> socket.socket:
        """A kept-alive (or new) connection to ``address`` with ``data`` written on it, in one write."""
        sock = self._socket(address, timeouts.get("connect"))
        try:
            sock.settimeout(timeouts.get("write"))
            sock.sendall(data)
        except OSError as exc:
            self._drop(sock)
            raise httpx.WriteError(str(exc) or type(exc).__name__, request=request) from exc
        return sock

    def send(self, address: tuple[str, int], method: str, head: bytes, body: bytes, timeouts: dict,
             request: httpx.Request | None = None) -> tuple[socket.socket, http.client.HTTPResponse]:
        """Send a request in one write and read its answer's status line and headers."""
        sock = self._sent(address, head + body, timeouts, request)
        answer = http.client.HTTPResponse(sock, method=method)
        try:
            sock.settimeout(timeouts.get("read"))
            answer.begin()
        except socket.timeout as exc:
            self._drop(sock)
            raise httpx.ReadTimeout("timed out waiting for the answer", request=request) from exc
        except http.client.RemoteDisconnected as exc:
            self._drop(sock)
            raise httpx.RemoteProtocolError(str(exc), request=request) from exc
        except (OSError, http.client.HTTPException) as exc:
            self._drop(sock)
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
        self.local.busy = True
        return sock, answer

    def _socket(self, address: tuple[str, int], timeout: float | None) -> socket.socket:
        sock = getattr(self.local, "sock", None)
        if sock is not None and (self.local.address != address or self.local.busy or _closed_by_peer(sock)):
            self._drop(sock)
            sock = None
        if sock is None:
            try:
                sock = socket.create_connection(address, timeout=timeout)
            except socket.timeout as exc:
                raise httpx.ConnectTimeout(f"connecting to {address[0]}:{address[1]}: timed out") from exc
            except OSError as exc:
                raise httpx.ConnectError(f"connecting to {address[0]}:{address[1]}: {exc}") from exc
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.local.sock, self.local.address, self.local.busy = sock, address, False
        return sock

    def _release(self, sock: socket.socket) -> None:
        """The answer on ``sock`` was read to its end: the next request may use it."""
        if getattr(self.local, "sock", None) is sock:
            self.local.busy = False

    def _drop(self, sock: socket.socket) -> None:
        sock.close()
        if getattr(self.local, "sock", None) is sock:
            self.local.sock = None

    def close(self) -> None:
        sock = getattr(self.local, "sock", None)
        if sock is not None:
            self._drop(sock)
        self.fallback.close()


def _closed_by_peer(sock: socket.socket) -> bool:
    """An idle keep-alive connection the server closed (or sent something on) reads as ready: not reusable."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


class _AnswerStream(httpx.SyncByteStream):
    """The answer's body as read; its connection is reused once the body was read to its end."""

    def __init__(self, transport: KeepAliveTransport, sock: socket.socket, answer: http.client.HTTPResponse,
                 request: httpx.Request | None):
        self.transport, self.sock, self.answer, self.request = transport, sock, answer, request

    def __iter__(self):
        try:
            while self.answer.length != 0:
                chunk = self.answer.read1(READ_SIZE)
                if not chunk:
                    return
                yield chunk
        except socket.timeout as exc:
            raise httpx.ReadTimeout("timed out reading the answer", request=self.request) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=self.request) from exc

    def close(self) -> None:
        read_to_end = self.answer.length == 0 or (self.answer.length is None and self.answer.isclosed())
        if read_to_end and not self.answer.will_close:
            self.transport._release(self.sock)
        else:  # left half-read, or the server closes it
            self.transport._drop(self.sock)
        self.answer.close()
