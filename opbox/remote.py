"""Remote handles: a deployed function (call, submit, map) and a single Job-Run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any, AsyncIterator, Iterable, Iterator
from urllib.parse import urlencode

import httpx

from . import envelope, serialization, tracecontext
from .client import Client, default_client, raise_for
from .mapping import Mappable
from .offload import acontent, adump_call, content, decoding, download, dump_call
from .outcome import decode
from .progress import progress_bar
from .remote_map import ACCEPT_ENVELOPE, _AsyncMap, _Map
from .streaming import aiter_items, iter_items
from .twin import twin

# a stored result comes back as a signed URL to fetch it from (its bytes skip the gateway)
ACCEPT_URL = {envelope.ACCEPT_URL_HEADER: "1"}
ENVELOPE = {"Content-Type": serialization.CONTENT_TYPE, **ACCEPT_URL}


def run_headers() -> dict:
    """A new run's request headers: the envelope's type and the caller's ``traceparent``, when it has one."""
    return tracecontext.caller_headers(ENVELOPE)


LONG_POLL = 60.0
CALL_QUERY = urlencode({"wait": LONG_POLL})  # a call's query, made once (a pinned version adds its own)
PAYLOAD_URL = envelope.URL_HEADER.lower()
_BACKGROUND: set = set()  # cancel requests sent on behalf of cancelled tasks (kept until they are done)


def _reason(resp: httpx.Response) -> str | None:
    raw = resp.headers.get("x-opbox-exit-reason")
    return json.loads(raw) if raw else None


def _waits(timeout: float | None) -> Iterator[float]:
    """Long-poll lengths until ``timeout`` (None: for ever); the last is 0 past the deadline."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        yield LONG_POLL if deadline is None else max(0.0, min(LONG_POLL, deadline - time.monotonic()))
        if deadline is not None and time.monotonic() >= deadline:
            return


def _not_finished(run_id: str, timeout: float | None):
    return TimeoutError(f"run {run_id} has not finished within {timeout} s (it goes on)")


class RunHandle:
    """One Job-Run: its status, result, logs; cancel it. Each method has an awaitable twin: ``await run.result.aio()``."""

    def __init__(self, run_id: str, client: Client | None = None):
        self.id = run_id
        self.client = client or default_client()

    def __repr__(self) -> str:
        return f"RunHandle({self.id!r})"

    @twin
    def status(self) -> dict:
        return self.client.get(f"/runs/{self.id}").json()

    @status.aio
    async def status(self) -> dict:
        return (await self.client.aget(f"/runs/{self.id}")).json()

    @twin
    def wait(self, timeout: float | None = None) -> dict:
        """The run's record once it has ended (long-polls; no fixed sleeps); at ``timeout``, as it is then."""
        for wait in _waits(timeout):
            run = self.client.get(f"/runs/{self.id}", params={"wait": wait}).json()
            if run["finished_at"] is not None:
                break
        return run

    @wait.aio
    async def wait(self, timeout: float | None = None) -> dict:
        for wait in _waits(timeout):
            run = (await self.client.aget(f"/runs/{self.id}", params={"wait": wait})).json()
            if run["finished_at"] is not None:
                break
        return run

    @twin
    def result(self, timeout: float | None = None) -> Any:
        """The run's return value, or its exception raised here with the remote traceback.

        Awaiting ``result.aio()`` stops waiting when its task is cancelled; the run goes on (cancel it
        with ``await run.cancel.aio()``; ``await f.aio(...)`` does cancel the run it started)."""
        for wait in _waits(timeout):
            resp = self.client.get(f"/runs/{self.id}/result", params={"wait": wait}, headers=ACCEPT_ENVELOPE)
            if resp.status_code == 200:
                return self._decode(resp, content(resp))
        raise _not_finished(self.id, timeout)

    @result.aio
    async def result(self, timeout: float | None = None) -> Any:
        for wait in _waits(timeout):
            resp = await self.client.aget(f"/runs/{self.id}/result", params={"wait": wait}, headers=ACCEPT_ENVELOPE)
            if resp.status_code == 200:
                return self._decode(resp, await acontent(resp))
        raise _not_finished(self.id, timeout)

    def _decode(self, resp: httpx.Response, payload) -> Any:
        with decoding(self.client):  # opbox.File results fetch their contents with this client
            return decode(resp.headers["x-opbox-status"], payload, self.id, _reason(resp))

    def logs(self, follow: bool = False) -> Iterator[str]:
        """The run's output; with ``follow``, streamed until the run ends."""
        params = {"follow": "1"} if follow else {}
        path = self.client.path(f"/runs/{self.id}/logs")
        with self.client.http.stream("GET", path, params=params, timeout=httpx.Timeout(30, read=None)) as resp:
            if resp.status_code >= 400:
                resp.read()
                raise_for(resp)
            yield from resp.iter_text()

    @twin
    def items(self, after: int = 0) -> Iterator:
        """The values a streaming run's generator yields (a run started by ``f.remote_gen(...)``), each as it is
        produced, from item ``after + 1`` on: a reader that stopped at item N resumes with ``items(after=N)``.
        Ends with the run; a failed run raises its error after its items. ``async for x in run.items.aio()``."""
        return iter_items(self, after)

    @items.aio
    def items(self, after: int = 0) -> AsyncIterator:
        return aiter_items(self, after)

    @twin
    def cancel(self) -> dict:
        return self.client.post(f"/runs/{self.id}/cancel").json()

    @cancel.aio
    async def cancel(self) -> dict:
        return (await self.client.arequest("POST", f"/runs/{self.id}/cancel", retry=True)).json()

    def cancel_soon(self) -> asyncio.Task:
        """Send the cancel from a task of its own, which the caller's cancellation cannot stop."""
        task = asyncio.ensure_future(self.cancel.aio())
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)
        return task


class RemoteFunction(Mappable):
    """A deployed function. Calling it runs it remotely (a Job-Run) and returns its result."""

    def __init__(self, job_id: str, name: str | None = None, version: int | None = None, client: Client | None = None):
        self.job_id = job_id
        self.name = name or job_id
        self.version = version  # None: the latest version at each call
        self.client = client or default_client()

    def __repr__(self) -> str:
        pinned = f", version={self.version}" if self.version else ""
        return f"RemoteFunction({self.name!r}, job_id={self.job_id!r}{pinned})"

    def _params(self, **extra) -> dict:
        if self.version is not None:
            extra["version"] = self.version
        return extra

    @property
    def _call_query(self) -> str:
        if self.version is None:
            return CALL_QUERY
        made = self.__dict__.get("_made_query")
        if made is None or made[0] != self.version:  # made once per pinned version
            made = self._made_query = (self.version, urlencode(self._params(wait=LONG_POLL)))
        return made[1]

    def __call__(self, *args, **kwargs) -> Any:
        payload = dump_call(self.client, args, kwargs)
        answer = self.client.post_envelope(f"/job/{self.job_id}/runs", payload, self._call_query,
                                           tracecontext.caller_headers(ACCEPT_URL))
        if answer.status_code == 200:
            headers = answer.headers
            url, reason = headers.get(PAYLOAD_URL), headers.get("x-opbox-exit-reason")
            with decoding(self.client):
                return decode(headers["x-opbox-status"], download(url) if url else answer.content,
                              headers["x-opbox-run-id"], json.loads(reason) if reason else None)
        return RunHandle(answer.json()["id"], self.client).result()

    async def aio(self, *args, **kwargs) -> Any:
        """``f(*args, **kwargs)``, awaitable: the event loop runs on while the run does. Cancelling the
        awaiting task cancels the run."""
        submitting = asyncio.ensure_future(self.submit.aio(*args, **kwargs))
        try:
            run = await asyncio.shield(submitting)
        except asyncio.CancelledError:
            # the run may exist already (and be running before its id is back): wait for the id and send the
            # cancel before giving up, not from a callback, which an event loop ending now (asyncio.run
            # cancels what is left) would drop
            try:
                made = await asyncio.shield(submitting)
            except Exception:  # it was never made: nothing to cancel
                raise asyncio.CancelledError from None
            await asyncio.shield(made.cancel_soon())
            raise
        try:
            return await run.result.aio()
        except asyncio.CancelledError:
            await asyncio.shield(run.cancel_soon())
            raise

    @twin
    def submit(self, *args, **kwargs) -> RunHandle:
        """Start a run and return at once (``await f.submit.aio(...)``: the same, awaitable)."""
        return self._start(dump_call(self.client, args, kwargs))

    @submit.aio
    async def submit(self, *args, **kwargs) -> RunHandle:
        return await self._astart(await adump_call(self.client, args, kwargs))

    @twin
    def submit_gen(self, *args, **kwargs) -> RunHandle:
        """Start a streaming run of a generator function and return its handle at once: read its values with
        ``run.items()`` (from any process, resuming with ``run.items(after=N)``)."""
        return self._start(dump_call(self.client, args, kwargs, stream=True))

    @submit_gen.aio
    async def submit_gen(self, *args, **kwargs) -> RunHandle:
        return await self._astart(await adump_call(self.client, args, kwargs, stream=True))

    def _start(self, payload: bytes) -> RunHandle:
        resp = self.client.post(f"/job/{self.job_id}/runs", content=payload, headers=run_headers(), params=self._params())
        return RunHandle(resp.headers.get("x-opbox-run-id") or resp.json()["id"], self.client)

    async def _astart(self, payload: bytes) -> RunHandle:
        resp = await self.client.apost(f"/job/{self.job_id}/runs", content=payload, headers=run_headers(),
                                       params=self._params())
        return RunHandle(resp.headers.get("x-opbox-run-id") or resp.json()["id"], self.client)

    @twin
    def remote_gen(self, *args, **kwargs) -> Iterator:
        """A generator function's values, each as soon as the remote run yields it (``f(...)`` returns them
        all as a list). The run starts when iteration does; each item is stored by the platform as it is
        yielded, so a broken connection resumes where it was. Stopping early cancels the run; a failed
        run raises its error after its items. ``async for x in f.remote_gen.aio(...)``: the same, awaitable."""
        run = self.submit_gen(*args, **kwargs)
        try:
            yield from run.items()
        except (GeneratorExit, KeyboardInterrupt):
            with contextlib.suppress(Exception):  # best effort: the caller is leaving
                run.cancel()
            raise

    @remote_gen.aio
    async def remote_gen(self, *args, **kwargs) -> AsyncIterator:
        run = await self.submit_gen.aio(*args, **kwargs)
        try:
            async for value in run.items.aio():
                yield value
        except (GeneratorExit, asyncio.CancelledError):
            run.cancel_soon()
            raise

    def runs(self, limit: int = 50, status: str | None = None) -> list[dict]:
        params = {"limit": limit, **({"status": status} if status else {})}
        return self.client.get(f"/job/{self.job_id}/runs", params=params).json()["runs"]

    # -- map -------------------------------------------------------------------------
    def imap(self, items: Iterable, *, concurrency: int | None = None, return_exceptions: bool = False,
             progress: bool | None = None, kwargs: dict | None = None, star: bool = False) -> Iterator:
        """Results in input order, each as soon as it is ready; one Job-Run per item, run in parallel.

        Any number of items (submitted in batches while results stream back). ``concurrency``
        caps how many run at once. A failed item raises its exception (the rest of the map is
        cancelled), unless ``return_exceptions`` puts exceptions in the list instead.
        """
        batch = self.client.post(f"/job/{self.job_id}/batches", json=self._batch(concurrency),
                                 headers=tracecontext.caller_headers()).json()
        mapper = _Map(self.client, batch["batch_id"], items, kwargs or {}, star, dump=dump_call)
        return mapper.results(return_exceptions, progress_bar(progress, mapper.size_hint, "run"))

    async def aimap(self, items, *, concurrency: int | None = None, return_exceptions: bool = False,
                    progress: bool | None = None, kwargs: dict | None = None, star: bool = False) -> AsyncIterator:
        """``imap`` on the event loop (``items`` may be an async iterable); cancelling the task that
        iterates cancels the map's remaining runs."""
        batch = (await self.client.apost(f"/job/{self.job_id}/batches", json=self._batch(concurrency),
                                          headers=tracecontext.caller_headers())).json()
        mapper = _AsyncMap(self.client, batch["batch_id"], items, kwargs or {}, star)
        async for value in mapper.results(return_exceptions, progress_bar(progress, mapper.size_hint, "run")):
            yield value

    def _batch(self, concurrency: int | None) -> dict:
        return {"concurrency": concurrency, **({"version": self.version} if self.version is not None else {})}
