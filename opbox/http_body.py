"""A request body read from the socket straight into reused buffers and handed to a writer (server side: the
gateway's local store takes its signed uploads this way; see ``http_protocol``).

uvicorn hands an app a body as ``bytes`` copied twice on the way (``bytearray +=`` per parsed chunk, ``bytes()``
per ``receive``) and pauses and resumes reading every 64 KiB. For a body of a known length the connection's
transport is given, for the length of the body, an ``asyncio.BufferedProtocol`` whose buffers the event loop
reads the socket into (``recv_into``): the bytes reach the writer (a file, in a thread) without a copy in
Python. Two buffers take turns: one is written while the other fills; reading pauses when both are busy.
Once the body's last byte is in, the connection goes back to the HTTP protocol with a fresh parser.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

BUFFER = 1024 * 1024  # bytes per write to the writer


class ClientGone(ConnectionError):
    """The client went away before its request's body was complete."""


class BodyReceiver(asyncio.BufferedProtocol):
    """Receives ``remaining`` more bytes of a body for ``owner`` (uvicorn's HTTP protocol, whose parser has
    handed over ``head``) and feeds them, in order, to ``write`` in a thread, one call in flight. ``done``
    ends once the last write is out of its thread: with None, ``ClientGone`` or what ``write`` raised (the
    rest of the body is then read and dropped, so the connection can still carry the answer)."""

    def __init__(self, owner, transport: asyncio.Transport, remaining: int, head: bytes | bytearray,
                 write: Callable[[memoryview], object], restore: Callable[[], None]):
        self.owner, self.transport, self.remaining = owner, transport, remaining
        self.write, self.restore = write, restore
        self.loop = asyncio.get_running_loop()
        size = min(BUFFER, remaining)
        self.buffers = [bytearray(size), bytearray(size)]
        self.filling, self.filled = 0, 0
        self.writing: asyncio.Future | None = None
        self.paused = self.gone = False
        self.failure: BaseException | None = None
        self.done = self.loop.create_future()
        if head:
            self._start(memoryview(head))

    # -- the transport's side -----------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        buffer = self.buffers[self.filling]
        if self.failure is not None:  # dropping the rest
            return memoryview(buffer)[:min(len(buffer), self.remaining)]
        return memoryview(buffer)[self.filled:min(len(buffer), self.filled + self.remaining)]

    def buffer_updated(self, nbytes: int) -> None:
        self.remaining -= nbytes
        if self.failure is None:
            self.filled += nbytes
            if self.filled == len(self.buffers[self.filling]) or not self.remaining:
                if self.writing is None:
                    self._submit()
                elif self.remaining:  # this buffer is full and the other still being written: wait for it
                    self.paused = True
                    self.transport.pause_reading()
        if not self.remaining:
            self.restore()  # the body is in: what comes next is the connection's next request
            self._settle()

    def eof_received(self) -> bool:
        return False  # the transport closes: connection_lost

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self.owner.connection_lost(exc)
        self._settle()

    def pause_writing(self) -> None:
        self.owner.pause_writing()

    def resume_writing(self) -> None:
        self.owner.resume_writing()

    # -- the writer's side --------------------------------------------------------------

    def _submit(self) -> None:
        view = memoryview(self.buffers[self.filling])[:self.filled]
        self.filling, self.filled = self.filling ^ 1, 0
        self._start(view)

    def _start(self, view: memoryview) -> None:
        self.writing = self.loop.run_in_executor(None, self.write, view)
        self.writing.add_done_callback(self._written)

    def _written(self, future: asyncio.Future) -> None:
        self.writing = None
        if self.failure is None and not self.gone:
            failure = asyncio.CancelledError() if future.cancelled() else future.exception()
            if failure is not None:
                self.failure = failure
                self.filled = 0
            elif self.filled and (self.filled == len(self.buffers[self.filling]) or not self.remaining):
                self._submit()  # the buffer that waited
        if self.paused and (self.writing is None or self.failure is not None):
            self.paused = False
            if not self.gone:
                self.transport.resume_reading()
        self._settle()

    def _settle(self) -> None:
        """End ``done`` once nothing is in flight and the outcome is known."""
        if self.done.done() or self.writing is not None:
            return
        if self.failure is not None:
            self.done.set_exception(self.failure)
        elif self.gone:
            self.done.set_exception(ClientGone("the client disconnected before the upload was complete"))
        elif not self.remaining and not self.filled:
            self.done.set_result(None)
