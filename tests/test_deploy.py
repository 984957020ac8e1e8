"""Deploying: packing and upload, versions, the requirements cache, build failures."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import httpx
import pytest

from opbox import BuildError, Jobs, Operator
from opbox.errors import ConfigError, NotFound, PayloadTooLarge

FN = """
from opbox import operator

@operator()
def probe(name):
    import os
    return os.path.exists(name)

@operator()
def version_tag():
    return TAG

TAG = "v1"
"""


def test_each_deploy_is_a_new_version_and_runs_record_it(client, user_code):
    mod = user_code(FN)
    first = mod.version_tag.deploy(client=client, quiet=True)
    assert first() == "v1"
    source = Path(mod.__file__)
    source.write_text(source.read_text().replace('TAG = "v1"', 'TAG = "v2"'))
    second = mod.version_tag.deploy(client=client, quiet=True)
    assert (first.job_id, first.version + 1) == (second.job_id, second.version)
    assert second() == "v2"
    assert first() == "v1", "a deploy's handle stays pinned to its version"
    assert Operator.from_job(first.job_id, client=client)() == "v2", "from_job follows the latest"
    versions = Jobs(first.job_id, client).versions()
    assert [v["version"] for v in versions] == [second.version, first.version]
    assert all(v["status"] == "ready" and v["python"] == f"{sys.version_info[0]}.{sys.version_info[1]}"
               for v in versions)
    ran = {r["version"] for r in first.runs()}
    assert ran == {first.version, second.version}


def test_opboxignore_and_default_ignores_keep_files_out(client, user_code):
    mod = user_code(FN, files={
        ".opboxignore": "data/\n*.secret\n!keep.secret\n",
        "data/big.csv": "x", "token.secret": "s", "keep.secret": "k", ".env": "API_KEY=1",
        "__pycache__/junk.txt": "j", "lib/helper.py": "X = 1",
    })
    remote = mod.probe.deploy(client=client, quiet=True)
    assert remote("lib/helper.py") is True
    assert remote("keep.secret") is True
    for excluded in ("data/big.csv", "token.secret", ".env", "__pycache__/junk.txt"):
        assert remote(excluded) is False, excluded


def _wheel(tmp: Path, name: str, version: str, body: str) -> Path:
    """A minimal pure-Python wheel, written by hand (no pip, no network)."""
    import base64
    import zipfile

    files = {
        f"{name}/__init__.py": body,
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: opbox-tests\nRoot-Is-Purelib: true\n"
                                              "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    files[f"{name}-{version}.dist-info/RECORD"] = "\n".join(record) + "\n"
    out = tmp / "wheels" / f"{name}-{version}-py3-none-any.whl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return out


def test_requirements_are_installed_and_cached_by_hash(client, user_code, tmp_path, capsys):
    wheel = _wheel(tmp_path, "obxdemo", "1.0", "ANSWER = 42\n")
    mod = user_code("""
        from opbox import operator

        @operator()
        def answer():
            import obxdemo
            return obxdemo.ANSWER
    """, files={"requirements.txt": f"# pinned\n{wheel}\n"})
    remote = mod.answer.deploy(client=client)
    assert remote() == 42
    first_log = capsys.readouterr().err
    assert "installing requirements.txt" in first_log
    # a code-only change: the environment is reused, not rebuilt
    source = Path(mod.__file__)
    source.write_text(source.read_text() + "\n# a code change\n")
    again = mod.answer.deploy(client=client)
    second_log = capsys.readouterr().err
    assert again.version == remote.version + 1 and again() == 42
    assert "requirements unchanged: reusing environment" in second_log
    assert "installing requirements.txt" not in second_log


def test_failed_build_raises_with_its_log(client, user_code):
    mod = user_code("""
        from opbox import operator

        @operator()
        def broken():
            return 1
    """, files={"requirements.txt": "/nonexistent/opbox-no-such-wheel-1.0-py3-none-any.whl\n"})
    with pytest.raises(BuildError) as info:
        mod.broken.deploy(client=client, quiet=True)
    assert "installing requirements.txt failed" in str(info.value)
    assert "opbox-no-such-wheel" in info.value.log
    versions = Jobs("broken", client).versions()
    assert versions[0]["status"] == "failed" and versions[0]["error"]
    with pytest.raises(Exception, match="no ready version"):
        Jobs("broken", client).trigger()


def test_upload_slots_are_content_addressed_and_size_limited(client, plat):
    data = b"not really a zip"
    sha = hashlib.sha256(data).hexdigest()
    slot = client.post("/uploads", json={"sha256": sha, "size": len(data)}).json()
    assert slot["exists"] is False and slot["upload"]["method"] == "PUT"
    assert httpx.put(slot["upload"]["url"], content=data).status_code < 300
    assert client.post("/uploads", json={"sha256": sha, "size": len(data)}).json()["exists"] is True
    with pytest.raises(PayloadTooLarge):
        client.post("/uploads", json={"sha256": sha, "size": 10**12})
    # deploying something that is not a zip fails cleanly, as a build error
    with pytest.raises(Exception, match="(?i)zip"):
        for _ in client.stream_lines("POST", "/jobs", json={
                "name": "notzip", "entry": "m:f", "code_sha256": sha, "python": "3.11"}):
            if "error" in _:
                raise BuildError(_["error"]["message"])


def test_deploy_of_unknown_code_is_404(client):
    with pytest.raises(NotFound):
        list(client.stream_lines("POST", "/jobs", json={
            "name": "ghost", "entry": "m:f", "code_sha256": "0" * 64, "python": "3.11"}))


def test_python_version_mismatch_fails_at_deploy(client, plat, user_code):
    mod = user_code(FN)
    from opbox.packaging import pack_folder

    packed = pack_folder(Path(mod.__file__).parent)
    slot = client.post("/uploads", json={"sha256": packed.sha256, "size": len(packed.data)}).json()
    if not slot["exists"]:
        httpx.put(slot["upload"]["url"], content=packed.data).raise_for_status()
    lines = list(client.stream_lines("POST", "/jobs", json={
        "name": "oldpy", "entry": f"{Path(mod.__file__).stem}:probe", "code_sha256": packed.sha256,
        "python": "3.7"}))
    assert "error" in lines[-1]
    assert "Python 3.7" in lines[-1]["error"]["message"] and "cannot cross" in lines[-1]["error"]["message"]


def test_deploy_inside_the_runtime_is_refused(client, user_code):
    mod = user_code("""
        from opbox import operator

        @operator()
        def helper():
            return 1

        @operator()
        def redeployer():
            return helper.deploy()
    """)
    remote = mod.redeployer.deploy(client=client, quiet=True)
    with pytest.raises(ConfigError, match="if __name__"):
        remote()


def test_a_gateway_killed_mid_build_fails_that_version_on_restart(tmp_path):
    """A sealed build dies with its gateway (its sandbox's PID namespace ends, taking every process of the
    build with it); on restart the version says why it failed instead of staying `building` forever."""
    import subprocess
    import threading
    import time

    from conftest import require
    from opbox.decorator import build_version
    from opbox.platform.backends.local.sandbox import find_sandbox, unsealed_reason
    from opbox.resource import Resource
    from platform_fixture import running_platform

    require(find_sandbox(tmp_path) is not None, f"no sandbox here: {unsealed_reason()}")
    proj = tmp_path / "proj"
    (proj / "slowpkg").mkdir(parents=True)
    (proj / "main.py").write_text("def f():\n    return 1\n")
    token = f"slowbackend{os.getpid()}"
    (proj / "slowpkg" / "pyproject.toml").write_text(
        f'[build-system]\nrequires = []\nbuild-backend = "{token}"\nbackend-path = ["."]\n\n'
        '[project]\nname = "slowpkg"\nversion = "0.1"\n')
    (proj / "slowpkg" / f"{token}.py").write_text("import time\ntime.sleep(120)\n")
    (proj / "requirements.txt").write_text("./slowpkg\n")

    def building() -> list[str]:
        return subprocess.run(["pgrep", "-f", token], capture_output=True, text=True).stdout.split()

    home = tmp_path / "home"
    with running_platform(home, extra_env={"OPBOX_SANDBOX": "required"}) as first:
        client = first.client()
        threading.Thread(target=_quietly, args=(build_version, proj, "main:f", "slowjob", "function", Resource(),
                                                client, True), daemon=True).start()
        deadline = time.monotonic() + 60
        while not building() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert building(), "the build never started"
        first.kill()  # SIGKILL: no chance to clean up
    deadline = time.monotonic() + 10
    while building() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not building(), "the build outlived its gateway"
    (home / "gateway.log").rename(home / "gateway.first.log")
    with running_platform(home, extra_env={"OPBOX_SANDBOX": "required"}) as second:
        versions = second.client().get("/job/slowjob/versions").json()["versions"]
        assert versions[0]["status"] == "failed" and "stopped while this version was building" in versions[0]["error"]


def _quietly(fn, *args):
    try:
        fn(*args)
    except Exception:
        pass  # the gateway is killed under it: the test checks what the platform says afterwards
