"""A map's record writes cost the same whatever else is open: SQLite's work for a worker's group (its start, its
arguments, its results) is counted in virtual-machine steps (``set_progress_handler``), a count that does not
depend on the machine's speed, and must not grow with the runs queued behind it (a query plan that walked the
open runs' index did: ~28 µs an item at 10,000 open, ten times that at the workspace's 100,000)."""

from __future__ import annotations

import pytest

from opbox.platform.records.base import NewRun
from opbox.platform.records.sqlite import open_sqlite

pytestmark = pytest.mark.sqlite_only
GROUP = 32


class Steps:
    """SQLite virtual-machine steps (in thousands) run on a connection while counting."""

    def __init__(self, db):
        self.db, self.count = db, 0

    def _tick(self) -> int:
        self.count += 1
        return 0  # go on

    def __enter__(self):
        self.db.set_progress_handler(self._tick, 1000)
        return self

    def __exit__(self, *exc):
        self.db.set_progress_handler(None, 0)


def group_steps(tmp_path, queued: int) -> tuple[int, int]:
    """Steps to start one group of a map holding ``queued`` items and to record its results."""
    records = open_sqlite(tmp_path / f"state-{queued}.db")
    try:
        batch = f"b-{queued:012x}"
        records.batches.create(batch, "ws", "j1", 1, None, 1.0)
        for first in range(0, queued, 2000):
            items = [NewRun(f"r-{batch[2:]}.{i}", "ws", "j1", 1, "map", 1.0, 0, None, batch, i)
                     for i in range(first, min(queued, first + 2000))]
            records.batches.add_items(batch, items, [b"ARGS"] * len(items))
        ids = [f"r-{batch[2:]}.{i}" for i in range(queued // 2, queued // 2 + GROUP)]
        db = records.runs.db
        with Steps(db) as start:
            assert records.runs.start_many(ids, "w1", 2.0) == [True] * GROUP
            assert set(records.runs.args_many(ids)) == set(ids)
        with Steps(db) as finish:
            ended = records.runs.finish_many([(i, batch, "ws", b"RESULT") for i in ids], "succeeded", 3.0)
        assert [row[0].status for row in ended] == ["succeeded"] * GROUP
        assert [row[0].done_seq for row in ended] == list(range(1, GROUP + 1))
        return start.count, finish.count
    finally:
        records.close()


def test_a_groups_start_and_results_cost_the_same_with_100_or_20000_runs_open(tmp_path):
    few, many = group_steps(tmp_path, 100), group_steps(tmp_path, 20_000)
    for name, small, large in zip(("start", "finish"), few, many):
        # deeper B-trees add a step or two per lookup; a walk over the open runs adds thousands
        assert large <= 2 * small + 5, f"the group's {name} took {large}k SQLite steps with 20,000 runs open, " \
                                       f"{small}k with 100"
