"""Faults: a killed gateway, killed runs, lost nothing."""

from __future__ import annotations

import importlib
import socket
import sys
import threading
import time

from platform_fixture import start, stop

CODE = """
import os, time
from opbox import operator

@operator()
def slowsq(x):
    time.sleep(0.002)
    return x * x
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gateway_killed_during_a_map_loses_nothing(tmp_path):
    port = free_port()
    home = tmp_path / "home"
    plat = start(home, port=port)
    try:
        folder = tmp_path / "proj"
        folder.mkdir()
        (folder / "faultmod.py").write_text(CODE)
        sys.path.insert(0, str(folder))
        remote = importlib.import_module("faultmod").slowsq.deploy(client=plat.client(), quiet=True)
        n = 2000
        outcome = {}

        def run_map():
            try:
                outcome["result"] = remote.map(range(n), progress=False)
            except BaseException as exc:  # reported below
                outcome["error"] = exc

        mapper = threading.Thread(target=run_map)
        mapper.start()
        client = plat.client()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # kill it part-way through
            runs = client.get("/job/slowsq/runs", params={"limit": 1}).json()["runs"]
            if runs and runs[0].get("batch_id"):
                batch = client.get(f"/batches/{runs[0]['batch_id']}").json()
                if batch["done"] >= 300:
                    break
            time.sleep(0.02)
        plat.kill()  # SIGKILL: no shutdown, workers die with it
        assert batch["done"] < n, "the map finished before the kill; nothing was tested"
        time.sleep(1.0)
        plat = start(home, port=port)
        mapper.join(timeout=120)
        assert not mapper.is_alive(), "the caller's map did not finish after the restart"
        assert "error" not in outcome, outcome.get("error")
        assert outcome["result"] == [x * x for x in range(n)]
        batch = plat.client().get(f"/batches/{runs[0]['batch_id']}").json()
        assert batch["done"] == batch["total"] == n
        statuses = plat.client().get("/job/slowsq/runs", params={"limit": 1000, "status": "succeeded"}).json()["runs"]
        assert len(statuses) == 1000  # (the page size) all of them ended well
    finally:
        stop(plat)
        sys.modules.pop("faultmod", None)
