"""Groups: a warm worker takes several queued runs (a map's items, calls) at once when its pool's queue
outnumbers its workers. Each run of a group keeps its own timeout and cancel; when the worker dies, the runs it had
not started go back to the queue without spending a retry, and none runs twice.

One worker per pool (OPBOX_MAX_WORKERS=1), so any map longer than two items is handed out in groups.
Every item writes a marker file when it starts and another when it ends: how often it started is counted
from the files, never from the platform's own account.
"""

from __future__ import annotations

import threading
import time

import pytest

from conftest import user_module, wait_for
from platform_fixture import running_platform

CODE = """
import os, signal, time, uuid
from opbox import Operator, operator

def _mark(folder, x, what):
    open(os.path.join(folder, f"{x}.{what}.{uuid.uuid4().hex}"), "w").close()

@operator()
def marked(x, folder, pause=0.05, slow=(), slow_pause=30.0, die=()):
    _mark(folder, x, "start")
    if x in die:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(slow_pause if x in slow else pause)
    _mark(folder, x, "end")
    return x

@operator()
def grow(data, times=1):
    return data * times

@operator()
def leaf(x):
    return x

@operator()
def caller(x):  # a map's item calling another job: its child must name it as its parent
    child = Operator.from_job("leaf").submit(x)
    return x, child.id, child.result(timeout=60)

@operator()
def late_caller(x, after):  # calls another job only from item ``after`` on: by then its runs come in groups
    me = os.environ.get("OPBOX_RUN_ID")  # the run in hand, which the SDK names to the gateway
    if x < after:
        return x, None, x, me
    child = Operator.from_job("leaf").submit(x)
    return x, child.id, child.result(timeout=60), me

@operator(timeout=2)
def bounded(x, folder, slow=()):
    _mark(folder, x, "start")
    time.sleep(30 if x in slow else 0.05)
    _mark(folder, x, "end")
    return x
"""


@pytest.fixture(scope="module")
def plat(tmp_path_factory):
    # payloads above 4 KiB go through the object store: a group's arguments by URL, its results by reference
    # groups as long as the queue allows, whatever the runs take (OPBOX_GROUP_SPAN): the mechanics, not the policy
    env = {"OPBOX_MAX_WORKERS": "1", "OPBOX_PAYLOAD_INLINE": "4096", "OPBOX_GROUP_SPAN": "3600"}
    with running_platform(tmp_path_factory.mktemp("home"), extra_env=env) as running:
        yield running


@pytest.fixture(scope="module")
def fns(plat, client, tmp_path_factory):
    with user_module(tmp_path_factory.mktemp("groups_proj"), "groupsmod", CODE) as mod:
        fns = {name: getattr(mod, name).deploy(client=client, quiet=True)
               for name in ("marked", "bounded", "leaf", "caller", "late_caller", "grow")}
        folder = tmp_path_factory.mktemp("warm")
        fns["grow"].map([b"x"] * 4, progress=False)
        for name in ("marked", "bounded"):  # a pool runs a few runs one at a time before it hands out groups
            assert fns[name].map(range(4), kwargs={"folder": str(folder)}, progress=False) == [0, 1, 2, 3]
        yield fns


def _marks(folder, what: str) -> dict[int, int]:
    counts: dict[int, int] = {}
    for path in folder.iterdir():
        x, kind, _ = path.name.split(".")
        if kind == what:
            counts[int(x)] = counts.get(int(x), 0) + 1
    return counts


def _in_background(call):
    """Run ``call`` in a thread; returns (thread, box) where box["out"] is its result once the thread ends."""
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(out=call()), daemon=True)
    thread.start()
    return thread, box


def _newest_map(client, fn) -> str | None:
    runs = client.get(f"/job/{fn.job_id}/runs", params={"limit": 1}).json()["runs"]
    return runs[0]["batch_id"] if runs else None


def _item_ids(client, fn, count: int, before: str | None) -> list[str]:
    """The run ids of ``fn``'s newest map (items 0..count-1) once it is there (``before``: the one it replaces)."""
    batch = wait_for(lambda: (_newest_map(client, fn) or before) != before and _newest_map(client, fn), timeout=30)
    return [f"r-{batch[2:]}.{i}" for i in range(count)]


def _held(client, fn) -> int:
    return sum(p["held"] for p in client.get("/status").json()["pools"] if p["job_id"] == fn.job_id)


def _run(client, run_id: str) -> dict:
    return client.get(f"/runs/{run_id}").json()


def test_a_long_map_is_handed_out_in_groups(fns, client, tmp_path):
    seen = []

    def held():
        pools = [p for p in client.get("/status").json()["pools"] if p["job_id"] == fns["marked"].job_id]
        seen.extend(p["held"] for p in pools)
        return any(p["held"] > 1 for p in pools)

    thread, box = _in_background(lambda: fns["marked"].map(range(40), kwargs={"folder": str(tmp_path), "pause": 0.1},
                                                           progress=False))
    wait_for(held, timeout=30)
    thread.join(60)
    assert box["out"] == list(range(40))
    assert max(seen) > 1, "the single worker held several runs at once"
    assert _marks(tmp_path, "start") == dict.fromkeys(range(40), 1), "each item ran once"


def test_cancel_in_a_group_stops_the_run_in_hand_and_skips_one_not_started(fns, client, tmp_path):
    items = 8
    before = _newest_map(client, fns["marked"])
    thread, box = _in_background(lambda: fns["marked"].map(
        range(items), kwargs={"folder": str(tmp_path), "slow": (0,), "pause": 0.1}, return_exceptions=True,
        progress=False))
    ids = _item_ids(client, fns["marked"], items, before)
    wait_for(lambda: _marks(tmp_path, "start").get(0), timeout=30)  # item 0 is in hand, 1..7 wait in its group
    assert _held(client, fns["marked"]) == 7, "items 0..6 in the worker's group, item 7 queued"
    assert client.post(f"/runs/{ids[4]}/cancel").status_code == 200
    assert client.post(f"/runs/{ids[0]}/cancel").status_code == 200
    thread.join(60)
    out = box["out"]
    assert [out[i] for i in (1, 2, 3, 5, 6, 7)] == [1, 2, 3, 5, 6, 7]
    assert isinstance(out[0], Exception) and isinstance(out[4], Exception)
    assert _run(client, ids[0])["status"] == _run(client, ids[4])["status"] == "cancelled"
    starts, ends = _marks(tmp_path, "start"), _marks(tmp_path, "end")
    assert 4 not in starts, "a cancelled run that had not started is never started"
    assert starts == {i: 1 for i in range(items) if i != 4}
    assert 0 not in ends, "the run in hand was stopped"
    assert all(_run(client, ids[i])["status"] == "succeeded" for i in (1, 2, 3, 5, 6, 7))


def test_a_timeout_in_a_group_ends_that_run_only(fns, client, tmp_path):
    items = 6
    before = _newest_map(client, fns["bounded"])
    out = fns["bounded"].map(range(items), kwargs={"folder": str(tmp_path), "slow": (2,)}, return_exceptions=True,
                             progress=False)
    ids = _item_ids(client, fns["bounded"], items, before)
    assert [out[i] for i in (0, 1, 3, 4, 5)] == [0, 1, 3, 4, 5]
    timed_out = _run(client, ids[2])
    assert timed_out["status"] == "timed_out" and "timed out after 2 s" in timed_out["exit_reason"]
    assert _marks(tmp_path, "start") == dict.fromkeys(range(items), 1), "the runs after it ran once each"
    assert all(_run(client, ids[i])["attempt"] == 0 for i in (3, 4, 5)), "handed back without spending a retry"


def test_a_worker_that_dies_holding_a_group_hands_back_the_runs_it_had_not_started(fns, client, tmp_path):
    items = 10
    before = _newest_map(client, fns["marked"])
    out = fns["marked"].map(range(items), kwargs={"folder": str(tmp_path), "die": (3,)}, return_exceptions=True,
                            progress=False)
    ids = _item_ids(client, fns["marked"], items, before)
    assert [out[i] for i in range(items) if i != 3] == [i for i in range(items) if i != 3]
    died = _run(client, ids[3])
    assert died["status"] == "failed" and "killed by SIGKILL" in died["exit_reason"]
    assert _marks(tmp_path, "start") == dict.fromkeys(range(items), 1), "no run lost, none run twice"
    after = [_run(client, ids[i]) for i in range(4, items)]
    assert all(r["status"] == "succeeded" and r["attempt"] == 0 for r in after)
    assert any("requeued: its worker ended before starting it" in (r["exit_reason"] or "") for r in after)


def test_calls_queued_behind_a_busy_worker_come_in_a_group_too(fns, client, tmp_path):
    """Calls, as a map's items, are taken several at once when they wait behind a busy worker (a group's runs
    start in one transaction: they share their start time)."""
    thread, box = _in_background(lambda: fns["marked"].map([0], kwargs={"folder": str(tmp_path), "slow": (0,),
                                                                        "slow_pause": 1.0}, progress=False))
    wait_for(lambda: _marks(tmp_path, "start").get(0), timeout=30)
    calls = [fns["marked"].submit(100 + i, str(tmp_path)) for i in range(4)]
    assert [call.result(timeout=60) for call in calls] == [100, 101, 102, 103]
    thread.join(60)
    assert box["out"] == [0]
    starts = sorted(_run(client, call.id)["started_at"] for call in calls)  # a group's: within a few ms; one at a
    # time: a run's 50 ms apart
    assert starts[2] - starts[0] < 0.01, f"three of them started together (the fourth stays queued): {starts}"
    assert _marks(tmp_path, "start") == {0: 1, 100: 1, 101: 1, 102: 1, 103: 1}


def test_a_map_whose_items_call_other_jobs_gets_no_groups(fns, client):
    """The gateway knows a group's run in hand one result late at worst; a child call names its parent by the
    run in hand, so a pool whose runs call other jobs hands out its runs one at a time."""
    items = 16
    before = _newest_map(client, fns["caller"])
    out = fns["caller"].map(range(items), progress=False)
    ids = _item_ids(client, fns["caller"], items, before)
    assert [(x, result) for x, _, result in out] == [(i, i) for i in range(items)]
    for i, (_, child, _) in enumerate(out):
        assert _run(client, child)["parent_run_id"] == ids[i]


def test_a_run_of_a_group_that_calls_another_job_is_its_childs_parent(fns, client):
    """A pool's first call out comes from a run of a group, whose run before may still be on its way: the
    worker's code names its run (X-Opbox-Caller-Run), and that run, one the worker holds, is the parent."""
    items, after = 48, 12
    fn = fns["late_caller"]
    before = _newest_map(client, fn)
    out = fn.map(range(items), kwargs={"after": after}, progress=False)
    ids = _item_ids(client, fn, items, before)
    assert [(x, result, me) for x, _, result, me in out] == [(i, i, ids[i]) for i in range(items)]
    children = [(i, child) for i, (_, child, _, _) in enumerate(out) if child is not None]
    assert len(children) == items - after
    assert [(i, _run(client, child)["parent_run_id"]) for i, child in children] == [(i, ids[i]) for i, _ in children]


def test_large_arguments_and_results_of_a_group_go_through_the_object_store(fns, client):
    """Arguments above the inline limit reach the worker by URL in its group's frames; results above it are
    uploaded and handed in by reference, each claimed as its frame arrives."""
    items = [bytes([i]) * (10_000 if i % 3 == 0 else 10) for i in range(30)]
    before = _newest_map(client, fns["grow"])
    out = fns["grow"].map(items, kwargs={"times": 2}, progress=False)
    assert out == [item * 2 for item in items]
    ids = _item_ids(client, fns["grow"], 30, before)
    assert {_run(client, run_id)["status"] for run_id in ids} == {"succeeded"}
