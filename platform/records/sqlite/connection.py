"""The SQLite connection: opening (checks and migrations), pragmas, transactions, checkpoints.

One connection, used from the gateway's event loop: each statement takes microseconds
(WAL journal, synchronous=NORMAL: a commit appends to the WAL and does not fsync), which is
cheaper than handing it to a thread. Rows come back as plain tuples; the aggregates build
their records from them by position.
"""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from pathlib import Path

from opbox.errors import ConfigError

from .checkpoint import SAFETY_PAGES, Checkpointer
from .migrations import MIGRATIONS, check_version, migrate, version_of

PRAGMAS = ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON", "busy_timeout=5000", "temp_store=MEMORY",
           "cache_size=-32000", f"wal_autocheckpoint={SAFETY_PAGES}")


class Database:
    """An open, migrated state file. Raises ConfigError for a file that is not one, or is too new."""

    def __init__(self, path: Path | str, migrations: tuple[str, ...] = MIGRATIONS):
        self.path = str(path)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open the state file {self.path} ({exc})") from None
        try:
            # read-only checks first: a file we refuse is left exactly as it was
            check_version(self.path, version_of(self.db), len(migrations))
            self.db.execute("PRAGMA busy_timeout=5000")
            self.version = migrate(self.db, self.path, migrations)
            for pragma in PRAGMAS:
                self.db.execute(f"PRAGMA {pragma}")
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise ConfigError(f"{self.path} is not a valid opbox state file ({exc})") from None
        except BaseException:
            self.db.close()
            raise
        self.checkpointer = Checkpointer(self.path)
        self.checkpointer.start()

    def close(self) -> None:
        self.checkpointer.stop()
        self.db.close()

    @contextmanager
    def tx(self):
        """One write transaction (taken at once, so it never fails half-way on a lock)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
