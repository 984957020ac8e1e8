"""Remote handles: a deployed function (call, submit, map) and a single Job-Run."""

from __future__ import annotations

import base64
import json
import struct
import sys
import threading
import time
from typing import Any, Iterable, Iterator

import httpx

from . import serialization
from .client import CONNECT_ERRORS, Client, default_client
from .errors import Gone, Unavailable
from .mapping import Mappable, progress_bar
from .outcome import decode, to_exception

ENVELOPE = {"Content-Type": serialization.CONTENT_TYPE}
ACCEPT_ENVELOPE = {"Accept": serialization.CONTENT_TYPE}
_FRAME = struct.Struct(">I")
LONG_POLL = 60.0


def _reason(resp: httpx.Response) -> str | None:
    raw = resp.headers.get("x-opbox-exit-reason")
    return json.loads(raw) if raw else None


class RunHandle:
    """One Job-Run: its status, result, logs; cancel it."""

    def __init__(self, run_id: str, client: Client | None = None):
        self.id = run_id
        self.client = client or default_client()

    def __repr__(self) -> str:
        return f"RunHandle({self.id!r})"

    def status(self) -> dict:
        return self.client.get(f"/runs/{self.id}").json()

    def wait(self, timeout: float | None = None) -> dict:
        """The run's record once it has ended (long-polls; no fixed sleeps)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = LONG_POLL if deadline is None else max(0.0, min(LONG_POLL, deadline - time.monotonic()))
            run = self.client.get(f"/runs/{self.id}", params={"wait": wait}).json()
            if run["finished_at"] is not None or (deadline is not None and time.monotonic() >= deadline):
                return run

    def result(self, timeout: float | None = None) -> Any:
        """The run's return value, or its exception raised here with the remote traceback."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = LONG_POLL if deadline is None else max(0.0, min(LONG_POLL, deadline - time.monotonic()))
            resp = self.client.get(f"/runs/{self.id}/result", params={"wait": wait}, headers=ACCEPT_ENVELOPE)
            if resp.status_code == 200:
                return decode(resp.headers["x-opbox-status"], resp.content, self.id, _reason(resp))
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"run {self.id} has not finished within {timeout} s (it goes on)")

    def logs(self, follow: bool = False) -> Iterator[str]:
        """The run's output; with ``follow``, streamed until the run ends."""
        params = {"follow": "1"} if follow else {}
        path = self.client.path(f"/runs/{self.id}/logs")
        with self.client.http.stream("GET", path, params=params, timeout=httpx.Timeout(30, read=None)) as resp:
            if resp.status_code >= 400:
                resp.read()
                from .client import raise_for

                raise_for(resp)
            yield from resp.iter_text()

    def cancel(self) -> dict:
        return self.client.post(f"/runs/{self.id}/cancel").json()


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

    def __call__(self, *args, **kwargs) -> Any:
        payload = serialization.dump_args(args, kwargs)
        resp = self.client.post(f"/job/{self.job_id}/runs", content=payload, headers=ENVELOPE,
                                params=self._params(wait=LONG_POLL))
        if resp.status_code == 200:
            return decode(resp.headers["x-opbox-status"], resp.content, resp.headers["x-opbox-run-id"], _reason(resp))
        return RunHandle(resp.json()["id"], self.client).result()

    def submit(self, *args, **kwargs) -> RunHandle:
        """Start a run and return at once."""
        payload = serialization.dump_args(args, kwargs)
        resp = self.client.post(f"/job/{self.job_id}/runs", content=payload, headers=ENVELOPE, params=self._params())
        run_id = resp.headers.get("x-opbox-run-id") or resp.json()["id"]
        return RunHandle(run_id, self.client)

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
        body = {"concurrency": concurrency}
        if self.version is not None:
            body["version"] = self.version
        batch = self.client.post(f"/job/{self.job_id}/batches", json=body).json()
        mapper = _Map(self.client, batch["batch_id"], items, kwargs or {}, star)
        return mapper.results(return_exceptions, progress_bar(progress, mapper.size_hint, "run"))


class _Map:
    """One map: a thread submits items in chunks; the caller's thread reads the results stream."""

    CHUNK_ITEMS = 2000
    CHUNK_BYTES = 8 * 1024 * 1024

    def __init__(self, client: Client, batch_id: str, items: Iterable, kwargs: dict, star: bool):
        self.client = client
        self.batch_id = batch_id
        self.size_hint = len(items) if hasattr(items, "__len__") else None
        self.total: int | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.sent = 0  # items the platform has stored
        self.stop = threading.Event()
        self.submitter = threading.Thread(target=self._submit, args=(items, kwargs, star), daemon=True,
                                          name=f"opbox-map-{batch_id}")
        self.submitter.start()

    def _submit(self, items: Iterable, kwargs: dict, star: bool) -> None:
        try:
            start, frames, size = 0, [], 0
            for item in items:
                if self.stop.is_set():
                    return
                args = tuple(item) if star else (item,)
                payload = serialization.dump_args(args, kwargs)
                frames.append(_FRAME.pack(len(payload)) + payload)
                size += len(payload) + 4
                if len(frames) >= self.CHUNK_ITEMS or size >= self.CHUNK_BYTES:
                    self._send(start, frames)
                    start, frames, size = start + len(frames), [], 0
            if frames:
                self._send(start, frames)
                start += len(frames)
            self.client.request("POST", f"/batches/{self.batch_id}/seal", json={"total": start}, retry=True)
            self.total = start
        except BaseException as exc:  # reported by the reading side
            self.error = exc
            try:  # the items stored so far are the whole map now: its results stream ends after them
                self.client.request("POST", f"/batches/{self.batch_id}/seal", json={"total": self.sent})
            except Exception:  # the reader notices the error at its next heartbeat instead
                pass

    def _send(self, start: int, frames: list[bytes]) -> None:
        while frames:  # under a quota the platform may take only a prefix; the rest goes again
            answer = self.client.request("POST", f"/batches/{self.batch_id}/items", params={"start": start},
                                         content=b"".join(frames), retry=True, wait_quota=True,
                                         headers={"Content-Type": "application/octet-stream"}).json()
            start += answer["accepted"]
            self.sent = start
            frames = frames[answer["accepted"]:]

    def _stream(self) -> Iterator[dict]:
        """Result lines from completion number 1 on, reconnecting (from where it was) if the stream breaks."""
        after, delay, deadline = 0, 0.1, None
        while True:
            try:
                for line in self.client.stream_lines("GET", f"/batches/{self.batch_id}/results",
                                                     params={"after": after}, timeout=httpx.Timeout(30, read=60)):
                    deadline, delay = None, 0.1
                    if line.get("shutdown"):  # the gateway is stopping: reconnect (from `after`) to another start
                        raise Unavailable(line.get("message", "the platform is shutting down"))
                    if "seq" in line:
                        after = line["seq"]
                        yield line
                    elif self.error is not None:  # a heartbeat, and no more items will come
                        return
                if self.total is not None or self.error is not None:
                    return
                # the stream ended before the total was known here: the submitter is still sealing
                self.submitter.join(timeout=1.0)
            except (*CONNECT_ERRORS, Unavailable, httpx.ReadTimeout) as exc:
                deadline = deadline or time.monotonic() + self.client.retry_for * 2
                if time.monotonic() > deadline:
                    raise Unavailable(f"lost the gateway during map {self.batch_id}: {exc}") from exc
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def results(self, return_exceptions: bool, bar) -> Iterator:
        done: dict[int, tuple[bool, Any]] = {}
        next_index, finished = 0, False
        try:
            for line in self._stream():
                if self.error is not None:
                    raise self.error
                index = line["index"]
                if index in done or index < next_index:
                    continue  # already seen (a reconnect may repeat lines)
                if line.get("expired"):
                    raise Gone(f"the result of map item {index} (run {line['run_id']}) has expired (retention)")
                if line.get("stored"):  # a large result: fetched from its run, streamed by the gateway
                    payload = self.client.get(f"/runs/{line['run_id']}/result", headers=ACCEPT_ENVELOPE).content
                else:
                    payload = base64.b64decode(line["payload"])
                if line["status"] == "succeeded":
                    done[index] = (True, decode("succeeded", payload, line["run_id"]))
                else:
                    exc = to_exception(line["status"], payload, line["run_id"], line.get("exit_reason"))
                    if not return_exceptions:
                        self._cancel()
                        raise exc
                    done[index] = (False, exc)
                if bar is not None:
                    bar.update(1)
                while next_index in done:
                    yield done.pop(next_index)[1]
                    next_index += 1
                if self.total is not None and next_index >= self.total:
                    break
            self.submitter.join()
            if self.error is not None:
                raise self.error
            while next_index in done:
                yield done.pop(next_index)[1]
                next_index += 1
            finished = True
        finally:
            self.stop.set()
            if bar is not None:
                bar.close()
            if not finished and not self.cancelled:  # Ctrl-C, an error, or the caller stopped reading
                self._cancel()
                print(f"opbox: map {self.batch_id} stopped before its end: its remaining runs were cancelled "
                      f"(progress: opbox batch {self.batch_id})", file=sys.stderr)

    def _cancel(self) -> None:
        self.stop.set()
        self.cancelled = True
        try:
            self.client.request("POST", f"/batches/{self.batch_id}/cancel", retry=True)
        except Exception:  # best effort: the client is on its way out; the message names the batch
            pass
