"""The platform's durable state in SQLite: workspaces, tokens, jobs, versions, runs, payloads, logs.

One connection, used from the gateway's event loop: each statement takes microseconds
(WAL journal, synchronous=NORMAL), which is cheaper than handing it to a thread. Every
change that must be atomic (a run and its arguments; a result and the run's end) is one
transaction.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS workspaces(
  name TEXT PRIMARY KEY, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tokens(
  id TEXT PRIMARY KEY, workspace TEXT NOT NULL, name TEXT NOT NULL, hash TEXT NOT NULL UNIQUE,
  role TEXT NOT NULL, created_at REAL NOT NULL, revoked_at REAL);
CREATE TABLE IF NOT EXISTS jobs(
  id TEXT PRIMARY KEY, workspace TEXT NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL,
  created_at REAL NOT NULL, latest_version INTEGER, UNIQUE(workspace, name));
CREATE TABLE IF NOT EXISTS versions(
  job_id TEXT NOT NULL, version INTEGER NOT NULL, status TEXT NOT NULL, entry TEXT NOT NULL,
  code_key TEXT NOT NULL, code_sha256 TEXT NOT NULL, requirements_sha256 TEXT NOT NULL,
  python TEXT NOT NULL, cloudpickle TEXT NOT NULL, resource TEXT NOT NULL, artifact TEXT,
  build_log TEXT NOT NULL DEFAULT '', error TEXT, created_at REAL NOT NULL, ready_at REAL,
  PRIMARY KEY(job_id, version));
CREATE TABLE IF NOT EXISTS runs(
  id TEXT PRIMARY KEY, workspace TEXT NOT NULL, job_id TEXT NOT NULL, version INTEGER NOT NULL,
  status TEXT NOT NULL, trigger TEXT NOT NULL, created_at REAL NOT NULL, started_at REAL,
  finished_at REAL, exit_reason TEXT, error_type TEXT, attempt INTEGER NOT NULL DEFAULT 0,
  max_retries INTEGER NOT NULL DEFAULT 0, timeout REAL, batch_id TEXT, batch_index INTEGER,
  done_seq INTEGER, worker TEXT, log_bytes INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS runs_by_job ON runs(job_id, id);
CREATE INDEX IF NOT EXISTS runs_by_batch ON runs(batch_id, done_seq) WHERE batch_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS runs_open ON runs(status) WHERE status IN ('queued', 'running');
CREATE TABLE IF NOT EXISTS payloads(
  run_id TEXT NOT NULL, kind TEXT NOT NULL, data BLOB NOT NULL,
  PRIMARY KEY(run_id, kind)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS logs(
  run_id TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL,
  PRIMARY KEY(run_id, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batches(
  id TEXT PRIMARY KEY, workspace TEXT NOT NULL, job_id TEXT NOT NULL, version INTEGER NOT NULL,
  concurrency INTEGER, total INTEGER, submitted INTEGER NOT NULL DEFAULT 0,
  done INTEGER NOT NULL DEFAULT 0, cancelled INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL);
"""

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "timed_out"})
RUN_COLUMNS = (
    "id", "workspace", "job_id", "version", "status", "trigger", "created_at", "started_at", "finished_at",
    "exit_reason", "error_type", "attempt", "max_retries", "timeout", "batch_id", "batch_index", "done_seq",
    "worker", "log_bytes",
)


class State:
    def __init__(self, path: Path | str):
        self.path = str(path)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON", "busy_timeout=5000",
                       "temp_store=MEMORY", "cache_size=-32000"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def tx(self):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def one(self, sql: str, *params) -> dict | None:
        row = self.db.execute(sql, params).fetchone()
        return dict(row) if row is not None else None

    def all(self, sql: str, *params) -> list[dict]:
        return [dict(r) for r in self.db.execute(sql, params)]

    # -- workspaces and tokens -------------------------------------------------------
    def ensure_workspace(self, name: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO workspaces(name, created_at) VALUES (?, ?)", (name, time.time()))

    def add_token(self, token_id: str, workspace: str, name: str, token_hash: str, role: str) -> None:
        self.db.execute(
            "INSERT INTO tokens(id, workspace, name, hash, role, created_at) VALUES (?,?,?,?,?,?)",
            (token_id, workspace, name, token_hash, role, time.time()),
        )

    def token_by_hash(self, token_hash: str) -> dict | None:
        return self.one("SELECT * FROM tokens WHERE hash = ? AND revoked_at IS NULL", token_hash)

    # -- jobs and versions -----------------------------------------------------------
    def job(self, workspace: str, ref: str) -> dict | None:
        """A job by id or, failing that, by name."""
        return self.one("SELECT * FROM jobs WHERE workspace = ? AND id = ?", workspace, ref) or self.one(
            "SELECT * FROM jobs WHERE workspace = ? AND name = ?", workspace, ref
        )

    def version(self, job_id: str, version: int) -> dict | None:
        row = self.one("SELECT * FROM versions WHERE job_id = ? AND version = ?", job_id, version)
        if row:
            row["resource"] = json.loads(row["resource"])
            row["artifact"] = json.loads(row["artifact"]) if row["artifact"] else None
        return row

    # -- runs ------------------------------------------------------------------------
    def run(self, run_id: str) -> dict | None:
        return self.one("SELECT * FROM runs WHERE id = ?", run_id)

    def payload(self, run_id: str, kind: str) -> bytes | None:
        row = self.db.execute("SELECT data FROM payloads WHERE run_id = ? AND kind = ?", (run_id, kind)).fetchone()
        return row[0] if row else None

    def insert_runs(self, rows: list[tuple], payloads: list[tuple]) -> None:
        """Runs (in RUN_COLUMNS order, first 16 columns) and their argument payloads, atomically."""
        with self.tx() as db:
            db.executemany(
                "INSERT OR IGNORE INTO runs(id, workspace, job_id, version, status, trigger, created_at, "
                "max_retries, timeout, batch_id, batch_index) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
            db.executemany("INSERT OR IGNORE INTO payloads(run_id, kind, data) VALUES (?, 'args', ?)", payloads)
