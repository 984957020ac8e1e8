"""Cancels and kills target a lease, never a worker that has moved on to the next run."""

from __future__ import annotations

import pytest

from conftest import user_module
from platform_fixture import running_platform

CODE = """
import time
from opbox import operator

@operator()
def fragile(x, fail_at=3, pause=0.05):
    time.sleep(pause)
    if x == fail_at:
        raise ValueError(f"item {x} is bad")
    return x
"""


@pytest.fixture(scope="module")
def plat(tmp_path_factory, state_env):
    """This module runs on SQLite and on PostgreSQL (conftest.state_env)."""
    with running_platform(tmp_path_factory.mktemp("home"), extra_env=state_env) as running:
        yield running


@pytest.fixture(scope="module")
def fragile(client, tmp_path_factory):
    with user_module(tmp_path_factory.mktemp("lease_proj"), "leasemod", CODE) as mod:
        yield mod.fragile.deploy(client=client, quiet=True)


def test_a_map_right_after_a_failed_one_finishes(fragile):
    """The failed map cancels its remaining items; their signals and delayed kills (after the cancel grace)
    must not hit the workers that already took the next map's items."""
    for attempt in range(6):
        with pytest.raises(ValueError):
            fragile.map(range(200), kwargs={"pause": 0.002}, concurrency=4, progress=False)
        items = list(range(30))
        assert fragile.map(items, kwargs={"fail_at": -1, "pause": 0.25}, progress=False) == items, attempt
