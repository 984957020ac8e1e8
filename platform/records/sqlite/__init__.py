"""The SQLite adapter of the records port: one state file, ``OPBOX_HOME/state.db``.

``open_sqlite`` opens (and migrates) it and gathers one object per aggregate; ``core`` is the
only module that calls it. The connection, its checkpointer thread and the migrations stay in
here: nothing above the port knows it is SQLite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .batches import SqliteBatches
from .connection import Database
from .items import SqliteItems
from .jobs import SqliteJobs
from .runs import SqliteRuns
from .schedules import SqliteSchedules, SqliteSecrets
from .services import SqliteServices
from .tokens import SqliteTokens
from .uploads import SqliteUploads
from .usage import SqliteUsage


class AlwaysLeader:
    """One gateway per state file: it always leads."""

    shared = False

    def start(self) -> None:
        pass

    def held(self) -> bool:
        return True


class SqliteRecords:
    """The ``Records`` protocol over one SQLite file."""

    def __init__(self, database: Database):
        self.database = database
        self.runs = SqliteRuns(database)
        self.batches = SqliteBatches(database)
        self.jobs = SqliteJobs(database)
        self.tokens = SqliteTokens(database)
        self.services = SqliteServices(database)
        self.usage = SqliteUsage(database)
        self.schedules = SqliteSchedules(database)
        self.secrets = SqliteSecrets(database)
        self.items = SqliteItems(database)
        self.uploads = SqliteUploads(database)
        self.leadership = AlwaysLeader()

    def wakeups(self, deliver: Callable[[str], None]) -> None:
        return None  # no other gateway shares the file

    def close(self) -> None:
        self.database.close()


def open_sqlite(path: Path | str) -> SqliteRecords:
    """The state file at ``path``, made or migrated to this opbox's schema. Raises ConfigError when
    it is not an opbox state file or was written by a newer opbox."""
    return SqliteRecords(Database(path))
