"""The PostgreSQL connection pool: opening (checks and migrations), one round trip per call, errors.

The records protocol is synchronous and is called on the gateway's event loop, so every call here
blocks the loop for one round trip to the server: each method is one statement (data-modifying CTEs
where SQLite runs several in a transaction), sent on a pooled connection in autocommit mode.
Statements used often are prepared by psycopg after a few runs. Keep the server close (a Unix
socket, or the same zone): its round trip is the floor of every call's latency.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool, PoolTimeout

from opbox.errors import ConfigError, StorageError, StorageFull

from .migrations import MIGRATIONS, migrate

log = logging.getLogger("opbox.records")

POOL_MIN, POOL_MAX = 1, 8  # the event loop uses one at a time; threads (retention, the CLI) a few more
POOL_TIMEOUT = 3.0  # seconds a call waits for a connection (the server unreachable) before StorageError
# a dead server or node ends a connection in about 10 s, not the kernel's two hours
KEEPALIVE = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3}


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


class Database:
    """A pool of connections to a migrated opbox database. Raises ConfigError when the server cannot be
    reached, or the database is not an opbox one, or is too new."""

    def __init__(self, url: str, migrations: tuple[str, ...] = MIGRATIONS, max_size: int = POOL_MAX):
        self.url = url
        self.where = redact(url)
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
                self.version = migrate(conn, self.where, migrations)
        except psycopg.OperationalError as exc:
            raise ConfigError(f"cannot reach the database {self.where} ({str(exc).strip()})") from None
        self.pool = ConnectionPool(url, min_size=POOL_MIN, max_size=max_size, timeout=POOL_TIMEOUT, open=True,
                                   kwargs={"autocommit": True, "connect_timeout": 10, **KEEPALIVE}, name="opbox-records")

        # the thread that opened the records (the gateway's event loop) keeps one connection of the pool for
        # itself: taking one from the pool and giving it back costs more than the round trip it is used for
        self._owner = threading.get_ident()
        self._pinned: psycopg.Connection | None = None

    def close(self) -> None:
        if self._pinned is not None:
            self.pool.putconn(self._pinned)
            self._pinned = None
        self.pool.close()

    @contextmanager
    def conn(self) -> Iterator[psycopg.Connection]:
        if threading.get_ident() != self._owner:
            with self.pool.connection() as conn:
                yield conn
            return
        if self._pinned is None:
            self._pinned = self.pool.getconn()
        conn = self._pinned
        try:
            yield conn
        finally:
            if conn.closed or conn.broken:  # the server went away: the pool makes a new one next time
                self._pinned = None
                self.pool.putconn(conn)

    # one statement, one round trip -----------------------------------------------------------
    def one(self, sql: str, params: Any = None) -> tuple | None:
        with self.conn() as conn:
            try:
                return conn.execute(sql, params).fetchone()
            except pg_errors.DataError as exc:
                return _without_nul_again(conn, sql, params, exc).fetchone()

    def all(self, sql: str, params: Any = None) -> list[tuple]:
        with self.conn() as conn:
            try:
                return conn.execute(sql, params).fetchall()
            except pg_errors.DataError as exc:
                return _without_nul_again(conn, sql, params, exc).fetchall()

    def run(self, sql: str, params: Any = None) -> int:
        """Rows changed."""
        with self.conn() as conn:
            try:
                return conn.execute(sql, params).rowcount
            except pg_errors.DataError as exc:
                return _without_nul_again(conn, sql, params, exc).rowcount


def _without_nul_again(conn: psycopg.Connection, sql: str, params: Any, exc: Exception) -> psycopg.Cursor:
    """PostgreSQL's text cannot hold NUL, which a user's exception message, a build's output or a query string
    may: U+FFFD stands in for it, written or looked up. psycopg refuses it before sending, so the statement is
    sent again (nothing is checked on the way when there is none)."""
    if "NUL" not in str(exc):
        raise exc
    return conn.execute(sql, _without_nul(params))


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {k: _without_nul(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_without_nul(v) for v in value)
    return value


DISK_FULL = "53100"


def storage_errors(cls):
    """Class decorator for an aggregate (which has ``where``): the server's failures become the platform's
    errors: a full disk StorageFull (507, nothing written), an unreachable server or a lost connection
    StorageError (502). Everything else (a bug) stays as it is."""
    for name, method in list(vars(cls).items()):
        if callable(method) and not name.startswith("_"):
            setattr(cls, name, _translating(method))
    return cls


def _translating(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except pg_errors.DiskFull:
            raise StorageFull(f"the disk holding the platform's database ({self.where}) is full: nothing new can be "
                              "stored until space is freed (what was stored is intact)", component="state") from None
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise StorageError(f"the platform's database {self.where} could not be reached ({str(exc).strip()})",
                               component="state") from None
    return call
