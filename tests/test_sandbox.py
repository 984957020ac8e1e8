"""The local backend's sandbox on its own: what code inside sees, as which uid, and what it may not do."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import require
from opbox.platform.backends.local.process import PASSED
from opbox.platform.backends.local.sandbox import UID_BASE, UidMap, find_sandbox, unsealed_reason

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


# -- end to end: a platform that requires its sandbox ----------------------------------------------
SEALED_CODE = """
import os, sys, time
from opbox import Resource, operator

@operator()
def peek(path):
    try:
        with open(path, "rb") as f:
            return ("read", len(f.read()))
    except OSError as exc:
        return (type(exc).__name__, str(exc))

@operator()
def whoami():
    return {"uid": os.getuid(), "gid": os.getgid(), "cwd": os.getcwd(), "env": sorted(os.environ), "pid": os.getpid(),
            "code": os.environ.get("OPBOX_CODE_DIR"), "token": os.environ.get("OPBOX_TOKEN", "")}

@operator()
def calls_whoami():  # jobs calling jobs, from inside the sandbox, with the run's own token
    from opbox import Operator
    return Operator.from_job("whoami")()["uid"]

@operator()
def plant():
    target = os.path.join(sys.prefix, "lib", "evil.pth")
    try:
        with open(target, "w") as f:
            f.write("import os")
        return "planted"
    except OSError as exc:
        return type(exc).__name__

@operator()
def nap(seconds=30):
    time.sleep(seconds)

@operator(resource=Resource(memory="64Mi"))
def hog():
    blob = bytearray(300 * 2**20)
    time.sleep(5)
    return len(blob)

@operator()
class Teller:
    def whoami(self):
        return {"uid": os.getuid(), "pid": os.getpid()}

    def calls_whoami(self):
        from opbox import Operator
        return Operator.from_job("whoami")()["uid"]
"""

RUNTIME_VARS = {"OPBOX_ENTRY", "OPBOX_CODE_DIR", "OPBOX_GATEWAY_URL", "OPBOX_POOL", "OPBOX_WORKER_ID",
                "OPBOX_WORKER_TOKEN", "OPBOX_RUN_ID", "OPBOX_RUN_TOKEN", "OPBOX_RUNTIME", "PYTHONUNBUFFERED",
                "OPBOX_TOKEN", "OPBOX_URL", "OPBOX_WORKSPACE",  # these three: the run's own, for its SDK calls
                "TRACEPARENT"}  # the run's W3C trace context


@pytest.fixture(scope="module", params=["worker", "run"])
def sealed(request, tmp_path_factory):
    from conftest import user_module
    from platform_fixture import running_platform

    require(find_sandbox(tmp_path_factory.mktemp("probe")) is not None, f"no sandbox here: {unsealed_reason()}")
    env = {"OPBOX_SANDBOX": "required", "OPBOX_ISOLATION": request.param}
    with running_platform(tmp_path_factory.mktemp(f"sealed_{request.param}"), extra_env=env) as plat:
        client = plat.client()
        with user_module(tmp_path_factory.mktemp("sealed_proj"), "sealedmod", SEALED_CODE) as mod:
            fns = {n: getattr(mod, n).deploy(client=client, quiet=True)
                   for n in ("peek", "whoami", "plant", "nap", "hog", "calls_whoami")}
            yield plat, client, mod, fns
        client.close()


def test_a_run_cannot_read_what_the_platform_keeps(sealed):
    plat, _, _, fns = sealed
    for name in ("secret", "credentials.json", "state.db", "gateway.log"):
        outcome, _ = fns["peek"](str(plat.home / name))
        assert outcome == "FileNotFoundError", (name, outcome)  # not even there: the home is not mounted
    assert fns["peek"]("/etc/hostname")[0] in ("read", "FileNotFoundError")


def test_a_run_has_its_workspaces_uid_an_allow_listed_environment_and_read_only_code(sealed):
    _, _, _, fns = sealed
    seen = fns["whoami"]()
    assert seen["uid"] == seen["gid"] >= 200_000 and seen["cwd"] == "/app" and seen["code"] == "/app"
    assert "OPBOX_SECRET" not in seen["env"]
    plat = sealed[0]  # its token is the run's own caller token (jobs calling jobs), never the user's
    assert seen["token"].startswith("obc_") and seen["token"] != plat.token
    leftovers = set(seen["env"]) - RUNTIME_VARS - set(PASSED) - {"HOME", "TMPDIR", "PWD"}
    assert not leftovers, leftovers
    assert fns["plant"]() in ("OSError", "PermissionError")  # the virtualenv is read-only to user code


def test_each_workspace_runs_as_its_own_uid(sealed, tmp_path):
    import json
    import subprocess
    import sys

    plat, _, mod, fns = sealed
    out = subprocess.run([sys.executable, "-m", "opbox.cli", "workspace", "create", "other-team", "--home",
                          str(plat.home), "--json"], capture_output=True, text=True, check=True, env=plat.env)
    other = plat.client(token=json.loads(out.stdout)["token"], workspace="other-team")
    theirs = mod.whoami.deploy(client=other, quiet=True)()
    assert theirs["uid"] != fns["whoami"]()["uid"]
    other.close()


def test_a_sealed_run_calls_another_job_of_its_workspace(sealed):
    _, _, _, fns = sealed
    assert fns["calls_whoami"]() == fns["whoami"]()["uid"] >= 200_000


def test_cancel_and_memory_limits_reach_into_the_sandbox(sealed):
    import time

    from opbox import RunFailed

    _, _, _, fns = sealed
    run = fns["nap"].submit(30)
    deadline = time.monotonic() + 20
    while run.status()["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.cancel()["status"] == "cancelled"
    assert fns["nap"](0) is None  # the same job runs again at once: the cancel reached the run, not the platform
    with pytest.raises(RunFailed, match="OOMKilled"):  # the memory of the whole sandbox counts
        fns["hog"]()


def test_a_served_class_runs_sealed(sealed):
    _, client, mod, _ = sealed
    svc = mod.Teller.deploy(name="teller", client=client, quiet=True)
    try:
        assert svc.whoami()["uid"] >= 200_000
        assert svc.calls_whoami() >= 200_000  # a sealed replica calls a job of its workspace
    finally:
        svc.delete()


SPY_BACKEND = '''
import os, sys
print("SPY-UID", os.getuid(), file=sys.stderr)
print("SPY-OPBOX-ENV", sorted(k for k in os.environ if k.startswith("OPBOX")), file=sys.stderr)
print("SPY-SEES-CREDENTIALS", os.path.exists({creds!r}), file=sys.stderr)
try:
    open(os.path.join({envs!r}, "planted"), "w")
    print("SPY-PLANTED-OUTSIDE yes", file=sys.stderr)
except OSError:
    print("SPY-PLANTED-OUTSIDE no", file=sys.stderr)

def get_requires_for_build_wheel(config_settings=None):
    return []

def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    raise RuntimeError("spy: this package never builds")

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    raise RuntimeError("spy: this package never builds")
'''


def test_a_requirements_build_backend_runs_sealed(sealed, tmp_path):
    """A requirement's build backend is user code: it runs as the workspace's uid, sees no platform
    variables, cannot read the platform's home and can write nothing but its own environment."""
    from opbox import BuildError
    from opbox.decorator import build_version
    from opbox.resource import Resource

    plat, client, _, _ = sealed
    spy = tmp_path / "proj" / "spy"
    spy.mkdir(parents=True)
    (spy / "pyproject.toml").write_text('[build-system]\nrequires = []\nbuild-backend = "spybackend"\n'
                                        'backend-path = ["."]\n\n[project]\nname = "spy"\nversion = "0.1"\n')
    (spy / "spybackend.py").write_text(SPY_BACKEND.format(creds=str(plat.home / "credentials.json"),
                                                          envs=str(plat.home / "envs")))
    (tmp_path / "proj" / "main.py").write_text("def f():\n    return 1\n")
    (tmp_path / "proj" / "requirements.txt").write_text("./spy\n")
    with pytest.raises(BuildError) as failed:
        build_version(tmp_path / "proj", "main:f", "spyjob", "function", Resource(), client, quiet=True)
    log = failed.value.log or ""
    assert "SPY-UID" in log, log[-3000:]
    uid = int(log.split("SPY-UID ")[1].split()[0])
    assert uid >= 200_000
    assert "SPY-OPBOX-ENV []" in log and "SPY-SEES-CREDENTIALS False" in log and "SPY-PLANTED-OUTSIDE no" in log
    assert not (plat.home / "envs" / "planted").exists()


def test_unsealed_builds_get_no_platform_secrets_either(tmp_path):
    """Without a sandbox (OPBOX_SANDBOX=off) a build still gets an allow-listed environment: the admin token
    the platform was started with never reaches a requirement's build backend."""
    from opbox import BuildError
    from opbox.decorator import build_version
    from opbox.resource import Resource
    from platform_fixture import running_platform

    env = {"OPBOX_TOKEN": "obx_admin-token-of-the-platform", "OPBOX_SANDBOX": "off"}
    with running_platform(tmp_path / "home", extra_env=env) as plat:
        spy = tmp_path / "proj" / "spy"
        spy.mkdir(parents=True)
        (spy / "pyproject.toml").write_text('[build-system]\nrequires = []\nbuild-backend = "spybackend"\n'
                                            'backend-path = ["."]\n\n[project]\nname = "spy"\nversion = "0.1"\n')
        (spy / "spybackend.py").write_text(SPY_BACKEND.format(creds="/nonexistent", envs="/nonexistent"))
        (tmp_path / "proj" / "main.py").write_text("def f():\n    return 1\n")
        (tmp_path / "proj" / "requirements.txt").write_text("./spy\n")
        client = plat.client()
        with pytest.raises(BuildError) as failed:
            build_version(tmp_path / "proj", "main:f", "spyjob", "function", Resource(), client, quiet=True)
        client.close()
        assert "SPY-OPBOX-ENV []" in (failed.value.log or ""), (failed.value.log or "")[-2000:]
        assert "NOT isolated" in plat.log()  # the start-up warning
