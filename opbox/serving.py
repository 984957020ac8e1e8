"""Classes as HTTP API endpoints: ``@operator()`` on a class, ``Model.deploy(...)``, ``RemoteService``.

The runtime imports this module when it imports a decorated class, so it imports nothing
heavy at module level (the HTTP client is imported on use).
"""

from __future__ import annotations

import base64
import os
import sys
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterable, Iterator

from . import defaults
from .errors import ConfigError, ValidationError
from .mapping import Mappable, aiter_items
from .progress import progress_bar
from .resource import Resource

if TYPE_CHECKING:
    from .client import Client

RESERVED = ("deploy",)


def make_servable(cls, *, name: str | None, resource: Resource, image=None):
    """What ``@operator()`` does to a class: the class itself, with a ``deploy`` classmethod attached."""
    for attr in RESERVED:
        if attr in cls.__dict__:
            raise ValidationError(f"{cls.__qualname__} defines {attr}(); @operator() attaches its own "
                                  f"{attr} classmethod to deployable classes: rename yours")
    cls.__opbox_service__ = {"name": name or cls.__name__, "resource": resource, "image": image}
    cls.deploy = classmethod(_deploy_class)
    return cls


def _not_in_runtime(what: str) -> None:
    if os.environ.get("OPBOX_RUNTIME") == "1":
        raise ConfigError(
            f"{what} was called while the opbox runtime imported your module; put deploy calls under "
            "`if __name__ == \"__main__\":` so that importing the module does not deploy")


def _deploy_class(cls, *init_args, name: str | None = None, replicas: int = defaults.REPLICAS,
                  concurrency: int = defaults.CONCURRENCY, queue: int = defaults.QUEUE,
                  scale_to_zero: float | None = defaults.SCALE_TO_ZERO, resource: Resource | None = None,
                  timeout: float | None = None, wait: float = 300.0, client: "Client | None" = None,
                  quiet: bool = False, root: str | os.PathLike | None = None, **init_kwargs) -> "RemoteService":
    """Deploy this class as a service: ``Model.deploy(*init_args, **init_kwargs)``.

    The folder holding the class's file is packed and built as a new version; the service
    (default name: the class's) then runs ``replicas`` copies of ``Model(*init_args, **init_kwargs)``
    (arguments travel pickled), each calling ``__remote_init__()`` if defined, and each running
    at most ``concurrency`` calls at once with ``queue`` more waiting (then 429). After
    ``scale_to_zero`` idle seconds the replicas stop (``None``: never); the next call starts
    them again. Redeploying a name rolls the service to the new version. Returns once the new
    version answers (up to ``wait`` seconds). ``root``: the folder to pack (default: as for functions).
    """
    from . import serialization
    from .client import default_client
    from .decorator import build_version
    from .project import source_of

    _not_in_runtime(f"{cls.__name__}.deploy()")
    meta = getattr(cls, "__opbox_service__", {})
    service = name or meta.get("name") or cls.__name__
    spec = (resource or meta.get("resource") or Resource()).merge(timeout=timeout)
    client = client or default_client()
    folder, entry = source_of(cls, root)
    init = serialization.dump_args(init_args, init_kwargs)
    job, version = build_version(folder, entry, service, "class", spec, client, quiet, image=meta.get("image"))
    return _put_service(client, service, job, version, init, wait, replicas=replicas, concurrency=concurrency,
                        queue=queue, scale_to_zero=scale_to_zero)


def serve_asgi(target: str, *, name: str, folder: str | os.PathLike | None = None,
               replicas: int = defaults.REPLICAS, concurrency: int = defaults.CONCURRENCY, queue: int = defaults.QUEUE,
               scale_to_zero: float | None = defaults.SCALE_TO_ZERO,
               resource: Resource | None = None, wait: float = 300.0, client: "Client | None" = None,
               quiet: bool = False) -> "RemoteService":
    """Deploy an existing ASGI app (starlette, FastAPI...) as service ``name``.

    ``target`` is ``"module:attribute"`` inside ``folder`` (default: the folder of the calling
    script), e.g. ``serve_asgi("main:app", name="api")``. The app answers under
    ``$OPBOX_URL/{workspace}/serve/{name}/...`` with its own routes; its lifespan runs on start.
    """
    from .client import default_client
    from .decorator import build_version

    _not_in_runtime("serve_asgi()")
    module, _, attr = target.partition(":")
    if not module or not attr:
        raise ValidationError(f"target must look like 'module:attribute', e.g. 'main:app', got {target!r}")
    if folder is None:
        caller = sys._getframe(1).f_globals.get("__file__")
        folder = Path(caller).resolve().parent if caller else Path.cwd()
    folder = Path(folder).resolve()
    rel = Path(*module.split("."))
    if not (folder / rel.with_suffix(".py")).is_file() and not (folder / rel / "__init__.py").is_file():
        raise ValidationError(f"no module {module!r} in {folder} (looked for {rel.with_suffix('.py')})")
    client = client or default_client()
    job, version = build_version(folder, target, name, "asgi", resource or Resource(), client, quiet)
    return _put_service(client, name, job, version, b"", wait, replicas=replicas, concurrency=concurrency,
                        queue=queue, scale_to_zero=scale_to_zero)


def _put_service(client: "Client", name: str, job: dict, version: int, init: bytes, wait: float,
                 **options) -> "RemoteService":
    body = {"job": job["id"], "version": version, "init": base64.b64encode(init).decode(), **options}
    client.request("PUT", f"/services/{name}", json=body, params={"wait": wait},
                   timeout=None if wait is None else wait + 30)
    return RemoteService(name, client)


class RemoteService:
    """A deployed service. Its attributes are its methods: ``service.predict(x)``, ``service.predict.map(xs)``."""

    def __init__(self, name: str, client: "Client | None" = None):
        from .client import default_client

        self.name = name
        self.client = client or default_client()
        self._methods: dict[str, RemoteMethod] = {}

    def __repr__(self) -> str:
        return f"RemoteService({self.name!r})"

    def __getattr__(self, method: str) -> "RemoteMethod":
        if method.startswith("_"):
            raise AttributeError(method)
        found = self._methods.get(method)
        if found is None:
            found = self._methods[method] = RemoteMethod(self, method)
        return found

    def info(self) -> dict:
        """The service's record and status (replicas, version, ...)."""
        return self.client.get(f"/services/{self.name}").json()

    def openapi(self) -> dict:
        return self.client.get(f"/serve/{self.name}/openapi.json").json()

    def logs(self) -> str:
        """What the replicas printed (stdout and stderr)."""
        return self.client.get(f"/services/{self.name}/logs").text

    def delete(self) -> None:
        self.client.request("DELETE", f"/services/{self.name}")

    @property
    def url(self) -> str:
        return f"{self.client.config.url}{self.client.path(f'/serve/{self.name}')}"


class RemoteMethod(Mappable):
    """One method of a service. Calling it sends pickled arguments and returns the (unpickled) result."""

    QUOTA_PATIENCE = 300.0  # seconds of 429 answers a call waits out

    def __init__(self, service: RemoteService, name: str):
        self.service = service
        self.name = name
        self.route = f"/serve/{service.name}/{name}"

    def __repr__(self) -> str:
        return f"<remote method {self.service.name}.{self.name}>"

    def __call__(self, *args, **kwargs) -> Any:
        # a method call is not idempotent: resent only when it surely never left (the gateway restarting)
        return self._answer(self.service.client.send("POST", self.route, **self._request(args, kwargs)))

    async def aio(self, *args, **kwargs) -> Any:
        """The call, awaitable (on the event loop's AsyncClient). Cancelling the awaiting task drops the
        request; the replica finishes the call it started."""
        return self._answer(await self.service.client.asend("POST", self.route, **self._request(args, kwargs)))

    def _request(self, args: tuple, kwargs: dict) -> dict:
        from . import serialization
        from .client import NOT_SENT

        headers = {"Content-Type": serialization.CONTENT_TYPE, "Accept": serialization.CONTENT_TYPE}
        return {"content": serialization.dump_args(args, kwargs), "headers": headers, "retry": True,
                "resend": NOT_SENT, "quota_for": self.QUOTA_PATIENCE}

    def _answer(self, resp) -> Any:
        from . import serialization
        from .client import raise_for
        from .outcome import decode

        if resp.headers.get("content-type", "").startswith(serialization.CONTENT_TYPE):
            return decode(resp.headers.get("x-opbox-status", "failed"), resp.content, f"{self.service.name}.{self.name}")
        raise_for(resp)
        return resp.json()

    def imap(self, items: Iterable, *, concurrency: int | None = None, return_exceptions: bool = False,
             progress: bool | None = None, kwargs: dict | None = None, star: bool = False) -> Iterator:
        """Results in input order, each as soon as it and those before it are ready; ``concurrency``
        calls at a time (default 16, at most 64). A failing item raises its exception (the rest is
        not sent), unless ``return_exceptions`` puts exceptions in the list instead."""
        from concurrent.futures import ThreadPoolExecutor

        width = _width(concurrency)
        extra = dict(kwargs or {})
        bar = progress_bar(progress, len(items) if hasattr(items, "__len__") else None, "call")

        def call(item):
            return self(*(tuple(item) if star else (item,)), **extra)

        pool = ThreadPoolExecutor(max_workers=width, thread_name_prefix=f"opbox-map-{self.name}")
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(call, item))
                if len(pending) >= width * 2:
                    yield _take(pending.popleft(), return_exceptions, bar)
            while pending:
                yield _take(pending.popleft(), return_exceptions, bar)
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
            if bar is not None:
                bar.close()

    async def aimap(self, items, *, concurrency: int | None = None, return_exceptions: bool = False,
                    progress: bool | None = None, kwargs: dict | None = None, star: bool = False) -> AsyncIterator:
        """``imap`` on the event loop: ``concurrency`` calls in flight (``items`` may be an async iterable)."""
        import asyncio

        width = _width(concurrency)
        extra = dict(kwargs or {})
        bar = progress_bar(progress, len(items) if hasattr(items, "__len__") else None, "call")
        pending: deque = deque()
        try:
            async for item in aiter_items(items):
                pending.append(asyncio.ensure_future(self.aio(*(tuple(item) if star else (item,)), **extra)))
                if len(pending) >= width:
                    await asyncio.wait([pending[0]])
                    yield _take(pending.popleft(), return_exceptions, bar)
            while pending:
                await asyncio.wait([pending[0]])
                yield _take(pending.popleft(), return_exceptions, bar)
        finally:
            for task in pending:
                task.cancel()
            if bar is not None:
                bar.close()


def _width(concurrency: int | None) -> int:
    if concurrency is not None and (not isinstance(concurrency, int) or concurrency < 1):
        raise ValidationError(f"concurrency must be a whole number >= 1, got {concurrency!r}")
    return min(concurrency or 16, 64)  # the SDK client keeps at most 64 connections


def _take(future, return_exceptions: bool, bar):
    try:
        value = future.result()
    except Exception as exc:
        if not return_exceptions:
            raise
        value = exc
    if bar is not None:
        bar.update(1)
    return value


def list_services(client: "Client | None" = None) -> list[dict]:
    from .client import default_client

    return (client or default_client()).get("/services").json()["services"]

