"""``opbox.File`` and ``opbox.Dir``: a local file or folder passed to a run by its content hash, never pickled.

    @operator()
    def rows(table: opbox.File) -> int:
        return len(table.path.read_bytes().splitlines())    # a local, read-only path in the run

    rows_remote(opbox.File("data.csv"))

When a call's arguments are pickled, each File is hashed (SHA-256) and uploaded to the object store
once, with a signed URL (``POST /{ws}/files``; skipped when the store has that hash already); only its
hash, name and size travel in the arguments. In the run, ``.path`` is a local copy, fetched on first
use and cached by hash on the worker (read-only, so runs sharing it cannot change it). A Dir travels
as a deterministic tar of the folder and is unpacked once per hash. A File (or Dir) made in the run
and returned comes back the same way: ``.read_bytes()``, ``.download(dest)`` or ``.path`` fetch it.

Who moves the bytes is a ``Transfer``: the SDK's (its client) around a call's pickling and decoding,
or the runtime's (its gateway channel), which the runtime installs for the process.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path
from typing import Protocol

from .errors import OpboxError, ValidationError

CHUNK = 1024 * 1024


class Transfer(Protocol):
    def ensure(self, kind: str, sha256: str, size: int, source: Path) -> None:
        """Upload ``source`` as the stored file ``sha256`` unless the store has it."""

    def fetch(self, sha256: str, dest: Path) -> None:
        """Download the stored file ``sha256`` into ``dest`` (replaced only once complete)."""


_current: contextvars.ContextVar[Transfer | None] = contextvars.ContextVar("opbox_transfer", default=None)
_process: list[Transfer] = []  # the runtime's, for the whole process


@contextlib.contextmanager
def using(transfer: Transfer):
    """Files pickled or unpickled inside go through ``transfer``."""
    token = _current.set(transfer)
    try:
        yield
    finally:
        _current.reset(token)


def install(transfer: Transfer) -> None:
    """The runtime's transfer, for every File of this process."""
    _process[:] = [transfer]


def current() -> Transfer | None:
    return _current.get() or (_process[0] if _process else None)


def cache_dir() -> Path:
    """Where stored files are kept on this machine, by hash (``OPBOX_FILE_CACHE``)."""
    raw = os.environ.get("OPBOX_FILE_CACHE")
    return Path(raw) if raw else Path(tempfile.gettempdir()) / f"opbox-files-{os.getuid()}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class File:
    """A local file, passed to a run by content hash (see the module doc)."""

    kind = "file"

    def __init__(self, path: str | os.PathLike[str]):
        local = Path(path).expanduser().resolve()
        self._check(local)
        self.name = local.name
        self._local: Path | None = local
        self._origin = True  # made from a local path here (not unpickled): uploaded when it travels
        self._sha256: str | None = None
        self._stamp: tuple | None = None  # the file's (mtime, size) when it was hashed
        self._transfer: Transfer | None = None
        self.size: int | None = None

    def _check(self, local: Path) -> None:
        if not local.is_file():
            raise ValidationError(f"opbox.File needs an existing file, not {str(local)!r}")

    def __repr__(self) -> str:
        where = str(self._local) if self._local is not None else f"sha256:{self._sha256[:12]}"
        return f"{type(self).__name__}({self.name!r}, {where})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def sha256(self) -> str:
        if self._origin:
            self._pack()
        return self._sha256

    def _pack(self) -> Path:
        """The bytes that travel (the file itself); sets the hash and size (again when the file changed)."""
        st = self._local.stat()
        if self._stamp != (st.st_mtime_ns, st.st_size):
            self._sha256, self.size, self._stamp = sha256_of(self._local), st.st_size, (st.st_mtime_ns, st.st_size)
        return self._local

    @property
    def path(self) -> Path:
        """A local path to the file: the original where it was made, else a read-only copy fetched once."""
        if self._local is None:
            self._local = self._materialize()
        return self._local

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()

    def open(self, mode: str = "rb"):
        if any(c in mode for c in "wax+"):
            raise ValidationError("an opbox.File is read-only")
        return open(self.path, mode)

    def download(self, dest: str | os.PathLike[str]) -> Path:
        """A copy of the file (a Dir: of the folder) at ``dest``."""
        dest = Path(dest)
        copy = shutil.copytree if self.kind == "dir" else shutil.copyfile
        copy(self.path, dest)
        return dest

    # -- travelling by hash --------------------------------------------------------------
    def __reduce__(self):
        transfer = current()
        if transfer is None:
            raise OpboxError(f"{self!r} travels only as an argument or a result of a remote call")
        if self._origin:  # a local file: the store gets its content, once per hash
            source = self._pack()
            transfer.ensure(self.kind, self._sha256, self.size, source)
        return _stored, (self.kind, self._sha256, self.name, self.size)

    def _materialize(self) -> Path:
        transfer = self._transfer or current()
        if transfer is None:
            raise OpboxError(f"{self!r} cannot be fetched here: no opbox client or runtime to fetch it with")
        folder = cache_dir() / self._sha256
        target = folder / self.name
        if not target.exists():
            folder.mkdir(parents=True, exist_ok=True)
            transfer.fetch(self._sha256, target)
            os.chmod(target, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        return target


class Dir(File):
    """A local folder, passed to a run by content hash: it travels as a deterministic tar of its files."""

    kind = "dir"

    def _check(self, local: Path) -> None:
        if not local.is_dir():
            raise ValidationError(f"opbox.Dir needs an existing folder, not {str(local)!r}")

    def _pack(self) -> Path:
        packed = _tar(self._local)  # a folder has no one stamp to trust: packed each time it travels
        try:
            self._sha256, self.size = sha256_of(packed), packed.stat().st_size
        except BaseException:
            packed.unlink()
            raise
        self.__del__()  # the tar of an earlier trip
        self._packed = packed  # the upload reads it; removed when the Dir goes (or travels again)
        return packed

    def __del__(self):
        packed = getattr(self, "_packed", None)
        if packed is not None:
            with contextlib.suppress(OSError):
                packed.unlink()

    def _materialize(self) -> Path:
        target = cache_dir() / f"{self._sha256}.d" / self.name
        if target.exists():
            return target
        archive = File._materialize(self)  # the tar, cached by hash
        unpacking = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".unpacking-"))
        with tarfile.open(archive) as tar:
            tar.extractall(unpacking / self.name, filter="data")
        for root, _, names in os.walk(unpacking):
            for name in names:
                os.chmod(os.path.join(root, name), stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(unpacking / self.name, target)
        except OSError:  # another run unpacked it first
            shutil.rmtree(unpacking, ignore_errors=True)
        return target


def _stored(kind: str, sha256: str, name: str, size: int) -> File:
    """A File (or Dir) known by hash, as unpickled: fetched on first use."""
    obj = object.__new__(Dir if kind == "dir" else File)
    obj.name, obj.size, obj._sha256, obj._local, obj._transfer = name, size, sha256, None, current()
    obj._origin, obj._stamp = False, None
    return obj


def _tar(folder: Path) -> Path:
    """The folder's regular files as a tar with fixed owners and times, in name order: one hash per content."""
    fd, name = tempfile.mkstemp(prefix="opbox-dir-", suffix=".tar")
    os.close(fd)
    with tarfile.open(name, "w", format=tarfile.PAX_FORMAT) as tar:
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            for file in sorted(files):
                path = Path(root, file)
                if not path.is_file():
                    continue
                info = tarfile.TarInfo(str(path.relative_to(folder)))
                info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
                with open(path, "rb") as f:
                    tar.addfile(info, f)
    return Path(name)
