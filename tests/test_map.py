"""map: order, any size, concurrency limits, exceptions, batched submission."""

from __future__ import annotations

import pytest

from opbox import RemoteError
from conftest import user_module
from platform_fixture import running_platform

CODE = """
import os, time
from opbox import operator

@operator()
def square(x):
    return x * x

@operator()
def slow_tag(x, pause=0.3):
    start = time.time()
    time.sleep(pause)
    return (x, start, time.time(), os.getpid())

@operator()
def picky(x):
    if x % 3 == 0:
        raise ValueError(f"no multiples of three: {x}")
    return x

@operator()
def pair(a, b):
    return a * 10 + b
"""


@pytest.fixture(scope="module")
def plat(tmp_path_factory, state_env):
    """This module runs on SQLite and on PostgreSQL (conftest.state_env)."""
    with running_platform(tmp_path_factory.mktemp("home"), extra_env=state_env) as running:
        yield running


@pytest.fixture(scope="module")
def fns(plat, client, tmp_path_factory):
    with user_module(tmp_path_factory.mktemp("map_proj"), "mapmod", CODE) as mod:
        yield {name: getattr(mod, name).deploy(client=client, quiet=True) for name in ("square", "slow_tag", "picky", "pair")}


def test_results_in_input_order(fns):
    items = list(range(3000))
    assert fns["square"].map(items, progress=False) == [x * x for x in items]


def test_generators_empty_and_starmap(fns):
    assert fns["square"].map((i for i in range(7)), progress=False) == [i * i for i in range(7)]
    assert fns["square"].map([], progress=False) == []
    assert fns["pair"].starmap([(1, 2), (3, 4)], progress=False) == [12, 34]
    assert fns["pair"].map([1, 2], kwargs={"b": 5}, progress=False) == [15, 25]


def test_submission_is_batched(fns, client):
    before = client.get(f"/job/{fns['square'].job_id}/runs", params={"limit": 1}).json()
    items = list(range(4500))
    fns["square"].map(items, progress=False)
    runs = client.get(f"/job/{fns['square'].job_id}/runs", params={"limit": 1}).json()["runs"]
    batch = client.get(f"/batches/{runs[0]['batch_id']}").json()
    assert batch["total"] == 4500 and batch["submitted"] == 4500 and batch["done"] == 4500
    assert before is not None


def test_concurrency_limit_is_respected(fns):
    out = fns["slow_tag"].map(range(6), concurrency=1, progress=False)
    assert [x for x, *_ in out] == list(range(6))
    spans = sorted((start, end) for _, start, end, _ in out)
    assert all(prev_end <= start + 0.01 for (_, prev_end), (start, _) in zip(spans, spans[1:])), "no overlap"


def test_runs_in_parallel_without_a_limit(fns):
    out = fns["slow_tag"].map(range(4), kwargs={"pause": 1.0}, progress=False)
    spans = [(start, end) for _, start, end, _ in out]
    overlapping = sum(1 for a in spans for b in spans if a is not b and a[0] < b[1] and b[0] < a[1])
    assert overlapping > 0 and len({pid for *_, pid in out}) >= 2


def test_return_exceptions(fns):
    out = fns["picky"].map(range(7), return_exceptions=True, progress=False)
    assert [o for o in out if not isinstance(o, Exception)] == [1, 2, 4, 5]
    errors = [o for o in out if isinstance(o, Exception)]
    assert len(errors) == 3 and all(isinstance(e, ValueError) for e in errors)
    assert "no multiples of three: 6" in str(out[6])


def test_failure_raises_and_cancels_the_rest(fns, client):
    with pytest.raises(ValueError, match="no multiples of three"):
        fns["picky"].map(range(1, 200), concurrency=2, progress=False)
    runs = client.get(f"/job/{fns['picky'].job_id}/runs", params={"limit": 1}).json()["runs"]
    batch = client.get(f"/batches/{runs[0]['batch_id']}").json()
    assert batch["cancelled"] == 1
    statuses = {r["status"] for r in client.get(f"/job/{fns['picky'].job_id}/runs",
                                                 params={"limit": 300}).json()["runs"] if r.get("batch_id") == batch["id"]}
    assert "cancelled" in statuses


def test_imap_yields_in_order(fns):
    it = fns["square"].imap(range(50), progress=False)
    assert next(it) == 0
    assert list(it) == [i * i for i in range(1, 50)]
    assert RemoteError


def test_a_maps_memory_goes_when_it_ends(plat, fns):
    """The gateway's in-memory state of a map (its pending items) is freed once the map is complete, so a
    long-lived platform does not grow with every map it ever ran."""
    before = _batches_in_memory(plat)
    for _ in range(5):
        assert fns["square"].map(range(20), concurrency=3, progress=False) == [x * x for x in range(20)]
    assert _batches_in_memory(plat) <= before


def _batches_in_memory(plat) -> int:
    """How many of the workspace's maps the gateway holds in memory (GET /status: maps_in_memory)."""
    import httpx

    return httpx.get(f"{plat.url}/{plat.workspace}/status",
                     headers={"Authorization": f"Bearer {plat.token}"}).json()["maps_in_memory"]
