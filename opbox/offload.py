"""Large payloads go straight to and from the object store, never through the gateway's routes.

An argument envelope above the inline limit (``OPBOX_PAYLOAD_INLINE`` on the client, 1 MiB by default)
is PUT to a signed URL the gateway hands out (``POST /{ws}/payloads``, which refuses what is above the
platform's ``OPBOX_MAX_PAYLOAD`` or the workspace's quota before anything is sent), and the request
carries only a reference to it. A stored result comes back as a signed URL to GET it from
(``X-Opbox-Payload-Url``), when the request said the SDK can (``X-Opbox-Accept-Url``). Below the
inline limit nothing changes: no extra round trip.
"""

from __future__ import annotations

import asyncio
import os
import threading

import httpx

from . import envelope
from .client import raise_for
from .errors import StorageError

DEFAULT_INLINE = 1024 * 1024
_store_http: httpx.Client | None = None  # no Authorization header: the URLs carry their own signature
_lock = threading.Lock()


def inline_limit() -> int:
    raw = os.environ.get("OPBOX_PAYLOAD_INLINE")
    return int(raw) if raw and raw.isdigit() else DEFAULT_INLINE


INLINE = inline_limit()


def store_http() -> httpx.Client:
    global _store_http
    with _lock:
        if _store_http is None:
            _store_http = httpx.Client(timeout=httpx.Timeout(60.0, read=600.0, write=600.0))
        return _store_http


def outgoing(client, payload: bytes) -> bytes:
    """What to send for ``payload``: itself up to the inline limit, else a reference to its upload."""
    if len(payload) <= INLINE:
        return payload
    slot = client.post("/payloads", json={"size": len(payload)}).json()
    resp = store_http().request(slot["method"], slot["url"], content=payload, headers=slot["headers"])
    if resp.status_code >= 300:
        raise StorageError(f"the object store refused the upload of {len(payload)} bytes: HTTP {resp.status_code}: "
                           f"{resp.text[:300]}")
    return envelope.ref(slot["ref"])


async def aoutgoing(client, payload: bytes) -> bytes:
    """``outgoing``, awaitable (a large upload runs in a thread)."""
    if len(payload) <= INLINE:
        return payload
    return await asyncio.to_thread(outgoing, client, payload)


def content(resp: httpx.Response):
    """An envelope answer's payload: its body, or the object its signed URL names."""
    url = resp.headers.get(envelope.URL_HEADER)
    return download(url) if url else raise_for(resp).content


async def acontent(resp: httpx.Response):
    url = resp.headers.get(envelope.URL_HEADER)
    return await asyncio.to_thread(download, url) if url else raise_for(resp).content


def download(url: str) -> bytearray:
    """The object a signed GET URL names, read into one buffer."""
    with store_http().stream("GET", url) as resp:
        if resp.status_code != 200:
            resp.read()
            raise StorageError(f"the object store answered {resp.status_code} for a stored payload: {resp.text[:300]}")
        size = resp.headers.get("content-length")
        if not (size and size.isdigit()):
            return bytearray(resp.read())
        buffer = bytearray(int(size))
        view, done = memoryview(buffer), 0
        for chunk in resp.iter_raw(1024 * 1024):
            view[done:done + len(chunk)] = chunk
            done += len(chunk)
        if done != len(buffer):
            raise StorageError(f"the download of a stored payload broke off after {done} of {len(buffer)} bytes")
        return buffer
