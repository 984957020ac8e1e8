"""Group commit (docs/architecture.md, "What the SQLite write path guarantees"): a call's run and its end are
committed with the other grouped writes of the same event-loop turn, in one transaction, and acted on (the run
dispatched, its caller answered) only once that transaction has committed. What another process sees is read
through a connection of its own; the gateway's guarantees are checked through a real gateway."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from opbox import envelope
from opbox.errors import StorageFull
from opbox.platform.records.base import NewRun
from opbox.platform.records.sqlite import open_sqlite
from conftest import user_module
from platform_fixture import ON_SQLITE, running_platform
from test_sqlite_writes import committed, lock_is_free

pytestmark = pytest.mark.sqlite_only

CODE = """
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


def _run(run_id: str) -> NewRun:
    return NewRun(run_id, "ws", "j1", 1, "call", 1.0, 0, None, None, None)


def outcome(write, *args) -> asyncio.Future:
    """A grouped write's outcome as a future: its result once committed, or the error that kept it out."""
    done = asyncio.get_running_loop().create_future()
    write(*args, lambda result, error: done.set_result(result) if error is None else done.set_exception(error))
    return done


@pytest.fixture
def state(tmp_path):
    records = open_sqlite(tmp_path / "state.db")
    yield records, tmp_path / "state.db"
    records.close()


def test_a_turns_grouped_writes_are_stored_together_and_resolve_only_once_committed(state):
    records, path = state
    runs = records.runs

    async def scenario():
        runs.create(_run("r-0"), b"ZERO")
        runs.start("r-0", "w1", 2.0)
        created = [outcome(runs.create_grouped, _run(f"r-{i}"), b"ARGS") for i in (1, 2, 3)]
        ended = outcome(runs.finish_grouped, runs.get("r-0"), "succeeded", 3.0, None, None, b"RESULT")
        # nothing of them is written yet, nor resolved, and no lock is held between the writes
        assert committed(path, "SELECT id FROM runs WHERE id != 'r-0'") == [] and lock_is_free(path)
        assert not any(f.done() for f in (*created, ended))
        assert await asyncio.gather(*created) == [None, None, None]
        record, complete = await ended
        assert (record.status, record.finished_at, complete) == ("succeeded", 3.0, False)
        assert committed(path, "SELECT id, status FROM runs ORDER BY id") == [
            ("r-0", "succeeded"), ("r-1", "queued"), ("r-2", "queued"), ("r-3", "queued")]
        assert committed(path, "SELECT data FROM payloads WHERE run_id = 'r-0' AND kind = 'result'") == [(b"RESULT",)]
        assert committed(path, "SELECT bytes FROM usage") == [(4 + 3 * 4 + 6,)] and lock_is_free(path)
        # an end of a run that ended meanwhile leaves it as it is
        assert await outcome(runs.finish_grouped, record, "failed", 4.0, "late", None, b"LATE") is None
        assert committed(path, "SELECT status, finished_at FROM runs WHERE id = 'r-0'") == [("succeeded", 3.0)]

    asyncio.run(scenario())


def test_an_error_in_one_grouped_write_undoes_only_its_own_statements(state):
    records, path = state

    def half_then_fails(db):
        db.execute("INSERT INTO usage(workspace, bytes) VALUES ('half', 1)")
        db.execute("INSERT INTO no_such_table VALUES (1)")

    async def scenario():
        first = outcome(records.runs.create_grouped, _run("r-1"), b"ARGS")
        broken = outcome(records.database.soon, half_then_fails, "x")
        last = outcome(records.runs.create_grouped, _run("r-2"), b"ARGS")
        assert await first is None and await last is None
        with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
            await broken
        assert committed(path, "SELECT id FROM runs ORDER BY id") == [("r-1",), ("r-2",)]
        assert committed(path, "SELECT workspace FROM usage WHERE workspace = 'half'") == []

    asyncio.run(scenario())


def test_writes_keep_their_order_and_reads_see_what_the_turn_wrote(state):
    """An eager write commits the waiting grouped ones first; a read of a run with a grouped write waiting
    commits it first (so an end that raced it sees the run ended)."""
    records, path = state
    runs = records.runs

    async def scenario():
        created = outcome(runs.create_grouped, _run("r-1"), b"ARGS")
        assert runs.get("r-1").status == "queued"  # committed by the read
        assert committed(path, "SELECT status FROM runs WHERE id = 'r-1'") == [("queued",)]
        await created
        assert runs.start("r-1", "w1", 2.0)
        ended = outcome(runs.finish_grouped, runs.get("r-1"), "succeeded", 3.0, None, None, b"R")
        runs.append_log("r-1", b"after\n", 1000, b"[dropped]\n", False)  # an eager write: the end goes first
        assert committed(path, "SELECT status FROM runs WHERE id = 'r-1'") == [("succeeded",)]
        assert (await ended)[0].status == "succeeded" and lock_is_free(path)

    asyncio.run(scenario())


def test_a_failing_commit_fails_every_write_of_its_group_and_stores_none_of_them(state):
    """The COMMIT itself refused (a deferred constraint stands in for a full disk, which fails the same
    COMMIT; tests/test_disk_full.py fills a real one): every write of the group gets the error."""
    records, path = state
    records.database.db.execute("CREATE TABLE guard(x INTEGER REFERENCES runs(id) DEFERRABLE INITIALLY DEFERRED)")

    async def scenario():
        created = [outcome(records.runs.create_grouped, _run(f"r-{i}"), b"ARGS") for i in range(3)]
        guard = outcome(records.database.soon, lambda db: db.execute("INSERT INTO guard VALUES ('no such run')"), "g")
        outcomes = await asyncio.gather(*created, guard, return_exceptions=True)
        assert all(isinstance(o, sqlite3.IntegrityError) for o in outcomes), outcomes
        assert committed(path, "SELECT COUNT(*) FROM runs") == [(0,)] and lock_is_free(path)
        assert committed(path, "SELECT COUNT(*) FROM payloads") == [(0,)]
        assert await outcome(records.runs.create_grouped, _run("r-9"), b"ARGS") is None  # the next group goes in
        assert committed(path, "SELECT id FROM runs") == [("r-9",)]

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    home = tmp_path_factory.mktemp("gc-home")
    with running_platform(home, extra_env=ON_SQLITE) as plat, \
            user_module(tmp_path_factory.mktemp("gc-proj"), "gcmod", CODE) as mod:
        client = plat.client()
        for name in ("square", "nap"):
            getattr(mod, name).deploy(client=client, quiet=True)
        yield plat


def _call(http: httpx.Client, plat, job: str, arg, wait: float) -> httpx.Response:
    return http.post(f"/{plat.workspace}/job/{job}/runs", params={"wait": wait}, content=envelope.json_args([arg]),
                     headers={"Content-Type": envelope.CONTENT_TYPE})


def test_no_answer_leaves_before_the_commit_it_reports(gateway):
    """50 concurrent callers: the moment each answer arrives, another process already reads its run (queued or
    later for a 202, ended with its result for a 200)."""
    plat = gateway
    problems: list[str] = []

    def caller(n: int) -> None:
        with plat.http() as http:
            for i in range(8):
                wait = 0 if i % 2 else 30
                resp = _call(http, plat, "square", n * 100 + i, wait)
                run_id = resp.headers.get("x-opbox-run-id") or resp.json()["id"]
                rows = plat.records_rows(f"SELECT r.status, (SELECT COUNT(*) FROM payloads p WHERE p.run_id = r.id "
                                         f"AND p.kind = 'result') FROM runs r WHERE r.id = '{run_id}'")
                if resp.status_code == 200:
                    if rows != [("succeeded", 1)]:
                        problems.append(f"{run_id}: answered 200 but stored {rows}")
                elif resp.status_code != 202 or not rows:
                    problems.append(f"{run_id}: answered {resp.status_code} but stored {rows}")

    with ThreadPoolExecutor(50) as pool:
        list(pool.map(caller, range(50)))
    assert problems == []


def test_a_killed_gateway_keeps_every_run_whose_id_a_caller_got(tmp_path_factory):
    home = tmp_path_factory.mktemp("gc-kill")
    with running_platform(home, extra_env=ON_SQLITE) as plat, \
            user_module(tmp_path_factory.mktemp("gc-kill-proj"), "gckillmod", CODE) as mod:
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
