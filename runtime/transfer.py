"""Large payloads straight to and from the object store, with the signed URLs the gateway hands out.

A run whose arguments are in the object store is leased with an empty body and the URL to GET them
from (``X-Opbox-Payload-Url``); a result (or a streamed item) larger than the gateway's inline limit
(``X-Opbox-Inline``) is PUT to a signed upload URL and handed in as a reference. So the bytes of
large payloads never pass through the gateway's routes. A URL without a host is served by the
gateway itself (a local-folder store): it is reached at the runtime's gateway URL.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import tempfile
import threading
from urllib.parse import urlsplit

from opbox import envelope, signed_http
from opbox.errors import StorageError, from_response


def _open(channel, url: str) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    if parts.scheme:
        return signed_http.open_url(url)
    target = channel.base + parts.path + (f"?{parts.query}" if parts.query else "")
    return signed_http.connect(channel.host, channel.port, channel.https), target


def download(channel, url: str) -> bytearray:
    """The object a signed GET URL names, read into one buffer of its size."""
    return signed_http.get(*_open(channel, url))


def offload(channel, slot_path: str, data) -> bytes:
    """Upload ``data`` (bytes or ``Pieces``) with a signed URL asked of the gateway at ``slot_path``; the
    reference to hand in."""
    status, _, answer = channel.request("POST", slot_path, json.dumps({"size": len(data)}).encode(),
                                        {"Content-Type": "application/json"})
    if status != 200:
        try:
            raise from_response(status, json.loads(answer))
        except ValueError:
            raise StorageError(f"the gateway refused an upload: HTTP {status}: {answer[:300]!r}") from None
    slot = json.loads(answer)
    status, body = signed_http.put(*_open(channel, slot["url"]), slot["method"], data, slot["headers"])
    if status >= 300:
        raise _refused(status, body)
    return envelope.ref(slot["ref"])


def _refused(status: int, body: bytes) -> Exception:
    """The store's refusal: the platform's error when it says one (a local store: 507 storage_full)."""
    try:
        return from_response(status, json.loads(body))
    except (ValueError, AttributeError):
        return StorageError(f"the object store refused the upload: HTTP {status}: {body[:300]!r}")


def call(execute, channel, headers, data: bytes, items) -> tuple[str, bytes]:
    """``execute`` the run leased with ``headers`` and ``data``, its arguments fetched from the store first
    when the lease names them by URL."""
    url = headers.get(envelope.URL_HEADER)
    if url:
        try:
            data = download(channel, url)
        except Exception as exc:
            return "failed", envelope.error_envelope(
                f"opbox.{type(exc).__name__}", f"the run's arguments could not be fetched from the object store: {exc}")
    return execute(data, items)


def outgoing(channel, slot_path: str, headers, outcome: str, body) -> tuple[str, bytes]:
    """The result to hand in (bytes or ``Pieces``): as is up to the gateway's inline limit, else a reference to
    its upload."""
    inline = headers.get("X-Opbox-Inline")
    if not inline or not inline.isdigit() or len(body) <= int(inline):
        return outcome, bytes(body)
    try:
        return outcome, offload(channel, slot_path, body)
    except Exception as exc:  # the run ends failed, saying so (as when the gateway cannot keep a result)
        return "failed", envelope.error_envelope(
            f"opbox.{type(exc).__name__}",
            f"the run ended ({outcome}) but its result ({len(body)} bytes) could not be stored: {exc}")


class RuntimeFiles:
    """``opbox.File`` contents for the runs of this process: fetched and uploaded with signed URLs asked of the
    gateway at ``base`` (``/_internal/pools/{pool}/files`` or ``/_internal/runs/{run}/files``)."""

    def __init__(self, channel, base: str):
        self.channel, self.base = channel, base
        self.lock = threading.Lock()  # user code may open files from several threads; the channel is one connection

    def _ask(self, method: str, path: str, body: dict | None = None) -> dict:
        with self.lock:
            status, _, answer = self.channel.request(method, path, json.dumps(body).encode() if body else b"",
                                                     {"Content-Type": "application/json"} if body else None)
        if status != 200:
            try:
                error = from_response(status, json.loads(answer))
            except ValueError:
                error = StorageError(f"the gateway answered {status}: {answer[:300]!r}")
            raise error
        return json.loads(answer)

    def ensure(self, kind: str, sha256: str, size: int, source) -> None:
        slot = self._ask("POST", self.base, {"sha256": sha256, "size": size})
        if slot["exists"]:
            return
        upload = slot["upload"]
        conn, target = _open(self.channel, upload["url"])
        try:
            with open(source, "rb") as f:
                conn.request(upload["method"], target, body=f,
                             headers={**upload["headers"], "Content-Length": str(size)})
            resp = conn.getresponse()
            answer = resp.read()
            if resp.status >= 300:
                raise StorageError(f"the object store refused {source}: HTTP {resp.status}: {answer[:300]!r}")
        finally:
            conn.close()

    def fetch(self, sha256: str, dest) -> None:
        url = self._ask("GET", f"{self.base}/{sha256}")["url"]
        conn, target = _open(self.channel, url)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".opbox-download-")
        try:
            conn.request("GET", target)
            resp = conn.getresponse()
            if resp.status != 200:
                raise StorageError(f"the object store answered {resp.status}: {resp.read(300)!r}")
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(resp, out, 1024 * 1024)
            os.replace(tmp, dest)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        finally:
            conn.close()
