"""SQLite CPU per call (create + start + finish), eager against grouped in groups of k calls. Runs only at commit
f7b9d08 (branch `groupcommit`), where `runs.create_grouped` / `finish_grouped` exist; kept as the record of what
was measured (bench/PROFILE.md, "Group commit, built safely and measured")."""
import asyncio, sys, tempfile, time, statistics
from pathlib import Path
from opbox.platform.records.base import NewRun
from opbox.platform.records.sqlite import open_sqlite
from opbox.platform.ids import new_id

ARGS, RESULT = b"A" * 120, b"R" * 80

def noop(*_): pass

async def round_(runs, db, n, k):
    ids = []
    t = time.process_time()
    if k == 0:
        for _ in range(n):
            rid = new_id("r")
            runs.create(NewRun(rid, "ws", "j1", 1, "call", time.time(), 0, None, None, None), ARGS)
            runs.start(rid, "w1", time.time())
            runs.finish(runs.get(rid), "succeeded", time.time(), None, None, RESULT)
    else:
        # a call's create in one group, its start alone, its end in the next group (as the gateway orders them)
        pend = []
        for i in range(n):
            rid = new_id("r")
            runs.create_grouped(NewRun(rid, "ws", "j1", 1, "call", time.time(), 0, None, None, None), ARGS, noop)
            pend.append(rid)
            if len(pend) == k:
                db.flush()
                for r in pend:
                    runs.start(r, "w1", time.time())
                for r in pend:
                    runs.finish_grouped(runs.get(r), "succeeded", time.time(), None, None, RESULT, noop)
                pend = []
        db.flush()
    return (time.process_time() - t) / n * 1e6

async def main():
    with tempfile.TemporaryDirectory() as tmp:
        rec = open_sqlite(Path(tmp) / "s.db")
        out = {}
        for rep in range(5):
            for k in (0, 1, 2, 4, 10):
                out.setdefault(k, []).append(await round_(rec.runs, rec.database, 3000, k))
        rec.close()
    for k, v in out.items():
        print("eager" if k == 0 else f"grouped, {k} calls a group", round(statistics.median(v), 1), "µs CPU a call")

asyncio.run(main())
