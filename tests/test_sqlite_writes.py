"""The SQLite write path's guarantees (docs/architecture.md, "What the SQLite write path guarantees"): every write
is committed when the records method that made it returns, on the gateway's event loop too, so another process
sees it and a crash right after keeps it; and no write lock is held between methods, so a writer in another
process (`opbox gc` beside the gateway) is never kept waiting by the gateway between its transactions.

What another process sees is read through a connection of its own."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from opbox.platform.records.base import NewRun
from opbox.platform.records.sqlite import open_sqlite

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
