"""Storage shrinks: finished runs' payloads and logs expire (410 Gone after, the record stays), a job
may keep its own longer, old records go, and unused uploads, code folders and environments are
collected; `opbox gc` does it now and says what it freed."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from conftest import user_module
from platform_fixture import running_platform

CODE = """
from opbox import operator

@operator()
def short(x):
    print("short-lived output")
    return x * 2

@operator(retention_days=30)
def kept(x):
    return x * 3
"""

SECONDS = 1.5
ENV = {"OPBOX_RETENTION_DAYS": str(SECONDS / 86400), "OPBOX_GC_MIN_AGE": "0", "OPBOX_GC_INTERVAL": "3600"}


def gc(plat, **env) -> dict:
    out = subprocess.run([sys.executable, "-m", "opbox.cli", "gc", "--home", str(plat.home), "--json"],
                         capture_output=True, text=True, timeout=60, env={**plat.env, **env})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, state_env):  # on SQLite and on PostgreSQL
    with running_platform(tmp_path_factory.mktemp("home"), extra_env={**ENV, **state_env}) as plat:
        client = plat.client()
        with user_module(tmp_path_factory.mktemp("retention_proj"), "retentionmod", CODE) as mod:
            yield plat, client, mod.short.deploy(client=client, quiet=True), mod.kept.deploy(client=client, quiet=True)
        client.close()


def test_payloads_expire_with_a_410_and_a_job_may_keep_its_own_longer(setup):
    plat, client, short, kept = setup
    run, long_lived = short.submit(2), kept.submit(2)
    assert run.result(timeout=30) == 4 and long_lived.result(timeout=30) == 6
    time.sleep(SECONDS + 0.5)
    done = gc(plat)
    assert done["runs_expired"] >= 1 and done["payload_bytes"] > 0
    with plat.http() as http:
        ws = plat.workspace
        gone = http.get(f"/{ws}/runs/{run.id}/result")
        assert gone.status_code == 410 and "has expired" in gone.json()["message"] and gone.json()["error"] == "gone"
        assert http.get(f"/{ws}/runs/{run.id}/logs").status_code == 410
        record = http.get(f"/{ws}/runs/{run.id}").json()
        assert record["status"] == "succeeded" and record["expired_at"] > 0  # the record stays
        assert http.get(f"/{ws}/runs/{long_lived.id}/result").json()["result"] == 6  # its job keeps 30 days
    assert short(5) == 10  # new runs are unaffected


def test_old_records_go_too(setup):
    plat, client, short, _ = setup
    run = short.submit(1)
    run.result(timeout=30)
    time.sleep(SECONDS + 0.5)
    done = gc(plat, OPBOX_RETENTION_RUN_DAYS=str(SECONDS / 86400))
    assert done["runs_deleted"] >= 1
    assert client.send("GET", f"/runs/{run.id}").status_code == 404


def test_unused_uploads_code_folders_and_environments_are_collected(setup):
    plat, client, short, _ = setup
    data = b"an archive nobody deployed"
    sha = hashlib.sha256(data).hexdigest()
    slot = client.post("/uploads", json={"sha256": sha, "size": len(data)}).json()
    assert httpx.put(slot["upload"]["url"], content=data, headers=slot["upload"]["headers"]).status_code == 200
    stray_code = plat.home / "code" / "ab" / ("ab" * 32)
    stray_env = plat.home / "envs" / "py3.11-0123456789abcdef"
    for folder in (stray_code, stray_env):
        folder.mkdir(parents=True)
        (folder / "file").write_bytes(b"x" * 1000)
    old = time.time() - 10
    for path in (stray_code, stray_env):
        os.utime(path, (old, old))
    in_use = [p for p in (plat.home / "code").glob("*/*") if p != stray_code]
    done = gc(plat)
    assert done["archives_deleted"] >= 1 and done["folders_deleted"] >= 2 and done["folder_bytes"] >= 2000
    assert not stray_code.exists() and not stray_env.exists()
    assert all(p.exists() for p in in_use)  # what versions use stays
    assert client.post("/uploads", json={"sha256": sha, "size": len(data)}).json()["exists"] is False
    assert short(7) == 14


def test_gc_prints_what_it_freed(setup):
    plat, *_ = setup
    out = subprocess.run([sys.executable, "-m", "opbox.cli", "gc", "--home", str(plat.home)], capture_output=True,
                         text=True, timeout=60, env=plat.env)
    assert out.returncode == 0 and out.stdout.startswith("expired ") and "unused code archives" in out.stdout
