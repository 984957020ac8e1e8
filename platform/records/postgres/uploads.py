"""Payloads uploaded straight to the object store, waiting to be attached to a run (``uploads``), in PostgreSQL."""

from __future__ import annotations

from .connection import Database, storage_errors


@storage_errors
class PostgresUploads:
    def __init__(self, database: Database):
        self.db = database
        self.where = database.where

    def add(self, key: str, workspace: str, at: float) -> None:
        self.db.run("INSERT INTO uploads(object_key, workspace, created_at) VALUES (%s,%s,%s)", (key, workspace, at))

    def claim(self, key: str, workspace: str) -> bool:
        return self.db.run("DELETE FROM uploads WHERE object_key = %s AND workspace = %s", (key, workspace)) == 1

    def expire(self, before: float, limit: int) -> list[str]:
        # rows another gateway's retention (or a claim) holds are skipped: each upload is forgotten once
        return [r[0] for r in self.db.all(
            "DELETE FROM uploads WHERE object_key IN (SELECT object_key FROM uploads WHERE created_at < %s LIMIT %s "
            "FOR UPDATE SKIP LOCKED) RETURNING object_key", (before, limit))]
