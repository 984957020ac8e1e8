"""The SQLite write path's guarantees (docs/architecture.md, "What the SQLite write path guarantees"): every write
is committed when the records method that made it returns, on the gateway's event loop too, so another process
sees it and a crash right after keeps it; and no write lock is held between methods, so a writer in another
process (`opbox gc` beside the gateway) is never kept waiting by the gateway between its transactions. Through a
real gateway under 50 concurrent callers: no answer leaves before the commit it reports, and a SIGKILLed gateway
keeps every run whose id a caller got (what any group commit must keep too).

What another process sees is read through a connection of its own."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest

from opbox import envelope
from opbox.platform.records.base import NewRun
from opbox.platform.records.sqlite import open_sqlite
from conftest import user_module
from platform_fixture import ON_SQLITE, running_platform

pytestmark = pytest.mark.sqlite_only


def _run(run_id: str, batch=None, index=None) -> NewRun:
    return NewRun(run_id, "ws", "j1", 1, "call", 1.0, 0, None, batch, index)


def committed(path, sql: str) -> list[tuple]:
    """Rows as another process sees them: what is committed."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as other:
        return other.execute(sql).fetchall()


def lock_is_free(path) -> bool:
    """Whether another process takes the write lock at once (no waiting)."""
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        other.close()


@pytest.fixture
def state(tmp_path):
    records = open_sqlite(tmp_path / "state.db")
    yield records, tmp_path / "state.db"
    records.close()


def test_every_write_of_a_call_is_committed_when_its_method_returns_and_holds_no_lock(state):
    records, path = state
    runs = records.runs

    async def scenario():  # on an event loop, as in the gateway
        runs.create(_run("r-1"), b"ARGS")
        assert committed(path, "SELECT status FROM runs WHERE id = 'r-1'") == [("queued",)] and lock_is_free(path)
        assert committed(path, "SELECT data FROM payloads WHERE run_id = 'r-1'") == [(b"ARGS",)]
        assert runs.start("r-1", "w1", 2.0) is True
        assert committed(path, "SELECT status, worker, started_at FROM runs WHERE id = 'r-1'") == [("running", "w1", 2.0)]
        assert lock_is_free(path)
        runs.append_log("r-1", b"a line\n", 1000, b"[dropped]\n", False)
        assert committed(path, "SELECT data FROM logs WHERE run_id = 'r-1'") == [(b"a line\n",)] and lock_is_free(path)
        runs.finish(runs.get("r-1"), "succeeded", 3.0, None, None, b"RESULT")
        assert committed(path, "SELECT status FROM runs WHERE id = 'r-1'") == [("succeeded",)] and lock_is_free(path)
        assert committed(path, "SELECT bytes FROM usage WHERE workspace = 'ws'") == [(4 + 7 + 6,)]

    asyncio.run(scenario())


def test_map_and_retry_writes_are_committed_when_their_methods_return(state):
    records, path = state

    async def scenario():
        records.batches.create("b-1", "ws", "j1", 1, None, 1.0)
        records.batches.add_items("b-1", [_run("r-b.0", "b-1", 0), _run("r-b.1", "b-1", 1)], [b"A", b"B"])
        records.batches.seal("b-1", 2)
        assert committed(path, "SELECT submitted, total FROM batches WHERE id = 'b-1'") == [(2, 2)]
        records.runs.start("r-b.0", "w1", 2.0)
        records.runs.retry(records.runs.get("r-b.0"), "failed", "boom", "ValueError", 3.0, None)
        assert committed(path, "SELECT status, attempt FROM runs WHERE id = 'r-b.0'") == [("queued", 1)]
        records.runs.start("r-b.0", "w1", 4.0)
        records.runs.requeue("r-b.0", "requeued")
        assert committed(path, "SELECT status, worker FROM runs WHERE id = 'r-b.0'") == [("queued", None)]
        assert lock_is_free(path)

    asyncio.run(scenario())


def test_a_crash_right_after_a_run_ended_keeps_its_end_and_result(tmp_path):
    """SIGKILL the moment finish returns (WAL, synchronous=NORMAL: the commit survives the process)."""
    path = tmp_path / "state.db"
    script = textwrap.dedent(f"""
        import asyncio, os, signal
        from opbox.platform.records.base import NewRun
        from opbox.platform.records.sqlite import open_sqlite
        records = open_sqlite({str(path)!r})
        async def main():
            runs = records.runs
            runs.create(NewRun("r-1", "ws", "j1", 1, "call", 1.0, 0, None, None, None), b"ARGS")
            runs.start("r-1", "w1", 2.0)
            runs.finish(runs.get("r-1"), "succeeded", 3.0, None, None, b"RESULT")
            os.kill(os.getpid(), signal.SIGKILL)
        asyncio.run(main())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == -9, done.stderr
    records = open_sqlite(path)
    try:
        run = records.runs.get("r-1")
        assert (run.status, run.worker, run.started_at, run.finished_at) == ("succeeded", "w1", 2.0, 3.0)
        assert records.runs.result("r-1") == b"RESULT" and records.runs.claim_orphans("restart") == []
    finally:
        records.close()


GATEWAY_CODE = """
import time
from opbox import operator

@operator()
def square(x):
    return x * x

@operator()
def nap(seconds):
    time.sleep(seconds)
    return seconds
"""


# -- through a real gateway ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    home = tmp_path_factory.mktemp("writes-home")
    with running_platform(home, extra_env=ON_SQLITE) as plat, \
            user_module(tmp_path_factory.mktemp("writes-proj"), "writesmod", GATEWAY_CODE) as mod:
        mod.square.deploy(client=plat.client(), quiet=True)
        yield plat


def _call(http: httpx.Client, plat, job: str, arg, wait: float) -> httpx.Response:
    return http.post(f"/{plat.workspace}/job/{job}/runs", params={"wait": wait}, content=envelope.json_args([arg]),
                     headers={"Content-Type": envelope.CONTENT_TYPE})


@contextmanager
def write_lock_held(path):
    """Another process's write transaction: while it is open, nothing the gateway writes can commit."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_no_answer_leaves_before_the_commit_it_reports(gateway):
    """Calls (answered 202 at once, or 200 with their result) sent while another process holds the write lock:
    none may be answered before the lock is released (its run could not be committed yet); once it is, each is
    answered and another process reads what its answer reports. Then 50 concurrent callers: the moment each
    answer arrives, another process reads its run (queued or later for a 202, ended with its result for a 200)."""
    plat = gateway
    problems: list[str] = []
    released = threading.Event()

    def check(resp: httpx.Response) -> None:
        run_id = resp.headers.get("x-opbox-run-id") or resp.json().get("id")
        if run_id is None:
            problems.append(f"answered {resp.status_code}: {resp.text[:300]}")
            return
        rows = plat.records_rows(f"SELECT r.status, (SELECT COUNT(*) FROM payloads p WHERE p.run_id = r.id "
                                 f"AND p.kind = 'result') FROM runs r WHERE r.id = '{run_id}'")
        if resp.status_code == 200:
            if rows != [("succeeded", 1)]:
                problems.append(f"{run_id}: answered 200 but stored {rows}")
        elif resp.status_code != 202 or not rows:
            problems.append(f"{run_id}: answered {resp.status_code} but stored {rows}")

    def held_caller(i: int) -> None:
        with plat.http() as http:
            resp = _call(http, plat, "square", i, 0 if i % 2 else 30)
            if not released.is_set():
                problems.append(f"answered {resp.status_code} while the write lock was held elsewhere")
            check(resp)

    with ThreadPoolExecutor(6) as pool:
        with write_lock_held(plat.home / "state.db"):
            answers = [pool.submit(held_caller, i) for i in range(6)]
            time.sleep(0.5)  # room for a gateway that answers too early to do so
            released.set()
        for answer in answers:
            answer.result()
    assert problems == []

    def caller(n: int) -> None:
        with plat.http() as http:
            for i in range(8):
                check(_call(http, plat, "square", n * 100 + i, 0 if i % 2 else 30))

    with ThreadPoolExecutor(50) as pool:
        list(pool.map(caller, range(50)))
    assert problems == []


def test_a_killed_gateway_keeps_every_run_whose_id_a_caller_got(tmp_path_factory):
    """Callers calling (answered 202 with their runs' ids) while the gateway is SIGKILLed; the kill comes while
    another process holds the write lock, so that an answer sent before its commit would name a lost run."""
    home = tmp_path_factory.mktemp("writes-kill")
    with running_platform(home, extra_env=ON_SQLITE) as plat, \
            user_module(tmp_path_factory.mktemp("writes-kill-proj"), "writeskillmod", GATEWAY_CODE) as mod:
        mod.nap.deploy(client=plat.client(), quiet=True)
        told: list[str] = []
        stop = threading.Event()

        def caller() -> None:
            with plat.http() as http:
                while not stop.is_set():
                    try:
                        resp = _call(http, plat, "nap", 0.01, 0)
                    except httpx.HTTPError:
                        return  # the gateway is gone
                    if resp.status_code == 202:
                        told.append(resp.json()["id"])

        threads = [threading.Thread(target=caller) for _ in range(20)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while len(told) < 300 and time.monotonic() < deadline:
            time.sleep(0.01)
        with write_lock_held(home / "state.db"):
            time.sleep(0.5)
            plat.kill()  # SIGKILL, callers still calling
        stop.set()
        for thread in threads:
            thread.join(30)
    assert len(told) >= 300
    records = open_sqlite(home / "state.db")
    try:
        missing = [run_id for run_id in told if records.runs.get(run_id) is None]
    finally:
        records.close()
    assert missing == []
