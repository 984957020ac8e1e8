"""Schedules and workspace secrets in PostgreSQL."""

from __future__ import annotations

import json

from ..base import NewRun, Payload, ScheduleRecord, SecretRecord, payload_size
from .connection import Database, storage_errors
from .runs import CREATE, payload_row

FIELDS = ("id", "workspace", "job_id", "spec", "anchor", "next_fire_at", "paused", "pending", "last_fire_at",
          "last_run_id", "last_error", "created_at", "updated_at")
COLUMNS = ", ".join(FIELDS)
SELECT = f"SELECT {COLUMNS} FROM schedules"
# one per job: a replaced schedule keeps its id and created_at
PUT = (f"INSERT INTO schedules({COLUMNS}) VALUES ({', '.join(['%s'] * len(FIELDS))}) "
       "ON CONFLICT (workspace, job_id) DO UPDATE SET "
       + ", ".join(f"{f} = excluded.{f}" for f in FIELDS if f not in ("id", "workspace", "job_id", "created_at"))
       + f" RETURNING {COLUMNS}")
SECRET = "SELECT workspace, name, keys, data, created_at, updated_at FROM secrets"


def _schedule(row: tuple) -> ScheduleRecord:
    return ScheduleRecord(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5], bool(row[6]), bool(row[7]),
                          *row[8:])


@storage_errors
class PostgresSchedules:
    def __init__(self, database: Database, gateway: str):
        self.db = database
        self.where = database.where
        self.owner = f"{gateway}/"  # the gateway whose queue holds the runs it fires (see runs.INSERT_RUN)

    def put(self, schedule: ScheduleRecord) -> ScheduleRecord:
        s = schedule
        return _schedule(self.db.one(PUT, (s.id, s.workspace, s.job_id, json.dumps(s.spec), s.anchor, s.next_fire_at,
                                           int(s.paused), int(s.pending), s.last_fire_at, s.last_run_id, s.last_error,
                                           s.created_at, s.updated_at)))

    def get(self, workspace: str, job_id: str) -> ScheduleRecord | None:
        row = self.db.one(f"{SELECT} WHERE workspace = %s AND job_id = %s", (workspace, job_id))
        return _schedule(row) if row else None

    def in_workspace(self, workspace: str) -> list[ScheduleRecord]:
        return [_schedule(r) for r in self.db.all(f"{SELECT} WHERE workspace = %s ORDER BY created_at", (workspace,))]

    def active(self) -> list[ScheduleRecord]:
        return [_schedule(r) for r in self.db.all(f"{SELECT} WHERE paused = 0 ORDER BY next_fire_at")]

    def fired(self, seen: ScheduleRecord, next_fire_at: float, pending: bool, last_fire_at: float | None,
              last_run_id: str | None, last_error: str | None, run: tuple[NewRun, Payload] | None = None) -> bool:
        with self.db.conn() as conn, conn.transaction():
            if not conn.execute("UPDATE schedules SET next_fire_at = %s, pending = %s, last_fire_at = COALESCE(%s, "
                                "last_fire_at), last_run_id = COALESCE(%s, last_run_id), last_error = %s "
                                "WHERE id = %s AND next_fire_at = %s AND pending = %s",
                                (next_fire_at, int(pending), last_fire_at, last_run_id, last_error, seen.id,
                                 seen.next_fire_at, int(seen.pending))).rowcount:
                return False
            if run is not None:
                new, args = run
                conn.execute(CREATE, (*new, self.owner, *payload_row(args), payload_size(args)))
        return True

    def set_paused(self, schedule_id: str, paused: bool, next_fire_at: float, at: float) -> None:
        self.db.run("UPDATE schedules SET paused = %s, pending = 0, next_fire_at = %s, updated_at = %s WHERE id = %s",
                    (int(paused), next_fire_at, at, schedule_id))

    def delete(self, workspace: str, job_id: str) -> bool:
        return self.db.run("DELETE FROM schedules WHERE workspace = %s AND job_id = %s", (workspace, job_id)) > 0


@storage_errors
class PostgresSecrets:
    def __init__(self, database: Database):
        self.db = database
        self.where = database.where

    def put(self, secret: SecretRecord) -> None:
        s = secret
        self.db.run("INSERT INTO secrets(workspace, name, keys, data, created_at, updated_at) VALUES (%s,%s,%s,%s,%s,%s) "
                    "ON CONFLICT (workspace, name) DO UPDATE SET keys = excluded.keys, data = excluded.data, "
                    "updated_at = excluded.updated_at",
                    (s.workspace, s.name, json.dumps(list(s.keys)), s.data, s.created_at, s.updated_at))

    def get(self, workspace: str, name: str) -> SecretRecord | None:
        row = self.db.one(f"{SECRET} WHERE workspace = %s AND name = %s", (workspace, name))
        return _secret(row) if row else None

    def in_workspace(self, workspace: str) -> list[SecretRecord]:
        return [_secret(r) for r in self.db.all(f"{SECRET} WHERE workspace = %s ORDER BY name", (workspace,))]

    def all(self) -> list[SecretRecord]:
        return [_secret(r) for r in self.db.all(f"{SECRET} ORDER BY workspace, name")]

    def delete(self, workspace: str, name: str) -> bool:
        return self.db.run("DELETE FROM secrets WHERE workspace = %s AND name = %s", (workspace, name)) > 0


def _secret(row: tuple) -> SecretRecord:
    return SecretRecord(row[0], row[1], tuple(json.loads(row[2])), bytes(row[3]), row[4], row[5])
