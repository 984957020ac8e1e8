"""The SQLite write path's guarantees (records/sqlite/connection.py): every write is committed before its method
returns, but a lease's start, which waits for the next transaction (or LAZY_COMMIT seconds) and is committed with it;
what waits never outlives a write made outside a transaction, a transaction that fails, or a crash's recovery.

What another process sees is read through a connection of its own, as `opbox gc` or a reader would."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from opbox.platform.records.base import NewRun
from opbox.platform.records.sqlite import open_sqlite
from opbox.platform.records.sqlite.connection import LAZY_COMMIT

pytestmark = pytest.mark.sqlite_only


def _run(run_id: str, batch=None, index=None) -> NewRun:
    return NewRun(run_id, "ws", "j1", 1, "call", 1.0, 0, None, batch, index)


def committed(path, run_id: str) -> tuple:
    """(status, worker, started_at) of a run as another connection sees it: what is committed."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as other:
        return other.execute("SELECT status, worker, started_at FROM runs WHERE id = ?", (run_id,)).fetchone()


@pytest.fixture
def state(tmp_path):
    records = open_sqlite(tmp_path / "state.db")
    yield records, tmp_path / "state.db"
    records.close()


def test_a_lease_start_waits_and_is_committed_with_the_next_transaction(state):
    records, path = state
    runs = records.runs

    async def scenario():
        runs.create(_run("r-1"), b"ARGS")
        runs.create(_run("r-2"), b"ARGS")
        assert runs.start("r-1", "w1", 2.0) is True
        assert runs.start("r-1", "w2", 2.5) is False, "a run is leased once, committed or not"
        assert runs.get("r-1").status == "running"  # the gateway's own connection sees it at once
        assert committed(path, "r-1") == ("queued", None, None), "not committed yet: no one was told durably"
        ended, _ = runs.finish(runs.get("r-1"), "succeeded", 3.0, None, None, b"RESULT")  # a transaction joins it
        assert committed(path, "r-1") == ("succeeded", "w1", 2.0)
        assert runs.start("r-2", "w1", 4.0) is True
        runs.create(_run("r-3"), b"ARGS")  # so does the next call's run
        assert committed(path, "r-2") == ("running", "w1", 4.0) and committed(path, "r-3")[0] == "queued"

    asyncio.run(scenario())


def test_a_lease_start_alone_commits_within_lazy_commit(state):
    records, path = state

    async def scenario():
        records.runs.create(_run("r-1"), b"ARGS")
        records.runs.start("r-1", "w1", 2.0)
        assert committed(path, "r-1")[0] == "queued"
        await asyncio.sleep(LAZY_COMMIT * 2)
        assert committed(path, "r-1") == ("running", "w1", 2.0)

    asyncio.run(scenario())


def test_a_write_outside_a_transaction_commits_the_waiting_starts_first(state):
    records, path = state

    async def scenario():
        records.batches.create("b-1", "ws", "j1", 1, None, 1.0)
        records.batches.add_items("b-1", [_run("r-b.0", "b-1", 0)], [b"ARGS"])
        records.runs.start("r-b.0", "w1", 2.0)
        records.batches.seal("b-1", 1)  # an autocommit UPDATE: it must not join (and wait with) the start
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as other:
            assert other.execute("SELECT total FROM batches WHERE id = 'b-1'").fetchone() == (1,)
        assert committed(path, "r-b.0")[0] == "running"
        records.runs.start("r-b.0", "w1", 2.0)
        records.runs.requeue("r-b.0", "requeued")  # in order after the start it follows
        assert committed(path, "r-b.0") == ("queued", None, None)
        assert records.runs.get("r-b.0").status == "queued"

    asyncio.run(scenario())


def test_a_transaction_that_fails_rolls_back_its_own_statements_only(state):
    records, path = state

    async def scenario():
        records.runs.create(_run("r-1"), b"ARGS")
        records.runs.start("r-1", "w1", 2.0)
        with pytest.raises(RuntimeError):
            with records.database.tx() as db:  # joins the start, then fails
                db.execute("UPDATE usage SET bytes = 999 WHERE workspace = 'ws'")
                raise RuntimeError("a bug in the middle of a transaction")
        assert records.usage.of("ws") == 4
        assert records.runs.get("r-1").status == "running", "the start it had joined is kept"
        await asyncio.sleep(LAZY_COMMIT * 2)
        assert committed(path, "r-1") == ("running", "w1", 2.0)

    asyncio.run(scenario())


def test_without_an_event_loop_a_start_commits_at_once(state):
    records, path = state
    records.runs.create(_run("r-1"), b"ARGS")
    assert records.runs.start("r-1", "w1", 2.0) is True
    assert committed(path, "r-1") == ("running", "w1", 2.0)


def test_closing_commits_what_waits(tmp_path):
    records = open_sqlite(tmp_path / "state.db")

    async def scenario():
        records.runs.create(_run("r-1"), b"ARGS")
        records.runs.start("r-1", "w1", 2.0)
        records.close()

    asyncio.run(scenario())
    assert committed(tmp_path / "state.db", "r-1") == ("running", "w1", 2.0)


def test_a_crash_before_a_start_is_committed_loses_only_the_running_mark(tmp_path):
    """The process dies (SIGKILL) with a start waiting: the run is queued in the file, its arguments kept, and
    recovery hands it out again, as it would a running run (whose worker died with the gateway)."""
    path = tmp_path / "state.db"
    script = textwrap.dedent(f"""
        import asyncio, os, signal
        from opbox.platform.records.base import NewRun
        from opbox.platform.records.sqlite import open_sqlite
        records = open_sqlite({str(path)!r})
        async def main():
            records.runs.create(NewRun("r-1", "ws", "j1", 1, "call", 1.0, 0, None, None, None), b"ARGS")
            assert records.runs.start("r-1", "w1", 2.0)
            os.kill(os.getpid(), signal.SIGKILL)
        asyncio.run(main())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == -9, done.stderr
    assert committed(path, "r-1") == ("queued", None, None)
    records = open_sqlite(path)
    try:
        assert [r.id for r in records.runs.claim_orphans("requeued: restart")] == ["r-1"]
        assert records.runs.args("r-1") == b"ARGS"
    finally:
        records.close()
    assert os.path.exists(path)
