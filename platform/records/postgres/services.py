"""Served classes' records in PostgreSQL (their replicas are the backend's business)."""

from __future__ import annotations

from ..base import ServiceRecord
from .connection import Database, storage_errors

FIELDS = ("workspace", "name", "job_id", "version", "kind", "replicas", "concurrency", "queue", "scale_to_zero", "init",
          "created_at", "updated_at")
COLUMNS = ", ".join(FIELDS)
SELECT = f"SELECT {COLUMNS} FROM services"
PUT = (f"INSERT INTO services({COLUMNS}) VALUES ({', '.join(['%s'] * len(FIELDS))}) ON CONFLICT (workspace, name) "
       "DO UPDATE SET " + ", ".join(f"{f} = excluded.{f}" for f in FIELDS[2:]))


def _service(row: tuple) -> ServiceRecord:
    return ServiceRecord(*row[:9], bytes(row[9]), row[10], row[11])


@storage_errors
class PostgresServices:
    def __init__(self, database: Database):
        self.db = database
        self.where = database.where

    def get(self, workspace: str, name: str) -> ServiceRecord | None:
        row = self.db.one(f"{SELECT} WHERE workspace = %s AND name = %s", (workspace, name))
        return _service(row) if row is not None else None

    def all(self) -> list[ServiceRecord]:
        return [_service(r) for r in self.db.all(SELECT)]

    def in_workspace(self, workspace: str) -> list[ServiceRecord]:
        return [_service(r) for r in self.db.all(f"{SELECT} WHERE workspace = %s ORDER BY name", (workspace,))]

    def put(self, service: ServiceRecord) -> None:
        self.db.run(PUT, tuple(getattr(service, f) for f in FIELDS))

    def delete(self, workspace: str, name: str) -> None:
        self.db.run("DELETE FROM services WHERE workspace = %s AND name = %s", (workspace, name))
