"""The platform's durable state in SQLite: workspaces, tokens, jobs, versions, runs, payloads, logs.

One connection, used from the gateway's event loop: each statement takes microseconds
(WAL journal, synchronous=NORMAL: a commit appends to the WAL and does not fsync), which is
cheaper than handing it to a thread. Every change that must be atomic (a run and its
arguments; a result and the run's end) is one transaction.

Checkpoints (copying the WAL into the database, with fsyncs) would otherwise run inside
whichever commit crossed SQLite's 1,000-page mark, a few milliseconds every ~90 calls: the
call path's p99. A ``Checkpointer`` thread with its own connection does them instead, PASSIVE
(never blocking the writer or readers) every ``CHECKPOINT_INTERVAL``; the gateway's own
connection only checkpoints as a safety net, if the WAL ever grows past ``SAFETY_PAGES``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
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

CHECKPOINT_INTERVAL = 0.25  # seconds between background checkpoints
SAFETY_PAGES = 20_000  # the writer checkpoints itself past this (about 80 MB of WAL)

log = logging.getLogger("opbox.state")

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "timed_out"})
RUN_COLUMNS = (
    "id", "workspace", "job_id", "version", "status", "trigger", "created_at", "started_at", "finished_at",
    "exit_reason", "error_type", "attempt", "max_retries", "timeout", "batch_id", "batch_index", "done_seq",
    "worker", "log_bytes",
)


class Checkpointer:
    """Checkpoints the WAL from a thread of its own, off the event loop (see the module's doc)."""

    def __init__(self, path: str, interval: float = CHECKPOINT_INTERVAL):
        self.path = path
        self.interval = interval
        self.checkpoints = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="opbox-sqlite-checkpoint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA busy_timeout=5000")
            while not self._stop.wait(self.interval):
                self._checkpoint(db, "PASSIVE")
            self._checkpoint(db, "TRUNCATE")  # leave an empty WAL behind
        finally:
            db.close()

    def _checkpoint(self, db: sqlite3.Connection, mode: str) -> None:
        try:
            _, frames, _ = db.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
            if frames > 0:
                self.checkpoints += 1
        except sqlite3.Error as exc:  # the writer's safety net still bounds the WAL
            log.warning("checkpointing %s failed: %s", self.path, exc)


class State:
    def __init__(self, path: Path | str):
        self.path = str(path)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON", "busy_timeout=5000",
                       "temp_store=MEMORY", "cache_size=-32000", f"wal_autocheckpoint={SAFETY_PAGES}"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.executescript(SCHEMA)
        self.checkpointer = Checkpointer(self.path)
        self.checkpointer.start()

    def close(self) -> None:
        self.checkpointer.stop()
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
