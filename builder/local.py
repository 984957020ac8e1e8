"""The local build strategy: code to a content-addressed folder, requirements to a cached virtualenv.

A version's code is extracted once per content hash. Its requirements (``requirements.txt``,
else ``pyproject.toml``'s ``[project] dependencies``, plus ``Image(pip=[...])``) are installed
into a virtualenv named by the hash of the requirements and the Python version, so unchanged
requirements cost nothing on the next deploy. The version's entry is then imported once in
that environment (``python -m opbox.runtime check``): an import error fails the deploy. The virtualenv reaches the
platform's own packages (opbox, cloudpickle...) through a ``.pth`` file that adds them
*after* its own site-packages: what the user pins wins.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import shutil
import site
import sys
import time
from pathlib import Path
from typing import Callable

from opbox.errors import BuildError, ValidationError
from opbox.image import Image
from opbox.packaging import normalize_requirements, project_requirements
from opbox.processes import die_with_parent

from .base import Artifact, BuildSpec, Isolation
from .extract import extract_to_content_dir

PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
READY_MARK = ".opbox-ready"
ENV_REQUIREMENTS = ".opbox-requirements.txt"  # in the environment: what it was made from
CHECK_TIMEOUT = 600.0  # seconds an entry's import may take at build time


def requirements_text(code_dir: Path, image: Image | None = None) -> tuple[str, str]:
    """What the environment installs, and where it came from: the project's requirements and the image's pip."""
    text, source = project_requirements(code_dir)
    if image is not None and image.pip:
        text = (text.rstrip("\n") + "\n" if text.strip() else "") + "\n".join(image.pip) + "\n"
        source = f"{source} and Image(pip=...)" if source else "Image(pip=...)"
    return text, source


def requirements_key(code_dir: Path, python: str, workspace: str = "", image: Image | None = None) -> str:
    """The environment's cache key: the workspace, the Python version and the normalized requirements."""
    text, _ = requirements_text(code_dir, image)
    return hashlib.sha256(f"{workspace}\npython{python}\n{normalize_requirements(text)}".encode()).hexdigest()


def _uv() -> str | None:
    try:
        from uv import find_uv_bin

        return find_uv_bin()
    except Exception:
        return shutil.which("uv")


class LocalBuilder:
    name = "local"

    def __init__(self, home: Path, python: str = sys.executable, isolation: Isolation | None = None):
        self.code_root = home / "code"
        self.env_root = home / "envs"
        self.cache_root = home / "cache" / "uv"
        self.python = python
        self.isolation = isolation
        self._locks: dict[str, asyncio.Lock] = {}

    def check_image(self, image: Image) -> None:
        beyond = image.beyond_pip()
        if beyond:
            raise ValidationError(
                f"the local backend runs jobs in a virtualenv on this machine, not in a container image, so it cannot "
                f"honour Image({', '.join(beyond)}). Install system packages on the host and drop them from Image(), "
                f"or run the platform with the container or kubernetes backend (opbox up --backend container); "
                f"Image(pip=[...]) works here: it is installed into the job's virtualenv.", image=image.to_dict())

    async def build(self, spec: BuildSpec, zip_bytes: bytes, log: Callable[[str], None]) -> Artifact:
        if spec.python != PYTHON:
            raise BuildError(
                f"the local platform runs Python {PYTHON} but the client runs Python {spec.python}; pickled calls "
                f"cannot cross Python minor versions. Deploy from Python {PYTHON}, or use the container backend "
                f"with a Python {spec.python} base image."
            )
        started = time.monotonic()
        code_dir = await asyncio.to_thread(extract_to_content_dir, zip_bytes, self.code_root, spec.code_sha256)
        log(f"code {spec.code_sha256[:12]} in {code_dir}")
        env_dir = await self._environment(Path(code_dir), spec, log)
        if spec.entry:
            await self._check_entry(spec, Path(code_dir), env_dir, log)
        log(f"build done in {time.monotonic() - started:.2f} s")
        return Artifact(code_dir=str(code_dir), python=str(env_dir / "bin" / "python"), venv=str(env_dir))

    async def _environment(self, code_dir: Path, spec: BuildSpec, log: Callable[[str], None]) -> Path:
        # one workspace's environments are never another's: a requirement's build code may write into the
        # environment it installs to, and whatever it leaves there runs in every run that uses it
        key = requirements_key(code_dir, spec.python, spec.workspace, spec.image)
        env_dir = self.env_root / f"py{spec.python}-{key[:16]}"
        if (env_dir / READY_MARK).exists():
            log(f"requirements unchanged: reusing environment {env_dir.name}")
            return env_dir
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            self.env_root.mkdir(parents=True, exist_ok=True)
            with open(self.env_root / f".{key[:16]}.lock", "w") as lockfile:
                await asyncio.to_thread(fcntl.flock, lockfile, fcntl.LOCK_EX)  # other platform processes
                if (env_dir / READY_MARK).exists():
                    log(f"requirements unchanged: reusing environment {env_dir.name}")
                    return env_dir
                try:
                    await self._create(env_dir, code_dir, spec.workspace, log, spec.image)
                except BaseException:
                    shutil.rmtree(env_dir, ignore_errors=True)
                    raise
        return env_dir

    async def _check_entry(self, spec: BuildSpec, code_dir: Path, env_dir: Path, log: Callable[[str], None]) -> None:
        """Import the entry once in the new environment, as a worker would (sealed when workers are)."""
        log(f"importing {spec.entry}")
        argv = [str(env_dir / "bin" / "python"), "-m", "opbox.runtime", "check", "--entry", spec.entry]
        lines: list[str] = []

        def emit(line: str) -> None:
            lines.append(line)
            log(line)

        extra = {"OPBOX_RUNTIME": "1"}
        if self.isolation is None:
            cmd, cwd = [*argv, "--code-dir", str(code_dir)], code_dir
        else:
            cmd = self.isolation.command([*argv, "--code-dir", "/app"], workspace=spec.workspace,
                                         readable=(str(env_dir),), code_dir=str(code_dir))
            cwd, extra = Path("/"), {**extra, "HOME": "/tmp", "TMPDIR": "/tmp"}
        try:
            await asyncio.wait_for(_run(cmd, cwd, emit, extra), CHECK_TIMEOUT)
        except asyncio.TimeoutError:
            raise BuildError(f"importing {spec.entry} took longer than {CHECK_TIMEOUT:.0f} s: does the module do "
                             f"heavy work at import time? Move it into the function", log="\n".join(lines)) from None
        except BuildError:
            raise BuildError(f"the entry {spec.entry} cannot be imported (see the build log): every call would fail",
                             log="\n".join(lines)) from None

    async def _create(self, env_dir: Path, code_dir: Path, workspace: str, log: Callable[[str], None],
                      image: Image | None = None) -> None:
        shutil.rmtree(env_dir, ignore_errors=True)
        uv = _uv()
        lines: list[str] = []

        def emit(line: str) -> None:
            lines.append(line)
            log(line)

        if uv:
            await _run([uv, "venv", "--quiet", "--python", self.python, str(env_dir)], code_dir, emit)
        else:
            await _run([self.python, "-m", "venv", str(env_dir)], code_dir, emit)
        paths = [p for p in site.getsitepackages() if os.path.isdir(p)]
        pth = "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in paths) + "\n"
        for purelib in (env_dir / "lib").glob("python*/site-packages"):
            (purelib / "_opbox_platform.pth").write_text(pth)
        text, source = requirements_text(code_dir, image)
        if normalize_requirements(text):
            emit(f"installing {source} into {env_dir.name}")
            files = []
            if (code_dir / "requirements.txt").is_file():  # as it is: relative paths in it stay relative to it
                files.append("/app/requirements.txt" if self.isolation else str(code_dir / "requirements.txt"))
                text = "\n".join(image.pip) + "\n" if image is not None and image.pip else ""
            if text:  # pyproject.toml's dependencies, Image(pip=...): the environment's own file
                (env_dir / ENV_REQUIREMENTS).write_text(text)
                files.append(str(env_dir / ENV_REQUIREMENTS))
            py = str(env_dir / "bin" / "python")
            args = [arg for file in files for arg in ("-r", file)]
            cmd = [uv, "pip", "install", "--python", py, *args] if uv else [
                py, "-m", "pip", "install", "--disable-pip-version-check", *args]
            try:
                await self._install(cmd, env_dir, code_dir, workspace, emit)
            except BuildError as exc:
                raise BuildError(f"installing {source} failed", log="\n".join(lines)) from exc
        (env_dir / READY_MARK).write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


    async def _install(self, cmd: list[str], env_dir: Path, code_dir: Path, workspace: str,
                       emit: Callable[[str], None]) -> None:
        """Install the requirements: this runs their build backends, i.e. user code, so it runs sealed as the
        workspace's user (writing only its environment and its own package cache) when isolation is given."""
        if self.isolation is None:
            await _run(cmd, code_dir, emit)
            return
        uid = self.isolation.owner(workspace)
        cache = self.cache_root / workspace
        cache.mkdir(parents=True, exist_ok=True)
        for path in (cache, env_dir):
            _chown_tree(path, uid)
        sealed = self.isolation.command(cmd, workspace=workspace, writable=(str(env_dir), str(cache)),
                                        code_dir=str(code_dir))
        await _run(sealed, Path("/"), emit, {"HOME": "/tmp", "TMPDIR": "/tmp", "UV_CACHE_DIR": str(cache),
                                            "UV_LINK_MODE": "copy"})


def _chown_tree(root: Path, uid: int) -> None:
    for folder, dirs, files in os.walk(root):
        for name in (folder, *(os.path.join(folder, n) for n in dirs + files)):
            os.lchown(name, uid, uid)


BUILD_ENV = ("PATH", "HOME", "TMPDIR", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ", "HTTP_PROXY", "HTTPS_PROXY",
             "NO_PROXY", "http_proxy", "https_proxy", "no_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR",
             "REQUESTS_CA_BUNDLE", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "UV_INDEX_URL",
             "UV_EXTRA_INDEX_URL", "UV_FIND_LINKS", "UV_CACHE_DIR")  # a build sees these of the platform's, no more


async def _run(cmd: list[str], cwd: Path, emit: Callable[[str], None], extra: dict | None = None) -> None:
    env = {k: os.environ[k] for k in BUILD_ENV if k in os.environ}
    env.update(extra or {})
    env["UV_PYTHON_DOWNLOADS"] = "never"
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=str(cwd), env=env, stdin=asyncio.subprocess.DEVNULL, preexec_fn=die_with_parent,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    async for raw in proc.stdout:
        emit(raw.decode(errors="replace").rstrip())
    code = await proc.wait()
    if code != 0:
        raise BuildError(f"{Path(cmd[0]).name} {cmd[1]} exited with code {code}")
