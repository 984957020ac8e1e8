"""Job versions as container images: a Dockerfile rendered from a Jinja template, a build
context assembled from the uploaded code and a host-side wheelhouse, and a builder.

    spec = DockerContextSpec(base_image=..., python_version="3.11", requirements_hash=...,
                             code_hash=..., opbox_version=...)
    dockerfile = render_dockerfile(spec)
    tag = image_tag("localhost", "my-job", spec.requirements_hash, spec.code_hash, spec.opbox_version,
                    dockerfile=dockerfile)
    prepare_context(code_dir, requirements, wheels, dest, runtime_wheels=...)
    (dest / "Dockerfile").write_text(dockerfile)
    PodmanBuilder().build(dest, tag, log=print)

or all of it at once with ``build_job_image(...)``.

Tags derive from content hashes (``<prefix>/opbox-<job>:<sha12>`` of the requirements, the
code, the opbox runtime and the rendered Dockerfile), so an unchanged version is never
rebuilt: the builder sees the tag exists and returns at once.

How images get built is a strategy behind the ``ImageBuilder`` protocol: ``PodmanBuilder``
builds on this machine; an in-cluster builder (kaniko, see ``KanikoJobSpec``) can stand
beside it and take the same context folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Mapping, Protocol, runtime_checkable

import jinja2

from opbox.errors import BuildError, ConfigError, ValidationError
from opbox.image import IMAGE_REF, Image
from opbox.processes import die_with_parent

from .wheelhouse import RUNTIME_EXTRAS, Wheelhouse, iter_tree, requirements_hash, tree_hash

Log = Callable[[str], None]

DEFAULT_BASE_IMAGE = "localhost/opbox-base:bookworm-py3"
DEFAULT_PYTHON_VERSION = "3.11"
TEMPLATES_DIR = Path(__file__).parent.parent / "templates"
#: bump when the tag recipe itself changes
TAG_SCHEMA = "opbox-image-tag/1"

_HASH = re.compile(r"[0-9a-f]{8,128}")
_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
_IMAGE_REF = IMAGE_REF  # the SDK's, which checks Image(base=...)
_PREFIX = re.compile(
    r"[a-zA-Z0-9](?:[a-zA-Z0-9.-]*[a-zA-Z0-9])?(?::[0-9]+)?(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ENTRY = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*")


def _quiet(_line: str) -> None:
    pass


# --- the Dockerfile --------------------------------------------------------------------------


@dataclass(frozen=True)
class DockerContextSpec:
    """Everything the Dockerfile of a job version depends on."""

    base_image: str
    python_version: str
    requirements_hash: str
    code_hash: str
    opbox_version: str = ""
    has_requirements: bool = True
    labels: tuple[tuple[str, str], ...] = ()  # extra labels; a Mapping is accepted too
    apt: tuple[str, ...] = ()  # Image(apt=...): a system layer both stages start from
    image_pip_hash: str = ""  # Image(pip=...): the hash of its requirements ("": none)
    run: tuple[str, ...] = ()  # Image(run=...): one RUN each, after the venv and before the code
    entry: str = ""  # module:qualname, imported once after the code is in ("": not checked)

    def __post_init__(self) -> None:
        if isinstance(self.labels, Mapping):
            object.__setattr__(self, "labels", tuple(sorted((str(k), str(v)) for k, v in self.labels.items())))
        else:
            object.__setattr__(self, "labels", tuple((str(k), str(v)) for k, v in self.labels))
        if not _IMAGE_REF.fullmatch(self.base_image):
            raise ValidationError(f"not an image reference: {self.base_image!r}")
        if not re.fullmatch(r"\d+\.\d+", self.python_version):
            raise ValidationError(f"python_version must look like 3.11, not {self.python_version!r}")
        for name in ("requirements_hash", "code_hash"):
            if not _HASH.fullmatch(getattr(self, name)):
                raise ValidationError(f"{name} must be a lowercase hex digest, not {getattr(self, name)!r}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+_-]{0,127}|", self.opbox_version):
            raise ValidationError(f"bad opbox_version {self.opbox_version!r}")
        Image(apt=self.apt, run=self.run)  # the same checks as the SDK's: nothing leaves its line
        if self.image_pip_hash and not _HASH.fullmatch(self.image_pip_hash):
            raise ValidationError(f"image_pip_hash must be a lowercase hex digest, not {self.image_pip_hash!r}")
        if self.entry and not _ENTRY.fullmatch(self.entry):
            raise ValidationError(f"entry must look like 'module:qualname', not {self.entry!r}")
        for key, value in self.labels:
            if not _LABEL_KEY.fullmatch(key):
                raise ValidationError(f"bad label key {key!r}")
            if _CONTROL.search(value) or len(value) > 4096:
                raise ValidationError(f"label {key!r} has control characters or is too long")

    def all_labels(self) -> list[tuple[str, str]]:
        own = [
            ("opbox.version", self.opbox_version),
            ("opbox.python-version", self.python_version),
            ("opbox.requirements-hash", self.requirements_hash),
            ("opbox.code-hash", self.code_hash),
            ("opbox.base-image", self.base_image),
        ]
        taken = {key for key, _ in own}
        return own + [(k, v) for k, v in self.labels if k not in taken]


def _dockerfile_word(value: object) -> str:
    """A double-quoted Dockerfile word that stays one literal string: quotes and backslashes
    escaped, ``$`` escaped so no variable is expanded (LABEL and ENV expand them)."""
    text = str(value)
    if _CONTROL.search(text):
        raise ValidationError(f"control character in a Dockerfile value: {text!r}")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=False,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=False,
        lstrip_blocks=False,
    )
    env.filters["dq"] = _dockerfile_word
    return env


def render_dockerfile(ctx: DockerContextSpec, template: str = "docker/Dockerfile.j2") -> str:
    """The Dockerfile of a job version (multi-stage: deps, then the final image)."""
    return _environment().get_template(template).render(
        base_image=ctx.base_image,
        python_version=ctx.python_version,
        requirements_hash=ctx.requirements_hash,
        code_hash=ctx.code_hash,
        opbox_version=ctx.opbox_version or "unknown",
        has_requirements=ctx.has_requirements,
        runtime_extras=",".join(RUNTIME_EXTRAS),
        labels=ctx.all_labels(),
        apt=ctx.apt,
        image_pip_hash=ctx.image_pip_hash,
        run=ctx.run,
        entry=ctx.entry,
    )


# --- tags ------------------------------------------------------------------------------------


def repository_name(job_name: str) -> str:
    """``opbox-<job>``: the job name as an image repository component (lowercase, [a-z0-9-])."""
    slug = re.sub(r"[^a-z0-9]+", "-", job_name.lower()).strip("-")[:100].strip("-")
    if not slug:
        raise ValidationError(f"job name {job_name!r} has nothing usable for an image name")
    return f"opbox-{slug}"


def image_tag(
    registry_prefix: str,
    job_name: str,
    requirements_hash: str,
    code_hash: str,
    opbox_version: str,
    *,
    dockerfile: str = "",
) -> str:
    """``<prefix>/opbox-<job>:<sha12>``, the sha over everything that goes into the image.

    ``dockerfile`` (the rendered text) brings in the base image, the Python version, the
    labels and the template itself, so a change to any of them is a new tag too.
    """
    prefix = registry_prefix.strip().rstrip("/")
    if not _PREFIX.fullmatch(prefix):
        raise ValidationError(f"bad registry prefix {registry_prefix!r}")
    payload = json.dumps([TAG_SCHEMA, job_name, requirements_hash, code_hash, opbox_version,
                          hashlib.sha256(dockerfile.encode()).hexdigest()])
    return f"{prefix}/{repository_name(job_name)}:{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


# --- the build context -----------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedContext:
    path: Path
    requirements_hash: str
    code_hash: str
    has_requirements: bool


def code_hash(code_dir: Path) -> str:
    return tree_hash(code_dir)


def _copy_wheels(src: Path, dst: Path) -> int:
    dst.mkdir(parents=True, exist_ok=True)
    count = 0
    for wheel in sorted(Path(src).glob("*.whl")):
        try:
            os.link(wheel, dst / wheel.name)
        except OSError:
            shutil.copy2(wheel, dst / wheel.name)
        count += 1
    return count


def prepare_context(
    code_dir: Path,
    requirements: Path | None,
    wheelhouse: Path,
    dest: Path,
    *,
    runtime_wheels: Path | None = None,
    image_requirements: Path | None = None,
    image_wheels: Path | None = None,
) -> PreparedContext:
    """Assemble the build context folder ``dest`` (created; must not exist or be empty):

        dest/code/                  the job's code (caches left out), -> /app
        dest/requirements.txt       the requirements (empty when there are none)
        dest/wheels/requirements/   the wheels of ``wheelhouse``
        dest/wheels/runtime/        opbox's wheel and its dependencies (``runtime_wheels``,
                                    or ``wheelhouse`` again when that holds them too)
        dest/image-requirements.txt and dest/wheels/image/
                                    ``Image(pip=...)`` and its wheels, when given

    Wheels are hard-linked when the filesystem allows. The Dockerfile is written by the caller.
    """
    code_dir, dest = Path(code_dir), Path(dest)
    if not code_dir.is_dir():
        raise ValidationError(f"code folder {code_dir} does not exist")
    if dest.exists() and any(dest.iterdir()):
        raise ValidationError(f"build context folder {dest} is not empty")
    dest.mkdir(parents=True, exist_ok=True)
    for rel, path in iter_tree(code_dir):
        target = dest / "code" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    (dest / "code").mkdir(exist_ok=True)
    req_hash = requirements_hash(requirements)
    has_requirements = requirements is not None and req_hash != requirements_hash(None)
    if has_requirements:
        shutil.copyfile(requirements, dest / "requirements.txt")
    else:
        (dest / "requirements.txt").write_text("")
    _copy_wheels(Path(wheelhouse), dest / "wheels" / "requirements")
    if image_requirements is not None:
        shutil.copyfile(image_requirements, dest / "image-requirements.txt")
        _copy_wheels(Path(image_wheels or wheelhouse), dest / "wheels" / "image")
    if not _copy_wheels(Path(runtime_wheels or wheelhouse), dest / "wheels" / "runtime"):
        raise BuildError(f"no wheels for the opbox runtime in {runtime_wheels or wheelhouse}")
    return PreparedContext(dest, req_hash, tree_hash(dest / "code"), has_requirements)


def write_context_archive(context_dir: Path, dest: Path | BinaryIO) -> int:
    """The context folder as a gzipped tar at ``dest`` (a path, or a stream: a pipe to an upload;
    what an in-cluster builder fetches), built reproducibly: sorted entries, no owners, mtime 0,
    executable bits kept. Returns its size."""
    import contextlib
    import gzip
    import tarfile

    context_dir = Path(context_dir)
    with contextlib.ExitStack() as stack:
        raw = _Counting(dest if hasattr(dest, "write") else stack.enter_context(open(dest, "wb")))
        gz = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=6))
        tar = stack.enter_context(tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT))
        folders: set[str] = set()
        for rel, path in iter_tree(context_dir):
            parts = rel.split("/")[:-1]
            for depth in range(1, len(parts) + 1):  # folder entries too: empty ones must exist
                folder = "/".join(parts[:depth])
                if folder not in folders:
                    folders.add(folder)
                    entry = tarfile.TarInfo(folder)
                    entry.type, entry.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(entry)
            info = tarfile.TarInfo(rel)
            info.size = path.stat().st_size
            info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
            with open(path, "rb") as f:
                tar.addfile(info, f)
    return raw.written


class _Counting:
    """A write-only file object that counts what passes through it."""

    def __init__(self, out: BinaryIO):
        self.out, self.written = out, 0

    def write(self, data) -> int:
        self.written += len(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


# --- builders --------------------------------------------------------------------------------


@runtime_checkable
class ImageBuilder(Protocol):
    """A way to turn a context folder (with its Dockerfile) into an image ``tag``."""

    def exists(self, tag: str) -> bool:
        """Whether ``tag`` is already built (then ``build`` does nothing)."""

    def build(self, context_dir: Path, tag: str, log: Log) -> str:
        """Build (or find) ``tag``, handing each output line to ``log``; return the tag.
        Raises ``BuildError`` (with the whole output as ``log``) on failure. A builder that builds offline
        takes ``network=True`` for the builds that need it (``Image(apt=...)``)."""


# buildah's layer cache lookup fails when a layer it listed is removed before it reads it (another build's
# cleanup, an image removed meanwhile): containers/buildah#5674 and #5615, fixed by ignoring it in #6688 (2026).
# Nothing was built; the same build run again finds the cache as it is now.
CACHE_RACE = "checking if cached image exists from a previous build: getting top layer info: layer not known"


class PodmanBuilder:
    """Builds on this machine with ``podman build``.

    podman rather than ``buildah bud``: both are the same buildah code and storage, but
    podman builds with ``--layers`` by default, and the one binary also answers
    ``image exists`` and runs the images (the podman backend's ``podman run``), so a host
    needs one tool configured, not two. The build runs with ``--network=none``: every
    package comes from the wheelhouse in the context, except with ``network=True`` (an image with
    apt packages: apt-get needs its mirrors; pip still reads only the wheelhouse).
    """

    def __init__(self, podman: str = "podman", *, timeout: float | None = 1800.0,
                 extra_args: Iterable[str] = (), lock_dir: Path | None = None):
        self.podman = podman
        self.timeout = timeout
        self.extra_args = list(extra_args)
        self.lock_dir = Path(lock_dir or Path(tempfile.gettempdir()) / "opbox-build-locks")

    def _exe(self) -> str:
        exe = shutil.which(self.podman)
        if not exe:
            raise ConfigError(f"{self.podman} not found: run scripts/setup-podman.sh")
        return exe

    def exists(self, tag: str) -> bool:
        return subprocess.run([self._exe(), "image", "exists", tag], stdin=subprocess.DEVNULL,
                              capture_output=True).returncode == 0

    def remove(self, tag: str) -> None:
        subprocess.run([self._exe(), "rmi", "--force", tag], stdin=subprocess.DEVNULL, capture_output=True)

    def build(self, context_dir: Path, tag: str, log: Log = _quiet, *, network: bool = False) -> str:
        context_dir = Path(context_dir)
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        lock_path = self.lock_dir / (hashlib.sha256(tag.encode()).hexdigest()[:24] + ".lock")
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one build per tag at a time; the second finds it built
            if self.exists(tag):
                log(f"image {tag} exists: nothing to build")
                return tag
            if not (context_dir / "Dockerfile").is_file():
                raise BuildError(f"no Dockerfile in {context_dir}")
            cmd = [self._exe(), "build", "--layers", *([] if network else ["--network=none"]), "--pull=missing",
                   "--force-rm",
                   "--tag", tag, "--file", str(context_dir / "Dockerfile"), *self.extra_args, str(context_dir)]
            log("$ " + " ".join(cmd))
            code, output = self._stream(cmd, log)
            if code != 0 and CACHE_RACE in output:
                log(f"podman lost a cached layer while looking it up ({CACHE_RACE}): building again")
                code, output = self._stream(cmd, log)
            if code != 0:
                reason = "timed out" if code is None else f"exit {code}"
                raise BuildError(f"building image {tag} failed ({reason})", log=output)
            return tag

    def _stream(self, cmd: list[str], log: Log) -> tuple[int | None, str]:
        lines: list[str] = []
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, encoding="utf-8", errors="replace", bufsize=1,
                                start_new_session=True, preexec_fn=die_with_parent)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # podman and whatever it started
            except OSError:
                proc.kill()

        timer = threading.Timer(self.timeout, kill) if self.timeout else None
        if timer:
            timer.daemon = True
            timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                lines.append(line)
                log(line)
            proc.wait()
        finally:
            if timer:
                timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        output = "\n".join(lines) + ("\n" if lines else "")
        return (None if timed_out.is_set() else proc.returncode), output


# --- all together ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltImage:
    tag: str
    built: bool  # False: the tag existed already
    seconds: float
    spec: DockerContextSpec
    log: str = field(default="", repr=False)


def build_job_image(
    code_dir: Path,
    requirements: Path | None,
    *,
    job_name: str,
    wheelhouse: Wheelhouse,
    builder: ImageBuilder,
    registry_prefix: str = "localhost",
    base_image: str = DEFAULT_BASE_IMAGE,
    labels: Mapping[str, str] | None = None,
    work_dir: Path | None = None,
    log: Log = _quiet,
    image: Image | None = None,
    entry: str = "",
) -> BuiltImage:
    """Hash, tag, and build a job version's image unless that tag exists.

    ``image`` adds its layers (its ``base`` replaces ``base_image``); ``entry`` is imported once
    in the image, so a version whose entry cannot be imported fails here. The no-op path hashes
    the code, the requirements and opbox's source and asks the builder; it downloads and copies
    nothing.
    """
    start = time.monotonic()
    lines: list[str] = []

    def record(line: str) -> None:
        lines.append(line)
        log(line)

    image = image or Image()
    image_requirements: Path | None = None
    if image.pip:
        image_requirements = Path(tempfile.mkdtemp(prefix="opbox-image-pip-", dir=work_dir)) / "requirements.txt"
        image_requirements.write_text("\n".join(image.pip) + "\n")
    try:
        return _build_job_image(code_dir, requirements, image_requirements, start=start, record=record,
                                lines=lines, job_name=job_name, wheelhouse=wheelhouse, builder=builder,
                                registry_prefix=registry_prefix, base_image=image.base or base_image,
                                labels=labels, work_dir=work_dir, image=image, entry=entry)
    finally:
        if image_requirements is not None:
            shutil.rmtree(image_requirements.parent, ignore_errors=True)


def _build_job_image(code_dir: Path, requirements: Path | None, image_requirements: Path | None, *, start: float,
                     record: Log, lines: list[str], job_name: str, wheelhouse: Wheelhouse, builder: ImageBuilder,
                     registry_prefix: str, base_image: str, labels: Mapping[str, str] | None,
                     work_dir: Path | None, image: Image, entry: str) -> BuiltImage:
    spec = DockerContextSpec(
        apt=image.apt, run=image.run, entry=entry,
        image_pip_hash=requirements_hash(image_requirements) if image_requirements is not None else "",
        base_image=base_image,
        python_version=wheelhouse.python_version,
        requirements_hash=requirements_hash(requirements),
        code_hash=code_hash(code_dir),
        opbox_version=wheelhouse.runtime_version(),
        has_requirements=requirements is not None and requirements_hash(requirements) != requirements_hash(None),
        labels=tuple(sorted((labels or {}).items())),
    )
    dockerfile = render_dockerfile(spec)
    tag = image_tag(registry_prefix, job_name, spec.requirements_hash, spec.code_hash, spec.opbox_version,
                    dockerfile=dockerfile)
    if builder.exists(tag):
        record(f"image {tag} exists: nothing to build")
        return BuiltImage(tag, False, time.monotonic() - start, spec, "\n".join(lines))
    req_wheels = wheelhouse.requirement_wheels(requirements if spec.has_requirements else None, record)
    image_wheels = wheelhouse.requirement_wheels(image_requirements, record) if image_requirements else None
    runtime = wheelhouse.runtime_wheels(record)
    if runtime.version != spec.opbox_version:  # opbox's source changed under us
        raise BuildError(f"opbox changed while building ({spec.opbox_version} -> {runtime.version}): try again")
    with tempfile.TemporaryDirectory(prefix="opbox-context-", dir=work_dir) as tmp:
        context = prepare_context(code_dir, requirements if spec.has_requirements else None, req_wheels,
                                  Path(tmp) / "context", runtime_wheels=runtime.path,
                                  image_requirements=image_requirements, image_wheels=image_wheels)
        (context.path / "Dockerfile").write_text(dockerfile)
        if image.apt and "network" in inspect.signature(builder.build).parameters:
            builder.build(context.path, tag, record, network=True)  # type: ignore[call-arg]
        else:  # offline builders get it this way; others (in a cluster) have a network anyway
            builder.build(context.path, tag, record)
    return BuiltImage(tag, True, time.monotonic() - start, spec, "\n".join(lines))
