"""Bytes stored per workspace, in SQLite: the run aggregates keep it in step in their own
transactions; code archives are added here when a deploy first refers to one."""

from __future__ import annotations

from .connection import Database, storage_errors
from .runs import ADD_USAGE


@storage_errors
class SqliteUsage:
    def __init__(self, database: Database):
        self.db = database.db
        self.path = database.path

    def of(self, workspace: str) -> int:
        row = self.db.execute("SELECT bytes FROM usage WHERE workspace = ?", (workspace,)).fetchone()
        return row[0] if row else 0

    def add(self, workspace: str, delta: int) -> None:
        self.db.execute(ADD_USAGE, (workspace, delta))
