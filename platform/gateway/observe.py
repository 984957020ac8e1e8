"""Prometheus metrics over HTTP: the /metrics route, its own-port app, and the request-latency middleware."""

from __future__ import annotations

import hmac
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from opbox.errors import AuthError, Forbidden

from ..metrics import CONTENT_TYPE


def _scrape(request: Request) -> Response:
    return Response(request.app.state.platform.metrics.render(), media_type=CONTENT_TYPE)


async def metrics(request: Request):
    """
    summary: Prometheus metrics (text format), for the metrics token (OPBOX_METRICS_TOKEN)
    description: >
      Runs made and ended, queue wait and run duration, pools and worker starts, service calls, builds,
      storage errors and request latency per route. Only the metrics token reads them (workspace tokens
      get 403); without OPBOX_METRICS_TOKEN set no token does. They can also be served on their own
      port (OPBOX_METRICS_PORT).
    responses:
      200: {description: Prometheus text exposition format}
      401: {description: No token, or not a known one}
      403: {description: A workspace token, not the metrics token}
    """
    platform = request.app.state.platform
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError("the metrics need 'Authorization: Bearer <OPBOX_METRICS_TOKEN>'")
    expected = platform.settings.metrics_token
    if expected and hmac.compare_digest(token.encode(), expected.encode()):
        return _scrape(request)
    setting = "" if expected else " (none is set: set OPBOX_METRICS_TOKEN, or OPBOX_METRICS_PORT for their own port)"
    if platform.auth.is_active(token):
        raise Forbidden(f"a workspace token cannot read the metrics: scrape with the metrics token{setting}")
    raise AuthError(f"the metrics need 'Authorization: Bearer <OPBOX_METRICS_TOKEN>'{setting}")


def metrics_app(platform) -> Starlette:
    """The metrics alone, for their own port (OPBOX_METRICS_PORT): no token, reach it from the scraper only."""
    app = Starlette(routes=[Route("/metrics", _scrape)])
    app.state.platform = platform
    return app


class RequestMetrics:
    """ASGI middleware: each routed request's time, by method and route template (never the raw path),
    until its answer is sent. Service calls are counted apart (``opbox_service_call_seconds``)."""

    def __init__(self, app, platform):
        self.app = app
        self.histogram = platform.metrics.requests

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            route = scope.get("route")  # inside a mount (the dashboard), its path is the mount's root_path
            template = scope.get("root_path", "") + route.path if route is not None else "unmatched"
            self.histogram(scope["method"], template).observe(time.perf_counter() - start)
