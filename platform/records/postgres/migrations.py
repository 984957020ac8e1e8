"""The PostgreSQL schema, as numbered migrations twinned with SQLite's (``records/sqlite/migrations.py``).

``MIGRATIONS[n - 1]`` takes a database from version n-1 to n, in one transaction that also sets
``schema_version`` to n. Each one makes the same tables and columns as the SQLite migration of the same
number (``tests/test_records.py`` compares the two schemas), in PostgreSQL's types: REAL times are
``double precision``, BLOBs ``bytea``, counters ``bigint``; ids are ``COLLATE "C"`` so they sort by their
bytes, as in SQLite (run ids are time-ordered: pages and time ranges are id bounds). JSON stays text, as
the adapter reads it back with ``json.loads`` like SQLite's.

Gateways starting together migrate one at a time (a transaction-scoped advisory lock); a database from
a newer opbox, or one with tables that are not opbox's, is refused and left untouched.
To change the schema, append a migration here *and* in SQLite's list; never edit a released one.
"""

from __future__ import annotations

import psycopg

from opbox.errors import ConfigError

MIGRATIONS: tuple[str, ...] = (
    # 1: the schema of the releases before versioning
    """
CREATE TABLE workspaces(
  name text PRIMARY KEY, created_at double precision NOT NULL);
CREATE TABLE tokens(
  id text PRIMARY KEY, workspace text NOT NULL, name text NOT NULL, hash text NOT NULL UNIQUE,
  role text NOT NULL, created_at double precision NOT NULL, revoked_at double precision);
CREATE TABLE jobs(
  id text COLLATE "C" PRIMARY KEY, workspace text NOT NULL, name text NOT NULL, kind text NOT NULL,
  created_at double precision NOT NULL, latest_version integer, UNIQUE(workspace, name));
CREATE TABLE versions(
  job_id text COLLATE "C" NOT NULL, version integer NOT NULL, status text NOT NULL, entry text NOT NULL,
  code_key text NOT NULL, code_sha256 text NOT NULL, requirements_sha256 text NOT NULL,
  python text NOT NULL, cloudpickle text NOT NULL, resource text NOT NULL, artifact text,
  build_log text NOT NULL DEFAULT '', error text, created_at double precision NOT NULL, ready_at double precision,
  PRIMARY KEY(job_id, version));
CREATE TABLE runs(
  id text COLLATE "C" PRIMARY KEY, workspace text NOT NULL, job_id text COLLATE "C" NOT NULL,
  version integer NOT NULL, status text NOT NULL, trigger text NOT NULL, created_at double precision NOT NULL,
  started_at double precision, finished_at double precision, exit_reason text, error_type text,
  attempt integer NOT NULL DEFAULT 0, max_retries integer NOT NULL DEFAULT 0, timeout double precision,
  batch_id text COLLATE "C", batch_index integer, done_seq bigint, worker text, log_bytes bigint NOT NULL DEFAULT 0);
CREATE INDEX runs_by_job ON runs(job_id, id);
CREATE INDEX runs_by_batch ON runs(batch_id, done_seq) WHERE batch_id IS NOT NULL;
CREATE INDEX runs_open ON runs(status) WHERE status IN ('queued', 'running');
CREATE TABLE payloads(
  run_id text COLLATE "C" NOT NULL, kind text NOT NULL, data bytea NOT NULL, PRIMARY KEY(run_id, kind));
CREATE TABLE logs(
  run_id text COLLATE "C" NOT NULL, seq bigint NOT NULL, data bytea NOT NULL, PRIMARY KEY(run_id, seq));
CREATE TABLE batches(
  id text COLLATE "C" PRIMARY KEY, workspace text NOT NULL, job_id text COLLATE "C" NOT NULL,
  version integer NOT NULL, concurrency integer, total bigint, submitted bigint NOT NULL DEFAULT 0,
  done bigint NOT NULL DEFAULT 0, cancelled integer NOT NULL DEFAULT 0, created_at double precision NOT NULL);
CREATE TABLE services(
  workspace text NOT NULL, name text NOT NULL, job_id text NOT NULL, version integer NOT NULL, kind text NOT NULL,
  replicas integer NOT NULL, concurrency integer NOT NULL, queue integer NOT NULL, scale_to_zero double precision,
  init bytea NOT NULL, created_at double precision NOT NULL, updated_at double precision NOT NULL,
  PRIMARY KEY(workspace, name));
""",
    # 2: retention: when a finished run's payloads and logs were dropped (410 from then on)
    """
ALTER TABLE runs ADD COLUMN expired_at double precision;
CREATE INDEX runs_to_expire ON runs(finished_at) WHERE finished_at IS NOT NULL AND expired_at IS NULL;
""",
    # 3: payloads above the inline limit live in the object store; bytes stored per workspace
    """
ALTER TABLE payloads ADD COLUMN object_key text;
ALTER TABLE payloads ADD COLUMN size bigint;
CREATE INDEX payloads_by_object ON payloads(object_key) WHERE object_key IS NOT NULL;
CREATE TABLE usage(workspace text PRIMARY KEY, bytes bigint NOT NULL);
""",
    # 4: retries (retry_at, attempts), runs a schedule started, schedules, workspace secrets
    """
ALTER TABLE runs ADD COLUMN retry_at double precision;
ALTER TABLE runs ADD COLUMN schedule_id text;
CREATE TABLE attempts(
  run_id text COLLATE "C" NOT NULL, attempt integer NOT NULL, status text NOT NULL, started_at double precision,
  finished_at double precision NOT NULL, reason text, error_type text, log_seq bigint NOT NULL,
  PRIMARY KEY(run_id, attempt));
CREATE TABLE schedules(
  id text PRIMARY KEY, workspace text NOT NULL, job_id text NOT NULL, spec text NOT NULL,
  anchor double precision NOT NULL, next_fire_at double precision NOT NULL, paused integer NOT NULL DEFAULT 0,
  pending integer NOT NULL DEFAULT 0, last_fire_at double precision, last_run_id text, last_error text,
  created_at double precision NOT NULL, updated_at double precision NOT NULL, UNIQUE(workspace, job_id));
CREATE TABLE secrets(
  workspace text NOT NULL, name text NOT NULL, keys text NOT NULL, data bytea NOT NULL,
  created_at double precision NOT NULL, updated_at double precision NOT NULL, PRIMARY KEY(workspace, name));
""",
    # 5: the runs API across jobs and the dashboard: one index per filter, walked in id order
    """
CREATE INDEX runs_by_workspace ON runs(workspace, id, job_id, status);
CREATE INDEX runs_by_status ON runs(workspace, status, id);
CREATE INDEX runs_by_trigger ON runs(workspace, trigger, id);
CREATE INDEX runs_by_batch_id ON runs(batch_id, id) WHERE batch_id IS NOT NULL;
CREATE INDEX runs_by_batch_index ON runs(batch_id, batch_index) WHERE batch_id IS NOT NULL;
CREATE INDEX batches_by_workspace ON batches(workspace, id);
""",
    # 6: a streaming run's items; a function version's signature (JSON)
    """
ALTER TABLE versions ADD COLUMN signature text;
CREATE TABLE run_items(
  run_id text COLLATE "C" NOT NULL, seq bigint NOT NULL, data bytea NOT NULL, object_key text, size bigint NOT NULL,
  PRIMARY KEY(run_id, seq));
CREATE INDEX run_items_by_object ON run_items(object_key) WHERE object_key IS NOT NULL;
""",
    # 7: W3C trace context: a run's traceparent (its trace and its own span) and its caller's span
    """
ALTER TABLE runs ADD COLUMN traceparent text;
ALTER TABLE runs ADD COLUMN parent_span_id text;
""",
    # 8: the overview's settled hours, counted once (a row with job_id '' marks an hour as counted); deleting
    # runs drops their hours' rows in the same statement
    """
CREATE TABLE run_hours(
  workspace text NOT NULL, hour bigint NOT NULL, job_id text COLLATE "C" NOT NULL, status text NOT NULL,
  n bigint NOT NULL, PRIMARY KEY(workspace, hour, job_id, status));
CREATE INDEX run_hours_by_job ON run_hours(job_id);
""",
    # 9: fewer index writes per run: no index holds the status but the two small partial ones (a status change
    # rewrites every index holding it, and keeps PostgreSQL from a HOT update); the workspace's keeps what never
    # changes. A query uses a partial index only when its WHERE implies the index's: the status as a literal
    """
DROP INDEX runs_by_status;
DROP INDEX runs_by_workspace;
DROP INDEX runs_open;
CREATE INDEX runs_by_workspace ON runs(workspace, id, job_id);
CREATE INDEX runs_open ON runs(status, workspace, id, job_id) WHERE status IN ('queued', 'running');
CREATE INDEX runs_ended_badly ON runs(status, workspace, id, job_id)
  WHERE status IN ('failed', 'timed_out', 'cancelled');
""",
    # 10: payloads uploaded straight to the object store (a presigned URL), not yet attached to a run
    """
CREATE TABLE uploads(
  object_key text PRIMARY KEY, workspace text NOT NULL, created_at double precision NOT NULL);
CREATE INDEX uploads_by_age ON uploads(created_at);
""",
    # 11: jobs calling jobs: a run started by another run's code names that run, its parent
    """
ALTER TABLE runs ADD COLUMN parent_run_id text COLLATE "C";
CREATE INDEX runs_by_parent ON runs(parent_run_id, id) WHERE parent_run_id IS NOT NULL;
""",
    # 12: a map's running items, counted when a gateway starts one under the map's concurrency (several gateways
    # may dispatch one map's items): small, as only running items are in it
    """
CREATE INDEX runs_running_by_batch ON runs(batch_id) WHERE status = 'running' AND batch_id IS NOT NULL;
""",
)

MIGRATION_LOCK = 0x6F70626F78  # "opbox": the advisory lock gateways take to migrate one at a time


def version_of(conn: psycopg.Connection) -> int | None:
    """The database's schema version; None when it has no schema_version table."""
    # a catalog scan, not to_regclass: that may answer from a cache another gateway's migration made stale
    row = conn.execute("SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = current_schema() "
                       "AND tablename = 'schema_version')").fetchone()
    if not row[0]:
        return None
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    return row[0] if row else 0


def check_version(where: str, version: int, known: int) -> None:
    if version > known:
        raise ConfigError(f"{where} was written by a newer opbox: its schema version is {version} and this opbox "
                          f"knows versions up to {known}. Upgrade opbox, or point OPBOX_DATABASE_URL at another "
                          "database; it was left untouched")


def migrate(conn: psycopg.Connection, where: str, migrations: tuple[str, ...] = MIGRATIONS) -> int:
    """Applies the missing migrations, each in one transaction; returns the database's version.
    ``conn`` is in autocommit mode."""
    current = version_of(conn)
    if current is not None:
        check_version(where, current, len(migrations))
        if current == len(migrations):
            return current  # the usual start: no lock taken
    while True:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s::bigint)", (MIGRATION_LOCK,))
            current = version_of(conn)  # another gateway may have migrated meanwhile
            if current is None:
                tables = [r[0] for r in conn.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1")]
                if tables:
                    raise ConfigError(f"{where} is not an opbox database (it has no schema_version table, and "
                                      f"tables: {', '.join(tables[:10])}); it was left untouched")
                conn.execute("CREATE TABLE schema_version(version integer NOT NULL)")
                conn.execute("INSERT INTO schema_version VALUES (0)")
                current = 0
            check_version(where, current, len(migrations))
            if current == len(migrations):
                return current
            try:
                conn.execute(migrations[current])
            except psycopg.Error as exc:
                raise ConfigError(f"{where}: migrating the schema to version {current + 1} failed ({exc}); "
                                  f"it stays at version {current}") from exc
            conn.execute("UPDATE schema_version SET version = %s", (current + 1,))
