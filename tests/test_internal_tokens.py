"""The runtime's own routes: each warm worker has a random token of its own (only its hash is kept),
so no process, not even another worker of the same pool, can take, end or write the log of a run it
does not hold; and the platform's secret, from which one-shot run tokens derive, is out of user code's
reach in a sandbox (tests/test_sandbox.py)."""

from __future__ import annotations

import httpx
import pytest

from conftest import user_module

CODE = """
import json, os, time
from opbox import operator

@operator()
def credentials(pause=0.0, to_file=None):
    creds = {k: os.environ[k] for k in ("OPBOX_POOL", "OPBOX_WORKER_ID", "OPBOX_WORKER_TOKEN", "OPBOX_GATEWAY_URL")}
    if to_file:
        with open(to_file + ".tmp", "w") as f:
            json.dump(creds, f)
        os.rename(to_file + ".tmp", to_file)
    time.sleep(pause)
    return creds
"""


@pytest.fixture(scope="module")
def fn(client, tmp_path_factory):
    with user_module(tmp_path_factory.mktemp("tokens_proj"), "tokensmod", CODE) as mod:
        yield mod.credentials.deploy(client=client, quiet=True)


def test_a_workers_token_is_its_own(fn):
    creds = fn()
    pool, worker, token, url = (creds[k] for k in ("OPBOX_POOL", "OPBOX_WORKER_ID", "OPBOX_WORKER_TOKEN",
                                                   "OPBOX_GATEWAY_URL"))
    assert len(token) >= 40
    with httpx.Client(base_url=url, timeout=10) as http:
        forged = {"Authorization": f"Bearer {token[:-2]}xx", "X-Opbox-Worker": worker}
        assert http.post(f"/_internal/pools/{pool}/next?wait=0", headers=forged).status_code == 401
        other = {"Authorization": f"Bearer {token}", "X-Opbox-Worker": "w-not-mine"}  # unknown: told to exit
        answer = http.post(f"/_internal/pools/{pool}/next?wait=0", headers=other)
        assert answer.status_code == 204 and answer.headers["x-opbox-action"] == "exit"
        stranger = {"Authorization": f"Bearer {token}", "X-Opbox-Worker": worker}
        assert http.post(f"/_internal/pools/{pool}/runs/r-someone-else/logs", headers=stranger,
                         content=b"fake").status_code == 404
        assert http.post(f"/_internal/pools/{pool}/next?wait=0", headers={"X-Opbox-Worker": worker}).status_code == 401


def test_two_workers_of_one_pool_hold_different_tokens(fn):
    seen = {tuple(sorted(c.items())) for c in fn.map([0.3] * 6, concurrency=6, progress=False)}
    by_worker = {dict(c)["OPBOX_WORKER_ID"]: dict(c)["OPBOX_WORKER_TOKEN"] for c in seen}
    assert len(by_worker) >= 2 and len(set(by_worker.values())) == len(by_worker)


def test_a_worker_that_asks_again_gets_the_run_it_holds_not_a_second_one(fn, tmp_path):
    """The answer that leased a run can be lost (a reset connection the worker's channel retries): asked
    again, the platform hands the same run again, so it never stays running with no one working on it."""
    import json
    import time

    marker = tmp_path / "creds.json"
    run = fn.submit(2.0, str(marker))
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    creds = json.loads(marker.read_text())
    headers = {"Authorization": f"Bearer {creds['OPBOX_WORKER_TOKEN']}", "X-Opbox-Worker": creds["OPBOX_WORKER_ID"]}
    with httpx.Client(base_url=creds["OPBOX_GATEWAY_URL"], timeout=10) as http:
        again = http.post(f"/_internal/pools/{creds['OPBOX_POOL']}/next?wait=0", headers=headers)
    assert again.status_code == 200 and again.headers["x-opbox-run"] == run.id
    assert run.result(timeout=30)["OPBOX_WORKER_ID"] == creds["OPBOX_WORKER_ID"]
