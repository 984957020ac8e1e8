"""Wheels for a job image, fetched on the host (which has the network) before the build.

The build steps of a job image have no network (``podman build --network=none``): every
package they install comes from a wheelhouse that this module fills beforehand:

* ``requirement_wheels(requirements)``: the wheels a job's requirements file resolves to,
  for the image's Python version and platform, cached under ``<cache>/requirements/<key>/``
  where the key is the requirements hash (plus Python version and platform). Unchanged
  requirements are never downloaded twice, so a version that only changes code reuses them.
* ``runtime_wheels()``: opbox's own wheel (built from the source tree this module belongs
  to) plus its dependencies and those of its ``serve`` extra (httpx, cloudpickle,
  uvicorn[standard], ... as the wheel's metadata says: ``RUNTIME_EXTRAS``), cached under
  ``<cache>/runtime/<source hash>/`` and ``<cache>/runtime-deps/<dependency hash>/``.

Downloads first ask pip for binary wheels of the image's exact tags
(``--only-binary=:all: --python-version X.Y --implementation cp --platform manylinux_2_N_x86_64``
for every glibc level the base image supports); when that fails and this host's Python is
the image's Python version, ``pip wheel`` is tried, which also builds sdist-only packages.
pip is taken from this interpreter when it has it, else run through ``uv tool run``, else
from ``python3 -m pip`` on the PATH.
"""

from __future__ import annotations

import contextlib
import email.parser
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from opbox.errors import BuildError, ConfigError

Log = Callable[[str], None]

#: Python of the base image (Debian bookworm's python3) and its glibc (2.36)
DEFAULT_PYTHON_VERSION = "3.11"
RUNTIME_EXTRAS = ("serve",)  # what a job image installs: opbox[serve] (served classes need uvicorn)
DEFAULT_GLIBC = (2, 36)
DEFAULT_ARCH = "x86_64"

_SKIP_NAMES = {"__pycache__", ".git", ".hg", ".svn", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
_SKIP_SUFFIXES = (".pyc", ".pyo")


def _quiet(_line: str) -> None:
    pass


# --- hashing --------------------------------------------------------------------------------


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def requirements_hash(requirements: Path | None) -> str:
    """Hash of a requirements file; line endings and trailing blanks do not count.

    ``None`` (no requirements) hashes like an empty file.
    """
    text = "" if requirements is None else Path(requirements).read_text(encoding="utf-8")
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return sha256_text("\n".join(lines).strip("\n") + "\n")


def _file_sha256(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.digest()


def skip_path(name: str) -> bool:
    return name in _SKIP_NAMES or name.endswith(_SKIP_SUFFIXES)


def iter_tree(root: Path) -> Iterable[tuple[str, Path]]:
    """``(relative posix path, path)`` of every file under ``root``, sorted; symlinks are
    followed, caches (``__pycache__``, ``*.pyc``, VCS folders) left out."""
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not skip_path(d))
        for name in sorted(filenames):
            if skip_path(name):
                continue
            path = Path(dirpath) / name
            if path.is_file():
                yield path.relative_to(root).as_posix(), path


def tree_hash(root: Path) -> str:
    """Content hash of a folder: relative paths, executable bits and file contents."""
    digest = hashlib.sha256()
    for rel, path in sorted(iter_tree(root)):
        digest.update(rel.encode() + b"\0")
        digest.update(b"x" if os.access(path, os.X_OK) else b"-")
        digest.update(_file_sha256(path) + b"\0")
    return digest.hexdigest()


# --- pip -----------------------------------------------------------------------------------


def pip_command(python_version: str | None = None) -> list[str]:
    """A command line that runs pip (under Python ``python_version`` when given)."""
    here = "%d.%d" % sys.version_info[:2]
    if (python_version in (None, here)) and importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    uv = shutil.which("uv")
    if uv:
        return [uv, "tool", "run", "--quiet", *(["--python", python_version] if python_version else []),
                "--from", "pip", "pip"]
    for name in ([f"python{python_version}"] if python_version else []) + ["python3"]:
        exe = shutil.which(name)
        if exe and subprocess.run([exe, "-m", "pip", "--version"], capture_output=True).returncode == 0:
            if python_version and name == "python3":
                probe = subprocess.run([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                       capture_output=True, text=True)
                if probe.stdout.strip() != python_version:
                    continue
            return [exe, "-m", "pip"]
    raise ConfigError("no pip found to fetch wheels: install pip in opbox's environment or put uv on the PATH")


def run_logged(cmd: Sequence[str], log: Log, *, cwd: Path | None = None, env: dict | None = None) -> tuple[int, str]:
    """Run ``cmd``, handing each output line (stdout and stderr together) to ``log`` as it comes."""
    lines: list[str] = []
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace", bufsize=1)
    assert proc.stdout is not None
    with proc:
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            log(line)
    return proc.returncode, "\n".join(lines) + ("\n" if lines else "")


def manylinux_platforms(glibc: tuple[int, int] = DEFAULT_GLIBC, arch: str = DEFAULT_ARCH) -> list[str]:
    """Every manylinux tag a system with this glibc runs, newest first (pip needs them listed)."""
    major, minor = glibc
    tags = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    for m, name in legacy.items():
        if minor >= m:
            tags.append(f"{name}_{arch}")
    return tags


@dataclass(frozen=True)
class RuntimeWheels:
    """opbox's wheel and its dependencies, in one folder."""

    path: Path
    wheel: Path
    version: str  # e.g. "0.1.0+src.1a2b3c4d5e6f": the package version and its source hash


class Wheelhouse:
    """A cache folder of wheels for job images of one Python version and platform.

    ``python_version``/``glibc``/``arch`` describe the base image (bookworm: 3.11, glibc
    2.36, x86_64). ``find_links``, ``index_url`` and ``no_index`` go to pip as they are
    (a private index, a folder of in-house wheels). opbox's own wheel is built from
    ``opbox_source`` (default: the source tree this module was imported from) unless
    ``opbox_wheel`` (or ``$OPBOX_RUNTIME_WHEEL``) names a ready one, as an installed
    (non-editable) platform needs.

    Cache entries are keyed by content (requirements hash + target; opbox's version +
    source hash), filled in a temporary folder and moved into place whole.
    """

    def __init__(
        self,
        cache_dir: Path,
        *,
        python_version: str = DEFAULT_PYTHON_VERSION,
        glibc: tuple[int, int] = DEFAULT_GLIBC,
        arch: str = DEFAULT_ARCH,
        find_links: Sequence[Path | str] = (),
        index_url: str | None = None,
        no_index: bool = False,
        opbox_source: Path | None = None,
        opbox_wheel: Path | None = None,
    ):
        if not re.fullmatch(r"\d+\.\d+", python_version):
            raise ConfigError(f"python_version must look like 3.11, not {python_version!r}")
        self.cache_dir = Path(cache_dir)
        self.python_version = python_version
        self.glibc = glibc
        self.arch = arch
        self.find_links = [str(link) for link in find_links]
        self.index_url = index_url
        self.no_index = no_index
        self.opbox_wheel = Path(opbox_wheel) if opbox_wheel else (
            Path(os.environ["OPBOX_RUNTIME_WHEEL"]) if os.environ.get("OPBOX_RUNTIME_WHEEL") else None)
        self.opbox_source = Path(opbox_source) if opbox_source else (None if self.opbox_wheel else find_opbox_source())

    # -- keys ----------------------------------------------------------------------------

    @property
    def target(self) -> str:
        return f"cp{self.python_version.replace('.', '')}-manylinux_{self.glibc[0]}_{self.glibc[1]}_{self.arch}"

    def requirements_key(self, requirements: Path | None) -> str:
        return sha256_text(f"{requirements_hash(requirements)}\n{self.target}")[:24]

    def runtime_version(self) -> str:
        """opbox's version plus a hash of the code it is built from: what goes in an image tag.

        Cheap (hashes the source tree, builds nothing), so a no-op build stays a no-op.
        """
        if self.opbox_source is None:
            assert self.opbox_wheel is not None
            with open(self.opbox_wheel, "rb") as handle:
                digest = hashlib.sha256(handle.read()).hexdigest()
            return f"{_wheel_version(self.opbox_wheel)}+whl.{digest[:12]}"
        return f"{_source_version(self.opbox_source)}+src.{opbox_source_hash(self.opbox_source)[:12]}"

    # -- requirements --------------------------------------------------------------------

    def requirement_wheels(self, requirements: Path | None, log: Log = _quiet) -> Path:
        """The folder of wheels ``requirements`` resolves to (downloaded once per hash)."""
        dest = self.cache_dir / "requirements" / self.requirements_key(requirements)
        if (dest / ".complete").exists():
            log(f"wheelhouse: requirements wheels cached in {dest}")
            return dest
        with self._staging(dest) as tmp:
            if requirements is not None and requirements_hash(requirements) != requirements_hash(None):
                self._fetch(["-r", str(Path(requirements).resolve())], tmp, log, what="requirements")
        return dest

    # -- opbox runtime -------------------------------------------------------------------

    def runtime_wheels(self, log: Log = _quiet) -> RuntimeWheels:
        """opbox's wheel and every wheel it needs, in one folder for the image's runtime layer."""
        version = self.runtime_version()
        dest = self.cache_dir / "runtime" / sha256_text(f"{version}\n{self.target}")[:24]
        if (dest / ".complete").exists():
            log(f"wheelhouse: opbox runtime wheels cached in {dest}")
            return RuntimeWheels(dest, next(dest.glob("opbox-*.whl")), version)
        with self._staging(dest) as tmp:
            wheel = self._opbox_wheel(tmp, log)
            deps = wheel_requirements(wheel) + wheel_requirements(wheel, RUNTIME_EXTRAS)
            deps_key = sha256_text("\n".join(sorted(deps)) + f"\n{self.target}")[:24]
            deps_dir = self.cache_dir / "runtime-deps" / deps_key
            if not (deps_dir / ".complete").exists():
                with self._staging(deps_dir) as deps_tmp:
                    req = deps_tmp / ".requirements.txt"
                    req.write_text("\n".join(deps) + "\n")
                    self._fetch(["-r", str(req)], deps_tmp, log, what="opbox's dependencies")
                    req.unlink()
            else:
                log(f"wheelhouse: opbox's dependencies cached in {deps_dir}")
            for whl in deps_dir.glob("*.whl"):
                _link_or_copy(whl, tmp / whl.name)
        return RuntimeWheels(dest, next(dest.glob("opbox-*.whl")), version)

    def _opbox_wheel(self, out: Path, log: Log) -> Path:
        if self.opbox_source is None:
            assert self.opbox_wheel is not None
            target = out / self.opbox_wheel.name
            shutil.copy2(self.opbox_wheel, target)
            return target
        return build_opbox_wheel(self.opbox_source, out, log)

    # -- plumbing ------------------------------------------------------------------------

    def _index_args(self) -> list[str]:
        args: list[str] = []
        if self.no_index:
            args.append("--no-index")
        elif self.index_url:
            args += ["--index-url", self.index_url]
        for link in self.find_links:
            args += ["--find-links", link]
        return args

    def _fetch(self, what_args: list[str], dest: Path, log: Log, *, what: str) -> None:
        """Binary wheels for the image's tags; else, when the host Python is the image's,
        ``pip wheel`` (builds sdist-only packages too)."""
        common = ["--disable-pip-version-check", "--no-input", "--progress-bar", "off"]
        download = [*pip_command(), "download", *common, "--dest", str(dest), "--only-binary=:all:",
                    "--python-version", self.python_version, "--implementation", "cp",
                    *[arg for p in manylinux_platforms(self.glibc, self.arch) for arg in ("--platform", p)],
                    *self._index_args(), *what_args]
        log(f"wheelhouse: fetching wheels for {what} ({self.target})")
        code, output = run_logged(download, log)
        if code == 0:
            return
        if sys.platform.startswith("linux") and os.uname().machine == self.arch:
            try:
                pip = pip_command(self.python_version)
            except ConfigError:
                pip = None
            if pip is not None:
                log(f"wheelhouse: no binary wheels for everything; trying pip wheel with Python {self.python_version}")
                wheel = [*pip, "wheel", *common, "--wheel-dir", str(dest), *self._index_args(), *what_args]
                code2, output2 = run_logged(wheel, log)
                if code2 == 0:
                    return
                output += "\n--- pip wheel ---\n" + output2
        raise BuildError(f"could not fetch the wheels for {what}", log=output)

    @staticmethod
    @contextlib.contextmanager
    def _staging(dest: Path) -> Iterator[Path]:
        """Fill a temporary folder beside ``dest``, then move it into place in one step, so a
        crash or a failed download never leaves a half-filled cache entry."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        (tmp / ".complete").write_text("")
        try:
            os.replace(tmp, dest)
        except OSError:  # another process filled it first (or a stale, incomplete one is there)
            if (dest / ".complete").exists():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                shutil.rmtree(dest, ignore_errors=True)
                os.replace(tmp, dest)


# --- opbox's own wheel ----------------------------------------------------------------------


def find_opbox_source() -> Path:
    """The source tree (folder with pyproject.toml) this opbox was imported from."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        pyproject = parent / "pyproject.toml"
        if pyproject.is_file() and re.search(r'(?m)^name\s*=\s*"opbox"', pyproject.read_text(encoding="utf-8")):
            return parent
    raise ConfigError(
        "opbox is not running from a source tree, so its wheel cannot be built for job images: "
        "set OPBOX_RUNTIME_WHEEL to an opbox wheel (or pass opbox_wheel=)")


def _source_files(source: Path) -> list[tuple[str, Path]]:
    """What goes into opbox's wheel: pyproject, README and the opbox package (links followed)."""
    files = [(name, source / name) for name in ("pyproject.toml", "README.md", "setup.cfg", "setup.py", "LICENSE")
             if (source / name).is_file()]
    files += [(f"opbox/{rel}", path) for rel, path in iter_tree(source / "opbox")]
    return files


def opbox_source_hash(source: Path) -> str:
    digest = hashlib.sha256()
    for rel, path in sorted(_source_files(source)):
        digest.update(rel.encode() + b"\0" + _file_sha256(path))
    return digest.hexdigest()


def _source_version(source: Path) -> str:
    match = re.search(r'(?m)^version\s*=\s*"([^"]+)"', (source / "pyproject.toml").read_text(encoding="utf-8"))
    return match.group(1) if match else "0"


def _wheel_version(wheel: Path) -> str:
    parts = wheel.name.split("-")
    return parts[1] if len(parts) > 1 else "0"


def build_opbox_wheel(source: Path, out: Path, log: Log = _quiet) -> Path:
    """Build opbox's wheel from a clean copy of ``source`` (symlinked subpackages resolved,
    no stale ``build/`` folder) into ``out``; ``uv build`` when uv is there, else ``pip wheel``."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="opbox-src-") as tmp:
        copy = Path(tmp) / "opbox-src"
        for rel, path in _source_files(source):
            target = copy / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        wheels = Path(tmp) / "dist"
        env = {**os.environ, "SOURCE_DATE_EPOCH": os.environ.get("SOURCE_DATE_EPOCH", "315532800")}
        uv = shutil.which("uv")
        if uv:
            cmd = [uv, "build", "--wheel", "--quiet", "--out-dir", str(wheels), str(copy)]
        else:
            cmd = [*pip_command(), "wheel", "--no-deps", "--disable-pip-version-check", "--wheel-dir", str(wheels),
                   str(copy)]
        log("wheelhouse: building opbox's wheel")
        code, output = run_logged(cmd, log, env=env)
        built = sorted(wheels.glob("opbox-*.whl")) if wheels.exists() else []
        if code != 0 or not built:
            raise BuildError("could not build opbox's own wheel", log=output)
        target = out / built[0].name
        shutil.move(str(built[0]), target)
        return target


def wheel_requirements(wheel: Path, extras: Sequence[str] = ()) -> list[str]:
    """The Requires-Dist lines of a wheel that apply without extras; with ``extras``, only those
    of the named extras (their ``extra == ...`` marker dropped)."""
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.HeaderParser().parsestr(zf.read(name).decode("utf-8"))
    lines = meta.get_all("Requires-Dist") or []
    if not extras:
        return [req for req in lines if not re.search(r"\bextra\s*==", req)]
    wanted = []
    for req in lines:
        found = re.fullmatch(r"(.*?)\s*;\s*extra\s*==\s*[\"']([^\"']+)[\"']\s*", req)
        if found and found.group(2) in extras:
            wanted.append(found.group(1))
    return wanted


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
