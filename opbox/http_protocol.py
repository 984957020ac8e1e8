"""uvicorn's HTTP protocol with each answer's writes coalesced into one (server side: the gateway and the
runtime's serve mode use it; nothing on the SDK's paths imports this module).

uvicorn writes an answer's head when the app sends ``http.response.start`` and its body at
``http.response.body``: two ``send`` syscalls, and on loopback two wake-ups of the caller (the
SDK, a worker long-polling for its next run). Both happen in the same step of the handler's
task, so the transport here gathers what one step of the event loop writes and sends it once,
at the end of that step (``loop.call_soon``): same bytes, same order, one write. A streamed
answer still goes out chunk by chunk, each as its step ends.
"""

from __future__ import annotations

import asyncio
import importlib.util


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


def http_protocol():
    """uvicorn's ``http`` setting: its httptools protocol over a ``CoalescingTransport``, or "auto" where
    httptools is not installed (uvicorn then uses h11, as it would)."""
    if importlib.util.find_spec("httptools") is None:
        return "auto"
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class CoalescingHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]

    return CoalescingHttpToolsProtocol
