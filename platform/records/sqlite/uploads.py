"""Payloads uploaded straight to the object store, waiting to be attached to a run (``uploads``)."""

from __future__ import annotations

from .connection import Database, storage_errors


@storage_errors
class SqliteUploads:
    def __init__(self, database: Database):
        self.db = database.db
        self.tx = database.tx
        self.path = database.path

    def add(self, key: str, workspace: str, at: float) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO uploads(object_key, workspace, created_at) VALUES (?,?,?)", (key, workspace, at))

    def claim(self, key: str, workspace: str) -> bool:
        with self.tx() as db:
            return db.execute("DELETE FROM uploads WHERE object_key = ? AND workspace = ?",
                              (key, workspace)).rowcount == 1

    def expire(self, before: float, limit: int) -> list[str]:
        keys = [r[0] for r in self.db.execute("SELECT object_key FROM uploads WHERE created_at < ? LIMIT ?",
                                              (before, limit))]
        if keys:
            with self.tx() as db:
                db.executemany("DELETE FROM uploads WHERE object_key = ?", [(k,) for k in keys])
        return keys
