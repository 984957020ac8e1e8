"""The starlette gateway: routes, error handling, the OpenAPI document."""

from __future__ import annotations

import logging
import re
import time
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.schemas import SchemaGenerator

from opbox import __version__
from opbox.errors import OpboxError

from ..core import Platform
from . import routes_internal as internal
from . import routes_items as items
from . import routes_jobs as jobs
from . import routes_payloads as payloads
from . import routes_runs as runs
from . import routes_schedules as schedules
from . import routes_secrets as secrets
from . import routes_serve as serve
from . import routes_views as views
from . import dashboard
from .sessions import Sessions
from .http import count_error, error_response
from .observe import RequestMetrics, metrics

log = logging.getLogger("opbox.gateway")

schemas = SchemaGenerator({
    "openapi": "3.0.3",
    "info": {"title": "opbox gateway", "version": __version__,
             "description": "Every route but /healthz and /openapi.json needs 'Authorization: Bearer <token>' "
                            "of the workspace in its path."},
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    "security": [{"bearer": []}],
})


async def healthz(request: Request):
    """
    summary: Liveness of the gateway (no token needed)
    security: []
    responses:
      200: {description: OK}
    """
    return JSONResponse({"status": "ok", "version": __version__})


async def openapi(request: Request):
    """
    summary: This document
    security: []
    responses:
      200: {description: The OpenAPI document}
    """
    return JSONResponse(openapi_document(request.app.routes))


def openapi_document(routes) -> dict:
    """The schema from the routes' docstrings, with each path's {parameters} declared."""
    doc = schemas.get_schema(routes=routes)
    for path, operations in doc.get("paths", {}).items():
        names = re.findall(r"{(\w+)}", path)
        for operation in operations.values():
            declared = {p["name"] for p in operation.get("parameters", []) if p.get("in") == "path"}
            operation.setdefault("parameters", [])[:0] = [
                {"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names if n not in declared]
            operation["responses"] = {str(k): v for k, v in operation.get("responses", {}).items()}
    return doc


async def opbox_error(request: Request, exc: OpboxError):
    count_error(request.app.state.platform.metrics, exc)
    return error_response(exc)


async def unexpected_error(request: Request, exc: Exception):
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"error": "internal_error", "message": f"internal error: {type(exc).__name__}"}, 500)


W = "/{workspace}"
ROUTES = [
    Route("/healthz", healthz),
    Route("/openapi.json", openapi, include_in_schema=False),
    Route("/metrics", metrics),
    Route("/", dashboard.home, include_in_schema=False),
    dashboard.MOUNT,  # the dashboard, /_ui/...
    # service calls first: the hot path should not try every other route's pattern before its own
    Route(W + "/serve/{name}/openapi.json", serve.service_openapi),
    Route(W + "/serve/{name}/{path:path}", serve.call, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
    Route(W + "/jobs", jobs.list_jobs),
    Route(W + "/jobs", jobs.deploy, methods=["POST"]),
    Route(W + "/uploads", jobs.create_upload, methods=["POST"]),
    Route(W + "/payloads", payloads.create_payload_upload, methods=["POST"]),
    Route(W + "/files", payloads.create_file_upload, methods=["POST"]),
    Route(W + "/files/{sha256}", payloads.get_file),
    Route(W + "/job/{job}", jobs.get_job),
    Route(W + "/job/{job}", jobs.delete_job, methods=["DELETE"]),
    Route(W + "/job/{job}/versions", jobs.list_versions),
    Route(W + "/job/{job}/build-log", jobs.build_log),
    Route(W + "/job/{job}/runs", jobs.list_runs),
    CALL_ROUTE := Route(W + "/job/{job}/runs", jobs.call, methods=["POST"]),
    Route(W + "/job/{job}/trigger", jobs.trigger, methods=["POST"]),
    Route(W + "/job/{job}/batches", jobs.create_batch, methods=["POST"]),
    Route(W + "/job/{job}/schedule", schedules.get_schedule),
    Route(W + "/job/{job}/schedule", schedules.put_schedule, methods=["PUT"]),
    Route(W + "/job/{job}/schedule", schedules.delete_schedule, methods=["DELETE"]),
    Route(W + "/job/{job}/schedule/pause", schedules.pause_schedule, methods=["POST"]),
    Route(W + "/job/{job}/schedule/resume", schedules.resume_schedule, methods=["POST"]),
    Route(W + "/schedules", schedules.list_schedules),
    Route(W + "/secrets", secrets.list_secrets),
    Route(W + "/secrets/{name}", secrets.put_secret, methods=["PUT"]),
    Route(W + "/secrets/{name}", secrets.delete_secret, methods=["DELETE"]),
    Route(W + "/batches", views.list_batches),
    Route(W + "/batches/{batch}", jobs.get_batch),
    Route(W + "/batches/{batch}/items", jobs.add_items, methods=["POST"]),
    Route(W + "/batches/{batch}/seal", jobs.seal_batch, methods=["POST"]),
    Route(W + "/batches/{batch}/results", jobs.batch_results),
    Route(W + "/batches/{batch}/progress", views.batch_progress),
    Route(W + "/batches/{batch}/cancel", jobs.cancel_batch, methods=["POST"]),
    Route(W + "/runs", views.list_runs),
    Route(W + "/runs/{run}", runs.get_run),
    Route(W + "/runs/{run}/result", runs.get_result),
    Route(W + "/runs/{run}/logs", runs.get_logs),
    Route(W + "/runs/{run}/attempts", runs.get_attempts),
    Route(W + "/runs/{run}/cancel", runs.cancel_run, methods=["POST"]),
    Route(W + "/runs/{run}/items", items.stream_items),
    Route(W + "/runs/{run}/items/{seq}", items.get_item),
    Route(W + "/tokens", runs.list_tokens),
    Route(W + "/tokens", runs.create_token, methods=["POST"]),
    Route(W + "/tokens/{token}", runs.revoke_token, methods=["DELETE"]),
    Route(W + "/status", runs.status),
    Route(W + "/services", serve.list_services),
    Route(W + "/services/{name}", serve.get_service),
    Route(W + "/services/{name}", serve.put_service, methods=["PUT"]),
    Route(W + "/services/{name}", serve.delete_service, methods=["DELETE"]),
    Route(W + "/services/{name}/logs", serve.service_logs),
    NEXT_ROUTE := Route("/_internal/pools/{pool}/next", internal.worker_next, methods=["POST"], include_in_schema=False),
    Route("/_internal/pools/{pool}/cancelled", internal.worker_cancelled, include_in_schema=False),
    Route("/_internal/pools/{pool}/runs/{run}/logs", internal.worker_logs, methods=["POST"], include_in_schema=False),
    Route("/_internal/services/{workspace}/{name}/init", serve.service_init, include_in_schema=False),
    Route("/_internal/runs/{run}/args", internal.run_args, include_in_schema=False),
    Route("/_internal/runs/{run}/logs", internal.run_logs, methods=["POST"], include_in_schema=False),
    Route("/_internal/runs/{run}/result", internal.run_result, methods=["POST"], include_in_schema=False),
    Route("/_internal/pools/{pool}/runs/{run}/items", internal.worker_items, methods=["POST"], include_in_schema=False),
    Route("/_internal/runs/{run}/items", internal.run_items, methods=["POST"], include_in_schema=False),
    Route("/_internal/pools/{pool}/payloads", internal.worker_payload_upload, methods=["POST"],
          include_in_schema=False),
    Route("/_internal/runs/{run}/payloads", internal.run_payload_upload, methods=["POST"], include_in_schema=False),
    Route("/_internal/pools/{pool}/files", internal.worker_files, methods=["POST"], include_in_schema=False),
    Route("/_internal/pools/{pool}/files/{sha256}", internal.worker_files, include_in_schema=False),
    Route("/_internal/runs/{run}/files", internal.run_files, methods=["POST"], include_in_schema=False),
    Route("/_internal/runs/{run}/files/{sha256}", internal.run_files, include_in_schema=False),
]


# what a caller's token (a run's or a service replica's own, for jobs calling jobs) may use: call, map, trigger,
# read and cancel runs, call services; never deploy, delete, schedule, secrets, tokens (403)
CALLER_ROUTES = frozenset({
    jobs.list_jobs, jobs.get_job, jobs.list_versions, jobs.list_runs, jobs.call, jobs.trigger,
    jobs.create_batch, jobs.get_batch, jobs.add_items, jobs.seal_batch, jobs.batch_results, jobs.cancel_batch,
    views.list_batches, views.batch_progress, views.list_runs,
    runs.get_run, runs.get_result, runs.get_logs, runs.get_attempts, runs.cancel_run, items.stream_items, items.get_item,
    serve.service_openapi, serve.call, serve.list_services, serve.get_service,
})


class GatewayApp(Starlette):
    """The gateway's app: the three hot paths go straight to their handlers, with no middleware or router on
    their way: a call to a service (``routes_serve.fast_path``) to ``serve_call``, a call of a job
    (``POST /{ws}/job/{job}/runs``, ``routes_jobs.call_target``) to ``call_asgi``, and a worker's
    ``POST /_internal/pools/{pool}/next`` to ``worker_next``; the last two are counted in the request metrics
    as ``RequestMetrics`` counts the routed requests, and their errors answered as the app's handlers answer
    them. Every other request goes through the app as usual; the routes stay there too (the OpenAPI
    document, and a mounted gateway)."""

    def __init__(self, platform: Platform, **kwargs):
        super().__init__(**kwargs)
        self.platform = platform
        self.call_seconds = platform.metrics.requests("POST", CALL_ROUTE.path)
        self.next_seconds = platform.metrics.requests("POST", NEXT_ROUTE.path)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            call = serve.fast_path(path)
            if call is not None:
                return await serve.serve_call(self.platform, scope, receive, send, *call)
            if scope["method"] == "POST" and not scope.get("root_path"):
                target = jobs.call_target(path)
                if target is not None:
                    start = time.perf_counter()
                    try:
                        await jobs.call_asgi(self.platform, scope, receive, send, *target)
                    finally:
                        self.call_seconds.observe(time.perf_counter() - start)
                    return
                pool = internal.next_target(path)
                if pool is not None:
                    return await self._worker_next(scope, receive, send, pool)
        await super().__call__(scope, receive, send)

    async def _worker_next(self, scope, receive, send, pool: str) -> None:
        start = time.perf_counter()
        scope.update(app=self, route=NEXT_ROUTE, endpoint=internal.worker_next, path_params={"pool": pool})
        try:
            try:
                response = await internal.worker_next(Request(scope, receive))
            except ClientDisconnect:
                return  # the worker is gone: nobody to answer
            except OpboxError as exc:
                count_error(self.platform.metrics, exc)
                response = error_response(exc)
            except Exception as exc:
                log.exception("unhandled error on POST %s", scope["path"])
                response = JSONResponse({"error": "internal_error", "message": f"internal error: {type(exc).__name__}"},
                                        500)
            await response(scope, receive, send)
        finally:
            self.next_seconds.observe(time.perf_counter() - start)


def create_app(platform: Platform) -> Starlette:
    @asynccontextmanager
    async def lifespan(app):
        await platform.start()
        try:
            yield
        finally:
            await platform.close()

    app = GatewayApp(
        platform,
        routes=platform.store.routes() + ROUTES,
        exception_handlers={OpboxError: opbox_error, Exception: unexpected_error},
        # service calls skip all of this (and the request metrics: they have their own)
        middleware=[Middleware(RequestMetrics, platform=platform)],
        lifespan=lifespan,
    )
    app.state.platform = platform
    app.state.caller_routes = CALLER_ROUTES
    app.state.sessions = Sessions(platform.secret, platform.settings.session_ttl)  # the dashboard's
    return app
