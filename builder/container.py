"""The container build strategy: each job version becomes an image (``OPBOX_BUILDER=podman``).

The uploaded code is extracted once per content hash (as the local builder does), then
``build_job_image`` renders the Dockerfile from ``templates/docker/Dockerfile.j2`` and builds
it with podman, reusing the dependency layer while the requirements are unchanged and
skipping the build altogether when the content-hash tag exists. Every line of output
reaches ``deploy()`` as it comes.

``Image(...)`` of the deploy adds its layers (apt, pip, run) and may replace the base image; a
project without ``requirements.txt`` uses its ``pyproject.toml`` dependencies. The entry is
imported once in the image (the last step before the labels): an import error fails the deploy.

The artifact names the image (what the container and Kubernetes backends run) and where
the code lives inside it (``/app``, the image's working directory).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Callable

from opbox.errors import BuildError
from opbox.image import Image
from opbox.packaging import project_requirements

from .base import IMAGE_CODE_DIR, Artifact, BuildSpec
from .extract import extract_to_content_dir
from .image import DEFAULT_BASE_IMAGE, ImageBuilder, PodmanBuilder, build_job_image
from .wheelhouse import Wheelhouse


class ContainerBuilder:
    """Builds job images with ``image_builder`` (podman on this machine by default; kaniko in
    the cluster). ``registry_prefix`` is where tags live (``localhost`` keeps them in local
    storage; a registry host makes them pushable). ``{python}`` in ``base_image`` becomes the
    client's Python minor version, e.g. ``python:{python}-slim-bookworm``."""

    def __init__(self, home: Path, *, base_image: str = DEFAULT_BASE_IMAGE, registry_prefix: str = "localhost",
                 wheelhouse_dir: Path | None = None, image_builder: ImageBuilder | None = None,
                 name: str = "podman"):
        self.name = name
        self.code_root = Path(home) / "code"
        self.work_dir = Path(home) / "build"
        self.wheelhouse_dir = Path(wheelhouse_dir or Path(home) / "wheelhouse")
        self.base_image = base_image
        self.registry_prefix = registry_prefix
        self.image_builder = image_builder or PodmanBuilder()
        self._wheelhouses: dict[str, Wheelhouse] = {}

    def wheelhouse(self, python: str) -> Wheelhouse:
        if python not in self._wheelhouses:
            self._wheelhouses[python] = Wheelhouse(self.wheelhouse_dir, python_version=python)
        return self._wheelhouses[python]

    def check_image(self, image: Image) -> None:
        """Every field of ``Image`` is an image layer here: nothing to refuse."""

    async def build(self, spec: BuildSpec, zip_bytes: bytes, log: Callable[[str], None]) -> Artifact:
        loop = asyncio.get_running_loop()

        def threadsafe_log(line: str) -> None:  # the build runs in a thread; the deploy stream lives on the loop
            loop.call_soon_threadsafe(log, line)

        code_dir = await asyncio.to_thread(extract_to_content_dir, zip_bytes, self.code_root, spec.code_sha256)
        image = spec.image or Image()
        base_image = image.base or self.base_image.replace("{python}", spec.python)
        log(f"code {spec.code_sha256[:12]} extracted; building the image with {self.name} (base {base_image}, "
            f"Python {spec.python})")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        requirements = code_dir / "requirements.txt"
        if not requirements.is_file():
            text, source = await asyncio.to_thread(project_requirements, code_dir)
            requirements = self.work_dir / f"requirements-{spec.code_sha256}-{spec.version}.txt"
            if text:
                log(f"requirements: {source}")
                requirements.write_text(text)
        try:
            built = await asyncio.to_thread(
                build_job_image, code_dir, requirements if requirements.is_file() else None,
                job_name=f"{spec.workspace}-{spec.job_name}", wheelhouse=self.wheelhouse(spec.python),
                builder=self.image_builder, registry_prefix=self.registry_prefix, base_image=base_image,
                labels={"opbox.workspace": spec.workspace, "opbox.job": spec.job_name}, work_dir=self.work_dir,
                log=threadsafe_log, image=image, entry=spec.entry)
        except BuildError as exc:
            if spec.entry and "opbox: importing the entry" in (exc.log or ""):
                raise BuildError(f"the entry {spec.entry} cannot be imported in the image (see the build log): "
                                 "every call would fail", log=exc.log) from None
            raise
        except Exception as exc:
            raise BuildError(f"building the image failed: {type(exc).__name__}: {exc}") from exc
        finally:
            if requirements.parent == self.work_dir:
                requirements.unlink(missing_ok=True)
        await asyncio.sleep(0)  # let the queued log lines through first
        log(f"image {built.tag} {'built' if built.built else 'reused'} in {built.seconds:.1f} s")
        return Artifact(image=built.tag, image_code_dir=IMAGE_CODE_DIR, code_dir=str(code_dir),
                        requirements_sha256=built.spec.requirements_hash, base_image=base_image,
                        python_version=spec.python)
