"""Load: many concurrent HTTP triggers all become run records that all end, with no 5xx.

Full size by default (1,000 concurrent triggers); OPBOX_LOAD_TRIGGERS sets another count.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import time

import httpx

CODE = """
from opbox import operator

@operator()
def tick(i=0):
    return i + 1
"""
TRIGGERS = int(os.environ.get("OPBOX_LOAD_TRIGGERS", "1000"))


def test_concurrent_triggers_all_recorded_and_terminal(plat, client, tmp_path):
    (tmp_path / "loadmod.py").write_text(CODE)
    sys.path.insert(0, str(tmp_path))
    try:
        importlib.import_module("loadmod").tick.deploy(client=client, quiet=True)
    finally:
        sys.modules.pop("loadmod", None)

    async def fire():
        limits = httpx.Limits(max_connections=TRIGGERS, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=plat.url, limits=limits, timeout=120,
                                     headers={"Authorization": f"Bearer {plat.token}"}) as http:
            async def one(i):
                return await http.post(f"/{plat.workspace}/job/tick/trigger", json={"args": [i]})
            return await asyncio.gather(*(one(i) for i in range(TRIGGERS)))

    started = time.monotonic()
    answers = asyncio.run(fire())
    statuses = [a.status_code for a in answers]
    assert statuses.count(202) == TRIGGERS, {s: statuses.count(s) for s in set(statuses)}
    run_ids = {a.json()["run_id"] for a in answers}
    assert len(run_ids) == TRIGGERS
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        open_runs = client.get("/status").json()["runs"]
        if not open_runs:
            break
        time.sleep(0.2)
    assert not open_runs, open_runs
    recorded = []
    before = None
    while True:
        page = client.get("/job/tick/runs", params={"limit": 1000, **({"before": before} if before else {})}).json()
        if not page["runs"]:
            break
        recorded += page["runs"]
        before = page["runs"][-1]["id"]
    mine = [r for r in recorded if r["id"] in run_ids]
    assert len(mine) == TRIGGERS and all(r["status"] == "succeeded" for r in mine)
    print(f"{TRIGGERS} triggers recorded and finished in {time.monotonic() - started:.1f} s")
