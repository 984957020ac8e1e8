"""The gateway's own image (what ``manifests/deployment.yaml`` runs), built like a job image: the
same base image, the same wheelhouse (opbox's wheel built from this source tree, its dependencies
and those of the ``platform``, ``s3`` and ``kubernetes`` extras, fetched on the host), the same Jinja templates
(``templates/docker/Dockerfile.gateway.j2``), the same ``podman build --network=none``.

    python -m opbox.builder.gateway_image [--tag T] [--base-image B] [--wheelhouse DIR]

Tags: ``<repository>:<version>``. A build from a source tree is tagged with the wheelhouse's
runtime version, ``+`` made ``-`` (``localhost/opbox-gateway:0.1.0-src.1a2b3c4d5e6f``: the
package version and a hash of the source), so a changed tree is a new tag; a release is pushed
as ``ghcr.io/opbox/opbox:<version>`` (``manifests/kustomization.yaml`` ``images: newTag``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .image import DEFAULT_BASE_IMAGE, Log, PodmanBuilder, _environment, _quiet
from .wheelhouse import DEFAULT_PYTHON_VERSION, Wheelhouse, wheel_requirements

REPOSITORY = "localhost/opbox-gateway"
EXTRAS = ("platform", "s3", "kubernetes")
UID = 10001  # manifests/deployment.yaml runAsUser / runAsGroup / fsGroup


def gateway_tag(wheelhouse: Wheelhouse, repository: str = REPOSITORY) -> str:
    return f"{repository}:{wheelhouse.runtime_version().replace('+', '-')}"


def write_gateway_context(dest: Path, wheelhouse: Wheelhouse, base_image: str = DEFAULT_BASE_IMAGE,
                          log: Log = _quiet) -> Path:
    """``dest``: the Dockerfile and ``wheels/`` (opbox's wheel, its dependencies and its extras')."""
    dest = Path(dest)
    wheels = dest / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    runtime = wheelhouse.runtime_wheels(log)
    extras = dest / "extras.txt"
    extras.write_text("\n".join(wheel_requirements(runtime.wheel, EXTRAS)) + "\n")
    for folder in (runtime.path, wheelhouse.requirement_wheels(extras, log)):
        for wheel in folder.glob("*.whl"):
            shutil.copy2(wheel, wheels / wheel.name)
    extras.unlink()
    (dest / "Dockerfile").write_text(_environment().get_template("docker/Dockerfile.gateway.j2").render(
        base_image=base_image, opbox_version=runtime.version, extras=",".join(EXTRAS), uid=UID,
        labels=[("org.opencontainers.image.title", "opbox gateway"),
                ("org.opencontainers.image.version", runtime.version)]))
    return dest


def build_gateway_image(context_dir: Path, wheelhouse: Wheelhouse, *, tag: str | None = None,
                        base_image: str = DEFAULT_BASE_IMAGE, builder: PodmanBuilder | None = None,
                        log: Log = _quiet) -> str:
    """Build (or find: tags are content hashes) the gateway's image; its tag."""
    tag = tag or gateway_tag(wheelhouse)
    builder = builder or PodmanBuilder()
    if builder.exists(tag):
        log(f"image {tag} exists: nothing to build")
        return tag
    write_gateway_context(context_dir, wheelhouse, base_image, log)
    return builder.build(context_dir, tag, log)


def main() -> None:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="Build the opbox gateway's image with podman.")
    parser.add_argument("--tag", help="the image tag (default: localhost/opbox-gateway:<version>-src.<hash>)")
    parser.add_argument("--base-image", default=DEFAULT_BASE_IMAGE)
    parser.add_argument("--wheelhouse", default=str(Path.home() / ".cache" / "opbox" / "wheelhouse"))
    parser.add_argument("--python-version", default=DEFAULT_PYTHON_VERSION)
    args = parser.parse_args()
    wheelhouse = Wheelhouse(Path(args.wheelhouse), python_version=args.python_version)
    with tempfile.TemporaryDirectory(prefix="opbox-gateway-image-") as tmp:
        print(build_gateway_image(Path(tmp), wheelhouse, tag=args.tag, base_image=args.base_image, log=print))


if __name__ == "__main__":
    main()
