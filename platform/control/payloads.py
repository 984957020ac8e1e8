"""Payloads (arguments and results) on their way in and out, never whole in memory when large.

Up to ``inline`` bytes a payload is kept in the records, as before. A larger one is stored as
one object in the object store (``{workspace}/payloads/{id}``); the records keep its key, size
and envelope head (all the platform reads of it). The SDK and the runtime move such payloads
themselves, with signed URLs, so their bytes never pass through the gateway: ``upload_slot``
hands out a URL to PUT one to, and the request that uses it carries only a reference
(``envelope.ref``), which ``attach`` checks and claims (once, by its own workspace); answers say
where to GET a stored payload (``download_url``). A large body sent the old way (curl) is
spooled to a temp file as it arrives, then stored; readers that do not fetch by URL get it
back in chunks straight from the store. The bytes are never decoded here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

from opbox import envelope
from opbox.errors import NotFound, PayloadTooLarge, SerializationError, StorageError, StorageFull, ValidationError

from ..records.base import Payload, StoredPayload

CHUNK = 1024 * 1024  # bytes per read from the store when streaming a payload out
MAX_HEAD = 1024 * 1024  # an envelope's JSON header is small (a result's JSON rendering is capped at 64 KiB)
_FULL = (errno.ENOSPC, errno.EDQUOT)
UPLOAD_EXPIRES = 900  # seconds a signed upload or download URL stays valid


def too_large(what: str, size: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the {what} is {size} bytes; the platform's limit is {limit} bytes: raise it with "
                           "OPBOX_MAX_PAYLOAD on the gateway, or pass large data as opbox.File/opbox.Dir",
                           size=size, limit=limit)


class Payloads:
    def __init__(self, store, spool_dir: Path, inline: int, uploads=None, metrics=None):
        self.store = store
        self.metrics = metrics  # counts the bytes of large payloads by the way they came in
        self.spool_dir = Path(spool_dir)
        self.inline = inline
        self.uploads = uploads  # the records' UploadRecords: signed uploads waiting to be attached
        self.self_served = bool(store.routes())  # the store's URLs point at this gateway (a local folder)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.spool_dir.iterdir():  # spools of a gateway that died mid-request
            leftover.unlink(missing_ok=True)

    def spool(self, workspace: str, limit: int, what: str = "payload") -> Spool:
        return Spool(self, workspace, limit, what)

    async def reader(self, payload: StoredPayload) -> AsyncIterator[bytes]:
        """The stored payload's bytes in chunks; opened before the first chunk is asked for, so a missing
        object is an error before an answer starts."""
        file = await asyncio.to_thread(self.store.open, payload.key)
        return _chunks(file)

    async def keep(self, workspace: str, data: bytes, limit: int | None = None) -> Payload:
        """A payload already in memory (a map item): as is when small, else stored in the object store; a
        reference to an upload (within ``limit``) is attached."""
        if len(data) <= self.inline:
            if limit is not None and data.startswith(envelope.REF_MAGIC):
                return await self.attach(workspace, data, limit, "map item")
            return data
        head = _checked_head(bytes(data[:MAX_HEAD + envelope.PREFIX_SIZE]))
        key = object_key(workspace)
        await asyncio.to_thread(self.store.put, key, data)
        self._count("gateway", len(data))
        return StoredPayload(key, len(data), head)


    # -- payloads moved by the SDK and the runtime themselves, with signed URLs --------------
    def upload_slot(self, workspace: str, size, limit: int, what: str, internal: bool = False,
                    quota=None) -> dict:
        """Where to PUT a payload of ``size`` bytes: a signed URL for a new object, remembered as waiting to be
        attached. ``internal``: for a runtime, which reaches a self-served store through its gateway URL;
        ``quota(workspace, size)`` raises when the workspace has no room for it."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValidationError(f"size must be a whole number of bytes, not {size!r}")
        if size > limit:
            raise too_large(what, size, limit)
        if quota is not None:
            quota(workspace, size)
        key = object_key(workspace)
        signed = self.store.upload_url(key, expires=UPLOAD_EXPIRES, max_size=limit)
        self.uploads.add(key, workspace, time.time())
        return {"ref": key, "url": self.reachable(signed.url, internal), "method": signed.method,
                "headers": dict(signed.headers), "expires": int(time.time()) + UPLOAD_EXPIRES}

    async def attach(self, workspace: str, body: bytes, limit: int, what: str) -> StoredPayload:
        """The payload a reference body names, claimed for this one use: it must be an upload this workspace
        asked for and has not used, and its real size (read from the store) within ``limit``. A refused
        upload is deleted."""
        key = envelope.ref_key(body)
        if not key or not self.uploads.claim(key, workspace):
            raise NotFound(f"no upload {key!r} waits to be used in workspace {workspace}: an upload is used once, "
                           f"in the workspace that asked for it, and expires unused", key=key)
        try:
            size = await asyncio.to_thread(self.store.size, key)
            if size is None:
                raise NotFound(f"the upload {key!r} is not in the object store: its PUT did not complete", key=key)
            if size > limit:
                raise too_large(what, size, limit)
            head = await asyncio.to_thread(self._read_head, key)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(self.store.delete, key))
            raise
        self._count("url", size)
        return StoredPayload(key, size, head)

    def _count(self, via: str, size: int) -> None:
        if self.metrics is not None:
            self.metrics.large_payloads(via).inc(size)

    def _read_head(self, key: str) -> bytes:
        f = self.store.open(key)
        try:
            prefix = f.read(envelope.PREFIX_SIZE)
            length = envelope.head_length(prefix)
            if length > MAX_HEAD:
                raise SerializationError(f"the payload's envelope header is {length} bytes; at most {MAX_HEAD} allowed")
            return _checked_head(prefix + f.read(length - len(prefix)))
        finally:
            f.close()

    def download_url(self, payload: StoredPayload, internal: bool = False) -> str:
        """A signed URL to GET a stored payload from (its bytes skip the gateway's routes)."""
        return self.reachable(self.store.download_url(payload.key, expires=UPLOAD_EXPIRES).url, internal)

    def reachable(self, url: str, internal: bool) -> str:
        """A runtime reaches a self-served store at the gateway URL it was given: the URL without its origin."""
        if not (internal and self.self_served):
            return url
        parts = urlsplit(url)
        return f"{parts.path}?{parts.query}"


def object_key(workspace: str) -> str:
    return f"{workspace}/payloads/{secrets.token_hex(16)}"


async def _chunks(file) -> AsyncIterator[bytes]:
    try:
        while chunk := await asyncio.to_thread(file.read, CHUNK):
            yield chunk
    finally:
        file.close()


class Spool:
    """One payload received chunk by chunk: in memory up to the inline limit, then in a temp file.

    A write that fails (a full disk) is remembered and the rest of the body is still read and
    discarded, so the connection stays usable and the caller can answer (or end a run) clearly.
    """

    def __init__(self, payloads: Payloads, workspace: str, limit: int, what: str):
        self.payloads, self.workspace, self.limit, self.what = payloads, workspace, limit, what
        self.size = 0
        self.buffer = bytearray()
        self.file = None
        self.path: str | None = None
        self.failed: StorageError | None = None

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise PayloadTooLarge(f"the {self.what} is larger than the limit of {self.limit} bytes (OPBOX_MAX_PAYLOAD)")
        if self.failed is not None:
            return
        if self.file is None and self.size <= self.payloads.inline:
            self.buffer += chunk
            return
        try:
            if self.file is None:
                fd, self.path = tempfile.mkstemp(dir=self.payloads.spool_dir, prefix="spool-")
                self.file = os.fdopen(fd, "wb")
                self.file.write(self.buffer)
                self.buffer = bytearray()
            self.file.write(chunk)
        except OSError as exc:
            self.failed = self._error(exc)
            self.close()

    async def finish(self) -> Payload:
        """The payload: bytes when small, else stored in the object store. Raises StorageFull (or
        StorageError) when it could not be kept, SerializationError when it is not an envelope."""
        if self.failed is not None:
            raise self.failed
        if self.file is None:
            return bytes(self.buffer)
        try:
            self.file.close()
            head = _head(self.path)
            key = object_key(self.workspace)
            await asyncio.to_thread(self.payloads.store.put_file, key, self.path)
        except OSError as exc:
            raise self._error(exc) from None
        finally:
            self.close()
        self.payloads._count("gateway", self.size)
        return StoredPayload(key, self.size, head)

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):  # closing flushes: a full disk refuses what is dropped anyway
                self.file.close()
        if self.path is not None:
            os.unlink(self.path)
            self.path = None

    def _error(self, exc: OSError) -> StorageError:
        if exc.errno in _FULL:
            free = shutil.disk_usage(self.payloads.spool_dir).free
            return StorageFull(f"the {self.what} ({self.size} bytes so far) could not be kept: no space left on the "
                               f"platform's disk ({free} bytes free)")
        return StorageError(f"the {self.what} could not be kept: {exc.strerror or exc}")


def _head(path: str) -> bytes:
    with open(path, "rb") as f:
        return _checked_head(f.read(MAX_HEAD + envelope.PREFIX_SIZE))


def _checked_head(start: bytes) -> bytes:
    """The envelope's head from the payload's first bytes; SerializationError when it is not an envelope."""
    length = envelope.head_length(start)
    if length > MAX_HEAD:
        raise SerializationError(f"the payload's envelope header is {length} bytes; at most {MAX_HEAD} allowed")
    head = start[:length]
    envelope.read_header(head)  # a whole, well-formed header, or SerializationError
    return head


def head_of(payload: Payload) -> bytes:
    """What of a payload the platform may read: its envelope's head (all of it, for an inline payload)."""
    return payload.head if isinstance(payload, StoredPayload) else payload
