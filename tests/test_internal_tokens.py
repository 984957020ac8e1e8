"""The runtime's own routes: each warm worker has a random token of its own (only its hash is kept),
so no process, not even another worker of the same pool, can take, end or write the log of a run it
does not hold; and the platform's secret, from which one-shot run tokens derive, is out of user code's
reach in a sandbox (tests/test_sandbox.py)."""

from __future__ import annotations

import httpx
import pytest

from conftest import user_module

CODE = """
import os, time
from opbox import operator

@operator()
def credentials(pause=0.0):
    time.sleep(pause)
    return {k: os.environ[k] for k in ("OPBOX_POOL", "OPBOX_WORKER_ID", "OPBOX_WORKER_TOKEN", "OPBOX_GATEWAY_URL")}
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
