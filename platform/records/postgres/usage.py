"""Bytes stored per workspace, in PostgreSQL: the run aggregates keep it in step in their own
statements; code archives are added here when a deploy first refers to one."""

from __future__ import annotations

from .connection import Database, storage_errors
from .runs import ADD_USAGE


@storage_errors
class PostgresUsage:
    def __init__(self, database: Database):
        self.db = database
        self.where = database.where

    def of(self, workspace: str) -> int:
        row = self.db.one("SELECT bytes FROM usage WHERE workspace = %s", (workspace,))
        return row[0] if row else 0

    def add(self, workspace: str, delta: int) -> None:
        self.db.run(f"INSERT INTO usage(workspace, bytes) VALUES (%s, %s) {ADD_USAGE}", (workspace, delta))
