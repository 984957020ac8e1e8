"""The runs API across jobs (GET /{ws}/runs: filters, cursor paging) and the maps listing (GET /{ws}/batches)."""

from __future__ import annotations

import time

import pytest

from conftest import user_module
from platform_fixture import running_platform

CODE = """
from opbox import operator

@operator()
def double(x):
    return 2 * x

@operator()
def boom(x):
    raise ValueError(f"no {x}")
"""


@pytest.fixture(scope="module")
def plat(tmp_path_factory, state_env):
    """This module runs on SQLite and on PostgreSQL (conftest.state_env)."""
    with running_platform(tmp_path_factory.mktemp("home"), extra_env=state_env) as running:
        yield running


@pytest.fixture(scope="module")
def made(plat, client, tmp_path_factory):
    """Runs of two jobs, made in a known order: 3 calls of double, 2 failing calls of boom, a map of 4."""
    with user_module(tmp_path_factory.mktemp("views_proj"), "viewsmod", CODE) as mod:
        double = mod.double.deploy(client=client, quiet=True)
        boom = mod.boom.deploy(client=client, quiet=True)
        t0 = time.time()
        calls = [double.submit(i) for i in range(3)]
        for run in calls:
            run.result(timeout=30)
        failed = [boom.submit(i) for i in range(2)]
        for run in failed:
            with pytest.raises(Exception):
                run.result(timeout=30)
        assert double.map([1, 2, 3, 4], progress=False) == [2, 4, 6, 8]
        yield {"t0": t0, "calls": [r.id for r in calls], "failed": [r.id for r in failed],
               "double": double.job_id, "boom": boom.job_id}


def runs(http, **params) -> dict:
    resp = http.get(f"/default/runs", params=params)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_all_runs_newest_first(plat, made):
    with plat.http() as http:
        body = runs(http, since=made["t0"])
    ids = [r["id"] for r in body["runs"]]
    assert len(ids) == 9 and ids == sorted(ids, reverse=True)
    assert ids[4:] == made["failed"][::-1] + made["calls"][::-1]
    assert body["next"] is None and body["next_url"] is None
    assert body["runs"][0]["links"]["self"].endswith(f"/default/runs/{ids[0]}")


def test_filters(plat, made):
    with plat.http() as http:
        failed = runs(http, status="failed", since=made["t0"])["runs"]
        assert [r["id"] for r in failed] == made["failed"][::-1]
        assert {r["job_id"] for r in runs(http, job="double", since=made["t0"])["runs"]} == {made["double"]}
        assert len(runs(http, job=made["boom"])["runs"]) == 2  # by id as well as by name
        mapped = runs(http, trigger="map", since=made["t0"])["runs"]
        assert len(mapped) == 4 and {r["batch_id"] for r in mapped} == {mapped[0]["batch_id"]}
        assert len(runs(http, batch=mapped[0]["batch_id"])["runs"]) == 4
        assert runs(http, job="double", status="failed", since=made["t0"])["runs"] == []
        assert runs(http, job="no-such-job")["runs"] == []
        cut = http.get(f"/default/runs/{made['failed'][0]}").json()["created_at"]
        window = runs(http, since=made["t0"], until=cut)["runs"]  # created in [t0, cut): the calls
        assert [r["id"] for r in window] == made["calls"][::-1]
        assert http.get("/default/runs", params={"status": "bogus"}).status_code == 422
        assert http.get("/default/runs", params={"limit": 0}).status_code == 422


def test_cursor_paging_visits_each_run_once(plat, made):
    with plat.http() as http:
        seen, url = [], None
        first = runs(http, since=made["t0"], limit=2)
        seen += [r["id"] for r in first["runs"]]
        url = first["next_url"]
        while url:
            page = http.get(url).json()
            assert len(page["runs"]) <= 2
            seen += [r["id"] for r in page["runs"]]
            url = page["next_url"]
        assert seen == [r["id"] for r in runs(http, since=made["t0"])["runs"]]
        assert len(seen) == 9


def test_batches_with_progress(plat, made):
    with plat.http() as http:
        body = http.get("/default/batches").json()
        latest = body["batches"][0]
        assert latest["job_id"] == made["double"] and latest["total"] == latest["done"] == 4
        progress = http.get(f"/default/batches/{latest['id']}/progress").json()
        assert progress["counts"] == {"succeeded": 4} and progress["finished"] == 4
        assert http.get("/default/batches/b-nope/progress").status_code == 404
        assert len(http.get("/default/batches", params={"limit": 1}).json()["batches"]) == 1


def test_member_tokens_list_runs_and_bad_tokens_do_not(plat, made):
    with plat.http() as http:
        token = http.post("/default/tokens", json={"name": "viewer"}).json()["token"]
    with plat.http(token) as http:
        assert len(runs(http, since=made["t0"])["runs"]) == 9
    with plat.http("obx_not-a-token") as http:
        assert http.get("/default/runs").status_code == 401


def test_documented_in_openapi(plat):
    doc = plat.http().get("/openapi.json").json()
    params = {p["name"] for p in doc["paths"]["/{workspace}/runs"]["get"]["parameters"]}
    assert {"job", "status", "trigger", "batch", "since", "until", "cursor", "limit"} <= params
    assert "/{workspace}/batches" in doc["paths"]
