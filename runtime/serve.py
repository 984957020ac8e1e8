"""Serve mode: one instance of the user's class (or the user's ASGI app) behind uvicorn.

    python -m opbox.runtime serve --port 8080        (Knative; or --fd N: a socket the platform bound)

Settings from the environment: OPBOX_ENTRY (module:qualname), OPBOX_CODE_DIR, the
constructor's arguments as an args envelope in OPBOX_INIT_FILE (or fetched from OPBOX_INIT_URL),
OPBOX_CONCURRENCY (requests run at once; 0: no limit) and OPBOX_QUEUE (requests that may
wait for a slot; beyond that: 429 with Retry-After).

Routes: ``GET /healthz`` (liveness: the process answers), ``GET /readyz`` (200 once the
instance is built and ``__remote_init__`` has run; 503 before; 500 if it failed),
``GET /openapi.json`` and ``POST /call/{method}`` for a class; everything else goes to an ASGI app.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import inspect
import json
import os
import time
from typing import AsyncIterator
from urllib.parse import urlsplit

from opbox import defaults, serialization
from opbox.errors import SerializationError

from .call_threads import CallThreads
from .execute import _user_tb, _user_traceback, collect, load_target
from .schema import openapi_document, public_methods

ENVELOPE = serialization.CONTENT_TYPE
RESERVED = frozenset({"deploy"})  # attached by @operator(), not the user's


def _type_name(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}"


def _json_default(value):
    import dataclasses
    import datetime

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    for attr in ("model_dump", "tolist"):  # pydantic models, numpy arrays and scalars
        fn = getattr(value, attr, None)
        if callable(fn):
            return fn()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    if isinstance(value, (datetime.date, datetime.datetime, datetime.time)):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class Reply:
    """A whole answer: status, headers, body (sent with one ASGI message)."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, body: bytes, content_type: str = "application/json", headers: dict | None = None):
        self.status, self.body = status, body
        self.headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        for k, v in (headers or {}).items():
            self.headers.append((k.lower().encode(), str(v).encode()))

    async def send(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


class StreamReply:
    """A generator method's values, each sent as it comes: NDJSON lines, or server-sent events (``sse``).
    An exception after the first value ends the stream with an ``{"error": ...}`` item."""

    def __init__(self, values: AsyncIterator, sse: bool):
        self.values, self.sse = values, sse

    async def send(self, send) -> None:
        ctype = b"text/event-stream" if self.sse else b"application/x-ndjson"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", ctype), (b"cache-control", b"no-cache")]})
        try:
            async for value in self.values:
                await send({"type": "http.response.body", "body": self._frame(value), "more_body": True})
        except Exception as exc:
            error = method_error(exc)
            await send({"type": "http.response.body", "body": self._frame(error), "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    def _frame(self, value) -> bytes:
        line = json.dumps(value, default=_json_default)
        return f"data: {line}\n\n".encode() if self.sse else (line + "\n").encode()


def json_reply(status: int, data, headers: dict | None = None) -> Reply:
    return Reply(status, json.dumps(data).encode(), headers=headers)


def error_body(code: str, message: str, **details) -> dict:
    """The platform's one error shape: ``{"error": code, "message", "details"}``."""
    body = {"error": code, "message": message}
    if details:
        body["details"] = details
    return body


def problem(status: int, code: str, message: str, **details) -> Reply:
    """An error answer for calls that never reached the method (404, 422, 429, 503) or whose result failed."""
    return json_reply(status, error_body(code, message, **details), {"retry-after": 1} if status in (429, 503) else None)


def method_error(exc: BaseException) -> dict:
    """A method's exception in the same shape: its type and traceback (your frames only) in the details."""
    return error_body("remote_error", str(exc), type=_type_name(exc), traceback=_user_tb(exc))


class ServeApp:
    """The ASGI app of one replica."""

    def __init__(self, entry: str, code_dir: str | None, init: bytes = b"", concurrency: int = defaults.CONCURRENCY,
                 queue: int = defaults.QUEUE, token: str | None = None):
        self.entry, self.code_dir, self.init = entry, code_dir, init
        self.token = token.encode() if token else None  # set: every call but health checks must carry it
        self.concurrency, self.queue = max(0, concurrency), max(0, queue)
        self.state = "starting"
        self.error: dict | None = None
        self.instance = None
        self.app = None  # the user's ASGI app, when the entry is one
        self.methods: dict = {}
        self.lifespan_state: dict = {}
        self.inflight = self.waiting = 0
        self.slots: asyncio.Semaphore | None = None
        self.pool = CallThreads(concurrency or 64, "opbox-call")  # the user's sync code runs there
        self._user_lifespan: tuple | None = None
        self._openapi: dict[str, bytes] = {}

    # -- start-up ----------------------------------------------------------------------
    async def start(self) -> None:
        try:
            target = await self.pool.run(load_target, self.entry, self.code_dir)
            if inspect.isclass(target):
                args, kwargs = serialization.load_args(self.init) if self.init else ((), {})
                self.instance = await self.pool.run(lambda: target(*args, **kwargs))
                hook = getattr(self.instance, "__remote_init__", None)
                if hook is not None:
                    if inspect.iscoroutinefunction(hook):
                        await hook()
                    else:
                        await self.pool.run(hook)
                self.methods = {n: getattr(self.instance, n) for n in public_methods(type(self.instance), RESERVED)}
            elif callable(target):
                self.app = target
                await self._start_user_lifespan()
            else:
                raise TypeError(f"{self.entry} is a {type(target).__name__}: serve a class or an ASGI app")
        except BaseException as exc:
            self.state = "failed"
            tb = _user_tb(exc)
            self.error = {"type": _type_name(exc), "message": str(exc), "traceback": tb}
            print(f"opbox serve: start-up failed:\n{tb}", flush=True)
            if not isinstance(exc, Exception):
                raise
            return
        self.state = "ready"
        print(f"opbox serve: {self.entry} ready", flush=True)

    async def _start_user_lifespan(self) -> None:
        """Run the user app's lifespan (FastAPI/starlette startup), if it speaks the protocol."""
        inbox: asyncio.Queue = asyncio.Queue()
        outbox: asyncio.Queue = asyncio.Queue()
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.lifespan_state}

        async def run():
            try:
                await self.app(scope, inbox.get, outbox.put)
            except BaseException as exc:  # apps without lifespan support raise here
                await outbox.put({"type": "_unsupported", "exc": exc})
            else:  # or return at once (``if scope["type"] != "http": return``): no lifespan either
                await outbox.put({"type": "_returned"})

        task = asyncio.ensure_future(run())
        await inbox.put({"type": "lifespan.startup"})
        msg = await outbox.get()
        if msg["type"] == "lifespan.startup.failed":
            raise RuntimeError(f"the app's startup failed: {msg.get('message', '')}")
        if msg["type"] == "lifespan.startup.complete":
            self._user_lifespan = (task, inbox, outbox)

    async def stop(self) -> None:
        if self._user_lifespan is not None:
            task, inbox, outbox = self._user_lifespan
            await inbox.put({"type": "lifespan.shutdown"})
            try:
                await asyncio.wait_for(outbox.get(), 30)
            except asyncio.TimeoutError:
                task.cancel()
        self.pool.shutdown()

    # -- ASGI ----------------------------------------------------------------------------
    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind == "lifespan":
            return await self._lifespan(receive, send)
        if kind != "http":
            if self.app is not None and self.state == "ready":
                return await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path == "/healthz":
            return await json_reply(200, {"status": "ok"}).send(send)
        if path == "/readyz":
            return await self._readyz().send(send)
        if self.token is not None and not self._admitted(scope):
            return await problem(401, "auth_error", "calls reach a replica through the gateway only").send(send)
        if self.state != "ready":
            reply = self._readyz() if self.state == "failed" else problem(503, "unavailable", "not ready yet")
            return await reply.send(send)
        if self.app is not None:
            return await self._limited(self._to_app(scope, receive, send), send)
        if path == "/openapi.json" and scope["method"] == "GET":
            return await self._openapi_reply(scope).send(send)
        if path.startswith("/call/"):
            if scope["method"] != "POST":
                return await problem(405, "method_not_allowed", "call a method with POST").send(send)
            name = path[len("/call/"):]
            if name not in self.methods:
                return await problem(404, "not_found", f"no method {name!r}; methods: {sorted(self.methods)}",
                                     methods=sorted(self.methods)).send(send)
            return await self._limited(self._call(name, scope, receive), send)
        return await problem(404, "not_found", f"no route {path}; call methods with POST /call/<method>").send(send)

    def _admitted(self, scope) -> bool:
        """Whether the call carries the replica's token (the gateway's proxy adds it); the header is removed, so
        the user's app never sees it."""
        found, kept = None, []
        for name, value in scope["headers"]:
            if name == b"x-opbox-replica-token":
                found = value
            else:
                kept.append((name, value))
        scope["headers"] = kept
        return found is not None and hmac.compare_digest(found, self.token)

    async def _lifespan(self, receive, send):
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                self.slots = asyncio.Semaphore(self.concurrency) if self.concurrency else None
                self._starter = asyncio.ensure_future(self.start())  # readyz tells when it is done
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _readyz(self) -> Reply:
        body = {"ready": self.state == "ready", "state": self.state, "inflight": self.inflight,
                "waiting": self.waiting, "idle": round(time.monotonic() - self.last_done, 3)}
        if self.error:
            body["error"] = self.error
        return json_reply({"ready": 200, "starting": 503}.get(self.state, 500), body)

    last_done = time.monotonic()

    async def _limited(self, work, send):
        """Run ``work`` under the concurrency limit: wait in the bounded queue, or 429."""
        slots = self.slots
        if slots is not None and slots.locked():
            if self.waiting >= self.queue:
                work.close()
                return await problem(429, "quota_exceeded", f"the replica is at its concurrency "
                                     f"({self.concurrency}) and its queue ({self.queue}) is full; retry later",
                                     retry_after=1).send(send)
        if slots is not None:
            self.waiting += 1
            try:
                await slots.acquire()
            finally:
                self.waiting -= 1
        self.inflight += 1
        try:
            reply = await work
            if reply is not None:
                await reply.send(send)
        finally:
            self.inflight -= 1
            self.last_done = time.monotonic()
            if slots is not None:
                slots.release()

    async def _to_app(self, scope, receive, send):
        if self.lifespan_state:
            scope = {**scope, "state": dict(self.lifespan_state)}
        await self.app(scope, receive, send)

    async def _call(self, name: str, scope, receive) -> Reply:
        body = bytearray()
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers = dict(scope["headers"])
        envelope = headers.get(b"content-type", b"").split(b";")[0].strip() == ENVELOPE.encode()
        method = getattr(self.instance, name)
        if envelope:
            return await self._call_envelope(method, name, bytes(body))
        return await self._call_json(method, name, bytes(body), scope["headers"])

    async def _invoke(self, method, args, kwargs):
        """The method's value: ``async def`` ones run on the event loop (as many at once as ``concurrency``
        lets in), others in the call threads; a generator's values come as a list."""
        if inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method):
            value = method(*args, **kwargs)
        else:
            value = await self.pool.run(lambda: _listed(method(*args, **kwargs)))
        if inspect.isasyncgen(value):
            return await collect(value)
        if inspect.isawaitable(value):
            value = await value
        return value

    async def _call_envelope(self, method, name: str, body: bytes) -> Reply:
        try:
            args, kwargs = serialization.load_args(body)
        except SerializationError as exc:
            return self._error_envelope(422, exc, "")
        signature = _bind(method, name, args, kwargs)
        if signature is not None:
            return self._error_envelope(422, TypeError(signature), "")
        try:
            value = await self._invoke(method, args, kwargs)
        except Exception as exc:
            return self._error_envelope(500, exc, _user_tb(exc))
        try:
            payload = serialization.dump_result(value)
        except Exception as exc:
            error = SerializationError(f"the result could not be pickled: {type(exc).__name__}: {exc}")
            return self._error_envelope(500, error, _user_traceback(exc, 0))
        return Reply(200, payload, ENVELOPE, {"x-opbox-status": "succeeded"})

    @staticmethod
    def _error_envelope(status: int, exc: BaseException, tb: str) -> Reply:
        return Reply(status, serialization.dump_error(exc, tb), ENVELOPE, {"x-opbox-status": "failed"})

    async def _values(self, values) -> AsyncIterator:
        """A generator's values on the event loop: an async one's directly, a sync one's from the call threads."""
        if inspect.isasyncgen(values):
            async for value in values:
                yield value
            return
        end = object()
        while (value := await self.pool.run(next, values, end)) is not end:
            yield value

    async def _call_json(self, method, name: str, body: bytes, scope_headers) -> Reply:
        try:
            args, kwargs = _json_arguments(method, body)
        except RecursionError:  # the decoder recurses per level
            return problem(400, "bad_request", "the body is JSON nested too deeply")
        except ValueError as exc:
            return problem(422, "validation_error", f"{exc}; signature: {_signature(method, name)}",
                           signature=_signature(method, name))
        message = _bind(method, name, args, kwargs)
        if message is not None:
            return problem(422, "validation_error", message, signature=_signature(method, name))
        if inspect.isasyncgenfunction(method) or inspect.isgeneratorfunction(method):
            sse = b"text/event-stream" in dict(scope_headers).get(b"accept", b"")
            return StreamReply(self._values(method(*args, **kwargs)), sse)
        try:
            value = await self._invoke(method, args, kwargs)
        except Exception as exc:
            return json_reply(500, method_error(exc))
        try:
            return Reply(200, json.dumps(value, default=_json_default, allow_nan=False).encode())
        except (TypeError, ValueError, RecursionError) as exc:
            return problem(500, "serialization_error", f"the result of {name}() is not JSON ({exc}); call it with "
                           "the opbox SDK for Python objects", type="opbox.errors.SerializationError")

    def _openapi_reply(self, scope) -> Reply:
        prefix = dict(scope["headers"]).get(b"x-forwarded-prefix", b"").decode()
        cached = self._openapi.get(prefix)
        if cached is None:
            title = self.entry.partition(":")[2]
            doc = openapi_document(title, self.methods, prefix or "/call")
            cached = self._openapi[prefix] = json.dumps(doc).encode()
        return Reply(200, cached)


def _listed(value):
    return list(value) if inspect.isgenerator(value) else value


_SIGNATURES: dict = {}  # (function, kind of callable) -> its signature, or None when it has none
_SIGNATURES_KEPT = 256  # a class whose methods are made anew per access must not grow it without end


def _signature_of(method) -> inspect.Signature | None:
    """``inspect.signature(method)`` (None where there is none), kept per function: computing it costs about
    15 µs, as much as a fifth of a trivial call's whole cost in the replica."""
    try:
        key = (getattr(method, "__func__", method), type(method))
        return _SIGNATURES[key]
    except KeyError:
        pass
    except TypeError:  # unhashable: not kept
        key = None
    try:
        sig = inspect.signature(method)
    except (TypeError, ValueError):
        sig = None
    if key is not None:
        if len(_SIGNATURES) >= _SIGNATURES_KEPT:
            _SIGNATURES.clear()
        _SIGNATURES[key] = sig
    return sig


def _signature(method, name: str) -> str:
    sig = _signature_of(method)
    return f"{name}(...)" if sig is None else f"{name}{sig}"


def _bind(method, name: str, args, kwargs) -> str | None:
    """None if the arguments fit the method; else a message naming its signature."""
    sig = _signature_of(method)
    if sig is None:
        return None
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        return f"bad arguments for {name}: {exc}; signature: {name}{sig}"
    return None


def _json_arguments(method, body: bytes) -> tuple[tuple, dict]:
    """A JSON object is the keyword arguments; {"args": [...], "kwargs": {...}} (only those keys, when the
    method has no parameter of those names) gives positional ones too; a JSON array is the positional ones."""
    if not body.strip():
        return (), {}
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise ValueError(f"the body is not JSON: {exc}") from None
    if isinstance(data, list):
        return tuple(data), {}
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object of keyword arguments (or an array of positional ones)")
    if data and set(data) <= {"args", "kwargs"} and isinstance(data.get("args", []), list) \
            and isinstance(data.get("kwargs", {}), dict):
        sig = _signature_of(method)
        params = sig.parameters if sig is not None else {}
        if not any(k in params and params[k].kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
                   for k in data):
            return tuple(data.get("args", [])), dict(data.get("kwargs", {}))
    return (), data


def read_init() -> bytes:
    """The constructor's arguments: a file (local and container backends), or fetched from the
    gateway with the service's token and checked against their digest (a cluster's pods)."""
    path = os.environ.get("OPBOX_INIT_FILE")
    if path:
        with open(path, "rb") as f:
            return f.read()
    url = os.environ.get("OPBOX_INIT_URL")
    if not url:
        return b""
    from .channel import Channel

    parts = urlsplit(url)
    channel = Channel(f"{parts.scheme}://{parts.netloc}", os.environ.get("OPBOX_RUN_TOKEN", ""), "serve")
    try:
        status, _, data = channel.request("GET", parts.path)
    finally:
        channel.close()
    if status != 200:
        raise RuntimeError(f"cannot fetch the constructor's arguments from {url}: HTTP {status}: {data[:500]!r}")
    if hashlib.sha256(data).hexdigest() != os.environ.get("OPBOX_INIT_SHA256"):
        raise RuntimeError(f"the constructor's arguments from {url} are not the ones this revision was deployed with")
    return data


def main(host: str, port: int | None, fd: int | None) -> int:
    import uvicorn

    from opbox.http_protocol import http_protocol

    env = os.environ
    app = ServeApp(env["OPBOX_ENTRY"], env.get("OPBOX_CODE_DIR") or os.getcwd(), read_init(),
                   concurrency=int(env.get("OPBOX_CONCURRENCY", defaults.CONCURRENCY)),
                   queue=int(env.get("OPBOX_QUEUE", defaults.QUEUE)),
                   # a cluster replica's token is its service's (from its Secret): only the gateway calls it
                   token=env.get("OPBOX_REPLICA_TOKEN") or env.get("OPBOX_RUN_TOKEN"))
    config = uvicorn.Config(app, host=host, port=port or 8080, log_level="warning", access_log=False, lifespan="on",
                            timeout_keep_alive=75, timeout_graceful_shutdown=60, proxy_headers=False,
                            server_header=False, http=http_protocol())
    server = uvicorn.Server(config)
    if fd is not None:  # a TCP socket the platform bound and passed down (family detected from the fd)
        import socket

        server.run(sockets=[socket.socket(fileno=fd)])
    else:
        server.run()
    return 0
