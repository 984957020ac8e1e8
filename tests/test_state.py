"""The SQLite state's WAL is checkpointed by a background thread, not by the commits on the call path."""

from __future__ import annotations

import os
import time

from opbox.platform.state import SAFETY_PAGES, State


def wal_size(path) -> int:
    try:
        return os.path.getsize(f"{path}-wal")
    except FileNotFoundError:
        return 0


def test_the_background_thread_checkpoints_and_close_truncates_the_wal(tmp_path):
    path = tmp_path / "state.db"
    state = State(path)
    try:
        page_size = state.db.execute("PRAGMA page_size").fetchone()[0]
        assert state.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == SAFETY_PAGES
        for i in range(3000):  # far more than SQLite's default 1,000-page autocheckpoint
            state.ensure_workspace(f"ws-{i:05d}-" + "x" * 200)
        deadline = time.monotonic() + 10
        while state.checkpointer.checkpoints == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state.checkpointer.checkpoints > 0, "the checkpointer thread copied the WAL into the database"
        # the WAL restarts from its beginning once checkpointed: it stays well below the safety net
        assert wal_size(path) < SAFETY_PAGES * page_size
    finally:
        state.close()
    assert wal_size(path) == 0, "closing leaves an empty WAL (TRUNCATE checkpoint)"
    again = State(path)
    try:
        assert again.one("SELECT COUNT(*) AS n FROM workspaces")["n"] == 3000
    finally:
        again.close()
