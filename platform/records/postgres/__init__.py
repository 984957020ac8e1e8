"""The PostgreSQL adapter of the records port, for several gateways on one database
(``OPBOX_DATABASE_URL=postgresql://...``).

``open_postgres`` connects (and migrates) and gathers one object per aggregate; ``core`` is the only
module that calls it. Every method is one statement on a pooled connection (see ``connection``).
Beyond the port it offers what several gateways need: ``leadership`` (an advisory lock held on a
connection of its own: one gateway fires schedules and runs retention) and ``wakeups``
(LISTEN/NOTIFY: a run that ends on one gateway wakes the long-polls and streams of the others).
"""

from __future__ import annotations

from typing import Callable

from .batches import PostgresBatches
from .connection import Database
from .items import PostgresItems
from .jobs import PostgresJobs
from .leadership import Lead
from .runs import PostgresRuns
from .schedules import PostgresSchedules, PostgresSecrets
from .services import PostgresServices
from .tokens import PostgresTokens
from .uploads import PostgresUploads
from .usage import PostgresUsage
from .wakeups import Wakeups


class PostgresRecords:
    """The ``Records`` protocol over one PostgreSQL database."""

    def __init__(self, database: Database):
        self.database = database
        self.leadership = Lead(database.url)
        self.runs = PostgresRuns(database, self.leadership.gateway)
        self.batches = PostgresBatches(database, self.leadership.gateway)
        self.jobs = PostgresJobs(database)
        self.tokens = PostgresTokens(database)
        self.services = PostgresServices(database)
        self.usage = PostgresUsage(database)
        self.schedules = PostgresSchedules(database, self.leadership.gateway)
        self.secrets = PostgresSecrets(database)
        self.items = PostgresItems(database)
        self.uploads = PostgresUploads(database)
        self._wakeups: Wakeups | None = None

    def wakeups(self, deliver: Callable[[str], None]) -> Callable[[str], None]:
        if self._wakeups is None:
            self._wakeups = Wakeups(self.database.url, self.leadership.gateway, deliver)
        return self._wakeups.publish

    def close(self) -> None:
        if self._wakeups is not None:
            self._wakeups.close()
        self.leadership.close()
        self.database.close()


def open_postgres(url: str) -> PostgresRecords:
    """The database at ``url``, migrated to this opbox's schema. Raises ConfigError when it cannot be reached,
    is not an opbox database or was written by a newer opbox."""
    return PostgresRecords(Database(url))
