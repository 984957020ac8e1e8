"""The README's quickstart, as a user runs it, against a platform started the way `make run` does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from platform_fixture import running_platform

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_prints_16_and_squares(tmp_path):
    project = tmp_path / "moonshot"
    shutil.copytree(ROOT / "examples" / "moonshot", project)
    with running_platform(tmp_path / "home") as plat:
        env = {**os.environ, "OPBOX_URL": plat.url, "OPBOX_TOKEN": plat.token, "OPBOX_WORKSPACE": plat.workspace}
        out = subprocess.run([sys.executable, "main.py"], cwd=project, env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == ["16", "[1, 4, 9, 16, 25]"]
        assert "[build] building foo version 1" in out.stderr
        # the runs happened on the platform: one call and five map items, all recorded
        runs = plat.client().get("/job/foo/runs", params={"limit": 100}).json()["runs"]
        assert sorted(r["trigger"] for r in runs) == ["call"] + ["map"] * 5
        assert all(r["status"] == "succeeded" and r["version"] == 1 for r in runs)


def test_credentials_file_is_enough(tmp_path):
    """With nothing exported, the SDK finds the local platform through OPBOX_HOME's credentials."""
    project = tmp_path / "moonshot"
    shutil.copytree(ROOT / "examples" / "moonshot", project)
    with running_platform(tmp_path / "home") as plat:
        env = {k: v for k, v in os.environ.items() if k not in ("OPBOX_URL", "OPBOX_TOKEN", "OPBOX_WORKSPACE")}
        env["OPBOX_HOME"] = str(plat.home)
        out = subprocess.run([sys.executable, "main.py"], cwd=project, env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines()[0] == "16"


def test_local_call_is_unchanged():
    sys.path.insert(0, str(ROOT / "examples" / "moonshot"))
    try:
        import main

        assert main.foo(3) == 9
        assert main.foo() == 16
        assert main.foo.__name__ == "foo" and main.foo.__doc__ is None
    finally:
        sys.path.remove(str(ROOT / "examples" / "moonshot"))
        sys.modules.pop("main", None)


def test_preset_token_and_workspace_are_used(tmp_path):
    env = {"OPBOX_TOKEN": "obx_preset-token-for-ci", "OPBOX_WORKSPACE": "team-a"}
    with running_platform(tmp_path / "home", extra_env=env) as plat:
        assert plat.token == "obx_preset-token-for-ci" and plat.workspace == "team-a"
        assert plat.client().get("/jobs").json() == {"jobs": []}
        assert "export OPBOX_TOKEN=obx_preset-token-for-ci" in plat.log()
