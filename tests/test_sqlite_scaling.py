"""The SQLite records' hot statements do the same work however many runs are open: a map of 1,000,000 items
keeps 100,000 runs open (the workspace's quota), and a statement that walks them all (a planner that picks the
partial index ``runs_open`` over the primary key, say) makes each of its results cost that much more.

Work is counted in SQLite virtual-machine steps (``set_progress_handler``), not time: the same operation
with few and with many open runs must take about as many steps."""

from __future__ import annotations

import pytest

from opbox.platform.records.base import NewRun
from opbox.platform.records.sqlite import open_sqlite

pytestmark = pytest.mark.sqlite_only

FEW, MANY = 200, 6000
GROUP = 8


def run_id(batch: str, index: int) -> str:
    return f"{batch}-{index:08d}"  # time-ordered as real ids are: inserts land at the right of each index


def item(batch: str, index: int, workspace: str = "ws") -> NewRun:
    return NewRun(run_id(batch, index), workspace, "j1", 1, "map", 1.0, 0, None, batch, index)


class Steps:
    """Counts the VM steps of what runs on ``db`` inside ``with``."""

    def __init__(self, db):
        self.db, self.count = db, 0

    def _tick(self) -> int:
        self.count += 1
        return 0

    def __enter__(self):
        self.db.set_progress_handler(self._tick, 1)
        return self

    def __exit__(self, *exc):
        self.db.set_progress_handler(None, 0)


def records_with_open_runs(path, open_runs: int):
    """A state file with one map ``b1`` of ``open_runs`` queued items (and another workspace's map as large),
    the first GROUP of ``b1`` started by a worker: what the hot paths meet in the middle of a large map."""
    records = open_sqlite(path)
    for batch, ws in (("b0", "other"), ("b1", "ws")):
        records.batches.create(batch, ws, "j1", 1, None, 1.0)
        records.batches.add_items(batch, [item(batch, i, ws) for i in range(open_runs)], [b"A"] * open_runs)
    return records


def hot_operations(records) -> dict[str, int]:
    """VM steps of each hot operation, on a state file made by ``records_with_open_runs``."""
    runs, batches, db = records.runs, records.batches, records.runs.db
    group = [run_id("b1", i) for i in range(GROUP)]
    steps = {}

    def measure(name, fn):
        with Steps(db) as counter:
            fn()
        steps[name] = counter.count

    measure("call: create", lambda: runs.create(NewRun("c-1", "ws", "j2", 1, "call", 1.0, 0, None), b"ARGS"))
    measure("call: start", lambda: runs.start("c-1", "w0", 2.0))
    measure("call: args", lambda: runs.args("c-1"))
    measure("call: get", lambda: runs.get("c-1"))
    record = runs.get("c-1")
    measure("call: finish", lambda: runs.finish(record, "succeeded", 3.0, None, None, b"R"))
    measure("map: indexes", lambda: batches.indexes("b1", 10**6, 10**6 + 1999))
    measure("map: add_items", lambda: batches.add_items(
        "b1", [item("b1", 10**6 + i) for i in range(GROUP)], [b"A"] * GROUP))
    measure("map: start_many", lambda: runs.start_many(group, "w1", 2.0))
    measure("map: args_many", lambda: runs.args_many(group))
    measure("map: finish_many", lambda: runs.finish_many([(r, "b1", "ws", b"R") for r in group], "succeeded", 3.0))
    measure("map: results_after", lambda: batches.results_after("b1", 0, 1000))
    return steps


def test_hot_statements_do_not_walk_the_open_runs(tmp_path):
    few = hot_operations(records_with_open_runs(tmp_path / "few.db", FEW))
    many = hot_operations(records_with_open_runs(tmp_path / "many.db", MANY))
    # B-trees a level deeper and an IN list's probes cost a few steps more; walking 30x the open runs costs
    # thousands (finish_many over the partial index runs_open: ~25 steps a row)
    grown = {name: (few[name], many[name]) for name in few if many[name] > few[name] * 1.5 + 50}
    assert not grown, f"work that grows with the open runs ({FEW} -> {MANY}), VM steps: {grown}"
    assert all(count > 0 for count in many.values()), many  # each one measured something
