"""The protocol every object store speaks (a local folder, S3 or an S3-compatible server).

Like the backends, the platform holds one ``ObjectStore`` and never knows which. All methods
are synchronous and may block on disk or network: async code calls them through a thread
(``anyio.to_thread.run_sync``). Clients never talk to the store with the platform's
credentials: they get a ``SignedRequest`` to upload or download one object directly.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from os import PathLike
from typing import BinaryIO, Protocol, TypeVar, runtime_checkable

from opbox.errors import ValidationError

MAX_KEY_LENGTH = 1024
MAX_URL_EXPIRES = 7 * 24 * 3600  # SigV4's limit; we hold the local store to it too

T = TypeVar("T")


@dataclass(frozen=True)
class SignedRequest:
    """A request a client may send as is, without credentials, to move one object."""

    url: str
    method: str
    headers: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class ObjectStore(Protocol):
    """A flat namespace of '/'-separated keys to immutable-at-a-time byte blobs.

    Missing objects raise ``NotFound`` on read; bad keys raise ``ValidationError``; a store
    that fails (network, disk, 5xx after retries) raises ``StorageError``.
    """

    def put(self, key: str, data: bytes) -> None: ...

    def put_file(self, key: str, path: str | PathLike[str]) -> None:
        """Upload a file from disk (S3: multipart above the store's threshold)."""

    def put_stream(self, key: str, stream: BinaryIO) -> None:
        """Upload what ``stream`` yields until its end, size unknown ahead (S3: always multipart)."""

    def get(self, key: str) -> bytes: ...

    def get_file(self, key: str, path: str | PathLike[str]) -> None:
        """Download into ``path``, replacing it only once the whole object is there."""

    def open(self, key: str) -> BinaryIO:
        """A readable binary file object; close it (or use ``with``)."""

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int | None:
        """The object's size in bytes, or None when it does not exist."""

    def modified(self, key: str) -> float | None:
        """When the object was last written (Unix time), or None when it does not exist."""

    def delete(self, key: str) -> None:
        """Remove an object; no error when it is missing."""

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object whose key starts with ``prefix`` (not empty); return how many."""

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with ``prefix`` (a plain string prefix, as in S3).

        The order is the store's: plain string order for LocalStore and AWS S3, but some
        S3-compatible servers (SeaweedFS) list folder by folder. Sort if it matters.
        """

    def upload_url(
        self,
        key: str,
        expires: int = 900,
        max_size: int | None = None,
        content_type: str = "application/octet-stream",
        sha256: str | None = None,
    ) -> SignedRequest:
        """A PUT the client sends with the body and ``headers``.

        ``max_size`` is enforced by the local store at upload time. A presigned S3 PUT cannot
        bound the size, so callers must check ``size(key)`` once the client reports the upload.
        ``sha256`` (hex) binds the URL to one content: a body with another digest is refused
        and nothing is stored (the local store hashes while it writes; S3 checks the signed
        ``x-amz-checksum-sha256`` header, where the server implements it).
        """

    def download_url(self, key: str, expires: int = 900) -> SignedRequest: ...

    def routes(self) -> list:
        """HTTP routes the gateway mounts for this store's signed URLs: the local store answers
        them itself; S3 has none (its URLs point at S3)."""


def check_sha256(sha256: str | None) -> str | None:
    if sha256 is not None and (not isinstance(sha256, str) or len(sha256) != 64
                               or any(c not in "0123456789abcdef" for c in sha256)):
        raise ValidationError(f"sha256 must be 64 lowercase hex digits, not {sha256!r}")
    return sha256


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative '/'-separated path, else raise ValidationError."""
    if not isinstance(key, str) or not key:
        raise ValidationError("object key must be a non-empty string", key=key)
    _check_chars(key, "object key")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValidationError(
            f"bad object key {shorten(key)!r}: parts must not be empty, '.' or '..' "
            "(no leading, trailing or doubled '/')",
            key=key,
        )
    return key


def validate_prefix(prefix: str) -> str:
    """Like ``validate_key`` but '' is allowed and so is a trailing '/' or a partial last part."""
    if not isinstance(prefix, str):
        raise ValidationError("key prefix must be a string", prefix=prefix)
    if prefix:
        _check_chars(prefix, "key prefix")
        parts = prefix.split("/")
        if parts[-1] == "":
            parts.pop()  # "jobs/" lists a folder
        if any(part in ("", ".", "..") for part in parts):
            raise ValidationError(f"bad key prefix {prefix!r}: no empty, '.' or '..' parts", prefix=prefix)
    return prefix


def shorten(key: str, width: int = 80) -> str:
    """``key`` for error messages: long keys keep their start and end."""
    return key if len(key) <= width else f"{key[: width - 21]}...{key[-18:]}"


def validate_expires(expires: int) -> int:
    if not isinstance(expires, int) or not 0 < expires <= MAX_URL_EXPIRES:
        raise ValidationError(f"expires must be between 1 and {MAX_URL_EXPIRES} seconds, not {expires!r}")
    return expires


def _check_chars(value: str, what: str) -> None:
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise ValidationError(f"bad {what} {shorten(value)!r}: it is not valid Unicode text") from None
    if size > MAX_KEY_LENGTH:  # S3 counts UTF-8 bytes; so do we, for every store
        raise ValidationError(f"{what} is longer than {MAX_KEY_LENGTH} bytes (UTF-8)", length=size)
    if value.startswith("/"):
        raise ValidationError(f"bad {what} {shorten(value)!r}: it must be relative (no leading '/')")
    if "\\" in value or "\x00" in value:
        raise ValidationError(f"bad {what} {shorten(value)!r}: backslashes and NUL are not allowed")


def retry(
    fn: Callable[[], T],
    *,
    retry_on: tuple[type[BaseException], ...],
    attempts: int = 3,
    base_delay: float = 0.2,
) -> T:
    """Call ``fn`` until it succeeds, retrying ``retry_on`` errors with jittered exponential backoff."""
    for attempt in range(attempts):
        try:
            return fn()
        except retry_on:
            if attempt == attempts - 1:
                raise
            time.sleep(base_delay * (2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")
