"""Served classes' records in SQLite (their replicas are the backend's business)."""

from __future__ import annotations

from ..base import ServiceRecord
from .connection import Database, storage_errors

COLUMNS = ("workspace, name, job_id, version, kind, replicas, concurrency, queue, scale_to_zero, init, created_at, "
           "updated_at")
SELECT = f"SELECT {COLUMNS} FROM services"


def _service(row: tuple) -> ServiceRecord:
    return ServiceRecord(*row[:9], bytes(row[9]), row[10], row[11])


@storage_errors
class SqliteServices:
    def __init__(self, database: Database):
        self.db = database.db
        self.path = database.path

    def get(self, workspace: str, name: str) -> ServiceRecord | None:
        row = self.db.execute(f"{SELECT} WHERE workspace = ? AND name = ?", (workspace, name)).fetchone()
        return _service(row) if row is not None else None

    def all(self) -> list[ServiceRecord]:
        return [_service(r) for r in self.db.execute(SELECT)]

    def in_workspace(self, workspace: str) -> list[ServiceRecord]:
        return [_service(r) for r in self.db.execute(f"{SELECT} WHERE workspace = ? ORDER BY name", (workspace,))]

    def put(self, service: ServiceRecord) -> None:
        s = service
        self.db.execute(f"INSERT OR REPLACE INTO services({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                        (s.workspace, s.name, s.job_id, s.version, s.kind, s.replicas, s.concurrency, s.queue,
                         s.scale_to_zero, s.init, s.created_at, s.updated_at))

    def delete(self, workspace: str, name: str) -> None:
        self.db.execute("DELETE FROM services WHERE workspace = ? AND name = ?", (workspace, name))
