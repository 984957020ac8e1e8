"""WAL checkpoints from a thread of their own, off the gateway's event loop.

Checkpoints (copying the WAL into the database, with fsyncs) would otherwise run inside
whichever commit crossed SQLite's 1,000-page mark, a few milliseconds every ~90 calls: the
call path's p99. A ``Checkpointer`` thread with its own connection does them instead, PASSIVE
(never blocking the writer or readers) every ``CHECKPOINT_INTERVAL``; the gateway's own
connection only checkpoints as a safety net, if the WAL ever grows past ``SAFETY_PAGES``.
This is an SQLite detail: nothing above the adapter knows about it.
"""

from __future__ import annotations

import logging
import sqlite3
import threading

CHECKPOINT_INTERVAL = 0.25  # seconds between background checkpoints
SAFETY_PAGES = 20_000  # the writer checkpoints itself past this (about 80 MB of WAL)

log = logging.getLogger("opbox.records")


class Checkpointer:
    """Checkpoints the WAL every ``interval`` seconds; TRUNCATE on stop, leaving an empty WAL."""

    def __init__(self, path: str, interval: float = CHECKPOINT_INTERVAL):
        self.path = path
        self.interval = interval
        self.checkpoints = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="opbox-sqlite-checkpoint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA busy_timeout=5000")
            while not self._stop.wait(self.interval):
                self._checkpoint(db, "PASSIVE")
            self._checkpoint(db, "TRUNCATE")  # leave an empty WAL behind
        finally:
            db.close()

    def _checkpoint(self, db: sqlite3.Connection, mode: str) -> None:
        try:
            _, frames, _ = db.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
            if frames > 0:
                self.checkpoints += 1
        except sqlite3.Error as exc:  # the writer's safety net still bounds the WAL
            log.warning("checkpointing %s failed: %s", self.path, exc)
