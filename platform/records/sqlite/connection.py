"""The SQLite connection: opening (checks and migrations), pragmas, transactions, checkpoints.

One connection, used from the gateway's event loop: each statement takes microseconds
(WAL journal, synchronous=NORMAL: a commit appends to the WAL and does not fsync), which is
cheaper than handing it to a thread. Rows come back as plain tuples; the aggregates build
their records from them by position.

Every write is committed before the method that made it returns, but one: a lease's start
(``Connection.lazy_write``), which nobody is told about durably (a restart queues running runs again,
as it does queued ones). It stays in an open transaction that the next write transaction joins and
commits with its own statements, or that commits alone after ``LAZY_COMMIT`` seconds: a warm call then
commits twice (its run and arguments; its end and result) instead of three times. A method that writes
outside ``Database.tx`` commits what waits first (``storage_errors``), so no other write is ever left
uncommitted.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
from contextlib import contextmanager
from pathlib import Path

from opbox.errors import ConfigError, StorageError, StorageFull

from .checkpoint import SAFETY_PAGES, Checkpointer
from .migrations import MIGRATIONS, check_version, migrate, version_of

log = logging.getLogger("opbox.records")
LAZY_COMMIT = 0.05  # seconds a lazy write (a lease's start) waits for a transaction to join before it commits alone

PRAGMAS = ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON", "busy_timeout=5000", "temp_store=MEMORY",
           "cache_size=-32000", f"wal_autocheckpoint={SAFETY_PAGES}")


class Connection(sqlite3.Connection):
    """The gateway's connection, holding the lazy writes not committed yet (``lazy``: their statements, in the open
    transaction; None: none waits)."""

    lazy: list[tuple[str, tuple]] | None = None
    _timer: asyncio.TimerHandle | None = None

    def lazy_write(self, sql: str, params: tuple) -> int:
        """Run a write whose commit may wait (``LAZY_COMMIT``, or the next transaction); its row count. Without an
        event loop (a tool using the records) it commits at once."""
        if self.lazy is None:
            if self.in_transaction:  # inside a transaction: that one commits it
                return self.execute(sql, params).rowcount
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return self.execute(sql, params).rowcount
            self.execute("BEGIN IMMEDIATE")
            self.lazy = []
            self._timer = loop.call_later(LAZY_COMMIT, self.settle)
        count = self.execute(sql, params).rowcount
        self.lazy.append((sql, params))
        return count

    def take_lazy(self) -> list[tuple[str, tuple]]:
        """The lazy writes, now part of the caller's transaction (which commits them, or rolls them back)."""
        waiting, self.lazy = self.lazy or [], None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return waiting

    def settle(self) -> None:
        """Commit the lazy writes now. If that fails (a full disk) they are dropped, with a warning: a run
        then stays queued in the records while a worker has it, until its end is written (or a restart
        queues it again, as it would a running one)."""
        if self.lazy is None:
            return
        waiting = self.take_lazy()
        try:
            self.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.in_transaction:
                self.execute("ROLLBACK")
            log.warning("could not record %d lease(s) as running: %s", len(waiting), exc)

    def redo_lazy(self, waiting: list[tuple[str, tuple]]) -> None:
        """Lazy writes a transaction that joined them rolled back: written again, lazily (best effort)."""
        try:
            for sql, params in waiting:
                self.lazy_write(sql, params)
        except sqlite3.Error as exc:
            if self.in_transaction:
                self.execute("ROLLBACK")
            self.take_lazy()
            log.warning("could not record %d lease(s) as running: %s", len(waiting), exc)


def joins(method):
    """Marks an aggregate's method that only reads, or writes only inside ``Database.tx``: it runs beside lazy
    writes that wait (a transaction joins them). Any other method commits them first (``storage_errors``)."""
    method.joins = True
    return method


class Database:
    """An open, migrated state file. Raises ConfigError for a file that is not one, or is too new."""

    def __init__(self, path: Path | str, migrations: tuple[str, ...] = MIGRATIONS):
        self.path = str(path)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, factory=Connection)
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
        self.db.settle()
        self.checkpointer.stop()
        self.db.close()

    @contextmanager
    def tx(self):
        """One write transaction (taken at once, so it never fails half-way on a lock); it joins the lazy writes
        that wait, and commits them with its own statements."""
        db = self.db
        joined = db.take_lazy() if db.lazy is not None else None
        if joined is None:
            db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite may have rolled back already (a full disk does)
                db.execute("ROLLBACK")
            if joined:
                db.redo_lazy(joined)
            raise


SQLITE_IOERR, SQLITE_FULL = 10, 13


def storage_errors(cls):
    """Class decorator for an aggregate (which has ``db`` and ``path``): SQLite's failures of the disk beneath
    become the platform's errors: a full disk StorageFull (507, nothing written, retry once space returns), an
    I/O error StorageError. Everything else (a bug) stays as it is. A method not marked ``joins`` first commits
    the lazy writes that wait (it may write outside a transaction: that must not join theirs)."""
    for name, method in list(vars(cls).items()):
        if callable(method) and not name.startswith("_"):
            setattr(cls, name, _translating(method))
    return cls


def _translating(method):
    settles = not getattr(method, "joins", False)

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            if settles and self.db.lazy is not None:
                self.db.settle()
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
