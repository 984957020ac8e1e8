"""An object store in a folder on disk, with HMAC-signed URLs served by the gateway.

Keys map to files under ``root``. Every write goes to a temp file in the target's folder and
is renamed into place (``os.replace``), so readers see the old object or the new one, never a
half-written one. ``routes()`` gives the gateway ``PUT``/``GET /_store/{key}`` endpoints whose
only authority is the URL's signature (HMAC-SHA256 over op, key, expiry and size limit).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import hmac
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from os import PathLike
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, urlencode

from anyio import to_thread
from starlette.datastructures import QueryParams
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from opbox.errors import (
    BadRequest,
    ConfigError,
    Conflict,
    Forbidden,
    NotFound,
    OpboxError,
    PayloadTooLarge,
    StorageError,
    StorageFull,
    ValidationError,
)
from opbox.http_body import ClientGone
from opbox.http_protocol import RECEIVE_INTO

from .base import SignedRequest, check_sha256, shorten, validate_expires, validate_key, validate_prefix

TMP_PREFIX = ".opbox-tmp-"  # temp files share the target's folder; list() hides them
ROUTE_PREFIX = "/_store"
_WRITE_BUFFER = 1024 * 1024  # bytes gathered from the request before each disk write


class LocalStore:
    def __init__(self, root: str | PathLike[str], secret: bytes | str, base_url: str):
        if not secret:
            raise ConfigError("LocalStore needs a non-empty secret to sign URLs")
        self.root = Path(root).expanduser().resolve()
        self._secret = secret.encode() if isinstance(secret, str) else bytes(secret)
        self.base_url = base_url
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create the local store folder {self.root}: {e.strerror}") from e

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    @property
    def base_url(self) -> str:
        """Where the gateway serving ``routes()`` is reached; settable once its port is known."""
        return self._base_url

    @base_url.setter
    def base_url(self, url: str) -> None:
        self._base_url = url.rstrip("/")

    # -- objects ------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        self._write(key, lambda f: f.write(data))

    def put_file(self, key: str, path: str | PathLike[str]) -> None:
        with open(path, "rb") as src:  # a missing source is the caller's FileNotFoundError
            self._write(key, lambda f: shutil.copyfileobj(src, f, _WRITE_BUFFER))

    def put_stream(self, key: str, stream: BinaryIO) -> None:
        self._write(key, lambda f: shutil.copyfileobj(stream, f, _WRITE_BUFFER))

    def get(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def get_file(self, key: str, path: str | PathLike[str]) -> None:
        dest = Path(path)
        with self.open(key) as src:
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                _atomic_write(dest, lambda f: shutil.copyfileobj(src, f, _WRITE_BUFFER))
            except OSError as e:
                raise StorageError(
                    f"local store: cannot copy {shorten(key)!r} to {dest}: {e.strerror or e}", key=key
                ) from e

    def open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFound(f"object {shorten(key)!r} not found", key=key) from None
        except OSError as e:
            raise StorageError(f"local store: cannot read {shorten(key)!r}: {e.strerror}", key=key) from e

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def size(self, key: str) -> int | None:
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise StorageError(f"local store: cannot stat {shorten(key)!r}: {e.strerror}", key=key) from e
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def modified(self, key: str) -> float | None:
        try:
            return self._path(key).stat().st_mtime
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise StorageError(f"local store: cannot stat {shorten(key)!r}: {e.strerror}", key=key) from e

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return
        except IsADirectoryError:
            return  # a folder of other keys, not an object
        except OSError as e:
            raise StorageError(f"local store: cannot delete {shorten(key)!r}: {e.strerror}", key=key) from e
        self._prune(path.parent)

    def delete_prefix(self, prefix: str) -> int:
        if not validate_prefix(prefix):
            raise ValidationError("delete_prefix needs a non-empty prefix")
        keys = list(self.list(prefix))  # collect first: deleting prunes folders under the walk
        for key in keys:
            self.delete(key)
        return len(keys)

    def list(self, prefix: str = "") -> Iterator[str]:
        validate_prefix(prefix)
        folder, _, _ = prefix.rpartition("/")
        start = self.root.joinpath(*folder.split("/")) if folder else self.root
        return self._walk(start, f"{folder}/" if folder else "", prefix)

    # -- signed URLs --------------------------------------------------------------------

    def upload_url(
        self,
        key: str,
        expires: int = 900,
        max_size: int | None = None,
        content_type: str = "application/octet-stream",
        sha256: str | None = None,
    ) -> SignedRequest:
        if max_size is not None and (not isinstance(max_size, int) or max_size < 0):
            raise ValidationError(f"max_size must be a non-negative int, not {max_size!r}")
        url = self._signed_url("put", key, expires, max_size, check_sha256(sha256))
        return SignedRequest(url=url, method="PUT", headers={"Content-Type": content_type})

    def download_url(self, key: str, expires: int = 900) -> SignedRequest:
        return SignedRequest(url=self._signed_url("get", key, expires, None, None), method="GET", headers={})

    def routes(self) -> list[Route]:
        """The endpoints the signed URLs point to; mount them at the root of the gateway's app."""
        path = ROUTE_PREFIX + "/{key:path}"
        return [
            Route(path, self._put_endpoint, methods=["PUT"], name="store_put"),
            Route(path, self._get_endpoint, methods=["GET"], name="store_get"),  # HEAD too
        ]

    # -- internals ----------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        parts = validate_key(key).split("/")
        if any(part.startswith(TMP_PREFIX) for part in parts):
            raise ValidationError(f"bad object key {shorten(key)!r}: parts must not start with {TMP_PREFIX!r}", key=key)
        return self.root.joinpath(*parts)

    def _write(self, key: str, fill: Callable[[BinaryIO], object]) -> None:
        path = self._path(key)
        with _disk_errors("write", key):
            for attempt in range(3):
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    _atomic_write(path, fill)
                    return
                except FileNotFoundError:  # a concurrent delete pruned the folder: redo it
                    if attempt == 2:
                        raise

    def _prune(self, folder: Path) -> None:
        """Remove empty folders left by a delete, up to (not including) the root."""
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return  # not empty (or gone): stop
            folder = folder.parent

    def _walk(self, folder: Path, rel: str, prefix: str) -> Iterator[str]:
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as e:
            raise StorageError(f"local store: cannot list {folder}: {e.strerror}") from e
        # Sorting folders as "name/" yields keys in plain string order, the order S3 lists in.
        dirs = {e.name for e in entries if e.is_dir(follow_symlinks=False)}
        for entry in sorted(entries, key=lambda e: e.name + "/" if e.name in dirs else e.name):
            if entry.name.startswith(TMP_PREFIX):
                continue
            key = rel + entry.name
            if entry.name in dirs:
                sub = key + "/"
                if sub.startswith(prefix) or prefix.startswith(sub):
                    yield from self._walk(Path(entry.path), sub, prefix)
            elif entry.is_file(follow_symlinks=False) and key.startswith(prefix):
                yield key

    def _signature(self, op: str, key: str, exp: int, max_size: int | None, sha256: str | None) -> str:
        message = f"{op}\n{key}\n{exp}\n{'' if max_size is None else max_size}"
        if sha256 is not None:  # URLs without one keep the signature they always had
            message += f"\n{sha256}"
        return hmac.new(self._secret, message.encode(), hashlib.sha256).hexdigest()

    def _signed_url(self, op: str, key: str, expires: int, max_size: int | None, sha256: str | None) -> str:
        self._path(key)
        exp = int(time.time()) + validate_expires(expires)
        params = {"op": op, "exp": str(exp)}
        if max_size is not None:
            params["max"] = str(max_size)
        if sha256 is not None:
            params["sha256"] = sha256
        params["sig"] = self._signature(op, key, exp, max_size, sha256)
        return f"{self.base_url}{ROUTE_PREFIX}/{quote(key, safe='/')}?{urlencode(params)}"

    def verify(self, op: str, key: str, query: QueryParams) -> tuple[int | None, str | None]:
        """Check a signed URL's query for ``op`` on ``key``; return its size limit and content digest
        (each None when unbound), or raise Forbidden."""
        fields = {}
        for name in ("op", "exp", "max", "sha256", "sig"):
            values = query.getlist(name)
            if len(values) > 1:
                raise Forbidden(f"the signed URL has more than one {name!r} parameter")
            fields[name] = values[0] if values else None
        if fields["op"] != op:
            raise Forbidden(f"the signed URL is not valid for this operation ({op})")
        exp, max_raw, sig = fields["exp"], fields["max"], fields["sig"]
        if not (exp and exp.isdigit() and sig and (max_raw is None or max_raw.isdigit())):
            raise Forbidden("the URL is not a well-formed signed URL (op, exp, sig and optional max)")
        max_size = None if max_raw is None else int(max_raw)
        if not hmac.compare_digest(sig, self._signature(op, key, int(exp), max_size, fields["sha256"])):
            raise Forbidden("invalid signature")
        if int(exp) < time.time():
            raise Forbidden("the signed URL has expired")
        return max_size, fields["sha256"]

    async def _put_endpoint(self, request: Request) -> Response:
        key = request.path_params["key"]
        try:
            max_size, sha256 = self.verify("put", key, request.query_params)
            path = self._path(key)
            declared = request.headers.get("content-length")
            if max_size is not None and declared and declared.isdigit() and int(declared) > max_size:
                raise PayloadTooLarge(f"the upload is larger than the {max_size} bytes allowed", max_size=max_size)
        except OpboxError as e:
            return _error(e)

        upload: _Upload | None = None
        writing = None  # the write in flight: the next chunks are read while the disk takes these
        receive_into = request.scope.get("extensions", {}).get(RECEIVE_INTO)  # the gateway's lean body path
        try:
            upload = await to_thread.run_sync(_Upload.begin, key, path)
            digest = hashlib.sha256() if sha256 is not None else None  # hashed only when the URL binds a content
            if receive_into is not None:  # a body of known length, from the socket to the file in one pass
                write = upload.write if digest is None else functools.partial(_hashed, digest, upload)
                size = await receive_into(write)
                return await self._commit(upload, key, size, sha256, digest)
            size, chunks, gathered = 0, [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if max_size is not None and size > max_size:
                    raise PayloadTooLarge(f"the upload is larger than the {max_size} bytes allowed", max_size=max_size)
                chunks.append(chunk)
                gathered += len(chunk)
                if digest is not None:
                    digest.update(chunk)
                if gathered >= _WRITE_BUFFER:
                    if writing is not None:
                        await writing
                    writing = asyncio.get_running_loop().run_in_executor(None, upload.writelines, chunks)
                    chunks, gathered = [], 0
            if writing is not None:
                await writing
            writing = None
            await to_thread.run_sync(upload.writelines, chunks)
            return await self._commit(upload, key, size, sha256, digest)
        except OpboxError as e:
            return _error(e)
        except (ClientDisconnect, ClientGone):
            return _error(BadRequest("the client disconnected before the upload was complete"))
        finally:
            if upload is not None:  # (no-op once committed)
                if writing is None:
                    upload.abort()
                else:  # a refused or broken upload: the temp file goes once its last write is out of its thread
                    writing.add_done_callback(functools.partial(_abandon, upload))

    @staticmethod
    async def _commit(upload: _Upload, key: str, size: int, sha256: str | None, digest) -> Response:
        if sha256 is not None and digest.hexdigest() != sha256:
            raise BadRequest(f"the upload's sha256 is {digest.hexdigest()}, not {sha256} as the signed URL "
                             "says: nothing was stored", key=key)
        await to_thread.run_sync(upload.commit)
        return JSONResponse({"key": key, "size": size})

    async def _get_endpoint(self, request: Request) -> Response:
        key = request.path_params["key"]
        try:
            self.verify("get", key, request.query_params)  # (a download binds no size nor digest)
            path = self._path(key)
            st = await to_thread.run_sync(os.stat, path)
        except OpboxError as e:
            return _error(e)
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            return _error(NotFound(f"object {shorten(key)!r} not found", key=key))
        return _FileResponse(path, stat_result=st, media_type="application/octet-stream")


class _FileResponse(FileResponse):
    chunk_size = 1024 * 1024  # large objects (payloads) go out in fewer, larger writes


class _Upload:
    """A temp file beside the target that becomes the object on ``commit``."""

    def __init__(self, key: str, path: Path, tmp: str, file: BinaryIO):
        self.key, self.path, self.tmp, self.file = key, path, tmp, file
        self.done = False

    @classmethod
    def begin(cls, key: str, path: Path) -> _Upload:
        with _disk_errors("write", key):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX)
        return cls(key, path, tmp, os.fdopen(fd, "wb"))

    def writelines(self, chunks: list[bytes]) -> None:
        with _disk_errors("write", self.key):
            self.file.writelines(chunks)

    def write(self, data: memoryview) -> None:
        with _disk_errors("write", self.key):
            self.file.write(data)

    def commit(self) -> None:
        with _disk_errors("write", self.key):
            _finish(self.file, self.tmp, self.path)
        self.done = True

    def abort(self) -> None:
        if not self.done:
            self.done = True
            with suppress(OSError):  # closing flushes: a full disk refuses the rest, which is dropped anyway
                self.file.close()
            with suppress(OSError):
                os.unlink(self.tmp)


def _hashed(digest, upload: _Upload, data: memoryview) -> None:
    digest.update(data)
    upload.write(data)


def _abandon(upload: _Upload, write: asyncio.Future) -> None:
    if not write.cancelled():
        write.exception()  # its failure (a full disk) is no news: the upload is refused anyway
    upload.abort()


def _atomic_write(path: Path, fill: Callable[[BinaryIO], object]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            _finish(f, tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def _finish(f: BinaryIO, tmp: str, path: Path) -> None:
    """Flush a temp file to disk and move it over ``path`` in one step."""
    f.flush()
    os.fsync(f.fileno())
    f.close()
    os.chmod(tmp, 0o644)  # mkstemp makes files private; objects are ordinary files
    os.replace(tmp, path)


@contextmanager
def _disk_errors(op: str, key: str) -> Iterator[None]:
    try:
        yield
    except (NotADirectoryError, IsADirectoryError, FileExistsError) as e:
        raise Conflict(
            f"cannot {op} {shorten(key)!r}: it clashes with an existing object or folder of keys", key=key
        ) from e
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(f"local store: cannot {op} {shorten(key)!r}: no space left on the store's disk; "
                              "nothing was stored", key=key) from e
        raise StorageError(f"local store: cannot {op} {shorten(key)!r}: {e.strerror or e}", key=key) from e


def _error(error: OpboxError) -> JSONResponse:
    return JSONResponse(error.to_dict(), status_code=error.status)
