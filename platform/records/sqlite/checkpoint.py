"""WAL checkpoints from a thread of their own, off the gateway's event loop, and a WAL kept small.

Checkpoints (copying the WAL into the database, with fsyncs) would otherwise run inside
whichever commit crossed SQLite's 1,000-page mark, a few milliseconds every ~90 calls: the
call path's p99. A ``Checkpointer`` thread with its own connection does them instead: a PASSIVE
pass (never blocking the writer or readers) every ``CHECKPOINT_INTERVAL``.

A PASSIVE pass alone never lets the WAL start over under a steady load: the writer restarts it
only when it begins a transaction with every frame copied, and frames committed during the pass are
always left. So once the WAL holds ``RESTART_FRAMES``, the pass is followed by a FULL checkpoint:
it takes the write lock only while it copies and syncs the few frames committed since the pass (the
pass copied the rest, and the database pages it wrote are synced beforehand, off the lock), and
leaves every frame copied, so the writer's next transaction writes the WAL from its start again.
It waits for the write lock in SQLite's busy handler, up to ``FULL_WAIT_MS`` (off the GIL: retried
from Python it mostly found the lock taken, as the GIL passes to this thread while the event loop is
inside SQLite); the event loop's next ``BEGIN IMMEDIATE`` may wait for it in turn (SQLite's busy
handler: 1, 2, 5 ms steps). Unlike RESTART it does not wait for readers to leave the WAL.
The gateway's own connection checkpoints only as a safety net, if the WAL ever grows past
``SAFETY_PAGES`` (this thread stuck, or a reader in another process holding old frames for long);
``JOURNAL_LIMIT`` then trims the file back once it restarts.
This is an SQLite detail: nothing above the adapter knows about it.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading

CHECKPOINT_INTERVAL = 0.25  # seconds between background passes (one that finds nothing new costs no sync)
RESTART_FRAMES = 8_000  # a WAL this long (about 32 MB) is restarted after the pass
FULL_WAIT_MS = 20  # how long a FULL checkpoint waits for the write lock (SQLite's busy handler)
SAFETY_PAGES = 20_000  # the writer checkpoints itself past this (about 80 MB of WAL)
JOURNAL_LIMIT = 64 * 2**20  # bytes: a WAL file grown past this is trimmed to it when it restarts

log = logging.getLogger("opbox.records")


class Checkpointer:
    """Checkpoints the WAL every ``interval`` seconds, restarting it once it holds ``restart_frames``;
    TRUNCATE on stop, leaving an empty WAL. ``checkpoints`` counts the passes that copied frames,
    ``restarts`` the FULL checkpoints that completed (each lets the writer restart the WAL),
    ``largest_wal`` the most frames a checkpoint found."""

    def __init__(self, path: str, interval: float = CHECKPOINT_INTERVAL, restart_frames: int = RESTART_FRAMES):
        self.path = path
        self.interval = interval
        self.restart_frames = restart_frames
        self.checkpoints = 0
        self.restarts = 0
        self.largest_wal = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="opbox-sqlite-checkpoint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        database_file = os.open(self.path, os.O_RDONLY)
        try:
            db.execute(f"PRAGMA busy_timeout={FULL_WAIT_MS}")
            while not self._stop.wait(self.interval):
                if self._checkpoint(db, "PASSIVE")[1] >= self.restart_frames:
                    self._sync(database_file)  # the pages the passes copied: synced off the write lock
                    self._checkpoint(db, "FULL")
            db.execute("PRAGMA busy_timeout=5000")
            self._checkpoint(db, "TRUNCATE")  # leave an empty WAL behind
        finally:
            os.close(database_file)
            db.close()

    def _sync(self, fd: int) -> None:
        try:
            os.fdatasync(fd)
        except OSError as exc:  # the FULL checkpoint syncs them itself (or fails the same way)
            log.warning("syncing %s failed: %s", self.path, exc)

    def _checkpoint(self, db: sqlite3.Connection, mode: str) -> tuple[int, int, int]:
        """One checkpoint: (1 if it could not complete, the WAL's frames, the frames copied so far)."""
        try:
            busy, frames, copied = db.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        except sqlite3.Error as exc:  # the writer's safety net still bounds the WAL
            log.warning("checkpointing %s failed: %s", self.path, exc)
            return 1, 0, 0
        self.largest_wal = max(self.largest_wal, frames)
        if mode == "PASSIVE":
            self.checkpoints += copied > 0
        else:
            self.restarts += not busy
        return busy, frames, copied
