"""The layout's promises: stdlib `platform` is never shadowed; the import contracts hold and can fail."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def test_stdlib_platform_is_not_shadowed_from_the_repo_root():
    for python in (sys.executable, "python3"):
        out = subprocess.run([python, "-c", "import platform, sysconfig; print(platform.system()); "
                              "print(platform.__file__); print(sysconfig.get_paths()['stdlib'])"],
                             cwd=ROOT, capture_output=True, text=True, check=True)
        system, path, stdlib = out.stdout.split()
        assert system == "Linux" and path.startswith(stdlib), path
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_import_contracts_are_kept():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "lint_imports.py")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_import_contracts_can_break():
    for inject, contract in (("platform/runs.py:import cloudpickle", "never unpickles"),
                             ("remote.py:import opbox.platform.core", "never import the platform"),
                             ("platform/runs.py:import boto3", "boto3 lives"),
                             ("runtime/worker.py:import kubernetes", "Kubernetes client")):
        out = subprocess.run([sys.executable, str(ROOT / "scripts" / "lint_imports.py"), "--inject", inject],
                             capture_output=True, text=True)
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
