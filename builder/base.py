"""The protocol every builder speaks, beside the backend and store protocols.

A builder turns an uploaded code archive into an ``Artifact``: something a backend can run
(a folder and a virtualenv for the local backend, an image for the container and cluster
backends). The platform stores the artifact with the version (``to_dict``, as JSON) and
hands it back to the backend typed (``from_dict``), so no backend reads loose dict keys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Callable, Protocol

from opbox.image import Image

IMAGE_CODE_DIR = "/app"  # where the code lives inside a job image (its working directory)

# the stored JSON's key for a field, where the two differ (records made before the type existed)
_STORED = {"venv": "env"}


@dataclass(frozen=True)
class BuildSpec:
    """What to build: one version of a job, from the archive whose hash is ``code_sha256``."""

    workspace: str
    job_name: str
    version: int
    code_sha256: str
    python: str  # the client's Python minor version, e.g. "3.11"
    entry: str = ""  # module:qualname, which the build imports once to fail early ("": not checked)
    image: Image | None = None  # the version's image customization (``@operator(image=...)``)


@dataclass(frozen=True)
class Artifact:
    """A builder's output. Every field is optional: each builder sets what its backends need."""

    code_dir: str = ""  # the extracted code on this machine
    python: str | None = None  # local builder: the interpreter of the version's virtualenv
    venv: str | None = None  # local builder: the virtualenv itself
    image: str | None = None  # image builders: the job image's tag
    image_code_dir: str | None = None  # image builders: the code's folder inside the image
    requirements_sha256: str | None = None
    base_image: str | None = None
    python_version: str | None = None

    @property
    def code_dir_in_image(self) -> str:
        return self.image_code_dir or IMAGE_CODE_DIR

    def to_dict(self) -> dict:
        """The stored form: set fields only, under their stored names."""
        return {_STORED.get(k, k): v for k, v in asdict(self).items() if v is not None and v != ""}

    @classmethod
    def from_dict(cls, data: dict | None) -> "Artifact":
        """From the stored form; keys this version does not know are left out."""
        data = data or {}
        return cls(**{f.name: data[_STORED.get(f.name, f.name)] for f in fields(cls)
                      if _STORED.get(f.name, f.name) in data})


class Builder(Protocol):
    name: str

    def check_image(self, image: Image) -> None:
        """Raise ``ValidationError`` (with what to do) when this builder cannot honour ``image``: called at
        deploy, before the code is uploaded."""

    async def build(self, spec: BuildSpec, zip_bytes: bytes, log: Callable[[str], None]) -> Artifact:
        """Build ``spec`` from the archive; every line of output goes to ``log`` as it comes.
        Raises ``BuildError`` (with the output in its ``log``) when the build fails, or when importing
        ``spec.entry`` in the built environment fails (the runtime's ``check`` mode, never the gateway)."""


class Isolation(Protocol):
    """How a builder runs a build step that executes user code (a requirement's build backend):
    sealed as the workspace's own user (the local backend's sandbox hands one in)."""

    def owner(self, workspace: str) -> int:
        """The uid (and gid) the workspace's code runs as."""

    def command(self, argv: list[str], *, workspace: str, readable: tuple[str, ...] = (),
                writable: tuple[str, ...] = (), code_dir: str | None = None) -> list[str]:
        """``argv`` wrapped to run sealed, seeing ``readable`` and ``writable`` at their paths and the
        code read-only at /app."""
