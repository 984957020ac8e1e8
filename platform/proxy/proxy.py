"""The serving proxy: a call to a served class (or an ASGI app) forwarded to one of its replicas.

Everything a call needs between the gateway's HTTP parsing and a replica lives here: the path on
the replica (``/call/{method}`` for a class), the choice of replica (the ready one with the
fewest calls in flight, as Knative's activator does, waiting while a service scaled to zero
starts again), the in-flight count that choice reads, the resend of a call that never arrived
(a replica that just stopped listening: drained, scaled down, crashed) and the pool of
keep-alive connections (``upstream.py``) the calls travel on.

Bodies are bytes passed through (JSON or pickle envelopes alike, never decoded here). Bodies up
to ``WHOLE`` are read whole, so they can be resent; larger ones stream through and are not.
The records (which services exist, their kind) are ``control.services.Services``'s; the ready
replicas are the backend's, asked through it.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import quote

from opbox.errors import BadRequest, NotFound, Unavailable, ValidationError

from ..control.services import Services
from .upstream import WHOLE, Answer, UpstreamError, UpstreamPool

HOLD = 120.0  # seconds a call waits for a ready replica (scale from zero, restarts)
RESEND_FOR = 30.0  # seconds a call that could not be sent is retried (replicas restarting, draining)

_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                  "trailers", "transfer-encoding", "upgrade", "host", "authorization", "content-length",
                  "x-opbox-replica-token"})  # the replica's token is the proxy's to send, never a caller's
_HOP_BYTES = frozenset(h.encode() for h in _HOP)
_PATH_SAFE = "/:@!$&'()*+,;=-._~"  # RFC 3986 pchar and "/": left as they are when a path is re-encoded


class Proxy:
    """The one way to a service's replicas; one per platform (it owns the connection pool)."""

    def __init__(self, services: Services):
        self.services = services
        self.inflight: dict[str, int] = {}  # replica base URL -> calls sent and not yet answered
        self.upstream = UpstreamPool()

    async def close(self) -> None:
        await self.upstream.close()

    async def call(self, scope: dict, receive, ws: str, name: str, rest: str) -> Answer:
        """A request to ``/{ws}/serve/{name}/{rest}`` (ASGI ``scope`` and ``receive``), answered by a replica."""
        return await self.forward(scope, receive, ws, name,
                                  self.target(scope["method"], ws, name, rest, scope.get("raw_path")))

    def target(self, method: str, ws: str, name: str, rest: str, raw_path: bytes | None = None) -> str:
        """The path on the replica: the app's own for an ASGI app, ``/call/{method}`` for a class.

        ``rest`` is percent-decoded: a decoded CR, LF or space in the upstream request line would end
        it and smuggle a second request onto a pooled connection. So control characters are refused,
        and an app's path travels as the client sent it (``raw_path``, still percent-encoded)."""
        if not rest.isprintable():
            raise BadRequest("the service path contains control characters")
        if self.services.kind(ws, name) == "asgi":
            raw = raw_path.split(b"/", 4)[4] if raw_path and raw_path.count(b"/") >= 4 else None
            return "/" + (raw.decode("latin-1") if raw is not None else quote(rest, safe=_PATH_SAFE))
        if method != "POST":
            raise ValidationError(f"call a method with POST /{ws}/serve/{name}/<method>")
        if rest.isascii() and rest.isidentifier():  # a method's name, as it nearly always is: nothing to quote
            return "/call/" + rest
        if not rest or "/" in rest:
            raise NotFound(f"no method {rest!r}: call POST /{ws}/serve/{name}/<method>")
        return "/call/" + quote(rest, safe=_PATH_SAFE)

    async def forward(self, scope: dict, receive, ws: str, name: str, path: str) -> Answer:
        """Send the request to ``path`` on a ready replica of service ``name``; resend it if it did not arrive."""
        declared = transfer = None
        headers = [(b"x-forwarded-prefix", b"/%s/serve/%s" % (ws.encode(), name.encode()))]
        for k, v in scope["headers"]:
            if b"\r" in v or b"\n" in v:  # the server's parser refuses these; the hop must never carry one
                raise BadRequest(f"header {k.decode('latin-1')!r} contains a line break")
            if k == b"content-length":
                declared = v
            elif k == b"transfer-encoding":
                transfer = v
            if k not in _HOP_BYTES:
                headers.append((k, v))
        if scope.get("client"):
            headers.append((b"x-forwarded-for", scope["client"][0].encode()))
        if declared is None and transfer is None:
            content = b""
        elif declared is not None and declared.isdigit() and int(declared) <= WHOLE:
            content = await _read(receive)
        else:
            content = _stream(receive)
        query = scope.get("query_string", b"")
        target = path + ("?" + query.decode("latin-1") if query else "")
        deadline = time.monotonic() + RESEND_FOR
        attempt = 0
        inflight = self.inflight
        while True:
            if attempt:  # the backend notices a replica that went away within moments: give it those
                if time.monotonic() > deadline:
                    raise Unavailable(f"service {name!r}: no replica accepted the call; see its logs")
                await asyncio.sleep(min(0.01 * 2 ** attempt, 0.5))
            attempt += 1
            base = await self.replica(ws, name)
            inflight[base] = inflight.get(base, 0) + 1
            try:
                return await self.upstream.request(base, scope["method"], target, headers, content)
            except UpstreamError as exc:
                if not exc.sent and isinstance(content, bytes):
                    continue  # it never arrived (a replica drained, scaled down or crashed): send it again
                raise Unavailable(f"service {name!r}: {exc}") from None
            finally:
                inflight[base] -= 1

    async def replica(self, ws: str, name: str) -> str:
        """The ready replica with the fewest calls in flight (holds while none is ready)."""
        endpoints = await self.services.endpoints(ws, name, HOLD)
        if not endpoints:
            raise Unavailable(f"service {name!r} has no ready replica after {HOLD:g} s; see its logs")
        if len(endpoints) == 1:
            return endpoints[0]
        inflight = self.inflight
        return min(endpoints, key=lambda url: inflight.get(url, 0))


async def _read(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("the client went away")
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _stream(receive):
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("the client went away")
        yield message.get("body", b"")
        if not message.get("more_body"):
            return
