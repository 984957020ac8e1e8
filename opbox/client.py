"""The SDK's HTTP client to the gateway (httpx, one keep-alive pool per client)."""

from __future__ import annotations

import json
import math
import threading
import time

import httpx

from . import errors
from .config import ClientConfig

NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)  # the request never left: safe to resend
CONNECT_ERRORS = (*NOT_SENT, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)  # it may have arrived


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
        """One API call in this workspace; an error answer raises the platform's error.

        ``retry`` resends it while the gateway is unreachable (for idempotent requests);
        ``wait_quota`` waits out 429 answers (Retry-After) for as long as they come.
        """
        return raise_for(self.send(method, path, retry=retry, quota_for=math.inf if wait_quota else 0.0, **kwargs))

    def send(self, method: str, path: str, *, retry: bool = False, resend: tuple = CONNECT_ERRORS,
             quota_for: float = 0.0, **kwargs) -> httpx.Response:
        """The SDK's one retry policy; the answer comes back unchecked (a service's envelope, a 4xx...).

        A request that fails with one of ``resend`` is sent again, with backoff, for up to
        ``retry_for`` seconds when ``retry`` (else at once) before raising Unavailable; a call
        that must not run twice passes ``NOT_SENT``, and other errors propagate. 429 answers are
        waited out (Retry-After) for up to ``quota_for`` seconds from the first try.
        """
        started = time.monotonic()
        deadline = started + (self.retry_for if retry else 0)
        delay = 0.1
        while True:
            try:
                resp = self.http.request(method, self.path(path), **kwargs)
            except resend as exc:
                if time.monotonic() + delay > deadline:
                    raise errors.Unavailable(
                        f"cannot reach the opbox gateway at {self.config.url} ({type(exc).__name__}: {exc}); "
                        "is it running? ('make run' or 'opbox up')") from exc
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if resp.status_code != 429 or time.monotonic() - started >= quota_for:
                return resp
            time.sleep(float(resp.headers.get("retry-after") or 1.0))

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
