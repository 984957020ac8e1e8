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

from . import envelope, errors, serialization, signed_http
from .client import raise_for
from .errors import StorageError
from .files import using
from .wire import proxies_in_environment

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


def outgoing(client, payload) -> bytes:
    """What to send for ``payload`` (bytes or ``Pieces``): itself up to the inline limit, else a reference to
    its upload."""
    if len(payload) <= INLINE:
        return bytes(payload)
    slot = client.post("/payloads", json={"size": len(payload)}).json()
    if _direct(slot["url"]):
        status, answer = signed_http.put(*signed_http.open_url(slot["url"]), slot["method"], payload, slot["headers"])
        if status >= 300:
            raise refused(httpx.Response(status, content=answer), f"the upload of {len(payload)} bytes")
        return envelope.ref(slot["ref"])
    resp = store_http().request(slot["method"], slot["url"], content=_slices(payload),
                                headers={**slot["headers"], "Content-Length": str(len(payload))})
    if resp.status_code >= 300:
        raise refused(resp, f"the upload of {len(payload)} bytes")
    return envelope.ref(slot["ref"])


def _direct(url: str) -> bool:
    """Whether a signed URL is moved with ``signed_http`` (plain HTTP, no proxy to honour), else with httpx."""
    return url.startswith("http://") and not proxies_in_environment()


def refused(resp: httpx.Response, what: str) -> Exception:
    """The store's refusal: the platform's own error when it says one (a local store's 507 storage_full)."""
    try:
        return errors.from_response(resp.status_code, resp.json())
    except (ValueError, AttributeError):
        return StorageError(f"the object store refused {what}: HTTP {resp.status_code}: {resp.text[:300]}")


def _slices(data):
    """``data`` (bytes or ``Pieces``) in views of up to 1 MiB: httpx sends one bytes body by re-slicing the rest
    after each socket write, which copies a large body over and over (500 MiB took 24 s instead of 1)."""
    for part in data.parts if isinstance(data, envelope.Pieces) else (data,):
        view = memoryview(part)
        for start in range(0, len(view), 1024 * 1024):
            yield view[start:start + 1024 * 1024]


async def aoutgoing(client, payload) -> bytes:
    """``outgoing``, awaitable (a large upload runs in a thread)."""
    if len(payload) <= INLINE:
        return bytes(payload)
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
    if _direct(url):
        return signed_http.get(*signed_http.open_url(url))
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


# -- opbox.File / opbox.Dir: content-addressed files, uploaded once ----------------------------
class ClientTransfer:
    """Moves ``opbox.File`` contents for one client: ``POST /{ws}/files`` (upload unless stored), ``GET
    /{ws}/files/{sha256}`` (a signed URL to fetch one)."""

    def __init__(self, client):
        self.client = client

    def ensure(self, kind: str, sha256: str, size: int, source) -> None:
        slot = self.client.post("/files", json={"sha256": sha256, "size": size}).json()
        if not slot["exists"]:
            upload = slot["upload"]
            with open(source, "rb") as f:
                resp = store_http().request(upload["method"], upload["url"], content=_chunks(f),
                                            headers={**upload["headers"], "Content-Length": str(size)})
            if resp.status_code >= 300:
                raise refused(resp, f"the upload of {source}")

    def fetch(self, sha256: str, dest) -> None:
        url = self.client.get(f"/files/{sha256}").json()["url"]
        download_to(url, dest)


def _chunks(f):
    while chunk := f.read(1024 * 1024):
        yield chunk


def download_to(url: str, dest) -> None:
    """The object a signed GET URL names, into the file ``dest`` (replaced only once complete)."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest) or ".", prefix=".opbox-download-")
    try:
        with os.fdopen(fd, "wb") as out, store_http().stream("GET", url) as resp:
            if resp.status_code != 200:
                resp.read()
                raise StorageError(f"the object store answered {resp.status_code}: {resp.text[:300]}")
            for chunk in resp.iter_raw(1024 * 1024):
                out.write(chunk)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def transfer_of(client) -> ClientTransfer:
    found = getattr(client, "_file_transfer", None)
    if found is None:
        found = client._file_transfer = ClientTransfer(client)
    return found


def dump_call(client, args: tuple, kwargs: dict, stream: bool = False) -> bytes:
    """A call's arguments as they are sent: pickled (opbox.File contents uploaded by hash), then offloaded
    when large, straight from the values' own buffers (numpy, pandas) while the caller waits."""
    with using(transfer_of(client)):
        return outgoing(client, serialization.dump_args_pieces(args, kwargs, stream=stream))


async def adump_call(client, args: tuple, kwargs: dict, stream: bool = False) -> bytes:
    return await aoutgoing(client, dump_with_files(client, args, kwargs, stream))


def dump_with_files(client, args: tuple, kwargs: dict, stream: bool = False) -> bytes:
    """The pickled arguments, opbox.File contents uploaded by hash (never offloaded: for the event loop's map)."""
    with using(transfer_of(client)):
        return serialization.dump_args(args, kwargs, stream=stream)


def decoding(client):
    """Results unpickled inside fetch their opbox.File contents with ``client``."""
    return using(transfer_of(client))
