"""One workspace cannot starve another: with two workspaces busy, each runs its share of the machine
(OPBOX_MAX_RUNNING split evenly); alone, a workspace uses all of it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

from conftest import user_module
from opbox.platform.backends.base import RunTicket
from opbox.platform.backends.fairshare import FairShare
from platform_fixture import running_platform

CODE = """
import time
from opbox import operator

@operator()
def hold(seconds):
    start = time.time()
    time.sleep(seconds)
    return (start, time.time())
"""


def _ticket(ws: str, n: int) -> RunTicket:
    return RunTicket(f"r-{ws}-{n}", ws, "j", 1, None)


def test_shares_split_and_come_back():
    fair = FairShare(4)
    assert all(fair.admit(_ticket("a", i)) for i in range(4))  # alone: the whole machine
    assert fair.admit(_ticket("b", 0)) and fair.admit(_ticket("b", 1))  # b arrives: its share is 4 // 2
    assert not fair.admit(_ticket("b", 2))  # b waits at its share
    assert not fair.admit(_ticket("a", 4))  # a is over its share now: its next run waits too
    assert fair.release("a") == [] and fair.release("a") == []  # a runs 2, its share: nothing starts
    assert [t.run_id for t in fair.release("b")] == ["r-b-2"]  # a slot of b's: b's waiting run starts
    assert [t.run_id for t in fair.release("a")] == ["r-a-4"]  # a below its share: its waiting run starts
    assert fair.waiting == {}


def _overlap(spans: list) -> int:
    points = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    now = peak = 0
    for _, step in points:
        now += step
        peak = max(peak, now)
    return peak


def test_a_group_counts_every_run_but_only_while_its_workspace_is_alone():
    fair = FairShare(2)
    assert fair.admit(_ticket("a", 0)) and fair.admit_extra(_ticket("a", 1)) and fair.admit_extra(_ticket("a", 2))
    assert fair.running == {"a": 3} and fair.extra == {"a": 2}  # every leased run is counted
    assert fair.admit(_ticket("a", 3))  # the runs behind the one in hand do not take a's share
    assert not fair.admit(_ticket("a", 4))  # two in progress: a's share; its next run waits
    assert fair.admit(_ticket("b", 0))  # b arrives: its own share
    assert not fair.admit_extra(_ticket("a", 5)) and "r-a-5" not in [t.run_id for q in fair.waiting.values() for t in q]
    assert fair.release_extra("a") == []  # a group's run ends while the group goes on: in progress still two
    assert fair.release_extra("a") == [] and fair.extra == {}
    assert [t.run_id for t in fair.release("a")] == []  # a is at 2 in progress, over b's arrival share of 1
    assert [t.run_id for t in fair.release("a")] == ["r-a-4"]  # below its share: its waiting run starts


def test_two_busy_workspaces_each_get_half(tmp_path):
    env = {"OPBOX_MAX_RUNNING": "4", "OPBOX_MAX_WORKERS": "4"}
    with running_platform(tmp_path / "home", extra_env=env) as plat:
        out = subprocess.run([sys.executable, "-m", "opbox.cli", "workspace", "create", "team-b", "--home",
                              str(plat.home), "--json"], capture_output=True, text=True, check=True, env=plat.env)
        b = plat.client(token=json.loads(out.stdout)["token"], workspace="team-b")
        a = plat.client()
        (tmp_path / "proj").mkdir()
        with user_module(tmp_path / "proj", "fairmod", CODE) as mod:
            hold_a, hold_b = mod.hold.deploy(client=a, quiet=True), mod.hold.deploy(client=b, quiet=True)
            alone = hold_a.map([0.5] * 4, concurrency=4, progress=False)
            assert _overlap(alone) == 4  # alone, a runs on the whole machine
            spans: dict = {}
            threads = [threading.Thread(target=lambda k=k, f=f: spans.__setitem__(k, f.map([0.5] * 8, progress=False)))
                       for k, f in (("a", hold_a), ("b", hold_b))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert len(spans["a"]) == len(spans["b"]) == 8
            # from one run's length after b's first run started (nothing is preempted: a's runs begun before
            # b came end first) until either map ended, a runs about its half (2), never the whole machine
            since = min(s for s, _ in spans["b"]) + 0.55
            until = min(max(e for _, e in spans["a"]), max(e for _, e in spans["b"]))
            busy_a = [(max(s, since), min(e, until)) for s, e in spans["a"] if e > since and s < until]
            assert busy_a and _overlap(busy_a) <= 3
        a.close()
        b.close()
