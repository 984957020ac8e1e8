"""Pack a code folder into a deterministic zip (client side, used by ``deploy()``).

The same folder content always gives the same bytes, so ``PackedCode.sha256`` is a
content hash the platform can use to deduplicate uploads and builds. Only stdlib and
``pathspec`` are imported here: the SDK loads this module.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pathspec

from opbox.errors import PackagingError

log = logging.getLogger(__name__)

IGNORE_FILE = ".opboxignore"
REQUIREMENTS_FILE = "requirements.txt"
DEFAULT_IGNORES: tuple[str, ...] = (
    ".git/", ".hg/", ".svn/", "__pycache__/", "*.pyc", ".venv/", "venv/", "env/", ".env", ".env/",
    "node_modules/", ".mypy_cache/", ".pytest_cache/", ".ipynb_checkpoints/", ".DS_Store",
    "*.egg-info/",
)
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip header can hold
_CHUNK = 1024 * 1024
_BAD_NAME_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")
_COMMENT = re.compile(r"(^|\s)#.*$")  # pip's rule: '#' at line start or after whitespace


@dataclass(frozen=True)
class PackedCode:
    data: bytes  # the zip archive
    sha256: str  # hex sha256 of ``data``: a content hash
    files: int
    uncompressed_bytes: int
    requirements_sha256: str  # hex sha256 of the normalized requirements.txt ("" if absent)


def load_ignore_spec(folder: Path, extra_ignores: Iterable[str] = ()) -> pathspec.PathSpec:
    """Defaults, then ``extra_ignores``, then ``.opboxignore`` (last, so ``!x`` re-includes)."""
    lines = [*DEFAULT_IGNORES, *extra_ignores]
    ignore_file = Path(folder) / IGNORE_FILE
    if ignore_file.is_file():
        try:
            lines += ignore_file.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise PackagingError(f"cannot read {ignore_file}: {exc}", path=str(ignore_file)) from exc
    return pathspec.GitIgnoreSpec.from_lines(lines)


def iter_included_files(folder: Path, *, extra_ignores: Iterable[str] = ()) -> Iterator[tuple[str, Path]]:
    """Yield ``(archive name, path)`` for every file to pack, sorted by archive name.

    Directory symlinks are never followed. A symlink to a file inside the folder is
    yielded (its target's content gets packed); links leaving the folder, links to
    directories, broken links and special files (fifos, sockets, devices) are skipped
    with a warning.
    """
    root = Path(folder)
    if not root.is_dir():
        raise PackagingError(f"code folder {root} does not exist or is not a folder", path=str(root))
    root_real = os.path.realpath(root)
    spec = load_ignore_spec(root, extra_ignores)
    found: list[tuple[str, Path]] = []
    pending: list[tuple[str, str]] = [("", str(root))]  # (archive prefix, directory)
    while pending:
        prefix, directory = pending.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError as exc:
            raise PackagingError(f"cannot read folder {directory}: {exc.strerror or exc}",
                                 path=directory) from exc
        for entry in entries:
            name = prefix + entry.name
            try:
                if entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    if os.path.isdir(target):
                        if not spec.match_file(name + "/"):
                            log.warning("opbox: skipping %s: symlink to a directory (not followed)", name)
                        continue
                    if spec.match_file(name):
                        continue
                    if os.path.commonpath([target, root_real]) != root_real:
                        log.warning("opbox: skipping %s: symlink points outside %s", name, root)
                    elif not os.path.isfile(target):
                        log.warning("opbox: skipping %s: broken symlink or not a regular file", name)
                    else:
                        found.append((name, Path(entry.path)))
                elif entry.is_dir(follow_symlinks=False):
                    if not spec.match_file(name + "/"):
                        pending.append((name + "/", entry.path))
                elif not spec.match_file(name):
                    if entry.is_file(follow_symlinks=False):
                        found.append((name, Path(entry.path)))
                    else:
                        log.warning("opbox: skipping %s: not a regular file", name)
            except OSError as exc:
                raise PackagingError(f"cannot read {entry.path}: {exc.strerror or exc}",
                                     path=entry.path) from exc
    found.sort()
    for name, path in found:
        _check_name(name)
        yield name, path


def pack_folder(folder: Path, *, max_bytes: int = 100 * 1024**2,
                extra_ignores: Iterable[str] = ()) -> PackedCode:
    """Zip the included files of ``folder`` deterministically (see module doc)."""
    files: list[tuple[str, Path, int, int]] = []  # (name, path, size, mode)
    for name, path in iter_included_files(folder, extra_ignores=extra_ignores):
        try:
            st = os.stat(path)  # follows an inside-symlink to its target
        except OSError as exc:
            raise PackagingError(f"cannot read {name}: {exc.strerror or exc}", path=str(path)) from exc
        files.append((name, path, st.st_size, st.st_mode))
    total = sum(size for _, _, size, _ in files)
    if total > max_bytes:
        raise _too_big(Path(folder), total, max_bytes, [(n, s) for n, _, s, _ in files])

    buf = io.BytesIO()
    written = 0
    requirements = b""
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, path, size, mode in files:
            try:
                with open(path, "rb") as src, zf.open(_zip_info(name, size, mode), "w") as dst:
                    while chunk := src.read(_CHUNK):
                        dst.write(chunk)
                        written += len(chunk)
                        if name == REQUIREMENTS_FILE:
                            requirements += chunk
            except OSError as exc:
                raise PackagingError(f"cannot read {name}: {exc.strerror or exc}", path=str(path)) from exc
    if written > max_bytes:  # files grew while we were packing
        raise _too_big(Path(folder), written, max_bytes, [(n, s) for n, _, s, _ in files])
    data = buf.getvalue()
    return PackedCode(
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        files=len(files),
        uncompressed_bytes=written,
        requirements_sha256=requirements_hash(requirements.decode("utf-8-sig", errors="replace")),
    )


def project_requirements(folder: Path) -> tuple[str, str]:
    """A project's requirements and where they came from: ``requirements.txt`` at its root, else
    ``pyproject.toml``'s ``[project] dependencies`` (one a line), else none (``("", "")``)."""
    folder = Path(folder)
    req = folder / REQUIREMENTS_FILE
    if req.is_file():
        return req.read_text(encoding="utf-8-sig", errors="replace"), REQUIREMENTS_FILE
    pyproject = folder / "pyproject.toml"
    if not pyproject.is_file():
        return "", ""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PackagingError(f"cannot read pyproject.toml: {exc}", path=str(pyproject)) from exc
    deps = (data.get("project") or {}).get("dependencies") or []
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        raise PackagingError("pyproject.toml: [project] dependencies must be a list of strings", path=str(pyproject))
    return ("\n".join(deps) + "\n" if deps else ""), "pyproject.toml [project] dependencies"


def normalize_requirements(text: str) -> str:
    """Drop comments, blank lines and surrounding spaces: cosmetic edits keep the hash."""
    lines = (_COMMENT.sub("", line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def requirements_hash(text: str) -> str:
    return hashlib.sha256(normalize_requirements(text).encode("utf-8")).hexdigest()


def _zip_info(name: str, size: int, mode: int) -> zipfile.ZipInfo:
    """A header with nothing machine- or time-dependent in it."""
    info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3  # Unix, so external_attr carries the mode
    perm = 0o755 if mode & 0o111 else 0o644
    info.external_attr = (stat.S_IFREG | perm) << 16
    info.file_size = size  # lets zipfile pick zip64 up front
    return info


def _check_name(name: str) -> None:
    """Refuse names the builder would reject, with a clearer message than its own."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise PackagingError(f"file name {name!r} is not valid UTF-8: rename it or list it "
                             f"in {IGNORE_FILE}", path=name) from None
    if _BAD_NAME_CHARS.search(name):
        raise PackagingError(f"file name {name!r} contains a backslash or control character: "
                             f"rename it or list it in {IGNORE_FILE}", path=name)


def _too_big(folder: Path, total: int, limit: int, files: list[tuple[str, int]]) -> PackagingError:
    largest = sorted(files, key=lambda f: (-f[1], f[0]))[:5]
    listing = "\n".join(f"  {_human(size):>10}  {name}" for name, size in largest)
    top = largest[0][0] if largest else "data/"
    hint = top.split("/")[0] + "/" if "/" in top else top  # the biggest file's top folder
    return PackagingError(
        f"code folder {folder} holds {_human(total)} of files, above the {_human(limit)} limit.\n"
        f"Largest files:\n{listing}\n"
        f"Leave out what the function does not need by listing it in {folder / IGNORE_FILE} "
        f"(gitignore syntax, e.g. '{hint}').",
        size=total, limit=limit, largest=[{"name": n, "size": s} for n, s in largest],
    )


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
