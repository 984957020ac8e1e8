"""Extract an uploaded code archive safely (platform side, stdlib only).

Every entry is checked before anything is written (names, types, duplicates, declared
sizes), then each entry is streamed with its real byte count checked against the
declared size and the limits. Extraction happens in a temp folder beside ``dest`` that
is renamed into place at the end, so a rejected archive leaves nothing behind.
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
import re
import shutil
import stat
import struct
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NoReturn, Union

from opbox.errors import Conflict, UnsafeArchiveError, ValidationError

Source = Union[bytes, bytearray, memoryview, str, os.PathLike]

_MIB = 1024**2
_CHUNK = _MIB
_RATIO_MIN_SIZE = _MIB  # the ratio rule only applies to entries larger than this
_LOCAL_HEADER_SIZE = 30
_FLAG_ENCRYPTED = 0x1
_FLAG_STRONG_ENCRYPTION = 0x40
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_HASH = re.compile(r"[0-9a-f]{8,128}")
_SPECIAL_KINDS = {
    stat.S_IFLNK: "a symbolic link", stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device", stat.S_IFIFO: "a fifo", stat.S_IFSOCK: "a socket",
}


@dataclass(frozen=True)
class ExtractLimits:
    max_files: int = 20_000  # entries, directories included
    max_total_bytes: int = 1024**3
    max_file_bytes: int = 512 * _MIB
    max_ratio: int = 200  # uncompressed / compressed, for entries above 1 MiB
    max_name_length: int = 1024
    max_depth: int = 64


@dataclass(frozen=True)
class ExtractReport:
    files: int
    bytes: int


@dataclass(frozen=True)
class _Entry:
    info: zipfile.ZipInfo
    parts: tuple[str, ...]
    is_dir: bool
    mode: int


def safe_extract(src: Source, dest: Path, *, limits: ExtractLimits = ExtractLimits()) -> ExtractReport:
    """Extract the zip ``src`` (bytes or a path) into ``dest``, which must not exist yet.

    Raises ``UnsafeArchiveError`` (with ``details['entry']`` and ``details['rule']``) and
    leaves nothing behind if any entry breaks a rule; ``Conflict`` if ``dest`` exists.
    """
    dest = Path(dest)
    if os.path.lexists(dest):
        raise Conflict(f"extraction target {dest} already exists", path=str(dest))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        report = _extract_into(src, tmp, limits)
        if os.path.lexists(dest):
            raise Conflict(f"extraction target {dest} appeared while extracting", path=str(dest))
        try:
            os.rename(tmp, dest)
        except OSError as exc:
            if os.path.lexists(dest):
                raise Conflict(f"extraction target {dest} already exists", path=str(dest)) from exc
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def extract_to_content_dir(src: Source, root: Path, content_hash: str, *,
                           limits: ExtractLimits = ExtractLimits(), verify: bool = True) -> Path:
    """Extract into ``root/<hash[:2]>/<hash>`` once; later and concurrent calls reuse it.

    With ``verify`` (the default) ``content_hash`` must be the sha256 of the archive
    bytes, so one upload can never fill the folder another hash names.
    """
    if not _HASH.fullmatch(content_hash or ""):
        raise ValidationError(f"bad content hash {content_hash!r}: expected 8-128 lowercase hex digits")
    final = Path(root) / content_hash[:2] / content_hash
    if final.is_dir():
        return final
    if verify and (actual := _sha256(src)) != content_hash:
        raise UnsafeArchiveError(f"archive sha256 {actual} does not match the content hash {content_hash}",
                                 rule="hash_mismatch")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{content_hash}.", suffix=".partial", dir=final.parent))
    try:
        _extract_into(src, tmp, limits)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another extractor won the race
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            final.parent.rmdir()  # the shard folder, if this left it empty
        except OSError:
            pass
        raise
    return final


# -- the two phases ---------------------------------------------------------------------


def _extract_into(src: Source, tmp: Path, limits: ExtractLimits) -> ExtractReport:
    """Check every entry, then write them under the (empty, private) folder ``tmp``."""
    try:
        with _open_zip(src) as zf:
            entries = _plan(zf, limits)
            report = _write(zf, entries, tmp, limits)
    except UnsafeArchiveError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError,
            ValueError, struct.error, OverflowError) as exc:
        raise UnsafeArchiveError(f"unsafe archive: not a valid zip file or corrupt ({exc})",
                                 rule="corrupt") from exc
    os.chmod(tmp, 0o755)  # mkdtemp made it 0o700
    return report


def _plan(zf: zipfile.ZipFile, limits: ExtractLimits) -> list[_Entry]:
    infos = zf.infolist()
    if len(infos) > limits.max_files:
        _reject(None, "too_many_files", f"archive has {len(infos)} entries, above the limit of {limits.max_files}")
    kinds: dict[tuple[str, ...], str] = {}  # path -> "file" | "dir" | "implied" (a parent of an entry)
    entries: list[_Entry] = []
    total = 0
    for info in infos:
        name = info.orig_filename  # before zipfile cuts it at a NUL
        parts = _check_name(name, limits)
        if info.flag_bits & (_FLAG_ENCRYPTED | _FLAG_STRONG_ENCRYPTION):
            _reject(name, "encrypted", "encrypted entries are not supported")
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if kind in _SPECIAL_KINDS or kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            what = _SPECIAL_KINDS.get(kind, f"an unknown file type (mode {mode:o})")
            _reject(name, "symlink" if kind == stat.S_IFLNK else "special_file",
                    f"is {what}; only regular files and directories are allowed")
        is_dir = name.endswith("/") or kind == stat.S_IFDIR
        if is_dir and info.file_size:
            _reject(name, "special_file", "a directory entry must not carry data")
        for i in range(1, len(parts)):
            parent = kinds.setdefault(parts[:i], "implied")
            if parent == "file":
                _reject(name, "file_dir_clash", f"its parent {'/'.join(parts[:i])!r} is also a file")
        seen = kinds.get(parts)
        if seen == ("dir" if is_dir else "file"):
            _reject(name, "duplicate", f"{'/'.join(parts)!r} appears more than once")
        if seen is not None and not (is_dir and seen == "implied"):
            _reject(name, "file_dir_clash", f"{'/'.join(parts)!r} is both a file and a directory")
        kinds[parts] = "dir" if is_dir else "file"
        if info.file_size > limits.max_file_bytes:
            _reject(name, "file_too_large",
                    f"declares {info.file_size} bytes, above the per-file limit of {limits.max_file_bytes}")
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > _RATIO_MIN_SIZE and ratio > limits.max_ratio:
            _reject(name, "ratio", f"compression ratio {ratio:.0f}:1 is above the limit of {limits.max_ratio}:1")
        total += info.file_size
        if total > limits.max_total_bytes:
            _reject(name, "total_too_large",
                    f"archive declares more than {limits.max_total_bytes} bytes in total")
        entries.append(_Entry(info, parts, is_dir, 0o755 if is_dir or mode & 0o111 else 0o644))
    _check_overlap(zf, infos)
    return entries


def _write(zf: zipfile.ZipFile, entries: list[_Entry], tmp: Path, limits: ExtractLimits) -> ExtractReport:
    made: set[tuple[str, ...]] = set()
    files = total = 0
    for entry in entries:
        dirs = entry.parts if entry.is_dir else entry.parts[:-1]
        for i in range(1, len(dirs) + 1):
            if dirs[:i] not in made:
                path = tmp.joinpath(*dirs[:i])
                os.mkdir(path)
                os.chmod(path, 0o755)  # regardless of umask, never setgid
                made.add(dirs[:i])
        if entry.is_dir:
            continue
        total += _write_file(zf, entry, tmp.joinpath(*entry.parts), limits, total)
        files += 1
    return ExtractReport(files=files, bytes=total)


def _write_file(zf: zipfile.ZipFile, entry: _Entry, path: Path, limits: ExtractLimits, total: int) -> int:
    """Stream one entry to ``path``; return the bytes written.

    zipfile stops at the declared size (and checks the CRC there), so we let it read one
    chunk further: data inflating past its declaration is caught by our own count, with
    a clear message, instead of being silently truncated or reported as a bad CRC.
    """
    info = entry.info
    probe = copy.copy(info)
    probe.file_size = info.file_size + _CHUNK + 1  # each read() returns at most _CHUNK bytes
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    count = 0
    with zf.open(probe) as src, os.fdopen(os.open(path, flags, 0o600), "wb") as dst:
        while chunk := src.read(_CHUNK):
            count += len(chunk)
            if count > info.file_size:
                _reject(info.orig_filename, "size_mismatch",
                        f"data expands beyond its declared size of {info.file_size} bytes (possible zip bomb)")
            if count > limits.max_file_bytes:  # belt and braces: declared sizes were checked already
                _reject(info.orig_filename, "file_too_large", f"data exceeds {limits.max_file_bytes} bytes")
            if total + count > limits.max_total_bytes:
                _reject(info.orig_filename, "total_too_large", f"archive data exceeds {limits.max_total_bytes} bytes")
            dst.write(chunk)
        os.fchmod(dst.fileno(), entry.mode)
    if count != info.file_size:
        _reject(info.orig_filename, "size_mismatch",
                f"holds {count} bytes but declares {info.file_size}")
    return count


# -- rules ------------------------------------------------------------------------------


def _check_name(name: str, limits: ExtractLimits) -> tuple[str, ...]:
    """Return the normalized path components of a safe entry name (``./`` and ``//`` dropped)."""
    if not name:
        _reject(name, "empty_name", "empty file name")
    if len(name) > limits.max_name_length:
        _reject(name[:80] + "...", "name_too_long",
                f"name is {len(name)} characters long, above the limit of {limits.max_name_length}")
    if _CONTROL.search(name):
        _reject(name, "control_character", "name contains a NUL or control character")
    if "\\" in name:
        _reject(name, "backslash", "name contains a backslash")
    if name.startswith("/"):
        _reject(name, "absolute_path", "absolute paths are not allowed")
    if _DRIVE.match(name):
        _reject(name, "drive_letter", "drive letters are not allowed")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        _reject(name, "parent_reference", "'..' components are not allowed (path traversal)")
    if not parts:
        _reject(name, "empty_name", "name is empty once normalized")
    if len(parts) > limits.max_depth:
        _reject(name, "too_deep", f"{len(parts)} levels deep, above the limit of {limits.max_depth}")
    return parts


def _check_overlap(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo]) -> None:
    """Entries whose data overlap (a classic non-recursive zip bomb) are rejected."""
    ordered = sorted(infos, key=lambda i: i.header_offset)
    ends = [i.header_offset for i in ordered[1:]] + [getattr(zf, "start_dir", None)]
    for info, next_start in zip(ordered, ends):
        if next_start is not None and info.header_offset + _LOCAL_HEADER_SIZE + info.compress_size > next_start:
            _reject(info.orig_filename, "overlap", "its data overlaps another entry or the central directory")


def _reject(entry: str | None, rule: str, why: str) -> NoReturn:
    where = f"entry {entry!r}: " if entry is not None else ""
    raise UnsafeArchiveError(f"unsafe archive: {where}{why}", entry=entry, rule=rule)


# -- io ---------------------------------------------------------------------------------


def _open_zip(src: Source) -> zipfile.ZipFile:
    fileobj: BinaryIO | str | os.PathLike
    fileobj = io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray, memoryview)) else src
    return zipfile.ZipFile(fileobj)


def _sha256(src: Source) -> str:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return hashlib.sha256(src).hexdigest()
    digest = hashlib.sha256()
    with open(src, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
