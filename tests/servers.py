"""Serve an ASGI app with a real uvicorn server on 127.0.0.1 for the length of a `with` block:

    with serve_app(app) as base_url:
        httpx.get(base_url + "/health")
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


@contextmanager
def serve_app(app: Any, host: str = "127.0.0.1", startup_timeout: float = 10.0, **config: Any) -> Iterator[str]:
    """Run ``app`` on a free port in a background thread; yield its base URL (no trailing '/').

    Extra keyword arguments go to ``uvicorn.Config`` (e.g. ``lifespan="on"``).
    """
    config.setdefault("log_level", "warning")
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, **config))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{id(server):x}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the uvicorn server stopped during startup (see the log above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the uvicorn server did not start within {startup_timeout}s")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
