"""The layout's promises: stdlib `platform` is never shadowed; the import contracts hold and can fail."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_stdlib_platform_is_not_shadowed_from_the_repo_root():
    for python in (sys.executable, "python3"):
        out = subprocess.run([python, "-c", "import platform, sysconfig; print(platform.system()); "
                              "print(platform.__file__); print(sysconfig.get_paths()['stdlib'])"],
                             cwd=ROOT, capture_output=True, text=True, check=True)
        system, path, stdlib = out.stdout.split()
        assert system == "Linux" and path.startswith(stdlib), path
    assert not (ROOT / "platform" / "__init__.py").exists()


LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--config", "pyproject.toml", "--no-cache"], cwd=root, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(root)})


def test_import_contracts_are_kept():
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


@pytest.mark.parametrize("inject, contract", [
    ("platform/control/runs.py:import cloudpickle", "never unpickles"),
    ("opbox/remote.py:import opbox.platform.core", "never import the platform"),
    ("platform/control/runs.py:import boto3", "boto3 lives"),
    ("runtime/worker.py:import kubernetes", "Kubernetes client"),
    ("platform/backends/base.py:import opbox.platform.control.runs", "layers"),
    ("platform/control/deploys.py:import opbox.platform.gateway.http", "layers"),
    ("platform/control/runs.py:import opbox.platform.records.sqlite", "never adapters"),
    ("platform/gateway/routes_jobs.py:import opbox.platform.backends.local", "never adapters"),
    ("platform/backends/kubernetes/backend.py:import opbox.platform.backends.local", "independent"),
])
def test_each_import_contract_can_break(tmp_path, inject, contract):
    """The contracts are checked on a copy of the tree with one import added: each must then fail."""
    for part in ("opbox", "platform", "runtime", "builder", "templates"):
        shutil.copytree(ROOT / part, tmp_path / part, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    rel, _, statement = inject.partition(":")
    with open(tmp_path / rel, "a") as f:
        f.write(f"\n{statement}\n")
    out = lint(tmp_path)
    assert out.returncode != 0, inject
    broken = [line for line in out.stdout.splitlines() if " BROKEN" in line]
    assert any(contract in line for line in broken), (inject, broken)


def test_every_sdk_module_is_under_the_layer_contract():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contract = next(c for c in config["tool"]["importlinter"]["contracts"] if "never import the platform" in c["name"])
    sdk = {f"opbox.{p.stem}" for p in (ROOT / "opbox").glob("*.py") if p.stem not in ("__init__", "cli")}
    missing = sdk - set(contract["source_modules"])
    assert not missing, f"add {sorted(missing)} to the contract in pyproject.toml"


def test_runtime_imports_no_http_client_nor_platform():
    code = "import sys, opbox.runtime.worker, opbox.runtime.batch, opbox.decorator; " \
           "print(sorted(m for m in sys.modules if m.split('.')[0] in ('httpx', 'starlette') or m.startswith('opbox.platform')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"


def test_no_pickle_calls_in_the_platform_source():
    for path in (ROOT / "platform").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("loads", "load") and \
                    isinstance(node.value, ast.Name) and node.value.id in ("pickle", "cloudpickle"):
                raise AssertionError(f"{path}: unpickles")


def test_openapi_document_is_json_and_covers_the_api(plat):
    doc = httpx.get(plat.url + "/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    paths = doc["paths"]
    for path in ("/{workspace}/job/{job}/trigger", "/{workspace}/job/{job}/runs", "/{workspace}/runs/{run}/result",
                 "/{workspace}/batches/{batch}/results", "/{workspace}/uploads", "/{workspace}/jobs"):
        assert path in paths, path
    trigger = paths["/{workspace}/job/{job}/trigger"]["post"]
    assert {p["name"] for p in trigger["parameters"]} >= {"workspace", "job"}
    assert not any(p.startswith("/_internal") for p in paths)
    assert paths["/healthz"]["get"]["security"] == []


def test_a_built_wheel_holds_the_whole_namespace(tmp_path):
    """`pip install .` installs real copies of the symlinked folders under opbox/ (the mapping in pyproject.toml)."""
    source = tmp_path / "source"  # a copy, so the build's own folders stay out of the work tree
    for part in ("opbox", "platform", "runtime", "builder", "templates"):
        shutil.copytree(ROOT / part, source / part, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("opbox-*.whl")
    site = tmp_path / "site"
    shutil.unpack_archive(wheel, site, format="zip")
    for rel in ("opbox/py.typed", "opbox/platform/core.py", "opbox/platform/gateway/app.py", "opbox/runtime/worker.py",
                "opbox/builder/local.py", "opbox/templates/docker/Dockerfile.j2"):
        assert (site / rel).is_file() and not (site / rel).is_symlink(), rel
    code = "import opbox.platform.core as c, opbox.runtime.worker as w; print(c.__file__); print(w.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert all(line.startswith(str(site)) for line in out.stdout.split()), out.stdout
