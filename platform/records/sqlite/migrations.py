"""The schema, as numbered migrations; a state file's ``PRAGMA user_version`` says how many it has.

``MIGRATIONS[n - 1]`` takes a file from version n-1 to n, in one transaction that also sets
``user_version`` to n, so a crash leaves the file at a version it really has. To change the
schema, append a migration; never edit a released one.

Migration 1 is the schema of the releases before versioning, with its ``IF NOT EXISTS``: those
files have ``user_version`` 0 and the tables already (or part of them: the services table was
made on the gateway's first start), so running it on them adds what is missing and stamps
them, data untouched. An unversioned file with other tables is not ours and is refused, as is
a file from a newer opbox (the file is then left exactly as it was).
"""

from __future__ import annotations

import sqlite3

from opbox.errors import ConfigError

MIGRATIONS: tuple[str, ...] = (
    # 1: the schema of the releases before versioning (platform/state.py and services.py at 0aef0a7)
    """
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
CREATE TABLE IF NOT EXISTS services(
  workspace TEXT NOT NULL, name TEXT NOT NULL, job_id TEXT NOT NULL, version INTEGER NOT NULL, kind TEXT NOT NULL,
  replicas INTEGER NOT NULL, concurrency INTEGER NOT NULL, queue INTEGER NOT NULL, scale_to_zero REAL,
  init BLOB NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY(workspace, name));
""",
    # 2: retention: when a finished run's payloads and logs were dropped (410 from then on)
    """
ALTER TABLE runs ADD COLUMN expired_at REAL;
CREATE INDEX runs_to_expire ON runs(finished_at) WHERE finished_at IS NOT NULL AND expired_at IS NULL;
""",
    # 3: payloads above the inline limit live in the object store (the row keeps the key, the size and the
    # envelope's head); per-workspace bytes stored (payloads, logs, code), for the storage quota. Code
    # archives deployed before this version are not counted.
    """
ALTER TABLE payloads ADD COLUMN object_key TEXT;
ALTER TABLE payloads ADD COLUMN size INTEGER;
CREATE INDEX payloads_by_object ON payloads(object_key) WHERE object_key IS NOT NULL;
CREATE TABLE usage(workspace TEXT PRIMARY KEY, bytes INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO usage(workspace, bytes)
  SELECT r.workspace, SUM(r.log_bytes) + COALESCE(SUM(p.bytes), 0) FROM runs r
  LEFT JOIN (SELECT run_id, SUM(length(data)) AS bytes FROM payloads GROUP BY run_id) p ON p.run_id = r.id
  GROUP BY r.workspace;
""",
    # 4: production jobs. Retries: a run waiting out its backoff is queued with retry_at (kept over a restart),
    # and each earlier attempt is a row of attempts (its end, reason and the last log chunk it wrote). Runs a
    # schedule started name it. Schedules with their next fire time; workspace secrets, encrypted (the key is
    # a file apart from this one).
    """
ALTER TABLE runs ADD COLUMN retry_at REAL;
ALTER TABLE runs ADD COLUMN schedule_id TEXT;
CREATE TABLE attempts(
  run_id TEXT NOT NULL, attempt INTEGER NOT NULL, status TEXT NOT NULL, started_at REAL, finished_at REAL NOT NULL,
  reason TEXT, error_type TEXT, log_seq INTEGER NOT NULL, PRIMARY KEY(run_id, attempt)) WITHOUT ROWID;
CREATE TABLE schedules(
  id TEXT PRIMARY KEY, workspace TEXT NOT NULL, job_id TEXT NOT NULL, spec TEXT NOT NULL, anchor REAL NOT NULL,
  next_fire_at REAL NOT NULL, paused INTEGER NOT NULL DEFAULT 0, pending INTEGER NOT NULL DEFAULT 0,
  last_fire_at REAL, last_run_id TEXT, last_error TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL,
  UNIQUE(workspace, job_id));
CREATE TABLE secrets(
  workspace TEXT NOT NULL, name TEXT NOT NULL, keys TEXT NOT NULL, data BLOB NOT NULL, created_at REAL NOT NULL,
  updated_at REAL NOT NULL, PRIMARY KEY(workspace, name)) WITHOUT ROWID;
""",
    # 5: the runs API across jobs and the dashboard: a workspace's runs newest first (ids are time-ordered),
    # by status, by trigger and by map, and its maps (a map's items also by index: adding items checks which
    # it has); each filter walks its own index in id order (keyset paging);
    # the workspace's index carries job and status, so the overview's busiest jobs are counted from it alone
    """
CREATE INDEX runs_by_workspace ON runs(workspace, id, job_id, status);
CREATE INDEX runs_by_status ON runs(workspace, status, id);
CREATE INDEX runs_by_trigger ON runs(workspace, trigger, id);
CREATE INDEX runs_by_batch_id ON runs(batch_id, id) WHERE batch_id IS NOT NULL;
CREATE INDEX runs_by_batch_index ON runs(batch_id, batch_index) WHERE batch_id IS NOT NULL;
CREATE INDEX batches_by_workspace ON batches(workspace, id);
""",
    # 6: a streaming run's items (a generator's values, numbered from 1 as they are yielded): inline, or a
    # reference to the object store (the row keeps the key, the size and the envelope's head); a function
    # version's signature (JSON, from the SDK at deploy), which JSON triggers are checked against
    """
ALTER TABLE versions ADD COLUMN signature TEXT;
CREATE TABLE run_items(
  run_id TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL, object_key TEXT, size INTEGER NOT NULL,
  PRIMARY KEY(run_id, seq));
CREATE INDEX run_items_by_object ON run_items(object_key) WHERE object_key IS NOT NULL;
""",
    # 7: W3C trace context: a run's traceparent (its trace and its own span) and its caller's span
    """
ALTER TABLE runs ADD COLUMN traceparent TEXT;
ALTER TABLE runs ADD COLUMN parent_span_id TEXT;
""",
    # 8: the overview's settled hours, counted once (runs per job and status created in the hour starting at
    # `hour`, epoch seconds); a row with job_id '' marks an hour as counted. Written when the overview reads
    # an hour whose runs have all ended; deleting runs drops their hours' rows in the same transaction
    """
CREATE TABLE run_hours(
  workspace TEXT NOT NULL, hour INTEGER NOT NULL, job_id TEXT NOT NULL, status TEXT NOT NULL, n INTEGER NOT NULL,
  PRIMARY KEY(workspace, hour, job_id, status)) WITHOUT ROWID;
CREATE INDEX run_hours_by_job ON run_hours(job_id);
""",
    # 9: fewer index writes per run. A run's status changes twice after its insert, each change in a commit of its
    # own, and every index holding the status is rewritten at each: the workspace's index now keeps only what
    # never changes (id, job), open runs and runs that ended badly have small partial indexes (a run is in
    # each at most while it is open, or once it failed), and succeeded runs are what the others leave
    """
DROP INDEX runs_by_status;
DROP INDEX runs_by_workspace;
DROP INDEX runs_open;
CREATE INDEX runs_by_workspace ON runs(workspace, id, job_id);
CREATE INDEX runs_open ON runs(status, workspace, id, job_id) WHERE status IN ('queued', 'running');
CREATE INDEX runs_ended_badly ON runs(status, workspace, id, job_id) WHERE status IN ('failed', 'timed_out', 'cancelled');
""",
    # 10: payloads uploaded straight to the object store (a presigned URL), not yet attached to a run: a run's
    # create (or a runtime's result) claims one, once; retention deletes those left unclaimed
    """
CREATE TABLE uploads(
  object_key TEXT PRIMARY KEY, workspace TEXT NOT NULL, created_at REAL NOT NULL);
CREATE INDEX uploads_by_age ON uploads(created_at);
""",
    # 11: jobs calling jobs: a run started by another run's code (with the run's scoped token) names that run, its
    # parent; a run's children by parent (the runs API's ?parent=, the dashboard's run page)
    """
ALTER TABLE runs ADD COLUMN parent_run_id TEXT;
CREATE INDEX runs_by_parent ON runs(parent_run_id, id) WHERE parent_run_id IS NOT NULL;
""",
    # 12: PostgreSQL only (a map's running items, counted when several gateways start them under its
    # concurrency); alone on its file a gateway counts them in memory. Kept so the two lists stay twins.
    """
SELECT 1;
""",
)


def statements(script: str) -> list[str]:
    """A script's statements, one by one (``executescript`` would commit our transaction first)."""
    out, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            out.append(pending.strip())
            pending = ""
    if pending.strip():
        out.append(pending.strip())
    return out


def version_of(db: sqlite3.Connection) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]


def check_version(path: str, version: int, known: int | None = None) -> None:
    """Refuses a file from a newer opbox before anything writes to it."""
    known = len(MIGRATIONS) if known is None else known
    if version > known:
        raise ConfigError(f"{path} was written by a newer opbox: its state version is {version} and this opbox "
                          f"knows versions up to {known}. Upgrade opbox, or point OPBOX_HOME at another folder; "
                          "the file was left untouched")


def _columns(db: sqlite3.Connection) -> dict[str, list[str]]:
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                       "AND name NOT LIKE 'sqlite_%'")]
    return {t: [c[1] for c in db.execute(f'PRAGMA table_info("{t}")')] for t in tables}


def check_unversioned(db: sqlite3.Connection, path: str) -> None:
    """A version-0 file must be empty or hold (part of) migration 1's tables, column for column."""
    found = _columns(db)
    if not found:
        return
    reference = sqlite3.connect(":memory:")
    try:
        for sql in statements(MIGRATIONS[0]):
            reference.execute(sql)
        expected = _columns(reference)
    finally:
        reference.close()
    strange = sorted(t for t, cols in found.items() if expected.get(t) != cols)
    if strange:
        raise ConfigError(f"{path} is not a valid opbox state file (unversioned, and its tables "
                          f"{', '.join(strange)} are not opbox's)")


def migrate(db: sqlite3.Connection, path: str, migrations: tuple[str, ...] = MIGRATIONS) -> int:
    """Applies the missing migrations, each in one transaction; returns the file's version."""
    if version_of(db) == len(migrations):
        return len(migrations)  # the usual start: no write lock taken
    while True:
        current = None
        try:
            db.execute("BEGIN IMMEDIATE")  # then read the version: another process may have migrated meanwhile
            current = version_of(db)
            check_version(path, current, len(migrations))
            if current == len(migrations):
                db.execute("COMMIT")
                return current
            if current == 0:
                check_unversioned(db, path)
            for sql in statements(migrations[current]):
                db.execute(sql)
            db.execute(f"PRAGMA user_version = {current + 1}")
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error) and current is not None:
                raise ConfigError(f"{path}: migrating the state to version {current + 1} failed ({exc}); "
                                  f"it stays at version {current}") from exc
            raise
