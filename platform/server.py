"""Running the platform: ``opbox up`` binds a socket, bootstraps credentials, serves the gateway."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys

import uvicorn

from .core import Platform
from .gateway.app import create_app
from .settings import Settings


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
    config = uvicorn.Config(create_app(platform), log_level="warning", access_log=False, lifespan="on",
                            timeout_keep_alive=75, loop="auto", http="auto")
    server = _Server(config, platform)
    await server.serve(sockets=[sock])


class _Server(uvicorn.Server):
    """Tells the platform first on SIGTERM/SIGINT, so parked worker long-polls end at once
    instead of holding uvicorn's graceful shutdown open."""

    def __init__(self, config: uvicorn.Config, platform: Platform):
        super().__init__(config)
        self.platform = platform

    def handle_exit(self, sig, frame) -> None:
        self.platform.begin_shutdown()
        super().handle_exit(sig, frame)


def main(settings: Settings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per replica health check
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(settings))
