"""A map's record writes in isolation: CPU µs an item of ``add_items`` (chunks of 2,000), ``start_many`` and
``args_many`` (groups of 32), ``finish_many`` (reads of 20) and reading the results back, on a fresh SQLite file
(the checkpointer stopped). Runs the adapter of the tree it is run from, so two trees compare side by side.

    python bench/map_records.py [--items 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from opbox.platform.records.base import NewRun
from opbox.platform.records.sqlite.batches import SqliteBatches
from opbox.platform.records.sqlite.connection import Database
from opbox.platform.records.sqlite.runs import SqliteRuns

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def one_map(path: str, items: int) -> dict:
    database = Database(path)
    database.checkpointer.stop()
    runs, batches = SqliteRuns(database), SqliteBatches(database)
    batch = "b-0190000000abcdef"
    batches.create(batch, "ws", "j-1", 1, None, time.time())
    ids = [f"r-{batch[2:]}.{i}" for i in range(items)]
    spent = {}
    cpu = time.process_time()
    for first in range(0, items, 2000):
        rows = [NewRun(ids[i], "ws", "j-1", 1, "map", time.time(), 0, None, batch, i, None, TRACEPARENT)
                for i in range(first, min(items, first + 2000))]
        batches.add_items(batch, rows, [b"\x00" * 100] * len(rows))
    spent["add_items"], cpu = time.process_time() - cpu, time.process_time()
    for first in range(0, items, 32):
        runs.start_many(ids[first:first + 32], "w-1", time.time())
        runs.args_many(ids[first:first + 32])
    spent["start_many+args_many"], cpu = time.process_time() - cpu, time.process_time()
    for first in range(0, items, 20):
        runs.finish_many([(i, batch, "ws", b"\x01" * 60) for i in ids[first:first + 20]], "succeeded", time.time())
    spent["finish_many"], cpu = time.process_time() - cpu, time.process_time()
    after = 0
    while rows := batches.results_after(batch, after, 1000):
        after = rows[-1].seq
    spent["results_after"] = time.process_time() - cpu
    database.close()
    return {name: round(seconds / items * 1e6, 1) for name, seconds in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.repeat):
            per_item = one_map(os.path.join(tmp, f"{n}.db"), args.items)
            print(json.dumps({"items": args.items, "cpu_us_per_item": per_item}))


if __name__ == "__main__":
    main()
