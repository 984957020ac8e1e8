"""Prometheus metrics over HTTP: the /metrics route, its own-port app, and the request-latency middleware."""

from __future__ import annotations

import hmac
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from opbox.errors import AuthError, NotFound

from ..metrics import CONTENT_TYPE


def _scrape(request: Request) -> Response:
    return Response(request.app.state.platform.metrics.render(), media_type=CONTENT_TYPE)


async def metrics(request: Request):
    """
    summary: Prometheus metrics (text format), with the metrics token (OPBOX_METRICS_TOKEN)
    description: >
      Runs made and ended, queue wait and run duration, pools and worker starts, service calls, builds,
      storage errors and request latency per route. Answers 404 unless OPBOX_METRICS_TOKEN is set; the
      metrics can also be served on their own port (OPBOX_METRICS_PORT).
    security: [{bearer: []}]
    responses:
      200: {description: Prometheus text exposition format}
      401: {description: Not the metrics token}
      404: {description: Metrics are not served on this port}
    """
    expected = request.app.state.platform.settings.metrics_token
    if not expected:
        raise NotFound("metrics are not served here: set OPBOX_METRICS_TOKEN (then scrape with it as a bearer "
                       "token) or OPBOX_METRICS_PORT (their own port)")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise AuthError("the metrics need 'Authorization: Bearer <OPBOX_METRICS_TOKEN>'")
    return _scrape(request)


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
