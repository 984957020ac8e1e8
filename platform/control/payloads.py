"""Payloads (arguments and results) on their way in and out, never whole in memory when large.

Up to ``inline`` bytes a payload is kept in the records, as before. A larger one is spooled to
a temp file as its request arrives, then stored as one object in the object store
(``{workspace}/payloads/{id}``); the records keep its key, size and envelope head (all the
platform reads of it). Readers get it back in chunks straight from the store. The bytes are
never decoded here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from opbox import envelope
from opbox.errors import PayloadTooLarge, SerializationError, StorageError, StorageFull

from ..records.base import Payload, StoredPayload

CHUNK = 1024 * 1024  # bytes per read from the store when streaming a payload out
MAX_HEAD = 1024 * 1024  # an envelope's JSON header is small (a result's JSON rendering is capped at 64 KiB)
_FULL = (errno.ENOSPC, errno.EDQUOT)


class Payloads:
    def __init__(self, store, spool_dir: Path, inline: int):
        self.store = store
        self.spool_dir = Path(spool_dir)
        self.inline = inline
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

    async def keep(self, workspace: str, data: bytes) -> Payload:
        """A payload already in memory (a map item): as is when small, else stored in the object store."""
        if len(data) <= self.inline:
            return data
        head = _checked_head(bytes(data[:MAX_HEAD + envelope.PREFIX_SIZE]))
        key = object_key(workspace)
        await asyncio.to_thread(self.store.put, key, data)
        return StoredPayload(key, len(data), head)


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
            raise PayloadTooLarge(f"the {self.what} is larger than the limit of {self.limit} bytes")
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
