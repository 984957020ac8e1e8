"""The SQLite connection: opening (checks and migrations), pragmas, transactions, checkpoints.

One connection, used from the gateway's event loop: each statement takes microseconds
(WAL journal, synchronous=NORMAL: a commit appends to the WAL and does not fsync), which is
cheaper than handing it to a thread. Rows come back as plain tuples; the aggregates build
their records from them by position.

Group commit: the call path's writes (a run's create, its end) may be handed to ``soon``: they wait in
memory, unseen, until the end of the event loop's next turn (after that turn's events: the requests
that arrived meanwhile join them; a turn with nothing to do takes microseconds), when they all run in
one transaction, each in a
``SAVEPOINT`` of its own (an error in one undoes only its statements), and one COMMIT makes them
durable. Each is then told its outcome (its result, or its error: a failed COMMIT fails every write that
was in it, and nothing of them is stored); only then does its caller act on it. Any other write (``tx``) runs
the waiting ones first, in their own transaction, so writes keep their order; the write lock is held
only while a transaction runs, never between them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from opbox.errors import ConfigError, StorageError, StorageFull

from ..base import Then
from .checkpoint import SAFETY_PAGES, Checkpointer
from .migrations import MIGRATIONS, check_version, migrate, version_of

log = logging.getLogger("opbox.records")
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
        self.pending: list[tuple[Callable[[sqlite3.Connection], Any], Then]] = []  # see soon()
        self.pending_keys: set[str] = set()  # what the waiting writes are about (run ids): reads of them flush
        self.checkpointer = Checkpointer(self.path)
        self.checkpointer.start()

    def close(self) -> None:
        self.flush()
        self.checkpointer.stop()
        self.db.close()

    def soon(self, write: Callable[[sqlite3.Connection], Any], key: str, then: Then) -> None:
        """Run ``write(db)`` with the other writes of this event-loop turn and the next, in one transaction
        after the next turn's events; then, once committed, ``then(its result, None)``, or ``then(None, the error that kept it out)``
        (StorageFull, ...; nothing of it stored). Needs a running event loop. ``key``: what it writes (a run
        id), for ``flush_for``."""
        if not self.pending:  # at the end of the next turn: the writes of two turns' events go together
            loop = asyncio.get_running_loop()
            loop.call_soon(loop.call_soon, self.flush)
        self.pending.append((write, then))
        self.pending_keys.add(key)

    def flush_for(self, key: str) -> None:
        """Commit the waiting writes now if one of them is about ``key`` (a read of it sees it written)."""
        if key in self.pending_keys:
            self.flush()

    def flush(self) -> None:
        """Commit the waiting writes (see ``soon``), then tell each how it went, in their order."""
        ops, self.pending = self.pending, []
        self.pending_keys.clear()
        if not ops:
            return
        db, outcomes = self.db, []
        try:
            db.execute("BEGIN IMMEDIATE")
            for write, _ in ops:
                db.execute("SAVEPOINT grouped")
                try:
                    outcomes.append((write(db), None))
                except Exception as exc:
                    if not db.in_transaction:  # SQLite rolled the whole transaction back (a full disk may)
                        raise
                    db.execute("ROLLBACK TO grouped")
                    outcomes.append((None, self.error(exc)))
                db.execute("RELEASE grouped")
            db.execute("COMMIT")
        except Exception as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            outcomes = [(None, self.error(exc))] * len(ops)  # nothing of them is stored
        for (_, then), (result, exc) in zip(ops, outcomes):
            try:
                then(result, exc)
            except Exception:
                log.exception("acting on a grouped write failed")

    def error(self, exc: Exception) -> Exception:
        """The platform's error for SQLite's failure of the disk beneath (see ``storage_errors``), else ``exc``."""
        return storage_error(exc, self.path) or exc

    @contextmanager
    def tx(self):
        """One write transaction (taken at once, so it never fails half-way on a lock); the writes waiting
        for the turn's end (``soon``) are committed first, so writes keep their order."""
        if self.pending:
            self.flush()
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


def storage_error(exc: BaseException, path: str) -> StorageError | None:
    """StorageFull for a full disk, StorageError for an I/O error; None for anything else."""
    if not isinstance(exc, sqlite3.OperationalError):
        return None
    code = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
    if code == SQLITE_FULL:
        return StorageFull(f"the disk holding the platform's state ({path}) is full: nothing new can be "
                           "stored until space is freed (what was stored is intact)", component="state")
    if code == SQLITE_IOERR:
        return StorageError(f"the platform's state file {path} could not be written ({exc})", component="state")
    return None


def _translating(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.OperationalError as exc:
            error = storage_error(exc, self.path)
            if error is not None:
                raise error from None
            raise
    return call
