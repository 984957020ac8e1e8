"""The PostgreSQL adapter of the records port, for several gateways on one database
(``OPBOX_DATABASE_URL=postgresql://...``).

``open_postgres`` connects (and migrates) and gathers one object per aggregate; ``core`` is the only
module that calls it. Every method is one statement on a pooled connection (see ``connection``).
Beyond the port it offers what several gateways need: ``leadership`` (an advisory lock held on a
connection of its own: one gateway fires schedules and runs retention) and ``wakeups``
(LISTEN/NOTIFY: a run that ends on one gateway wakes the long-polls and streams of the others).
"""

from __future__ import annotations

from .batches import PostgresBatches
from .connection import Database
from .items import PostgresItems
from .jobs import PostgresJobs
from .runs import PostgresRuns
from .schedules import PostgresSchedules, PostgresSecrets
from .services import PostgresServices
from .tokens import PostgresTokens
from .usage import PostgresUsage


class PostgresRecords:
    """The ``Records`` protocol over one PostgreSQL database."""

    def __init__(self, database: Database):
        self.database = database
        self.runs = PostgresRuns(database)
        self.batches = PostgresBatches(database)
        self.jobs = PostgresJobs(database)
        self.tokens = PostgresTokens(database)
        self.services = PostgresServices(database)
        self.usage = PostgresUsage(database)
        self.schedules = PostgresSchedules(database)
        self.secrets = PostgresSecrets(database)
        self.items = PostgresItems(database)

    def close(self) -> None:
        self.database.close()


def open_postgres(url: str) -> PostgresRecords:
    """The database at ``url``, migrated to this opbox's schema. Raises ConfigError when it cannot be reached,
    is not an opbox database or was written by a newer opbox."""
    return PostgresRecords(Database(url))
