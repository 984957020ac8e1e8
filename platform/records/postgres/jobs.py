"""Jobs and their versions in PostgreSQL (resources and artifacts stored as JSON text)."""

from __future__ import annotations

import json

from psycopg import errors as pg_errors

from opbox.errors import Conflict

from ...ids import new_id
from ..base import Dropped, JobRecord, NewVersion, VersionRecord
from .connection import Database, storage_errors
from .leadership import GATEWAYS
from .runs import deleting, drop_sql

JOB_COLUMNS = "id, workspace, name, kind, created_at, latest_version"
JOB = f"SELECT {JOB_COLUMNS} FROM jobs"
VERSION = ("SELECT job_id, version, status, entry, code_key, code_sha256, requirements_sha256, python, cloudpickle, "
           "resource, artifact, error, created_at, ready_at, signature FROM versions")
# the job (made when missing; the upsert locks its row) and, when its kind matches, its next version
ADD_VERSION = f"""
WITH j AS (INSERT INTO jobs(id, workspace, name, kind, created_at) VALUES (%(id)s, %(ws)s, %(name)s, %(kind)s, %(at)s)
           ON CONFLICT (workspace, name) DO UPDATE SET name = excluded.name RETURNING {JOB_COLUMNS}),
n AS (SELECT COALESCE(MAX(v.version), 0) + 1 AS number FROM versions v, j WHERE v.job_id = j.id),
v AS (INSERT INTO versions(job_id, version, status, entry, code_key, code_sha256, requirements_sha256, python,
                           cloudpickle, resource, created_at, signature)
      SELECT j.id, n.number, 'building', %(entry)s, %(code_key)s, %(code_sha256)s, '', %(python)s, %(cloudpickle)s,
             %(resource)s, %(at)s, %(signature)s FROM j, n WHERE j.kind = %(kind)s RETURNING version)
SELECT j.*, (SELECT version FROM v) FROM j"""
VERSION_READY = """
WITH v AS (UPDATE versions SET status = 'ready', artifact = %(artifact)s, ready_at = %(at)s, build_log = %(log)s,
             requirements_sha256 = %(req)s WHERE job_id = %(job)s AND version = %(version)s)
UPDATE jobs SET latest_version = %(version)s WHERE id = %(job)s"""


def _version(row: tuple) -> VersionRecord:
    return VersionRecord(*row[:9], json.loads(row[9]), json.loads(row[10]) if row[10] else None, *row[11:14],
                         json.loads(row[14]) if row[14] else None)


@storage_errors
class PostgresJobs:
    def __init__(self, database: Database):
        self.db = database
        self.where = database.where

    def _job(self, sql: str, params: tuple) -> JobRecord | None:
        row = self.db.one(sql, params)
        return JobRecord(*row) if row is not None else None

    def get(self, workspace: str, ref: str) -> JobRecord | None:
        row = self.db.one(f"{JOB} WHERE workspace = %s AND (id = %s OR name = %s) ORDER BY (id = %s) DESC LIMIT 1",
                          (workspace, ref, ref, ref))
        return JobRecord(*row) if row is not None else None

    def by_id(self, job_id: str) -> JobRecord | None:
        return self._job(f"{JOB} WHERE id = %s", (job_id,))

    def in_workspace(self, workspace: str) -> list[JobRecord]:
        return [JobRecord(*r) for r in self.db.all(f"{JOB} WHERE workspace = %s ORDER BY created_at DESC", (workspace,))]

    def delete(self, job_id: str) -> Dropped:
        victims = "SELECT id, workspace, log_bytes FROM runs WHERE job_id = %(job)s FOR UPDATE"
        then = "".join(f",\nd{n} AS (DELETE FROM {table} WHERE {column} = %(job)s)" for n, (table, column) in enumerate(
            (("run_hours", "job_id"), ("batches", "job_id"), ("versions", "job_id"), ("schedules", "job_id"),
             ("jobs", "id"))))
        then += (",\nda AS (DELETE FROM attempts a USING victims v WHERE a.run_id = v.id),\n"
                 "dr AS (DELETE FROM runs USING victims v WHERE runs.id = v.id)")
        return deleting(self.db, drop_sql(victims, then), {"job": job_id})

    def add_version(self, workspace: str, name: str, kind: str, version: NewVersion) -> tuple[JobRecord, int]:
        params = {"id": new_id("j"), "ws": workspace, "name": name, "kind": kind, "at": version.created_at,
                  "entry": version.entry, "code_key": version.code_key, "code_sha256": version.code_sha256,
                  "python": version.python, "cloudpickle": version.cloudpickle,
                  "resource": json.dumps(version.resource),
                  "signature": json.dumps(version.signature) if version.signature else None}
        for attempt in range(5):
            try:
                row = self.db.one(ADD_VERSION, params)
                break
            except pg_errors.UniqueViolation:  # another gateway added a version of this job at the same moment
                if attempt == 4:
                    raise
        job, number = JobRecord(*row[:6]), row[6]
        if number is None:
            raise Conflict(f"job {name!r} is a {job.kind}; it cannot become a {kind}")
        return job, number

    def version(self, job_id: str, version: int) -> VersionRecord | None:
        row = self.db.one(f"{VERSION} WHERE job_id = %s AND version = %s", (job_id, version))
        return _version(row) if row is not None else None

    def code_in_use(self, code_key: str) -> bool:
        return self.db.one("SELECT 1 FROM versions WHERE code_key = %s LIMIT 1", (code_key,)) is not None

    def in_use(self) -> tuple[set[str], list[dict]]:
        keys, artifacts = set(), []
        for key, status, artifact in self.db.all("SELECT code_key, status, artifact FROM versions"):
            keys.add(key)
            if status != "failed" and artifact:
                artifacts.append(json.loads(artifact))
        return keys, artifacts

    def versions(self, job_id: str) -> list[VersionRecord]:
        return [_version(r) for r in self.db.all(f"{VERSION} WHERE job_id = %s ORDER BY version DESC", (job_id,))]

    def build_log(self, job_id: str, version: int) -> str | None:
        row = self.db.one("SELECT build_log FROM versions WHERE job_id = %s AND version = %s", (job_id, version))
        return row[0] if row is not None else None

    def version_failed(self, job_id: str, version: int, error: str, build_log: str) -> None:
        self.db.run("UPDATE versions SET status = 'failed', error = %s, build_log = %s WHERE job_id = %s AND version = %s",
                    (error, build_log, job_id, version))

    def fail_unfinished_builds(self, error: str) -> int:
        """Only when no other gateway is alive (holds its liveness lock): their builds are not unfinished.
        pg_locks lists the whole server's locks: only this database's gateways count."""
        return self.db.run(
            "UPDATE versions SET status = 'failed', error = %s WHERE status = 'building' AND (SELECT count(*) FROM "
            "pg_locks WHERE locktype = 'advisory' AND classid = %s::int4::oid AND objsubid = 2 AND granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())) <= 1",
            (error, GATEWAYS))

    def version_ready(self, job_id: str, version: int, artifact: dict, requirements_sha256: str, build_log: str,
                      at: float) -> None:
        self.db.run(VERSION_READY, {"artifact": json.dumps(artifact), "at": at, "log": build_log,
                                    "req": requirements_sha256, "job": job_id, "version": version})
