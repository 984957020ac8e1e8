"""Schedules and workspace secrets in SQLite."""

from __future__ import annotations

import json

from ..base import NewRun, Payload, ScheduleRecord, SecretRecord, payload_size
from .connection import Database, storage_errors
from .runs import ADD_USAGE, INSERT, INSERT_PAYLOAD, payload_row

COLUMNS = ("id, workspace, job_id, spec, anchor, next_fire_at, paused, pending, last_fire_at, last_run_id, "
           "last_error, created_at, updated_at")
SELECT = f"SELECT {COLUMNS} FROM schedules"


def _schedule(row: tuple) -> ScheduleRecord:
    return ScheduleRecord(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5], bool(row[6]), bool(row[7]),
                          *row[8:])


@storage_errors
class SqliteSchedules:
    def __init__(self, database: Database):
        self.db = database.db
        self.tx = database.tx
        self.path = database.path

    def put(self, schedule: ScheduleRecord) -> ScheduleRecord:
        s = schedule
        with self.tx() as db:
            old = db.execute("SELECT id, created_at FROM schedules WHERE workspace = ? AND job_id = ?",
                             (s.workspace, s.job_id)).fetchone()
            schedule_id, created_at = old or (s.id, s.created_at)
            db.execute("DELETE FROM schedules WHERE workspace = ? AND job_id = ?", (s.workspace, s.job_id))
            db.execute(f"INSERT INTO schedules({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                       (schedule_id, s.workspace, s.job_id, json.dumps(s.spec), s.anchor, s.next_fire_at,
                        int(s.paused), int(s.pending), s.last_fire_at, s.last_run_id, s.last_error, created_at,
                        s.updated_at))
        return self.get(s.workspace, s.job_id)

    def get(self, workspace: str, job_id: str) -> ScheduleRecord | None:
        row = self.db.execute(f"{SELECT} WHERE workspace = ? AND job_id = ?", (workspace, job_id)).fetchone()
        return _schedule(row) if row else None

    def in_workspace(self, workspace: str) -> list[ScheduleRecord]:
        return [_schedule(r) for r in self.db.execute(f"{SELECT} WHERE workspace = ? ORDER BY created_at",
                                                      (workspace,))]

    def active(self) -> list[ScheduleRecord]:
        return [_schedule(r) for r in self.db.execute(f"{SELECT} WHERE paused = 0 ORDER BY next_fire_at")]

    def fired(self, seen: ScheduleRecord, next_fire_at: float, pending: bool, last_fire_at: float | None,
              last_run_id: str | None, last_error: str | None, run: tuple[NewRun, Payload] | None = None) -> bool:
        with self.tx() as db:
            if not db.execute("UPDATE schedules SET next_fire_at = ?, pending = ?, last_fire_at = COALESCE(?, "
                              "last_fire_at), last_run_id = COALESCE(?, last_run_id), last_error = ? "
                              "WHERE id = ? AND next_fire_at = ? AND pending = ?",
                              (next_fire_at, int(pending), last_fire_at, last_run_id, last_error, seen.id,
                               seen.next_fire_at, int(seen.pending))).rowcount:
                return False
            if run is not None:
                new, args = run
                db.execute(INSERT, new)
                db.execute(INSERT_PAYLOAD, payload_row(new.id, "args", args))
                db.execute(ADD_USAGE, (new.workspace, payload_size(args)))
        return True

    def set_paused(self, schedule_id: str, paused: bool, next_fire_at: float, at: float) -> None:
        self.db.execute("UPDATE schedules SET paused = ?, pending = 0, next_fire_at = ?, updated_at = ? WHERE id = ?",
                        (int(paused), next_fire_at, at, schedule_id))

    def delete(self, workspace: str, job_id: str) -> bool:
        return self.db.execute("DELETE FROM schedules WHERE workspace = ? AND job_id = ?",
                               (workspace, job_id)).rowcount > 0


@storage_errors
class SqliteSecrets:
    def __init__(self, database: Database):
        self.db = database.db
        self.path = database.path

    def put(self, secret: SecretRecord) -> None:
        s = secret
        self.db.execute("INSERT INTO secrets(workspace, name, keys, data, created_at, updated_at) VALUES (?,?,?,?,?,?) "
                        "ON CONFLICT(workspace, name) DO UPDATE SET keys = excluded.keys, data = excluded.data, "
                        "updated_at = excluded.updated_at",
                        (s.workspace, s.name, json.dumps(list(s.keys)), s.data, s.created_at, s.updated_at))

    def get(self, workspace: str, name: str) -> SecretRecord | None:
        row = self.db.execute("SELECT workspace, name, keys, data, created_at, updated_at FROM secrets "
                              "WHERE workspace = ? AND name = ?", (workspace, name)).fetchone()
        return _secret(row) if row else None

    def in_workspace(self, workspace: str) -> list[SecretRecord]:
        return [_secret(r) for r in self.db.execute(
            "SELECT workspace, name, keys, data, created_at, updated_at FROM secrets WHERE workspace = ? "
            "ORDER BY name", (workspace,))]

    def all(self) -> list[SecretRecord]:
        return [_secret(r) for r in self.db.execute(
            "SELECT workspace, name, keys, data, created_at, updated_at FROM secrets ORDER BY workspace, name")]

    def delete(self, workspace: str, name: str) -> bool:
        return self.db.execute("DELETE FROM secrets WHERE workspace = ? AND name = ?", (workspace, name)).rowcount > 0


def _secret(row: tuple) -> SecretRecord:
    return SecretRecord(row[0], row[1], tuple(json.loads(row[2])), bytes(row[3]), row[4], row[5])
