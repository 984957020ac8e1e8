"""A per-workspace storage quota (arguments, results, logs, code): a clear 507 when a workspace is
full, other workspaces unaffected, and room again once its runs expire. Stored payloads leave the
object store with them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from opbox.errors import StorageQuotaExceeded
from conftest import user_module
from platform_fixture import running_platform
from test_retention import gc

MiB = 1024 * 1024
CODE = """
from opbox import operator

@operator()
def echo(data):
    return data
"""
SECONDS = 1.5
ENV = {"OPBOX_STORAGE_QUOTA": "6Mi", "OPBOX_RETENTION_DAYS": str(SECONDS / 86400), "OPBOX_GC_MIN_AGE": "0",
       "OPBOX_GC_INTERVAL": "3600"}


@pytest.fixture(scope="module")
def quota(tmp_path_factory):
    with running_platform(tmp_path_factory.mktemp("home"), extra_env=ENV) as plat, \
            user_module(tmp_path_factory.mktemp("proj"), "quotamod", CODE) as mod:
        yield plat, mod, mod.echo.deploy(client=plat.client(), quiet=True)


def used(plat, token=None, workspace=None) -> dict:
    with plat.http(token) as http:
        return http.get(f"/{workspace or plat.workspace}/status").json()["storage"]


def payload_objects(plat) -> list:
    folder = plat.home / "store" / plat.workspace / "payloads"
    return list(folder.iterdir()) if folder.exists() else []


def test_a_full_workspace_gets_a_clear_507_and_room_again_when_its_runs_expire(quota):
    plat, mod, echo = quota
    out = subprocess.run([sys.executable, "-m", "opbox.cli", "workspace", "create", "team-q", "--home",
                          str(plat.home), "--json"], capture_output=True, text=True, check=True, env=plat.env)
    other = json.loads(out.stdout)
    assert used(plat)["quota"] == 6 * MiB
    data = b"q" * (2 * MiB)  # argument and result: 4 MiB stored a call
    assert echo(data) == data
    assert 4 * MiB < used(plat)["bytes"] < 5 * MiB
    with pytest.raises(StorageQuotaExceeded, match="quota is 6291456") as refused:
        echo.submit(data)
    assert refused.value.status == 507
    with plat.http() as http:
        resp = http.post(f"/{plat.workspace}/job/echo/trigger", json={"args": ["x" * 2_500_000]})
        assert resp.status_code == 507 and resp.json()["error"] == "storage_quota_exceeded"
        batch = http.post(f"/{plat.workspace}/job/echo/batches", json={}).json()["batch_id"]
    with pytest.raises(StorageQuotaExceeded):
        list(echo.map([data]))
    with open(os.path.join(os.path.dirname(mod.__file__), "weights.bin"), "wb") as f:
        f.write(os.urandom(3 * MiB))  # new code: a 3 MiB upload
    with pytest.raises(StorageQuotaExceeded):
        mod.echo.deploy(client=plat.client(), quiet=True)
    slot = {"sha256": "a" * 64, "size": 3 * MiB}
    with plat.http() as http:
        assert http.post(f"/{plat.workspace}/uploads", json=slot).status_code == 507
    with plat.http(other["token"]) as http:  # another workspace has its own quota
        assert http.post(f"/{other['workspace']}/uploads", json=slot).status_code == 200
    assert used(plat, other["token"], other["workspace"]) == {"bytes": 0, "quota": 6 * MiB}
    assert echo(b"small") == b"small"  # what fits still goes
    assert len(payload_objects(plat)) >= 2

    time.sleep(SECONDS + 0.5)
    done = gc(plat)
    assert done["runs_expired"] >= 2 and done["payload_bytes"] >= 4 * MiB
    assert used(plat)["bytes"] < MiB
    assert payload_objects(plat) == []  # the stored argument and result went with their runs
    assert echo(data) == data
    assert batch  # a batch made while full stays usable
    with plat.http() as http:
        assert http.post(f"/{plat.workspace}/batches/{batch}/cancel").status_code == 200
