"""One object to or from a signed URL over ``http.client``: the SDK's and the runtime's large payloads.

A body goes out piece by piece as it is in memory (an envelope's ``Pieces``: its head, the pickle stream,
numpy/pandas buffers), never joined; an object comes back into one buffer of its size, read into in
place. httpx would cost a copy and a parser pass per 64 KiB on each side (a 50 MiB payload took twice as
long through it), so the SDK keeps httpx for what this does not do: proxies from the environment (its
``store_http`` then) and TLS in the SDK, as its call path does (``wire.py``).
"""

from __future__ import annotations

import http.client
from urllib.parse import urlsplit

from .errors import StorageError

TIMEOUT = 300.0  # seconds per socket operation of a transfer


def connect(host: str, port: int, https: bool, timeout: float = TIMEOUT) -> http.client.HTTPConnection:
    cls = http.client.HTTPSConnection if https else http.client.HTTPConnection
    return cls(host, port, timeout=timeout, blocksize=1024 * 1024)


def open_url(url: str, timeout: float = TIMEOUT) -> tuple[http.client.HTTPConnection, str]:
    """A connection to an absolute URL's origin, and the request target (path and query)."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    return connect(parts.hostname, parts.port or (443 if https else 80), https, timeout), target


def put(conn: http.client.HTTPConnection, target: str, method: str, body, headers: dict) -> tuple[int, bytes]:
    """Send ``body`` (bytes, or an iterable of buffers such as ``Pieces``, ``len`` its size in bytes) and read
    the answer: its status and body."""
    try:
        conn.request(method, target, body=body, headers={**headers, "Content-Length": str(len(body))})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def get(conn: http.client.HTTPConnection, target: str) -> bytearray:
    """The object at ``target``, read into one buffer of its size (StorageError when not all of it came)."""
    try:
        conn.request("GET", target)
        resp = conn.getresponse()
        if resp.status != 200:
            raise StorageError(f"the object store answered {resp.status}: {resp.read(300)!r}")
        if resp.length is None:
            return bytearray(resp.read())
        buffer = bytearray(resp.length)
        view, done = memoryview(buffer), 0
        while done < len(buffer):
            got = resp.readinto(view[done:])
            if not got:
                raise StorageError(f"the download broke off after {done} of {len(buffer)} bytes")
            done += got
        return buffer
    finally:
        conn.close()
