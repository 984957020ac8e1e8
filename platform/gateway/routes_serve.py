"""Routes for services: their records, logs, and calls proxied to a ready replica.

The proxy forwards bytes (JSON or pickle envelopes alike, never decoded here) over pooled
keep-alive connections (``upstream.py``). Bodies up to 1 MiB are read whole, so a call that
did not arrive (a replica that just stopped listening: drained, scaled down, crashed) is sent
again to another one; larger ones stream through. Answers stream back unless small.
"""

from __future__ import annotations

import asyncio
import json
import time

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from opbox.errors import BadRequest, NotFound, OpboxError, Unavailable, ValidationError

from .http import json_body, ok, query_number
from .routes_jobs import platform, workspace
from ..proxy.upstream import WHOLE, Answer, UpstreamError

_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                  "trailers", "transfer-encoding", "upgrade", "host", "authorization", "content-length"})
_HOP_BYTES = frozenset(h.encode() for h in _HOP)
RESEND_FOR = 30.0  # seconds a call that could not be sent is retried (replicas restarting, draining)


def _name(request: Request) -> str:
    return request.path_params["name"]


async def put_service(request: Request):
    """
    summary: Create or redeploy a service (a class or an ASGI app)
    description: >
      Points service {name} at a built job version of kind class or asgi and starts (or rolls) its
      replicas: new ones start, routing switches once they are ready, old ones drain. Waits up to
      ?wait seconds for the new version to be ready.
    parameters:
      - {name: wait, in: query, schema: {type: number, minimum: 0, maximum: 3600}}
    requestBody:
      required: true
      content:
        application/json:
          schema:
            type: object
            properties:
              job: {type: string, description: "job id or name (default: the service name)"}
              version: {type: integer, description: "default: the job's latest version"}
              init: {type: string, format: byte, description: "the constructor's arguments: a base64 args envelope"}
              replicas: {type: integer, minimum: 1}
              concurrency: {type: integer, minimum: 0, description: "calls at once per replica; 0 means no limit"}
              queue: {type: integer, minimum: 0, description: "calls waiting per replica before 429"}
              scale_to_zero: {type: number, nullable: true, description: "idle seconds before replicas stop; null never"}
    responses:
      200: {description: The service}
      422: {description: Invalid settings, or the job is not a class}
      503: {description: The new version did not start (its error and log are in details)}
    """
    ws = workspace(request)
    wait = query_number(request, "wait", 0.0, 0, 3600)
    body = await json_body(request, limit=platform(request).settings.max_payload * 2)
    return ok(await platform(request).services.put(ws, _name(request), body, wait))


async def list_services(request: Request):
    """
    summary: List the workspace's services with their status
    responses:
      200: {description: Services}
    """
    ws = workspace(request)
    return ok({"services": platform(request).services.list(ws)})


async def get_service(request: Request):
    """
    summary: A service, its settings and its replicas' status
    responses:
      200: {description: The service}
      404: {description: No such service}
    """
    ws = workspace(request)
    return ok(platform(request).services.get(ws, _name(request)))


async def delete_service(request: Request):
    """
    summary: Delete a service (its replicas finish the calls in flight, then stop)
    responses:
      200: {description: Deleted}
      404: {description: No such service}
    """
    ws = workspace(request)
    await platform(request).services.delete(ws, _name(request))
    return ok({"deleted": _name(request)})


async def service_logs(request: Request):
    """
    summary: What the service's replicas printed (stdout and stderr), newest last
    parameters:
      - {name: limit, in: query, schema: {type: integer, minimum: 1}}
    responses:
      200: {description: Plain text}
    """
    ws = workspace(request)
    limit = query_number(request, "limit", 256 * 1024, 1, 8 * 1024 * 1024, int)
    return PlainTextResponse(await platform(request).services.logs(ws, _name(request), limit))


async def service_openapi(request: Request):
    """
    summary: The OpenAPI document of a service's methods (typed from their hints)
    responses:
      200: {description: OpenAPI document}
      404: {description: No such service}
    """
    ws = workspace(request)
    return await forward(request, ws, _name(request), "/openapi.json")


async def call(request: Request):
    """
    summary: Call a service
    description: >
      For a class, POST /{workspace}/serve/{name}/{method} calls the method. A JSON object body is the
      keyword arguments ({"x": [1, 2]}); {"args": [...], "kwargs": {...}} or a JSON array passes positional
      ones. The answer is the JSON result; 422 names the signature when arguments do not fit; 404 for an
      unknown method; 500 {"error": {"type", "message", "traceback"}} when the method raised; 429 with
      Retry-After when the replicas' concurrency and queues are full. With Content-Type
      application/x-opbox-envelope (the SDK) arguments and result travel pickled. For an ASGI app, every
      method and path under /{workspace}/serve/{name}/ reaches the app's own routes.
    responses:
      200: {description: The result}
      404: {description: No such service or method}
      422: {description: Arguments do not fit the method}
      429: {description: Concurrency and queue are full}
      500: {description: The method raised}
      503: {description: The service cannot start}
    """
    ws = workspace(request)
    target = _target(platform(request), request.method, ws, _name(request), request.path_params.get("path", ""))
    return await forward(request, ws, _name(request), target)


def _target(plat, method: str, ws: str, name: str, rest: str) -> str:
    """The path on the replica: the app's own for an ASGI app, ``/call/{method}`` for a class."""
    if plat.services.kind(ws, name) == "asgi":
        return "/" + rest
    if method != "POST":
        raise ValidationError(f"call a method with POST /{ws}/serve/{name}/<method>")
    if not rest or "/" in rest:
        raise NotFound(f"no method {rest!r}: call POST /{ws}/serve/{name}/<method>")
    return "/call/" + rest


async def forward(request: Request, ws: str, name: str, path: str) -> Response:
    answer = await proxy(platform(request), request.scope, request.receive, ws, name, path)
    return AnswerResponse(answer)


async def proxy(plat, scope, receive, ws: str, name: str, path: str) -> Answer:
    """Send one request to a ready replica of service ``name``; resend it if it did not arrive."""
    services = plat.services
    declared = transfer = None
    headers = [(b"x-forwarded-prefix", f"/{ws}/serve/{name}".encode())]
    for k, v in scope["headers"]:
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
    while True:
        if attempt:  # the backend notices a replica that went away within moments: give it those
            if time.monotonic() > deadline:
                raise Unavailable(f"service {name!r}: no replica accepted the call; see its logs")
            await asyncio.sleep(min(0.01 * 2 ** attempt, 0.5))
        attempt += 1
        base = await services.endpoint(ws, name)
        services.inflight[base] = services.inflight.get(base, 0) + 1
        try:
            return await services.upstream.request(base, scope["method"], target, headers, content)
        except UpstreamError as exc:
            if not exc.sent and isinstance(content, bytes):
                continue  # it never arrived (a replica drained, scaled down or crashed): send it again
            raise Unavailable(f"service {name!r}: {exc}") from None
        finally:
            services.inflight[base] -= 1


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


async def send_answer(answer: Answer, send) -> None:
    if answer.body is not None:
        headers = [*answer.headers, (b"content-length", str(len(answer.body)).encode())]
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body})
        return
    headers = answer.headers if answer.length is None else [*answer.headers, (b"content-length", b"%d" % answer.length)]
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    async for chunk in answer.stream():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


class AnswerResponse(Response):
    """A replica's answer, passed through as received."""

    def __init__(self, answer: Answer):
        self.answer = answer
        self.status_code, self.background = answer.status, None

    async def __call__(self, scope, receive, send) -> None:
        await send_answer(self.answer, send)


class ServeFastPath:
    """ASGI middleware: calls to services (``/{ws}/serve/{name}/...``, the hot path) skip the router,
    the request objects and the exception middleware; everything else goes on to the app."""

    def __init__(self, app, platform):
        self.app = app
        self.platform = platform

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            parts = scope["path"].split("/", 4)  # "", ws, "serve", name, rest
            if len(parts) == 5 and parts[2] == "serve" and parts[3] and parts[4] != "openapi.json":
                return await self._call(scope, receive, send, parts[1], parts[3], parts[4])
        await self.app(scope, receive, send)

    async def _call(self, scope, receive, send, ws: str, name: str, rest: str) -> None:
        plat = self.platform
        try:
            authorization = None
            for k, v in scope["headers"]:
                if k == b"authorization":
                    authorization = v.decode("latin-1")
                    break
            plat.auth.check(authorization, ws)
            target = _target(plat, scope["method"], ws, name, rest)
            answer = await proxy(plat, scope, receive, ws, name, target)
        except OpboxError as exc:
            headers = [(b"content-type", b"application/json")]
            if exc.status == 429 and "retry_after" in exc.details:
                headers.append((b"retry-after", str(exc.details["retry_after"]).encode()))
            body = json.dumps(exc.to_dict()).encode()
            headers.append((b"content-length", str(len(body)).encode()))
            await send({"type": "http.response.start", "status": exc.status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await send_answer(answer, send)
