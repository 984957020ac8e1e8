"""The three trigger paths: Jobs(jid).trigger(), Operator.from_job(jid), and HTTP POST .../trigger."""

from __future__ import annotations

import json
import subprocess

import pytest

from opbox import Jobs, Operator, RunHandle
from opbox.errors import NotFound, ValidationError
from conftest import user_module

CODE = """
from opbox import operator

@operator(name="scorer")
def score(x: int = 5, scale: int = 2):
    print(f"scoring {x}")
    return x * scale
"""


@pytest.fixture(scope="module")
def scorer(plat, client, tmp_path_factory):
    with user_module(tmp_path_factory.mktemp("trig_proj"), "trigmod", CODE) as mod:
        yield mod.score.deploy(client=client, quiet=True)


def test_jobs_trigger_uses_defaults_and_latest_version(scorer, client):
    run = Jobs(scorer.job_id, client).trigger()
    assert isinstance(run, RunHandle)
    assert run.result(timeout=30) == 10
    assert run.status()["version"] == scorer.version and run.status()["trigger"] == "trigger"
    assert Jobs("scorer", client).trigger(7, scale=3).result(timeout=30) == 21
    assert "scoring 7" not in "".join(run.logs()) and "scoring 5" in "".join(run.logs())


def test_from_job_by_id_and_by_name(scorer, client):
    by_id = Operator.from_job(scorer.job_id, client=client)
    by_name = Operator.from_job("scorer", client=client)
    assert by_id.job_id == by_name.job_id == scorer.job_id
    assert by_id(3) == by_name(x=3) == 6
    with pytest.raises(NotFound):
        Operator.from_job("no-such-job", client=client)


def test_curl_trigger_with_and_without_json(scorer, plat):
    base = f"{plat.url}/{plat.workspace}/job/scorer/trigger"
    auth = ["-H", f"Authorization: Bearer {plat.token}"]
    out = subprocess.run(["curl", "-sS", "-X", "POST", *auth, base], capture_output=True, text=True, check=True)
    answer = json.loads(out.stdout)
    assert answer["status"] == "queued" and answer["run_id"].startswith("r-")
    result = subprocess.run(["curl", "-sS", *auth, answer["links"]["result"] + "?wait=30"], capture_output=True,
                            text=True, check=True)
    assert json.loads(result.stdout)["result"] == 10
    out = subprocess.run(["curl", "-sS", "-X", "POST", *auth, "-H", "Content-Type: application/json",
                          "-d", '{"args": [4], "kwargs": {"scale": 10}}', base], capture_output=True, text=True, check=True)
    run = json.loads(out.stdout)
    status = subprocess.run(["curl", "-sS", *auth, run["links"]["self"] + "?wait=30"], capture_output=True, text=True,
                            check=True)
    assert json.loads(status.stdout)["status"] == "succeeded"
    assert RunHandle(run["run_id"], plat.client()).result() == 40


def test_trigger_rejects_bad_bodies(scorer, client):
    for body, message in (({"args": "nope"}, "args"), ({"kwargs": [1]}, "kwargs"), ({"bogus": 1}, "unknown"),
                          ({"version": 0}, "version"), ({"version": 999}, "no version")):
        with pytest.raises((ValidationError, NotFound), match=message):
            client.post("/job/scorer/trigger", json=body)
    resp = client.http.post(client.path("/job/scorer/trigger"), content=b"{not json",
                            headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and "JSON" in resp.json()["message"]


def test_json_nested_too_deep_is_a_400_everywhere_json_is_read(scorer, plat):
    deep = "[" * 100_000 + "]" * 100_000
    with plat.http() as http:
        ws = f"/{plat.workspace}"
        for method, path in (("POST", f"{ws}/job/scorer/trigger"), ("POST", f"{ws}/jobs"), ("POST", f"{ws}/uploads"),
                             ("POST", f"{ws}/tokens"), ("PUT", f"{ws}/services/x"), ("POST", f"{ws}/job/scorer/batches")):
            answer = http.request(method, path, content=deep, headers={"Content-Type": "application/json"})
            assert answer.status_code == 400, (path, answer.status_code, answer.text)
            assert "nested too deeply" in answer.json()["message"]
        assert http.post(f"{ws}/job/scorer/trigger", json={"kwargs": {"x": 2}}).status_code == 202  # the connection lives
