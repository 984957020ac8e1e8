"""Which runs come in groups, with the platform's defaults (OPBOX_GROUP_SPAN 0.25 s): while a pool's queue
outnumbers its busy workers, a warm worker takes as many queued runs as its recent runs take a quarter of a second
together, calls as well as a map's items; runs longer than half of that come one at a time, so no run waits
long in one worker's hands while another worker could have taken it.

The runs of a group are started in one transaction, at one instant: runs sharing a ``started_at`` came in a
group, and each run's own start time says so without watching the platform while it works. One worker per pool
(OPBOX_MAX_WORKERS=1): any queue longer than one run outnumbers it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import user_module
from platform_fixture import running_platform

CODE = """
import time
from opbox import operator

@operator()
def pause(x, seconds=0.02):
    time.sleep(seconds)
    return x
"""


@pytest.fixture(scope="module")
def plat(tmp_path_factory):
    with running_platform(tmp_path_factory.mktemp("home"), extra_env={"OPBOX_MAX_WORKERS": "1"}) as running:
        yield running


@pytest.fixture(scope="module")
def pause(plat, tmp_path_factory):
    client = plat.client()
    with user_module(tmp_path_factory.mktemp("span_proj"), "spanmod", CODE) as mod:
        fn = mod.pause.deploy(client=client, quiet=True)
        assert fn.map(range(3), progress=False) == [0, 1, 2]  # warm, with a few runs one at a time behind it
        yield fn
    client.close()


def largest_group(client, fn, run_ids) -> int:
    """The most of ``run_ids`` that started together (1: none came in a group). A group's runs start in one
    transaction (SQLite) or one after the other in one step (several gateways on PostgreSQL): within a few ms,
    where runs leased one at a time start a whole run (20 ms or more here) apart."""
    return together([client.get(f"/runs/{run_id}").json()["started_at"] for run_id in run_ids])


def together(starts: list[float], within: float = 0.01) -> int:
    starts, best, size = sorted(starts), 1, 1
    for before, after in zip(starts, starts[1:]):
        size = size + 1 if after - before < within else 1
        best = max(best, size)
    return best


def map_ids(client, fn, count: int) -> list[str]:
    batch = client.get(f"/job/{fn.job_id}/runs", params={"limit": 1}).json()["runs"][0]["batch_id"]
    return [f"r-{batch[2:]}.{i}" for i in range(count)]


def test_short_calls_queued_behind_a_busy_worker_come_in_groups(plat, pause):
    client = plat.client()

    def calls(i: int) -> list:
        return [pause.submit(i * 10 + k) for k in range(5)]

    with ThreadPoolExecutor(12) as callers:
        runs = [run for batch in callers.map(calls, range(12)) for run in batch]
    assert sorted(run.result(timeout=60) for run in runs) == sorted(i * 10 + k for i in range(12) for k in range(5))
    assert largest_group(client, pause, [run.id for run in runs]) > 1, \
        "calls waiting behind the busy worker were taken several at once"


def test_runs_longer_than_half_the_span_come_one_at_a_time(plat, pause):
    client = plat.client()
    assert pause.map(range(40), progress=False) == list(range(40))  # 20 ms items: groups
    assert largest_group(client, pause, map_ids(client, pause, 40)) > 1
    # runs of 0.3 s: once the pool has seen one (its first ones may still come in a group: it could not know)
    assert pause(0, seconds=0.3) == 0
    assert pause.map(range(6), kwargs={"seconds": 0.3}, progress=False) == list(range(6))
    assert largest_group(client, pause, map_ids(client, pause, 6)) == 1, "each started on its own"
