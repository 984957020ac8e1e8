"""Reading a streaming run's items (``f.remote_gen(...)``) as its generator yields them.

The gateway streams them as NDJSON from the last one a reader saw (``GET /runs/{run}/items?after=N``);
when the connection breaks the reader connects again from there, so no item is lost or repeated.
``_Cursor`` holds what the sync and the async reader share (no I/O).
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any, AsyncIterator, Iterator

from .errors import Unavailable
from .offload import acontent, content, decoding
from .outcome import decode
from .remote_map import ACCEPT_ENVELOPE, RECONNECTABLE, STREAM_TIMEOUT, _Reconnects


class _Cursor:
    def __init__(self, run, after: int):
        self.run, self.after = run, after
        self.path = f"/runs/{run.id}/items"
        self.status: str | None = None  # the run's, once the end line came
        self.reconnects = _Reconnects(run.client, f"run {run.id}")

    def params(self) -> dict:
        return {"after": self.after}

    def take(self, line: dict) -> bool:
        """Whether ``line`` is an item (else: the end, a heartbeat; a shutdown raises to reconnect)."""
        self.reconnects.connected()
        if line.get("shutdown"):
            raise Unavailable(line.get("message", "the platform is shutting down"))
        if line.get("end"):
            self.status = line["status"]
        return "seq" in line and line["seq"] > self.after

    def value(self, line: dict, payload: bytes | None) -> Any:
        """The item's value (``payload``: fetched apart when the gateway kept it in the object store)."""
        value = decode("succeeded", base64.b64decode(line["payload"]) if payload is None else payload, self.run.id)
        self.after = line["seq"]
        return value


def iter_items(run, after: int = 0) -> Iterator:
    cursor, client = _Cursor(run, after), run.client
    while cursor.status is None:
        try:
            for line in client.stream_lines("GET", cursor.path, params=cursor.params(), timeout=STREAM_TIMEOUT):
                if cursor.take(line):
                    payload = None
                    if line.get("stored"):
                        payload = content(client.get(f"{cursor.path}/{line['seq']}", headers=ACCEPT_ENVELOPE))
                    with decoding(client):
                        value = cursor.value(line, payload)
                    yield value
        except RECONNECTABLE as exc:
            time.sleep(cursor.reconnects.pause(exc))
    if cursor.status != "succeeded":
        run.result()  # raises the run's error, with its remote traceback


async def aiter_items(run, after: int = 0) -> AsyncIterator:
    cursor, client = _Cursor(run, after), run.client
    while cursor.status is None:
        try:
            async for line in client.astream_lines("GET", cursor.path, params=cursor.params(), timeout=STREAM_TIMEOUT):
                if cursor.take(line):
                    payload = None
                    if line.get("stored"):
                        payload = await acontent(await client.aget(f"{cursor.path}/{line['seq']}",
                                                                   headers=ACCEPT_ENVELOPE))
                    with decoding(client):
                        value = cursor.value(line, payload)
                    yield value
        except RECONNECTABLE as exc:
            await asyncio.sleep(cursor.reconnects.pause(exc))
    if cursor.status != "succeeded":
        await run.result.aio()
