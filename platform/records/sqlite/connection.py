"""The SQLite connection: opening (checks and migrations), pragmas, transactions, checkpoints.

One connection, used from the gateway's event loop: each statement takes microseconds
(WAL journal, synchronous=NORMAL: a commit appends to the WAL and does not fsync), which is
cheaper than handing it to a thread. Rows come back as plain tuples; the aggregates build
their records from them by position.
"""

from __future__ import annotations

import functools
import sqlite3
from contextlib import contextmanager
from pathlib import Path

from opbox.errors import ConfigError, StorageError, StorageFull

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
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:  # SQLite may have rolled back already (a full disk does)
                self.db.execute("ROLLBACK")
            raise


SQLITE_IOERR, SQLITE_FULL = 10, 13


def storage_errors(cls):
    """Class decorator for an aggregate (which has ``path``): SQLite's failures of the disk beneath become
    the platform's errors: a full disk StorageFull (507, nothing written, retry once space returns), an I/O
    error StorageError. Everything else (a bug) stays as it is."""
    for name, method in list(vars(cls).items()):
        if callable(method) and not name.startswith("_"):
            setattr(cls, name, _translating(method))
    return cls


def _translating(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.OperationalError as exc:
            code = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
            if code == SQLITE_FULL:
                raise StorageFull(f"the disk holding the platform's state ({self.path}) is full: nothing new can be "
                                  "stored until space is freed (what was stored is intact)", component="state") from None
            if code == SQLITE_IOERR:
                raise StorageError(f"the platform's state file {self.path} could not be written ({exc})",
                                   component="state") from None
            raise
    return call
