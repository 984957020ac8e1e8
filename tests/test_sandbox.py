"""The local backend's sandbox on its own: what code inside sees, as which uid, and what it may not do."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import require
from opbox.platform.backends.sandbox import UID_BASE, UidMap, find_sandbox, unsealed_reason

PROBE = """
import json, os, sys
def can(fn):
    try:
        fn(); return True
    except OSError:
        return False
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "cwd": os.getcwd(),
    "app": sorted(os.listdir("/app")) if os.path.isdir("/app") else None,
    "home_visible": os.path.exists(sys.argv[1]),
    "pids": sorted(p for p in os.listdir("/proc") if p.isdigit()),
    "write_tmp": can(lambda: open("/tmp/x", "w").write("1")),
    "write_venv": can(lambda: open(os.path.join(sys.prefix, "evil.pth"), "w").write("import os")),
    "write_app": can(lambda: open("/app/new.py", "w").write("")),
    "read_shadow": can(lambda: open("/etc/shadow").read()),
    "env": sorted(os.environ),
}))
"""


@pytest.fixture
def sandbox(tmp_path):
    found = find_sandbox(tmp_path)
    require(found is not None, f"no sandbox here: {unsealed_reason()}")
    return found


def probe(sandbox, tmp_path, workspace: str) -> dict:
    (tmp_path / "secret").write_text("s3cret")
    code = tmp_path / "code"
    code.mkdir(exist_ok=True)
    (code / "main.py").write_text("x = 1\n")
    cmd = sandbox.command([sys.executable, "-c", PROBE, str(tmp_path / "secret")], workspace=workspace,
                          code_dir=str(code))
    out = subprocess.run(cmd, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "KEEP": "1"}, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_code_runs_as_its_workspaces_uid_and_sees_only_what_it_needs(sandbox, tmp_path):
    seen = probe(sandbox, tmp_path, "alpha")
    assert seen["uid"] == seen["gid"] >= UID_BASE and seen["groups"] == []
    assert seen["cwd"] == "/app" and seen["app"] == ["main.py"]
    assert seen["home_visible"] is False  # the platform's home (its secret, state, credentials) is not there
    assert seen["pids"] == ["1", "2"]  # no other process on the machine is visible
    assert seen["write_tmp"] is True
    assert seen["write_venv"] is False and seen["write_app"] is False and seen["read_shadow"] is False
    # only what the caller passed (bwrap sets PWD; Python's locale coercion may set LC_CTYPE)
    assert set(seen["env"]) - {"PWD", "LC_CTYPE"} == {"KEEP", "PATH"}


def test_each_workspace_has_its_own_uid_kept_across_restarts(sandbox, tmp_path):
    alpha, beta = probe(sandbox, tmp_path, "alpha")["uid"], probe(sandbox, tmp_path, "beta")["uid"]
    assert alpha != beta
    again = UidMap(tmp_path / "sandbox-uids.json")
    assert again.uid("alpha") == alpha and again.uid("beta") == beta


def test_processes_left_in_the_sandbox_end_with_it(sandbox, tmp_path):
    token = f"opbox-sandbox-leftover-{os.getpid()}"
    code = ("import subprocess, sys\n"
            f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', '{token}'], start_new_session=True)\n")
    cmd = sandbox.command([sys.executable, "-c", code], workspace="alpha")
    out = subprocess.run(cmd, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=30)
    assert out.returncode == 0, out.stderr
    left = subprocess.run(["pgrep", "-f", token], capture_output=True, text=True)
    assert left.stdout.strip() == "", "a detached process outlived its sandbox"
