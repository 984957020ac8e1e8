"""The `opbox` command line, run as a user runs it, against a real platform."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

CODE = """
import time
from opbox import operator

@operator()
def greet(name="world"):
    print(f"hello {name}")
    return f"hi {name}"

@operator()
def broken(x=1):
    raise ValueError(f"broken on {x}")

@operator()
def napper(seconds=30):
    print("napping", flush=True)
    time.sleep(seconds)
"""


@pytest.fixture(scope="module")
def cli(plat, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_proj")
    (folder / "climod.py").write_text(CODE)
    env = {**os.environ, "OPBOX_URL": plat.url, "OPBOX_TOKEN": plat.token, "OPBOX_WORKSPACE": plat.workspace}

    def run(*args, check=True, timeout=60):
        out = subprocess.run([sys.executable, "-m", "opbox.cli", *args], env=env, capture_output=True, text=True,
                             timeout=timeout, cwd=folder)
        if check:
            assert out.returncode == 0, out.stderr
        return out

    run.folder = folder
    return run


def test_help_everywhere(cli):
    for command in ([], ["up"], ["deploy"], ["jobs"], ["runs"], ["logs"], ["trigger"], ["cancel"], ["batch"], ["status"],
                    ["workspace", "create"], ["tokens", "list"], ["tokens", "create"], ["tokens", "revoke"]):
        out = cli(*command, "--help")
        assert "Usage:" in out.stdout


def test_deploy_jobs_trigger_runs_logs(cli):
    deployed = json.loads(cli("deploy", "climod.py:greet", "--json").stdout)
    assert deployed["name"] == "greet" and deployed["version"] == 1
    jobs = json.loads(cli("jobs", "--json").stdout)
    assert any(j["name"] == "greet" and j["latest_version"] == 1 for j in jobs)
    assert "greet" in cli("jobs").stdout
    done = json.loads(cli("trigger", "greet", "--kwargs", '{"name": "cli"}', "--wait", "--json").stdout)
    assert done["status"] == "succeeded" and done["result"] == "hi cli"
    runs = json.loads(cli("runs", "greet", "--json").stdout)
    assert runs[0]["id"] == done["run_id"]
    assert "hello cli" in cli("logs", done["run_id"]).stdout
    assert json.loads(cli("status", done["run_id"], "--json").stdout)["status"] == "succeeded"
    assert "succeeded" in cli("runs", "greet").stdout


def test_a_failed_run_exits_non_zero_with_its_traceback(cli):
    cli("deploy", "climod.py:broken", "--json")
    failed = cli("trigger", "broken", "--args", "[7]", "--wait", check=False)
    assert failed.returncode == 1 and failed.stdout == ""
    assert "ValueError: broken on 7" in failed.stderr and "Remote traceback:" in failed.stderr
    assert 'raise ValueError(f"broken on {x}")' in failed.stderr  # the user's frame
    as_json = cli("trigger", "broken", "--wait", "--json", check=False)
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["error"]["type"].endswith("ValueError")
    started = json.loads(cli("trigger", "greet", "--json").stdout)
    assert cli("result", started["run_id"]).stdout.strip() == '"hi world"'
    again = cli("result", json.loads(cli("trigger", "broken", "--json").stdout)["run_id"], check=False)
    assert again.returncode == 1 and "broken on 1" in again.stderr


def test_runs_across_jobs_with_filters_and_pages_past_a_thousand(cli, plat):
    cli("deploy", "climod.py:greet", "--json")
    cli("deploy", "climod.py:broken", "--json")
    ok = json.loads(cli("trigger", "greet", "--wait", "--json").stdout)
    bad = json.loads(cli("trigger", "broken", "--wait", "--json", check=False).stdout)
    every = json.loads(cli("runs", "--json", "--limit", "100").stdout)
    assert {ok["run_id"], bad["run_id"]} <= {r["id"] for r in every}  # both jobs, one list
    assert [r["id"] for r in every] == sorted((r["id"] for r in every), reverse=True)
    failed = json.loads(cli("runs", "--status", "failed", "--since", "10m", "--json").stdout)
    assert bad["run_id"] in {r["id"] for r in failed} and {r["status"] for r in failed} == {"failed"}
    assert json.loads(cli("runs", "--since", str(time.time() + 3600), "--json").stdout) == []
    assert "neither a duration" in cli("runs", "--since", "soon", check=False).stderr
    with plat.http() as http:  # 1,100 more runs: a map of them, read back 1,050 at a time over two pages
        from opbox import RemoteFunction
        fn = RemoteFunction("greet", client=plat.client())
        assert len(list(fn.map(["x"] * 1100))) == 1100
        assert http.get(f"/{plat.workspace}/runs", params={"trigger": "map", "limit": 1000}).json()["next"]
    mapped = json.loads(cli("runs", "greet", "--trigger", "map", "--limit", "1050", "--json").stdout)
    assert len(mapped) == 1050 and len({r["id"] for r in mapped}) == 1050


def test_follow_logs_and_cancel(cli):
    cli("deploy", "climod.py:napper", "--json")
    started = json.loads(cli("trigger", "napper", "--json").stdout)
    deadline = time.monotonic() + 20
    while json.loads(cli("status", started["run_id"], "--json").stdout)["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    cancelled = json.loads(cli("cancel", started["run_id"], "--json").stdout)
    assert cancelled["status"] == "cancelled"
    follow = cli("logs", "-f", started["run_id"], timeout=20)
    assert "napping" in follow.stdout


def test_tokens_commands(cli):
    made = json.loads(cli("tokens", "create", "robot", "--json").stdout)
    assert made["token"].startswith("obx_") and made["role"] == "member"
    listed = json.loads(cli("tokens", "list", "--json").stdout)
    assert any(t["id"] == made["id"] and t["revoked_at"] is None for t in listed)
    assert "revoked" in cli("tokens", "revoke", made["id"]).stdout
    listed = json.loads(cli("tokens", "list", "--json").stdout)
    assert next(t for t in listed if t["id"] == made["id"])["revoked_at"] is not None


def test_errors_are_clear(cli):
    out = cli("runs", "no-such-job", check=False)
    assert out.returncode == 1 and "error: no job 'no-such-job'" in out.stderr
    out = cli("deploy", "climod.py", check=False)
    assert out.returncode != 0 and "TARGET must look like" in out.stderr
    out = cli("trigger", "greet", "--args", "not json", check=False)
    assert out.returncode != 0 and "JSON" in out.stderr


def test_restart_with_a_revoked_bootstrap_token_starts_and_says_so(tmp_path):
    from platform_fixture import running_platform

    env = {"OPBOX_TOKEN": "obx_bootstrap-token-for-the-test", "OPBOX_WORKSPACE": "boot"}
    with running_platform(tmp_path / "home", extra_env=env) as first:
        with first.http(token=env["OPBOX_TOKEN"]) as http:
            (token,) = [t for t in http.get("/boot/tokens").json()["tokens"] if t["name"] == "bootstrap"]
            assert http.delete(f"/boot/tokens/{token['id']}").status_code == 200
    (tmp_path / "home" / "gateway.log").rename(tmp_path / "home" / "gateway.first.log")
    with running_platform(tmp_path / "home", extra_env=env) as second:
        assert "OPBOX_TOKEN is a revoked token" in second.log()
        with second.http(token=env["OPBOX_TOKEN"]) as http:
            assert http.get("/boot/jobs").status_code == 401
