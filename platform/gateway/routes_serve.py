"""Routes for services: their records and logs, and the one entry for calls to them.

A call (``/{ws}/serve/{name}/...``, the hot path) is taken before the app's middleware and router
(``fast_path``, ``GatewayApp`` in ``app.py``): it checks the token, asks the serving proxy (``platform/proxy/proxy.py``)
once, and passes the replica's answer back as received, or renders the error. The routed
``call`` handler reaches the same ``serve_call``; it is there for the OpenAPI document.
"""

from __future__ import annotations

import functools
import logging
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from opbox.errors import OpboxError

from ..metrics import status_class
from ..proxy.upstream import Answer
from .http import error_response, json_body, ok, query_number
from .routes_jobs import platform, workspace

log = logging.getLogger("opbox.gateway")


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


async def service_init(request: Request):
    """A cluster replica fetches its constructor's arguments (an args envelope, passed on as
    stored, never decoded here), with the service's own internal token."""
    plat = platform(request)
    ws, name = request.path_params["workspace"], _name(request)
    plat.auth.check_internal(request.headers.get("authorization"), f"service:{ws}/{name}")
    return Response(plat.services.init_args(ws, name), media_type="application/octet-stream")


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
    proxy = platform(request).proxy
    return AnswerResponse(await proxy.forward(request.scope, request.receive, ws, _name(request), "/openapi.json"))


async def call(request: Request):
    """
    summary: Call a service
    description: >
      For a class, POST /{workspace}/serve/{name}/{method} calls the method. A JSON object body is the
      keyword arguments ({"x": [1, 2]}); {"args": [...], "kwargs": {...}} or a JSON array passes positional
      ones. The answer is the JSON result; 422 names the signature when arguments do not fit; 404 for an
      unknown method; 500 when the method raised; every error is {"error": code, "message", "details"}
      (a method's exception: remote_error, with details {"type", "traceback"}); 429 with
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
    params = request.path_params
    return ServeCall(params["workspace"], params["name"], params.get("path", ""))


async def lean_call(plat, exchange, ws: str, name: str, rest: str) -> None:
    """A service call taken by the gateway's HTTP protocol before uvicorn's ASGI cycle (``opbox.http_lean``):
    ``serve_call``, with a whole answer sent by ``exchange.answer`` in one write."""
    await serve_call(plat, exchange.scope, exchange.receive, exchange.send, ws, name, rest, exchange.answer)


def lean_route(plat):
    """The gateway protocol's lean way for service calls (``server.py``): the paths ``fast_path`` takes."""
    from opbox.http_lean import LeanRoute

    return LeanRoute(b"/serve/", fast_path, functools.partial(lean_call, plat))


async def serve_call(plat, scope, receive, send, ws: str, name: str, rest: str, whole=None) -> None:
    """One call to service ``name``, from the request to the answer's last byte: the token, the proxy,
    the answer passed through, or the error as the API's JSON. Every way in ends here; ``whole(status,
    headers, body)``, when given, sends a whole answer at once (False: it could not, ``send`` must)."""
    start = time.perf_counter()
    try:
        authorization = None
        for k, v in scope["headers"]:
            if k == b"authorization":
                authorization = v.decode("latin-1")
                break
        plat.auth.check(authorization, ws)
        answer = await plat.proxy.call(scope, receive, ws, name, rest)
    except OpboxError as exc:
        count_call(plat.metrics, ws, name, exc.status, start)
        await error_response(exc)(scope, receive, send)
        return
    except Exception as exc:  # what the app's handler for the unexpected does, for the way in that skips it
        log.exception("unhandled error on %s %s", scope["method"], scope["path"])
        count_call(plat.metrics, ws, name, 500, start)
        await JSONResponse({"error": "internal_error", "message": f"internal error: {type(exc).__name__}"},
                           500)(scope, receive, send)
        return
    count_call(plat.metrics, ws, name, answer.status, start)
    if whole is None or answer.body is None or not whole(answer.status, answer.headers, answer.body):
        await send_answer(answer, send)


def count_call(metrics, ws: str, name: str, status: int, start: float) -> None:
    metrics.service_latency(ws, name).observe(time.perf_counter() - start)
    metrics.service_calls(ws, name, status_class(status)).inc()
    if status == 429:
        metrics.service_rejected(ws, name).inc()


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


class ServeCall(Response):
    """The routed ``call``'s answer: ``serve_call`` run as a response, so the router's way in is the fast path's."""

    def __init__(self, ws: str, name: str, rest: str):
        self.ws, self.name, self.rest = ws, name, rest
        self.status_code, self.background = 200, None

    async def __call__(self, scope, receive, send) -> None:
        await serve_call(scope["app"].state.platform, scope, receive, send, self.ws, self.name, self.rest)


def fast_path(path: str) -> tuple[str, str, str] | None:
    """``(workspace, name, rest)`` when ``path`` is a call to a service (``/{ws}/serve/{name}/{rest}``, the hot
    path), found by one split; ``GatewayApp`` (``gateway/app.py``) then sends it to ``serve_call`` before the
    app's middleware, router, request objects and exception handlers (``serve_call`` renders its own errors)."""
    parts = path.split("/", 4)  # "", ws, "serve", name, rest
    if len(parts) == 5 and parts[2] == "serve" and parts[3] and parts[4] != "openapi.json":
        return parts[1], parts[3], parts[4]
    return None
