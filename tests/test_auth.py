"""Workspaces and tokens: every API route but health needs the bearer token of the path's workspace."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from opbox import Jobs
from opbox.errors import AuthError, Forbidden, NotFound


@pytest.fixture(scope="module")
def other(plat):
    out = subprocess.run([sys.executable, "-m", "opbox.cli", "workspace", "create", "team-b", "--home", str(plat.home),
                          "--json"], capture_output=True, text=True, check=True, env=plat.env)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def deployed(plat, client, tmp_path_factory):
    import importlib

    folder = tmp_path_factory.mktemp("auth_proj")
    (folder / "authmod.py").write_text("from opbox import operator\n\n@operator()\ndef secret(x=1):\n    return 'S3CRET'\n")
    sys.path.insert(0, str(folder))
    remote = importlib.import_module("authmod").secret.deploy(client=client, quiet=True)
    run = Jobs(remote.job_id, client).trigger()
    run.result(timeout=30)
    yield remote, run.id
    sys.modules.pop("authmod", None)


def test_health_and_openapi_need_no_token(plat):
    assert httpx.get(plat.url + "/healthz").status_code == 200
    assert httpx.get(plat.url + "/openapi.json").status_code == 200


def _paths(deployed, ws):
    remote, run_id = deployed
    return [("GET", f"/{ws}/jobs"), ("GET", f"/{ws}/job/{remote.job_id}"), ("GET", f"/{ws}/job/secret/runs"),
            ("POST", f"/{ws}/job/secret/trigger"), ("GET", f"/{ws}/runs/{run_id}"),
            ("GET", f"/{ws}/runs/{run_id}/result"), ("GET", f"/{ws}/runs/{run_id}/logs"),
            ("POST", f"/{ws}/runs/{run_id}/cancel"), ("GET", f"/{ws}/job/secret/versions"), ("GET", f"/{ws}/tokens"),
            ("POST", f"/{ws}/uploads"), ("GET", f"/{ws}/status")]


@pytest.mark.parametrize("authorization,status", [
    (None, 401), ("Bearer", 401), ("Basic abc", 401), ("Bearer obx_not-a-real-token", 401), ("Bearer " + "x" * 500, 401),
])
def test_missing_or_bad_tokens_get_401_and_no_data(plat, deployed, authorization, status):
    headers = {"Authorization": authorization} if authorization else {}
    for method, path in _paths(deployed, plat.workspace):
        resp = httpx.request(method, plat.url + path, headers=headers)
        assert resp.status_code == status, (method, path, resp.text)
        assert "S3CRET" not in resp.text and deployed[0].job_id not in resp.text and deployed[1] not in resp.text


def test_another_workspaces_token_gets_404_and_no_data(plat, deployed, other):
    headers = {"Authorization": f"Bearer {other['token']}"}
    for method, path in _paths(deployed, plat.workspace):
        resp = httpx.request(method, plat.url + path, headers=headers)
        assert resp.status_code == 404, (method, path)
        assert deployed[0].job_id not in resp.text and deployed[1] not in resp.text
    # in its own workspace, the other team sees nothing of ours
    mine = plat.client(token=other["token"], workspace="team-b")
    assert mine.get("/jobs").json() == {"jobs": []}
    with pytest.raises(NotFound):
        mine.get(f"/runs/{deployed[1]}")
    with pytest.raises(NotFound):
        mine.get(f"/job/{deployed[0].job_id}")


def test_tokens_can_be_made_listed_and_revoked(plat, client):
    made = client.post("/tokens", json={"name": "ci", "role": "member"}).json()
    assert made["token"].startswith("obx_")
    listed = client.get("/tokens").json()["tokens"]
    assert any(t["id"] == made["id"] for t in listed) and all("token" not in t and "hash" not in t for t in listed)
    member = plat.client(token=made["token"])
    assert member.get("/jobs").status_code == 200
    with pytest.raises(Forbidden):
        member.get("/tokens")
    client.request("DELETE", f"/tokens/{made['id']}")
    with pytest.raises(AuthError, match="invalid or revoked"):
        member.get("/jobs")


def test_tokens_are_stored_hashed(plat, client):
    made = client.post("/tokens", json={"name": "hashcheck"}).json()
    assert made["token"].encode() not in plat.records_bytes()


def test_every_documented_route_refuses_strangers(plat, client, deployed, other):
    """Walk every operation of the gateway's OpenAPI document with bad credentials."""
    remote, run_id = deployed
    batch = client.post(f"/job/{remote.job_id}/batches", json={}).json()["batch_id"]
    revoked = client.post("/tokens", json={"name": "to-revoke"}).json()
    client.request("DELETE", f"/tokens/{revoked['id']}")
    values = {"workspace": plat.workspace, "job": remote.job_id, "run": run_id, "batch": batch,
              "token": revoked["id"], "name": "secret", "path": "call", "seq": "1", "sha256": "0" * 64}
    doc = httpx.get(plat.url + "/openapi.json").json()
    credentials = {
        "none": ({}, {401}), "malformed": ({"Authorization": "Token abc"}, {401}),
        "unknown": ({"Authorization": "Bearer obx_nope"}, {401}),
        "revoked": ({"Authorization": f"Bearer {revoked['token']}"}, {401}),
        "other workspace": ({"Authorization": f"Bearer {other['token']}"}, {403, 404}),
    }
    walked = 0
    for template, operations in doc["paths"].items():
        path = template.format(**values)
        for method, operation in operations.items():
            if operation.get("security") == []:
                continue
            for label, (headers, allowed) in credentials.items():
                resp = httpx.request(method.upper(), plat.url + path, headers=headers, json={}, timeout=30)
                assert resp.status_code in allowed, (label, method, template, resp.status_code, resp.text[:200])
                body = resp.text
                assert remote.job_id not in body and run_id not in body and batch not in body and "S3CRET" not in body
                walked += 1
    assert walked >= 5 * 20, f"only {walked} requests: the document lists too few routes"


def test_status_shows_only_the_workspaces_own_pools_and_services(plat, client, deployed, other, user_code):
    mod = user_code("from opbox import operator\n\n@operator()\nclass Vault:\n    def get(self):\n        return 1\n")
    svc = mod.Vault.deploy(name="vault", client=client, quiet=True)
    try:
        mine = client.get("/status").json()
        assert any(s["service"] == f"{plat.workspace}/vault" for s in mine["services"])
        assert any(p["job_id"] == deployed[0].job_id for p in mine["pools"])
        with httpx.Client(base_url=plat.url, headers={"Authorization": f"Bearer {other['token']}"}) as http:
            theirs = http.get(f"/{other['workspace']}/status").json()
        assert theirs["services"] == [] and theirs["pools"] == [], theirs
    finally:
        svc.delete()
