"""Which run a warm worker's caller token stands for (``PoolMethods.held_run``): the parent of the runs its
code starts. In a group the gateway learns which run is in hand one result late at worst, so the run the
worker's code names (``X-Opbox-Caller-Run``) is taken when the worker holds it, and only then."""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque

import pytest

from opbox import tracecontext
from opbox.errors import AuthError
from opbox.platform.backends.base import RunTicket, VersionInfo
from opbox.platform.backends.pools import Pool, PoolManager, PoolMethods, Worker
from opbox.resource import Resource


class _Backend(PoolMethods):
    def __init__(self):
        self.pools = PoolManager(spawner=None, max_workers=1, worker_idle=60, pool_idle=60)


def _ticket(run_id: str, timeout: float | None) -> RunTicket:
    return RunTicket(run_id, "ws", "j-1", 1, timeout, batch_id="b-1")


@pytest.fixture
def held():
    backend = _Backend()
    version = VersionInfo("ws", "j-1", "job", 1, "function", "m:f", Resource())
    pool = backend.pools.pools[version.key] = Pool(version=version)
    worker = pool.workers["w1"] = Worker(id="w1", pool=pool, token_hash=hashlib.sha256(b"secret").digest())
    group = [_ticket("r-a.0", 5.0), _ticket("r-a.1", 7.0), _ticket("r-a.2", None)]
    worker.group, worker.run_id = deque(group), "r-a.0"  # the gateway's account: the first is in hand

    def held_run(claimed, token="secret"):
        return asyncio.run(_call(backend.held_run, version.key, "w1", token, claimed))
    return held_run, pool


async def _call(fn, *args):
    return fn(*args)


def test_the_run_the_workers_code_names_is_the_parent_when_the_worker_holds_it(held):
    held_run, pool = held
    assert held_run("r-a.1") == ("ws", "r-a.1", 7.0)  # its result before is still on its way
    assert held_run("r-a.2") == ("ws", "r-a.2", None)
    assert pool.calls_out  # the pool hands out no more groups


def test_a_run_the_worker_does_not_hold_is_never_taken(held):
    held_run, _ = held
    for claimed in ("r-b.1", "r-other", None):
        workspace, run_id, _ = held_run(claimed)
        assert (workspace, run_id) == ("ws", "r-a.0")


def test_another_workers_token_cannot_name_a_run(held):
    held_run, _ = held
    with pytest.raises(AuthError):
        held_run("r-a.1", token="not-its-token")


def test_the_sdk_names_the_run_its_code_runs_in(monkeypatch):
    monkeypatch.delenv(tracecontext.ENV, raising=False)
    monkeypatch.delenv(tracecontext.RUN_ENV, raising=False)
    assert tracecontext.caller_headers({"a": "b"}) == {"a": "b"}
    monkeypatch.setenv(tracecontext.RUN_ENV, "r-a.1")
    assert tracecontext.caller_headers({"a": "b"}) == {"a": "b", tracecontext.RUN_HEADER: "r-a.1"}
