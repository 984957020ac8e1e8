"""A map whose client stops (Ctrl-C, an error, or no more reading) cancels the batch's remaining runs;
the batch id is printed, and `opbox batch` / `opbox cancel --batch` work on it."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time

import pytest

from conftest import user_module
from opbox import serialization

CODE = """
import time
from opbox import operator

@operator()
def nap(x, pause=1.0):
    time.sleep(pause)
    return x
"""

CALLER = """
import signal, sys
from opbox import RemoteFunction
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if the suite's parent ignores it
f = RemoteFunction(sys.argv[1])
print("mapping", flush=True)
f.map(range(40), concurrency=2, progress=False)
"""


@pytest.fixture(scope="module")
def nap(plat, client, tmp_path_factory):
    with user_module(tmp_path_factory.mktemp("interrupt_proj"), "napmod", CODE) as mod:
        yield mod.nap.deploy(client=client, quiet=True)


def _env(plat) -> dict:
    return {**os.environ, "OPBOX_URL": plat.url, "OPBOX_TOKEN": plat.token, "OPBOX_WORKSPACE": plat.workspace}


def _wait_all_ended(client, batch_id: str, timeout: float = 20) -> list[dict]:
    """The batch's runs once none is queued or running (or as they are after ``timeout``)."""
    job_id = client.get(f"/batches/{batch_id}").json()["job_id"]
    deadline = time.monotonic() + timeout
    while True:
        runs = [r for r in client.get(f"/job/{job_id}/runs", params={"limit": 100}).json()["runs"]
                if r.get("batch_id") == batch_id]
        ended = bool(runs) and all(r["status"] not in ("queued", "running") for r in runs)
        if ended or time.monotonic() > deadline:
            return runs
        time.sleep(0.1)


def test_ctrl_c_cancels_the_remaining_runs_and_names_the_batch(plat, client, nap, tmp_path):
    script = tmp_path / "caller.py"
    script.write_text(CALLER)
    proc = subprocess.Popen([sys.executable, str(script), nap.job_id], env=_env(plat), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "mapping"
    time.sleep(1.5)  # a couple of items are running, most are queued behind concurrency=2
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    line = next(line for line in err.splitlines() if line.startswith("opbox: map "))
    batch_id = line.split()[2]
    batch = client.get(f"/batches/{batch_id}").json()
    assert batch["cancelled"] and batch["total"] == 40
    runs = _wait_all_ended(client, batch_id)
    assert len(runs) == 40
    statuses = [r["status"] for r in runs]
    assert all(s in ("succeeded", "cancelled") for s in statuses), statuses
    assert statuses.count("cancelled") >= 30


def test_stopping_reading_early_cancels_too(client, nap, capsys):
    results = nap.imap(range(30), concurrency=2, progress=False)
    assert next(results) == 0
    results.close()  # the caller is done with it
    err = capsys.readouterr().err
    batch_id = err.split("opbox: map ")[1].split()[0]
    assert client.get(f"/batches/{batch_id}").json()["cancelled"]
    assert all(r["status"] != "queued" for r in _wait_all_ended(client, batch_id))


def test_a_map_that_finishes_cancels_nothing(client, nap, capsys):
    assert nap.map(range(3), kwargs={"pause": 0}, progress=False) == [0, 1, 2]
    assert "opbox: map" not in capsys.readouterr().err


def test_batch_status_and_cancel_from_the_cli(plat, client, nap):
    batch_id = client.post(f"/job/{nap.job_id}/batches", json={"concurrency": 1}).json()["batch_id"]
    frames = []
    for i in range(5):
        payload = serialization.dump_args((i,), {})
        frames.append(struct.pack(">I", len(payload)) + payload)
    client.request("POST", f"/batches/{batch_id}/items", params={"start": 0}, content=b"".join(frames),
                   headers={"Content-Type": "application/octet-stream"})
    client.post(f"/batches/{batch_id}/seal", json={"total": 5})

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "opbox.cli", *args], env=_env(plat), capture_output=True,
                              text=True, timeout=60)

    shown = cli("batch", batch_id)
    assert shown.returncode == 0 and shown.stdout.startswith(f"{batch_id} running: 0 of 5 done"), shown.stdout
    cancelled = cli("cancel", "--batch", batch_id)
    assert cancelled.returncode == 0 and f"{batch_id} cancelled" in cancelled.stdout, cancelled.stdout
    assert all(r["status"] in ("cancelled", "succeeded") for r in _wait_all_ended(client, batch_id))
    neither = cli("cancel")
    assert neither.returncode == 2 and "give a run id or --batch" in neither.stderr
