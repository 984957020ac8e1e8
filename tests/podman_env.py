"""What the container-image end-to-end tests share: podman that works, the base image, one wheel
cache for the session (opbox's dependencies are fetched once), and removing the images a
test module's platform built (they are labelled with its workspace).

Import the fixtures into a test module: ``from podman_env import podman, wheelhouse``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import require
from opbox.builder.image import DEFAULT_BASE_IMAGE

SETUP_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "setup-podman.sh"


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)


@pytest.fixture(scope="session")
def podman() -> str:
    exe = shutil.which("podman")
    require(exe is not None, "podman is not installed (run scripts/setup-podman.sh as root)")
    require(_run(exe, "info").returncode == 0, "podman does not work here (podman info failed)")
    if _run(exe, "image", "exists", DEFAULT_BASE_IMAGE).returncode != 0:
        require(os.geteuid() == 0, f"{DEFAULT_BASE_IMAGE} is missing and setup-podman.sh needs root")
        done = _run("bash", str(SETUP_SCRIPT))
        assert done.returncode == 0, done.stdout + done.stderr
    return exe


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("wheelhouse")


def remove_images(podman: str, workspace: str) -> None:
    """The images built for ``workspace`` (intermediate layers stay as the build cache)."""
    ids = _run(podman, "images", "-q", "--filter", f"label=opbox.workspace={workspace}").stdout.split()
    if ids:
        _run(podman, "rmi", "--force", *sorted(set(ids)))


def e2e_code(folder: Path, module: str, source: str):
    """Write ``source`` as ``module`` in ``folder`` and import it (as `python main.py` would)."""
    import importlib
    import sys

    (folder / f"{module}.py").write_text(source)
    sys.path.insert(0, str(folder))
    return importlib.import_module(module)
