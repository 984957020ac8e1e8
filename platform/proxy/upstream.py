"""A lean HTTP/1.1 client for the proxy's hop to service replicas: pooled keep-alive connections.

The hop is loopback (or in-cluster) HTTP/1.1 to uvicorn, on the hot path of every service
call, so it is kept to asyncio streams: one write per request (TCP_NODELAY), the status line
and headers parsed by hand, bodies passed through as bytes (``Content-Length``, chunked, or
until close). httpx costs about a millisecond per call here and much more under load.
"""

from __future__ import annotations

import asyncio
import socket
from collections import defaultdict
from typing import AsyncIterator
from urllib.parse import urlsplit

WHOLE = 1024 * 1024  # answers up to this size are read whole; larger ones stream


def _stale(conn: "Connection") -> bool:
    """Whether a kept-alive connection was closed or reset by the replica, asked of the kernel now
    (the event loop may not have seen it yet): a replica killed a moment ago must not get the call."""
    if conn.probe is None:
        return False
    try:
        conn.probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        return True  # EOF, or bytes nobody asked for: either way not a connection to reuse
    except BlockingIOError:
        return False
    except OSError:
        return True


def _buffered(conn: "Connection") -> bool:
    """Bytes already read past the end of the last answer: the replica answered more than it was asked
    (a smuggled or broken exchange), so whatever comes next on this connection belongs to no call."""
    return bool(conn.reader._buffer)  # noqa: SLF001 (asyncio's StreamReader has no public peek)


class UpstreamError(Exception):
    """The call failed on the way; ``sent`` says whether the replica may have received it."""

    def __init__(self, message: str, sent: bool):
        super().__init__(message)
        self.sent = sent


class Connection:
    __slots__ = ("reader", "writer", "base", "probe")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, base: str):
        self.reader, self.writer, self.base = reader, writer, base
        sock = writer.get_extra_info("socket")
        # a second socket object on the same descriptor, made once, for _stale's peek (asyncio's own
        # does not allow recv); detached, never closed, so the descriptor stays the transport's
        self.probe = socket.socket(fileno=sock.fileno()) if sock is not None else None

    def close(self) -> None:
        if self.probe is not None:
            self.probe.detach()
            self.probe = None
        self.writer.close()


class Answer:
    """A replica's answer: status, headers, and the body (``body`` when whole, else ``stream()``)."""

    def __init__(self, pool: "UpstreamPool", conn: Connection, status: int, headers: list, body: bytes | None,
                 length: int | None, chunked: bool, keep: bool):
        self.pool, self.conn, self.status, self.headers = pool, conn, status, headers
        self.body, self.length, self._chunked, self._keep = body, length, chunked, keep

    async def stream(self) -> AsyncIterator[bytes]:
        reader, done = self.conn.reader, False
        try:
            if self._chunked:
                while True:
                    size = int((await reader.readline()).split(b";")[0], 16)
                    if size == 0:
                        while (await reader.readline()) not in (b"\r\n", b""):
                            pass
                        break
                    yield await reader.readexactly(size)
                    await reader.readexactly(2)
            elif self.length is not None:
                left = self.length
                while left:
                    chunk = await reader.read(min(left, 65536))
                    if not chunk:
                        raise UpstreamError("the replica closed the connection mid-answer", True)
                    left -= len(chunk)
                    yield chunk
            else:
                while chunk := await reader.read(65536):
                    yield chunk
                self._keep = False
            done = True
        finally:
            self.pool.release(self.conn, done and self._keep)


class UpstreamPool:
    def __init__(self, max_idle: int = 256):
        self.idle: dict[str, list[Connection]] = defaultdict(list)
        self._heads: dict[str, bytes] = {}
        self.max_idle = max_idle

    def _head(self, base: str) -> bytes:
        """The request line's template and the fixed headers for ``base``: its Host, and the replica's token
        when the base URL carries one as userinfo (``http://opbox:TOKEN@host:port``)."""
        head = self._heads.get(base)
        if head is None:
            parts = urlsplit(base)
            head = b"%s %s HTTP/1.1\r\nhost: " + f"{parts.hostname}:{parts.port or 80}".encode() + b"\r\n"
            if parts.password:
                head += b"x-opbox-replica-token: " + parts.password.encode() + b"\r\n"
            self._heads[base] = head
        return head

    async def _connect(self, base: str) -> Connection:
        parts = urlsplit(base)
        try:
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80, limit=2 ** 20)
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {base}: {exc}", sent=False) from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Connection(reader, writer, base)

    def release(self, conn: Connection, keep: bool) -> None:
        idle = self.idle[conn.base]
        if keep and len(idle) < self.max_idle and not conn.writer.is_closing() and not _buffered(conn):
            idle.append(conn)
        else:
            conn.close()

    async def request(self, base: str, method: str, target: str, headers: list[tuple[bytes, bytes]],
                      body: bytes | AsyncIterator[bytes]) -> Answer:
        """Send one request; raises UpstreamError (``sent=False`` when it surely did not arrive)."""
        idle = self.idle.get(base)
        conn = None
        while idle:
            conn = idle.pop()
            if not (conn.reader.at_eof() or conn.writer.is_closing() or conn.reader.exception() or _buffered(conn)
                    or _stale(conn)):
                break
            conn.close()  # the replica closed it meanwhile (idle timeout, drained, died)
            conn = None
        if conn is None:
            conn = await self._connect(base)
        head = [self._head(conn.base) % (method.encode(), target.encode("latin-1"))]
        for k, v in headers:
            head.append(k + b": " + v + b"\r\n")
        whole = isinstance(body, (bytes, bytearray))
        head.append(b"content-length: %d\r\n\r\n" % len(body) if whole else b"transfer-encoding: chunked\r\n\r\n")
        try:
            if whole:
                conn.writer.write(b"".join(head) + body)
            else:
                conn.writer.write(b"".join(head))
                async for chunk in body:
                    if chunk:
                        conn.writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        await conn.writer.drain()
                conn.writer.write(b"0\r\n\r\n")
            try:
                raw = await conn.reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                # the connection was alive when the call went out (_stale checked it): the replica
                # ended with the call in hand, so it may have run; say so rather than send it again
                raise UpstreamError(f"the replica closed the connection before answering "
                                    f"({len(exc.partial)} bytes of an answer)", sent=True) from None
            except (ConnectionResetError, BrokenPipeError) as exc:
                # a reset before any answer byte: the socket was closed with our call unread (a replica
                # that had read it and died would have sent FIN), e.g. a dead replica's listen backlog
                raise UpstreamError(f"the replica reset the connection unread: {exc}", sent=False) from None

            lines = raw.split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            out, length, chunked, keep = [], None, False, True
            for line in lines[1:]:
                if not line:
                    continue
                name, _, value = line.partition(b":")
                name, value = name.strip().lower(), value.strip()
                if name == b"content-length":
                    length = int(value)
                    continue
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                    continue
                elif name == b"connection":
                    keep = value.lower() != b"close"
                    continue
                elif name == b"keep-alive":
                    continue
                out.append((name, value))
            if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
                length = 0
            answer = Answer(self, conn, status, out, None, length, chunked, keep)
            if length is not None and length <= WHOLE:
                answer.body = await conn.reader.readexactly(length) if length else b""
                self.release(conn, keep)
            return answer
        except UpstreamError:
            conn.close()
            raise
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError) as exc:
            conn.close()
            raise UpstreamError(f"the call to {base} failed: {type(exc).__name__}: {exc}", sent=True) from None

    async def close(self) -> None:
        for conns in self.idle.values():
            for conn in conns:
                conn.close()
        self.idle.clear()
