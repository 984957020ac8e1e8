"""Running the platform: ``opbox up`` binds a socket, bootstraps credentials, serves the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys

import uvicorn

from opbox.http_protocol import http_protocol

from .core import Platform
from .gateway.app import create_app
from .gateway.observe import metrics_app
from .gateway.routes_serve import lean_route
from .settings import Settings
from .store.local import ROUTE_PREFIX as STORE_ROUTES


def bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def announce(creds: dict | None, platform: Platform, out=sys.stdout) -> None:
    url = platform.settings.url
    print(f"opbox gateway on {url} (backend: {platform.settings.backend}, home: {platform.settings.home})", file=out)
    if creds:
        print("A workspace and an admin token were created. To use them from another shell:", file=out)
        print(f"  export OPBOX_URL={url}", file=out)
        print(f"  export OPBOX_WORKSPACE={creds['workspace']}", file=out)
        print(f"  export OPBOX_TOKEN={creds['token']}", file=out)
        print(f"(also saved to {platform.settings.home / 'credentials.json'}, which the SDK reads by default)", file=out)
    out.flush()


async def serve(settings: Settings, ready: asyncio.Event | None = None) -> None:
    sock = bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    platform = Platform(settings, bound_url=f"http://{host if ':' not in host else f'[{host}]'}:{port}")
    announce(platform.bootstrap(), platform)
    http = http_protocol(sendfile_prefix(platform), lean_route(platform))  # service calls skip the ASGI cycle
    config = uvicorn.Config(create_app(platform), log_level="warning", access_log=False, lifespan="on",
                            timeout_keep_alive=75, loop="auto", http=http,
                            timeout_graceful_shutdown=STRAGGLERS)
    server = _Server(config, platform)
    if settings.metrics_port is None:
        await server.serve(sockets=[sock])
        return
    metrics_sock = bind(settings.host, settings.metrics_port)
    metrics_host, metrics_port = metrics_sock.getsockname()[:2]
    print(f"opbox metrics on http://{metrics_host}:{metrics_port}/metrics", flush=True)
    side = _Quiet(uvicorn.Config(metrics_app(platform), log_level="warning", access_log=False, lifespan="off"))
    side_task = asyncio.ensure_future(side.serve(sockets=[metrics_sock]))
    try:
        await server.serve(sockets=[sock])
    finally:
        side.should_exit = True
        await side_task


def sendfile_prefix(platform: Platform) -> str | None:
    """Where the local store serves its signed downloads, which go out with ``os.sendfile`` (none on S3)."""
    return f"{STORE_ROUTES}/" if platform.payloads.self_served else None


STRAGGLERS = 3.0  # seconds uvicorn then gives requests still in flight (streams have ended already)


class _Server(uvicorn.Server):
    """A bounded, clean stop on SIGTERM/SIGINT: the platform ends long-polls and streams (saying so) and
    lets busy workers hand their results in (up to ``OPBOX_SHUTDOWN_GRACE``) while the gateway still
    listens; then uvicorn stops. A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, platform: Platform):
        super().__init__(config)
        self.platform = platform
        self.draining = False

    def handle_exit(self, sig, frame) -> None:
        if self.draining:
            self.force_exit = True
            super().handle_exit(sig, frame)
            return
        self.draining = True
        asyncio.get_event_loop().call_soon_threadsafe(self._begin, sig, frame)  # out of the signal handler

    def _begin(self, sig, frame) -> None:
        self.platform.begin_shutdown()
        task = asyncio.ensure_future(self.platform.drain())
        task.add_done_callback(lambda _: super(_Server, self).handle_exit(sig, frame))


class _Quiet(uvicorn.Server):
    """The metrics' own port: a second server on the same loop that leaves signals to the gateway's."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def main(settings: Settings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per replica health check
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(settings))
