"""The CLI for scripts and CI, run as a user runs it against a real platform: `opbox call` (exit 1 with the remote
traceback when the run fails), `opbox jobs delete` (refused while runs are open), `opbox services delete`,
`opbox runs --limit` past the API's page of 1,000."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import user_module

CODE = """
import os, time
from opbox import operator

@operator()
def add(a, b=0):
    return a + b

@operator()
def broken(x):
    raise ValueError(f"broken on {x}")

@operator()
def napper(marker):
    open(marker, "w").close()
    time.sleep(120)

@operator()
class Greeter:
    def hello(self, name: str):
        return f"hello {name}"
"""


@pytest.fixture(scope="module")
def setup(plat, client, tmp_path_factory):
    env = {**os.environ, "OPBOX_URL": plat.url, "OPBOX_TOKEN": plat.token, "OPBOX_WORKSPACE": plat.workspace}

    def cli(*args, timeout=120):
        return subprocess.run([sys.executable, "-m", "opbox.cli", *args], env=env, capture_output=True, text=True,
                              timeout=timeout)

    with user_module(tmp_path_factory.mktemp("cli_scripts"), "scriptsmod", CODE) as mod:
        fns = {n: getattr(mod, n).deploy(client=client, quiet=True) for n in ("add", "broken", "napper")}
        fns["Greeter"] = mod.Greeter.deploy(client=client, quiet=True)
        yield cli, fns


def test_call_prints_the_result_or_exits_1_with_the_remote_traceback(setup):
    cli, _ = setup
    out = cli("call", "add", "2", "3")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "5"
    out = cli("call", "add", "[1]", "--kwargs", '{"b": [2]}', "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["result"] == [1, 2]
    assert json.loads(cli("call", "add", "ab", "cd").stdout) == "abcd", "an argument that is not JSON is a string"
    out = cli("call", "broken", "7")
    assert out.returncode == 1
    assert "ValueError: broken on 7" in out.stderr and "Remote traceback" in out.stderr and 'raise ValueError' in out.stderr
    out = cli("call", "broken", "8", "--json")
    answer = json.loads(out.stdout)
    assert out.returncode == 1 and answer["status"] == "failed" and "broken on 8" in answer["error"]["traceback"]


def test_runs_limit_pages_past_a_thousand(setup, client):
    cli, fns = setup
    assert fns["add"].map(range(1_050), progress=False)[-1] == 1_049
    out = cli("runs", "add", "--limit", "1100", "--json")
    assert out.returncode == 0, out.stderr
    ids = [r["id"] for r in json.loads(out.stdout)]
    total = len(client.get("/job/add/runs", params={"limit": 1000}).json()["runs"])
    assert total == 1000 and len(ids) > 1_050 and len(set(ids)) == len(ids)
    assert ids == sorted(ids, reverse=True), "newest first, across pages"
    assert len(json.loads(cli("runs", "add", "--limit", "1010", "--json").stdout)) == 1_010


def test_jobs_delete_refuses_while_runs_are_open_then_deletes_everything(setup, client, tmp_path):
    cli, fns = setup
    marker = tmp_path / "started"
    run = fns["napper"].submit(str(marker))
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    out = cli("jobs", "delete", "napper", "--yes")
    assert out.returncode == 1 and "has runs running" in out.stderr and "opbox cancel" in out.stderr
    assert run.status()["status"] == "running", "the run in flight goes on"
    run.cancel()
    run.wait(timeout=30)
    before = client.get("/status").json()["storage"]["bytes"]
    out = cli("jobs", "delete", "napper", "--yes", "--json")
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["name"] == "napper" and answer["runs"] == 1 and answer["bytes"] > 0
    assert "napper" not in cli("jobs").stdout
    assert client.send("GET", "/job/napper").status_code == 404
    assert client.send("GET", f"/runs/{run.id}").status_code == 404
    assert client.get("/status").json()["storage"]["bytes"] == before - answer["bytes"]
    assert cli("jobs", "delete", "napper", "--yes").returncode == 1, "no such job any more"


def test_services_delete_and_a_served_job_is_not_deleted_under_it(setup):
    cli, fns = setup
    assert fns["Greeter"].hello("you") == "hello you"
    out = cli("jobs", "delete", "Greeter", "--yes")
    assert out.returncode == 1 and "delete the service first" in out.stderr
    out = cli("services", "delete", "Greeter")
    assert out.returncode == 0 and "deleted service Greeter" in out.stdout
    assert "Greeter" not in cli("services").stdout
    assert cli("jobs", "delete", "Greeter", "--yes").returncode == 0


def test_jobs_delete_refuses_while_a_map_is_in_flight(setup, client):
    cli, fns = setup
    batch = client.post(f"/job/{fns['broken'].job_id}/batches", json={}).json()["batch_id"]  # items still to come
    out = cli("jobs", "delete", "broken", "--yes")
    assert out.returncode == 1 and batch in out.stderr and "opbox cancel --batch" in out.stderr
    assert cli("cancel", "--batch", batch).returncode == 0
    assert cli("jobs", "delete", "broken", "--yes").returncode == 0


def test_a_deleted_job_takes_its_schedule_with_it(setup, client):
    cli, _ = setup
    assert client.request("PUT", "/job/add/schedule", json={"every": 3600}).status_code == 200
    assert [s["job"] for s in client.get("/schedules").json()["schedules"]] == ["add"]
    assert cli("jobs", "delete", "add", "--yes").returncode == 0
    assert client.get("/schedules").json()["schedules"] == []
