"""The SDK's HTTP client to the gateway (httpx, one keep-alive pool per client)."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import weakref
from urllib.parse import quote

import httpx

from . import envelope, errors, result_frames
from .config import ClientConfig
from .wire import KeepAliveTransport, proxies_in_environment

ENVELOPE_TYPE = {"Content-Type": envelope.CONTENT_TYPE}
ENVELOPE_TYPE_BYTES = envelope.CONTENT_TYPE.encode("ascii")
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


class Answer:
    """An answer of the call path (``Client.post_envelope``): its status, its headers by lower-case name
    (the last of a repeated one) and its body."""

    __slots__ = ("status_code", "headers", "content")

    def __init__(self, status: int, headers, content: bytes):
        self.status_code, self.content = status, content
        self.headers = {name.lower(): value for name, value in headers}

    def json(self):
        return json.loads(self.content)


class Client:
    def __init__(self, config: ClientConfig | None = None, *, retry_for: float = 30.0):
        self.config = config or ClientConfig.from_env()
        headers = {"User-Agent": "opbox-sdk"}
        if self.config.token:
            headers["Authorization"] = f"Bearer {self.config.token}"
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        self.wire = None if proxies_in_environment() else KeepAliveTransport(httpx.HTTPTransport(limits=limits))
        self.http = httpx.Client(base_url=self.config.url, headers=headers, timeout=httpx.Timeout(30.0, read=330.0),
                                 limits=limits, transport=self.wire)
        base = self.http.base_url
        if base.scheme != "http":
            self.wire = None  # TLS: httpx's transport does all of it
        self._address, self._timeouts = (base.host, base.port or 80), self.http.timeout.as_dict()
        self._target = f"{base.raw_path.decode('ascii').rstrip('/')}/{self.config.workspace}"
        self._head = "".join(f"{name}: {value}\r\n" for name, value in
                             [("Host", base.netloc.decode("ascii")), *self.http.headers.items()]).encode("latin-1")
        self.retry_for = retry_for
        self._async: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> httpx.AsyncClient

    @property
    def async_http(self) -> httpx.AsyncClient:
        """The ``httpx.AsyncClient`` of the running event loop (one per loop: a client cannot cross loops)."""
        loop = asyncio.get_running_loop()
        found = self._async.get(loop)
        if found is None:
            found = self._async[loop] = httpx.AsyncClient(
                base_url=self.http.base_url, headers=self.http.headers, timeout=self.http.timeout,
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=32))
        return found

    @property
    def workspace(self) -> str:
        return self.config.workspace

    def path(self, path: str) -> str:
        return f"/{self.config.workspace}{path}"

    def post_envelope(self, path: str, body: bytes, query: str, headers: dict | None = None) -> Answer:
        """POST an envelope (``path`` in the workspace, ``query`` made by the caller, ``headers`` beside the
        client's) and return the answer, or raise as ``request`` does: the call path, sent in one write over
        the thread's keep-alive connection, its answer read with no httpx objects."""
        if self.wire is None:
            resp = self.request("POST", f"{path}?{query}", content=body, headers={**ENVELOPE_TYPE, **(headers or {})})
            return Answer(resp.status_code, resp.headers.items(), resp.content)
        head = (f"POST {self._target}{quote(path)}?{query} HTTP/1.1\r\n".encode("ascii") + self._head
                + b"Content-Type: %s\r\nContent-Length: %d\r\n" % (ENVELOPE_TYPE_BYTES, len(body))
                + "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items()).encode("latin-1")
                + b"\r\n")
        try:
            status, answer_headers, content = self.wire.exchange(self._address, "POST", head, body, self._timeouts)
        except CONNECT_ERRORS as exc:  # as ``send`` without retry: the run may exist, never send it twice
            _Retries(self, False, 0.0).after_error(exc)
            raise
        if status >= 400:
            resp = httpx.Response(status, headers=answer_headers, content=content,
                                  request=httpx.Request("POST", self.http.base_url.join(self.path(path))))
            raise_for(resp)
        return Answer(status, answer_headers, content)

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
        retry_policy = _Retries(self, retry, quota_for)
        while True:
            try:
                resp = self.http.request(method, self.path(path), **kwargs)
            except resend as exc:
                time.sleep(retry_policy.after_error(exc))
                continue
            pause = retry_policy.after_answer(resp)
            if pause is None:
                return resp
            time.sleep(pause)

    async def asend(self, method: str, path: str, *, retry: bool = False, resend: tuple = CONNECT_ERRORS,
                    quota_for: float = 0.0, **kwargs) -> httpx.Response:
        """``send`` on the event loop's AsyncClient (the same retry policy)."""
        retry_policy = _Retries(self, retry, quota_for)
        while True:
            try:
                resp = await self.async_http.request(method, self.path(path), **kwargs)
            except resend as exc:
                await asyncio.sleep(retry_policy.after_error(exc))
                continue
            pause = retry_policy.after_answer(resp)
            if pause is None:
                return resp
            await asyncio.sleep(pause)

    async def arequest(self, method: str, path: str, *, retry: bool = False, wait_quota: bool = False,
                       **kwargs) -> httpx.Response:
        """``request``, awaitable."""
        return raise_for(await self.asend(method, path, retry=retry, quota_for=math.inf if wait_quota else 0.0,
                                          **kwargs))

    async def aget(self, path: str, **kwargs) -> httpx.Response:
        return await self.arequest("GET", path, retry=True, **kwargs)

    async def apost(self, path: str, **kwargs) -> httpx.Response:
        return await self.arequest("POST", path, **kwargs)

    async def astream_lines(self, method: str, path: str, **kwargs):
        """``stream_lines``, as an async iterator."""
        async with self.async_http.stream(method, self.path(path), **kwargs) as resp:
            if resp.status_code >= 400:
                await resp.aread()
                raise_for(resp)
            async for line in resp.aiter_lines():
                if line.strip():
                    yield json.loads(line)

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

    def stream_frames(self, path: str, **kwargs):
        """A map's results stream as frames (``result_frames``), as lines shaped like the NDJSON stream's."""
        reader = result_frames.FrameReader()
        with self.http.stream("GET", self.path(path), **kwargs) as resp:
            if resp.status_code >= 400:
                resp.read()
                raise_for(resp)
            for chunk in resp.iter_raw():
                yield from reader.feed(chunk)
        reader.finish()

    async def astream_frames(self, path: str, **kwargs):
        """``stream_frames``, as an async iterator."""
        reader = result_frames.FrameReader()
        async with self.async_http.stream("GET", self.path(path), **kwargs) as resp:
            if resp.status_code >= 400:
                await resp.aread()
                raise_for(resp)
            async for chunk in resp.aiter_raw():
                for line in reader.feed(chunk):
                    yield line
        reader.finish()

    def close(self) -> None:
        self.http.close()

    async def aclose(self) -> None:
        """Close the running event loop's AsyncClient (the others go with their loops)."""
        found = self._async.pop(asyncio.get_running_loop(), None)
        if found is not None:
            await found.aclose()


class _Retries:
    """The SDK's one retry policy, for the sync and the async client: how long to pause, or raise."""

    __slots__ = ("client", "started", "deadline", "delay", "quota_for")

    def __init__(self, client: Client, retry: bool, quota_for: float):
        self.client, self.quota_for = client, quota_for
        self.started = time.monotonic()
        self.deadline = self.started + (client.retry_for if retry else 0)
        self.delay = 0.1

    def after_error(self, exc: Exception) -> float:
        """The pause before resending a request that failed with ``exc``; Unavailable past the deadline."""
        if time.monotonic() + self.delay > self.deadline:
            raise errors.Unavailable(
                f"cannot reach the opbox gateway at {self.client.config.url} ({type(exc).__name__}: {exc}); "
                "is it running? ('make run' or 'opbox up')") from exc
        pause, self.delay = self.delay, min(self.delay * 2, 2.0)
        return pause

    def after_answer(self, resp: httpx.Response) -> float | None:
        """None: the answer stands; else the pause before asking again (a 429 within ``quota_for``)."""
        if resp.status_code != 429 or time.monotonic() - self.started >= self.quota_for:
            return None
        return float(resp.headers.get("retry-after") or 1.0)


_default: Client | None = None
_lock = threading.Lock()


def default_client() -> Client:
    global _default
    with _lock:
        if _default is None:
            _default = Client()
        return _default


def set_default_client(client: Client | None) -> None:
    """Point the SDK at another platform (tests, several gateways); ``None``: made again from the
    environment at the next call that needs it."""
    global _default
    with _lock:
        _default = client


def configure(url: str | None = None, token: str | None = None, workspace: str | None = None) -> Client:
    """Point the SDK at a platform from now on, at any time (a notebook cell, a script's top).

    What is not given comes from the environment (``OPBOX_URL``, ``OPBOX_TOKEN``, ``OPBOX_WORKSPACE``)
    and then ``$OPBOX_HOME/credentials.json``, read now: the environment is read when the default
    client is made, that is at the first call that needs one and at each ``configure()``, so
    ``opbox.configure()`` picks up variables set since. Handles made earlier keep the client they
    were made with. Returns the new default client.
    """
    client = Client(ClientConfig.from_env(url, token, workspace))
    set_default_client(client)
    return client
