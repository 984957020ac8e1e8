"""Job-Runs: states, listing, cancel, timeouts, retries, crashes and memory limits."""

from __future__ import annotations

import time

import pytest

from opbox import Jobs, Resource, RunCancelled, RunFailed, RunTimeout
from conftest import user_module

CODE = """
import os, signal, time
from opbox import operator, Resource

@operator()
def sleeper(seconds):
    time.sleep(seconds)
    return seconds

@operator(timeout=1.0)
def too_slow():
    time.sleep(30)

@operator(max_retries=2)
def flaky(marker):
    # fails on the first two attempts, succeeds on the third
    count = int(open(marker).read()) if os.path.exists(marker) else 0
    open(marker, "w").write(str(count + 1))
    if count < 2:
        raise RuntimeError(f"attempt {count} fails")
    return count

@operator()
def crash(how):
    if how == "exit":
        os._exit(3)
    os.kill(os.getpid(), signal.SIGKILL)

@operator(max_retries=1)
def crash_once(marker):
    if not os.path.exists(marker):
        open(marker, "w").write("x")
        os.kill(os.getpid(), signal.SIGKILL)
    return "survived"

@operator(resource=Resource(memory="96Mi"))
def hog(mb):
    blocks = [bytearray(1024 * 1024) for _ in range(mb)]
    time.sleep(2)
    return len(blocks)

@operator(resource=Resource(memory="96Mi"), max_retries=1)
def hog_once(marker, mb):
    # the first attempt passes the memory limit; the retry stays under it
    if not os.path.exists(marker):
        open(marker, "w").write("x")
        blocks = [bytearray(1024 * 1024) for _ in range(mb)]
        time.sleep(2)
    return "fits"


@operator()
def graceful(marker):
    open(marker + ".started", "w").write("x")
    try:
        time.sleep(60)
    finally:
        open(marker, "w").write("cleaned up")
"""


@pytest.fixture(scope="module")
def fns(plat, client, tmp_path_factory):
    names = ("sleeper", "too_slow", "flaky", "crash", "crash_once", "hog", "hog_once", "graceful")
    with user_module(tmp_path_factory.mktemp("runs_proj"), "runsmod", CODE) as mod:
        yield {n: getattr(mod, n).deploy(client=client, quiet=True) for n in names}


def test_states_and_timestamps(fns):
    run = fns["sleeper"].submit(0.5)
    seen = set()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status = run.status()
        seen.add(status["status"])
        if status["finished_at"]:
            break
        time.sleep(0.05)
    assert "running" in seen and status["status"] == "succeeded"
    assert status["created_at"] <= status["started_at"] <= status["finished_at"]
    assert status["finished_at"] - status["started_at"] >= 0.45


def test_list_runs_newest_first_and_filter(fns):
    a, b = fns["sleeper"].submit(0), fns["sleeper"].submit(0)
    a.result(timeout=20), b.result(timeout=20)
    runs = fns["sleeper"].runs(limit=2)
    assert [r["id"] for r in runs] == [b.id, a.id]
    assert all(r["status"] == "succeeded" for r in fns["sleeper"].runs(status="succeeded"))
    older = Jobs(fns["sleeper"].job_id, fns["sleeper"].client).runs(limit=1)
    assert older[0]["id"] == b.id


def test_cancel_a_running_run(fns):
    run = fns["sleeper"].submit(60)
    deadline = time.monotonic() + 20
    while run.status()["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    t = time.monotonic()
    assert run.cancel()["status"] == "cancelled"
    with pytest.raises(RunCancelled):
        run.result(timeout=10)
    assert time.monotonic() - t < 5
    # the pool replaces the cancelled worker: the next call works
    assert fns["sleeper"](0) == 0


def test_cancel_runs_finally_blocks_within_grace(fns, tmp_path):
    marker = tmp_path / "cleanup"
    run = fns["graceful"].submit(str(marker))
    started = tmp_path / "cleanup.started"
    deadline = time.monotonic() + 20
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    run.cancel()
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.read_text() == "cleaned up"


def test_cancel_a_queued_run(fns):
    blockers = [fns["sleeper"].submit(3) for _ in range(4)]  # fill the workers
    queued = fns["sleeper"].submit(0)
    assert queued.cancel()["status"] == "cancelled"
    with pytest.raises(RunCancelled):
        queued.result(timeout=10)
    for b in blockers:
        b.result(timeout=30)
    assert queued.status()["started_at"] is None or queued.status()["status"] == "cancelled"


def test_timeout_ends_timed_out(fns):
    run = fns["too_slow"].submit()
    t = time.monotonic()
    with pytest.raises(RunTimeout, match="timed out after 1 s"):
        run.result(timeout=20)
    assert time.monotonic() - t < 10
    assert run.status()["status"] == "timed_out"


def test_retries_until_success(fns, tmp_path):
    marker = tmp_path / "count"
    run = fns["flaky"].submit(str(marker))
    assert run.result(timeout=30) == 2
    status = run.status()
    assert status["attempt"] == 2 and status["status"] == "succeeded"


def test_retries_exhausted_fail_with_the_last_error(fns, tmp_path, client):
    marker = tmp_path / "count"
    marker.write_text("-5")
    with pytest.raises(RuntimeError, match="attempt"):
        fns["flaky"](str(marker))
    assert marker.read_text() == "-2", "three attempts: the first and two retries"


def test_crashes_end_failed_with_the_reason_never_stuck(fns):
    with pytest.raises(RunFailed, match="killed by SIGKILL"):
        fns["crash"]("kill")
    with pytest.raises(RunFailed, match="exited with code 3"):
        fns["crash"]("exit")
    assert fns["sleeper"](0) == 0


def test_crash_is_retried(fns, tmp_path):
    run = fns["crash_once"].submit(str(tmp_path / "m"))
    assert run.result(timeout=30) == "survived"
    status = run.status()
    assert status["attempt"] == 1 and "SIGKILL" in status["exit_reason"]


def test_memory_limit_kills_with_oom_reason(fns):
    with pytest.raises(RunFailed, match="OOMKilled.*96Mi"):
        fns["hog"](400)
    assert fns["hog"](10) == 10


def test_memory_kill_is_retried(fns, tmp_path):
    run = fns["hog_once"].submit(str(tmp_path / "m"), 400)
    assert run.result(timeout=60) == "fits"
    status = run.status()
    assert status["attempt"] == 1 and "OOMKilled" in status["exit_reason"]


def test_resource_is_recorded_on_the_version(fns):
    versions = Jobs(fns["hog"].job_id, fns["hog"].client).versions()
    assert versions[0]["resource"]["memory"] == "96Mi"
    assert Jobs(fns["too_slow"].job_id, fns["too_slow"].client).versions()[0]["resource"]["timeout"] == 1.0
    assert Resource.from_dict(versions[0]["resource"]) == Resource(memory="96Mi")
