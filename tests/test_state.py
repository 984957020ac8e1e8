"""The SQLite state file: the WAL is checkpointed by a background thread, not by the commits on the call path."""

from __future__ import annotations

import os
import time

from opbox.platform.records.sqlite import open_sqlite
from opbox.platform.records.sqlite.checkpoint import SAFETY_PAGES


def wal_size(path) -> int:
    try:
        return os.path.getsize(f"{path}-wal")
    except FileNotFoundError:
        return 0


def test_the_background_thread_checkpoints_and_close_truncates_the_wal(tmp_path):
    path = tmp_path / "state.db"
    records = open_sqlite(path)
    db, checkpointer = records.database.db, records.database.checkpointer
    try:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        assert db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == SAFETY_PAGES
        for i in range(3000):  # far more than SQLite's default 1,000-page autocheckpoint
            records.tokens.add_workspace(f"ws-{i:05d}-" + "x" * 200)
        deadline = time.monotonic() + 10
        while checkpointer.checkpoints == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert checkpointer.checkpoints > 0, "the checkpointer thread copied the WAL into the database"
        # the WAL restarts from its beginning once checkpointed: it stays well below the safety net
        assert wal_size(path) < SAFETY_PAGES * page_size
    finally:
        records.close()
    assert wal_size(path) == 0, "closing leaves an empty WAL (TRUNCATE checkpoint)"
    again = open_sqlite(path)
    try:
        assert all(again.tokens.workspace_exists(f"ws-{i:05d}-" + "x" * 200) for i in range(3000))
    finally:
        again.close()


def test_the_sqlite_adapter_has_every_method_of_the_records_port(tmp_path):
    """Each aggregate implements its protocol with the same parameters (what a PostgreSQL adapter must match)."""
    import inspect

    from opbox.platform.records import base

    records = open_sqlite(tmp_path / "state.db")
    try:
        for aggregate, protocol in base.Records.__annotations__.items():
            protocol = getattr(base, protocol)
            methods = [m for m in vars(protocol) if not m.startswith("_") and callable(getattr(protocol, m))]
            assert methods, protocol
            for method in methods:
                implemented = inspect.signature(getattr(getattr(records, aggregate), method))
                declared = inspect.signature(getattr(protocol, method))
                assert list(implemented.parameters) == list(declared.parameters)[1:], (aggregate, method)
    finally:
        records.close()


def test_jobs_looked_up_by_id_or_name_follow_every_write(tmp_path):
    """Calls find their job in memory (records.sqlite.jobs); a new version, a ready one and a delete show at once."""
    from opbox.platform.records.base import NewVersion

    records = open_sqlite(tmp_path / "state.db")
    new = NewVersion(entry="m:f", code_key="k", code_sha256="s", python="3.11", cloudpickle="3", resource={},
                     created_at=time.time())
    job, number = records.jobs.add_version("ws", "f", "function", new)
    assert records.jobs.get("ws", "f").latest_version is None
    records.jobs.version_ready(job.id, number, {"kind": "venv"}, "r", "log", time.time())
    assert records.jobs.get("ws", "f").latest_version == number == records.jobs.get("ws", job.id).latest_version
    _, second = records.jobs.add_version("ws", "f", "function", new)
    records.jobs.version_ready(job.id, second, {"kind": "venv"}, "r", "log", time.time())
    assert records.jobs.get("ws", job.id).latest_version == second
    assert records.jobs.get("other", job.id) is None
    records.jobs.delete(job.id)
    assert records.jobs.get("ws", "f") is None and records.jobs.get("ws", job.id) is None
    records.close()
