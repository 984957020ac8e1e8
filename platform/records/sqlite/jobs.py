"""Jobs and their versions in SQLite (resources and artifacts stored as JSON text)."""

from __future__ import annotations

import functools
import json

from opbox.errors import Conflict

from ...ids import new_id
from ..base import Dropped, JobRecord, NewVersion, VersionRecord
from .connection import Database, storage_errors
from .runs import drop_run_data

FOUND_MAX = 10_000  # jobs looked up kept in memory (emptied past it)
JOB = "SELECT id, workspace, name, kind, created_at, latest_version FROM jobs"
VERSION = ("SELECT job_id, version, status, entry, code_key, code_sha256, requirements_sha256, python, cloudpickle, "
           "resource, artifact, error, created_at, ready_at, signature FROM versions")


def _version(row: tuple) -> VersionRecord:
    return VersionRecord(*row[:9], json.loads(row[9]), json.loads(row[10]) if row[10] else None, *row[11:14],
                         json.loads(row[14]) if row[14] else None)


def _writes(method):
    """A method that writes jobs: the jobs kept in memory go, before it and after it."""
    @functools.wraps(method)
    def write(self, *args, **kwargs):
        self._found.clear()
        try:
            return method(self, *args, **kwargs)
        finally:
            self._found.clear()
    return write


@storage_errors
class SqliteJobs:
    def __init__(self, database: Database):
        self.db = database.db
        self.path = database.path
        self.tx = database.tx
        # (workspace, id or name) -> the job, for every call's lookup; this process is the file's only writer
        # and every write to jobs is a method here, which empties it after writing (``_writes``)
        self._found: dict[tuple[str, str], JobRecord] = {}

    def _job(self, sql: str, params: tuple) -> JobRecord | None:
        row = self.db.execute(sql, params).fetchone()
        return JobRecord(*row) if row is not None else None

    def get(self, workspace: str, ref: str) -> JobRecord | None:
        job = self._found.get((workspace, ref))
        if job is None:
            job = (self._job(f"{JOB} WHERE workspace = ? AND id = ?", (workspace, ref))
                   or self._job(f"{JOB} WHERE workspace = ? AND name = ?", (workspace, ref)))
            if job is not None:
                if len(self._found) >= FOUND_MAX:
                    self._found.clear()
                self._found[(workspace, ref)] = job
        return job

    def by_id(self, job_id: str) -> JobRecord | None:
        return self._job(f"{JOB} WHERE id = ?", (job_id,))

    def in_workspace(self, workspace: str) -> list[JobRecord]:
        return [JobRecord(*r) for r in self.db.execute(f"{JOB} WHERE workspace = ? ORDER BY created_at DESC",
                                                       (workspace,))]

    @_writes
    def delete(self, job_id: str) -> Dropped:
        ids = [(r[0],) for r in self.db.execute("SELECT id FROM runs WHERE job_id = ?", (job_id,))]
        with self.tx() as db:
            freed, keys = drop_run_data(db, ids)
            db.executemany("DELETE FROM attempts WHERE run_id = ?", ids)
            for table, column in (("runs", "job_id"), ("run_hours", "job_id"), ("batches", "job_id"),
                                  ("versions", "job_id"), ("schedules", "job_id"), ("jobs", "id")):
                db.execute(f"DELETE FROM {table} WHERE {column} = ?", (job_id,))
        return Dropped(len(ids), freed, keys)

    @_writes
    def add_version(self, workspace: str, name: str, kind: str, version: NewVersion) -> tuple[JobRecord, int]:
        with self.tx() as db:
            row = db.execute(f"{JOB} WHERE workspace = ? AND name = ?", (workspace, name)).fetchone()
            if row is None:
                job = JobRecord(new_id("j"), workspace, name, kind, version.created_at, None)
                db.execute("INSERT INTO jobs(id, workspace, name, kind, created_at) VALUES (?,?,?,?,?)",
                           (job.id, workspace, name, kind, job.created_at))
            else:
                job = JobRecord(*row)
                if job.kind != kind:
                    raise Conflict(f"job {name!r} is a {job.kind}; it cannot become a {kind}")
            number = db.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM versions WHERE job_id = ?",
                                (job.id,)).fetchone()[0]
            db.execute(
                "INSERT INTO versions(job_id, version, status, entry, code_key, code_sha256, requirements_sha256, "
                "python, cloudpickle, resource, created_at, signature) VALUES (?,?,'building',?,?,?,'',?,?,?,?,?)",
                (job.id, number, version.entry, version.code_key, version.code_sha256, version.python,
                 version.cloudpickle, json.dumps(version.resource), version.created_at,
                 json.dumps(version.signature) if version.signature else None))
        return job, number

    def version(self, job_id: str, version: int) -> VersionRecord | None:
        row = self.db.execute(f"{VERSION} WHERE job_id = ? AND version = ?", (job_id, version)).fetchone()
        return _version(row) if row is not None else None

    def code_in_use(self, code_key: str) -> bool:
        return self.db.execute("SELECT 1 FROM versions WHERE code_key = ? LIMIT 1", (code_key,)).fetchone() is not None

    def in_use(self) -> tuple[set[str], list[dict]]:
        keys, artifacts = set(), []
        for key, status, artifact in self.db.execute("SELECT code_key, status, artifact FROM versions"):
            keys.add(key)
            if status != "failed" and artifact:
                artifacts.append(json.loads(artifact))
        return keys, artifacts

    def versions(self, job_id: str) -> list[VersionRecord]:
        return [_version(r) for r in self.db.execute(f"{VERSION} WHERE job_id = ? ORDER BY version DESC", (job_id,))]

    def build_log(self, job_id: str, version: int) -> str | None:
        row = self.db.execute("SELECT build_log FROM versions WHERE job_id = ? AND version = ?",
                              (job_id, version)).fetchone()
        return row[0] if row is not None else None

    def version_failed(self, job_id: str, version: int, error: str, build_log: str) -> None:
        self.db.execute(
            "UPDATE versions SET status = 'failed', error = ?, build_log = ? WHERE job_id = ? AND version = ?",
            (error, build_log, job_id, version))

    def fail_unfinished_builds(self, error: str) -> int:
        return self.db.execute("UPDATE versions SET status = 'failed', error = ? WHERE status = 'building'",
                               (error,)).rowcount

    @_writes
    def version_ready(self, job_id: str, version: int, artifact: dict, requirements_sha256: str, build_log: str,
                      at: float) -> None:
        with self.tx() as db:
            db.execute("UPDATE versions SET status = 'ready', artifact = ?, ready_at = ?, build_log = ?, "
                       "requirements_sha256 = ? WHERE job_id = ? AND version = ?",
                       (json.dumps(artifact), at, build_log, requirements_sha256, job_id, version))
            db.execute("UPDATE jobs SET latest_version = ? WHERE id = ?", (version, job_id))
