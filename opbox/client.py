"""The SDK's HTTP client to the gateway (httpx, one keep-alive pool per client)."""

from __future__ import annotations

import json
import threading
import time

import httpx

from . import errors
from .config import ClientConfig

CONNECT_ERRORS = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError,
                  httpx.ConnectTimeout, httpx.PoolTimeout)


def raise_for(resp: httpx.Response) -> httpx.Response:
    if resp.status_code < 400:
        return resp
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "error" in body:
        raise errors.from_response(resp.status_code, body)
    raise errors.OpboxError(f"HTTP {resp.status_code} from {resp.request.url}: {resp.text[:300]}")


class Client:
    def __init__(self, config: ClientConfig | None = None, *, retry_for: float = 30.0):
        self.config = config or ClientConfig.from_env()
        headers = {"User-Agent": "opbox-sdk"}
        if self.config.token:
            headers["Authorization"] = f"Bearer {self.config.token}"
        self.http = httpx.Client(base_url=self.config.url, headers=headers,
                                 timeout=httpx.Timeout(30.0, read=330.0),
                                 limits=httpx.Limits(max_connections=64, max_keepalive_connections=32))
        self.retry_for = retry_for

    @property
    def workspace(self) -> str:
        return self.config.workspace

    def path(self, path: str) -> str:
        return f"/{self.config.workspace}{path}"

    def request(self, method: str, path: str, *, retry: bool = False, wait_quota: bool = False,
                **kwargs) -> httpx.Response:
        """One API call in this workspace.

        ``retry`` resends it while the gateway is unreachable (for idempotent requests);
        ``wait_quota`` waits out 429 answers (Retry-After) for as long as they come.
        """
        deadline = time.monotonic() + (self.retry_for if retry else 0)
        delay = 0.1
        while True:
            try:
                return raise_for(self.http.request(method, self.path(path), **kwargs))
            except errors.QuotaExceeded as exc:
                if not wait_quota:
                    raise
                time.sleep(float(exc.details.get("retry_after") or 1.0))
            except CONNECT_ERRORS as exc:
                if time.monotonic() + delay > deadline:
                    raise errors.Unavailable(
                        f"cannot reach the opbox gateway at {self.config.url} ({type(exc).__name__}: {exc}); "
                        "is it running? ('make run' or 'opbox up')") from exc
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.request("GET", path, retry=True, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def stream_lines(self, method: str, path: str, **kwargs):
        """Lines of an NDJSON answer, as dicts."""
        with self.http.stream(method, self.path(path), **kwargs) as resp:
            if resp.status_code >= 400:
                resp.read()
                raise_for(resp)
            for line in resp.iter_lines():
                if line.strip():
                    yield json.loads(line)

    def close(self) -> None:
        self.http.close()


_default: Client | None = None
_lock = threading.Lock()


def default_client() -> Client:
    global _default
    with _lock:
        if _default is None:
            _default = Client()
        return _default


def set_default_client(client: Client | None) -> None:
    """Point the SDK at another platform (tests, several gateways)."""
    global _default
    with _lock:
        _default = client
