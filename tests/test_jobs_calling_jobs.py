"""Jobs calling jobs: a run's code (and a service replica's) calls, maps and triggers the jobs and services of its
own workspace with the SDK, as a user would, with a caller's token the platform gives it: scoped to that run
(that service), never the user's, refused for anything but calls and reads, revoked when the run ends. Child
runs name their parent; cancelling, failing or timing out a parent cancels what it started, recursively.
Both local isolations: warm workers and one-shot processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from conftest import user_module, wait_for
from test_dashboard import login
from opbox import RemoteService
from platform_fixture import running_platform

CODE = """
import json, os, time
from opbox import Jobs, Operator, RemoteService, operator

@operator()
class Doubler:
    def double(self, x):
        return 2 * x

@operator()
class Relay:  # a service whose method calls a job
    def through_job(self, x):
        return Operator.from_job("item")(x)

    def token(self):
        return os.environ.get("OPBOX_TOKEN")

@operator()
def item(x):  # level 3: a served class of the same workspace
    return RemoteService("doubler").double(x) + 1

@operator()
def fan(n):  # level 1 maps level 2 over n items
    return Operator.from_job("item").map(range(n), progress=False)

@operator()
def nap(seconds=60):
    time.sleep(seconds)
    return seconds

@operator()
def nap_and_spawn(seconds=60):  # starts a grandchild, then sleeps
    Jobs("nap").trigger(seconds)
    time.sleep(seconds)

@operator()
def tree(n, seconds=60):  # a submitted child and a map of n items, each with a child of its own
    Operator.from_job("nap").submit(seconds)
    return Operator.from_job("nap_and_spawn").map([seconds] * n, concurrency=n, progress=False)

@operator()
def bounded(seconds=60):  # deployed with a short timeout: its child's deadline is at most what is left of it
    Jobs("nap").trigger(seconds)
    time.sleep(seconds)

@operator()
def fails_after_spawning():
    Jobs("nap").trigger(60)
    raise ValueError("the parent fails")

@operator()
def token(out_file=None, release_file=None):
    if out_file:  # show the test the token, and hold the run open until it has used it
        with open(out_file + ".tmp", "w") as f:
            json.dump({"token": os.environ.get("OPBOX_TOKEN")}, f)
        os.rename(out_file + ".tmp", out_file)
        while not os.path.exists(release_file):
            time.sleep(0.05)
    return {"token": os.environ.get("OPBOX_TOKEN"), "url": os.environ.get("OPBOX_URL"),
            "workspace": os.environ.get("OPBOX_WORKSPACE")}
"""

FUNCTIONS = ("item", "fan", "nap", "nap_and_spawn", "tree", "fails_after_spawning", "token")
OPEN = ("queued", "running")
pytestmark = pytest.mark.both_databases  # the calls fixture's parameters: on SQLite, and on PostgreSQL


@pytest.fixture(scope="module", params=[("worker", "sqlite"), ("run", "sqlite"), ("worker", "postgres")],
                ids=lambda p: "-".join(p))
def calls(request, tmp_path_factory):
    """Both isolations on SQLite; warm workers on PostgreSQL too (children found by parent_run_id in its records)."""
    isolation, state = request.param
    env = {"OPBOX_ISOLATION": isolation, "OPBOX_MAX_WORKERS": "12", "OPBOX_MAX_RUNNING": "12"}
    if state == "postgres":
        env["OPBOX_DATABASE_URL"] = request.getfixturevalue("pg_server").database()
    with running_platform(tmp_path_factory.mktemp(f"calls_{isolation}"), extra_env=env) as plat:
        client = plat.client()
        with user_module(tmp_path_factory.mktemp("calls_proj"), "callsmod", CODE) as mod:
            fns = {name: getattr(mod, name).deploy(client=client, quiet=True) for name in FUNCTIONS}
            fns["bounded"] = mod.bounded.deploy(client=client, quiet=True, timeout=4)
            mod.Doubler.deploy(name="doubler", client=client, quiet=True)
            yield plat, client, mod, fns
        client.close()


def runs_of(http: httpx.Client, ws: str, **filters) -> list[dict]:
    answer = http.get(f"/{ws}/runs", params={"limit": 1000, **filters})
    assert answer.status_code == 200, answer.text
    return answer.json()["runs"]


def descendants(http: httpx.Client, ws: str, run_id: str) -> list[dict]:
    found, todo = [], [run_id]
    while todo:
        children = runs_of(http, ws, parent=todo.pop())
        found += children
        todo += [c["id"] for c in children]
    return found


def test_a_job_maps_a_job_that_calls_a_service(calls):
    plat, _, _, fns = calls
    top = fns["fan"].submit(5)
    assert top.result(timeout=120) == [2 * x + 1 for x in range(5)]
    with plat.http() as http:
        items = runs_of(http, plat.workspace, parent=top.id)
        assert sorted(r["batch_index"] for r in items) == list(range(5))
        assert all(r["parent_run_id"] == top.id and r["trigger"] == "map" and r["status"] == "succeeded"
                   for r in items)
        assert "parent_run_id" not in http.get(f"/{plat.workspace}/runs/{top.id}").json()  # the user started it
    env = {**os.environ, "OPBOX_URL": plat.url, "OPBOX_TOKEN": plat.token, "OPBOX_WORKSPACE": plat.workspace}
    listed = subprocess.run([sys.executable, "-m", "opbox.cli", "runs", "--parent", top.id, "--json"], env=env,
                            capture_output=True, text=True, check=True)
    assert sorted(r["id"] for r in json.loads(listed.stdout)) == sorted(r["id"] for r in items)
    browser = login(plat)  # the dashboard's run page lists the runs it started, and each names its parent
    try:
        page = browser.get(f"/_ui/runs/{top.id}")
        assert page.status_code == 200 and all(r["id"] in page.text for r in items)
        assert f'href="/_ui/runs/{top.id}"' in browser.get(f"/_ui/runs/{items[0]['id']}").text
    finally:
        browser.close()


def test_a_served_class_calls_a_job_with_its_own_token(calls):
    plat, client, mod, _ = calls
    relay = mod.Relay.deploy(name="relay", client=client, quiet=True)
    try:
        assert relay.through_job(20) == 41  # the relay calls item, which calls doubler
        token = relay.token()
        assert token.startswith(f"obc_s:{plat.workspace}/relay:") and token != plat.token
    finally:
        relay.delete()
    with httpx.Client(base_url=plat.url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        assert http.get(f"/{plat.workspace}/jobs").status_code == 401  # the service is gone: its token too


def test_cancelling_the_top_cancels_every_run_below_it(calls):
    plat, _, _, fns = calls
    top = fns["tree"].submit(2, 120)
    with plat.http() as http:
        ws = plat.workspace
        # the submitted nap, two map items, and each item's own nap: five runs below the top, all running
        wait_for(lambda: len(below := descendants(http, ws, top.id)) == 5 and
                 all(r["status"] == "running" for r in below), timeout=120)
        assert top.cancel()["status"] == "cancelled"
        wait_for(lambda: not any(r["status"] in OPEN for r in descendants(http, ws, top.id)), timeout=60)
        below = descendants(http, ws, top.id)
        assert len(below) == 5 and {r["status"] for r in below} == {"cancelled"}
        assert all("its parent run" in r["exit_reason"] for r in below)
        items = [r for r in below if r.get("batch_id")]
        assert len(items) == 2
        batch = http.get(f"/{ws}/batches/{items[0]['batch_id']}").json()
        assert batch["cancelled"] == 1


def test_a_parent_that_fails_cancels_its_children(calls):
    plat, _, _, fns = calls
    top = fns["fails_after_spawning"].submit()
    with pytest.raises(ValueError, match="the parent fails"):  # the remote exception, re-raised
        top.result(timeout=60)
    with plat.http() as http:
        child = wait_for(lambda: runs_of(http, plat.workspace, parent=top.id), timeout=30)[0]
        done = wait_for(lambda: (r := http.get(f"/{plat.workspace}/runs/{child['id']}").json())["status"] not in OPEN
                        and r, timeout=60)
        assert done["status"] == "cancelled" and top.id in done["exit_reason"]


def test_a_parents_timeout_bounds_its_children(calls):
    plat, _, _, fns = calls
    top = fns["bounded"].submit(60)
    with plat.http() as http:
        child = wait_for(lambda: runs_of(http, plat.workspace, parent=top.id), timeout=60)[0]
        assert child["timeout"] is not None and child["timeout"] <= 4  # nap has none of its own
        assert top.wait(timeout=60)["status"] == "timed_out"
        done = wait_for(lambda: (r := http.get(f"/{plat.workspace}/runs/{child['id']}").json())["status"] not in OPEN
                        and r, timeout=60)
        assert done["status"] in ("cancelled", "timed_out")


def test_the_runs_token_is_its_own_and_is_revoked_when_it_ends(calls):
    plat, _, _, fns = calls
    seen = fns["token"]()
    token, ws = seen["token"], plat.workspace
    assert token.startswith("obc_") and token != plat.token
    assert seen["url"] == plat.url and seen["workspace"] == ws
    with httpx.Client(base_url=plat.url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        assert http.get(f"/{ws}/jobs").status_code == 401  # the run has ended


def test_a_running_runs_token_may_call_but_not_administer(calls, tmp_path):
    """While its run runs, the token calls and reads; admin routes, deploys, deletes, schedules and secrets
    answer 403, and so does any other workspace (whether it exists or not)."""
    plat, _, _, fns = calls
    out, release = tmp_path / "token.json", tmp_path / "release"
    run = fns["token"].submit(str(out), str(release))
    ws = plat.workspace
    try:
        token = json.loads(wait_for(lambda: out.exists() and out.read_text(), timeout=60))["token"]
        with httpx.Client(base_url=plat.url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
            assert http.get(f"/{ws}/jobs").status_code == 200
            assert http.get(f"/{ws}/job/item").status_code == 200
            assert http.get(f"/{ws}/runs/{run.id}").json()["status"] == "running"
            refused = {
                "mint a token": http.post(f"/{ws}/tokens", json={"name": "mine"}),
                "list tokens": http.get(f"/{ws}/tokens"),
                "write a secret": http.put(f"/{ws}/secrets/stolen", json={"values": {"K": "v"}}),
                "list secrets": http.get(f"/{ws}/secrets"),
                "deploy": http.post(f"/{ws}/jobs", json={"name": "x", "entry": "m:f", "code_sha256": "0" * 64,
                                                          "python": "3.11"}),
                "upload": http.post(f"/{ws}/uploads", json={"sha256": "0" * 64, "size": 1}),
                "delete a job": http.delete(f"/{ws}/job/nap"),
                "set a schedule": http.put(f"/{ws}/job/nap/schedule", json={"cron": "* * * * *"}),
                "deploy a service": http.put(f"/{ws}/services/other", json={"job": "item"}),
                "delete a service": http.delete(f"/{ws}/services/doubler"),
                "another workspace": http.get("/other-team/jobs"),
                "a workspace that does not exist": http.get("/nobody-here/jobs"),
            }
            for what, answer in refused.items():
                assert answer.status_code == 403, (what, answer.status_code, answer.text)
            forged = token[:-3] + ("aaa" if not token.endswith("aaa") else "bbb")
            assert http.get(f"/{ws}/jobs", headers={"Authorization": f"Bearer {forged}"}).status_code == 401
            kind, subject, rest = token.split(":", 2)  # the same proof for another run (or worker): refused
            other = f"{kind}:{subject[:-2]}zz:{rest}" if kind == "obc_r" else f"{kind}:{subject}:w-other:{rest.split(':', 1)[1]}"
            assert http.get(f"/{ws}/jobs", headers={"Authorization": f"Bearer {other}"}).status_code == 401
        with plat.http() as http:
            assert http.get(f"/{ws}/job/nap").status_code == 200  # nothing was deleted
    finally:
        release.write_text("go")
    assert run.result(timeout=60)["token"] == token


def test_a_service_handle_works_from_the_test_too(calls):
    """The doubler the items call is an ordinary service: the user's token reaches it as before."""
    plat, client, _, _ = calls
    assert RemoteService("doubler", client=client).double(5) == 10


def test_the_readme_example_runs(calls, tmp_path):
    from pathlib import Path

    plat = calls[0]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### Jobs calling jobs"):]
    (tmp_path / "pipeline.py").write_text(section.split("```python\n", 1)[1].split("```", 1)[0])
    env = {**plat.env, "OPBOX_URL": plat.url, "OPBOX_TOKEN": plat.token, "OPBOX_WORKSPACE": plat.workspace}
    out = subprocess.run([sys.executable, "pipeline.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-1] == "5"
    with plat.http() as http:  # the report it triggered names it, and outlives it (the parent succeeded)
        (pipeline,) = runs_of(http, plat.workspace, job="pipeline")
        children = runs_of(http, plat.workspace, parent=pipeline["id"])
        assert {r["trigger"] for r in children} == {"map", "trigger"} and len(children) == 3
        report = next(r for r in children if r["trigger"] == "trigger")
        done = wait_for(lambda: (r := http.get(f"/{plat.workspace}/runs/{report['id']}").json())["status"]
                        not in OPEN and r, timeout=60)
        assert done["status"] == "succeeded"
