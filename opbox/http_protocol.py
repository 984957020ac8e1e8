"""uvicorn's HTTP protocol with each answer's writes coalesced into one (server side: the gateway and the
runtime's serve mode use it; nothing on the SDK's paths imports this module).

uvicorn writes an answer's head when the app sends ``http.response.start`` and its body at
``http.response.body``: two ``send`` syscalls, and on loopback two wake-ups of the caller (the
SDK, a worker long-polling for its next run). Both happen in the same step of the handler's
task, so the transport here gathers what one step of the event loop writes and sends it once,
at the end of that step (``loop.call_soon``): same bytes, same order, one write. A streamed
answer still goes out chunk by chunk, each as its step ends.

On the paths it is given (the gateway's local store, ``/_store/``), a GET also gets the ASGI
``http.response.pathsend`` extension, which starlette's ``FileResponse`` uses: the file then goes
from the page cache to the socket with ``os.sendfile``, never read into Python (``send_file``). A PUT there
with one ``Content-Length`` of at least ``LEAN_BODY`` bytes gets ``opbox.receive_into``: an async function
``receive_into(write)`` that reads the whole body into reused buffers, handing them to ``write`` in a thread
(``http_body``), instead of uvicorn's ``receive``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import os


class CoalescingTransport:
    """A transport that gathers writes until the current event-loop step ends; everything else is the
    real transport's."""

    __slots__ = ("transport", "loop", "pending")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self.transport, self.loop, self.pending = transport, loop, None

    def write(self, data: bytes) -> None:
        if self.pending is None:
            self.pending = [data]
            self.loop.call_soon(self.flush)
        else:
            self.pending.append(data)

    def flush(self) -> None:
        if self.pending is not None:
            data, self.pending = self.pending, None
            if not self.transport.is_closing():
                self.transport.write(data[0] if len(data) == 1 else b"".join(data))

    def writelines(self, chunks) -> None:
        for chunk in chunks:
            self.write(chunk)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def write_eof(self) -> None:
        self.flush()
        self.transport.write_eof()

    def abort(self) -> None:
        self.pending = None
        self.transport.abort()

    def __getattr__(self, name: str):  # get_extra_info, is_closing, pause_reading, set_protocol...
        return getattr(self.transport, name)


PATHSEND = "http.response.pathsend"
RECEIVE_INTO = "opbox.receive_into"
LEAN_BODY = 256 * 1024  # bytes from which a body is worth the switch to http_body
SEND_TIMEOUT = 300.0  # seconds a reader may take to make room for more of a file before it is dropped
CHUNK = 1024 * 1024  # bytes per read when a file cannot be sent with sendfile


def http_protocol(sendfile_prefix: str | None = None):
    """uvicorn's ``http`` setting: its httptools protocol over a ``CoalescingTransport``, or "auto" where
    httptools is not installed (uvicorn then uses h11, as it would). GETs of paths that start with
    ``sendfile_prefix`` may answer a file with ``http.response.pathsend`` (sent with ``os.sendfile``); PUTs
    there may read their bodies with ``receive_into``."""
    if importlib.util.find_spec("httptools") is None:
        return "auto"
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class CoalescingHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]

        if sendfile_prefix:
            def on_headers_complete(self) -> None:
                super().on_headers_complete()
                self.offer_store_extensions()

        def offer_store_extensions(self) -> None:
            scope, cycle = self.scope, self.cycle
            if not scope.get("path", "").startswith(sendfile_prefix) or cycle is None or cycle.scope is not scope:
                return
            if scope["method"] == "GET":
                scope["extensions"] = {PATHSEND: {}}
                cycle.send = functools.partial(_send_or_send_file, cycle, cycle.send)
            elif scope["method"] == "PUT" and not self.pipeline:
                length = _lean_body_length(self.headers)
                if length is not None and self.transport.get_extra_info("sslcontext") is None:
                    scope["extensions"] = {RECEIVE_INTO: functools.partial(receive_into, self, cycle, length)}

    return CoalescingHttpToolsProtocol


def _lean_body_length(headers) -> int | None:
    """The body's length when it is given once, and large enough, with no other framing."""
    length = None
    for name, value in headers:
        if name == b"content-length":
            if length is not None or not value.isdigit():
                return None
            length = int(value)
        elif name == b"transfer-encoding":
            return None
    return length if length is not None and length >= LEAN_BODY else None


async def receive_into(protocol, cycle, length: int, write) -> int:
    """The request's whole body (``length`` bytes), handed to ``write`` piece by piece in a thread; call it
    instead of ``receive``, never after it. Raises ``http_body.ClientGone`` if the client leaves first, or
    what ``write`` raised (the rest of the body is then read and dropped)."""
    from opbox.http_body import BodyReceiver, ClientGone

    if cycle.disconnected:
        raise ClientGone("the client disconnected before the upload was complete")
    head, cycle.body = cycle.body, bytearray()  # what the parser has handed over so far
    if not cycle.more_body:  # the whole body came with the head (the parser may be on a next request now)
        if head:
            await asyncio.get_running_loop().run_in_executor(None, write, memoryview(head))
        return len(head)
    if protocol.cycle is not cycle or protocol.parser is None:  # (cannot be: the parser is in this body)
        raise ClientGone("the connection is no longer reading this upload")
    transport = protocol.transport
    if cycle.waiting_for_100_continue and not transport.is_closing():
        transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        cycle.waiting_for_100_continue = False
    if isinstance(transport, CoalescingTransport):
        transport.flush()
        transport = transport.transport

    def restore() -> None:  # the body is in: back to HTTP, with a parser past this request
        cycle.more_body = False
        protocol.parser = _fresh_parser(protocol)
        transport.set_protocol(protocol)

    receiver = BodyReceiver(protocol, transport, length - len(head), head, write, restore)
    transport.set_protocol(receiver)
    protocol.flow.resume_reading()  # (uvicorn pauses reading while a body waits to be received)
    await receiver.done
    return length


def _fresh_parser(protocol):
    import httptools

    parser = httptools.HttpRequestParser(protocol)
    with contextlib.suppress(AttributeError):  # as uvicorn sets its own (httptools >= 0.6.3)
        parser.set_dangerous_leniencies(lenient_data_after_close=True)
    return parser


async def _send_or_send_file(cycle, send, message) -> None:
    if message["type"] == PATHSEND:
        await send_file(cycle, send, message["path"])
    else:
        await send(message)


async def send_file(cycle, send, path: str) -> None:
    """The body of an answer whose head is sent (with the file's Content-Length): the file, by ``os.sendfile``
    from a thread, one socket buffer at a time; the event loop waits for room in between, so no thread waits
    for a slow reader. Read and sent in chunks where sendfile cannot be used."""
    file = await asyncio.to_thread(open, path, "rb")
    try:
        size = os.fstat(file.fileno()).st_size
        transport = cycle.transport
        if isinstance(transport, CoalescingTransport):
            transport.flush()  # the head
            transport = transport.transport
        sock = transport.get_extra_info("socket")
        if cycle.chunked_encoding or size != cycle.expected_content_length or sock is None \
                or transport.get_extra_info("sslcontext") is not None or transport.get_write_buffer_size() \
                or not hasattr(os, "sendfile"):  # (TLS: the bytes must go through the transport's encryption)
            await _send_chunks(send, file)
            return
        out = os.dup(sock.fileno())  # the loop watches its own fd; this one is for sendfile and waiting for room
        try:
            sent = await _sendfile(out, file.fileno(), size)
        finally:
            os.close(out)
        if sent < size:  # the reader left, or stalled past SEND_TIMEOUT: the answer cannot be finished
            cycle.disconnected = True
            transport.abort()
            return
        cycle.expected_content_length -= size
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        file.close()


async def _sendfile(out: int, source: int, size: int) -> int:
    """How many bytes of ``source`` went to the socket ``out`` (non-blocking) before the end or an error."""
    loop = asyncio.get_running_loop()
    offset = 0
    while offset < size:
        try:
            sent = await asyncio.to_thread(os.sendfile, out, source, offset, size - offset)
        except BlockingIOError:
            if not await _writable(loop, out):
                return offset
            continue
        except OSError:  # the reader is gone (EPIPE, ECONNRESET)
            return offset
        if sent == 0:  # the file is shorter than its size said
            return offset
        offset += sent
    return offset


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> bool:
    ready = loop.create_future()
    loop.add_writer(fd, lambda: ready.done() or ready.set_result(True))
    try:
        return await asyncio.wait_for(ready, SEND_TIMEOUT)
    except asyncio.TimeoutError:
        return False
    finally:
        loop.remove_writer(fd)


async def _send_chunks(send, file) -> None:
    while True:
        chunk = await asyncio.to_thread(file.read, CHUNK)
        more = len(chunk) == CHUNK
        await send({"type": "http.response.body", "body": chunk, "more_body": more})
        if not more:
            return
