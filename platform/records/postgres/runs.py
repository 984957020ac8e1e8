"""Runs, their payloads (arguments, results) and their logs, in PostgreSQL.

Each method is one statement (one round trip): where SQLite runs a few statements in a transaction,
this runs them as data-modifying CTEs of one statement, which PostgreSQL applies atomically.
"""

from __future__ import annotations

from typing import Sequence

from psycopg import errors as pg_errors

from ..base import AttemptRecord, Dropped, NewRun, Payload, RunFilter, RunRecord, StoredPayload, payload_size
from .connection import Database, storage_errors
from .leadership import GATEWAYS

COLUMNS = ("id, workspace, job_id, version, status, trigger, created_at, started_at, finished_at, exit_reason, "
           "error_type, attempt, max_retries, timeout, batch_id, batch_index, done_seq, worker, log_bytes, expired_at, "
           "retry_at, schedule_id")
SELECT = f"SELECT {COLUMNS} FROM runs"
RUN_FIELDS = "id, workspace, job_id, version, trigger, created_at, max_retries, timeout, batch_id, batch_index, schedule_id"
OPEN_SQL = "status IN ('queued', 'running')"  # base.OPEN, as literals: so the partial index runs_open applies
UPSERT_PAYLOAD = ("ON CONFLICT (run_id, kind) DO UPDATE SET data = excluded.data, object_key = excluded.object_key, "
                  "size = excluded.size")
ADD_USAGE = "ON CONFLICT (workspace) DO UPDATE SET bytes = usage.bytes + excluded.bytes"


def payload_row(payload: Payload) -> tuple:
    """A payloads row's data, object key and size: inline bytes, or a stored object's head, key and size."""
    if isinstance(payload, StoredPayload):
        return payload.head, payload.key, payload.size
    return payload, None, None


def as_payload(data: bytes, key: str | None, size: int | None) -> Payload:
    return data if key is None else StoredPayload(key, size, data)


def drop_sql(victims: str, then: str) -> str:
    """One statement that deletes the payloads, logs and items of the runs ``victims`` selects (a query
    returning id, workspace, log_bytes), takes their bytes off their workspaces' usage, runs the CTEs in
    ``then`` (which may refer to ``victims``), and returns (runs, bytes freed, object-store keys)."""
    return f"""
WITH victims AS ({victims}),
dp AS (DELETE FROM payloads p USING victims v WHERE p.run_id = v.id
       RETURNING v.workspace, p.object_key, COALESCE(p.size, length(p.data))::bigint AS bytes),
di AS (DELETE FROM run_items i USING victims v WHERE i.run_id = v.id RETURNING v.workspace, i.object_key, i.size AS bytes),
dl AS (DELETE FROM logs l USING victims v WHERE l.run_id = v.id),
freed AS (SELECT workspace, SUM(bytes)::bigint AS bytes FROM (
            SELECT workspace, bytes FROM dp UNION ALL SELECT workspace, bytes FROM di
            UNION ALL SELECT workspace, log_bytes FROM victims) x GROUP BY workspace),
du AS (INSERT INTO usage(workspace, bytes) SELECT workspace, -bytes FROM freed {ADD_USAGE}){then}
SELECT (SELECT count(*) FROM victims), (SELECT COALESCE(SUM(bytes), 0)::bigint FROM freed),
       ARRAY(SELECT object_key FROM dp WHERE object_key IS NOT NULL
             UNION ALL SELECT object_key FROM di WHERE object_key IS NOT NULL)"""


def dropped(row: tuple) -> Dropped:
    return Dropped(row[0], row[1], list(row[2]))


INSERT_RUN = f"INSERT INTO runs({RUN_FIELDS}, status) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,'queued')"
CREATE = f"""
WITH r AS ({INSERT_RUN} ON CONFLICT (id) DO NOTHING RETURNING id, workspace),
p AS (INSERT INTO payloads(run_id, kind, data, object_key, size) SELECT id, 'args', %s, %s, %s FROM r {UPSERT_PAYLOAD}),
u AS (INSERT INTO usage(workspace, bytes) SELECT workspace, %s FROM r {ADD_USAGE})
SELECT count(*) FROM r"""

FINISH = f"""
WITH b AS (UPDATE batches SET done = done + 1 WHERE id = %(batch)s RETURNING done, total),
r AS (UPDATE runs SET status = %(status)s, finished_at = %(at)s, exit_reason = COALESCE(%(reason)s, exit_reason),
        error_type = %(error_type)s, started_at = COALESCE(started_at, %(at)s), retry_at = NULL,
        done_seq = COALESCE((SELECT done FROM b), done_seq)
      WHERE id = %(id)s RETURNING {COLUMNS}),
p AS (INSERT INTO payloads(run_id, kind, data, object_key, size) VALUES (%(id)s, 'result', %(data)s, %(key)s, %(size)s)
      {UPSERT_PAYLOAD}),
u AS (INSERT INTO usage(workspace, bytes) VALUES (%(workspace)s, %(bytes)s) {ADD_USAGE})
SELECT r.*, (SELECT total FROM b) FROM r"""

RETRY = """
WITH a AS (INSERT INTO attempts(run_id, attempt, status, started_at, finished_at, reason, error_type, log_seq)
           VALUES (%(id)s, %(attempt)s, %(status)s, %(started_at)s, %(at)s, %(reason)s, %(error_type)s,
                   (SELECT COALESCE(MAX(seq), -1) FROM logs WHERE run_id = %(id)s))
           ON CONFLICT (run_id, attempt) DO UPDATE SET status = excluded.status, started_at = excluded.started_at,
             finished_at = excluded.finished_at, reason = excluded.reason, error_type = excluded.error_type,
             log_seq = excluded.log_seq)
UPDATE runs SET status = 'queued', attempt = attempt + 1, exit_reason = %(exit_reason)s, started_at = NULL,
  worker = NULL, retry_at = %(retry_at)s WHERE id = %(id)s"""

# the usual log append: within the budget, nothing dropped; the run's row lock orders appends to one run
APPEND_LOG = f"""
WITH r AS (UPDATE runs SET log_bytes = log_bytes + %(n)s WHERE id = %(id)s AND log_bytes + %(n)s <= %(limit)s
           RETURNING workspace),
l AS (INSERT INTO logs(run_id, seq, data) SELECT %(id)s,
        (SELECT COALESCE(MAX(seq), -1) + 1 FROM logs WHERE run_id = %(id)s), %(data)s FROM r),
u AS (INSERT INTO usage(workspace, bytes) SELECT workspace, %(n)s FROM r {ADD_USAGE})
SELECT count(*) FROM r"""


# queued again: running runs whose gateway died (no session holds its liveness lock; see leadership.py)
REQUEUE_ORPHANS = ("UPDATE runs SET status = 'queued', started_at = NULL, worker = NULL, exit_reason = %s "
                   "WHERE status = 'running' AND (strpos(COALESCE(worker, ''), '/') = 0 OR "
                   "pg_try_advisory_xact_lock(%s::int4, hashtext(split_part(worker, '/', 1))))")


@storage_errors
class PostgresRuns:
    def __init__(self, database: Database, gateway: str):
        self.db = database
        self.where = database.where
        self.gateway = gateway  # a run this gateway starts names it: {gateway}/{worker}

    def get(self, run_id: str) -> RunRecord | None:
        row = self.db.one(f"{SELECT} WHERE id = %s", (run_id,))
        return RunRecord(*row) if row is not None else None

    def _payload(self, run_id: str, kind: str) -> Payload | None:
        row = self.db.one("SELECT data, object_key, size FROM payloads WHERE run_id = %s AND kind = %s", (run_id, kind))
        return as_payload(*row) if row else None

    def args(self, run_id: str) -> Payload | None:
        return self._payload(run_id, "args")

    def result(self, run_id: str) -> Payload | None:
        return self._payload(run_id, "result")

    def create(self, run: NewRun, args: Payload) -> None:
        self.db.one(CREATE, (*run, *payload_row(args), payload_size(args)))

    def start(self, run_id: str, worker: str, at: float) -> bool:
        return self.db.run("UPDATE runs SET status = 'running', started_at = %s, worker = %s, retry_at = NULL "
                           "WHERE id = %s AND status = 'queued'", (at, f"{self.gateway}/{worker}", run_id)) == 1

    def retry(self, run: RunRecord, status: str, reason: str | None, error_type: str | None, at: float,
              retry_at: float | None) -> None:
        self.db.run(RETRY, {"id": run.id, "attempt": run.attempt, "status": status, "started_at": run.started_at,
                            "at": at, "reason": reason, "error_type": error_type, "retry_at": retry_at,
                            "exit_reason": f"attempt {run.attempt + 1} {status}: {reason}"})

    def attempts(self, run_id: str) -> list[AttemptRecord]:
        return [AttemptRecord(*r) for r in self.db.all(
            "SELECT run_id, attempt, status, started_at, finished_at, reason, error_type, log_seq FROM attempts "
            "WHERE run_id = %s ORDER BY attempt", (run_id,))]

    def requeue(self, run_id: str, reason: str) -> None:
        self.db.run("UPDATE runs SET status = 'queued', exit_reason = %s, started_at = NULL, worker = NULL "
                    f"WHERE id = %s AND {OPEN_SQL}", (reason, run_id))

    def finish(self, run: RunRecord, status: str, at: float, reason: str | None, error_type: str | None,
               result: Payload) -> tuple[RunRecord, bool]:
        data, key, size = payload_row(result)
        row = self.db.one(FINISH, {"batch": run.batch_id, "status": status, "at": at, "reason": reason,
                                   "error_type": error_type, "id": run.id, "data": data, "key": key, "size": size,
                                   "workspace": run.workspace, "bytes": payload_size(result)})
        ended, total = RunRecord(*row[:-1]), row[-1]
        complete = run.batch_id is not None and total is not None and ended.done_seq >= total
        return ended, complete

    def append_log(self, run_id: str, data: bytes, limit: int, marker: bytes, dropped: bool) -> bool:
        if not dropped:
            try:
                if self.db.one(APPEND_LOG, {"id": run_id, "n": len(data), "limit": limit, "data": data})[0]:
                    return True
            except pg_errors.UniqueViolation:  # another gateway appended to this run at the same moment
                pass
        return self._append_dropping(run_id, data, limit, marker, dropped)

    def _append_dropping(self, run_id: str, data: bytes, limit: int, marker: bytes, dropped: bool) -> bool:
        """Past the budget (or told to mark a drop): the oldest chunks go, in a transaction holding the run's row."""
        with self.db.conn() as conn, conn.transaction():
            row = conn.execute("SELECT log_bytes, workspace FROM runs WHERE id = %s FOR UPDATE", (run_id,)).fetchone()
            if row is None:
                return False
            before, workspace = row
            chunks = conn.execute("SELECT seq, length(data) FROM logs WHERE run_id = %s ORDER BY seq",
                                  (run_id,)).fetchall()
            seq = max((s for s, _ in chunks), default=-1) + 1
            size = before + len(data)
            if size > limit:
                for old_seq, old_len in chunks:
                    if size <= limit:
                        break
                    if old_seq < 0:
                        continue
                    conn.execute("DELETE FROM logs WHERE run_id = %s AND seq = %s", (run_id, old_seq))
                    size -= old_len
                dropped = True
            if dropped:
                conn.execute("INSERT INTO logs(run_id, seq, data) VALUES (%s, -1, %s) ON CONFLICT (run_id, seq) "
                             "DO UPDATE SET data = excluded.data", (run_id, marker))
            conn.execute("INSERT INTO logs(run_id, seq, data) VALUES (%s, %s, %s)", (run_id, seq, data))
            conn.execute("UPDATE runs SET log_bytes = %s WHERE id = %s", (size, run_id))
            conn.execute(f"INSERT INTO usage(workspace, bytes) VALUES (%s, %s) {ADD_USAGE}", (workspace, size - before))
        return True

    def logs_after(self, run_id: str, after_seq: int) -> list[tuple[int, bytes]]:
        return self.db.all("SELECT seq, data FROM logs WHERE run_id = %s AND seq > %s ORDER BY seq", (run_id, after_seq))

    def of_job(self, job_id: str, status: str | None, before: str | None, limit: int) -> list[RunRecord]:
        sql, params = f"{SELECT} WHERE job_id = %s", [job_id]
        if status:
            sql += " AND status = %s"
            params.append(status)
        if before:
            sql += " AND id < %s"
            params.append(before)
        params.append(limit)
        return [RunRecord(*r) for r in self.db.all(sql + " ORDER BY id DESC LIMIT %s", params)]

    def open_counts(self, workspace: str) -> dict[str, int]:
        return dict(self.db.all(f"SELECT status, COUNT(*) FROM runs WHERE workspace = %s AND {OPEN_SQL} "
                                "GROUP BY status", (workspace,)))

    def search(self, workspace: str, where: RunFilter, limit: int) -> list[RunRecord]:
        sql, params = f"{SELECT} WHERE workspace = %s", [workspace]
        for column, value in (("job_id", where.job_id), ("status", where.status), ("trigger", where.trigger),
                              ("batch_id", where.batch_id)):
            if value is not None:
                sql += f" AND {column} = %s"
                params.append(value)
        if where.since_id is not None:
            sql += " AND id >= %s"
            params.append(where.since_id)
        if where.before_id is not None:
            sql += " AND id < %s"
            params.append(where.before_id)
        params.append(limit)
        return [RunRecord(*r) for r in self.db.all(sql + " ORDER BY id DESC LIMIT %s", params)]

    def status_counts(self, workspace: str, since_id: str, before_id: str | None = None) -> dict[str, int]:
        return dict(self.db.all(
            "SELECT status, COUNT(*) FROM runs WHERE workspace = %s AND id >= %s AND id < %s GROUP BY status",
            (workspace, since_id, before_id or "\uffff")))

    def busiest_jobs(self, workspace: str, since_id: str, limit: int) -> list[tuple[str, int, int]]:
        return [tuple(r) for r in self.db.all(
            "SELECT job_id, COUNT(*) AS n, COUNT(*) FILTER (WHERE status IN ('failed', 'timed_out')) FROM runs "
            "WHERE workspace = %s AND id >= %s GROUP BY job_id ORDER BY n DESC LIMIT %s", (workspace, since_id, limit))]

    def requeue_running(self, reason: str) -> None:
        """Several gateways share the database: only the runs of gateways that died go back to the queue."""
        self.db.run(REQUEUE_ORPHANS, (reason, GATEWAYS))

    def queued(self) -> list[RunRecord]:
        return [RunRecord(*r) for r in self.db.all(f"{SELECT} WHERE status = 'queued' ORDER BY id")]

    # -- retention ---------------------------------------------------------------------------
    def expire(self, default_days: float, now: float, limit: int) -> Dropped:
        # rows another gateway's retention holds are skipped (SKIP LOCKED): each run is expired once
        victims = ("SELECT r.id, r.workspace, r.log_bytes FROM runs r JOIN versions v ON v.job_id = r.job_id "
                   "AND v.version = r.version WHERE r.finished_at IS NOT NULL AND r.expired_at IS NULL AND "
                   "r.finished_at < %(now)s - 86400.0 * COALESCE((v.resource::jsonb ->> 'retention_days')::float8, "
                   "%(days)s) LIMIT %(limit)s FOR UPDATE OF r SKIP LOCKED")
        then = (",\nmark AS (UPDATE runs SET expired_at = %(now)s, log_bytes = 0 FROM victims v "
                "WHERE runs.id = v.id)")
        return dropped(self.db.one(drop_sql(victims, then), {"now": now, "days": default_days, "limit": limit}))

    def delete_finished(self, days: float, now: float, limit: int) -> Dropped:
        victims = ("SELECT id, workspace, log_bytes FROM runs WHERE finished_at IS NOT NULL AND finished_at < %(before)s "
                   "LIMIT %(limit)s FOR UPDATE SKIP LOCKED")
        then = (",\nda AS (DELETE FROM attempts a USING victims v WHERE a.run_id = v.id),\n"
                "dr AS (DELETE FROM runs USING victims v WHERE runs.id = v.id)")
        return dropped(self.db.one(drop_sql(victims, then), {"before": now - 86400.0 * days, "limit": limit}))

    def stored_keys(self, keys: Sequence[str]) -> set[str]:
        keys = list(keys)
        return {r[0] for r in self.db.all(
            "SELECT object_key FROM payloads WHERE object_key = ANY(%s) UNION ALL "
            "SELECT object_key FROM run_items WHERE object_key = ANY(%s)", (keys, keys))}
