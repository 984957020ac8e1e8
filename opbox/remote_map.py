"""A remote function's map: items go up in chunks, results stream back and are put in input order.

``_Map`` (a submitter thread, the caller's thread reading) and ``_AsyncMap`` (two tasks on the event
loop) share the pieces that do no I/O: ``_Chunks``, ``_Order`` and ``_Reconnects``.
"""

from __future__ import annotations

import asyncio
import struct
import sys
import threading
import time
from typing import Any, AsyncIterator, Iterable, Iterator

import httpx

from . import envelope, result_frames, serialization, tracecontext
from .client import CONNECT_ERRORS, Client
from .errors import Gone, Unavailable
from .mapping import aiter_items
from .offload import acontent, aoutgoing, content, decoding, dump_with_files
from .outcome import decode, to_exception

ACCEPT_ENVELOPE = {"Accept": serialization.CONTENT_TYPE, envelope.ACCEPT_URL_HEADER: "1"}
OCTETS = {"Content-Type": "application/octet-stream"}
FRAMES = {"Accept": result_frames.MEDIA_TYPE}  # the results stream as frames: the envelopes' bytes, no base64
_FRAME = struct.Struct(">I")
STREAM_TIMEOUT = httpx.Timeout(30, read=60)
RECONNECTABLE = (*CONNECT_ERRORS, Unavailable, httpx.ReadTimeout)


class _Chunks:
    """Items pickled into length-prefixed frames, cut into chunks for ``POST /batches/{b}/items?start=K``."""

    ITEMS = 2000
    BYTES = 8 * 1024 * 1024

    def __init__(self, kwargs: dict, star: bool, dump=serialization.dump_args):
        self.kwargs, self.star, self.dump = kwargs, star, dump  # dump: (args, kwargs) -> what is sent
        self.start, self.frames, self.size = 0, [], 0

    def add(self, item) -> tuple[int, list[bytes]] | None:
        """Add one item; a full chunk ``(start, frames)`` to send comes back."""
        return self.add_payload(self.dump(self.args(item), self.kwargs))

    def args(self, item) -> tuple:
        return tuple(item) if self.star else (item,)

    def add_payload(self, payload: bytes) -> tuple[int, list[bytes]] | None:
        """Add one item's envelope (or its reference); a full chunk to send comes back."""
        self.frames.append(_FRAME.pack(len(payload)) + payload)
        self.size += len(payload) + 4
        return self.take() if len(self.frames) >= self.ITEMS or self.size >= self.BYTES else None

    def take(self) -> tuple[int, list[bytes]]:
        chunk = (self.start, self.frames)
        self.start, self.frames, self.size = self.start + len(self.frames), [], 0
        return chunk


class _Order:
    """Result lines in completion order -> values in input order (a reconnect may repeat lines)."""

    def __init__(self, return_exceptions: bool, bar):
        self.return_exceptions, self.bar = return_exceptions, bar
        self.done: dict[int, Any] = {}
        self.next = 0

    def wants(self, line: dict) -> bool:
        index = line["index"]
        if index in self.done or index < self.next:
            return False
        if line.get("expired"):
            raise Gone(f"the result of map item {index} (run {line['run_id']}) has expired (retention)")
        return True

    def add(self, line: dict, payload: bytes | None) -> BaseException | None:
        """Take one result (``payload``: None when it is inline); the exception to raise, if the map must stop."""
        payload = line["payload"] if payload is None else payload
        if line["status"] == "succeeded":
            self.done[line["index"]] = decode("succeeded", payload, line["run_id"])
        else:
            exc = to_exception(line["status"], payload, line["run_id"], line.get("exit_reason"))
            if not self.return_exceptions:
                return exc
            self.done[line["index"]] = exc
        if self.bar is not None:
            self.bar.update(1)
        return None

    def ready(self) -> Iterator:
        while self.next in self.done:
            yield self.done.pop(self.next)
            self.next += 1


class _Reconnects:
    """Backoff for a results stream that broke; Unavailable once it stays broken."""

    def __init__(self, client: Client, what: str):
        self.client, self.what = client, what
        self.deadline: float | None = None
        self.delay = 0.1

    def connected(self) -> None:
        self.deadline, self.delay = None, 0.1

    def pause(self, exc: Exception) -> float:
        self.deadline = self.deadline or time.monotonic() + self.client.retry_for * 2
        if time.monotonic() > self.deadline:
            raise Unavailable(f"lost the gateway during {self.what}: {exc}") from exc
        pause, self.delay = self.delay, min(self.delay * 2, 2.0)
        return pause


def _items_headers() -> dict:
    """A map's item requests' headers: the caller's ``traceparent`` goes with its items (each a run)."""
    return tracecontext.caller_headers(OCTETS)


def _stopped(batch_id: str) -> None:
    print(f"opbox: map {batch_id} stopped before its end: its remaining runs were cancelled "
          f"(progress: opbox batch {batch_id})", file=sys.stderr)


class _Map:
    """One map: a thread submits items in chunks; the caller's thread reads the results stream."""

    def __init__(self, client: Client, batch_id: str, items: Iterable, kwargs: dict, star: bool, dump=None):
        self.client = client
        self.batch_id = batch_id
        # pickles an item (large ones uploaded by URL, opbox.File contents by hash)
        self.dump = serialization.dump_args if dump is None else (lambda args, kwargs: dump(client, args, kwargs))
        self.size_hint = len(items) if hasattr(items, "__len__") else None
        self.total: int | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.sent = 0  # items the platform has stored
        self.headers = _items_headers()  # here: the caller's trace context is this thread's, not the submitter's
        self.stop = threading.Event()
        self.submitter = threading.Thread(target=self._submit, args=(items, kwargs, star), daemon=True,
                                          name=f"opbox-map-{batch_id}")
        self.submitter.start()

    def _submit(self, items: Iterable, kwargs: dict, star: bool) -> None:
        try:
            chunks = _Chunks(kwargs, star, self.dump)
            for item in items:
                if self.stop.is_set():
                    return
                chunk = chunks.add(item)
                if chunk:
                    self._send(*chunk)
            if chunks.frames:
                self._send(*chunks.take())
            self.client.request("POST", f"/batches/{self.batch_id}/seal", json={"total": chunks.start}, retry=True)
            self.total = chunks.start
        except BaseException as exc:  # reported by the reading side
            self.error = exc
            try:  # the items stored so far are the whole map now: its results stream ends after them
                self.client.request("POST", f"/batches/{self.batch_id}/seal", json={"total": self.sent})
            except Exception:  # the reader notices the error at its next heartbeat instead
                pass

    def _send(self, start: int, frames: list[bytes]) -> None:
        while frames:  # under a quota the platform may take only a prefix; the rest goes again
            answer = self.client.request("POST", f"/batches/{self.batch_id}/items",
                                         params={"start": start, "count": len(frames)},
                                         content=b"".join(frames), retry=True, wait_quota=True,
                                         headers=self.headers).json()
            start += answer["accepted"]
            self.sent = start
            frames = frames[answer["accepted"]:]

    def _stream(self) -> Iterator[dict]:
        """Result lines from completion number 1 on, reconnecting (from where it was) if the stream breaks."""
        after, reconnects = 0, _Reconnects(self.client, f"map {self.batch_id}")
        while True:
            try:
                for line in self.client.stream_frames(f"/batches/{self.batch_id}/results", params={"after": after},
                                                      headers=FRAMES, timeout=STREAM_TIMEOUT):
                    reconnects.connected()
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
            except RECONNECTABLE as exc:
                time.sleep(reconnects.pause(exc))

    def results(self, return_exceptions: bool, bar) -> Iterator:
        order, finished = _Order(return_exceptions, bar), False
        try:
            for line in self._stream():
                if self.error is not None:
                    raise self.error
                if not order.wants(line):
                    continue
                payload = None
                if line.get("stored"):  # a large result: fetched from its run, streamed by the gateway
                    payload = content(self.client.get(f"/runs/{line['run_id']}/result", headers=ACCEPT_ENVELOPE))
                with decoding(self.client):
                    failure = order.add(line, payload)
                if failure is not None:
                    self._cancel()
                    raise failure
                yield from order.ready()
                if self.total is not None and order.next >= self.total:
                    break
            self.submitter.join()
            if self.error is not None:
                raise self.error
            yield from order.ready()
            finished = True
        finally:
            self.stop.set()
            if bar is not None:
                bar.close()
            if not finished and not self.cancelled:  # Ctrl-C, an error, or the caller stopped reading
                self._cancel()
                _stopped(self.batch_id)

    def _cancel(self) -> None:
        self.stop.set()
        self.cancelled = True
        try:
            self.client.request("POST", f"/batches/{self.batch_id}/cancel", retry=True)
        except Exception:  # best effort: the client is on its way out; the message names the batch
            pass


class _AsyncMap:
    """One map on the event loop: a task submits items in chunks while ``results`` reads the stream."""

    def __init__(self, client: Client, batch_id: str, items, kwargs: dict, star: bool):
        self.client, self.batch_id = client, batch_id
        self.size_hint = len(items) if hasattr(items, "__len__") else None
        self.items, self.kwargs, self.star = items, kwargs, star
        self.total: int | None = None
        self.error: BaseException | None = None
        self.sent = 0
        self.headers = _items_headers()
        self.cancelled = False
        self.sealed = asyncio.Event()

    async def _submit(self) -> None:
        try:
            chunks = _Chunks(self.kwargs, self.star)
            async for item in aiter_items(self.items):  # a large item is uploaded by URL in a thread
                payload = await aoutgoing(self.client, dump_with_files(self.client, chunks.args(item), self.kwargs))
                chunk = chunks.add_payload(payload)
                if chunk:
                    await self._send(*chunk)
            if chunks.frames:
                await self._send(*chunks.take())
            await self.client.arequest("POST", f"/batches/{self.batch_id}/seal", json={"total": chunks.start},
                                       retry=True)
            self.total = chunks.start
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # reported by the reading side
            self.error = exc
            try:
                await self.client.arequest("POST", f"/batches/{self.batch_id}/seal", json={"total": self.sent})
            except Exception:
                pass
        finally:
            self.sealed.set()

    async def _send(self, start: int, frames: list[bytes]) -> None:
        while frames:
            answer = (await self.client.arequest("POST", f"/batches/{self.batch_id}/items",
                                                 params={"start": start, "count": len(frames)},
                                                 content=b"".join(frames), retry=True, wait_quota=True,
                                                 headers=self.headers)).json()
            start += answer["accepted"]
            self.sent = start
            frames = frames[answer["accepted"]:]

    async def _stream(self) -> AsyncIterator[dict]:
        after, reconnects = 0, _Reconnects(self.client, f"map {self.batch_id}")
        while True:
            try:
                async for line in self.client.astream_frames(f"/batches/{self.batch_id}/results",
                                                             params={"after": after}, headers=FRAMES,
                                                             timeout=STREAM_TIMEOUT):
                    reconnects.connected()
                    if line.get("shutdown"):
                        raise Unavailable(line.get("message", "the platform is shutting down"))
                    if "seq" in line:
                        after = line["seq"]
                        yield line
                    elif self.error is not None:
                        return
                if self.total is not None or self.error is not None:
                    return
                await self.sealed.wait()
            except RECONNECTABLE as exc:
                await asyncio.sleep(reconnects.pause(exc))

    async def results(self, return_exceptions: bool, bar) -> AsyncIterator:
        order, finished = _Order(return_exceptions, bar), False
        submitter = asyncio.ensure_future(self._submit())
        try:
            async for line in self._stream():
                if self.error is not None:
                    raise self.error
                if not order.wants(line):
                    continue
                payload = None
                if line.get("stored"):
                    payload = await acontent(await self.client.aget(f"/runs/{line['run_id']}/result",
                                                                    headers=ACCEPT_ENVELOPE))
                with decoding(self.client):
                    failure = order.add(line, payload)
                if failure is not None:
                    await self._cancel()
                    raise failure
                for value in order.ready():
                    yield value
                if self.total is not None and order.next >= self.total:
                    break
            await submitter
            if self.error is not None:
                raise self.error
            for value in order.ready():
                yield value
            finished = True
        finally:
            submitter.cancel()
            if bar is not None:
                bar.close()
            if not finished and not self.cancelled:  # cancelled, an error, or the caller stopped reading
                await asyncio.shield(self._cancel())
                _stopped(self.batch_id)

    async def _cancel(self) -> None:
        self.cancelled = True
        try:
            await self.client.arequest("POST", f"/batches/{self.batch_id}/cancel", retry=True)
        except Exception:
            pass
