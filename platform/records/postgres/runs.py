"""Runs, their payloads (arguments, results) and their logs, in PostgreSQL.

Each method is one statement (one round trip): where SQLite runs a few statements in a transaction,
this runs them as data-modifying CTEs of one statement, which PostgreSQL applies atomically.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import psycopg
from psycopg import errors as pg_errors

from ...ids import id_at
from ..base import AttemptRecord, Dropped, NewRun, Payload, RunFilter, RunRecord, StoredPayload, payload_size
from .connection import Database, storage_errors
from .leadership import GATEWAYS

log = logging.getLogger("opbox.records")
SETTLE_AFTER = 120.0  # seconds after an hour's end before it may be kept counted (a run id made then, stored later)

COLUMNS = ("id, workspace, job_id, version, status, trigger, created_at, started_at, finished_at, exit_reason, "
           "error_type, attempt, max_retries, timeout, batch_id, batch_index, done_seq, worker, log_bytes, expired_at, "
           "retry_at, schedule_id, traceparent, parent_span_id, parent_run_id")
SELECT = f"SELECT {COLUMNS} FROM runs"
RUN_FIELDS = ("id, workspace, job_id, version, trigger, created_at, max_retries, timeout, batch_id, batch_index, "
              "schedule_id, traceparent, parent_span_id, parent_run_id")
# PostgreSQL uses a partial index only when a query's WHERE implies the index's, which it proves for constants
# alone: the statuses are written as literals (a validated one in ``search``)
OPEN_SQL = "status IN ('queued', 'running')"  # base.OPEN, as the partial index runs_open has it
ENDED_BADLY_SQL = "status IN ('failed', 'timed_out', 'cancelled')"  # as the partial index runs_ended_badly
STATUSES = frozenset({"queued", "running", "succeeded", "failed", "cancelled", "timed_out"})
# the hour (its start, epoch seconds) a run id was made in: ids begin with their time in ms, in hex
HOUR_OF_ID = "(('x' || lpad(substr({id}, 3, 11), 16, '0'))::bit(64)::bigint / 3600000 * 3600)"
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


def deleting(db: Database, sql: str, params: dict) -> Dropped:
    """A statement that deletes runs and their hours' kept counts, after the lock of those counts (``HOURS_LOCK``):
    its snapshot, taken then, sees every count kept before, and none is kept from a count made before it."""
    with db.conn() as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s::bigint)", (HOURS_LOCK,))
        return dropped(conn.execute(sql, params).fetchone())


# a queued run names the gateway whose queue holds it (``worker`` = "{gateway}/"), a running one the gateway and its
# worker ("{gateway}/{worker}"): when that gateway dies, the leader takes its open runs over (``claim_orphans``)
START = ("UPDATE runs SET status = 'running', started_at = %s, worker = %s, retry_at = NULL "
         "WHERE id = %s AND status = 'queued' AND (worker IS NULL OR worker = %s)")
INSERT_RUN = (f"INSERT INTO runs({RUN_FIELDS}, status, worker) "
              "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,'queued',%s)")
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
  worker = %(owner)s, retry_at = %(retry_at)s WHERE id = %(id)s"""

# the usual log append: within the budget, nothing dropped; the run's row lock orders appends to one run
APPEND_LOG = f"""
WITH r AS (UPDATE runs SET log_bytes = log_bytes + %(n)s WHERE id = %(id)s AND log_bytes + %(n)s <= %(limit)s
           RETURNING workspace),
l AS (INSERT INTO logs(run_id, seq, data) SELECT %(id)s,
        (SELECT COALESCE(MAX(seq), -1) + 1 FROM logs WHERE run_id = %(id)s), %(data)s FROM r),
u AS (INSERT INTO usage(workspace, bytes) SELECT workspace, %(n)s FROM r {ADD_USAGE})
SELECT count(*) FROM r"""


# the open runs of gateways that died (no session holds their liveness lock; see leadership.py), and any that name
# no gateway, become the caller's; running ones are queued again (their workers went with their gateway). Rows
# another transaction holds (a cancel, retention) are skipped (SKIP LOCKED): the next look takes them
CLAIM_ORPHANS = f"""
WITH owners AS (SELECT DISTINCT split_part(worker, '/', 1) AS g FROM runs
                WHERE {OPEN_SQL} AND worker IS NOT NULL AND split_part(worker, '/', 1) <> %(gateway)s),
dead AS (SELECT g FROM owners WHERE pg_try_advisory_xact_lock(%(cls)s::int4, hashtext(g)))
UPDATE runs SET status = 'queued', started_at = NULL, worker = %(owner)s,
  exit_reason = CASE WHEN status = 'running' THEN %(reason)s ELSE exit_reason END
WHERE id IN (SELECT id FROM runs WHERE {OPEN_SQL} AND (worker IS NULL OR strpos(worker, '/') = 0
             OR split_part(worker, '/', 1) IN (SELECT g FROM dead)) FOR UPDATE SKIP LOCKED)
  AND {OPEN_SQL}
RETURNING {COLUMNS}"""
# the liveness locks held now, in this database (pg_locks lists the whole server's): a gateway's, as its key's hash
LIVE_GATEWAYS = ("SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND classid = %s::int4::oid AND objsubid = 2 "
                 "AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")
CLAIM_RECHECK = 60.0  # seconds: a full look for orphans at least this often (and after a pause: a lead regained)

# the overview's hours (see ``hour_counts``): where runs may still change, then each hour's counts: its open runs
# (runs_open) and those that ended badly (runs_ended_badly), both index-only, and each job's runs; the rest succeeded
UNSETTLED_FROM = """
SELECT LEAST((SELECT MIN(id) FROM runs WHERE status = 'queued' AND workspace = %(ws)s),
             (SELECT MIN(id) FROM runs WHERE status = 'running' AND workspace = %(ws)s),
             (SELECT 'r-' || substr(MIN(id), 3) FROM batches WHERE workspace = %(ws)s AND id >= %(since)s
              AND cancelled = 0 AND (total IS NULL OR submitted < total)))"""
_IN_RANGE = "workspace = %(ws)s AND id >= %(lo)s AND id < %(hi)s"
_HOUR = HOUR_OF_ID.format(id="id")
COUNT_HOURS = f"""
SELECT {_HOUR}, job_id, status, count(*) FROM runs WHERE {OPEN_SQL} AND {_IN_RANGE} GROUP BY 1, 2, 3
UNION ALL
SELECT {_HOUR}, job_id, status, count(*) FROM runs WHERE {ENDED_BADLY_SQL} AND {_IN_RANGE} GROUP BY 1, 2, 3
UNION ALL
SELECT {_HOUR}, job_id, NULL, count(*) FROM runs WHERE {_IN_RANGE} GROUP BY 1, 2"""
# held by whoever keeps hours' counts or deletes runs (and their hours' counts), to its transaction's end: counts
# made before another gateway's delete committed are never kept after it (they would count deleted runs)
HOURS_LOCK = 0x6F70626F7868
KEEP_HOURS = ("INSERT INTO run_hours(workspace, hour, job_id, status, n) SELECT %s, * FROM unnest(%s::bigint[], "
              "%s::text[], %s::text[], %s::bigint[]) "
              "ON CONFLICT (workspace, hour, job_id, status) DO UPDATE SET n = excluded.n")


@storage_errors
class PostgresRuns:
    def __init__(self, database: Database, gateway: str):
        self.db = database
        self.where = database.where
        self.gateway = gateway  # a run this gateway queues names it ({gateway}/), and one it starts: {gateway}/{worker}
        self.owner = f"{gateway}/"
        self._live: frozenset | None = None  # the liveness locks at the last claim_orphans
        self._looked = 0.0

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
        self.db.one(CREATE, (*run, self.owner, *payload_row(args), payload_size(args)))

    def start(self, run_id: str, worker: str, at: float, limit: tuple[str, int] | None = None) -> bool:
        # only the gateway whose queue holds it: a run another gateway took over is never started twice
        params = (at, f"{self.gateway}/{worker}", run_id, self.owner)
        if limit is None:
            return self.db.run(START, params) == 1
        # under its map's concurrency: the map's row lock orders the gateways starting its items, and the count
        # is read after it (a statement of its own: a snapshot that sees every start committed before)
        with self.db.conn() as conn, conn.transaction():
            conn.execute("SELECT 1 FROM batches WHERE id = %s FOR UPDATE", (limit[0],))
            return conn.execute(START + " AND (SELECT count(*) FROM runs WHERE batch_id = %s AND status = 'running') < %s",
                                (*params, *limit)).rowcount == 1

    # -- a warm worker's group of a map's runs ---------------------------------------------------------------
    def start_many(self, run_ids: Sequence[str], worker: str, at: float) -> list[bool]:
        with self.db.conn() as conn, conn.transaction():
            return [conn.execute(START, (at, f"{self.gateway}/{worker}", run_id, self.owner)).rowcount == 1
                    for run_id in run_ids]

    def args_many(self, run_ids: Sequence[str]) -> dict[str, Payload]:
        return {run_id: as_payload(data, key, size) for run_id, data, key, size in self.db.all(
            "SELECT run_id, data, object_key, size FROM payloads WHERE kind = 'args' AND run_id = ANY(%s)",
            (list(run_ids),))}

    def finish_many(self, ends: Sequence[tuple[str, str | None, str, Payload]], status: str,
                    at: float) -> list[tuple[RunRecord, bool] | None]:
        out: list[tuple[RunRecord, bool] | None] = []
        with self.db.conn() as conn, conn.transaction():
            for run_id, batch_id, workspace, result in ends:
                if conn.execute(f"SELECT 1 FROM runs WHERE id = %s AND {OPEN_SQL} FOR UPDATE", (run_id,)).fetchone() is None:
                    out.append(None)  # ended meanwhile (cancelled)
                    continue
                data, key, size = payload_row(result)
                row = conn.execute(FINISH, {"batch": batch_id, "status": status, "at": at, "reason": None,
                                            "error_type": None, "id": run_id, "data": data, "key": key, "size": size,
                                            "workspace": workspace, "bytes": payload_size(result)}).fetchone()
                ended, total = RunRecord(*row[:-1]), row[-1]
                out.append((ended, batch_id is not None and total is not None and ended.done_seq >= total))
        return out

    def retry(self, run: RunRecord, status: str, reason: str | None, error_type: str | None, at: float,
              retry_at: float | None) -> None:
        self.db.run(RETRY, {"id": run.id, "attempt": run.attempt, "status": status, "started_at": run.started_at,
                            "at": at, "reason": reason, "error_type": error_type, "retry_at": retry_at,
                            "exit_reason": f"attempt {run.attempt + 1} {status}: {reason}", "owner": self.owner})

    def attempts(self, run_id: str) -> list[AttemptRecord]:
        return [AttemptRecord(*r) for r in self.db.all(
            "SELECT run_id, attempt, status, started_at, finished_at, reason, error_type, log_seq FROM attempts "
            "WHERE run_id = %s ORDER BY attempt", (run_id,))]

    def requeue(self, run_id: str, reason: str) -> None:
        self.db.run("UPDATE runs SET status = 'queued', exit_reason = %s, started_at = NULL, worker = %s "
                    f"WHERE id = %s AND {OPEN_SQL}", (reason, self.owner, run_id))

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

    def open_totals(self) -> dict[str, int]:
        return dict(self.db.all(f"SELECT workspace, COUNT(*) FROM runs WHERE {OPEN_SQL} GROUP BY workspace"))

    def search(self, workspace: str, where: RunFilter, limit: int) -> list[RunRecord]:
        # a known status as a literal: the planner may then walk runs_open or runs_ended_badly in id order
        sql, params = f"{SELECT} WHERE workspace = %s", [workspace]
        if where.status in STATUSES:
            sql += f" AND status = '{where.status}'"
        elif where.status is not None:
            sql += " AND status = %s"
            params.append(where.status)
        for column, value in (("job_id", where.job_id), ("trigger", where.trigger), ("batch_id", where.batch_id),
                              ("parent_run_id", where.parent_run_id)):
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

    def hour_counts(self, workspace: str, hours: Sequence[int], now: float) -> dict[int, list[tuple[str, str, int]]]:
        """Each hour's runs as (job id, status, count): a settled hour's from ``run_hours`` (counted once, the
        first time it is read settled), the others' counted now, as in SQLite (``records/sqlite/runs.py``). An
        hour is settled when it ended a while ago, every run in it has ended and no map still taking items could
        add runs to it; deleting runs drops their hours' rows. Three statements whatever the hours, in a short
        transaction when hours are kept (after a lock no delete of runs holds meanwhile)."""
        if not hours:
            return {}
        (frontier,) = self.db.one(UNSETTLED_FROM, {"ws": workspace, "since": id_at("b", hours[0])})
        frontier = frontier or "\uffff"
        settled = {h for h in hours if h + 3600 <= now - SETTLE_AFTER and id_at("r", h + 3600) <= frontier}
        found: dict[int, list[tuple[str, str, int]]] = {}
        if settled:
            for hour, job_id, status, n in self.db.all(
                    "SELECT hour, job_id, status, n FROM run_hours WHERE workspace = %s AND hour = ANY(%s)",
                    (workspace, sorted(settled))):
                rows = found.setdefault(hour, [])
                if job_id:  # '' marks the hour as counted
                    rows.append((job_id, status, n))
        missing = [hour for hour in hours if hour not in found]
        if not missing:
            return {hour: found[hour] for hour in hours}
        if settled.isdisjoint(missing):  # nothing to keep: counted live
            found.update(self._count_hours(self.db, workspace, missing))
            return {hour: found.get(hour, []) for hour in hours}
        with self.db.conn() as conn, conn.transaction():  # counted and kept with no delete in between
            conn.execute("SELECT pg_advisory_xact_lock(%s::bigint)", (HOURS_LOCK,))
            counted = self._count_hours(conn, workspace, missing)
            kept = []
            for hour in missing:
                if hour in settled:
                    kept += [(hour, "", "", 0), *((hour, *row) for row in counted.get(hour, []))]
            try:
                with conn.transaction():  # a savepoint: the counts stand when they cannot be kept
                    conn.execute(KEEP_HOURS, (workspace, *map(list, zip(*kept))))
            except psycopg.Error as exc:  # keeping them is an optimisation (a full disk): the counts stand
                if conn.broken:
                    raise
                log.warning("could not keep the overview's counts of %d hours: %s", len(settled), exc)
        found.update(counted)
        return {hour: found.get(hour, []) for hour in hours}

    @staticmethod
    def _count_hours(db, workspace: str, hours: list[int]) -> dict[int, list[tuple[str, str, int]]]:
        """Each hour's (job id, status, count), counted now in one statement (on ``db``: the pool, or a
        connection in a transaction) over the ids from the first hour's to the last's: one range, not one
        scan per hour (which the planner would rather serve from the table's rows)."""
        total: dict[tuple[int, str], int] = {}
        counted: dict[int, list[tuple[str, str, int]]] = {}
        wanted = set(hours)
        params = {"ws": workspace, "lo": id_at("r", min(hours)), "hi": id_at("r", max(hours) + 3600)}
        rows = db.all(COUNT_HOURS, params) if isinstance(db, Database) else db.execute(COUNT_HOURS, params).fetchall()
        for hour, job_id, status, n in rows:
            if hour not in wanted:
                continue
            if status is None:
                total[hour, job_id] = total.get((hour, job_id), 0) + n
            else:
                counted.setdefault(hour, []).append((job_id, status, n))
                total[hour, job_id] = total.get((hour, job_id), 0) - n
        for (hour, job_id), n in total.items():
            if n:
                counted.setdefault(hour, []).append((job_id, "succeeded", n))
        return counted

    def claim_orphans(self, reason: str) -> list[RunRecord]:
        """Several gateways share the database: the open runs of those that died become this one's. The statement
        reads every open run, so the leader runs it only when a gateway's liveness lock has gone since its last
        look (a glance at pg_locks), and at its first look after CLAIM_RECHECK seconds without one."""
        live = frozenset(r[0] for r in self.db.all(LIVE_GATEWAYS, (GATEWAYS,)))
        now = time.monotonic()
        if self._live is not None and live >= self._live and now - self._looked < CLAIM_RECHECK:
            self._live, self._looked = live, now
            return []
        rows = self.db.all(CLAIM_ORPHANS, {"gateway": self.gateway, "cls": GATEWAYS, "owner": self.owner,
                                           "reason": reason})
        self._live, self._looked = live, now
        return sorted((RunRecord(*r) for r in rows), key=lambda r: r.id)

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
                "dr AS (DELETE FROM runs USING victims v WHERE runs.id = v.id),\n"
                f"dh AS (DELETE FROM run_hours WHERE (workspace, hour) IN "
                f"(SELECT workspace, {HOUR_OF_ID.format(id='id')} FROM victims))")
        return deleting(self.db, drop_sql(victims, then), {"before": now - 86400.0 * days, "limit": limit})

    def stored_keys(self, keys: Sequence[str]) -> set[str]:
        keys = list(keys)
        return {r[0] for r in self.db.all(
            "SELECT object_key FROM payloads WHERE object_key = ANY(%s) UNION ALL "
            "SELECT object_key FROM run_items WHERE object_key = ANY(%s)", (keys, keys))}
