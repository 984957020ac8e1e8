"""The SDK alone: opbox's wheel installed without extras into a fresh virtualenv has none of the
platform's server dependencies, deploys, calls and maps on a platform started from the project's
venv, and `opbox up` there says which extra to install."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from platform_fixture import running_platform

ROOT = Path(__file__).resolve().parents[1]
SERVER_MODULES = ("starlette", "uvicorn", "jinja2", "prometheus_client", "yaml", "cryptography", "uv", "opentelemetry")


def _uv() -> str:
    from uv import find_uv_bin

    return find_uv_bin()


@pytest.fixture(scope="module")
def sdk_venv(tmp_path_factory) -> Path:
    """A virtualenv with opbox's wheel and its base dependencies only (``uv pip install opbox-*.whl``)."""
    tmp = tmp_path_factory.mktemp("sdk")
    source = tmp / "source"  # a copy, so the build's own folders stay out of the work tree
    for part in ("opbox", "platform", "runtime", "builder", "templates"):
        shutil.copytree(ROOT / part, source / part, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp / "dist").glob("opbox-*.whl")
    venv = tmp / "venv"
    subprocess.run([_uv(), "venv", "--quiet", "--python", sys.executable, str(venv)], check=True, capture_output=True)
    subprocess.run([_uv(), "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return venv


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OPBOX_", "VIRTUAL_ENV", "PYTHONPATH"))}
    return {**env, **extra}


def test_the_base_install_has_no_server_dependency(sdk_venv):
    code = ("import importlib.util, json, opbox, opbox.runtime.worker, opbox.runtime.batch; "
            f"print(json.dumps({{m: importlib.util.find_spec(m) is not None for m in {SERVER_MODULES!r}}}))")
    out = subprocess.run([str(sdk_venv / "bin" / "python"), "-c", code], capture_output=True, text=True, cwd="/",
                         env=_clean_env())
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found == {m: False for m in SERVER_MODULES}
    # and opbox came from the wheel, not the work tree
    where = subprocess.run([str(sdk_venv / "bin" / "python"), "-c", "import opbox; print(opbox.__file__)"],
                           capture_output=True, text=True, cwd="/", env=_clean_env(), check=True).stdout
    assert where.startswith(str(sdk_venv)), where


def test_opbox_up_without_the_platform_extra_says_how_to_install_it(sdk_venv, tmp_path):
    listed = subprocess.run([str(sdk_venv / "bin" / "opbox"), "--help"], capture_output=True, text=True, timeout=60,
                            env=_clean_env())
    assert listed.returncode == 0 and "up" in listed.stdout and "call" in listed.stdout, listed.stderr
    for args in (["up", "--port", "0"], ["gc"], ["workspace", "create", "team-b"]):
        out = subprocess.run([str(sdk_venv / "bin" / "opbox"), *args], capture_output=True, text=True, timeout=60,
                             env=_clean_env(OPBOX_HOME=str(tmp_path / "home")))
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        assert "pip install 'opbox[platform]'" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr, out.stderr


def test_the_sdk_alone_deploys_calls_and_maps_on_a_real_platform(sdk_venv, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "main.py").write_text(textwrap.dedent("""
        import json, sys

        from opbox import operator


        @operator()
        def square(i: int = 4):
            return i * i


        if __name__ == "__main__":
            remote = square.deploy()
            answer = {"call": remote(i=7), "map": remote.map([1, 2, 3])}
            answer["server_modules"] = sorted(m for m in sys.modules
                                              if m.split(".")[0] in ("starlette", "uvicorn", "jinja2",
                                                                     "prometheus_client")
                                              or m.startswith(("opbox.platform", "opbox.builder")))
            print(json.dumps(answer))
    """))
    with running_platform(tmp_path / "home") as plat:  # the gateway runs from the project's venv
        env = _clean_env(OPBOX_URL=plat.url, OPBOX_TOKEN=plat.token, OPBOX_WORKSPACE=plat.workspace)
        out = subprocess.run([str(sdk_venv / "bin" / "python"), "main.py"], cwd=project, env=env,
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout.splitlines()[-1])
        assert answer == {"call": 49, "map": [1, 4, 9], "server_modules": []}
        runs = plat.client().get("/job/square/runs", params={"limit": 10}).json()["runs"]
        assert sorted(r["trigger"] for r in runs) == ["call", "map", "map", "map"]
