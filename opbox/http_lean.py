"""A lean way through uvicorn's httptools protocol for one hot route (server side: the gateway's service calls).

uvicorn hands each request to the app as an ASGI cycle: the app (and what wraps it) is called with the scope,
and answers with two ``send`` messages, each checked and turned into bytes. For the requests a ``LeanRoute``
matches, the protocol makes an ``Exchange`` (uvicorn's cycle: its parser fills it, its connection handling,
pipelining, keep-alive and flow control stay as they are) whose task calls the route's handler directly, and
a whole answer goes out with ``Exchange.answer``: head and body built at once, in one write, with the
same checks of the headers as uvicorn's ``send``. Anything else (a streamed answer, an error) uses the
cycle's ASGI ``send`` as usual.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import httptools
from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE, STATUS_LINE, RequestResponseCycle


class LeanRoute(NamedTuple):
    """The requests to take the lean way: their target contains ``marker`` (a cheap first test), and
    ``match(path)`` gives the handler's arguments (None: the usual way). ``handle(exchange, *arguments)``
    answers the request."""

    marker: bytes
    match: Callable[[str], tuple | None]
    handle: Callable[..., Awaitable[None]]


def _nothing() -> None:
    pass


class Exchange(RequestResponseCycle):
    """One request on the lean way: uvicorn's cycle, run by calling the route's handler directly."""

    handle: Callable[..., Awaitable[None]]
    arguments: tuple

    async def run_asgi(self, app) -> None:  # (``app`` is unused: the handler is the app)
        try:
            await self.handle(self, *self.arguments)
        except BaseException as exc:
            self.logger.error("Exception in the lean route's handler", exc_info=exc)
            if not self.response_started:
                await self.send_500_response()
            else:
                self.transport.close()
        else:
            if not self.response_started and not self.disconnected:
                self.logger.error("the lean route's handler returned without answering")
                await self.send_500_response()
            elif not self.response_complete and not self.disconnected:
                self.transport.close()
        finally:
            self.on_response = _nothing

    def answer(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
        """Send a whole answer (``headers`` without Content-Length, Transfer-Encoding or Connection) in one
        write, as ``send`` would send its start and body; False, with nothing sent, where ``send`` must (the
        client reads slowly, a header ``send`` would refuse, an access log to write)."""
        if self.disconnected:
            return True  # (``send`` drops it too)
        if self.response_started or self.flow.write_paused or self.access_log:
            return False
        content = [STATUS_LINE[status]]
        for name, value in self.default_headers:
            content += (name, b": ", value, b"\r\n")
        for name, value in headers:
            if HEADER_RE.search(name) or HEADER_VALUE_RE.search(value):
                return False  # send raises, as it would have
            content += (name, b": ", value, b"\r\n")
        content.append(b"content-length: %d\r\n" % len(body))
        if not self.keep_alive:
            content.append(b"connection: close\r\n")
        content.append(b"\r\n")
        if body and self.scope["method"] != "HEAD":
            content.append(body)
        self.response_started = self.response_complete = True
        self.waiting_for_100_continue = False
        self.transport.write(b"".join(content))
        self.message_event.set()
        if not self.keep_alive:
            self.transport.close()
        self.on_response()
        return True


def take(protocol, route: LeanRoute) -> bool:
    """What uvicorn's ``on_headers_complete`` does, with an ``Exchange`` for the cycle, when ``route`` matches the
    request whose head ``protocol`` has just parsed; False (nothing done) when it does not."""
    parser = protocol.parser
    if protocol.limit_concurrency is not None or parser.should_upgrade():
        return False
    parsed = httptools.parse_url(protocol.url)
    raw_path = parsed.path
    path = raw_path.decode("ascii")
    if "%" in path:
        path = urllib.parse.unquote(path)
    path = protocol.root_path + path
    arguments = route.match(path)
    if arguments is None:
        return False
    scope = protocol.scope
    scope["method"] = parser.get_method().decode("ascii")
    http_version = parser.get_http_version()
    if http_version != "1.1":
        scope["http_version"] = http_version
    scope["path"] = path
    scope["raw_path"] = protocol.root_path.encode("ascii") + raw_path
    scope["query_string"] = parsed.query or b""
    existing = protocol.cycle
    exchange = protocol.cycle = Exchange(
        scope=scope, transport=protocol.transport, flow=protocol.flow, logger=protocol.logger,
        access_logger=protocol.access_logger, access_log=protocol.access_log,
        default_headers=protocol.server_state.default_headers, message_event=asyncio.Event(),
        expect_100_continue=protocol.expect_100_continue,
        keep_alive=http_version != "1.0" and parser.should_keep_alive(), on_response=protocol.on_response_complete)
    exchange.handle, exchange.arguments = route.handle, arguments
    if existing is None or existing.response_complete:
        protocol._start_asgi_task(exchange, None)
    else:  # pipelined: after the answers before it
        protocol.flow.pause_reading()
        protocol.pipeline.appendleft((exchange, None))
    return True
